"""Which faiss-cpu build to pin: batched exact and IVF-SQfp16 search against numpy in the same process.

    python scripts/bench_faiss_build.py [--pythons /tmp/a/bin/python,/tmp/b/bin/python] [--reps 3]

Each interpreter (default: this one) runs the same measurements in its own process, one after the
other, and the tables are printed side by side. Within one process every faiss time has a numpy
time next to it (``xq @ xb.T`` on numpy's own BLAS, plus ``argpartition`` for the top 10), so
the ratio faiss/numpy holds even when other jobs slow the whole machine; compare builds by it.
Each figure is the fastest of ``--reps`` runs (fewer when one run passes 20 s), at 1 and 2 threads
(faiss ``omp_set_num_threads``, numpy through threadpoolctl). The cases are the project's batched
searches:

* ``flat L2 50k``: 200 queries x 50,000 x 512 ``IndexFlatL2.search`` k=10 (the kNN members up to
  20,000 fitted rows score batches of rows this way: ``diagnosis/ensemble.py``);
* ``flat IP 50k`` / ``knn IP 50k``: the same with ``IndexFlatIP`` and with ``faiss.knn`` (the recall
  measurement at index build, ``indexer/ann_build.py``);
* ``flat IP 200k``: 200 x 200,000;
* ``IVF-SQfp16``: the kNN members above 20,000 rows (``diagnosis/ensemble.py``): 100,000 rows
  (``--ivf-rows``), nlist 4 sqrt(n) trained on 40 nlist rows (k-means, 10 iterations: one big
  GEMM per iteration), then 4,096 queries (``--ivf-queries``) at nprobe 8;
* ``flat IP 50k, 1 query`` / ``50 queries``: a search query on an exact index, a small batch.

Random Gaussian data, seeded. Needs numpy and faiss-cpu (and threadpoolctl for numpy's threads)
in each interpreter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

D, NQ, K = 512, 200, 10


def best_of(fn, reps: int, cap_s: float = 20.0) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if sum(times) > cap_s:
            break
    return min(times)


def worker(reps: int, ivf_queries: int, ivf_rows: int) -> dict:
    import faiss
    import numpy as np

    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # numpy then uses its default threads
        threadpool_info, threadpool_limits = (lambda: []), None

    rng = np.random.default_rng(0)
    xq = rng.standard_normal((NQ, D), dtype=np.float32)
    xb = rng.standard_normal((200_000, D), dtype=np.float32)
    xb50 = np.ascontiguousarray(xb[:50_000])
    out = {"faiss": faiss.__version__, "compile": faiss.get_compile_options(), "numpy": np.__version__,
           "blas": sorted({f"{i.get('internal_api')} {i.get('version')} ({i.get('prefix')}, threading {i.get('threading_layer')})" for i in threadpool_info()}),
           "rows": {}}

    def flat(cls, x):
        index = cls(D)
        index.add(x)
        return lambda: index.search(xq, K)

    def numpy_topk(x):
        def run():
            s = xq @ x.T
            return np.argpartition(-s, K, axis=1)[:, :K]
        return run

    xb_ivf = np.ascontiguousarray(xb[:ivf_rows])
    nlist = int(np.clip(4 * np.sqrt(ivf_rows), 16, 65536))
    train = xb_ivf[np.sort(rng.choice(ivf_rows, min(ivf_rows, 40 * nlist), replace=False))]

    def ivf_build():
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(D), D, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_L2)
        index.cp.niter = 10
        index.train(train)
        index.add(xb_ivf)
        index.nprobe = 8
        return index

    ivf = ivf_build()
    xq_ivf = xb_ivf[rng.choice(ivf_rows, ivf_queries, replace=False)]
    xq_ivf = xq_ivf + 0.1 * rng.standard_normal(xq_ivf.shape, dtype=np.float32)
    out["blas_threshold"] = int(faiss.cvar.distance_compute_blas_threshold)
    ivf_name = f"IVF-SQfp16 {ivf_rows // 1000}k"

    index1 = faiss.IndexFlatIP(D)
    index1.add(xb50)
    cases = {
        "flat L2 50k": flat(faiss.IndexFlatL2, xb50),
        "flat IP 50k": flat(faiss.IndexFlatIP, xb50),
        "knn IP 50k": lambda: faiss.knn(xq, xb50, K, metric=faiss.METRIC_INNER_PRODUCT),
        "numpy 50k": numpy_topk(xb50),
        "flat IP 200k": flat(faiss.IndexFlatIP, xb),
        "numpy 200k": numpy_topk(xb),
        f"{ivf_name} search {ivf_queries} q": lambda: ivf.search(xq_ivf, K),
        f"{ivf_name} train + add": ivf_build,
        "flat IP 50k, 1 query": lambda: index1.search(xq[:1], K),
        "flat IP 50k, 50 queries": lambda: index1.search(xq[:50], K),
    }
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        for name, fn in cases.items():
            if threadpool_limits is not None:
                with threadpool_limits(threads):
                    t = best_of(fn, reps)
            else:
                t = best_of(fn, reps)
            out["rows"][f"{name}, {threads}t"] = t
            print(f"  [{out['faiss']}] {name}, {threads} thread(s): {t * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return out


def table(results: list[dict]):
    heads = [r["faiss"] for r in results]
    print(f"{'case (fastest of reps, ms)':30s}" + "".join(f"{h:>12s} {'/numpy':>7s}" for h in heads))
    for key in results[0]["rows"]:
        name, threads = key.rsplit(", ", 1)
        size = "200k" if "200k" in name else "50k"
        cells = ""
        for r in results:
            t = r["rows"][key]
            ref = r["rows"].get(f"numpy {size}, {threads}")
            ratio = f"{t / ref:6.2f}x" if name.startswith(("flat", "knn")) and "quer" not in name else ""
            cells += f"{t * 1e3:12.0f} {ratio:>7s}"
        print(f"{key:30s}{cells}")
    for r in results:
        print(f"faiss {r['faiss']} (numpy {r['numpy']}): compile options '{r['compile']}'; "
              f"distance_compute_blas_threshold {r['blas_threshold']}; BLAS libraries loaded: {'; '.join(r['blas']) or 'unknown'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pythons", default="", help="comma-separated interpreters, each with its own faiss-cpu "
                    "(default: this interpreter)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ivf-queries", type=int, default=4096)
    ap.add_argument("--ivf-rows", type=int, default=100_000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.reps, args.ivf_queries, args.ivf_rows)))
        return
    results = []
    for py in [p for p in args.pythons.split(",") if p] or [sys.executable]:
        cmd = [py, __file__, "--worker", "--reps", str(args.reps), "--ivf-queries", str(args.ivf_queries),
               "--ivf-rows", str(args.ivf_rows)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table(results)


if __name__ == "__main__":
    main()
