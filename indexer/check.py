"""``llm2loss check``: verify a database folder the way ``git fsck`` verifies a repository.

What is verified (:func:`check_database`):

* ``meta.json`` is a JSON object;
* the table: its latest Lance version is opened and *every* data file read to the end (each column
  of each fragment), and each scalar index (the BTREE on ``id``) answers a lookup. When the latest
  version is damaged (a data file truncated, deleted or zero-filled, a version manifest truncated),
  the older versions are read the same way, newest first, to find the newest intact one;
* the FAISS index: its stamp against the table (stale is not damage: the next query rebuilds it),
  both files' size and SHA-256 against those recorded when they were written, the ids in FAISS order
  against their recorded digest, the set of ids against the table's (each exactly once), and each
  stored vector against the table's embedding of its id (exact and IVF-Flat indexes: equal to the
  bit; IVF-PQ vectors are compressed and are checked by checksum only);
* the files a checker of another package adds (``extra``: the diagnosis ensemble and the cached
  text means, see :mod:`diagnosis.check`);
* ``selections.json`` is valid, and its ids are in the table (an id that is not is a note);
* temporary files left by an interrupted write (none while a writer holds the database).

``repair=True`` (``--repair``), under the database's writer lock: goes back to the newest intact
table version when the latest is damaged (unreadable version manifests are moved into
``DIR/damaged-<time>/``; then Lance's restore commits that version's rows as a new version; what is
lost, versions and rows, is said), stamps ``meta.json``'s data version, rebuilds a damaged or stale
FAISS index and a damaged ``id`` index, removes damaged caches and leftover temporary files, then
checks again. The ensemble is never refitted here: a damaged one says to run ``llm2loss diagnose``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from indexer import schema as S
from indexer.errors import UserError
from indexer.integrity import ids_digest, short_message
from indexer.store import META_FILE, SELECTIONS_FILE, WRITER_LOCK_FILE, Database, writer_lock

log = logging.getLogger(__name__)

OK, NOTE, DAMAGED = "ok", "note", "damaged"
#: rows read per batch while verifying the table and the FAISS vectors
BATCH_ROWS = 65536
_U64 = 2**64 - 1


@dataclass
class Finding:
    """One verified part of the database: ``status`` is ``ok``, ``note`` (worth knowing, nothing
    damaged: a stale index, ids of a selection no longer stored) or ``damaged``; ``fix`` says what
    to do; ``repaired`` what ``--repair`` did about it."""

    part: str
    status: str
    what: str
    fix: str | None = None
    repaired: str | None = None


@dataclass
class CheckReport:
    db: str
    findings: list[Finding] = field(default_factory=list)
    #: what --repair did and what it lost (None without --repair or when nothing needed it)
    repaired: list[str] = field(default_factory=list)
    lost: str | None = None
    #: the check after --repair (None without it, or when it repaired nothing)
    after: CheckReport | None = None
    repair: bool = False

    @property
    def ok(self) -> bool:
        final = self.after if self.after is not None else self
        return all(f.status != DAMAGED for f in final.findings)

    def add(self, part: str, status: str, what: str, fix: str | None = None) -> Finding:
        f = Finding(part, status, what, fix)
        self.findings.append(f)
        return f

    def to_dict(self) -> dict:
        return {"db": self.db, "ok": self.ok, "findings": [asdict(f) for f in self.findings],
                "repaired": self.repaired, "lost": self.lost,
                "after": self.after.to_dict() if self.after is not None else None}

    def summary(self) -> str:
        lines = [f"checked {self.db}"]
        for f in self.findings:
            lines.append(f"  {f.status.upper():8s} {f.part:11s} {f.what}")
            if f.fix and f.status != OK:
                lines.append(f"  {'':8s} {'':11s} -> {f.fix}")
        if self.repaired:
            lines.append("repaired:")
            lines += [f"  {r}" for r in self.repaired]
        if self.lost:
            lines.append(f"lost: {self.lost}")
        if self.after is not None:
            lines.append("after the repair:")
            lines += ["  " + x for x in self.after.summary().splitlines()[1:-1]]
        damaged = sum(f.status == DAMAGED for f in (self.after or self).findings)
        hint = "" if self.after is not None else (
            "; `--repair` cannot mend it here: see the fixes above" if self.repair else
            f"; see the fixes above (`llm2loss check --db {self.db} --repair` does what can be done here)")
        lines.append("all is well" if self.ok else f"{damaged} damaged part{'s' if damaged != 1 else ''}{hint}")
        return "\n".join(lines)


# ---- the table --------------------------------------------------------------------------------------
def manifest_versions(uri: Path) -> list[tuple[int, Path]]:
    """(version, manifest file) of every version of the Lance dataset at ``uri``, newest first.
    Lance names manifests either ``<version>.manifest`` or ``<2^64 - 1 - version>.manifest`` (its
    newer naming, which lists newest first); both are read."""
    out = []
    for p in (uri / "_versions").glob("*.manifest"):
        try:
            n = int(p.stem)
        except ValueError:
            continue
        out.append((_U64 - n if n > 2**63 else n, p))
    return sorted(out, reverse=True)


def read_version(uri: Path, version: int) -> tuple[int | None, str | None]:
    """(rows, None) when every data file of ``version`` reads to its end, else (None, what failed)."""
    import lance

    try:
        ds = lance.dataset(str(uri), version=version)
        ds.validate()
        rows = 0
        for batch in ds.to_batches(batch_size=BATCH_ROWS):
            rows += batch.num_rows
        if rows != ds.count_rows():
            return None, f"{rows} rows read but its manifest counts {ds.count_rows()}"
        return rows, None
    except Exception as e:  # Lance reports damage as RuntimeError, ValueError, OSError
        return None, _lance_message(e)


def _lance_message(e: Exception) -> str:
    return short_message(str(e)) or type(e).__name__


def _rows_in_manifest(uri: Path, version: int) -> int | None:
    """The row count a version's manifest states (None when the manifest cannot be read)."""
    import lance

    try:
        return int(lance.dataset(str(uri), version=version).count_rows())
    except Exception:
        return None


