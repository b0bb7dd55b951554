"""Searches under writes: 8 threads x 200 searches while ``diagnose`` or a re-index writes the table.

    nice -n 10 .venv/bin/python scripts/stress_search.py [--threads 8] [--searches 200] [--rows 400]

Two scenarios on a small real database (PNG images, tiny CLIP, planted losses; ``tests/fakes``):

* ``diagnose``: ``diagnose`` runs ``--writes`` times (different seeds, so each run writes different
  ``predicted_loss`` values, then compacts and drops old versions) while the threads search;
* ``reindex``: the database holds the first 2/3 of a manifest and ``index_dataset`` adds the rest
  (several commits, then a FAISS rebuild) while the threads search.

Each thread has its own :class:`~search_ui.engine.QueryEngine` (as separate CLI/API callers do) and
searches until it has done ``--searches`` and the writer has finished (at most 10x as many). Checked:
no search raises, every answer has k distinct rows, and every answer is *consistent*: there is one
table state, among the states before and after each write, that holds every returned row with exactly
the returned ``loss`` and ``predicted_loss``. A mix of two diagnose runs' values in one answer, a row
that no state has, or a torn FAISS index would show up there. Prints a JSON summary.
``tests/test_faults.py`` runs :func:`search_while_writing` with fewer searches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PHRASES = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]


def table_state(db_path: Path) -> dict[str, tuple]:
    """id -> (loss, predicted_loss) of the table's latest version, as a search result reports them."""
    from indexer import schema as S
    from indexer.store import Database

    t = Database(db_path).read([S.ID, S.LOSS, S.PREDICTED_LOSS])
    return dict(zip(t.column(S.ID).to_pylist(),
                    zip(t.column(S.LOSS).to_pylist(), t.column(S.PREDICTED_LOSS).to_pylist(), strict=True),
                    strict=True))


def _where(e: BaseException) -> str:
    """The innermost product frames of an exception: 'file:line <- file:line'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if str(ROOT) in f.filename and "scripts" not in f.filename]
    return " <- ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno}" for f in reversed(frames[-3:]))


def _consistent(answer: dict[str, tuple], states: list[dict]) -> int | None:
    """Index of a state holding every row of ``answer`` with the same values, else None."""
    for j, s in enumerate(states):
        if all(s.get(i) == v for i, v in answer.items()):
            return j
    return None


def search_while_writing(db_path: Path, writes: list[Callable[[], object]], threads: int = 8,
                         searches: int = 200, k: int = 10, seed: int = 0, after_writes: int = 3,
                         max_seconds: float = 900.0) -> dict:
    """Run ``writes`` one after another in a writer thread while ``threads`` threads search.

    Each searcher runs at least ``searches`` searches, keeps searching while the writer works, and
    runs ``after_writes`` more once it has finished (``max_seconds`` bounds it all).

    Returns counts: searches, errors (first few messages), inconsistent answers, short answers, the
    states answers came from, and latency percentiles (ms).
    """
    from search_ui.engine import QueryEngine

    states = [table_state(db_path)]
    answers: list[dict] = []
    errors: list[str] = []
    latencies: list[float] = []
    short = 0
    lock = threading.Lock()
    writer_done = threading.Event()
    start = threading.Barrier(threads + 1)

    def searcher(t: int) -> None:
        nonlocal short
        rng = np.random.default_rng([seed, t])
        try:
            engine = QueryEngine(db_path, device="cpu")
            engine.search(PHRASES[0], k=k)  # load CLIP and FAISS before the clock starts
        except Exception as e:  # noqa: BLE001 -- every failure is the measurement
            with lock:
                errors.append(f"setup: {type(e).__name__}: {e}")
            start.wait()
            return
        start.wait()
        done = after = 0
        deadline = time.monotonic() + max_seconds
        # Search until the writer is done and then some more, so answers come from the states before,
        # during and after the writes however fast searches are next to writes on this machine.
        while (done < searches or not writer_done.is_set() or after < after_writes) and time.monotonic() < deadline:
            after += writer_done.is_set()
            phrase = PHRASES[int(rng.integers(len(PHRASES)))]
            t0 = time.perf_counter()
            try:
                res = engine.search(phrase, k=k)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:300]} (at {_where(e)})")
            else:
                ans = {r.id: (r.loss, r.predicted_loss) for r in res}
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    answers.append(ans)
                    short += len(ans) < min(k, len(states[0])) or len(ans) != len(res)
            done += 1

    def writer() -> None:
        start.wait()
        try:
            for w in writes:
                w()
                states.append(table_state(db_path))
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"writer: {type(e).__name__}: {str(e)[:300]}")
        finally:
            writer_done.set()

    pool = [threading.Thread(target=searcher, args=(t,), daemon=True) for t in range(threads)]
    pool.append(threading.Thread(target=writer, daemon=True))
    t0 = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    seen = Counter(_consistent(a, states) for a in answers)
    lat = np.array(latencies) * 1000
    return {
        "threads": threads, "searches": len(answers) + len(errors), "errors": len(errors),
        "error_examples": sorted(set(errors))[:5], "inconsistent": seen.pop(None, 0), "short_answers": short,
        "answers_per_state": {str(j): n for j, n in sorted(seen.items())}, "states": len(states),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def diagnose_writes(db_path: Path, n: int) -> list[Callable[[], object]]:
    from diagnosis.run import diagnose

    return [lambda i=i: diagnose(db_path, members=1, folds=2, random_state=i + 1, progress=False)
            for i in range(n)]


def reindex_setup(folder: Path, rows: int) -> tuple[Path, Callable[[], object]]:
    """Index 2/3 of a ``rows``-image manifest into ``folder/db``; return (db, the write adding the rest)."""
    from indexer.clip import ClipSpec
    from indexer.configs import TINY_CLIP
    from indexer.pipeline import index_dataset
    from tests.fakes import make_images

    df = make_images(folder, rows)
    df.iloc[: 2 * rows // 3].to_csv(folder / "first.csv", index=False)
    spec = ClipSpec(str(TINY_CLIP))
    db = folder / "db"
    index_dataset(folder / "first.csv", db, clip=spec, workers=0, progress=False)
    # workers=0: decoding in this process, not in workers forked from a process full of threads
    return db, lambda: index_dataset(folder / "manifest.csv", db, clip=spec, batch_size=16, commit_rows=16,
                                     workers=0, progress=False)


def diagnose_setup(folder: Path, rows: int) -> Path:
    from indexer import ann
    from tests.fakes import make_db

    db = make_db(folder, rows)
    ann.build_index(db)
    return db.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--writes", type=int, default=3, help="diagnose runs during the searches")
    ap.add_argument("--scenarios", default="diagnose,reindex")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="llm2loss-stress-") as tmp:
        for name in args.scenarios.split(","):
            folder = Path(tmp) / name
            if name == "diagnose":
                db = diagnose_setup(folder, args.rows)
                writes = diagnose_writes(db, args.writes)
            else:
                db, w = reindex_setup(folder, args.rows)
                writes = [w]
            out[name] = search_while_writing(db, writes, args.threads, args.searches)
            print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
