"""Export a selection as a retraining set: a manifest `llm2loss index` reads, or a class folder.

A selection is one of: a search's results (``query``), a list of ids (``ids``: a file, one id per
line, or a list), a failure mode from ``llm2loss explain`` (``mode``: its number or description), or
a named selection (``selection``).

Formats
-------
``csv`` / ``parquet``: one row per sample with every stored column except ``embedding``,
``predicted_loss`` and ``predicted_loss_std`` (which ``index`` computes itself), ``id`` first and
``image`` as an absolute path; indexing the file gives back the same rows (ids, images, labels,
losses, metadata; the same embeddings with the same CLIP model).

``folder``: ``OUT/<label>/<image file>`` (symlinks by default, copies with ``link=False``; rows
without a label go to ``unlabeled``; clashing names get the sample id appended, then ``~2``, ``~3``;
names longer than a file system allows are shortened with a hash; a label whose folder would be
``manifest.csv`` or would merge with another label's gets ``~2``), plus ``OUT/manifest.csv`` with
every column (the true labels) and image paths relative to ``OUT``, so ``OUT`` works both as a class
folder and, through its manifest, with ids, losses and metadata kept.

Where it writes: never inside a database folder (one holding ``meta.json`` and ``samples.lance``),
never onto anything but a regular file, and an existing file only with ``force``. Files are written
to a temporary name beside ``out`` and renamed when complete: nothing half-written is left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pyarrow as pa

from indexer import schema as S
from indexer.errors import UserError
from indexer.identity import FileChanged, FileIdentity, verify
from indexer.store import META_FILE, Database
from search_ui.selections import Selections, read_ids_file

log = logging.getLogger(__name__)

DROPPED = (S.EMBEDDING, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD)
#: Read to check the files a folder export links or copies; never written to a manifest (they
#: describe this machine's files, and `index` reads them from the files themselves).
IDENTITY = S.IDENTITY_COLUMNS
FORMATS = ("csv", "parquet", "folder")


def _format(out: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"--format {fmt} is unknown; use one of {', '.join(FORMATS)}.")
        return fmt
    name = out.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if out.suffix and not out.is_dir():
        # "x.json" silently became a folder named x.json
        raise UserError(f"--out {out} has the extension {out.suffix}, which export does not write; end it in "
                        ".csv or .parquet, name a folder without an extension, or pass --format csv|parquet|folder.")
    return "folder"


def _is_database(folder: Path) -> bool:
    return (folder / META_FILE).is_file() and (folder / "samples.lance").is_dir()


def check_not_in_database(out: Path) -> None:
    for folder in (out, *out.parents):
        if _is_database(folder):
            raise UserError(f"--out {out} is inside the llm2loss database {folder}, which only llm2loss itself "
                            "writes; choose a path outside it.")


def check_out(out: Path, fmt: str, force: bool) -> None:
    """Refuse an ``out`` that export must not write (module doc: where it writes)."""
    check_not_in_database(out)
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist; create it first or choose another path.")
    if not os.path.lexists(out):
        return
    mode = os.stat(out).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise UserError(f"--out {out} is not a regular file or folder (a device, pipe or socket); "
                        "choose another path.")
    if fmt == "folder":
        if not stat.S_ISDIR(mode) or any(out.iterdir()):
            raise UserError(f"--out {out} already exists and is not an empty folder; choose a new folder.")
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"--out {out} is a folder; give a file name ending in .{fmt}.")
    if not force:
        raise UserError(f"--out {out} already exists; pass --force to replace it, or choose another path.")


def mode_ids(db: Database, mode: str | int, k: int) -> list[str]:
    """The first ``k`` members (highest predicted loss first) of failure mode ``mode`` from
    ``explain``: its 1-based number, or its description (exact, else a unique substring)."""
    from diagnosis.explain import explain, find_mode  # lazily: diagnosis is only needed for --mode

    text = str(mode).strip()
    number = int(text) if text.isdigit() else None
    chosen = find_mode(explain(db, top=max(10, number or 0)), text)
    # ``ids``: every member, most likely failures first; ``examples`` only the first few.
    return [str(i) for i in (getattr(chosen, "ids", None) or chosen.examples)][:k]


def selection_ids(db: Database, query=None, ids=None, mode=None, selection=None, k: int = 100,
                  where: str | None = None, pool_only: bool = False) -> list[str]:
    """The ids of exactly one of the four kinds of selection, in their order (module doc)."""
    given = [name for name, v in (("--query", query), ("--ids", ids), ("--mode", mode),
                                  ("--selection", selection)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of --query, --ids, --mode or --selection (got {', '.join(given) or 'none'}).")
    if query is not None:
        from search_ui.engine import QueryEngine

        return [r.id for r in QueryEngine(db).search(query, k=k, where=where, pool_only=pool_only)]
    if ids is not None:
        return read_ids_file(ids) if isinstance(ids, str | os.PathLike) else [str(i) for i in ids]
    if mode is not None:
        return mode_ids(db, mode, k)
    return Selections(db).get(selection)


def _rows(db: Database, ids: list[str]) -> pa.Table:
    """The rows of ``ids`` in that order, without the dropped columns (identities kept, when the
    table has them, for :func:`_write_folder`); refuses unknown ids."""
    if not ids:
        raise UserError("the selection is empty; nothing to export.")
    ids = list(dict.fromkeys(ids))  # first occurrence wins
    cols = [f.name for f in db.table.schema if f.name not in DROPPED]
    t = db.rows_by_id(ids, cols)
    at = {i: n for n, i in enumerate(t.column(S.ID).to_pylist())}
    missing = [i for i in ids if i not in at]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{len(missing)} ids of the selection are not in {db.path} ({', '.join(missing[:3])}{more}); "
                        "remove them from the selection or ids file.")
    return t.take([at[i] for i in ids])


def _write_table(t: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(t, path)
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(t, path)


#: Bytes in a file name: 255 on every common file system; kept under it for the ``~N`` suffixes.
NAME_BYTES = 200
MANIFEST_NAME = "manifest.csv"


def _short(name: str, suffix: str = "") -> str:
    """``name + suffix`` within NAME_BYTES bytes: a long name keeps its start and gets a hash of the whole."""
    if len((name + suffix).encode()) <= NAME_BYTES:
        return name + suffix
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    keep = NAME_BYTES - len(suffix.encode()) - 13
    return name.encode()[:keep].decode("utf-8", "ignore") + "~" + digest + suffix


def _safe(name: str) -> str:
    name = re.sub(r"[\\/\x00]+", "_", name).strip().lstrip(".")
    return _short(name or "_")


def _unique(name: str, taken, suffix: str = "") -> str:
    """``name + suffix``, or with ``~2``, ``~3``, ... before the suffix, whichever ``taken`` lacks."""
    candidate, n = _short(name, suffix), 1
    while candidate.lower() in taken:
        n += 1
        candidate = _short(name, f"~{n}{suffix}")
    return candidate


def _class_folders(labels: list) -> dict:
    """Label -> its folder name: distinct labels never share a folder, none is ``manifest.csv``."""
    folders: dict = {}
    taken = {MANIFEST_NAME}
    for label in dict.fromkeys(labels):
        base = _safe(label) if label not in (None, "") else "unlabeled"
        folders[label] = _unique(base, taken)
        taken.add(folders[label].lower())
    return folders


def _without_identity(t: pa.Table) -> pa.Table:
    return t.drop_columns([c for c in IDENTITY if c in t.column_names])


def _checked_source(sid: str, src: Path, recorded: FileIdentity | None, read: bool) -> tuple[Path, bytes | None]:
    """(the real path to link, the bytes to copy) of a sample's image, when it is still the file
    indexed (:mod:`indexer.identity`; a table without identities: when it exists)."""
    if recorded is None:
        if not src.is_file():
            raise UserError(f"image {src} of sample {sid!r} no longer exists; restore it or leave the sample out.")
        return src.resolve(), (src.read_bytes() if read else None)
    try:
        got = verify(src, recorded, read=read)
    except FileChanged as e:
        raise UserError(f"the image of sample {sid!r} is no longer the file that was indexed ({e}), so it is not "
                        "exported; restore the file, re-index it, or leave the sample out.") from None
    return (Path(recorded.real), got) if read else (Path(got), None)


def _write_folder(t: pa.Table, root: Path, link: bool) -> None:
    ids, images, labels = (t.column(c).to_pylist() for c in (S.ID, S.IMAGE, S.LABEL))
    identities = t.select(list(IDENTITY)).to_pylist() if all(c in t.column_names for c in IDENTITY) else None
    rel_paths, used = [], {}
    folders = _class_folders(labels)
    for n, (sid, img, label) in enumerate(zip(ids, images, labels, strict=True)):
        src = Path(img)
        recorded = FileIdentity.from_row(identities[n]) if identities is not None else None
        real, data = _checked_source(sid, src, recorded, read=not link)
        cls = folders[label]
        taken = used.setdefault(cls, set())
        name = _short(Path(src.name).stem, src.suffix)
        if name.lower() in taken:  # two images of one name (or two ids that sanitise alike)
            name = _unique(f"{src.stem}__{_safe(sid)}", taken, src.suffix)
        taken.add(name.lower())
        dst = root / cls / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(real, dst)
        else:  # the bytes that were checked, not whatever the path holds a moment later
            dst.write_bytes(data)
            st = real.stat()
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        rel_paths.append(f"{cls}/{name}")
    t = _without_identity(t)
    manifest = t.set_column(t.column_names.index(S.IMAGE), S.IMAGE, pa.array(rel_paths, pa.string()))
    _write_table(manifest, root / "manifest.csv", "csv")


def export(db, out, fmt: str | None = None, query=None, ids=None, mode=None, selection=None,
           k: int = 100, link: bool = True, where: str | None = None, force: bool = False,
           pool_only: bool = False) -> Path:
    """Write one selection (module doc) to ``out``; returns the absolute path written.

    ``fmt``: csv | parquet | folder (default: from ``out``'s extension; no extension: folder; any
    other extension is refused). ``k``: results for ``query`` / ``mode``; ``where``: a filter for
    ``query`` (``pool_only``: only unlabeled rows). ``link``: symlink images into a folder export (False: copy). An existing file ``out``
    is replaced only with ``force``; a folder ``out`` must be new or empty; nothing is written inside
    a database folder or onto a device, pipe or socket.
    """
    db = db if isinstance(db, Database) else Database(db)
    out = Path(out).expanduser().resolve()
    check_not_in_database(out)
    fmt = _format(out, fmt)
    check_out(out, fmt, force)  # before the query: a refused path costs nothing
    chosen = selection_ids(db, query=query, ids=ids, mode=mode, selection=selection, k=k, where=where,
                           pool_only=pool_only)
    t = _rows(db, chosen)
    check_out(out, fmt, force)  # again: the query took time, and someone may have written there
    if fmt == "folder":
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            _write_folder(t, tmp, link)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        _replace_file(_without_identity(t), out, fmt)
    log.info("exported %d samples to %s (%s)", t.num_rows, out, fmt)
    return out


def _replace_file(t: pa.Table, out: Path, fmt: str) -> None:
    """Write ``t`` as ``fmt`` to a temporary file beside ``out``, then rename it onto ``out``."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_table(t, Path(tmp), fmt)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(t: pa.Table, out, force: bool = False, make=None) -> Path:
    """Write the manifest ``t`` (or, when ``make`` is given, the table it returns, computed after
    the path was checked: a refused path costs nothing) to ``out``, ``.csv`` or ``.parquet`` by its
    extension, with export's rules (module doc: where it writes); returns the absolute path."""
    out = Path(out).expanduser().resolve()
    check_not_in_database(out)
    fmt = _format(out, None)
    if fmt == "folder":
        raise UserError(f"--out {out} has no .csv or .parquet extension; name the manifest to write, e.g. plan.csv.")
    check_out(out, fmt, force)
    if make is not None:
        t = make()
        check_out(out, fmt, force)  # again: planning took time, and someone may have written there
    _replace_file(t, out, fmt)
    return out