def _check_table(db: Database, report: CheckReport, repair: bool) -> bool:
    """Verify the table (see the module doc); with ``repair``, go back to the newest intact
    version. Returns whether the table (as it is now) is readable."""
    uri = db.path / f"{S.TABLE_NAME}.lance"
    if not uri.exists():
        report.add("table", NOTE, "no sample table yet", "run `llm2loss index MANIFEST --db DIR`")
        return False
    versions = manifest_versions(uri)
    if not versions:
        report.add("table", DAMAGED, f"{uri} has no version manifest (_versions/*.manifest)",
                   "restore the folder from a backup, or index the manifest again into a new --db folder")
        return False
    latest = versions[0][0]
    rows, problem = read_version(uri, latest)
    if problem is None:
        files = sum(1 for _ in (uri / "data").glob("*.lance"))
        report.add("table", OK, f"version {latest}: {rows:,} rows; every data file of it read to the end "
                                f"({files} file{'s' if files != 1 else ''} in data/)")
        _check_id_index(db, report, repair)
        return True
    intact = None
    for v, _ in versions[1:]:
        r, _p = read_version(uri, v)
        if _p is None and r:  # going back to an empty table would save nothing
            intact = (v, r)
            break
    if intact is None:
        report.add("table", DAMAGED, f"version {latest} cannot be read ({problem}) and no earlier version holding "
                                     "rows is intact",
                   "restore the database folder from a backup, or index the manifest again into a new --db folder")
        return False
    v, r = intact
    latest_rows = _rows_in_manifest(uri, latest)
    lost_rows = "an unknown number of rows (its manifest is unreadable)" if latest_rows is None else \
        f"{max(0, latest_rows - r):,} rows ({latest_rows:,} -> {r:,})"
    skipped = latest - v
    lost = (f"version{'s' if skipped > 1 else ''} {v + 1}{f'-{latest}' if skipped > 1 else ''} "
            f"and what {'they' if skipped > 1 else 'it'} changed: {lost_rows}")
    f = report.add("table", DAMAGED, f"version {latest} (the latest) cannot be read ({problem}); version {v} is "
                                     f"intact ({r:,} rows)",
                   f"`llm2loss check --db {db.path} --repair` goes back to version {v}, losing {lost}")
    if repair:
        _restore(db, uri, versions, v, f)
        report.repaired.append(f.repaired)
        report.lost = lost
    return False


