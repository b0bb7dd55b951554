"""``llm2loss demo``: the whole product on the offline world, through the same path as user data.

build (or reuse) the world -> ``index_dataset`` its manifest with its tiny CLIP -> ``diagnose`` ->
``explain`` -> print a summary -> serve the UI. Each stage is skipped when its stored result is
already current, so a second run takes seconds. A stage whose module does not exist yet is
reported as not available and the rest goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from indexer.errors import UserError

log = logging.getLogger(__name__)

#: Failure modes shown in the summary.
TOP_MODES = 5
#: The labelling budget the demo plans: this share of the training split.
PLAN_SHARE = 0.05


def _missing(e: ImportError, what: str, notes: list[str]) -> None:
    notes.append(f"{what} is not available yet ({e.name or e}); skipped.")
    log.warning("%s is not available yet (%s); skipping it", what, e)


def _index(world, db: Path, notes: list[str], progress: bool) -> dict:
    """Index the world's manifest unless ``db`` already holds every row with a fresh FAISS index."""
    try:
        from indexer.clip import ClipSpec
        from indexer.pipeline import index_dataset
        from indexer.store import Database
    except ImportError as e:
        _missing(e, "indexing (indexer.pipeline)", notes)
        return {"indexed": False}
    n = world.manifest_rows()  # the unlabeled pool included
    if (db / "meta.json").is_file():
        database = Database(db)
        fresh = database.has_table() and database.count_rows() == n and _ann_fresh(database)
        if fresh:
            log.info("database %s already holds the world's %d rows; not re-indexing", db, n)
            return {"indexed": True, "reused": True, "rows": n}
    clip = ClipSpec(model=str(world.clip_config), checkpoint=str(world.clip_checkpoint))
    report = index_dataset(world.manifest, db, clip=clip, progress=progress)
    print(report.summary(), file=sys.stderr)
    return {"indexed": True, "reused": False, "rows": report.rows_written + report.rows_already_stored}


def _ann_fresh(database) -> bool:
    try:
        from indexer.ann import index_status
    except ImportError:
        return True  # no ANN stage to be stale
    return bool(index_status(database).get("fresh"))


def _diagnose(db: Path, notes: list[str], progress: bool) -> dict | None:
    """Fit the diagnosis ensemble unless the stored one is current; returns its quality numbers."""
    try:
        from diagnosis.run import diagnose, load_ensemble
    except ImportError as e:
        _missing(e, "diagnosis (diagnosis.run)", notes)
        return None
    try:
        loaded = load_ensemble(db)
        if loaded.stale is None:
            log.info("the stored diagnosis ensemble is current; not refitting")
            return {**loaded.info, **loaded.info.get("quality", {}), "reused": True}  # quality as diagnose reports it
    except UserError:
        pass  # none yet, or stale: fit it
    return {**diagnose(db, progress=progress).to_dict(), "reused": False}


def _explain(db: Path, world, notes: list[str]) -> tuple[list[dict], dict | None]:
    """(the top modes as dicts, each tied to the planted slice it found; the labelling plan for a
    budget of 5% of the training split, when the world has an unlabeled pool)."""
    try:
        from diagnosis.curate import plan_curation
        from diagnosis.explain import explain_table
    except ImportError as e:
        _missing(e, "failure-mode naming (diagnosis.explain)", notes)
        return [], None
    rows = world.rows().set_index("id")
    failing = [s for s in world.slices if _is_failure(s)]
    explained = explain_table(db, top=TOP_MODES)
    modes = []
    for m in explained[0]:
        d = m.to_dict()
        d["planted"] = _best_slice(m.ids or m.examples, rows, failing)
        modes.append(d)
    plan = None
    if explained[0] and explained[1].pool is not None:
        budget = plan_budget(world)
        plan = plan_curation(db, budget, explained=explained).to_dict()
        for m, d in zip(plan["modes"], modes, strict=False):
            m["planted"] = d["planted"]
    return modes, plan


