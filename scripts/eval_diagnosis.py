"""Evaluate `llm2loss explain` on offline worlds with planted slices: the criterion of issue 13.

For each world (the benchmark specs of :func:`indexer.world.benchmark_specs`, or JSON spec paths):
build it (cached), index it with its tiny CLIP, run ``diagnose``, run ``explain`` and judge its top
N modes, N = max(3, planted slices with at least 2x the mean held-out loss), by their **names only**
(each name's attribute words form a conjunction C: "a blue object" -> {color: blue}):

1. every such slice is named among the top N by a C nested with the slice's attributes (C within
   the slice's, or the slice's within C) whose held-out rows have at least 2x the mean loss;
2. every top-N name is a true failure: held-out rows matching C have at least 2x the mean loss,
   and the mode has at least 20 samples;
3. no two top-N modes share more than half of their members (overlap coefficient);
4. kept: test AUROC (top-10% losses) >= 0.85 and search p@10 >= 0.8 for each such slice's phrase.

``--baseline DIR`` also runs the ``explain`` of another checkout of the project (e.g. the code before
this change, unpacked with ``git archive``) on the same database, in a subprocess, and judges its
top N the same way, printed beside. ``--worlds-built FILE`` takes already-built databases from lines
``<spec name> <db path>`` instead of building them.

``--random N --seed S`` evaluates N worlds nobody designed instead, drawn by
:func:`indexer.world.spec.random_spec` (``random-S-0`` ... ``random-S-<N-1>``: task among the four
attributes, 2-5 slices of random kinds on two or three attributes, strengths from the ranges that
made the benchmark slices fail, no two slices claiming the same rows; 8,000 training, 4,000
held-out and 500 pool rows; the shared CLIP); ``--list`` prints the drawn specs and stops.
``--shared-clip`` builds any spec with the shared tiny CLIP (``"clip": {"shared": true}``: trained
once on uniform images for all worlds, not once per world), said in the output. Each result records
its world's spec, build seconds and the code's commit; a planted failure that is not named gets a
``why`` from a longer ``explain`` list (named below the top N, a hidden mode's reason, or the mode
that holds most of its rows).

Usage: ``PYTHONPATH=. nice -n 10 python scripts/eval_diagnosis.py [--specs default,color-task] [--baseline DIR]
[--random 12 --seed 26] [--shared-clip] [--out F.json]`` (``PYTHONPATH=.``: this checkout's code, not an
installed one's)

The four specs written after the method settled and never tuned on (BENCHMARKS.md, issue 13) are
in ``scripts/worlds/``: ``--specs scripts/worlds/unseen-a.json,scripts/worlds/unseen-b.json,...``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from eval_common import ensure_db, parser, run

from diagnosis.explain import explain
from diagnosis.metrics import quality
from diagnosis.run import read_training_data
from diagnosis.text import Scorer
from indexer.store import Database
from indexer.world import benchmark_specs
from indexer.world.generate import BG_WORDS
from indexer.world.spec import ATTRIBUTES, random_spec
from search_ui.engine import QueryEngine

log = logging.getLogger("eval_diagnosis")

#: The same worlds as scripts/eval_world.py, so one cached build serves both scripts.
SPECS = benchmark_specs()

#: ``--small``: the sizes of the demo's quick world (4,500 rows), for a shared 2-core machine.
SMALL = {"n_train": 3000, "n_test": 1500, "image_size": 48, "clip": {"steps": 150, "batch_size": 128, "n_images": 3000},
         "blackbox": {"epochs": 4, "batch_size": 128, "width": 24}}
RATIO, MIN_SAMPLES, AUROC_MIN, P10_MIN = 2.0, 20, 0.85, 0.8


def conjunction(name: str) -> dict | None:
    """The attribute values a name's words say: "a small star on a striped background" ->
    {size: small, shape: star, background: striped}; None when it says two values of one attribute
    or none at all (then it names no group of rows)."""
    words = set(re.findall(r"[a-z]+", name.lower()))
    out = {}
    for attr, values in ATTRIBUTES.items():
        said = [v for v in values if v in words or (attr == "background" and set(BG_WORDS[v]) & words
                                                   and "background" in words)]
        if len(said) > 1:
            return None
        if said:
            out[attr] = said[0]
    return out or None


def nested(c: dict, where: dict) -> bool:
    a, b = set(c.items()), set(where.items())
    return a <= b or b <= a


def judge(modes: list[dict], rows, loss, is_test, slices, n_top: int) -> dict:
    """The criterion's points 1-3 for a list of modes ({description, ids}) judged by name only."""
    test_rows = rows[is_test]
    mean = float(loss[is_test].mean())

    def ratio(c):
        if not c:
            return None
        m = np.all([test_rows[a].to_numpy() == v for a, v in c.items()], axis=0)
        return float(loss[is_test][m].mean() / mean) if m.any() else None

    top = modes[:n_top]
    table = []
    for m in top:
        c = conjunction(m["description"])
        table.append({"name": m["description"], "conjunction": c, "ratio": ratio(c), "size": len(m["ids"]),
                      "true_failure": (ratio(c) or 0) >= RATIO and len(m["ids"]) >= MIN_SAMPLES})
    named = {}
    for s in slices:
        hit = next((t["name"] for t in table if t["conjunction"] and nested(t["conjunction"], s["where"])
                    and (t["ratio"] or 0) >= RATIO), None)
        named[s["slice"]] = hit
    overlaps = [(a["description"], b["description"],
                 len(set(a["ids"]) & set(b["ids"])) / max(1, min(len(a["ids"]), len(b["ids"]))))
                for i, a in enumerate(top) for b in top[i + 1 :]]
    return {"top": table, "named": named,
            "c1_every_slice_named": all(v is not None for v in named.values()),
            # no name at all is right only where no planted slice failed (a random world may have none)
            "c2_every_name_a_true_failure": all(t["true_failure"] for t in table) and (len(table) > 0 or not slices),
            "c3_max_member_overlap": max((o for *_, o in overlaps), default=0.0),
            "c3_no_shared_majority": all(o <= 0.5 for *_, o in overlaps)}