def _restore(db: Database, uri: Path, versions: list[tuple[int, Path]], good: int, finding: Finding) -> None:
    """Make version ``good`` the table's latest: manifests that cannot be opened are moved aside
    (Lance cannot commit on top of them), then Lance's restore commits ``good``'s rows anew."""
    import lance

    aside = db.path / f"damaged-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    moved = []
    for v, path in versions:
        if v <= good:
            break
        if _rows_in_manifest(uri, v) is None:
            (aside / "_versions").mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), aside / "_versions" / path.name)
            moved.append(v)
    now = lance.dataset(str(uri))
    if now.version != good:
        lance.dataset(str(uri), version=good).restore()
        now = lance.dataset(str(uri))
    db._table = None  # reopen on the restored version
    if good < db.data_version:  # rows changed since ``good``: the derived files no longer match
        db.update_meta(data_version=int(now.version))
    finding.repaired = (f"the table is back at version {good}'s rows (now version {now.version})"
                        + (f"; unreadable manifest{'s' if len(moved) > 1 else ''} of version "
                           f"{', '.join(map(str, moved))} moved to {aside}" if moved else ""))


def _check_id_index(db: Database, report: CheckReport, repair: bool) -> None:
    """Each scalar index of the table answers a lookup of a stored id."""
    try:
        indices = [ix for ix in db.table.list_indices() if S.ID in ix.columns]
    except Exception as e:
        report.add("id index", DAMAGED, f"the table's indexes cannot be listed ({_lance_message(e)})",
                   "restore the folder from a backup")
        return
    if not indices:
        return
    probe = db.read([S.ID]).column(S.ID)[0].as_py() if db.count_rows() else None
    if probe is None:
        return
    try:
        found = db.rows_by_id([probe], [S.ID]).num_rows
        problem = None if found == 1 else f"a lookup of a stored id found {found} rows"
    except Exception as e:
        problem = _lance_message(e)
    if problem is None:
        report.add("id index", OK, f"the BTREE index on `{S.ID}` answers lookups")
        return
    f = report.add("id index", DAMAGED, f"the BTREE index on `{S.ID}` is damaged ({problem})",
                   f"`llm2loss check --db {db.path} --repair` rebuilds it")
    if repair:
        from indexer.ann import _ensure_id_index

        for ix in indices:
            db.table.drop_index(ix.name)
        _ensure_id_index(db)
        f.repaired = f"rebuilt the BTREE index on `{S.ID}`"
        report.repaired.append(f.repaired)


