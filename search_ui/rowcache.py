"""The query engine's in-memory copy of the table's small columns, in FAISS order.

Every column but the embedding (about 75 bytes a row plus the metadata: ~7 MiB at 100k rows) is
kept as one Arrow table, with maps between FAISS positions, table rows, ids and Lance row ids, so:

* the rows of FAISS hits are an Arrow ``take`` (~0.1 ms) instead of a LanceDB ``id IN (...)``
  query (~8 ms at 100k rows, BTREE index or not; see BENCHMARKS.md, "Query engine");
* a ``where`` filter becomes a boolean mask over FAISS positions (LanceDB evaluates the SQL once per
  filter and table version, returning only row ids), which FAISS then searches exactly.

A cache describes one Lance version; the engine builds a new one whenever the version changes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from indexer import schema as S
from indexer.store import Database

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

    def predicted_loss(self, positions: np.ndarray) -> np.ndarray:
        """(m,) float64, NaN where not predicted."""
        return self.pred[self.perm[positions]]

    def positions_of(self, ids) -> np.ndarray:
        """FAISS positions of stored ids (unknown ids are skipped)."""
        want = np.asarray(list(ids), dtype=str)
        at = np.searchsorted(self.ids_sorted, want)
        ok = at < len(self.ids_sorted)
        ok[ok] = self.ids_sorted[at[ok]] == want[ok]
        return self.ids_order[at[ok]]

    def where_mask(self, where: str) -> np.ndarray:
        """(ntotal,) bool over FAISS positions: the rows matching the LanceDB SQL ``where``.

        Raises what LanceDB raises for bad SQL. The last ``MAX_MASKS`` filters are remembered.
        """
        mask = self.masks.get(where)
        if mask is None:
            hit = self.dataset.to_table(columns=[], filter=where, with_row_id=True)
            at = np.searchsorted(self.rowids_sorted, hit.column("_rowid").to_numpy())
            mask = np.zeros(len(self.perm), dtype=bool)
            mask[self.faiss_pos_of_row[self.rowids_order[at]]] = True
            if len(self.masks) >= MAX_MASKS:
                self.masks.pop(next(iter(self.masks)))
            self.masks[where] = mask
        return mask