def why_missed(s: dict, modes: list, n_top: int, rows, loss, is_test, world) -> str:
    """Why planted failure ``s`` got no top-N name, from a longer ``explain`` list (``show_all``):
    a nested true name shown below the top N, a nested name hidden (its reason), and the mode that
    holds the most of the slice's rows (its name, the held-out loss ratio of its words)."""
    if not modes:
        return "explain shows no mode at all, even with show_all"
    col = next(w["column"] for w in world.slices if w["name"] == s["slice"])
    member = set(rows.index[rows[col].to_numpy(bool)])
    mean = float(loss[is_test].mean())
    test_rows = rows[is_test]

    def ratio(c):
        m = np.all([test_rows[a].to_numpy() == v for a, v in c.items()], axis=0)
        return float(loss[is_test][m].mean() / mean) if m.any() else float("nan")

    parts = []
    for rank, m in enumerate(modes, 1):
        c = conjunction(m.description)
        if not c or not nested(c, s["where"]):
            continue
        if m.shown and rank > n_top and ratio(c) >= RATIO:
            parts.append(f"named at rank {rank} (below the top {n_top}): '{m.description}' ({ratio(c):.2f}x)")
            break
        if not m.shown:
            parts.append(f"'{m.description}' hidden: {m.evidence.get('reason', 'evidence did not hold')}")
            break
    holder = max(modes, key=lambda m: len(member & set(m.ids)), default=None)
    if holder is not None and member & set(holder.ids):
        c = conjunction(holder.description)
        got = len(member & set(holder.ids))
        parts.append(f"most of its rows ({got} of {len(member)}) are in '{holder.description}' "
                     f"(rank {modes.index(holder) + 1}{'' if holder.shown else ', hidden'}; its words "
                     + (f"{ratio(c):.2f}x" if c else "name no group") + f"; {got / max(1, len(holder.ids)):.0%} "
                     "of its members are the slice's)")
    else:
        parts.append("no mode holds its rows")
    return "; ".join(parts)


@functools.cache
def code_version() -> dict:
    """The commit of this checkout and whether its ``diagnosis/`` differs from that commit, read once
    (at the first world: the code this process runs, though commits may follow while it runs)."""
    root = Path(__file__).resolve().parents[1]

    def git(*a):
        r = subprocess.run(["git", *a], cwd=root, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "diagnosis_changed": bool(git("status", "--porcelain", "--", "diagnosis"))}