# ---- the FAISS index ------------------------------------------------------------------------------
def _check_faiss(db: Database, report: CheckReport, repair: bool) -> None:
    from indexer import ann

    status = ann.index_status(db)
    if not status["exists"] and status.get("reason") == "no FAISS index was built":
        f = report.add("faiss", NOTE, "no FAISS index yet", "the next search builds it (or `--repair`)")
    elif not status["fresh"] and "damaged" not in (status["reason"] or ""):
        f = report.add("faiss", NOTE, f"the FAISS index is stale ({status['reason']})",
                       "the next search rebuilds it (or `--repair`)")
    else:
        problem = status["reason"] if not status["fresh"] else _verify_faiss(db, status)
        if problem is None:
            kind = status.get("kind")
            vectors = "each vector equal to its row's embedding" if kind in ("flat", "ivf") else \
                "vectors compressed (IVF-PQ): checked by checksum"
            report.add("faiss", OK, f"{kind} index over {status['num_rows']:,} rows: checksums, id order and id set "
                                    f"match the table, {vectors}")
            return
        f = report.add("faiss", DAMAGED, f"FAISS: {problem} (never served)",
                       f"`llm2loss check --db {db.path} --repair` rebuilds it (so does the next search)")
    if repair and db.count_rows() > 0:
        ann.build_index(db, force=True)
        f.repaired = "rebuilt the FAISS index"
        report.repaired.append(f.repaired)


def _verify_faiss(db: Database, status: dict) -> str | None:
    """The full verification of a fresh-looking index (see the module doc); None when it holds."""
    from indexer import ann

    loaded = ann._read_files(db, status)
    if isinstance(loaded, str):
        return loaded
    index, ids = loaded
    if status.get("ids_sha256") is not None and ids_digest(ids) != status["ids_sha256"]:
        return "ids.npy holds other ids, or the same ids in another order, than the index was built with"
    position = {str(i): p for p, i in enumerate(ids.tolist())}
    if len(position) != len(ids):
        return f"ids.npy names {len(ids) - len(position)} ids twice"
    reconstruct = _reconstructor(index, status.get("kind"))
    seen = 0
    for batch in db.iter_batches([S.ID, S.EMBEDDING], BATCH_ROWS):
        batch_ids = batch.column(S.ID).to_pylist()
        pos = np.fromiter((position.get(i, -1) for i in batch_ids), np.int64, len(batch_ids))
        if (pos < 0).any():
            return f"stored id {batch_ids[int(np.argmax(pos < 0))]!r} is not in the index"
        seen += len(pos)
        if reconstruct is not None:
            d = batch.schema.field(S.EMBEDDING).type.list_size
            emb = np.asarray(batch.column(S.EMBEDDING).values.to_numpy()).reshape(-1, d)
            bad = ~np.all(reconstruct(pos) == emb, axis=1)
            if bad.any():
                return (f"the index holds another vector than the table for {int(bad.sum())} rows "
                        f"(first: id {batch_ids[int(np.argmax(bad))]!r})")
    if seen != len(ids):
        return f"the index holds {len(ids)} ids, the table {seen} rows"
    return None


