"""Ray engine: one local worker against two on the same data, beside the single-machine path; and the
compressed FAISS index against the exact one. Prints what BENCHMARKS.md's "Ray" section records.

    nice -n 10 .venv/bin/python scripts/bench_ray.py [--images 600] [--rows 100000] [--dim 512]

Indexing: ``--images`` PNGs (tests/fakes.make_images, 32 px) embedded by the tiny random CLIP, into
fresh databases: (a) ``index_dataset`` (one process + decoding workers), (b) Ray with one embedding
actor, (c) Ray with two, all on one local Ray of 2 CPUs started once (its start-up is reported
apart). Images per second count the whole run after the model load (for Ray: actor start-up
included, which is what a user waits for) and, for Ray, also the steady rate after the first
commit. FAISS: ``--rows`` clustered unit vectors of ``--dim`` dimensions: flat vs IVF-PQ size, build
time, query time and recall@10.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_index(n_images: int, work: Path) -> dict:
    import ray
    import torch

    from indexer import ray_engine
    from indexer.clip import ClipSpec
    from indexer.configs import TINY_CLIP
    from indexer.pipeline import index_dataset
    from indexer.ray_engine import index_dataset_ray
    from tests.fakes import make_images

    torch.set_num_threads(1)
    make_images(work, n_images)
    spec = ClipSpec(model=str(TINY_CLIP), pretrained=None)
    out = {"images": n_images}

    t = time.perf_counter()
    r = index_dataset(work / "manifest.csv", work / "db_local", clip=spec, batch_size=32, workers=1, progress=False)
    out["local"] = {"seconds": round(time.perf_counter() - t, 2), "images_per_s": round(r.images_per_second, 1)}

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out["ray_start_s"] = round(time.perf_counter() - t, 2)
    real_commit = ray_engine._commit
    for actors in (1, 2):
        stamps = []

        def timed_commit(uri, frags, stamps=stamps):
            v = real_commit(uri, frags)
            stamps.append((time.perf_counter(), sum(f.physical_rows for f in frags)))
            return v

        ray_engine._commit = timed_commit
        t = time.perf_counter()
        r = index_dataset_ray(work / "manifest.csv", work / f"db_ray{actors}", clip=spec, batch_size=32,
                              actors=actors, cpus_per_actor=0.9, commit_rows=max(64, n_images // 8),
                              fragment_rows=64, progress=False)
        total = time.perf_counter() - t
        ray_engine._commit = real_commit
        # steady rate: rows committed after the first commit, over the time since it
        steady = (sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])) if len(stamps) > 2 else None
        out[f"ray_{actors}"] = {"seconds": round(total, 2), "images_per_s": round(r.images_per_second, 1),
                                "steady_images_per_s": round(steady, 1) if steady else None, "commits": len(stamps)}
    ray.shutdown()
    out["two_over_one_steady"] = round(out["ray_2"]["steady_images_per_s"] / out["ray_1"]["steady_images_per_s"], 2) \
        if out["ray_1"]["steady_images_per_s"] and out["ray_2"]["steady_images_per_s"] else None
    out["two_over_one_total"] = round(out["ray_1"]["seconds"] / out["ray_2"]["seconds"], 2)
    return out


def bench_faiss(n: int, d: int, work: Path) -> dict:
    import faiss
    import pyarrow as pa

    from indexer import ann, ann_large
    from indexer import schema as S
    from indexer.store import Database

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(max(50, n // 200), d)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"r{i:09d}" for i in range(n)]
    db = Database(work / "db_faiss", create=True)
    schema = S.table_schema(d)
    db.create_table(schema)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        db.table.add(pa.table({
            S.ID: ids[s : s + m], S.IMAGE: ["/x.png"] * m, S.LABEL: pa.nulls(m, pa.string()),
            S.SPLIT: pa.nulls(m, pa.string()), S.LOSS: pa.array(np.zeros(m, np.float32)),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x[s : s + m].reshape(-1)), d),
            S.PREDICTED_LOSS: pa.nulls(m, pa.float32()), S.PREDICTED_LOSS_STD: pa.nulls(m, pa.float32()), **S.no_identity(m)},
            schema=schema))
    db.update_meta(clip={"model": "synthetic"}, data_version=db.version, embed_dim=d)

    q = x[rng.integers(0, n, 200)] + x[rng.integers(0, n, 200)]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    t = time.perf_counter()
    _, truth = flat.search(q, 10)
    flat_ms = (time.perf_counter() - t) / len(q) * 1e3

    t = time.perf_counter()
    info = ann_large.build_compressed(db)
    build_s = time.perf_counter() - t
    index = ann.load_index(db, rebuild_if_stale=False)
    t = time.perf_counter()
    _, got = index.search(q, 10)
    pq_ms = (time.perf_counter() - t) / len(q) * 1e3
    pos = {s: i for i, s in enumerate(ids)}
    recall = float(np.mean([len(set(tr) & {pos[g] for g in row}) / 10 for tr, row in zip(truth, got, strict=True)]))
    t = time.perf_counter()
    _, pool = index.search(q, 100)
    pool_ms = (time.perf_counter() - t) / len(q) * 1e3
    recall_pool = float(np.mean([len(set(tr) & {pos[g] for g in row}) / 10 for tr, row in zip(truth, pool, strict=True)]))
    return {"rows": n, "dim": d, "flat_bytes": int(x.nbytes), "ivfpq_index_bytes": info["index_bytes"],
            "ids_bytes": info["ids_bytes"], "compression": round(x.nbytes / info["index_bytes"], 1),
            "codec": info["codec"], "nlist": info["nlist"], "nprobe": info["nprobe"],
            "build_s": round(build_s, 1), "stored_recall_at_10": info["recall_at_10"],
            "stored_recall_10_at_100": info["recall_10_at_100"], "fresh_query_recall_at_10": round(recall, 4),
            "fresh_query_recall_10_in_pool_100": round(recall_pool, 4),
            "flat_ms_per_query": round(flat_ms, 3), "ivfpq_ms_per_query_k10": round(pq_ms, 3),
            "ivfpq_ms_per_query_k100": round(pool_ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--skip-faiss", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_index:
            res["index"] = bench_index(args.images, Path(tmp) / "idx")
        if not args.skip_faiss:
            res["faiss"] = bench_faiss(args.rows, args.dim, Path(tmp))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