def baseline_db(checkout: Path, db: Path, work: Path) -> Path:
    """The database as ``checkout`` reads it: code from before the skops format reads its ensemble
    from ``diagnosis/ensemble.joblib``, so it gets a copy under ``work`` holding one, written here
    from the skops file by this checkout's own loader (the user's folder is never touched)."""
    import shutil

    import joblib

    from diagnosis.ensemble import load_ensemble_file

    if "ensemble.joblib" not in (checkout / "diagnosis" / "run.py").read_text():
        return db
    copy = work / "baseline" / f"{db.parent.name}-{db.name}"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(db, copy, symlinks=True)
    joblib.dump(load_ensemble_file(copy / "diagnosis" / "ensemble.skops"), copy / "diagnosis" / "ensemble.joblib")
    return copy


def baseline_modes(checkout: Path, db: Path, top: int) -> list[dict]:
    """The top modes of another checkout's ``explain`` (descriptions and member ids), run in a subprocess."""
    code = ("import json,sys; from diagnosis.explain import explain; "
            f"ms = explain({str(db)!r}, top={int(top)}); "
            "json.dump([{'description': m.description, 'ids': list(m.ids or m.examples)} for m in ms], sys.stdout)")
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def search_p10(engine, phrase: str, ids, hit, k=10) -> float:
    """precision@10 of the product's search (``QueryEngine.search``, default ranking) for ``phrase``:
    the share of its results that are ``hit`` (rows are addressed by ``ids``' positions)."""
    pos = {i: j for j, i in enumerate(ids)}
    return float(np.mean([hit[pos[r.id]] for r in engine.search(phrase, k=k)]))


def search_p10_fixed_pool(X, q, pred, hit, k=10, weight=0.5, n=100) -> float:
    """The same, ranked the way search did before issue 13 (for the side-by-side table): z-scores
    over a fixed pool of the ``n`` most similar rows, exact similarities."""
    from search_ui.ranking import zscore

    sims = X @ q
    pool = np.argpartition(-sims, n)[:n]
    score = (1 - weight) * zscore(sims[pool]) + weight * zscore(pred[pool])
    order = pool[np.lexsort((-sims[pool], -score))][:k]
    return float(hit[order].mean())


