"""Time `explain`'s naming at scale on a synthetic CLIP space (issue 13: the real vocabulary's cost).

    python scripts/bench_explain.py [--rows 100000,1000000] [--dim 512] [--phrases 1150]

Rows are sums of attribute directions plus noise in ``--dim`` dimensions, with two planted failures;
the vocabulary is ``--phrases`` phrases (about the size of the real vocabulary: label names, ImageNet
classes, generic concepts), a fifth of them meaningful. Times :func:`diagnosis.explain.name_modes`
(ranking phrases on a sample of ``SELECT_ROWS`` rows, composing, choosing, checking the evidence on
every row) and reports whether the planted failures were named. Reading the table and encoding the
phrases are not included (see BENCHMARKS.md, issue 7, for reading 1M rows; encoding ~1,150 phrases
with ViT-B-32 on a CPU is a few seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from diagnosis.explain import _Table, name_modes

WORDS = ["circle", "square", "triangle", "star", "red", "green", "blue", "small", "large", "dark", "striped"]


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
        groups = [(0, 4), (1, 5), (2, 9), (3, 7), (2, 10), (0, 6)]  # (shape, other) word pairs
        g = rng.choice(len(groups), n, p=[0.3, 0.3, 0.05, 0.25, 0.05, 0.05])
        X = np.zeros((n, args.dim), np.float32)
        for k, (a, b) in enumerate(groups):
            m = g == k
            X[m] = D[a] + D[b]
        for s in range(0, n, 100_000):  # in chunks: 1M x 512 float64 noise at once would be 4 GB
            X[s : s + 100_000] += 0.08 * rng.standard_normal((min(100_000, n - s), args.dim), dtype=np.float32)
            X[s : s + 100_000] /= np.linalg.norm(X[s : s + 100_000], axis=1, keepdims=True)
        loss = rng.gamma(2.0, 0.1, n)
        loss[g == 2] *= 6  # "a triangle dark"
        loss[g == 5] *= 8  # "a circle blue"
        pred = loss * np.exp(rng.normal(0, 0.2, n))
        t = _Table(ids=np.array([f"r{i}" for i in range(n)], dtype=object), X=X, loss=loss, pred=pred,
                   std=np.zeros(n))
        names = [f"a {WORDS[a]} {WORDS[b]}" for a, b in groups] + [f"a {w}" for w in WORDS]
        T = [D[a] + D[b] for a, b in groups] + [D[i] for i in range(len(WORDS))]
        T += list(rng.normal(size=(args.phrases - len(T), args.dim)))  # the rest: unrelated phrases
        names += [f"phrase {i}" for i in range(args.phrases - len(names))]
        T = np.asarray(T, np.float32)
        T /= np.linalg.norm(T, axis=1, keepdims=True)
        t0 = time.perf_counter()
        modes = name_modes(t, names, T)
        sec = time.perf_counter() - t0
        r = {"rows": n, "dim": args.dim, "phrases": args.phrases, "seconds": round(sec, 1),
             "modes": [m.description for m in modes]}
        print(json.dumps(r), flush=True)
        out.append(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
