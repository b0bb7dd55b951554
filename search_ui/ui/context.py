"""What one running app holds: the database, a lazily built query engine, and the file policy.

The serving concerns shared by the page (:mod:`search_ui.app`) and the JSON API
(:mod:`search_ui.api`) live here. Gradio serves a file to the browser only after a handler
returned it; every path a handler returns passes :meth:`AppContext.servable` first: the
:class:`ImageGuard` admits a file only when its real path (symlinks resolved) lies under one of the
dataset's image roots (``meta.json`` ``image_roots``) and has an image suffix, and
:class:`ServedFiles` only when it is an indexed image that is still the file indexed (its recorded
identity, :mod:`indexer.identity`). The API's image route and Gradio's file route ask
:class:`ServedFiles` too. ``serving_dirs`` narrows Gradio's own
``allowed_paths`` to the folders that actually hold indexed images, so a manifest or the database
folder sitting beside them is never reachable through Gradio's file route.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from indexer import schema as S
from indexer.errors import UserError
from indexer.identity import FileChanged, FileIdentity, verify
from indexer.store import Database

log = logging.getLogger(__name__)

#: More distinct image folders than this and Gradio is allowed the roots themselves instead.
MAX_SERVING_DIRS = 2000


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    return frozenset(Image.registered_extensions())


def image_roots(db: Database) -> list[Path]:
    """The dataset's own folders: ``meta.json`` ``image_roots``, else the manifests' folders."""
    meta = db.read_meta()
    roots = meta.get("image_roots") or [str(Path(s).parent) for s in meta.get("sources", [])]
    if not roots:
        raise UserError(
            f"the database {db.path} records no image folders (meta.json image_roots); "
            "re-run `llm2loss index` on its manifest so the app knows which files it may serve."
        )
    return [Path(os.path.realpath(r)) for r in roots]


class ImageGuard:
    """Admits a path only if it resolves to an image file under one of ``roots``.

    ``roots`` are real paths. ``../`` segments and symlinks are resolved before the check, so neither
    can lead outside the roots.
    """

    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self._suffixes = _image_suffixes()

    def is_under_roots(self, path: str | os.PathLike) -> bool:
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(r) for r in self.roots)

    def check(self, path: str | os.PathLike | None) -> str | None:
        """The real path as a string when ``path`` may be served, else ``None`` (and a log line)."""
        if not path:
            return None
        real = Path(os.path.realpath(path))
        if real.suffix.lower() not in self._suffixes or not self.is_under_roots(real):
            log.warning("refused to serve %s: not an image under the dataset's folders", path)
            return None
        if not real.is_file():
            log.warning("image %s is missing on disk", path)
            return None
        return str(real)


def serving_dirs(db: Database, guard: ImageGuard) -> list[str]:
    """Folders Gradio may serve files from: the distinct folders of indexed images, under the roots."""
    dirs: set[str] = set()
    for batch in db.iter_batches([S.IMAGE]):
        for p in batch.column(S.IMAGE).to_pylist():
            dirs.add(os.path.dirname(os.path.realpath(p)))
        if len(dirs) > MAX_SERVING_DIRS:
            return [str(r) for r in guard.roots]
    return sorted(d for d in dirs if guard.is_under_roots(d))


class ServedFiles:
    """The files ``serve`` hands out: exactly the indexed images, checked to be the files indexed.

    Gradio's ``allowed_paths`` admits whole folders, so a manifest, a key or a symlink to
    ``/etc/passwd`` beside the images would be served; this allow-list admits a requested path only
    when its real path (``..`` and symlinks resolved as the file route would open it) is the real
    path *recorded at index time* of an image in the table, and the file there is still the one
    indexed (:func:`indexer.identity.verify`: size, modification time and SHA-256 of its bytes), or
    when it lies in Gradio's own cache of copies it made for handlers' outputs and uploads. A
    symlink re-pointed after ``index`` (at ``secret.txt``) or a file replaced under an image's name
    is refused. It is rebuilt when the table's rows change (``data_version``).

    A table indexed before identities were recorded (no :data:`~indexer.schema.IDENTITY_COLUMNS`)
    is checked by path only: the real path of an indexed image *now*, as before; said once in the log.

    Memory: per indexed image an int64 hash of its real path, its size and time (int64 each) and its
    32-byte digest: 56 MB per million rows; Python's string hash is keyed per process, so a collision
    cannot be aimed at.
    """

    def __init__(self, db: Database):
        self.db = db
        self._lock = threading.Lock()
        self._state: tuple | None = None
        self._version: int | None = None
        self.checks_identity: bool | None = None

    @staticmethod
    def _real_paths(paths: list[str]) -> list[str | None]:
        """Real paths of ``paths`` now (None: its folder is missing): one ``realpath`` per folder plus
        one per symlinked file (a directory listing says which files are links)."""
        out, dirs, links = [], {}, {}
        for p in paths:
            if not p:
                out.append(None)
                continue
            folder, name = os.path.split(p)
            if folder not in dirs:
                dirs[folder] = os.path.realpath(folder)
                try:
                    with os.scandir(folder) as it:
                        links[folder] = {e.name for e in it if e.is_symlink()}
                except OSError:
                    links[folder] = None  # a missing folder: its files cannot be served anyway
            if links[folder] is None:
                out.append(None)
                continue
            out.append(os.path.realpath(p) if name in links[folder] else os.path.join(dirs[folder], name))
        return out

    def _build(self) -> tuple:
        names = set(self.db.table.schema.names)
        with_identity = all(c in names for c in S.IDENTITY_COLUMNS)
        if not with_identity:
            log.warning("the database %s was indexed before llm2loss recorded which file each image is: served "
                        "files are checked by path only; re-index into a new --db to check them by content",
                        self.db.path)
        hashes, sizes, mtimes, digests = [], [], [], []
        cols = [S.IMAGE, *S.IDENTITY_COLUMNS] if with_identity else [S.IMAGE]
        for batch in self.db.iter_batches(cols):
            if with_identity:
                recorded = batch.column(S.IMAGE_REAL).to_pylist()
                for real, size, mtime, sha in zip(recorded, *(batch.column(c).to_pylist() for c in S.IDENTITY_COLUMNS[1:]),
                                                  strict=True):
                    if real is None or sha is None:
                        continue  # could not be read at index time: never served
                    hashes.append(hash(real))
                    sizes.append(size), mtimes.append(mtime), digests.append(bytes.fromhex(sha))
            else:
                hashes.extend(hash(p) for p in self._real_paths(batch.column(S.IMAGE).to_pylist()) if p)
        order = np.argsort(np.asarray(hashes, dtype=np.int64), kind="stable")
        h = np.asarray(hashes, dtype=np.int64)[order]
        if not with_identity:
            return h, None
        ident = (np.asarray(sizes, np.int64)[order], np.asarray(mtimes, np.int64)[order],
                 np.frombuffer(b"".join(digests), dtype="S32")[order] if digests else np.zeros(0, "S32"))
        return h, ident

    def _current(self) -> tuple:
        version = self.db.data_version
        with self._lock:
            if self._state is None or version != self._version:
                self._state, self._version = self._build(), version
                self.checks_identity = self._state[1] is not None
            return self._state

    def recorded(self, real: str) -> FileIdentity | None | bool:
        """The identity recorded for an image whose real path at index time was ``real``; True for
        an indexed image of a table without identities; None when ``real`` is no indexed image."""
        hashes, ident = self._current()
        i = int(np.searchsorted(hashes, hash(real)))
        if i >= len(hashes) or int(hashes[i]) != hash(real):
            return None
        if ident is None:
            return True
        sizes, mtimes, digests = ident
        return FileIdentity(real, int(sizes[i]), int(mtimes[i]), bytes(digests[i]).hex())

    def indexed(self, real: str) -> bool:
        return self.recorded(real) is not None

    def _verified(self, requested: str, read: bool):
        """(real path, bytes or None) of an indexed image still as indexed; else None (logged)."""
        if not requested or "://" in requested or "\x00" in requested:
            return None
        # Gradio opens os.path.abspath(requested): ".." is removed by text first, then the OS
        # resolves symlinks; realpath of that string is the file that would be sent.
        real = os.path.realpath(os.path.abspath(requested))
        rec = self.recorded(real)
        if rec is None:
            return None
        if rec is True:  # no identity recorded: by path only
            if not os.path.isfile(real):
                return None
            return real, (Path(real).read_bytes() if read else None)
        try:
            got = verify(real, rec, read=read)
        except FileChanged as e:
            log.warning("refused to serve %s: %s", requested, e)
            return None
        return real, (got if read else None)

    def check(self, requested: str) -> str | None:
        """The real path ``requested`` opens when it may be served, else None. ``requested`` is a path
        as Gradio's file route receives it (absolute, or relative to the working directory)."""
        from gradio import utils as gr_utils

        found = self._verified(requested, read=False)
        if found is not None:
            return found[0]
        if not requested or "://" in requested or "\x00" in requested:
            return None
        real = os.path.realpath(os.path.abspath(requested))
        if not os.path.isfile(real) or self.recorded(real) is not None:
            return None  # an indexed image that changed is not let through as a "cache copy"
        for created in (gr_utils.get_upload_folder(), gr_utils.get_cache_folder()):
            folder = os.path.realpath(os.path.abspath(created))
            if real.startswith(folder.rstrip(os.sep) + os.sep):
                return real
        return None

    def read(self, requested: str) -> tuple[str, bytes] | None:
        """(real path, bytes) of an indexed image still as indexed, the bytes read once (what was
        checked is what is sent); None when it may not be served."""
        return self._verified(requested, read=True)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(x: Any, digits: int = 2) -> str:
    f = _num(x)
    return "–" if f is None else f"{f:.{digits}f}"


