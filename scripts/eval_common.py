"""What the evaluation scripts share: building a world's database (index with its tiny CLIP,
diagnose) once, and tying failure modes to the planted slices they name.

``scripts/eval_diagnosis.py`` and ``scripts/eval_curation.py`` import it (a script's folder is on
``sys.path`` when it runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from diagnosis.run import diagnose, load_ensemble
from indexer.store import Database

log = logging.getLogger("eval")


def ensure_db(world, work: Path, progress: bool) -> Database:
    from indexer.clip import ClipSpec
    from indexer.pipeline import index_dataset

    path = work / world.hash / "db"
    db = None
    if (path / "meta.json").exists():
        db = Database(path)
        if not db.has_table() or db.count_rows() != world.manifest_rows():
            db = None
    if db is None:
        clip = ClipSpec(model=str(world.clip_config), checkpoint=str(world.clip_checkpoint))
        t = time.perf_counter()
        rep = index_dataset(world.manifest, path, clip=clip, device="cpu", progress=progress)
        log.info("indexed %s in %.0fs: %s", world.hash, time.perf_counter() - t, rep.summary())
        db = Database(path)
    try:
        if load_ensemble(db).stale is None:
            return db
    except Exception:  # noqa: BLE001 - none yet or stale: fit
        pass
    t = time.perf_counter()
    log.info("%s", diagnose(db, progress=progress).summary())
    log.info("diagnosed in %.0fs", time.perf_counter() - t)
    return db


def mode_slice(ids: list[str], rows, slices: list[dict]) -> dict | None:
    """The planted slice a mode (its member ``ids``) found, as the demo ties them: the slice that is
    most of its members or holds most of it, when either is at least half (None otherwise)."""
    from search_ui.demo import _best_slice

    return _best_slice(ids, rows, slices)


def parser(doc: str, specs: dict) -> argparse.ArgumentParser:
    """The options every evaluation takes: the worlds, where their databases go, the JSON output."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--specs", default=None,
                    help=f"comma list of: {', '.join(specs)}, or JSON spec paths (default: all of them)")
    ap.add_argument("--work", default="/tmp/eval_diagnosis", help="folder for the indexed databases")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two evaluations share 2 cores)")
    return ap


def run(args, specs: dict, evaluate: Callable[[str, object], dict], markdown: Callable[[list[dict]], str]) -> int:
    """Evaluate each world of ``args.specs`` (names of ``specs`` or JSON paths) with ``evaluate(name,
    spec)``, logging each result as JSON on stderr (and into ``args.out`` as it goes), then print
    ``markdown`` of them all on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(max(1, args.threads))
    results = []
    for name in args.specs.split(",") if args.specs else list(specs):
        results.append(evaluate(name, specs.get(name, name)))
        print(json.dumps(results[-1], indent=1, default=str), file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    return 0
