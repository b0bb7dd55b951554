"""The FAISS index over the sample embeddings: exact for small tables, IVF beyond, GPU when present.

Files in ``DIR/faiss/``::

    index.faiss   the FAISS index (inner product on L2-normalised vectors = cosine similarity)
    ids.npy       (n,) unicode array: FAISS position i holds the row whose ``id`` is ids[i]
    info.json     the stamp and the index's quality: data_version, num_rows, embed_dim, clip,
                  kind ("flat" | "ivf"), nlist, nprobe, recall_at_10, recall_curve (nprobe -> recall),
                  nprobe_at_100, recall_at_100, recall_curve_at_100, build_seconds, index_bytes, gpu

Positions are mapped to ids through ``ids.npy`` because compaction and deletes can reorder the Lance
table's rows; nothing here relies on row positions.

An index is *fresh* when its stamped ``data_version``, row count, embedding size and CLIP model equal
the database's. A stale index is rebuilt (``load_index(db)``) or refused with a
:class:`~indexer.errors.UserError` (``load_index(db, rebuild_if_stale=False)``), never served.

IVF: ``nlist = 4 * sqrt(n)`` cells (k-means trained on a random sample of at most ``64 * nlist`` rows).
``nprobe`` is the smallest power of two whose recall@10 against exact search reaches ``target_recall``
(0.95) in every family of held queries; ``nprobe_at_100`` likewise for recall@100, the depth of the
query engine's candidate pool (``AnnIndex.nprobe_for(k)`` picks the probe count for any depth). The
families, drawn from the training sample: stored embeddings (their own row excluded from both
rankings, so a vector finding itself does not inflate recall), normalised midpoints of two random
stored embeddings, and stored embeddings minus the (sample's) mean, which sit off the data manifold
the way text queries do.

The IVF build streams (:func:`_build_ivf`): only the training sample is read as one array; the table's
record batches are then assigned to cells while the exact top-k of the held queries is kept by brute
force over each batch, and added to exactly-sized inverted lists in a second pass, so the vectors
are never held outside FAISS (at 1M x 512 the build peaks near the index's own size; the former
read-everything build peaked at 2.67x the raw vectors).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from indexer.errors import UserError
from indexer.store import Database, write_json_atomic

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
INFO_FILE = "info.json"
#: flock(2)ed by builders (exclusive) and loaders (shared), see _folder_lock
LOCK_FILE = ".lock"
#: Rebuild-and-load rounds before a query gives up on a table that keeps changing under it.
LOAD_ATTEMPTS = 5

#: Tables up to this many rows get an exact (flat) index: fast enough and recall 1.
EXACT_MAX_ROWS = 20_000
TARGET_RECALL = 0.95
#: Probe this many times the cells tuned on the held query families (text queries are harder).
NPROBE_MARGIN = 2
RECALL_QUERIES = 500


def _faiss():
    import faiss  # heavy import, deferred

    return faiss


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_db(db) -> Database:
    return db if isinstance(db, Database) else Database(db)


# ---- status ---------------------------------------------------------------------------------------
def _read_info(db: Database) -> dict | None:
    import json

    path = db.faiss_dir / INFO_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a torn write never happens (atomic), but a hand-edited file may be junk


def _stamp(db: Database) -> dict:
    return {
        "data_version": db.data_version,
        "num_rows": db.count_rows(),
        "embed_dim": db.embed_dim,
        "clip": db.clip_identity,
    }


def _stale_reason(info: dict | None, stamp: dict) -> str | None:
    if info is None:
        return "no FAISS index was built"
    for key, what in (("data_version", "data version"), ("num_rows", "row count"),
                      ("embed_dim", "embedding size"), ("clip", "CLIP model")):
        if info.get(key) != stamp[key]:
            return f"the index covers {what} {info.get(key)!r} but the table has {stamp[key]!r}"
    return None


def index_status(db) -> dict:
    """The stored index's info.json plus ``exists``, ``fresh`` and ``reason`` (why it is stale)."""
    db = _as_db(db)
    info = _read_info(db)
    reason = _stale_reason(info, _stamp(db))
    files_ok = all((db.faiss_dir / f).exists() for f in (INDEX_FILE, IDS_FILE))
    if reason is None and not files_ok:
        reason = "the index files are missing"
    return {**(info or {}), "exists": info is not None and files_ok, "fresh": reason is None,
            "reason": reason}


