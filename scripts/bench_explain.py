"""Time `explain`'s naming at scale on a synthetic CLIP space (issue 13: the real vocabulary's cost).

    python scripts/bench_explain.py [--rows 100000,1000000] [--dim 512] [--phrases 1150]

Each row has a shape, a colour, a size and a background; its embedding is the sum of their word
directions plus noise in ``--dim`` dimensions, and two conjunctions fail ("a blue circle", "a
triangle on a dark background"). The vocabulary reads like the real one: every attribute value
and pair, written as the world's phrases are, plus filler nouns ("a noun17") up to ``--phrases``
(about the size of the real vocabulary: label names, ImageNet's 1,000 classes, generic concepts),
so the grammar has ~1,100 head nouns whose rivals must be chosen. ``encode`` maps a phrase to the
sum of its words' directions (a filler noun to a fixed random one), so compositions and the
faithfulness check (rivals of each part) run as with a real CLIP. Times
:func:`diagnosis.explain.name_modes` (ranking phrases on a sample of ``SELECT_ROWS`` rows,
composing, choosing faithful names, folding, checking the evidence on every row) and reports
whether the planted failures were named. Reading the table and encoding with a real CLIP are not
included (see BENCHMARKS.md, issue 7, for reading 1M rows).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import zlib

import numpy as np

from diagnosis.explain import _Table, name_modes

ATTR = {"shape": ["circle", "square", "triangle", "star"], "color": ["red", "green", "blue"],
        "size": ["small", "large"], "background": ["dark", "striped"]}
WORDS = [w for vals in ATTR.values() for w in vals]


def describe(where: dict) -> str:
    words = [where[a] for a in ("size", "color") if a in where] + [where.get("shape", "object")]
    text = " ".join(words)
    text = ("an " if text[0] in "aeiou" else "a ") + text
    return text + (f" on a {where['background']} background" if "background" in where else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--phrases", type=int, default=1150)
    args = ap.parse_args(argv)
    out = []
    for n in [int(x) for x in args.rows.split(",")]:
        rng = np.random.default_rng(0)
        D = np.linalg.qr(rng.normal(size=(args.dim, len(WORDS))))[0].T  # orthonormal word directions
        rows = {a: rng.integers(0, len(v), n) for a, v in ATTR.items()}
        X = np.zeros((n, args.dim), np.float32)
        for s in range(0, n, 100_000):  # in chunks: 1M x 512 float64 noise at once would be 4 GB
            e = slice(s, min(n, s + 100_000))
            X[e] = sum(D[[WORDS.index(ATTR[a][i]) for i in rows[a][e]]] for a in ATTR)
            X[e] += 0.15 * rng.standard_normal((e.stop - e.start, args.dim), dtype=np.float32)
            X[e] /= np.linalg.norm(X[e], axis=1, keepdims=True)
        loss = rng.gamma(2.0, 0.1, n)
        loss[(rows["shape"] == 2) & (rows["background"] == 0)] *= 6  # triangles on a dark background
        loss[(rows["shape"] == 0) & (rows["color"] == 2)] *= 8  # blue circles
        pred = loss * np.exp(rng.normal(0, 0.2, n))
        t = _Table(ids=np.array([f"r{i}" for i in range(n)], dtype=object), X=X, loss=loss, pred=pred,
                   std=np.zeros(n))
        attrs = list(ATTR)
        names = [describe({a: v}) for a in attrs for v in ATTR[a]]
        names += [describe({a: v, b: w}) for i, a in enumerate(attrs) for b in attrs[i + 1 :]
                  for v in ATTR[a] for w in ATTR[b]]
        names += [f"a noun{i}" for i in range(max(0, args.phrases - len(names)))]

        def encode(phrases: list[str], D=D) -> np.ndarray:
            V = []
            for p in phrases:
                v = np.zeros(args.dim)
                for w in re.findall(r"[a-z0-9]+", p):
                    if w in WORDS:
                        v += D[WORDS.index(w)]
                    elif w.startswith("noun"):
                        v += np.random.default_rng(zlib.crc32(w.encode())).normal(size=args.dim) / np.sqrt(args.dim) * 1.5
                V.append(v / max(np.linalg.norm(v), 1e-9))
            return np.asarray(V, np.float32)

        T = encode(names)
        t0 = time.perf_counter()
        modes = name_modes(t, names, T, encode)
        sec = time.perf_counter() - t0
        r = {"rows": n, "dim": args.dim, "phrases": len(names), "seconds": round(sec, 1),
             "modes": [m.description for m in modes]}
        print(json.dumps(r), flush=True)
        out.append(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
