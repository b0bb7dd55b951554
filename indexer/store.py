"""The database folder: one LanceDB table of samples plus the files that describe it.

Layout of a database folder ``DIR``::

    DIR/samples.lance/      the LanceDB table (schema in :mod:`indexer.schema`)
    DIR/meta.json           which CLIP model made the embeddings, image roots, data version
    DIR/rejects.csv         rows refused by the last ``llm2loss index`` run, with reasons
    DIR/faiss/              the FAISS index, stamped with the data version it covers
    DIR/diagnosis/          the fitted diagnosis ensemble, stamped likewise
    DIR/selections.json     named selections (curated retraining sets)

``data_version`` is the table version after the last commit that added or removed rows (and so
embeddings). Writing ``predicted_loss`` bumps the Lance version but not the data version, so the
FAISS index stays valid across ``diagnose`` runs while any change of rows makes it stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexer import schema as S
from indexer.errors import UserError
from indexer.integrity import storage_error

log = logging.getLogger(__name__)

META_FILE = "meta.json"
REJECTS_FILE = "rejects.csv"
FAISS_DIR = "faiss"
DIAGNOSIS_DIR = "diagnosis"
SELECTIONS_FILE = "selections.json"
#: Locked (lockf) exclusively by every writer of the table (index, diagnose, scoring) for its whole run.
WRITER_LOCK_FILE = ".writer.lock"
#: Table versions younger than this survive ``Database.cleanup``: a reader (a search, the UI, an
#: export) that began on an older version keeps its files until it has surely finished.
KEEP_VERSIONS_FOR = timedelta(hours=1)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a full disk leaves no temporary file behind
        if os.path.exists(tmp):
            os.unlink(tmp)


_held: dict[str, list] = {}  # folder -> [owning thread id, nesting depth] of writer_lock in this process
_held_lock = threading.Lock()


@contextmanager
def writer_lock(path: str | os.PathLike, command: str):
    """Hold the database folder's writer lock for a whole run, or refuse at once (one sentence).

    Writers of the table (``index``, ``diagnose``, ``diagnose --score-new``) exclude each other: two
    ``index`` runs at once stored every row twice, two ``diagnose`` runs failed on each other's
    cleanup. The second writer exits (UserError, status 2) naming the one holding the lock, rather
    than waiting hours behind it without a word. Re-entrant within one thread (another thread of the
same process is refused too). Creates the folder
    when missing; yields whether it existed before, and removes it again if the run left nothing but
    the lock in it. The lock is a POSIX record lock (``lockf``) on ``DIR/.writer.lock``: held by this
    process alone (not by forked workers) and released by the kernel when it dies, so a killed run
    never leaves the database locked.
    """
    folder = Path(path).expanduser().resolve()
    existed = folder.exists()
    if existed and not folder.is_dir():
        raise UserError(f"--db {folder} is a file, not a folder; pass a folder path for the database.")
    key, me = str(folder), threading.get_ident()
    with _held_lock:
        held = _held.get(key)
        if held is not None and held[0] == me:
            held[1] += 1
        elif held is not None:  # another thread of this process: POSIX locks cannot tell threads apart
            raise UserError(f"another `llm2loss` writer in this process is writing to the database {folder}; "
                            f"wait until it has finished, then run `llm2loss {command}` again.")
    if held is not None:
        try:
            yield existed
        finally:
            with _held_lock:
                held[1] -= 1
        return
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if left empty
    lock_path = folder / WRITER_LOCK_FILE
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)  # again: a holder before us may have rolled it back
            f = open(lock_path, "a+")  # noqa: SIM115 -- held open across the yield, closed in finally
        except OSError as e:
            raise UserError(f"--db {folder} cannot be created or written ({e.strerror or type(e).__name__}); "
                            "pass a folder you can write to.") from e
        try:
            # a POSIX record lock, not flock(2): flock is shared with forked children (image-decoding
            # workers), which kept a killed run's lock alive; a record lock belongs to this process only
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                f.close()
                raise UserError(f"the database {folder} cannot be locked for writing ({e.strerror}); "
                                "pass a folder on a local file system.") from e
            f.seek(0)
            holder = f.read().strip() or "another llm2loss command"
            f.close()
            raise UserError(
                f"{holder} is writing to the database {folder}; wait until it has finished, then run "
                f"`llm2loss {command}` again (or use another --db folder)."
            ) from None
        try:  # the holder before us may have removed the file (a new folder it then rolled back)
            same = os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        try:  # the holder's name is for the sentence a second writer gets; a full disk only loses it
            f.seek(0)
            f.truncate()
            f.write(f"`llm2loss {command}` (pid {os.getpid()})")
            f.flush()
        except OSError as e:
            log.debug("could not write the writer's name into %s: %s", lock_path, e)
        with _held_lock:
            _held[key] = [me, 1]
        yield existed
    finally:
        with _held_lock:
            _held.pop(key, None)
        try:
            if not existed and folder.is_dir() and [p.name for p in folder.iterdir()] == [WRITER_LOCK_FILE]:
                lock_path.unlink()  # a failed first run into a new folder leaves nothing behind
            elif lock_path.exists():
                f.seek(0)
                f.truncate()  # no holder named once released
        except OSError:
            pass
        with contextlib.suppress(OSError):
            f.close()  # releases the lock even when flushing the holder's name fails (a full disk)
        for p in created if not existed else ():
            try:
                if p.exists():
                    p.rmdir()  # innermost first (the folder, then parents this call made) while empty
            except OSError:
                break


def _reads(method):
    """Turn Lance's report of a damaged file, met while reading the table, into one sentence that
    points at ``llm2loss check`` (:func:`indexer.integrity.storage_error`); other errors pass."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UserError:
            raise
        except Exception as e:
            err = storage_error(e, self.path)
            if err is None:
                raise
            raise err from None

    return wrapper