def _reconstructor(index, kind: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """positions -> (m, d) float32 stored vectors, for indexes that store them exactly."""
    from indexer.ann_build import faiss_module

    if kind == "flat":
        return lambda pos: index.reconstruct_batch(pos)
    if kind == "ivf":
        ivf = faiss_module().extract_index_ivf(index)
        ivf.make_direct_map()
        return lambda pos: ivf.reconstruct_batch(pos)
    return None


# ---- plain files ------------------------------------------------------------------------------------
def _writer_running(db: Database) -> str | None:
    """Who holds the writer lock now (None when nobody does): their temporary files are theirs."""
    path = db.path / WRITER_LOCK_FILE
    if not path.exists():
        return None
    try:
        with open(path) as f:
            try:
                fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    return f.read().strip() or "another llm2loss command"
    except OSError:
        return None
    return None


def _check_leftovers(db: Database, report: CheckReport, repair: bool) -> None:
    running = _writer_running(db)
    if running:
        report.add("temp files", NOTE, f"not checked: {running} is writing to the database now")
        return
    tmps = [p for folder in (db.path, db.faiss_dir, db.diagnosis_dir) if folder.is_dir()
            for p in folder.iterdir() if p.is_file() and p.name.endswith(".tmp")]
    if not tmps:
        return
    names = ", ".join(str(p.relative_to(db.path)) for p in tmps[:3]) + (f" and {len(tmps) - 3} more" if len(tmps) > 3 else "")
    f = report.add("temp files", DAMAGED, f"{len(tmps)} temporary file{'s' if len(tmps) > 1 else ''} left by an "
                                          f"interrupted write ({names})",
                   f"`llm2loss check --db {db.path} --repair` removes them")
    if repair:
        for p in tmps:
            p.unlink(missing_ok=True)
        f.repaired = f"removed {len(tmps)} temporary file{'s' if len(tmps) > 1 else ''}"
        report.repaired.append(f.repaired)


def _check_selections(db: Database, report: CheckReport, table_ok: bool) -> None:
    path = db.path / SELECTIONS_FILE
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        valid = isinstance(data, dict) and all(isinstance(v, list) and all(isinstance(i, str) for i in v)
                                               for v in data.values())
    except (ValueError, UnicodeDecodeError, OSError):
        valid = False
    if not valid:
        report.add("selections", DAMAGED, f"{path.name} is not an object of selection name -> list of ids",
                   f"fix {path} by hand or delete it (it holds your named selections)")
        return
    if not table_ok:
        return
    stored = set(db.ids().tolist())
    missing = {name: sum(i not in stored for i in ids) for name, ids in data.items()}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        report.add("selections", NOTE, "ids no longer in the table: " +
                   ", ".join(f"{k!r} {v}" for k, v in missing.items()),
                   "`llm2loss select remove` them, or index those samples again")
    else:
        report.add("selections", OK, f"{len(data)} selection{'s' if len(data) != 1 else ''}, every id stored")


#: A checker of files another package owns: (database, report, repair) -> None, called when the
#: table is readable.
Checker = Callable[[Database, CheckReport, bool], None]


def check_database(db, repair: bool = False, extra: list[Checker] | None = None) -> CheckReport:
    """Verify the database folder ``db`` (see the module doc); returns what was found (and, with
    ``repair``, done and lost). Refuses a folder that is not a database with one sentence."""
    path = Path(db.path if isinstance(db, Database) else db).expanduser().resolve()
    if not (path / META_FILE).exists():
        raise UserError(f"{path} is not an llm2loss database (no {META_FILE}); pass the --db folder `llm2loss index` "
                        "created.")
    if not repair:
        return _check(path, False, extra or [])
    try:
        with writer_lock(path, "check --repair"):
            report = _check(path, True, extra or [])
    except OSError as e:
        from indexer.integrity import write_error

        err = write_error(e, f"the repair of {path}", f"check --db {path} --repair")
        if err is None:
            raise
        raise err from None
    if report.repaired:
        report.after = _check(path, False, extra or [])
    return report


def _check(path: Path, repair: bool, extra: list[Checker]) -> CheckReport:
    report = CheckReport(db=str(path), repair=repair)
    db = Database(path)
    try:
        meta = db.read_meta()
        report.add("meta.json", OK, f"data version {meta.get('data_version')}, CLIP "
                                    f"{(meta.get('clip') or {}).get('model', '?')}")
    except UserError as e:
        report.add("meta.json", DAMAGED, str(e), "restore it from a backup, or index again into a new --db folder")
        return report
    table_ok = _check_table(db, report, repair)
    if not table_ok and repair and report.repaired:
        db = Database(path)
        table_ok = read_version(path / f"{S.TABLE_NAME}.lance", db.version)[1] is None
    if table_ok:
        _check_faiss(db, report, repair)
        for checker in extra:
            checker(db, report, repair)
    else:
        report.add("derived", NOTE, "the FAISS index, ensemble and caches were not checked: the table cannot be read")
    _check_selections(db, report, table_ok)
    _check_leftovers(db, report, repair)
    return report


def main_exit_status(report: CheckReport) -> int:
    """0 when all is well (after the repair, with ``--repair``), 1 when something is damaged."""
    return 0 if report.ok else 1
