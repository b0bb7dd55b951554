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
without a label go to ``unlabeled``; clashing names get the sample id appended), plus
``OUT/manifest.csv`` with every column and image paths relative to ``OUT``, so ``OUT`` works both as
a class folder and, through its manifest, with ids, losses and metadata kept.

Files are written to a temporary name beside ``out`` and renamed when complete: nothing
half-written is left behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa

from indexer import schema as S
from indexer.errors import UserError
from indexer.store import Database
from search_ui.selections import Selections, read_ids_file

log = logging.getLogger(__name__)

DROPPED = (S.EMBEDDING, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD)
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
    return "folder"


def mode_ids(db: Database, mode: str | int, k: int) -> list[str]:
    """The first ``k`` members (highest predicted loss first) of failure mode ``mode`` from
    ``explain``: its 1-based number, or its description (exact, else a unique substring)."""
    from diagnosis.explain import explain  # lazily: diagnosis is only needed for --mode

    text = str(mode).strip()
    number = int(text) if text.isdigit() else None
    modes = explain(db, top=max(10, number or 0))
    if number is not None:
        if not 1 <= number <= len(modes):
            raise UserError(f"--mode {number} is out of range; `llm2loss explain` lists modes 1-{len(modes)}.")
        chosen = modes[number - 1]
    else:
        exact = [m for m in modes if m.description.lower() == text.lower()]
        partial = [m for m in modes if text.lower() in m.description.lower()]
        found = exact or partial
        if len(found) != 1:
            listing = "; ".join(f"{i}. {m.description}" for i, m in enumerate(modes, 1))
            why = "matches no" if not found else "matches several"
            raise UserError(f"--mode {text!r} {why} failure mode ({listing}); pass its number or full description.")
        chosen = found[0]
    # ``ids``: every member, most likely failures first; ``examples`` only the first few.
    return [str(i) for i in (getattr(chosen, "ids", None) or chosen.examples)][:k]


def selection_ids(db: Database, query=None, ids=None, mode=None, selection=None, k: int = 100,
                  where: str | None = None) -> list[str]:
    """The ids of exactly one of the four kinds of selection, in their order (module doc)."""
    given = [name for name, v in (("--query", query), ("--ids", ids), ("--mode", mode),
                                  ("--selection", selection)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give exactly one of --query, --ids, --mode or --selection (got {', '.join(given) or 'none'}).")
    if query is not None:
        from search_ui.engine import QueryEngine

        return [r.id for r in QueryEngine(db).search(query, k=k, where=where)]
    if ids is not None:
        return read_ids_file(ids) if isinstance(ids, str | os.PathLike) else [str(i) for i in ids]
    if mode is not None:
        return mode_ids(db, mode, k)
    return Selections(db).get(selection)


def _rows(db: Database, ids: list[str]) -> pa.Table:
    """The rows of ``ids`` in that order, without the dropped columns; refuses unknown ids."""
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


def _safe(name: str) -> str:
    name = re.sub(r"[\\/\x00]+", "_", name).strip().lstrip(".")
    return name or "_"


def _write_folder(t: pa.Table, root: Path, link: bool) -> None:
    ids, images, labels = (t.column(c).to_pylist() for c in (S.ID, S.IMAGE, S.LABEL))
    rel_paths, used = [], set()
    for sid, img, label in zip(ids, images, labels, strict=True):
        src = Path(img)
        if not src.is_file():
            raise UserError(f"image {src} of sample {sid!r} no longer exists; restore it or leave the sample out.")
        cls = _safe(label) if label not in (None, "") else "unlabeled"
        name = src.name
        if (cls, name) in used:
            name = f"{src.stem}__{_safe(sid)}{src.suffix}"
        used.add((cls, name))
        dst = root / cls / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(src.resolve(), dst)
        else:
            shutil.copy2(src, dst)
        rel_paths.append(f"{cls}/{name}")
    manifest = t.set_column(t.column_names.index(S.IMAGE), S.IMAGE, pa.array(rel_paths, pa.string()))
    _write_table(manifest, root / "manifest.csv", "csv")


def export(db, out, fmt: str | None = None, query=None, ids=None, mode=None, selection=None,
           k: int = 100, link: bool = True, where: str | None = None) -> Path:
    """Write one selection (module doc) to ``out``; returns the absolute path written.

    ``fmt``: csv | parquet | folder (default: from ``out``'s extension, else folder). ``k``: results
    for ``query`` / ``mode``; ``where``: a filter for ``query``. ``link``: symlink images into a
    folder export (False: copy). A file ``out`` is replaced; a folder ``out`` must be new or empty.
    """
    db = db if isinstance(db, Database) else Database(db)
    out = Path(out).expanduser().resolve()
    fmt = _format(out, fmt)
    chosen = selection_ids(db, query=query, ids=ids, mode=mode, selection=selection, k=k, where=where)
    t = _rows(db, chosen)
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist; create it first or choose another path.")
    if fmt == "folder":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out} already exists and is not an empty folder; choose a new folder.")
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
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; give a file name ending in .{fmt}.")
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            _write_table(t, Path(tmp), fmt)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    log.info("exported %d samples to %s (%s)", t.num_rows, out, fmt)
    return out
