"""Time ``explain`` with a real CLIP architecture and the real vocabulary (issue 27, goal 4).

    python scripts/bench_explain_vit.py [--rows 1000] [--work /tmp/bench_explain_vit] [--against SRC]

Builds once (cached in ``--work``): ``--rows`` random-noise images, each labelled with its own name
(open_clip's ImageNet class names: 1,000 distinct labels), random losses, indexed with ViT-B-32 with
random weights (no download; a forward pass costs the same with any weights) and diagnosed. Then
times ``explain`` on it, with its vocabulary built as for real data (the label names, open_clip's
ImageNet classes and the generic concepts: :func:`diagnosis.vocab.real_vocabulary`), and says where
the time went: phrases encoded by CLIP (calls, phrases, seconds), the rest (ranking, compositions,
retrieval, checks). ``--planted`` builds another table (in ``--work``/planted) where one image in
ten is tinted red and has about five times the mean loss, so that the ensemble has skill and
``explain`` encodes and judges the whole vocabulary (with random losses it finds no skill and names
nothing, which skips the encoding). ``--against SRC`` runs the same in a child process with the code at ``SRC``
(a checkout or `git archive` of another commit) and then with this checkout's, one after the other,
and prints both side by side with the modes each found (random losses: none expected).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build(work: Path, rows: int, planted: bool = False) -> Path:
    import numpy as np
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from PIL import Image

    from diagnosis.run import diagnose
    from indexer.clip import ClipSpec
    from indexer.pipeline import index_dataset

    db = work / "db"
    if (db / "diagnosis" / "info.json").exists():
        return db
    if rows > len(IMAGENET_CLASSNAMES):
        raise SystemExit(f"--rows {rows}: at most {len(IMAGENET_CLASSNAMES)} distinct labels")
    rng = np.random.default_rng(0)
    (work / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,label,loss"]
    for i in range(rows):
        path = work / "images" / f"{i:05d}.png"
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        loss = rng.gamma(1.0, 0.3)
        if planted and i % 10 == 0:  # a failing group the embeddings can see: red-tinted images
            img[..., 0] = 200 + img[..., 0] // 5
            img[..., 1:] //= 3
            loss = 1.5 + rng.gamma(1.0, 0.3)
        Image.fromarray(img).save(path)
        name = IMAGENET_CLASSNAMES[i].replace('"', "")
        lines.append(f'{path},"{name}",{loss:.6f}')
    (work / "manifest.csv").write_text("\n".join(lines) + "\n")
    index_dataset(work / "manifest.csv", db, ClipSpec("ViT-B-32"), device="cpu", progress=False)
    diagnose(db, progress=False)
    return db


def child(db: str, profile: bool = False) -> dict:
    import diagnosis.text as text
    from diagnosis.explain import explain

    calls = {"calls": 0, "phrases": 0, "seconds": 0.0}
    encode = text.Scorer.encode_text

    def timed(self, phrases):
        t = time.perf_counter()
        try:
            return encode(self, phrases)
        finally:
            calls["calls"] += 1
            calls["phrases"] += len(phrases)
            calls["seconds"] += time.perf_counter() - t

    text.Scorer.encode_text = timed
    t0, c0 = time.perf_counter(), time.process_time()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        modes = prof.runcall(explain, db)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    else:
        modes = explain(db)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": round(wall, 1), "cpu_s": round(cpu, 1), "encode": {k: round(v, 1) if isinstance(v, float) else v
                                                                        for k, v in calls.items()},
            "modes": [getattr(m, "description", None) or m.name for m in modes]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--work", default="/tmp/bench_explain_vit")
    ap.add_argument("--against", metavar="SRC")
    ap.add_argument("--planted", action="store_true", help="a table with a failing group (red-tinted images)")
    ap.add_argument("--profile", action="store_true", help="only this checkout's explain, under cProfile "
                    "(the 40 costliest calls by cumulative time on stderr)")
    ap.add_argument("--child", metavar="DB", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args.child, args.profile)))
        return 0
    t = time.perf_counter()
    db = build(Path(args.work) / ("planted" if args.planted else ""), args.rows, args.planted)
    print(f"table: {args.rows} rows{' (red-tinted failures planted)' if args.planted else ''}, ViT-B-32 (random weights), at {db} (built/checked in "
          f"{time.perf_counter() - t:.0f}s); machine: {os.cpu_count()} cores", flush=True)
    here = str(Path(__file__).resolve().parents[1])
    runs = ([("before", args.against)] if args.against and not args.profile else []) + [("after", here)]
    res = {}
    for name, root in runs:
        out = subprocess.run([sys.executable, __file__, "--child", str(db)] + (["--profile"] if args.profile else []),
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root}, cwd=root)
        if args.profile:
            print(out.stderr[-12000:])
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        r = res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        e = r["encode"]
        print(f"{name:>6}: explain {r['seconds']:.1f} s wall ({r['cpu_s']:.0f} s CPU); CLIP text encoding "
              f"{e['seconds']:.1f} s for {e['phrases']} phrases in {e['calls']} calls; the rest "
              f"{r['seconds'] - e['seconds']:.1f} s; modes: {r['modes'] or 'none'}", flush=True)
    if len(res) == 2:
        print(f"ratio: {res['before']['seconds'] / res['after']['seconds']:.2f}x faster; same modes: "
              f"{res['before']['modes'] == res['after']['modes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
