"""Reading what the user indexes: a CSV/Parquet manifest or a ``root/<class>/<image>`` folder.

:func:`read_source` validates the whole-run problems up front (missing or unreadable file, wrong
type, no ``image`` column, reserved column names, duplicate ids) and returns a :class:`Manifest`
whose table already has the product's column types: ``id``/``image``/``label``/``split`` strings
(``image`` made absolute), ``loss`` float64, every other column kept as metadata with its own type.
Per-row problems (a missing image, a bad loss, ...) are not decided here: the pipeline rejects
those rows one by one.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexer import schema as S
from indexer.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: Columns the product writes itself; a manifest may not bring its own.
RESERVED = (S.EMBEDDING, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD)
_STRING_COLUMNS = (S.ID, S.IMAGE, S.LABEL, S.SPLIT)


@dataclass
class Manifest:
    """A validated source of samples.

    ``table`` has one row per sample, in the source's order, with columns ``id`` (str, unique),
    ``image`` (str, absolute path), ``label`` and ``split`` (str or null), ``loss`` (float64 or
    null; present only when the source has a loss column) and the metadata columns.
    ``loss_problems`` maps a row index to why its ``loss`` cell could not be read as a number.
    """

    path: Path
    kind: str  # "csv" | "parquet" | "folder"
    table: pa.Table
    loss_problems: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def root(self) -> Path:
        """The folder relative image paths are resolved against."""
        return self.path if self.kind == "folder" else self.path.parent

    @property
    def has_loss(self) -> bool:
        """Whether the source gives losses itself (a ``loss`` column with at least one value)."""
        return S.LOSS in self.table.column_names and (
            self.table.column(S.LOSS).null_count < self.table.num_rows or bool(self.loss_problems)
        )

    @property
    def metadata_schema(self) -> pa.Schema:
        """The non-core columns, with their types (for :func:`indexer.schema.table_schema`)."""
        return pa.schema([f for f in self.table.schema if f.name not in S.CORE_COLUMNS])

    def unlabeled(self) -> np.ndarray:
        """(n,) bool: the rows with neither a label nor a loss -- the *unlabeled pool*
        (``split = "pool"``), stored and scored but never fitted. A loss cell that could not be read
        is a bad loss, not a missing one."""
        no_label = np.asarray(self.table.column(S.LABEL).is_null().to_numpy(zero_copy_only=False), dtype=bool) \
            if S.LABEL in self.table.column_names else np.ones(len(self), dtype=bool)
        if S.LOSS in self.table.column_names:
            no_loss = np.asarray(self.table.column(S.LOSS).is_null().to_numpy(zero_copy_only=False), dtype=bool)
            no_loss[list(self.loss_problems)] = False
        else:
            no_loss = np.ones(len(self), dtype=bool)
        return no_label & no_loss

    def column(self, name: str) -> list:
        """A column as a Python list (``None`` for nulls, or all ``None`` when absent)."""
        if name not in self.table.column_names:
            return [None] * len(self)
        return self.table.column(name).to_pylist()

    def image_roots(self) -> list[str]:
        """Absolute folders holding every image: the manifest's folder plus any outside it."""
        root = str(self.root)
        roots = {root}
        for img in self.table.column(S.IMAGE).to_pylist():
            if img and not _is_under(img, root):
                roots.add(os.path.dirname(img))
        # Keep only the outermost folders so the list stays short.
        ordered = sorted(roots, key=len)
        kept: list[str] = []
        for r in ordered:
            if not any(_is_under(r, k) for k in kept):
                kept.append(r)
        return sorted(kept)


