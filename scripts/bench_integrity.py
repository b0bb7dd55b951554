"""What verifying derived files costs (issue 25): loading the FAISS index with its SHA-256 checks
against reading the same two files bare, and `llm2loss check` (every data file read, every stored
vector compared) against a bare scan of the table, on a synthetic N x 512 table (exact index up to
20,000 rows, IVF beyond).

    nice -n 10 .venv/bin/python scripts/bench_integrity.py [--sizes 20000,100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic(path: Path, n: int, d: int = 512):
    import pyarrow as pa

    from indexer import schema as S
    from indexer.store import Database

    rng = np.random.default_rng(0)
    db = Database(path, create=True)
    schema = S.table_schema(d)
    db.create_table(schema)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        x = rng.normal(size=(m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"r{i:07d}" for i in range(s, s + m)]
        db.table.add(pa.table({
            S.ID: ids, S.IMAGE: [f"/nowhere/{i}.png" for i in ids], S.LABEL: ["a"] * m, S.SPLIT: ["train"] * m,
            S.LOSS: pa.array(rng.random(m).astype(np.float32)),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
            S.PREDICTED_LOSS: pa.nulls(m, pa.float32()), S.PREDICTED_LOSS_STD: pa.nulls(m, pa.float32()),
        }, schema=schema))
    db.update_meta(clip={"model": "synthetic"}, data_version=db.version, embed_dim=d)
    return db


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(n: int, repeat: int) -> dict:
    import faiss

    from indexer import ann
    from indexer.check import check_database

    with tempfile.TemporaryDirectory(prefix="llm2loss-bench-integrity-") as tmp:
        db = synthetic(Path(tmp) / "db", n)
        ann.build_index(db)
        f = db.faiss_dir

        def bare():
            faiss.read_index(str(f / ann.INDEX_FILE))
            np.load(f / ann.IDS_FILE, allow_pickle=False)

        def scan():
            for _ in db.iter_batches([c.name for c in db.table.schema]):
                pass

        t_bare, t_load = best(bare, repeat), best(lambda: ann.load_index(db, rebuild_if_stale=False), repeat)
        t_scan = best(scan, repeat)
        t = time.perf_counter()
        report = check_database(db.path)
        t_check = time.perf_counter() - t
        return {"rows": n, "index": ann.index_status(db)["kind"],
                "index_mb": round((f / ann.INDEX_FILE).stat().st_size / 2**20, 1),
                "bare_read_s": round(t_bare, 3), "verified_load_s": round(t_load, 3),
                "load_ratio": round(t_load / t_bare, 2), "table_scan_s": round(t_scan, 3),
                "check_s": round(t_check, 3), "check_ratio": round(t_check / t_scan, 2), "check_ok": report.ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    for n in map(int, args.sizes.split(",")):
        rows.append(measure(n, args.repeat))
        print(json.dumps(rows[-1]), flush=True)
    print("| rows | index | MB | bare read (s) | verified load (s) | ratio | table scan (s) | check (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']:,} | {r['index']} | {r['index_mb']} | {r['bare_read_s']} | {r['verified_load_s']} | "
              f"{r['load_ratio']} | {r['table_scan_s']} | {r['check_s']} | {r['check_ratio']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
