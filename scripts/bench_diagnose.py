"""Benchmark ``diagnose`` on a large synthetic table: time, peak memory, and what subsampling costs.

Builds (once, cached in ``--work``) a LanceDB table of ``--rows`` synthetic CLIP-like embeddings:
512-d unit vectors around 256 cluster centres, whose losses depend on the cluster (a few clusters
fail badly) and smoothly on one direction, with heavy-tailed per-sample noise. Then runs the real
``diagnose`` (read in batches, fit on a stratified subsample of ``max_rows``, score every row, write
both columns in one commit, compact) once per ``--max-rows`` value, each in a fresh child
process so its peak RSS is its own, and prints one line per run side by side: seconds (read / fit /
score / write), peak RSS, and quality over all rows (rows outside the subsample are true held-out
rows, the rest out-of-fold): Spearman, R^2, AUROC for the top-10% losses, plus the oracle
(the noiseless loss) for scale.

Usage: ``nice -n 10 python scripts/bench_diagnose.py --rows 1000000 --max-rows 200000,50000``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

D = 512
K = 256


def synth(n: int, seed: int = 0, chunk: int = 100_000):
    """Yield (start, X (m, 512) float32 unit rows, loss (m,), clean loss (m,)) chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, D)).astype(np.float32)
    base = rng.gamma(1.0, 0.15, K)
    base[rng.choice(K, 8, replace=False)] = rng.uniform(1.5, 3.0, 8)  # the failure clusters
    w = rng.normal(size=D).astype(np.float32)
    w /= np.linalg.norm(w)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        cl = rng.integers(0, K, m)
        X = centres[cl] + 1.2 * rng.normal(size=(m, D)).astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        clean = base[cl] * np.exp(2.0 * (X @ w))
        loss = clean * rng.gamma(2.0, 0.5, m)  # mean-1 heavy-ish noise
        yield s, X, loss, clean


def build(path: Path, n: int) -> None:
    from indexer import schema as S
    from indexer.store import Database

    if (path / "meta.json").exists() and Database(path).count_rows() == n:
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    db = Database(path, create=True)
    schema = S.table_schema(D)
    db.create_table(schema)
    clean_all = np.empty(n, dtype=np.float32)
    for s, X, loss, clean in synth(n):
        m = len(X)
        clean_all[s : s + m] = clean
        db.table.add(pa.table({
            S.ID: [f"r{i:07d}" for i in range(s, s + m)],
            S.IMAGE: [f"/synthetic/{i}.png" for i in range(s, s + m)],
            S.LABEL: pa.nulls(m, pa.string()),
            S.SPLIT: ["test" if i % 5 == 0 else "train" for i in range(s, s + m)],
            S.LOSS: pa.array(loss.astype(np.float32)),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), D),
            S.PREDICTED_LOSS: pa.nulls(m, pa.float32()),
            S.PREDICTED_LOSS_STD: pa.nulls(m, pa.float32()), **S.no_identity(m),
        }, schema=schema))
    db.cleanup()
    np.save(path / "clean_loss.npy", clean_all)
    db.update_meta(clip={"model": "synthetic-512"}, clip_spec=None, data_version=db.version, embed_dim=D,
                   sources=[], image_roots=[])


