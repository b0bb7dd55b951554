"""The FAISS index for tables whose vectors do not fit in memory: IVF-PQ, trained on a sample.

:func:`indexer.ann.build_index` hands a table over here when its raw vectors would take more than
:data:`FLAT_MAX_BYTES` (8 GiB: 4.2M rows of 512 float32). The index is built without ever holding
the table's vectors:

1. a random sample of ``train_rows`` rows (``64 * nlist``, at most 1M) is read by position from the
   Lance table, and trains the coarse quantizer (``nlist = 4 sqrt(n)`` cells) and the product
   quantizer (``m`` sub-vectors of 8 bits each: ``m`` bytes a vector instead of ``4 d``; by default
   ``m = d / 8``, 64 bytes for d = 512, a 32x compression);
2. one streaming pass over the table in record batches adds every vector's code to the index and,
   for the recall queries, keeps the exact top-k by brute force (so the ground truth needs no
   second copy of the data);
3. ``nprobe`` is the smallest power of two whose recall@10 against that exact search reaches
   ``target_recall``, or the best there is: product quantization loses some ranking precision, so
   recall@10 can plateau under 0.95; ``recall_10_at_100`` (how many of the true top 10 are among the
   index's top 100) says what re-ranking 100 candidates by their stored embeddings would recover.

Everything runs on the GPU when faiss sees one (training, adding, the recall search). The files are
those of :mod:`indexer.ann` (``index.faiss``, ``ids.npy``, ``info.json``) and info.json says
``kind: "ivf"`` (so the query engine probes it like any IVF index) with ``codec: "PQ{m}x8"``.
``ids.npy`` is written through a memory map and can be loaded the same way.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa

from indexer import ann, ann_build
from indexer import schema as S
from indexer.integrity import ids_digest
from indexer.store import Database

log = logging.getLogger(__name__)

#: Raw float32 vectors above this size get the compressed index (see the module doc).
FLAT_MAX_BYTES = 8 << 30
#: Training rows: this many per IVF cell, and at most MAX_TRAIN_ROWS.
TRAIN_PER_CELL = 64
MAX_TRAIN_ROWS = 1_000_000
#: Product-quantizer sizes the GPU index supports (bytes per vector).
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)


def wants_compressed(num_rows: int, embed_dim: int) -> bool:
    """Whether a table of (num_rows, embed_dim) float32 vectors is too large for a flat/IVF-Flat index."""
    return num_rows * embed_dim * 4 > FLAT_MAX_BYTES


def pq_bytes(d: int, wanted: int | None = None) -> int:
    """Bytes per vector: ``wanted`` or d/8, lowered to a size that divides d and the GPU supports."""
    target = wanted or max(1, d // 8)
    ok = [m for m in GPU_PQ_BYTES if m <= target and d % m == 0]
    return max(ok) if ok else 1


def _gpu_clone(index):
    faiss = ann_build.faiss_module()
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True  # float16 lookup tables: large m does not fit shared memory in float32
    return faiss.index_cpu_to_gpu(res, 0, index, co), res


def _read_rows(db: Database, positions: np.ndarray) -> np.ndarray:
    """(len(positions), d) float32 embeddings of the rows at these scan positions."""
    ds = db.table.to_lance()
    d = db.embed_dim
    out = []
    for s in range(0, len(positions), 65536):
        t = ds.take(positions[s : s + 65536], columns=[S.EMBEDDING])
        out.append(np.asarray(t.column(S.EMBEDDING).combine_chunks().values.to_numpy()).reshape(-1, d))
    return np.concatenate(out).astype(np.float32, copy=False)


class _TopK:
    """Running exact top-k inner products of ``q`` (m, d) over vectors seen in batches."""

    def __init__(self, q: np.ndarray, k: int):
        self.q, self.k = q, k
        self.sims = np.full((len(q), 0), -np.inf, dtype=np.float32)
        self.pos = np.zeros((len(q), 0), dtype=np.int64)

    def add(self, x: np.ndarray, offset: int) -> None:
        s = self.q @ x.T
        sims = np.concatenate([self.sims, s], axis=1)
        pos = np.concatenate([self.pos, np.broadcast_to(np.arange(offset, offset + len(x)), s.shape)], axis=1)
        keep = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k] if sims.shape[1] > self.k else \
            np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        order = np.argsort(-np.take_along_axis(sims, keep, 1), axis=1, kind="stable")
        keep = np.take_along_axis(keep, order, 1)
        self.sims = np.take_along_axis(sims, keep, 1)
        self.pos = np.take_along_axis(pos, keep, 1)


def build_compressed(db, target_recall: float = ann.TARGET_RECALL, seed: int = 0, batch_rows: int = 65536,
                     bytes_per_vector: int | None = None, nlist: int | None = None) -> dict:
    """Build and write the IVF-PQ index of ``db`` (see the module doc); returns its info.json.

    ``bytes_per_vector``: PQ code size (default d/8); ``nlist``: IVF cells (default 4 sqrt(n));
    ``batch_rows``: rows read per batch of the streaming pass.
    """
    db = ann._as_db(db)
    faiss = ann_build.faiss_module()
    t0 = time.perf_counter()
    stamp = ann._stamp(db)
    n, d = stamp["num_rows"], stamp["embed_dim"]
    m = pq_bytes(d, bytes_per_vector)
    nlist = nlist or max(1, min(int(round(4 * math.sqrt(n))), n // 39))
    rng = np.random.default_rng(seed)
    n_train = min(n, max(256 * 39, TRAIN_PER_CELL * nlist), MAX_TRAIN_ROWS)
    train_pos = np.sort(rng.choice(n, size=n_train, replace=False))
    train = _read_rows(db, train_pos)

    # recall queries: half stored vectors (their own row excluded later), half midpoints of two
    q_n = min(ann_build.RECALL_QUERIES, n_train)
    own = rng.choice(n_train, size=q_n // 2, replace=False)
    a, b = rng.integers(0, n_train, q_n - len(own)), rng.integers(0, n_train, q_n - len(own))
    mid = train[a] + train[b]
    mid /= np.maximum(np.linalg.norm(mid, axis=1, keepdims=True), 1e-12)
    q = np.concatenate([train[own], mid]).astype(np.float32)
    self_pos = np.concatenate([train_pos[own], np.full(len(mid), -1)]).astype(np.int64)
    k = min(10, n - 1)
    truth = _TopK(q, k + 1)

    index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x8", faiss.METRIC_INNER_PRODUCT)
    use_gpu = ann_build.gpu_available()
    work, res = _gpu_clone(index) if use_gpu else (index, None)
    work.train(train)
    del train
    ids_chunks = []
    offset = 0
    for batch in db.iter_batches([S.ID, S.EMBEDDING], batch_rows):
        x = np.asarray(batch.column(S.EMBEDDING).values.to_numpy()).reshape(-1, d).astype(np.float32, copy=False)
        work.add(x)
        truth.add(x, offset)
        # a copy: a column of the batch can keep the whole decoded batch (vectors too) alive
        ids_chunks.append(pa.array(batch.column(S.ID).to_pylist(), type=pa.string()))
        offset += len(x)
    if offset != n:
        raise RuntimeError(f"read {offset} rows but the table has {n}; was it written during the build?")
    exact = ann_build.drop_self(truth.pos, self_pos, k)

    curve, nprobe, rec = {}, 1, 0.0
    while True:
        found = _search(work, q, k + 1, nprobe, use_gpu)
        rec = ann_build.recall_at(exact, ann_build.drop_self(found, self_pos, k), k)
        curve[str(nprobe)] = round(rec, 4)
        if rec >= target_recall or nprobe >= nlist:
            break
        nprobe = min(nprobe * 2, nlist)
    best = max(curve.values())
    if rec < target_recall:  # a plateau: take the smallest nprobe within 0.005 of the best recall
        nprobe = min(int(p) for p, r in curve.items() if r >= best - 0.005)
        rec = curve[str(nprobe)]
        log.warning("IVF-PQ recall@10 plateaus at %.3f (< %.2f); nprobe=%d", rec, target_recall, nprobe)
    deep = ann_build.drop_self(_search(work, q, min(101, n), nprobe, use_gpu), self_pos, min(100, n - 1))
    recall_10_at_100 = float(np.mean([len(set(t.tolist()) & set(f.tolist())) / k for t, f in zip(exact, deep, strict=True)]))
    if use_gpu:
        index = faiss.index_gpu_to_cpu(work)
    index.nprobe = nprobe

    info = {"kind": "ivf", "codec": f"PQ{m}x8", "nlist": nlist, "nprobe": nprobe, "recall_at_10": round(rec, 4),
            "recall_curve": curve, "recall_10_at_100": round(recall_10_at_100, 4), "gpu": use_gpu,
            "train_rows": int(n_train), "bytes_per_vector": m}
    _write(db, index, ids_chunks, n, info, stamp, t0)
    return info


def _search(index, q: np.ndarray, k: int, nprobe: int, gpu: bool) -> np.ndarray:
    faiss = ann_build.faiss_module()
    if gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        return index.search(q, k)[1]
    return index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]


def _write(db: Database, index, ids_chunks: list, n: int, info: dict, stamp: dict, t0: float) -> None:
    """The files of :func:`indexer.ann.build_index`, atomically; ids.npy through a memory map."""
    width = max((max((len(s) for s in c.to_pylist()), default=1) for c in ids_chunks), default=1)

    def write_ids(path: str) -> None:
        ids = np.lib.format.open_memmap(path, mode="w+", dtype=f"<U{max(1, width)}", shape=(n,))
        i = 0
        for c in ids_chunks:
            ids[i : i + len(c)] = c.to_numpy(zero_copy_only=False).astype(str)
            i += len(c)
        ids.flush()
        del ids

    info.update(stamp)
    info["ids_sha256"] = ids_digest(i for c in ids_chunks for i in c.to_pylist())
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    ann.write_index_files(db, index, write_ids, info)
    ann._ensure_id_index(db)
    log.info("FAISS IVF-PQ (%s, %d cells) over %d rows built in %.1f s: recall@10 %.3f at nprobe %d, "
             "%.3f of the top 10 within the top 100", info["codec"], info["nlist"], n, info["build_seconds"],
             info["recall_at_10"], info["nprobe"], info["recall_10_at_100"])
