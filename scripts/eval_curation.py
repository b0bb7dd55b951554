"""Does a curated set fix the failure? The criterion of issue 24, measured by retraining.

For each world (the benchmark specs of :func:`indexer.world.benchmark_specs`, or JSON spec paths):
build it (cached), index and diagnose it (``eval_common.ensure_db``), make llm2loss's labelling
plan with a budget of K = 5% of the training split (``diagnosis.curate.plan_curation``), and do
what a team would do with it: a simulated labeller returns the true labels of the collected pool
images and corrects the relabelled rows; the black box is retrained with the same seed and epochs
on the corrected training split plus the collected images (``indexer.world.retrain``). Beside it,
with the same K and seed:

(a) K random pool images;
(b) the K pool images of highest predicted loss, without language or modes;
(c) an oracle: K split equally over the failing slices, each spending its part on its own
    corrupted training rows (relabelled) and then its own pool rows (collected).

Printed per world: each mode of the plan, its action, the slice it names, and the held-out loss
ratio (slice mean / mean test loss of the same model) before and after for the plan, (a), (b) and
(c); the confusion table of slice kind vs action; the criterion:

1. every failing slice (>= 2x before): the plan cuts its held-out mean loss by at least half, and
   (ratio after plan - 1) <= 0.5 x (ratio after (a) - 1);
2. the plan beats (b) on the median slice (its median ratio over failing slices is lower);
3. most noisy_label slices get `relabel`, most rare and correlation slices `collect`;
4. held-out accuracy after the plan >= after (a).

Usage: ``nice python scripts/eval_curation.py [--specs default,shape-seed2,path.json] [--out F.json]``
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
from eval_common import ensure_db, mode_slice, parser, run

from diagnosis.curate import plan_curation
from indexer.world import benchmark_specs, build_world
from indexer.world.build import is_failure
from indexer.world.retrain import Retrainer

log = logging.getLogger("eval_curation")

SPECS = benchmark_specs()
BUDGET_SHARE = 0.05
ARMS = ("plan", "random", "top_predicted", "oracle")


def oracle_arm(world, budget: int, failing: list[dict], rng) -> tuple[list[str], list[str]]:
    """(pool ids to add, training ids to relabel): K split equally over the failing slices, each
    part spent on the slice's corrupted training rows first, then its pool rows; what a slice cannot
    use goes to the others."""
    rows = world.rows()
    train = rows[rows["split"] == "train"]
    truth = world.pool_truth()
    queues = []
    for s in failing:
        wrong = train.loc[train[s["column"]] & train["label_corrupted"], "id"].tolist()
        pool = truth.loc[truth[s["column"]].astype(bool), "id"].tolist()
        rng.shuffle(wrong), rng.shuffle(pool)
        queues.append([("relabel", i) for i in wrong] + [("add", i) for i in pool])
    taken: list[tuple[str, str]] = []
    left = budget
    while left > 0 and any(queues):
        open_q = [q for q in queues if q]
        share = max(1, left // len(open_q))
        for q in open_q:
            n = min(share, len(q), left)
            taken += q[:n]
            del q[:n]
            left -= n
    return [i for k, i in taken if k == "add"], [i for k, i in taken if k == "relabel"]


def evaluate(name: str, spec, work: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    world = build_world(spec, progress=progress)
    db = ensure_db(world, work, progress)
    budget = round(BUDGET_SHARE * world.spec["n_train"])
    failing = [s for s in world.slices if is_failure(s)]
    rng = np.random.default_rng(world.spec["seed"])

    t = time.perf_counter()
    plan = plan_curation(db, budget)
    plan_s = time.perf_counter() - t
    truth = world.pool_truth()
    pool_ids = truth["id"].tolist()
    stored = db.read(["id", "predicted_loss", "split"]).to_pandas()
    pool_pred = stored[stored["split"] == "pool"].sort_values("predicted_loss", ascending=False, kind="stable")
    arms = {
        "plan": ([i["id"] for i in plan.items if i["action"] == "collect"],
                 [i["id"] for i in plan.items if i["action"] == "relabel"]),
        "random": (list(rng.choice(pool_ids, min(budget, len(pool_ids)), replace=False)), []),
        "top_predicted": (pool_pred["id"].head(budget).tolist(), []),
        "oracle": oracle_arm(world, budget, failing, rng),
    }
    rt = Retrainer(world, progress=progress)
    outcomes = {"before": rt.baseline()}
    for arm, (add, relabel) in arms.items():
        t = time.perf_counter()
        outcomes[arm] = rt.retrain(add=add, relabel=relabel)
        log.info("%s / %s: retrained on %d rows (+%d, %d relabelled) in %.0fs", name, arm, outcomes[arm].train_rows,
                 len(add), len(relabel), time.perf_counter() - t)

    rows = world.rows().set_index("id")
    modes = []
    for m in plan.modes:
        hit = mode_slice(m.members, rows, failing)
        kind = next((s["kind"] for s in failing if hit and s["name"] == hit["name"]), None)
        modes.append({"mode": m.mode, "action": m.action, "budget": m.budget, "chosen": m.chosen,
                      "slice": hit["name"] if hit else None, "kind": kind, "reason": m.reason,
                      "figures": m.figures})
    slices = []
    for s in failing:
        r = {a: outcomes[a].slices[s["name"]] for a in outcomes}
        before, after, rand = r["before"], r["plan"], r["random"]
        action = next((m["action"] for m in modes if m["slice"] == s["name"]), None)
        slices.append({
            "slice": s["name"], "kind": s["kind"], "action": action,
            "ratio": {a: round(v["ratio"], 3) for a, v in r.items()},
            "mean_loss": {a: round(v["mean_loss"], 4) for a, v in r.items()},
            "cut": round(1 - after["mean_loss"] / before["mean_loss"], 3),
            "halved": after["mean_loss"] <= 0.5 * before["mean_loss"],
            "half_random_excess": (after["ratio"] - 1) <= 0.5 * (rand["ratio"] - 1),
        })
    med = {a: float(np.median([s["ratio"][a] for s in slices])) if slices else float("nan") for a in ARMS}
    confusion: dict[str, dict[str, int]] = {}
    for s in slices:
        row = confusion.setdefault(s["kind"], {})
        row[s["action"] or "not named"] = row.get(s["action"] or "not named", 0) + 1
    right = {"noisy_label": "relabel", "rare": "collect", "correlation": "collect"}
    kinds_ok = all(c.get(right[k], 0) > sum(c.values()) / 2 for k, c in confusion.items())
    out = {
        "world": name, "hash": world.hash, "budget": budget, "train_rows": world.spec["n_train"],
        "pool_rows": len(pool_ids), "plan_seconds": round(plan_s, 1), "modes": modes, "slices": slices,
        "accuracy": {a: round(o.accuracy, 4) for a, o in outcomes.items()},
        "mean_loss": {a: round(o.mean_loss, 4) for a, o in outcomes.items()},
        "median_ratio": {a: round(v, 3) for a, v in med.items()}, "confusion": confusion,
        "arms": {a: {"added": o.added, "relabelled": o.relabelled, "relabel_fixed": o.relabel_fixed}
                 for a, o in outcomes.items() if a != "before"},
    }
    out["criterion"] = {
        "1_halved_and_half_random_excess": all(s["halved"] and s["half_random_excess"] for s in slices),
        "2_beats_top_predicted_on_median": bool(med["plan"] < med["top_predicted"]) if slices else True,
        "3_actions_by_kind": kinds_ok,
        "4_accuracy_not_below_random": outcomes["plan"].accuracy >= outcomes["random"].accuracy,
    }
    out["met"] = all(out["criterion"].values())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(results: list[dict]) -> str:
    out = []
    for r in results:
        out += [f"**{r['world']}** (K = {r['budget']} of {r['train_rows']} training rows; pool {r['pool_rows']}; "
                f"plan made in {r['plan_seconds']} s)", ""]
        out.append("| mode | action (items) | slice it names |")
        out.append("|---|---|---|")
        for m in r["modes"]:
            out.append(f"| {m['mode']} | {m['action']} ({m['chosen']}) | {m['slice'] or '-'} |")
        out += ["", "| failing slice | kind | action | held-out loss ratio before | after plan | (a) random | "
                "(b) top predicted | (c) oracle | plan cut | criterion 1 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in r["slices"]:
            x = s["ratio"]
            out.append(f"| {s['slice']} | {s['kind']} | {s['action'] or 'not named'} | {x['before']:.2f}x | "
                       f"{x['plan']:.2f}x | {x['random']:.2f}x | {x['top_predicted']:.2f}x | {x['oracle']:.2f}x | "
                       f"{100 * s['cut']:.0f}% | {'met' if s['halved'] and s['half_random_excess'] else 'missed'} |")
        acc = r["accuracy"]
        out += ["", f"held-out accuracy: before {acc['before']:.3f}, plan {acc['plan']:.3f}, random {acc['random']:.3f}, "
                f"top predicted {acc['top_predicted']:.3f}, oracle {acc['oracle']:.3f}; median slice ratio: plan "
                f"{r['median_ratio']['plan']:.2f}x, top predicted {r['median_ratio']['top_predicted']:.2f}x",
                "kind vs action: " + "; ".join(f"{k}: " + ", ".join(f"{a} {n}" for a, n in c.items())
                                              for k, c in r["confusion"].items()),
                f"criterion met: **{'yes' if r['met'] else 'no'}** ({', '.join(f'{k} {v}' for k, v in r['criterion'].items())})",
                ""]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parser(__doc__, SPECS).parse_args(argv)
    return run(args, SPECS, lambda name, spec: evaluate(name, spec, Path(args.work), not args.quiet), markdown)


if __name__ == "__main__":
    sys.exit(main())