# ---- building -------------------------------------------------------------------------------------
def _recall_at(truth: np.ndarray, found: np.ndarray, k: int) -> float:
    """Mean over queries of |truth[:k] & found[:k]| / k; both (m, >=k) int64 positions."""
    hits = [len(set(t[:k].tolist()) & set(f[:k].tolist())) for t, f in zip(truth, found, strict=True)]
    return float(np.mean(hits)) / k


def _recall_queries(sample: np.ndarray, positions: np.ndarray, m: int,
                    rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three families of (queries (m', d) float32 unit, self positions (m',) int64, -1 = none), drawn
    from ``sample`` (rows of the table, at table positions ``positions``): stored rows (self
    excluded), midpoints of two rows, and rows with the data's mean (the sample's) removed; the last
    mimic text queries, which lack the image cone's shared direction (CLIP's modality gap) and so
    spread their neighbours over more cells."""
    n = len(sample)
    third = max(1, m // 3)
    own = rng.choice(n, size=min(third, n), replace=False)
    a, b = rng.integers(0, n, third), rng.integers(0, n, third)
    mid = sample[a] + sample[b]
    centred = sample[rng.integers(0, n, third)] - sample.mean(axis=0)
    fams = [(np.ascontiguousarray(sample[own], dtype=np.float32), positions[own].astype(np.int64))]
    for q in (mid, centred):
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        fams.append((np.ascontiguousarray(q, dtype=np.float32), np.full(len(q), -1, np.int64)))
    return fams


def _drop_self(pos: np.ndarray, self_pos: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(pos), k), dtype=np.int64)
    for i, (row, s) in enumerate(zip(pos, self_pos, strict=True)):
        out[i] = row[row != s][:k] if s >= 0 else row[:k]
    return out


def _tune_nprobe(index, fams: list, exact: list, nlist: int, target: float, k: int = 10,
                 start: int = 1) -> tuple[int, float, dict]:
    """Smallest power-of-two nprobe (from ``start``) whose recall@k reaches ``target`` in every query
    family (the worst family's recall is what counts); returns (nprobe, recall, curve).

    ``exact``: per family, the exact neighbour positions of its queries, best first, at least k + 1
    deep (the query's own row is dropped from both rankings)."""
    truths = [_drop_self(t, sp, k) for (_, sp), t in zip(fams, exact, strict=True)]
    curve: dict[str, float] = {}
    nprobe = start
    while True:
        index.nprobe = nprobe
        rec = min(_recall_at(t, _drop_self(index.search(q, k + 1)[1], sp, k), k)
                  for (q, sp), t in zip(fams, truths, strict=True))
        curve[str(nprobe)] = round(rec, 4)
        if rec >= target or nprobe >= nlist:
            return nprobe, rec, curve
        nprobe = min(nprobe * 2, nlist)


def _build_flat(x: np.ndarray):
    """(exact index, info) for (n, d) float32 unit vectors ``x``."""
    index = _faiss().IndexFlatIP(x.shape[1])
    index.add(x)
    return index, {"kind": "flat", "nlist": None, "nprobe": None, "recall_at_10": 1.0,
                   "recall_curve": None, "nprobe_at_100": None, "recall_at_100": 1.0,
                   "recall_curve_at_100": None, "gpu": False}


#: Rows per record batch of the streamed IVF build (32 MiB of 512-d float32).
STREAM_BATCH_ROWS = 16384


def _take_rows(ds, positions: np.ndarray, d: int) -> np.ndarray:
    """(len(positions), d) float32 embeddings of the rows at these positions of the Lance dataset
    ``ds``, read in slices into one array (no concatenated second copy)."""
    from indexer import schema as S

    out = np.empty((len(positions), d), dtype=np.float32)
    for s in range(0, len(positions), STREAM_BATCH_ROWS):
        t = ds.take(positions[s : s + STREAM_BATCH_ROWS], columns=[S.EMBEDDING])
        out[s : s + t.num_rows] = _batch_vectors(t.column(S.EMBEDDING), d)
    return out


def _batch_vectors(column, d: int) -> np.ndarray:
    """A fixed-size-list embedding column (Array or ChunkedArray) as (m, d) float32."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.flatten().to_numpy()).reshape(-1, d)


def _stream(ds, d: int):
    """(vectors (m, d) float32, id column) per record batch of the Lance dataset ``ds``, in order."""
    from indexer import schema as S

    for batch in ds.to_batches(columns=[S.ID, S.EMBEDDING], batch_size=STREAM_BATCH_ROWS, scan_in_order=True):
        if batch.num_rows:
            yield (np.ascontiguousarray(_batch_vectors(batch.column(S.EMBEDDING), d), dtype=np.float32),
                   batch.column(S.ID))


def _reserve_lists(index, assign: np.ndarray) -> None:
    """Give each inverted list of the (empty, CPU) IVF ``index`` room for exactly the vectors that
    ``assign`` sends there, so adding never regrows a list: growing one by doubling, batch by batch,
    left 0.7x the raw vectors of freed or spare capacity resident (measured at 100k rows)."""
    invlists = _faiss().downcast_InvertedLists(index.invlists)
    for list_no, size in enumerate(np.bincount(assign, minlength=index.nlist).tolist()):
        if size:
            invlists.resize(list_no, size)  # allocates (std::vector capacity) ...
            invlists.resize(list_no, 0)  # ... and empties it again: the capacity stays


def _build_ivf(ds, n: int, d: int, target_recall: float, seed: int):
    """(cpu index, info, ids (n,) str) of an IVF index over the Lance dataset ``ds`` (one table
    version: the sample and the stream see the same rows in the same order), streamed.

    The vectors are never held outside FAISS: a random sample of ``64 * nlist`` rows, read by
    position, trains the coarse quantizer and gives the recall queries (:func:`_recall_queries`);
    one pass over the table's record batches assigns each vector to its cell and keeps, per query,
    the running exact top-101 by brute force over the batch (the ground truth of :func:`_tune_both`);
    the lists are then sized exactly and a second pass adds the vectors to their precomputed cells.
    On the GPU the first pass adds them to the GPU index directly (host memory holds no lists).
    """
    faiss = _faiss()
    use_gpu = gpu_available()
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))  # faiss wants >= 39 points per cell
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train_pos = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
    train = _take_rows(ds, train_pos, d)
    fams = _recall_queries(train, train_pos, min(RECALL_QUERIES, n), rng)
    if use_gpu:
        res = faiss.StandardGpuResources()
        work = faiss.index_cpu_to_gpu(res, 0, index)
    else:
        work = index
    work.train(train)
    del train

    q_all = np.concatenate([q for q, _ in fams])
    depth = min(101, n)  # recall@100 needs 100 neighbours besides the query's own row
    heap = faiss.ResultHeap(len(q_all), depth, keep_max=True)
    assign = np.empty(n, dtype=np.int64)
    ids_chunks = []
    offset = 0
    for x, ids in _stream(ds, d):
        if offset + len(x) > n:
            raise RuntimeError(f"the table grew past its {n} rows during the build")
        if use_gpu:
            work.add(x)
        else:
            assign[offset : offset + len(x)] = index.quantizer.assign(x, 1).ravel()
        sims, pos = faiss.knn(q_all, x, min(depth, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, pos + offset)
        # a copy: an id column sliced from the batch would keep the whole batch (its vectors) alive
        ids_chunks.append(ids.to_numpy(zero_copy_only=False).astype(str))
        offset += len(x)
    if offset != n:
        raise RuntimeError(f"read {offset} rows but the table has {n}; was it written during the build?")
    if not use_gpu:
        _reserve_lists(index, assign)
        offset = 0
        for x, _ in _stream(ds, d):
            m = len(x)
            index.add_core(m, faiss.swig_ptr(x), None, faiss.swig_ptr(assign[offset : offset + m]))
            offset += m
        del assign
    heap.finalize()
    bounds = np.cumsum([0] + [len(q) for q, _ in fams])
    exact = [heap.I[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    tuned = _tune_both(work, fams, exact, nlist, target_recall, n)
    if use_gpu:
        index = faiss.index_gpu_to_cpu(work)
    index.nprobe = tuned["nprobe"]
    ids_arr = np.concatenate(ids_chunks)  # fixed-width unicode: np.load needs no pickle
    return index, {"kind": "ivf", "nlist": nlist, **tuned, "gpu": use_gpu}, ids_arr


def _tune_both(index, fams, exact, nlist, target, n) -> dict:
    """nprobe for recall@10 (the stored default) and for recall@100 (the query engine's pool).

    Each is the tuned value times ``NPROBE_MARGIN`` (recall re-measured there): on the offline
    world's trained tiny CLIP (4,500 rows, 115 cells), real text queries reached recall@10 0.93 at
    the value tuned on the held families and 0.975 at twice it (recall@100: 0.96 and 0.997).
    """
    out = {}
    start = 1
    for k, suffix in ((10, ""), (100, "_at_100")):
        kk = min(k, n - 1)
        tuned, rec, curve = _tune_nprobe(index, fams, exact, nlist, target, k=kk, start=start)
        if rec < target:
            log.warning("IVF recall@%d %.3f stays below %.2f even at nprobe=%d", k, rec, target, tuned)
        nprobe = min(nlist, tuned * NPROBE_MARGIN)
        if nprobe != tuned:
            _, rec, more = _tune_nprobe(index, fams, exact, nlist, 0.0, k=kk, start=nprobe)
            curve.update(more)
        out.update({f"nprobe{suffix}": nprobe, f"recall_at_{k}": round(rec, 4), f"recall_curve{suffix}": curve,
                    f"nprobe_tuned{suffix}": tuned})
        start = tuned
    return out


@contextmanager
def _folder_lock(db: Database, exclusive: bool):
    """Hold ``DIR/faiss/.lock``: exclusive while building, shared while reading the stamp and files.

    The three files are replaced one by one, so without it a reader racing a builder (a second query
    engine, an ``index`` run) paired one build's index with another's ids (measured: 8 engines
    searching during a re-index got "FAISS files disagree" and KeyError errors), and every stale
    engine rebuilt the index itself. flock works across processes and across threads (each call
    opens its own file description). A folder that cannot be written is read without the lock.
    """
    import fcntl

    try:
        db.faiss_dir.mkdir(parents=True, exist_ok=True)
        f = open(db.faiss_dir / LOCK_FILE, "a+")  # noqa: SIM115 -- closed below
    except OSError as e:
        log.debug("no FAISS folder lock in %s: %s", db.faiss_dir, e)
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        f.close()  # releases the lock


def build_index(db, force: bool = False, exact_max_rows: int = EXACT_MAX_ROWS,
                target_recall: float = TARGET_RECALL, seed: int = 0) -> dict:
    """Build (or keep, when fresh and not ``force``) the FAISS index of ``db``; returns its info.

    ``exact_max_rows``: tables up to this many rows get an exact ``IndexFlatIP``; larger ones an
    ``IndexIVFFlat`` whose ``nprobe`` reaches ``target_recall`` recall@10 (see module doc). Built on
    the GPU when faiss sees one, stored as a CPU index. Writes are atomic per file and info.json
    (the stamp) is removed first and written last, so a crash leaves an index that reads as stale.
    """
    db = _as_db(db)
    with _folder_lock(db, exclusive=True):  # one builder at a time; the freshness check is inside
        return _build_index(db, force, exact_max_rows, target_recall, seed)


def _build_index(db: Database, force: bool, exact_max_rows: int, target_recall: float, seed: int) -> dict:
    status = index_status(db)
    if status["fresh"] and not force:
        log.info("FAISS index is fresh (%d rows); not rebuilding", status["num_rows"])
        return {k: v for k, v in status.items() if k not in ("exists", "fresh", "reason")}
    faiss = _faiss()
    t0 = time.perf_counter()
    stamp = _stamp(db)
    from indexer import ann_large  # IVF-PQ, streamed, for tables whose vectors do not fit in memory

    if ann_large.wants_compressed(stamp["num_rows"], stamp["embed_dim"]):
        return ann_large.build_compressed(db, target_recall=target_recall, seed=seed)
    ds = db.table.to_lance()  # one version of the table for the whole build
    n = ds.count_rows()
    if n == 0:
        raise UserError(f"the database {db.path} has no rows to index; run `llm2loss index` with a manifest first.")
    if n <= exact_max_rows:
        ids, x = db.embeddings()
        x = np.ascontiguousarray(x, dtype=np.float32)
        index, info = _build_flat(x)
        ids_arr = np.asarray(ids.tolist(), dtype=str)  # fixed-width unicode: np.load needs no pickle
    else:  # streamed: the vectors are never held outside FAISS (peak ~1x raw plus one batch)
        index, info, ids_arr = _build_ivf(ds, n, stamp["embed_dim"], target_recall, seed)
    # rows appended since _stamp are in the index; a newer data_version marks it stale
    stamp["num_rows"] = len(ids_arr)

    db.faiss_dir.mkdir(parents=True, exist_ok=True)
    (db.faiss_dir / INFO_FILE).unlink(missing_ok=True)
    fd, tmp_index = tempfile.mkstemp(dir=db.faiss_dir, suffix=".faiss.tmp")
    os.close(fd)
    faiss.write_index(index, tmp_index)
    fd, tmp_ids = tempfile.mkstemp(dir=db.faiss_dir, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, ids_arr, allow_pickle=False)
    os.replace(tmp_index, db.faiss_dir / INDEX_FILE)
    os.replace(tmp_ids, db.faiss_dir / IDS_FILE)
    info.update(stamp)
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    info["index_bytes"] = os.path.getsize(db.faiss_dir / INDEX_FILE)
    info["ids_bytes"] = os.path.getsize(db.faiss_dir / IDS_FILE)
    write_json_atomic(db.faiss_dir / INFO_FILE, info)
    _ensure_id_index(db)
    log.info("FAISS %s index over %d rows built in %.1f s (recall@10 %.3f)", info["kind"],
             info["num_rows"], info["build_seconds"], info["recall_at_10"])
    return info


def _ensure_id_index(db: Database) -> None:
    """A BTREE index on ``id`` so the query engine's fetch of candidate rows by id stays fast.

    It changes the Lance version but not the rows (so not ``data_version``). Fragments added later
    are still found (scanned) until ``Database.cleanup`` (optimize) folds them into the index.
    """
    from indexer import schema as S

    try:
        if any(S.ID in ix.columns for ix in db.table.list_indices()):
            return
        from lancedb.index import BTree

        db.table.create_index(S.ID, config=BTree())
    except Exception as e:  # an optimisation only: a failure must not fail the build
        log.warning("could not create the scalar index on %s: %s", S.ID, e)


# ---- loading and searching ------------------------------------------------------------------------
@dataclass
class AnnIndex:
    """A loaded FAISS index and the ids of its positions.

    ``search(queries, k)`` -> (sims (m, k) float32 inner products, ids (m, k) object str), best
    first; slots with no neighbour (an IVF probe that found too few) hold sim ``-inf`` and id
    ``None``; k is capped at the number of rows. IVF probes ``nprobe_for(k)`` cells unless
    ``nprobe`` is given.
    """

    index: object
    ids: np.ndarray
    info: dict = field(default_factory=dict)
    #: faiss.StandardGpuResources kept alive as long as a GPU index uses it
    gpu_resources: object = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nprobe_for(self, k: int) -> int:
        """Cells to probe for a search of depth k: the values tuned for recall@10 and recall@100
        (log-interpolated between them), and beyond 100 the recall@100 value scaled by k / 100."""
        if self.info.get("kind") != "ivf":
            return 0  # exact index: nothing to probe
        p10 = int(self.info["nprobe"])
        p100 = int(self.info.get("nprobe_at_100") or p10)
        if k <= 10:
            p = p10
        elif k <= 100:
            t = math.log(k / 10) / math.log(10)
            p = math.exp((1 - t) * math.log(p10) + t * math.log(p100))
        else:
            p = p100 * k / 100
        return int(min(self.info["nlist"], math.ceil(p)))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        sims, pos = self.search_positions(queries, k, nprobe)
        missing = pos < 0
        out_ids = self.ids[np.where(missing, 0, pos)].astype(object)
        out_ids[missing] = None
        return sims, out_ids

    def search_subset(self, queries: np.ndarray, k: int, mask: np.ndarray,
                      nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search among the positions where ``mask`` ((ntotal,) bool) is True: (sims, positions) as
        in ``search_positions``. IVF probes ``nprobe`` cells (default: all of them, which is exact)."""
        if self.gpu_resources is not None:
            raise NotImplementedError("GPU indexes take no id selector")
        faiss = _faiss()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), int(mask.sum())))
        bitmap = np.packbits(mask.astype(bool), bitorder="little")  # faiss reads bit i at byte i >> 3
        sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        if self.info.get("kind") == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(min(nprobe or self.info["nlist"], self.info["nlist"])))
        else:
            params = faiss.SearchParameters(sel=sel)
        sims, pos = self.index.search(q, k, params=params)
        sims = sims.astype(np.float32, copy=False)
        sims[pos < 0] = -np.inf
        return sims, pos

    def search_positions(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` but (sims (m, k) float32, FAISS positions (m, k) int64, -1 where none)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        if self.info.get("kind") == "ivf" and (nprobe is not None or k > 10):
            faiss = _faiss()
            nprobe = int(min(nprobe or self.nprobe_for(k), self.info["nlist"]))
            if self.gpu_resources is not None:  # GPU indexes take no per-call parameters
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
                sims, pos = self.index.search(q, k)
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.info["nprobe"])
            else:
                sims, pos = self.index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        else:
            sims, pos = self.index.search(q, k)
        sims = sims.astype(np.float32, copy=False)
        sims[pos < 0] = -np.inf
        return sims, pos


def load_index(db, rebuild_if_stale: bool = True) -> AnnIndex:
    """The fresh FAISS index of ``db``; a missing or stale one is rebuilt, or refused when
    ``rebuild_if_stale`` is False. Moved to the GPU when faiss sees one."""
    db = _as_db(db)
    faiss = _faiss()
    for _ in range(LOAD_ATTEMPTS):
        # the stamp and both files are read as one set, never half from a concurrent build
        with _folder_lock(db, exclusive=False):
            status = index_status(db)
            if status["fresh"]:
                index = faiss.read_index(str(db.faiss_dir / INDEX_FILE))
                ids = np.load(db.faiss_dir / IDS_FILE, allow_pickle=False)
                break
        if not rebuild_if_stale:
            raise UserError(
                f"the FAISS index in {db.faiss_dir} is stale ({status['reason']}); rebuild it with "
                "indexer.ann.build_index(db) (the query engine and `llm2loss index` do so by default)."
            )
        log.info("rebuilding the FAISS index: %s", status["reason"])
        build_index(db)  # not forced: whoever held the lock before us may have rebuilt it already
    else:
        # An `index` run is still appending: each rebuild was outdated by the next commit. Serve the
        # newest complete build (it covers one earlier version of the table, and says so in the log)
        # rather than fail every query until the run ends (measured: 1 of 1,600 searches failed).
        with _folder_lock(db, exclusive=False):
            status = index_status(db)
            if not status["exists"]:
                raise UserError(
                    f"the table in {db.path} kept changing while its FAISS index was built (an `llm2loss "
                    "index` run is writing it); query again when that run has finished."
                )
            index = faiss.read_index(str(db.faiss_dir / INDEX_FILE))
            ids = np.load(db.faiss_dir / IDS_FILE, allow_pickle=False)
        log.warning("the table is being written (%s); searching the FAISS index of %d rows built meanwhile",
                    status["reason"], len(ids))
    if index.ntotal != len(ids) or len(ids) != status["num_rows"]:
        raise UserError(
            f"the FAISS files in {db.faiss_dir} disagree ({index.ntotal} vectors, {len(ids)} ids); "
            "delete that folder and run the query again to rebuild it."
        )
    if status.get("kind") == "ivf":
        index.nprobe = int(status["nprobe"])
    res = None
    if gpu_available():
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    info = {k: v for k, v in status.items() if k not in ("exists", "fresh", "reason")}
    return AnnIndex(index=index, ids=ids, info=info, gpu_resources=res)
