"""The issue-13 criterion on synthetic CLIP spaces, where every failure's right name is known.

    python scripts/eval_naming_synthetic.py [--seeds 0,1] [--rows 20000]

Uses tests/test_naming.py's space: each attribute word (shape, colour, size, background) is a
direction, an image the sum of its attributes' directions plus noise, a phrase the sum of its
words'. Each case plants failures (loss x k on the rows matching a conjunction); explain runs on the
world vocabulary (every attribute value and pair; triples only by composition) and its top N names
(N = max(3, failures at >= 2x the mean)) are judged as scripts/eval_diagnosis.py does: every failure
named by a nested conjunction that really fails (>= 2x), every name a true failure over >= 20 rows.
Independent of the offline worlds, so it checks the method, not one world's CLIP.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_naming import ATTR, Space, vocab  # noqa: E402

CASES = {
    "default-like": [({"shape": "circle", "color": "blue"}, 8), ({"shape": "star", "size": "small"}, 4),
                     ({"shape": "triangle", "background": "striped"}, 6)],
    "colour slices": [({"color": "green", "shape": "star"}, 6), ({"color": "purple", "size": "small"}, 4),
                      ({"color": "yellow", "background": "light"}, 5)],
    "three-attribute slice": [({"shape": "square", "color": "red", "size": "large"}, 10),
                              ({"shape": "cross", "background": "noisy"}, 5), ({"color": "orange", "size": "small"}, 3)],
    "four slices": [({"shape": "circle", "color": "green"}, 6), ({"shape": "star", "background": "dark"}, 5),
                    ({"shape": "square", "size": "small"}, 3), ({"color": "red", "background": "striped"}, 4)],
    "mild failures": [({"shape": "circle", "color": "blue"}, 3), ({"shape": "triangle", "background": "dark"}, 2.6),
                      ({"shape": "cross", "size": "large", "color": "red"}, 5)],
}


def conjunction(name: str) -> dict | None:
    words = set(re.findall(r"[a-z]+", name))
    out = {}
    for a, vals in ATTR.items():
        said = [v for v in vals if v in words]
        if len(said) > 1:
            return None
        if said:
            out[a] = said[0]
    return out or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", type=int, default=20000)
    args = ap.parse_args(argv)
    print("| case | seed | N | top-N names (loss ratio of their words' rows, members) | criterion |")
    print("|---|---|---|---|---|")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, planted in CASES.items():
            s = Space(n=args.rows, seed=seed, noise=0.15)
            for where, k in planted:
                s.loss[s.where(**where)] *= k
            mean = s.loss.mean()
            eligible = [w for w, _ in planted if s.loss[s.where(**w)].mean() >= 2 * mean]
            n_top = max(3, len(eligible))
            modes = s.explain(vocab(), top=n_top)

            def ratio(c, s=s, mean=mean):
                return float(s.loss[s.where(**c)].mean() / mean) if c else 0.0

            rows = [(m.description, ratio(conjunction(m.description)), m.size) for m in modes]
            named = all(any((c := conjunction(m.description)) and (set(c.items()) <= set(w.items())
                                                                   or set(w.items()) <= set(c.items()))
                            and ratio(c) >= 2 for m in modes) for w in eligible)
            ok = named and all(r >= 2 and z >= 20 for _, r, z in rows)
            cells = "; ".join(f"{d} ({r:.2f}x, {z})" for d, r, z in rows)
            print(f"| {name} | {seed} | {n_top} | {cells} | {'met' if ok else 'NOT met'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
