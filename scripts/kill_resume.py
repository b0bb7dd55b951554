"""Indexing SIGKILLed at random points, resumed after each kill: every manifest row stored exactly once.

    nice -n 10 .venv/bin/python scripts/kill_resume.py [--kills 10] [--rows 160] [--seed 0]

Writes ``--rows`` small PNGs and a manifest (with losses), then runs ``index_dataset`` (tiny CLIP,
commits of ``--commit-rows`` rows, a per-batch delay so a kill can land anywhere in the run) in a
child process and kills it with SIGKILL at a random moment after its first commit, ``--kills`` times
in a row; each rerun resumes. A last run is left to finish. Then it checks that the table holds every
manifest id exactly once, with finite unit-norm embeddings and the manifest's losses, that
``meta.json``'s data version and the FAISS index are consistent with the table, and prints a JSON
summary (rows committed before each kill, where each kill landed). ``tests/test_faults.py`` runs
:func:`kill_and_resume` with three kills.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The child: index with a delay per decoded batch (via a transform that sleeps), so that a run lasts
# long enough for kills to land at many points: mid-embedding, mid-commit, mid-meta write, mid-FAISS.
CHILD = """
import sys, time
from indexer import images
from indexer.clip import ClipSpec
from indexer.configs import TINY_CLIP
from indexer.pipeline import index_dataset

delay = float(sys.argv[4])
_orig = images.collate
def slow_collate(items):
    time.sleep(delay)
    return _orig(items)
images.collate = slow_collate
r = index_dataset(sys.argv[1], sys.argv[2], clip=ClipSpec(str(TINY_CLIP)), batch_size=int(sys.argv[3]),
                  commit_rows=int(sys.argv[3]), workers=0, progress=False)
print(r.rows_written, r.rows_already_stored, flush=True)
"""


def _child(manifest: Path, db: Path, batch: int, delay: float) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(manifest), str(db), str(batch), str(delay)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _data_version(db: Path) -> int:
    try:
        return int(json.loads((db / "meta.json").read_text()).get("data_version", 0))
    except (OSError, ValueError):  # absent, or read while being replaced
        return 0


def kill_and_resume(manifest: Path, db: Path, kills: int, seed: int = 0, batch: int = 4,
                    delay: float = 0.15, max_wait: float = 0.8, timeout: float = 300) -> dict:
    """Kill ``kills`` runs of ``llm2loss index`` at random moments, then let one finish.

    Each kill waits until the run has made a new commit (so every kill leaves progress behind), then
    a random ``U(0, max_wait)`` seconds, then SIGKILLs. A run that finishes before its kill is counted
    in ``finished_early``. Returns what happened (rows stored before each kill, final stdout).
    """
    rng = np.random.default_rng(seed)
    events = []
    finished_early = 0
    for _ in range(kills):
        before = _data_version(db)
        proc = _child(manifest, db, batch, delay)
        deadline = time.monotonic() + timeout
        while _data_version(db) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        wait = float(rng.uniform(0, max_wait))
        time.sleep(wait)
        if proc.poll() is not None:
            finished_early += 1
            proc.communicate()
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.communicate()
        events.append({"after_commit_s": round(wait, 3), "data_version": _data_version(db),
                       "rows_stored": _rows(db)})
    proc = _child(manifest, db, batch, delay)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the final run failed (exit {proc.returncode}): {err[-2000:]}")
    return {"kills": events, "finished_early": finished_early, "final_run": out.split()}


def _rows(db: Path) -> int:
    from indexer.store import Database

    try:
        d = Database(db)
        return d.count_rows() if d.has_table() else 0
    except Exception:  # no meta.json yet: killed before the first commit stamped it
        return 0


def check_table(manifest: Path, db: Path) -> dict:
    """Assert the table is the manifest, each row once; returns counts. Raises AssertionError."""
    import pandas as pd

    from indexer import ann
    from indexer import schema as S
    from indexer.store import Database

    want = pd.read_csv(manifest)
    d = Database(db)
    t = d.read([S.ID, S.LOSS, S.EMBEDDING]).to_pandas()
    assert t[S.ID].is_unique, f"duplicated ids: {t[S.ID][t[S.ID].duplicated()].tolist()[:5]}"
    assert sorted(t[S.ID]) == sorted(want["id"]), (
        f"missing {sorted(set(want['id']) - set(t[S.ID]))[:5]}, extra {sorted(set(t[S.ID]) - set(want['id']))[:5]}")
    merged = t.merge(want[["id", "loss"]], left_on=S.ID, right_on="id", suffixes=("", "_manifest"))
    np.testing.assert_allclose(merged[S.LOSS], merged["loss_manifest"], rtol=1e-6)
    emb = np.stack(t[S.EMBEDDING].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    status = ann.index_status(d)
    assert status["fresh"] and status["num_rows"] == len(want), status
    return {"rows": len(t), "unique": int(t[S.ID].nunique()), "data_version": d.data_version,
            "lance_version": d.version, "faiss_fresh": status["fresh"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rows", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="images per batch and per Lance commit")
    ap.add_argument("--delay", type=float, default=0.15, help="seconds of delay per batch")
    args = ap.parse_args()
    from tests.fakes import make_images

    with tempfile.TemporaryDirectory(prefix="llm2loss-kill-") as tmp:
        tmp = Path(tmp)
        make_images(tmp, args.rows, seed=args.seed)
        t0 = time.perf_counter()
        summary = kill_and_resume(tmp / "manifest.csv", tmp / "db", args.kills, args.seed, args.batch, args.delay)
        summary["check"] = check_table(tmp / "manifest.csv", tmp / "db")
        summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