class Database:
    """A database folder. Cheap to open; the table is opened lazily.

    ``Database(path)`` opens an existing database and refuses a folder without one;
    ``Database(path, create=True)`` also accepts a new or empty folder.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False):
        import lancedb  # heavy import, deferred

        self.path = Path(path).expanduser().resolve()
        if not create and not (self.path / META_FILE).exists():
            raise UserError(
                f"{self.path} is not an llm2loss database (no {META_FILE}); "
                "create it with `llm2loss index MANIFEST --db DIR` first."
            )
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        # Every read checks for a newer table version: another process (a `diagnose` while the UI
        # serves) may commit and then clean up the old version's files, which a handle pinned to
        # that version would then fail to read ("Not found: ...lance").
        self._conn = lancedb.connect(str(self.path), read_consistency_interval=timedelta(0))
        self._table = None

    # ---- files -------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def rejects_path(self) -> Path:
        return self.path / REJECTS_FILE

    @property
    def faiss_dir(self) -> Path:
        return self.path / FAISS_DIR

    @property
    def diagnosis_dir(self) -> Path:
        return self.path / DIAGNOSIS_DIR

    @property
    def selections_path(self) -> Path:
        return self.path / SELECTIONS_FILE

    def read_meta(self) -> dict:
        if not self.meta_path.exists():
            return {}
        try:
            meta = json.loads(self.meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            meta = e
        if not isinstance(meta, dict):
            raise UserError(
                f"{self.meta_path} is not a JSON object (the file is corrupt); restore it from a backup, "
                f"or index the manifest again into a new --db folder."
            )
        return meta

    def update_meta(self, **fields: Any) -> dict:
        meta = self.read_meta()
        meta.update(fields)
        write_json_atomic(self.meta_path, meta)
        return meta

    # ---- the CLIP model that made the embeddings ---------------------------------------------
    @property
    def clip_identity(self) -> dict | None:
        return self.read_meta().get("clip")

    def check_clip(self, identity: dict) -> None:
        """Refuse ``identity`` unless it is the model the stored embeddings came from."""
        stored = self.clip_identity
        if stored is not None and stored != identity:
            raise UserError(
                f"the database {self.path} holds embeddings from CLIP model {describe_clip(stored)}, "
                f"not {describe_clip(identity)}; use the same --clip/--pretrained/--clip-checkpoint "
                "as when it was indexed, or index into a new --db folder."
            )

    # ---- the table ---------------------------------------------------------------------------
    def has_table(self) -> bool:
        return S.TABLE_NAME in self._conn.list_tables().tables

    @property
    @_reads
    def table(self):
        """The LanceDB table; refuses politely when nothing was indexed yet."""
        if self._table is None:
            if not self.has_table():
                raise UserError(
                    f"the database {self.path} has no sample table yet; run `llm2loss index` first."
                )
            self._table = self._conn.open_table(S.TABLE_NAME)
        return self._table

    def create_table(self, table_schema: pa.Schema):
        self._table = self._conn.create_table(S.TABLE_NAME, schema=table_schema, exist_ok=True)
        return self._table

    @property
    @_reads
    def version(self) -> int:
        """Current Lance version of the table (bumps on every commit)."""
        self.table.checkout_latest()
        return int(self.table.version)

    @property
    def data_version(self) -> int:
        """Version of the last commit that changed the set of rows (see module doc)."""
        return int(self.read_meta().get("data_version", 0))

    @_reads
    def count_rows(self, where: str | None = None) -> int:
        return int(self.table.count_rows(where))

    @property
    def embed_dim(self) -> int:
        return int(self.table.schema.field(S.EMBEDDING).type.list_size)

    def ids(self) -> np.ndarray:
        """All sample ids, (n,) object array of str, in table order."""
        return self._scan([S.ID]).column(S.ID).to_numpy(zero_copy_only=False)

    @_reads
    def _scan(self, columns: list[str], where: str | None = None) -> pa.Table:
        q = self.table.search().select(columns).limit(None)
        if where:
            q = q.where(where)
        return q.to_arrow()

    def read(self, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        """Rows (all, or those matching the SQL ``where``) with the given columns."""
        cols = columns or [f.name for f in self.table.schema]
        return self._scan(cols, where)

    @_reads
    def snapshot(self):
        """The table as it is now, pinned: later commits by other writers do not change what it reads
        (pass it to :meth:`iter_batches` to stream the same rows, in the same order, several times)."""
        self.table.checkout_latest()
        return self.table.to_lance()

    def iter_batches(self, columns: list[str], batch_rows: int = 65536, snapshot=None) -> Iterator[pa.RecordBatch]:
        """Stream the table (or a :meth:`snapshot` of it) in record batches, in table order, so
        memory does not grow with its size."""
        ds = snapshot if snapshot is not None else self.table.to_lance()
        try:
            yield from ds.to_batches(columns=columns, batch_size=batch_rows, scan_in_order=True)
        except Exception as e:
            err = storage_error(e, self.path)
            if err is None:
                raise
            raise err from None

    def embeddings(self, batch_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,) object, embeddings (n, d) float32 L2-normalised), read in batches."""
        n, d = self.count_rows(), self.embed_dim
        out = np.empty((n, d), dtype=np.float32)
        ids = np.empty(n, dtype=object)
        i = 0
        for b in self.iter_batches([S.ID, S.EMBEDDING], batch_rows):
            m = b.num_rows
            ids[i : i + m] = b.column(S.ID).to_numpy(zero_copy_only=False)
            out[i : i + m] = np.asarray(b.column(S.EMBEDDING).values.to_numpy()).reshape(m, d)
            i += m
        return ids[:i], out[:i]

    def rows_by_id(self, ids: list[str], columns: list[str] | None = None) -> pa.Table:
        """The rows with these ids (any order; missing ids are absent)."""
        if not ids:
            return self.read(columns, where="false")
        quoted = ",".join("'" + str(i).replace("'", "''") + "'" for i in ids)
        return self.read(columns, where=f"{S.ID} IN ({quoted})")

    def update_columns(self, data: pa.Table) -> int:
        """Write columns of existing rows, matched on ``id``, in one commit; returns the new version.

        Rows are matched, never inserted, so the set of rows (and ``data_version``) is unchanged;
        ids in ``data`` that are not in the table are ignored. Only the given columns are written:
        each fragment gets a new data file holding them (Lance ``update_columns``) and one ``Update``
        commit swaps them in for every fragment at once, so readers see all of the new values or
        none. The embeddings are neither read nor rewritten, so the vector index and the ``id``
        index stay valid. (``merge_insert`` rewrote whole rows: 7.0 GiB peak for two float columns
        of a 1M x 512 table; see BENCHMARKS.md, issue 7.)
        """
        import lance
        import pyarrow.compute as pc

        if data.num_rows == 0:
            return self.version
        ds = self.snapshot()
        data = data.cast(pa.schema([ds.schema.field(name) for name in data.column_names]))
        frags = ds.get_fragments()
        frag_ids = [frag.to_table(columns=[S.ID]).column(S.ID) for frag in frags]
        # where each table row's id sits in ``data``: one hash of data's ids for the whole table (a
        # freshly indexed table has ~1,000 fragments per million rows; hashing per fragment took
        # minutes at 1M)
        where = pc.index_in(pa.chunked_array([c for ids in frag_ids for c in ids.chunks],
                                             type=data.schema.field(S.ID).type),
                            value_set=data.column(S.ID).combine_chunks())
        updated, fields, start = [], set(), 0
        for frag, ids in zip(frags, frag_ids, strict=True):
            pos = where.slice(start, len(ids))
            start += len(ids)
            pos = pos.filter(pc.is_valid(pos))
            if len(pos) == 0:
                continue
            metadata, modified = frag.update_columns(data.take(pos), left_on=S.ID, right_on=S.ID)
            updated.append(metadata)
            fields.update(modified)
        if not updated:
            return self.version
        op = lance.LanceOperation.Update(updated_fragments=updated, fields_modified=sorted(fields))
        version = lance.LanceDataset.commit(ds.uri, op, read_version=ds.version).version
        self.table.checkout_latest()
        return int(version)

    def append(self, data: pa.Table) -> int:
        """Add rows in one Lance commit (all or nothing); returns the new table version."""
        result = self.table.add(data)
        # The commit reports its version: a checkout_latest per commit (``self.version``) made the
        # process's memory grow twice as fast with the number of commits (0.30 vs 0.14 MiB per commit).
        version = getattr(result, "version", None)
        return int(version) if version is not None else self.version

    def restore(self, version: int) -> None:
        """Make ``version``'s rows the latest again (a new version with the old data)."""
        self.table.checkout_latest()
        if int(self.table.version) != int(version):
            self.table.restore(int(version))

    def drop_table(self) -> None:
        """Remove the sample table (used to undo a first, failed ``index`` run)."""
        if self.has_table():
            self._conn.drop_table(S.TABLE_NAME)
        self._table = None

    def cleanup(self, older_than: timedelta | None = None) -> None:
        """Compact and drop table versions older than ``older_than`` (default
        :data:`KEEP_VERSIONS_FOR`), so repeated updates do not grow the folder without end.

        A reader's scan that began on an older version reads that version's files to its end (every
        read starts on the latest, ``read_consistency_interval=0``, but a long scan stays on the one
        it began on); dropping every old version at once removed files under such scans and under a
        second ``diagnose`` ("ArrowInvalid: Not found"), so recent versions are kept by age. The
        cost: the files of the last hour's versions (``diagnose`` writes only its two float columns)."""
        import warnings

        older_than = KEEP_VERSIONS_FOR if older_than is None else older_than
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=", category=UserWarning)
            self.table.optimize(cleanup_older_than=older_than)


def describe_clip(identity: dict) -> str:
    name = identity.get("model", "?")
    weights = identity.get("pretrained") or identity.get("checkpoint") or "random weights"
    return f"'{name}' ({weights})"


class FolderSnapshot:
    """A database folder's state before a write, enough to put it back after a bad-input failure.

    Taken before the write: whether the folder existed, meta.json's bytes; the writer sets
    ``version`` (the table's version, None when there was no table) once the table is open.
    """

    def __init__(self, path: Path, dir_existed: bool | None = None):
        self.path = path
        self.dir_existed = path.exists() if dir_existed is None else dir_existed
        meta = path / META_FILE
        self.meta = meta.read_bytes() if meta.exists() else None
        self.version: int | None = None

    def rollback(self, database: Database | None) -> None:
        """Folder, table rows and meta.json as they were (the table gets a new, restoring version)."""
        log.info("restoring %s to its state before this run", self.path)
        if not self.dir_existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        if database is not None:
            if self.version is None:
                database.drop_table()
            else:
                database.restore(self.version)
        meta = self.path / META_FILE
        if self.meta is None:
            meta.unlink(missing_ok=True)
        else:
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=META_FILE, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(self.meta)
            os.replace(tmp, meta)
