"""The query engine's in-memory copy of the table's small columns, in FAISS order.

Every column but the embedding (about 75 bytes a row plus the metadata: ~7 MiB at 100k rows) is
kept as one Arrow table, with maps between FAISS positions, table rows, ids and Lance row ids, so:

* the rows of FAISS hits are an Arrow ``take`` (~0.1 ms) instead of a LanceDB ``id IN (...)``
  query (~8 ms at 100k rows, BTREE index or not; see BENCHMARKS.md, "Query engine"), and the few
  rows a query returns are read as Python values straight from the columns' buffers
  (:meth:`RowCache.records`: ~0.05 ms for 10 rows of 8 columns, where ``take(...).to_pylist()``
  costs ~0.13 ms on a query's cold caches, mostly Arrow's kernel dispatch, once per column);
* a ``where`` filter (checked by :mod:`search_ui.filters`) becomes a boolean mask over FAISS
  positions (LanceDB evaluates its canonical SQL once per filter and table version, returning only
  row ids), which FAISS then searches exactly.

A cache describes one Lance version; the engine builds a new one whenever the version changes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from indexer import schema as S
from indexer.store import Database
from search_ui.filters import Filter, matching_row_ids

MAX_MASKS = 16


class RowCache:
    """Rows of one table version; use :meth:`load` (None when the table and the index disagree)."""

    def __init__(self, table: pa.Table, perm: np.ndarray, ann_ids: np.ndarray, rowids: np.ndarray, dataset):
        self.table = table  # one chunk, so take() is fast
        self.perm = perm  # FAISS position p -> table row perm[p]
        self.faiss_pos_of_row = np.empty_like(perm)
        self.faiss_pos_of_row[perm] = np.arange(len(perm))
        self.ids_order = np.argsort(ann_ids, kind="stable")
        self.ids_sorted = ann_ids[self.ids_order]
        self.rowids_order = np.argsort(rowids, kind="stable")
        self.rowids_sorted = rowids[self.rowids_order]
        self.pred = table.column(S.PREDICTED_LOSS).to_numpy(zero_copy_only=False).astype(np.float64)
        self._pred_at = self.pred[perm]  # in FAISS order: one gather per query
        self._readers = {name: _column_reader(col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())
                         for name, col in zip(table.column_names, table.columns, strict=True)}
        self.dataset = dataset
        self.masks: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, db: Database, ann_ids: np.ndarray, columns: list[str]) -> RowCache | None:
        """Read ``columns`` of the current version; None if its ids are not the index's ids (rows
        changed between the index check and this read: the engine then asks LanceDB)."""
        dataset = db.table.to_lance()
        t = dataset.to_table(columns=columns, with_row_id=True)
        ids = np.asarray(t.column(S.ID).to_pylist(), dtype=str)
        if len(ids) != len(ann_ids):
            return None
        oc, oa = np.argsort(ids, kind="stable"), np.argsort(ann_ids, kind="stable")
        if not np.array_equal(ids[oc], ann_ids[oa]):
            return None
        perm = np.empty(len(ann_ids), dtype=np.int64)
        perm[oa] = oc
        rowids = t.column("_rowid").to_numpy()
        return cls(t.drop_columns(["_rowid"]).combine_chunks(), perm, ann_ids, rowids, dataset)

    def rows(self, positions: np.ndarray) -> pa.Table:
        """Full rows at FAISS ``positions``, in that order."""
        return self.table.take(self.perm[positions])

    def records(self, positions: np.ndarray) -> list[dict]:
        """The rows at FAISS ``positions`` as Python dicts, in that order: the values of
        ``rows(positions).to_pylist()``, read from the column buffers (for a query's few results)."""
        at = self.perm[positions]
        cols = {name: read(at) for name, read in self._readers.items()}
        return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]

    def predicted_loss(self, positions: np.ndarray) -> np.ndarray:
        """(m,) float64, NaN where not predicted."""
        return self._pred_at[positions]

    def positions_of(self, ids) -> np.ndarray:
        """FAISS positions of stored ids (unknown ids are skipped)."""
        want = np.asarray(list(ids), dtype=str)
        at = np.searchsorted(self.ids_sorted, want)
        ok = at < len(self.ids_sorted)
        ok[ok] = self.ids_sorted[at[ok]] == want[ok]
        return self.ids_order[at[ok]]

    def where_mask(self, where: Filter) -> np.ndarray:
        """(ntotal,) bool over FAISS positions: the rows matching the checked filter ``where``.

        Raises what LanceDB raises at evaluation, or a UserError when it runs out of time
        (:func:`search_ui.filters.matching_row_ids`). The last ``MAX_MASKS`` filters are remembered.
        """
        mask = self.masks.get(where.sql)
        if mask is None:
            hit = matching_row_ids(self.dataset, where)
            at = np.searchsorted(self.rowids_sorted, hit.to_numpy())
            mask = np.zeros(len(self.perm), dtype=bool)
            mask[self.faiss_pos_of_row[self.rowids_order[at]]] = True
            if len(self.masks) >= MAX_MASKS:
                self.masks.pop(next(iter(self.masks)))
            self.masks[where.sql] = mask
        return mask


def _column_reader(arr: pa.Array) -> Callable[[np.ndarray], list]:
    """A function: table rows (int array) -> the Python values of ``arr`` there, equal to
    ``arr.take(rows).to_pylist()`` (None where null).

    Strings are decoded from the offsets and data buffers, integers, floats and booleans come from
    a NumPy view or copy made once here; other types take the Arrow path. No per-row Python objects
    are kept: views cost nothing, a copy (booleans, a column with nulls) a few bytes a row.
    """
    t = arr.type
    strings = pa.types.is_string(t) or pa.types.is_large_string(t)
    numbers = pa.types.is_integer(t) or pa.types.is_boolean(t) or t in (pa.float32(), pa.float64())
    if not len(arr) or not (strings or numbers):
        return lambda rows: arr.take(pa.array(rows)).to_pylist()
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    if strings:
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64 if pa.types.is_large_string(t) else np.int32)
        starts = offsets[arr.offset: arr.offset + len(arr)]  # row i's bytes: data[starts[i]:ends[i]]
        ends = offsets[arr.offset + 1: arr.offset + len(arr) + 1]
        data = memoryview(data_buf if data_buf is not None else b"")

        def values(rows: np.ndarray) -> list:
            return [str(data[a:b], "utf-8") for a, b in zip(starts[rows].tolist(), ends[rows].tolist(), strict=True)]
    else:
        dense = arr.fill_null(False if pa.types.is_boolean(t) else 0) if nulls is not None else arr
        column = dense.to_numpy(zero_copy_only=False)

        def values(rows: np.ndarray) -> list:
            return column[rows].tolist()
    if nulls is None:
        return values

    def with_nulls(rows: np.ndarray) -> list:
        return [None if null else v for v, null in zip(values(rows), nulls[rows].tolist(), strict=True)]
    return with_nulls