def plan_budget(world) -> int:
    """The demo's labelling budget: 5% of the training split (issue 24's measure)."""
    return max(1, round(PLAN_SHARE * world.spec["n_train"]))


def _measure_plan(world, plan: dict, seed: int = 0) -> dict:
    """Retrain the world's model on the plan and on a random pool set of the same size (same seed
    and epochs): per planted slice its held-out loss ratio before, after the plan, after random."""
    from indexer.world.retrain import Retrainer

    rt = Retrainer(world)
    add = [i["id"] for i in plan["items"] if i["action"] == "collect"]
    relabel = [i["id"] for i in plan["items"] if i["action"] == "relabel"]
    pool = world.pool_truth()["id"].to_numpy()
    rng = np.random.default_rng(seed)
    random = list(rng.choice(pool, min(len(plan["items"]), len(pool)), replace=False))
    out = {"before": rt.baseline(), "plan": rt.retrain(add=add, relabel=relabel), "random": rt.retrain(add=random)}
    return {k: {"accuracy": o.accuracy, "slices": o.slices} for k, o in out.items()}


def _is_failure(s: dict) -> bool:
    from indexer.world.build import is_failure

    return is_failure(s)


def _best_slice(ids: list[str], rows, slices: list[dict]) -> dict | None:
    """The planted slice a mode found: the one that is most of its samples (``precision``: their
    share in it) or of which it holds most (``recall``: the slice's rows among its samples), when
    either is at least half; only slices that became failures are candidates. "a blue object"
    holds 97% of the blue circles though they are a third of it; a mode of small blue squares on
    stripes holding 1% of the striped triangles found none."""
    ids = [i for i in ids if i in rows.index]
    if not ids or not slices:
        return None
    sub = rows.loc[ids]
    found = []
    for s in slices:
        precision = float(sub[s["column"]].mean())
        recall = float(sub[s["column"]].sum() / max(1, rows[s["column"]].sum()))
        found.append((max(precision, recall), precision + recall, s["name"], precision, recall))
    best, _, name, precision, recall = max(found, key=lambda f: f[:2])
    return {"name": name, "precision": precision, "recall": recall} if best >= 0.5 else None


def run_demo(db: str | os.PathLike | None = None, spec: str | os.PathLike | dict | None = None,
             serve: bool = True, port: int | None = 7860, cache_dir: str | os.PathLike | None = None,
             progress: bool = True, retrain: bool = False) -> dict:
    """Build/reuse the world of ``spec`` (default spec when None), index it into ``db`` (default:
    ``<world>/db``), diagnose, explain, plan the labelling of its unlabeled pool, print a summary on
    stdout, then serve the UI unless ``serve`` is False. With ``retrain``, also retrain the world's
    model on the plan and on a random set of the same size and print what each changed. Returns the
    summary as a dict (``world``, ``db``, ``slices``, ``diagnosis``, ``modes``, ``plan``,
    ``retrained``, ``queries``, ``not_available``, ``seconds``).
    """
    from indexer.world import build_world

    t0 = time.perf_counter()
    world = build_world(spec, cache_dir=cache_dir, progress=progress)
    db_path = Path(db).expanduser().resolve() if db else world.root / "db"
    notes: list[str] = []
    index = _index(world, db_path, notes, progress)
    diag = _diagnose(db_path, notes, progress) if index["indexed"] else None
    modes, plan = _explain(db_path, world, notes) if diag is not None else ([], None)
    retrained = _measure_plan(world, plan) if retrain and plan and plan["items"] else None
    queries = [f'llm2loss search "{s["description"]}" --db {db_path}' for s in world.slices]
    queries += [f'llm2loss explain --db {db_path}']
    if plan:
        queries += [f'llm2loss search "{world.slices[0]["description"]}" --pool --db {db_path}' if world.slices else
                    f'llm2loss search "an object" --pool --db {db_path}',
                    f"llm2loss curate --db {db_path} --budget {plan['budget']} --out plan.csv"]
    queries += [f"llm2loss serve --db {db_path}"]
    summary = {
        "world": str(world.root), "db": str(db_path), "rows": world.quality["rows"],
        "pool_rows": world.quality.get("pool_rows", 0), "index": index,
        "slices": world.slices, "clip": world.quality["clip"], "diagnosis": diag, "modes": modes, "plan": plan,
        "retrained": retrained, "queries": queries, "not_available": notes, "seconds": time.perf_counter() - t0,
    }
    print(format_summary(world, summary))
    sys.stdout.flush()
    if serve:
        try:
            from search_ui.app import serve as serve_app
        except ImportError as e:
            print(f"the web UI (search_ui.app) is not available yet ({e}); stopping after the summary.")
            return summary
        if not index["indexed"]:
            print("nothing to serve: the database could not be built (see above).")
            return summary
        serve_app(db_path, port=port)
    return summary