def child(path: str, max_rows: int, members: int, folds: int) -> None:
    from diagnosis.metrics import quality
    from diagnosis.run import diagnose
    from indexer import schema as S
    from indexer.store import Database

    t, c = time.perf_counter(), time.process_time()
    rep = diagnose(path, members=members, folds=folds, max_rows=max_rows, progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    db = Database(path)
    ids = db.read([S.ID, S.PREDICTED_LOSS]).to_pandas().set_index(S.ID)
    order = np.array([int(i[1:]) for i in ids.index])
    clean = np.load(Path(path) / "clean_loss.npy")[order]
    loss = db.read([S.ID, S.LOSS]).to_pandas().set_index(S.ID).loc[ids.index, S.LOSS].to_numpy()
    oracle = quality(loss, clean)
    print(json.dumps({"max_rows": max_rows, "fitted_rows": rep.fitted_rows, "seconds": round(wall, 1),
                      "timings": rep.timings, "cpu_s": round(cpu, 1), "peak_rss_mib": round(peak), "spearman": rep.spearman,
                      "r2": rep.r2, "auroc_top10": rep.auroc_top10, "oracle": oracle}))


def in_memory(n: int, max_rows: int, members: int, folds: int) -> dict:
    """The fitting and scoring half of ``diagnose`` on arrays (no LanceDB): same subsample, same
    estimator, same batched scoring of the rows outside the subsample."""
    from diagnosis.ensemble import DiagnosisEnsemble
    from diagnosis.metrics import quality
    from diagnosis.run import SCORE_BATCH, stratified_subsample

    X = np.empty((n, D), dtype=np.float32)
    loss, clean = np.empty(n), np.empty(n)
    for s, Xc, lc, cc in synth(n):
        X[s : s + len(Xc)], loss[s : s + len(Xc)], clean[s : s + len(Xc)] = Xc, lc, cc
    t0, c0 = time.perf_counter(), time.process_time()
    fit_rows = stratified_subsample(loss, max_rows, 0)
    ens = DiagnosisEnsemble(n_members=members, n_folds=folds, random_state=0).fit(X[fit_rows], loss[fit_rows])
    t_fit, c_fit = time.perf_counter() - t0, time.process_time() - c0
    pred = np.empty(n)
    pred[fit_rows] = ens.oof_prediction_
    rest = np.setdiff1d(np.arange(n), fit_rows, assume_unique=True)
    t1, c1 = time.perf_counter(), time.process_time()
    for s in range(0, len(rest), SCORE_BATCH):
        rows = rest[s : s + SCORE_BATCH]
        pred[rows] = ens.predict(X[rows])
    t_score, c_score = time.perf_counter() - t1, time.process_time() - c1
    q = quality(loss, pred)
    return {"max_rows": max_rows, "fitted_rows": len(fit_rows), "seconds": round(time.perf_counter() - t0, 1),
            "timings": {"read_s": 0.0, "fit_s": round(t_fit, 1), "score_s": round(t_score, 1), "write_s": 0.0},
            "cpu": {"fit_s": round(c_fit, 1), "score_s": round(c_score, 1)},
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "spearman": q["spearman"], "r2": q["r2"], "auroc_top10": q["auroc_top10"],
            "oracle": quality(loss, clean)}


def against(src: str, rows: int, max_rows: list[int], members: int, folds: int) -> int:
    """``--in-memory`` with this checkout's code and with the code at ``src`` (e.g. an exported older
    commit), one child process each, alternating, printed side by side."""
    here = str(Path(__file__).resolve().parents[1])
    print(f"{rows} rows, {members} members x {folds} folds; wall (CPU) seconds; before = {src}", flush=True)
    print(f"{'max_rows':>9} {'code':>6} {'fit s':>13} {'score s':>13} {'peak MiB':>8} {'Spearman':>8} {'R^2':>6} "
          f"{'AUROC10':>7}", flush=True)
    for mr in max_rows:
        res = {}
        for name, root in (("before", src), ("after", here)):
            env = {**os.environ, "PYTHONPATH": root}
            out = subprocess.run([sys.executable, __file__, "--in-memory", "--rows", str(rows), "--max-rows", str(mr),
                                  "--members", str(members), "--folds", str(folds)],
                                 capture_output=True, text=True, env=env, cwd=root)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            r = res[name] = json.loads(out.stdout.strip().splitlines()[-1])
            tm, cpu = r["timings"], r.get("cpu", {})
            print(f"{mr:>9} {name:>6} {tm['fit_s']:>6.1f} ({cpu.get('fit_s', float('nan')):>4.0f}) "
                  f"{tm['score_s']:>6.1f} ({cpu.get('score_s', float('nan')):>4.0f}) {r['peak_rss_mib']:>8} "
                  f"{r['spearman']:>8.4f} {r['r2']:>6.3f} {r['auroc_top10']:>7.4f}", flush=True)
        b, a = res["before"], res["after"]
        print(f"{mr:>9} ratio  fit {b['timings']['fit_s'] / a['timings']['fit_s']:.2f}x, score "
              f"{b['timings']['score_s'] / a['timings']['score_s']:.2f}x faster (wall); AUROC10 "
              f"{a['auroc_top10'] - b['auroc_top10']:+.4f}, Spearman {a['spearman'] - b['spearman']:+.4f}, "
              f"peak {a['peak_rss_mib'] - b['peak_rss_mib']:+d} MiB", flush=True)
    return 0


def io_only(path: str) -> dict:
    """The LanceDB half of ``diagnose``: batched read of ids/embeddings/losses, one write of two
    float32 columns over every row (``Database.update_columns``), compaction."""
    from diagnosis.run import read_training_data
    from indexer import schema as S
    from indexer.store import Database

    db = Database(path)
    t0 = time.perf_counter()
    ids, X, loss, _ = read_training_data(db, progress=False)
    t_read = time.perf_counter() - t0
    t1 = time.perf_counter()
    db.update_columns(pa.table({S.ID: pa.array(ids, type=pa.string()),
                                S.PREDICTED_LOSS: pa.array(loss.astype(np.float32)),
                                S.PREDICTED_LOSS_STD: pa.array(np.zeros(len(ids), np.float32))}))
    db.cleanup()
    return {"rows": len(ids), "read_s": round(t_read, 1), "write_s": round(time.perf_counter() - t1, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--max-rows", default="200000,50000", help="comma list; one diagnose run each")
    ap.add_argument("--members", type=int, default=None, help="members per fold (default: the product's)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/bench_diagnose")
    ap.add_argument("--child", nargs=4, metavar=("DB", "MAX_ROWS", "MEMBERS", "FOLDS"), help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true",
                    help="fit and score arrays only (no LanceDB): one JSON line per --max-rows value")
    ap.add_argument("--io-only", action="store_true", help="time only diagnose's LanceDB read and write")
    ap.add_argument("--against", metavar="SRC", help="with --in-memory: also run the code at SRC (a checkout or "
                    "`git archive` of another commit) and print both side by side")
    args = ap.parse_args(argv)
    if args.members is None:
        from diagnosis.run import DEFAULT_MEMBERS

        args.members = DEFAULT_MEMBERS
    if args.in_memory and args.against:
        return against(args.against, args.rows, [int(x) for x in args.max_rows.split(",")], args.members, args.folds)
    if args.in_memory:
        for mr in [int(x) for x in args.max_rows.split(",")]:
            print(json.dumps(in_memory(args.rows, mr, args.members, args.folds)), flush=True)
        return 0
    if args.io_only:
        path = Path(args.work) / f"synth_{args.rows}"
        build(path, args.rows)
        print(json.dumps(io_only(str(path))), flush=True)
        return 0
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), int(args.child[3]))
        return 0
    path = Path(args.work) / f"synth_{args.rows}"
    t = time.perf_counter()
    build(path, args.rows)
    print(f"table: {args.rows} x {D} float32 at {path} (built/checked in {time.perf_counter() - t:.0f}s); "
          f"machine: {os.cpu_count()} cores", flush=True)
    print(f"{'max_rows':>9} {'fitted':>8} {'seconds':>8} {'read/fit/score/write s':>24} {'peak RSS':>9} "
          f"{'Spearman':>8} {'R^2':>6} {'AUROC10':>7}", flush=True)
    results = []
    for mr in [int(x) for x in args.max_rows.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--child", str(path), str(mr), str(args.members),
                              str(args.folds)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        tm = r["timings"]
        print(f"{r['max_rows']:>9} {r['fitted_rows']:>8} {r['seconds']:>8.0f} "
              f"{tm['read_s']:>5.0f}/{tm['fit_s']:.0f}/{tm['score_s']:.0f}/{tm['write_s']:.0f}".rjust(24)
              + f" {r['peak_rss_mib']:>6} MiB {r['spearman']:>8.3f} {r['r2']:>6.3f} {r['auroc_top10']:>7.3f}"
              f"  (CPU {r['cpu_s']:.0f} s, all threads)", flush=True)
    o = results[0]["oracle"]
    print(f"oracle (the noiseless loss): Spearman {o['spearman']:.3f}, R^2 {o['r2']:.3f}, "
          f"AUROC10 {o['auroc_top10']:.3f}")
    base = results[0]
    for r in results[1:]:
        print(f"max_rows {r['max_rows']} vs {base['max_rows']}: {base['seconds'] / r['seconds']:.2f}x faster, "
              f"AUROC10 {r['auroc_top10'] - base['auroc_top10']:+.3f}, Spearman {r['spearman'] - base['spearman']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
