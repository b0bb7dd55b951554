"""What the evaluation scripts share: building a world's database (index with its tiny CLIP,
diagnose) once, and tying failure modes to the planted slices they name.

``scripts/eval_diagnosis.py`` and ``scripts/eval_curation.py`` import it (a script's folder is on
``sys.path`` when it runs).
"""

from __future__ import annotations

import logging
import time
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