def evaluate(name: str, spec, work: Path, progress: bool, baseline: Path | None = None,
             built: dict | None = None) -> dict:
    from indexer.world import build_world
    from indexer.world.vocab import describe

    t0 = time.perf_counter()
    world = build_world(spec, progress=progress)
    db = Database(built[name]) if built and name in built else ensure_db(world, work, progress)
    import pandas as pd

    ids, X, loss, split = read_training_data(db, progress=False)
    is_test = split == "test"
    # the unlabeled pool: no loss in the table; its truth (kept aside by the world) says which pool
    # images a search result really fails on
    truth = world.pool_truth().set_index("id")
    rows = pd.concat([world.rows().set_index("id"), truth]).loc[ids]
    true_loss = np.where(split == "pool", rows["loss"].to_numpy(np.float64), loss)
    stored = db.read(["id", "predicted_loss"]).to_pandas().set_index("id").loc[ids]
    pred = stored["predicted_loss"].to_numpy(np.float64)
    q = quality(loss[is_test], pred[is_test])
    scorer = Scorer(db)
    engine = QueryEngine(db)
    mean = float(loss[is_test].mean())
    p90 = float(np.nanquantile(loss, 0.9))
    slices = []
    for s in world.slices:
        member = rows[s["column"]].to_numpy(bool)
        ratio = float(loss[member & is_test].mean() / mean) if (member & is_test).any() else 0.0
        entry = {"slice": s["name"], "kind": s["kind"], "where": s["where"], "loss_ratio": round(ratio, 2),
                 "eligible": ratio >= RATIO}
        if entry["eligible"]:
            phrase = describe(s["where"])
            qv = scorer.encode_text([phrase])[0]
            hit = member & (true_loss > p90)
            entry.update(description=phrase, p10=search_p10(engine, phrase, ids, hit),
                         p10_fixed_pool=search_p10_fixed_pool(X, qv, pred, hit))
        slices.append(entry)
    eligible = [s for s in slices if s["eligible"]]
    n_top = max(3, len(eligible))
    t1 = time.perf_counter()
    new = [{"description": m.description, "ids": m.ids} for m in explain(db, top=n_top)]
    explain_s = time.perf_counter() - t1
    out = {"world": name, "hash": world.hash, "rows": len(ids), "test_rows": int(is_test.sum()), "N": n_top,
           "task": world.spec["task"], "shared_clip": bool(world.spec["clip"].get("shared")), "spec": world.spec,
           "build_seconds": world.quality.get("seconds"), "code": code_version(),
           "slices": slices, "auroc_top10": q["auroc_top10"], "spearman": q["spearman"],
           "c4_auroc": q["auroc_top10"] >= AUROC_MIN, "c4_p10": all(s["p10"] >= P10_MIN for s in eligible),
           "new": judge(new, rows, loss, is_test, eligible, n_top), "explain_seconds": round(explain_s, 1)}
    missed = [s for s in eligible if out["new"]["named"][s["slice"]] is None]
    if missed:
        longer = explain(db, top=n_top + 7, show_all=True)
        out["new"]["why"] = {s["slice"]: why_missed(s, longer, n_top, rows, loss, is_test, world) for s in missed}
    if baseline is not None:
        old_db = baseline_db(baseline, Path(db.path), work)
        out["old"] = judge(baseline_modes(baseline, old_db, n_top), rows, loss, is_test, eligible, n_top)
    out["resolved"] = bool(out["new"]["c1_every_slice_named"] and out["new"]["c2_every_name_a_true_failure"]
                           and out["new"]["c3_no_shared_majority"] and out["c4_auroc"] and out["c4_p10"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _cell(t: dict | None) -> str:
    if t is None:
        return "-"
    ratio = "no conjunction" if t["ratio"] is None else f"{t['ratio']:.2f}x"
    return f"{t['name']} ({ratio}, {t['size']})"


def markdown(results: list[dict]) -> str:
    out = []
    for r in results:
        def scored(s):
            return (f", p@10 {s['p10']:.1f}, fixed pool of 100 {s['p10_fixed_pool']:.1f})" if s["eligible"]
                    else ", below 2x: not scored)")

        sl = "; ".join(f"{s['slice']} ({s['kind']} on {'+'.join(s['where'])}, {s['loss_ratio']}x" + scored(s)
                       for s in r["slices"])
        clip = "; shared CLIP" if r.get("shared_clip") else ""
        out += [f"**{r['world']}** ({r['rows']} rows, {r['test_rows']} held out; task {r.get('task')}{clip}; "
                f"N = {r['N']}; slices: {sl}; test AUROC {r['auroc_top10']:.3f}; explain {r['explain_seconds']} s)", ""]
        has_old = "old" in r
        out.append("| # | new: name (held-out loss ratio of its words, members) |"
                   + (" old: name (ratio, members) |" if has_old else ""))
        out.append("|---|---|" + ("---|" if has_old else ""))
        for i in range(r["N"]):
            new = r["new"]["top"][i] if i < len(r["new"]["top"]) else None
            row = f"| {i + 1} | {_cell(new)} |"
            if has_old:
                old = r["old"]["top"][i] if i < len(r["old"]["top"]) else None
                row += f" {_cell(old)} |"
            out.append(row)
        for key, label in (("new", "new"), ("old", "old")):
            if key not in r:
                continue
            j = r[key]
            out.append(f"| {label}: 1. slices named | {sum(v is not None for v in j['named'].values())}/{len(j['named'])} "
                       f"| 2. true failures {sum(t['true_failure'] for t in j['top'])}/{len(j['top'])}; "
                       f"3. max member overlap {j['c3_max_member_overlap']:.2f} |" + (" |" if has_old else ""))
        for sname, why in r["new"].get("why", {}).items():
            out.append(f"| missed: {sname} | {why} |" + (" |" if has_old else ""))
        out += ["", f"criterion met: **{'yes' if r['resolved'] else 'no'}** "
                f"(1 {r['new']['c1_every_slice_named']}, 2 {r['new']['c2_every_name_a_true_failure']}, "
                f"3 {r['new']['c3_no_shared_majority']}, 4 AUROC {r['c4_auroc']} p@10 {r['c4_p10']})", ""]
    return "\n".join(out + summary_table(results))


def summary_table(results: list[dict]) -> list[str]:
    """One line per world: its planted failures (>= 2x held out), which the top N named, the misses
    and why, how many top-N names are true failures, and whether the criterion is met."""
    out = ["| world | task | planted failures (>= 2x held out) | named in the top N | missed (why) | "
           "top-N names true | AUROC | criterion |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        j = r["new"]
        fails = [s for s in r["slices"] if s["eligible"]]
        named = [f"{k} -> '{v}'" for k, v in j["named"].items() if v is not None]
        missed = [f"{k} ({j.get('why', {}).get(k, '')})" for k, v in j["named"].items() if v is None]
        out.append(f"| {r['world']} | {r.get('task', '')} | {len(fails)} of {len(r['slices'])}: "
                   + (", ".join(f"{s['slice']} {s['loss_ratio']}x" for s in fails) or "none")
                   + f" | {'; '.join(named) or '-'} | {'; '.join(missed) or '-'} | "
                   f"{sum(t['true_failure'] for t in j['top'])}/{len(j['top'])} | {r['auroc_top10']:.3f} | "
                   f"{'met' if r['resolved'] else 'not met'} |")
    n = len(results)
    every = sum(r["new"]["c1_every_slice_named"] for r in results)
    true = sum(all(t["true_failure"] for t in r["new"]["top"]) for r in results)
    out += ["", f"Every planted failure named in the top N on {every} of {n} worlds; every top-N name a true "
            f"failure on {true} of {n}; the criterion met on {sum(r['resolved'] for r in results)} of {n}."]
    return out


def main(argv=None) -> int:
    ap = parser(__doc__, SPECS)
    ap.add_argument("--small", action="store_true", help="build the named worlds at the demo's quick size")
    ap.add_argument("--baseline", default=None, help="another checkout whose explain is judged beside")
    ap.add_argument("--worlds-built", default=None, help="file of '<spec name> <db path>' lines to use")
    ap.add_argument("--random", type=int, default=0, metavar="N",
                    help="evaluate N random worlds (random-SEED-0 ...) instead of the benchmark specs")
    ap.add_argument("--seed", type=int, default=26, help="the seed of --random's draw (default 26)")
    ap.add_argument("--list", action="store_true", help="print the worlds' specs (JSON, one a line) and stop")
    ap.add_argument("--shared-clip", action="store_true",
                    help="build every world with the shared tiny CLIP (trained once, not once per world)")
    ap.add_argument("--report", default=None, metavar="FILE.json",
                    help="print the tables of a saved --out file (re-judged by this code) and stop")
    args = ap.parse_args(argv)
    if args.report:
        print(markdown([rejudge(r) for r in json.loads(Path(args.report).read_text())]))
        return 0
    specs = dict(SPECS)
    if args.random:
        drawn = {f"random-{args.seed}-{i}": random_spec(args.seed, i) for i in range(args.random)}
        specs.update(drawn)
        if not args.specs:
            args.specs = ",".join(drawn)
    if args.list:
        for name in args.specs.split(",") if args.specs else list(specs):
            print(json.dumps({"world": name, "spec": with_shared_clip(specs.get(name, name), args.shared_clip)}))
        return 0
    built = {}
    if args.worlds_built:
        for line in Path(args.worlds_built).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and (Path(parts[1]) / "meta.json").exists():  # an indexed database
                built[parts[0]] = parts[1]

    def one(name, spec):
        spec = with_shared_clip(spec, args.shared_clip)
        if args.small:
            spec = {**spec, **SMALL, "clip": {**SMALL["clip"], **({"shared": True} if args.shared_clip else {})}}
        return evaluate(name, spec, Path(args.work), not args.quiet, Path(args.baseline) if args.baseline else None,
                        built)

    return run(args, specs, one, markdown)


def rejudge(r: dict) -> dict:
    """A saved result with points 2 and the verdict recomputed from its top names (the rule as now)."""
    for key in ("new", "old"):
        if key in r:
            j = r[key]
            j["c2_every_name_a_true_failure"] = all(t["true_failure"] for t in j["top"]) and (
                len(j["top"]) > 0 or not j["named"])
    n = r["new"]
    r["resolved"] = bool(n["c1_every_slice_named"] and n["c2_every_name_a_true_failure"]
                         and n["c3_no_shared_majority"] and r["c4_auroc"] and r["c4_p10"])
    return r


def with_shared_clip(spec, shared: bool):
    """``spec`` (a dict or a JSON path), with ``"clip": {"shared": true}`` when ``shared``."""
    if not shared:
        return spec
    if not isinstance(spec, dict):
        from indexer.world.spec import load_spec

        spec = load_spec(spec)
    return {**spec, "clip": {**spec.get("clip", {}), "shared": True}}


if __name__ == "__main__":
    sys.exit(main())
