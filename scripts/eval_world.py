"""Build full-size offline worlds and record their quality numbers in BENCHMARKS.md ("Offline world").

For the default spec it times ``llm2loss demo --no-serve`` twice in a fresh cache (first run from
scratch, second run reusing everything); for the other specs it builds the world alone. Printed and
recorded per world: tiny-CLIP zero-shot accuracy per attribute, the training steps its stopping
rule used, text->image recall@10 on the held-out split, phrase precision@100 over the vocabulary
(mean, min, worst 5), the black-box CNN's accuracy, and each planted slice's mean loss / world mean
and whether it became a failure.

    nice -n 10 .venv/bin/python scripts/eval_world.py [--cache-dir DIR] [--only default] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from indexer.world import ATTRIBUTES, benchmark_specs, build_world  # noqa: E402
from indexer.world.build import is_failure  # noqa: E402

SPECS = benchmark_specs()


def time_demo(cache: Path, log_dir: Path) -> list[dict]:
    """Run ``llm2loss demo --no-serve`` twice in ``cache``; wall and CPU seconds of each run."""
    env = {**os.environ, "LLM2LOSS_CACHE": str(cache)}
    runs = []
    for i in (1, 2):
        before = os.times()
        t = time.perf_counter()
        with open(log_dir / f"demo_run{i}.out", "w") as out, open(log_dir / f"demo_run{i}.err", "w") as err:
            rc = subprocess.run([sys.executable, "-m", "search_ui.cli", "demo", "--no-serve"], env=env,
                                stdout=out, stderr=err, cwd=ROOT).returncode
        after = os.times()
        runs.append({"run": i, "rc": rc, "wall_s": time.perf_counter() - t,
                     "cpu_s": (after.children_user + after.children_system)
                     - (before.children_user + before.children_system)})
        print(f"demo run {i}: exit {rc}, {runs[-1]['wall_s']:.1f}s wall, {runs[-1]['cpu_s']:.1f}s CPU", flush=True)
    return runs


def world_row(name: str, w) -> dict:
    q = w.quality
    c = q["clip"]
    pp = c["phrase_precision"]
    return {"name": name, "task": w.spec["task"], "seed": w.spec["seed"], "rows": q["rows"],
            "zero_shot": c["zero_shot"], "partial_zero_shot": c["partial_zero_shot"],
            "recall_at_10": c["recall_at_10"],
            "training": {k: c["training"][k] for k in ("steps", "cap", "target", "stopped")},
            "precision": {"k": pp["k"], "mean": pp["mean"], "min": pp["min"], "worst": pp["worst"],
                          "phrases": len(pp["per_phrase"])},
            "cnn_acc": q["blackbox"]["accuracy"], "seconds": q["seconds"],
            "slices": [{"name": s["name"], "kind": s["kind"], "where": s["where"], "planted": s["planted"],
                        "ratio": s["loss_ratio"], "failure": is_failure(s)} for s in w.slices]}


MACHINE = "2-core CPU, 24 GiB, no GPU"


def markdown(rows: list[dict], demo: list[dict] | None, demo_summary: str, machine: str = MACHINE,
             notes: list[str] = ()) -> str:
    today = datetime.date.today().isoformat()
    out = [
        "## Offline world",
        "",
        f"Machine: {machine}; {today}. "
        "Produced by `scripts/eval_world.py`. Quality is measured on the "
        "held-out test split (drawn uniformly, no planting). Zero-shot: the attribute read off the "
        "best-matching full caption among all 240 attribute combinations / off the best single-attribute "
        "prompt (\"a star\", \"a blue object\", ...). CLIP steps: steps trained until every zero-shot "
        "accuracy on 600 other held-out images was >= the target (0.95) and every phrase's precision@100 "
        "on the world's images >= the phrase target (0.9), checked every 25 steps, or the cap. Recall@10: per attribute "
        "combination, the canonical caption's top-10 retrieved test images, share of min(10, matching) "
        "that match all four attributes. Phrase precision@100: for every vocabulary phrase (single "
        "attribute values, pairs, the slices' descriptions), the share of its 100 nearest images "
        "(text->image, the whole world) whose attributes match the phrase. Loss ratio: the slice's mean "
        "black-box loss / the world's mean loss (all rows; train and test in brackets); a slice is a "
        "failure when its test ratio is >= 2x.",
        "",
        "| world | task | seed | rows | zero-shot full / one-attribute: shape, color, size, background | "
        "CLIP steps (cap) | recall@10 | phrase p@100 mean / min | CNN acc train / test | build s (CLIP, CNN) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        zs = ", ".join(f"{r['zero_shot'][a]:.3f} / {r['partial_zero_shot'][a]:.3f}" for a in ATTRIBUTES)
        s, tr, pp = r["seconds"], r["training"], r["precision"]
        steps = f"{tr['steps']} ({tr['cap']}{', target not reached' if tr['stopped'] != 'target' else ''})"
        out.append(f"| {r['name']} | {r['task']} | {r['seed']} | {r['rows']} | {zs} | {steps} | "
                   f"{r['recall_at_10']:.3f} | {pp['mean']:.3f} / {pp['min']:.3f} | "
                   f"{r['cnn_acc']['train']:.3f} / {r['cnn_acc']['test']:.3f} | "
                   f"{s['total']:.0f} ({s['clip']:.0f}, {s['blackbox']:.0f}) |")
    out += ["", "Lowest phrase precision@100 per world:", ""]
    for r in rows:
        worst = ", ".join(f"\"{p}\" {v:.2f}" for p, v in r["precision"]["worst"])
        out.append(f"- {r['name']} ({r['precision']['phrases']} phrases): {worst}")
    out += ["", "| world | slice | kind | attributes | planted in train | loss ratio all (train, test) | failure? |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        for sl in r["slices"]:
            p = {k: round(v, 4) for k, v in sl["planted"].items() if k in ("rate", "strength", "noise")}
            ratio = sl["ratio"]
            where = ", ".join(f"{a}={v}" for a, v in sl["where"].items())
            out.append(f"| {r['name']} | {sl['name']} | {sl['kind']} | {where} | {p} | "
                       f"{ratio['all']:.2f}x ({ratio['train']:.2f}x, {ratio['test']:.2f}x) | "
                       f"{'yes' if sl['failure'] else '**no** (test < 2x)'} |")
    if demo:
        out += ["", "`llm2loss demo --no-serve` in a fresh cache (default spec):", ""]
        for d in demo:
            label = "first run (from scratch)" if d["run"] == 1 else "second run (cache reused)"
            out.append(f"- {label}: {d['wall_s']:.1f} s wall, {d['cpu_s']:.1f} s CPU, exit {d['rc']}")
        if demo_summary:
            out += ["", "Its summary (first run):", "", "```", demo_summary.strip(), "```"]
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def record(section: str, path: Path) -> None:
    """Replace this section of BENCHMARKS.md (other sections untouched), re-reading the file first."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Offline world\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help="where worlds are built (default: a fresh temp folder)")
    ap.add_argument("--only", action="append", choices=list(SPECS), help="specs to build (default: all)")
    ap.add_argument("--no-demo", action="store_true", help="build the default world without timing the demo")
    ap.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="build nothing: write the section from eval_world.json files of earlier runs")
    ap.add_argument("--machine", default=MACHINE, help="machine description for the record")
    ap.add_argument("--note", action="append", default=[], help="a finding to add under the tables (repeatable)")
    args = ap.parse_args()
    if args.merge:
        rows, demo = [], None
        for f in args.merge:
            d = json.loads(Path(f).read_text())
            rows += d["worlds"]
            demo = demo or d.get("demo")
        section = markdown(rows, demo, "", args.machine, args.note)
        print(section)
        if not args.no_record:
            record(section, ROOT / "BENCHMARKS.md")
        return
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="llm2loss-eval-"))
    log_dir = cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows, demo, demo_summary = [], None, ""
    for name in args.only or list(SPECS):
        if name == "default" and not args.no_demo:
            demo = time_demo(cache, log_dir)
            demo_summary = (log_dir / "demo_run1.out").read_text()
        t = time.perf_counter()
        w = build_world(SPECS[name], cache_dir=cache)
        print(f"\n== {name} ({time.perf_counter() - t:.1f}s) ==\n{w.summary()}", flush=True)
        rows.append(world_row(name, w))
        (log_dir / "eval_world.json").write_text(json.dumps({"worlds": rows, "demo": demo}, indent=2))
    section = markdown(rows, demo, demo_summary, args.machine, args.note)
    print("\n" + section)
    if not args.no_record:
        record(section, ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
