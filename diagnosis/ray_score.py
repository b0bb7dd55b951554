"""Scoring a large table with a fitted diagnosis ensemble on a Ray cluster.

:func:`score_new_rows_ray` is :func:`diagnosis.run.score_new_rows` (rows appended after the last
``diagnose`` get ``predicted_loss``/``predicted_loss_std`` from the full ensemble) with the work
spread over Ray actors, for tables whose new rows are too many for one machine's cores:

1. Ray Data reads the rows to score (``id`` and ``embedding`` only) from the Lance table in
   parallel, one read task per fragment group (``ray.data.read_lance``);
2. ``map_batches`` with :class:`EnsembleScorer`, an actor holding the ensemble (shipped once through
   the object store), predicts (b,) losses and member spreads;
3. the predictions (id + two float32 columns, ~30 bytes a row) are staged as Parquet files in a
   temporary folder inside the database folder;
4. once every row is scored, the driver writes the two columns back by ``id`` in one Lance commit
   (:meth:`indexer.store.Database.update_columns`: new column files per fragment, the embeddings
   untouched).

Reading everything before writing anything keeps the read tasks on one table version and makes the
write all or nothing. Like ``score_new_rows``, the ensemble stays stamped stale: it never saw these
rows.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from diagnosis.run import load_ensemble, open_db
from indexer import schema as S
from indexer.errors import UserError
from indexer.store import writer_lock

log = logging.getLogger(__name__)

#: Rows per ensemble call inside an actor: (8192, 512) float32 = 16 MiB.
SCORE_BATCH = 8192
#: CPUs reserved by each read/write task: the actors take 90% of the cluster's CPUs.
IO_CPUS = 0.05


class EnsembleScorer:
    """Ray actor: batches of ``id`` + ``embedding`` (b, d) float32 -> ``id``, ``predicted_loss``,
    ``predicted_loss_std`` (b,) float32. ``ensemble`` is a one-element list holding an ObjectRef
    (nested so that Ray hands the actor the reference, fetched once, not a copy per batch)."""

    def __init__(self, ensemble: list, threads: int = 1):
        import ray

        self.ensemble = ray.get(ensemble[0])
        self.threads = threads

    def __call__(self, batch: pa.Table) -> pa.Table:
        from threadpoolctl import threadpool_limits

        emb = batch.column(S.EMBEDDING).combine_chunks()
        d = emb.type.list_size
        X = np.asarray(emb.values.to_numpy()).reshape(-1, d)
        with threadpool_limits(self.threads):
            pred, std = self.ensemble.predict(X, return_std=True)
        return pa.table({
            S.ID: batch.column(S.ID),
            S.PREDICTED_LOSS: pa.array(np.asarray(pred, dtype=np.float32)),
            S.PREDICTED_LOSS_STD: pa.array(np.asarray(std, dtype=np.float32)),
        })


def score_new_rows_ray(db, address: str | None = None, actors: int | None = None, all_rows: bool = False,
                       batch_rows: int = SCORE_BATCH, progress: bool = True) -> int:
    """Score the rows whose ``predicted_loss`` is null (every row with ``all_rows``) with the fitted
    ensemble of ``db`` on Ray (``address``: a cluster, None: a local Ray); returns how many rows were
    written. ``actors``: scoring actors (default: one per CPU of the cluster).

    ``all_rows`` rescoring gives every row the *full* ensemble's prediction, not the out-of-fold one
    that ``diagnose`` writes for the rows it fitted on: use it after refitting on a subsample.
    """
    db = open_db(db)
    with writer_lock(db.path, "diagnose --score-new --engine ray"):
        return _score_locked(db, address, all_rows, actors, batch_rows, progress)


def _score_locked(db, address, all_rows, actors, batch_rows, progress) -> int:
    from indexer.ray_engine import connect

    loaded = load_ensemble(db, allow_stale=True)
    where = None if all_rows else f"{S.PREDICTED_LOSS} IS NULL"
    todo = db.count_rows(where)
    if todo == 0:
        log.info("no row of %s needs scoring", db.path)
        return 0
    ray = connect(address)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    actors = actors or max(1, int(cpus))
    per_actor = max(0.1, round(0.9 * cpus / actors, 2))
    t0 = time.perf_counter()
    uri = db.table.to_lance().uri
    version = db.version  # read this version even if a commit lands meanwhile
    # read and write tasks are light (I/O); they must not wait for CPUs the actors hold
    ds = ray.data.read_lance(uri, version=version, columns=[S.ID, S.EMBEDDING], filter=where, num_cpus=IO_CPUS)
    ds = ds.map_batches(EnsembleScorer, batch_size=batch_rows, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=per_actor, fn_constructor_kwargs={"ensemble": [ray.put(loaded.ensemble)],
                                                                   "threads": max(1, int(per_actor))})
    staging = Path(tempfile.mkdtemp(dir=db.path, prefix=".scores-"))
    try:
        ds.write_parquet(str(staging), ray_remote_args={"num_cpus": IO_CPUS})
        written = _write_back(db, staging, todo, version, progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if written:
        db.cleanup()
    log.info("scored %d rows on Ray in %.1f s", written, time.perf_counter() - t0)
    return written


def _write_back(db, staging: Path, expected: int, version: int, progress: bool) -> int:
    """One column write (by ``id``) of the staged predictions; refuses if the rows changed."""
    import pyarrow.dataset as pads

    scores = pads.dataset(str(staging), format="parquet")
    n = scores.count_rows()
    if n != expected:
        raise RuntimeError(f"Ray scored {n} rows but {expected} needed scoring")
    if db.version != version:
        stamp = db.read_meta().get("data_version")
        raise UserError(f"the table in {db.path} changed while scoring (now data version {stamp}); "
                        "run the scoring again once the other writer has finished.")
    schema = pa.schema([pa.field(S.ID, pa.string(), nullable=False),
                        pa.field(S.PREDICTED_LOSS, pa.float32()), pa.field(S.PREDICTED_LOSS_STD, pa.float32())])
    db.update_columns(scores.to_table(columns=schema.names).cast(schema))  # ~30 bytes a row
    return n