def format_summary(world, s: dict) -> str:
    """The demo's human-readable summary (several lines)."""
    from indexer.world.build import MIN_LOSS_RATIO

    lines = [f"offline world: {world.root}", world.summary()]
    for sl in world.slices:
        if not _is_failure(sl):
            lines.append(
                f"planted slice '{sl['name']}' did not become a failure: its held-out rows have "
                f"{sl['loss_ratio']['test']:.2f}x the mean held-out loss (a failure needs {MIN_LOSS_RATIO:.0f}x), "
                "so no failure mode is expected to name it."
            )
    lines.append(f"database: {s['db']} ({s['rows']} rows)")
    d = s["diagnosis"]
    if d:
        lines.append(
            "diagnosis ensemble" + (" (reused)" if d.get("reused") else "")
            + f": Spearman {d.get('spearman', float('nan')):.3f}, "
            f"AUROC(top 10% losses) {d.get('auroc_top10', float('nan')):.3f}"
        )
    if s["modes"]:
        lines.append("top failure modes found:")
        for i, m in enumerate(s["modes"], 1):
            p = m.get("planted")
            hit = (f" <- planted '{p['name']}' ({100 * p['precision']:.0f}% of its samples, "
                   f"{100 * p['recall']:.0f}% of the slice's)") if p else ""
            loss = "n/a" if m.get("mean_loss") is None else f"{m['mean_loss']:.3f}"
            pool = f"; {m['pool_rows']} unlabeled pool images show it" if m.get("pool_rows") is not None else ""
            lines.append(f"  {i}. {m['description']!r}: {m['size']} samples, mean loss {loss}{hit}{pool}")
    plan = s.get("plan")
    if plan:
        used = sum(m["chosen"] for m in plan["modes"])
        lines.append(f"labelling plan for a budget of {plan['budget']} items (5% of the training split; "
                     f"{used} used; `llm2loss curate`):")
        for m in plan["modes"]:
            lines.append(f"  {m['number']}. {m['mode']!r}: {m['action']} {m['chosen']} -- {m['reason']}")
        r = s.get("retrained")
        if r:
            lines.append("what one round of the plan changed (the model retrained with the same seed and epochs; "
                         "held-out loss of each planted slice, x the mean held-out loss):")
            for m in plan["modes"]:
                p = m.get("planted")
                if not p:
                    continue
                name = p["name"]
                b, a, x = (r[k]["slices"][name]["ratio"] for k in ("before", "plan", "random"))
                lines.append(f"  {m['mode']!r} ({m['action']}): slice '{name}' {b:.2f}x -> {a:.2f}x "
                             f"(a random set of the same size: {x:.2f}x)")
            lines.append(f"  held-out accuracy {r['before']['accuracy']:.3f} -> {r['plan']['accuracy']:.3f} "
                         f"(random set: {r['random']['accuracy']:.3f})")
        else:
            lines.append("  (`llm2loss demo --retrain` retrains the world's model on this plan and on a random set "
                         "of the same size, and prints what each changed: two trainings, a few minutes)")
    lines.extend(f"not available yet: {n}" for n in s["not_available"])
    lines.append("try:")
    lines.extend(f"  {q}" for q in s["queries"])
    lines.append(f"(demo took {s['seconds']:.1f}s)")
    return "\n".join(lines)