def caption(rec: dict) -> str:
    """One line under a gallery image: label, true loss, predicted loss ± spread, similarity."""
    parts = [str(rec.get(S.LABEL) or "?"), f"loss {fmt(rec.get(S.LOSS))}",
             f"pred {fmt(rec.get(S.PREDICTED_LOSS))}±{fmt(rec.get(S.PREDICTED_LOSS_STD))}"]
    if _num(rec.get("similarity")) is not None:
        parts.append(f"sim {fmt(rec['similarity'])}")
    return " · ".join(parts)


def jsonable(rec: dict) -> dict:
    """A record with non-finite floats as ``None`` and numpy scalars as Python ones."""
    out = {}
    for k, v in rec.items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def public_mode(m: dict) -> dict:
    """A cached mode (:meth:`AppContext.modes`) as `llm2loss explain --json` gives it: without the
    member and pool id lists."""
    return {k: v for k, v in m.items() if k not in ("ids", "pool_ids")}


class AppContext:
    """Shared by every session of one server: the database, the engine, caches and locks."""

    def __init__(self, db: str | os.PathLike | Database):
        self.db = db if isinstance(db, Database) else Database(db)
        self.db.table  # noqa: B018 -- refuse a database without a table before the page starts
        self.guard = ImageGuard(image_roots(self.db))
        self.files = ServedFiles(self.db)  # the indexed images, checked to be the files indexed
        self._engine = None
        self._engine_lock = threading.Lock()
        self._scratch = tempfile.TemporaryDirectory(prefix="llm2loss-ui-")
        self.scratch = self._scratch.name  # downloads are written here before Gradio caches them
        self._modes: dict[tuple, list[dict]] = {}
        self._notes: dict[tuple, str | None] = {}  # why explain shows no mode, per cached answer
        self._modes_lock = threading.Lock()
        self._plans: dict[tuple, dict] = {}

    def close(self) -> None:
        """Remove the scratch folder (``serve`` calls this on exit, SIGTERM included)."""
        self._scratch.cleanup()

    @property
    def engine(self):
        """The query engine, built on first use (it loads CLIP and the FAISS index)."""
        with self._engine_lock:
            if self._engine is None:
                from search_ui.engine import QueryEngine

                self._engine = QueryEngine(self.db)
            return self._engine

    def compile_text_in_background(self) -> threading.Thread:
        """Load the engine and compile its CLIP text encoding (``ClipModel.compile_text``) in a
        daemon thread, for a long-lived server: queries are answered meanwhile, uncompiled."""
        def work():
            try:
                clip = self.engine.clip
                log.info("compiling the CLIP text encoding in the background (tens of seconds); "
                         "queries are answered uncompiled meanwhile")
                clip.compile_text()
            except Exception as e:  # a query will say what is wrong with the database
                log.info("text encoding not compiled: %s", e)

        thread = threading.Thread(target=work, name="llm2loss-compile-text", daemon=True)
        thread.start()
        return thread

    @property
    def metadata_columns(self) -> list[str]:
        return [f.name for f in self.db.table.schema if f.name not in S.CORE_COLUMNS]

    def rows(self, ids: list[str]) -> list[dict]:
        """Records (no embedding) for ``ids``, in the order given; unknown ids are dropped."""
        cols = list(S.RESULT_COLUMNS) + self.metadata_columns
        table = self.db.rows_by_id([str(i) for i in ids], cols)
        by_id = {r[S.ID]: jsonable(r) for r in table.to_pylist()}
        return [by_id[i] for i in map(str, ids) if i in by_id]

    def servable(self, path: str | None) -> str | None:
        """The real path of an indexed image that may be shown: under the dataset's folders, an
        image, and still the file indexed (:class:`ServedFiles`); else None (logged)."""
        real = self.guard.check(path)
        return real if real is not None and self.files.check(real) == real else None

    def _printable_copy(self, real: str) -> str | None:
        """A copy of an indexed image whose file name holds a newline or another control character
        (Gradio's file route cannot serve such a name), under a printable name in the scratch folder;
        the bytes are those checked against the recorded identity."""
        got = self.files.read(real)
        if got is None:
            return None
        import hashlib

        name = "".join(c if c.isprintable() else "_" for c in os.path.basename(real))
        out = Path(self.scratch) / "names" / hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16] / name
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(got[1])
            os.replace(tmp, out)
        return str(out)

    def gallery(self, records: list[dict]) -> tuple[list[tuple[str, str]], list[dict]]:
        """(gallery items ``(path, caption)``, the records shown) — unservable images are left out,
        so a gallery index always points at the record it shows."""
        items, shown = [], []
        for rec in records:
            path = self.servable(rec.get(S.IMAGE))
            if path is not None and not os.path.basename(path).isprintable():
                path = self._printable_copy(path)
            if path is not None:
                items.append((path, caption(rec)))
                shown.append(rec)
        return items, shown

    def modes(self, top: int, vocab: str | None = None, progress=None) -> list[dict]:
        """``diagnosis.explain`` output as dicts with every member id (``ids``), cached per table
        version: explain takes seconds, and every visitor would otherwise pay for it. The ``top``
        modes whose evidence holds come first, then those whose evidence does not (``shown``
        False), for the tab to list marked; the API returns only the first."""
        key = (self.db.version, int(top), vocab)
        with self._modes_lock:
            if key not in self._modes:
                from diagnosis.explain import explain

                if progress is not None:
                    progress(0.1, desc="naming the failures and checking each name against the data")
                # the engine's CLIP: loaded once per server, and its text encoding compiled there
                modes = explain(self.db, vocab=vocab, top=top, show_all=True, clip=self.engine.clip)
                for old in [k for k in self._modes if k[0] != key[0]]:  # an older table's: never asked again
                    del self._modes[old]
                    self._notes.pop(old, None)
                self._modes[key] = [jsonable(m.to_dict(with_ids=True)) for m in modes]
                self._notes[key] = modes.note
            return self._modes[key]

    def modes_note(self, top: int, vocab: str | None = None) -> str | None:
        """Why :meth:`modes` (asked first, same arguments) shows no mode; None when it shows one."""
        return self._notes.get((self.db.version, int(top), vocab))

    def plan(self, budget: int, modes: tuple[str, ...] = ()) -> dict:
        """``diagnosis.curate.plan_curation`` as a dict (modes, items), cached per table version,
        budget and modes: it runs explain, seconds that every visitor would otherwise pay."""
        key = (self.db.version, int(budget), tuple(modes))
        with self._modes_lock:
            if key not in self._plans:
                from diagnosis.curate import plan_curation

                plan = plan_curation(self.db, int(budget), modes=list(modes) or None)
                for old in [k for k in self._plans if k[0] != key[0]]:
                    del self._plans[old]
                self._plans[key] = jsonable(plan.to_dict())
            return self._plans[key]