def short_error(e: BaseException) -> str:
    """A library's error as a short clause: first line, first sentence, at most 120 characters."""
    text = (str(e).splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {text[:120]}"


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_source(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest file or a class folder (see the module doc)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"the manifest {p} does not exist; pass a CSV/Parquet manifest or a root/<class>/<image> folder."
        )
    p = p.resolve()
    if p.is_dir():
        table, kind = _read_folder(p), "folder"
    else:
        name = p.name.lower()
        if name.endswith(CSV_SUFFIXES):
            table, kind = _read_csv(p), "csv"
        elif name.endswith(PARQUET_SUFFIXES):
            table, kind = _read_parquet(p), "parquet"
        else:
            raise UserError(
                f"the manifest {p} is neither CSV nor Parquet (by its extension); give a .csv or "
                ".parquet file with an `image` column, or a root/<class>/<image> folder."
            )
    return _normalise(p, kind, table)


def _read_csv(p: Path) -> pa.Table:
    import pyarrow.csv as pcsv

    # Text is read as given: with strings_can_be_null a cell "nan", "NA", "null" or "None" became a
    # null, and a null id silently became the image path. Numeric columns keep Arrow's null spellings;
    # empty text cells are made null in _normalise (except ids, where empty is refused).
    opts = pcsv.ConvertOptions(
        column_types={c: pa.string() for c in _STRING_COLUMNS}, strings_can_be_null=False
    )
    parse = pcsv.ParseOptions(delimiter="\t" if p.name.lower().endswith(".tsv") else ",")
    try:
        return pcsv.read_csv(p, parse_options=parse, convert_options=opts)
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise UserError(f"the manifest {p} could not be read as CSV ({short_error(e)}); fix the file or save it again as CSV.") from e


def _read_parquet(p: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"the manifest {p} could not be read as Parquet ({short_error(e)}); fix the file or write it again.") from e


def _read_folder(root: Path) -> pa.Table:
    """``root/<class>/<image>`` -> id ``<class>/<image>``, label ``<class>``; sorted for determinism."""
    ids, images, labels = [], [], []
    skipped = 0
    for cls in sorted(os.scandir(root), key=lambda e: e.name):
        if not cls.is_dir() or cls.name.startswith("."):
            skipped += cls.is_file()
            continue
        for entry in sorted(os.scandir(cls.path), key=lambda e: e.name):
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                ids.append(f"{cls.name}/{entry.name}")
                images.append(entry.path)
                labels.append(cls.name)
            elif not entry.name.startswith("."):
                skipped += 1
    bad = [i for i in ids if not _utf8(i)]
    if bad:
        shown = bad[0].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UserError(
            f"the folder {root} holds {len(bad)} image or class names that are not valid UTF-8 (first: "
            f"'{shown}'), which cannot be stored as ids; rename them to UTF-8 names (`convmv -r -f latin1 "
            f"-t utf8 --notest {root}` does it)."
        )
    if not ids:
        raise UserError(
            f"the folder {root} holds no images laid out as root/<class>/<image>; pass such a folder "
            "or a CSV/Parquet manifest with an `image` column."
        )
    if skipped:
        log.warning("%s: ignored %d files that are not images inside a class folder", root, skipped)
    return pa.table({S.ID: ids, S.IMAGE: images, S.LABEL: labels})


def _utf8(name: str) -> bool:
    """Whether a file name decoded by the OS (undecodable bytes as surrogates) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_string(col: pa.ChunkedArray, name: str, p: Path) -> pa.ChunkedArray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col.cast(pa.string())
    if pa.types.is_floating(col.type):
        # Integral floats (a label column with nulls read as float) print as "3", not "3.0".
        vals = [None if v is None else (str(int(v)) if math.isfinite(v) and v == int(v) else str(v))
                for v in col.to_pylist()]
        return pa.chunked_array([pa.array(vals, pa.string())])
    try:
        return pc.cast(col, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise UserError(f"column `{name}` of {p} has type {col.type}, which cannot be read as text; store it as strings.") from e


def _normalise(p: Path, kind: str, t: pa.Table) -> Manifest:
    names = t.column_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"the manifest {p} has the column {dup[0]!r} twice; rename or drop one of them.")
    if S.IMAGE not in names:
        raise UserError(
            f"the manifest {p} has no `image` column (columns: {', '.join(names) or 'none'}); "
            "add one with each sample's image path."
        )
    bad = [c for c in RESERVED if c in names]
    if bad:
        raise UserError(f"the manifest {p} has a column named `{bad[0]}`, which llm2loss writes itself; rename it.")
    if t.num_rows == 0:
        raise UserError(f"the manifest {p} has no rows; give it one row per sample.")
    for c in _STRING_COLUMNS:
        if c in names:
            t = t.set_column(names.index(c), c, _as_string(t.column(c), c, p))
    if kind == "csv":  # an empty text cell means "no value" (ids are checked below)
        for f in t.schema:
            if f.name != S.ID and pa.types.is_string(f.type):
                col = t.column(f.name)
                t = t.set_column(t.column_names.index(f.name), f.name,
                                 pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col))
    for f in t.schema:
        if pa.types.is_null(f.type):  # an all-empty column: Lance cannot store the null type
            t = t.set_column(t.column_names.index(f.name), f.name, t.column(f.name).cast(pa.string()))

    given = t.column(S.IMAGE).to_pylist()
    root = str(p if kind == "folder" else p.parent)
    absolute = [None if not g else os.path.normpath(os.path.join(root, os.path.expanduser(g))) for g in given]
    t = t.set_column(t.column_names.index(S.IMAGE), S.IMAGE, pa.array(absolute, pa.string()))

    # id defaults to the image path as written in the manifest (a stable, portable key); a given id
    # is kept as written ("nan" and "NA" are ids like any other), and an empty one is refused.
    if S.ID in names:
        ids = t.column(S.ID).to_pylist()
        empty = [row for row, i in enumerate(ids) if i is None or i == ""]
        if empty:
            more = f" (and {len(empty) - 1} more rows)" if len(empty) > 1 else ""
            raise UserError(f"row {empty[0] + 1} of {p} has an empty `id`{more}; give every row an id, "
                            "or drop the `id` column to use the image paths as ids.")
    else:
        ids = given
    _check_unique(ids, p)
    id_arr = pa.array(ids, pa.string())
    if S.ID in names:
        t = t.set_column(t.column_names.index(S.ID), S.ID, id_arr)
    else:
        t = t.add_column(0, S.ID, id_arr)

    problems: dict[int, str] = {}
    if S.LOSS in names:
        loss, problems = _parse_loss(t.column(S.LOSS))
        t = t.set_column(t.column_names.index(S.LOSS), S.LOSS, loss)
    return Manifest(path=p, kind=kind, table=t, loss_problems=problems)


def _check_unique(ids: list, p: Path) -> None:
    first: dict[str, int] = {}
    for row, i in enumerate(ids):
        if i is None:
            continue
        if i in first:
            raise UserError(
                f"rows {first[i] + 1} and {row + 1} of {p} share the id {i!r}; give every row a unique `id` "
                "(or drop the duplicate row)."
            )
        first[i] = row


def _parse_loss(col: pa.ChunkedArray) -> tuple[pa.Array, dict[int, str]]:
    """``loss`` as float64 (null where missing or unreadable) and why each unreadable cell failed."""
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_decimal(col.type):
        return pc.cast(col, pa.float64()).combine_chunks(), {}
    if pa.types.is_boolean(col.type):
        raise UserError("the `loss` column holds true/false values; give one non-negative number per row.")
    vals = col.cast(pa.string()).to_pylist()
    out = np.full(len(vals), np.nan)
    mask = np.zeros(len(vals), dtype=bool)
    problems: dict[int, str] = {}
    for row, v in enumerate(vals):
        if v is None or v.strip() == "":
            mask[row] = True
            continue
        try:
            out[row] = float(v)
        except ValueError:
            mask[row] = True
            problems[row] = f"loss {v!r} is not a number"
    return pa.array(out, pa.float64(), mask=mask), problems
