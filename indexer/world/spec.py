"""A world's spec: what to generate, which slices to plant, how long to train; validated once.

A spec is a JSON object (see ``default_spec.json``)::

    {"seed": 0, "n_train": 16000, "n_test": 4000, "n_pool": 4000, "image_size": 64, "task": "shape",
     "slices": [{"name": "blue circles", "kind": "correlation",
                 "where": {"shape": "circle", "color": "blue"}, "strength": 0.95}, ...],
     "clip": {"steps": 1000, "batch_size": 256, "n_images": 16000, "target": 0.95},
     "blackbox": {"epochs": 6, "batch_size": 128, "width": 24}}

``"clip": {"shared": true}`` (opt-in; absent or false is the same spec, with the same hash) trains the
tiny CLIP once per CLIP config, image size and generator version into ``<cache>/clips/<hash>/`` and
copies it into every world that asks for it (``indexer.world.build.shared_clip``): the CLIP learns
from a uniform pool either way, so one CLIP can serve many worlds, as one web-trained CLIP serves
many datasets. Its stopping rule is then checked on uniform images, for every phrase of up to three
attributes, rather than on one world's images.

:func:`random_spec` draws specs for evaluation on worlds nobody designed.

``n_pool`` unlabeled images are drawn like the test split (uniformly, nothing planted) and written
into the manifest with no label and no loss (``split = "pool"``): the images a team could send for
labelling next. Their true labels, attributes and slice membership are kept aside in
``pool_truth.parquet`` for evaluation only (``scripts/eval_curation.py``), never in the manifest.

Slice kinds (all planted in the black-box model's *training* split only; the test split is drawn
uniformly and independently, so every group is present there at its natural rate):

``rare``
    the rows matching ``where`` make up a fraction ``rate`` of the training split (exactly, up to
    rounding).
``correlation``
    ``where`` names the task attribute's value (the group's true label) and at least one other
    attribute (the spurious feature). In training, a fraction ``strength`` of the rows that carry
    the spurious feature show the ``decoy`` label (default: the task value listed after the group's)
    and the rest show the other labels uniformly, so the feature predicts the decoy and the group
    breaks that rule.
``noisy_label``
    a fraction ``noise`` of the training rows matching ``where`` get a wrong ``label`` (uniformly
    among the other task values, or always ``to`` when given); images and attributes stay true.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from indexer.errors import UserError

#: Attribute -> its values. Every image has one value of each; captions and vocab use these words.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "size": ("small", "large"),
    "background": ("dark", "light", "striped", "noisy"),
}

KINDS = {"rare": "rate", "correlation": "strength", "noisy_label": "noise"}

#: Bump when generation, planting or training changes what a spec produces, so caches rebuild.
GENERATOR_VERSION = 4  # 4: the unlabeled pool

DEFAULT_SPEC_PATH = Path(__file__).with_name("default_spec.json")

_TOP_KEYS = {"seed", "n_train", "n_test", "n_pool", "image_size", "task", "slices", "clip", "blackbox", "name"}
#: ``clip.steps`` is the cap: training stops earlier once, checked every ``eval_every`` steps, the
#: zero-shot accuracy on ``n_eval`` held-out images is >= ``target`` for every attribute and every
#: vocabulary phrase's precision@100 on the world's own images is >= ``phrase_target``. Stopping at
#: the zero-shot target alone left phrases such as "a triangle on a striped background" at 0.43
#: precision@100 (BENCHMARKS.md).
_CLIP_DEFAULTS = {"steps": 1000, "batch_size": 256, "n_images": 16000, "lr": 2e-3, "target": 0.95,
                  "eval_every": 25, "n_eval": 600, "phrase_target": 0.9}
_BLACKBOX_DEFAULTS = {"epochs": 6, "batch_size": 128, "lr": 3e-3, "width": 24}


def slug(name: str) -> str:
    """``"blue circles"`` -> ``"slice_blue_circles"``: the slice's boolean column in the manifest."""
    s = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    return f"slice_{s}"


def default_spec() -> dict:
    """The built-in spec (a fresh copy): shape task, one slice of each kind."""
    return json.loads(DEFAULT_SPEC_PATH.read_text())


def benchmark_specs() -> dict[str, dict]:
    """The worlds the evaluation scripts measure (fresh copies; BENCHMARKS.md "Offline world").

    The default spec; two earlier benchmark worlds (a colour task, a shape world with another seed);
    and three designed to vary what a planted slice looks like: another seed with four slices, one
    of them defined by three attributes; a colour-task world whose slices confuse neighbouring
    colours; a world with two correlations and a three-attribute rare group. Every slice kind
    appears in several worlds. Strengths and rates are the ones that made slices fail before
    (95% correlations, 0.1-0.3% rare groups, 40-60% label noise); whether each one did is
    measured, not assumed (``World.summary`` says so per slice).
    """
    base = default_spec()
    return {
        "default": base,
        "color-task": {
            **base, "seed": 1, "task": "color",
            "slices": [
                {"name": "green stars", "kind": "correlation", "where": {"color": "green", "shape": "star"},
                 "strength": 0.95},
                {"name": "yellow on light", "kind": "rare", "where": {"color": "yellow", "background": "light"},
                 "rate": 0.003},
                {"name": "small purples", "kind": "noisy_label", "where": {"color": "purple", "size": "small"},
                 "noise": 0.5},
            ],
        },
        "shape-seed2": {
            **base, "seed": 2,
            "slices": [
                {"name": "dark triangles", "kind": "correlation",
                 "where": {"shape": "triangle", "background": "dark"}, "strength": 0.95},
                {"name": "noisy crosses", "kind": "rare", "where": {"shape": "cross", "background": "noisy"},
                 "rate": 0.003},
                {"name": "red squares", "kind": "noisy_label", "where": {"shape": "square", "color": "red"},
                 "noise": 0.5},
            ],
        },
        "four-slices-seed3": {
            **base, "seed": 3,
            "slices": [
                {"name": "orange squares", "kind": "correlation", "where": {"shape": "square", "color": "orange"},
                 "strength": 0.95},
                {"name": "small crosses", "kind": "rare", "where": {"shape": "cross", "size": "small"},
                 "rate": 0.002},
                {"name": "green circles on noise", "kind": "noisy_label",
                 "where": {"shape": "circle", "color": "green", "background": "noisy"}, "noise": 0.6},
                {"name": "large stars on light", "kind": "noisy_label",
                 "where": {"shape": "star", "size": "large", "background": "light"}, "noise": 0.5, "to": "cross"},
            ],
        },
        "color-seed4": {
            **base, "seed": 4, "task": "color",
            "slices": [
                {"name": "orange on stripes", "kind": "correlation",
                 "where": {"color": "orange", "background": "striped"}, "strength": 0.95, "decoy": "red"},
                {"name": "large red crosses", "kind": "noisy_label",
                 "where": {"color": "red", "shape": "cross", "size": "large"}, "noise": 0.5},
                {"name": "blue on dark", "kind": "noisy_label", "where": {"color": "blue", "background": "dark"},
                 "noise": 0.4, "to": "purple"},
                {"name": "small yellows", "kind": "rare", "where": {"color": "yellow", "size": "small"},
                 "rate": 0.001},
            ],
        },
        "two-correlations-seed5": {
            **base, "seed": 5,
            "slices": [
                {"name": "yellow triangles", "kind": "correlation",
                 "where": {"shape": "triangle", "color": "yellow"}, "strength": 0.95},
                {"name": "red crosses", "kind": "correlation", "where": {"shape": "cross", "color": "red"},
                 "strength": 0.95},
                {"name": "small squares on stripes", "kind": "rare",
                 "where": {"shape": "square", "size": "small", "background": "striped"}, "rate": 0.001},
            ],
        },
    }


def load_spec(spec: dict | str | Path | None) -> dict:
    """``None`` -> the default; a path -> its JSON; a dict -> itself. Returns a validated copy."""
    if spec is None:
        return normalise_spec(default_spec())
    if isinstance(spec, str | Path):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"world spec {path} does not exist; pass a JSON file like indexer/world/default_spec.json.")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"world spec {path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from e
    if not isinstance(spec, dict):
        raise UserError("a world spec must be a JSON object with keys like seed, n_train, task, slices.")
    return normalise_spec(spec)


def _int(spec: dict, key: str, lo: int, hi: int) -> int:
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UserError(f"world spec '{key}' is {v!r}; give an integer between {lo} and {hi}.")
    return v


def _fraction(where: str, key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) <= 1.0:
        raise UserError(f"world spec {where} '{key}' is {v!r}; give a fraction between 0 and 1.")
    return float(v)


def normalise_spec(spec: dict) -> dict:
    """Validate ``spec`` and fill defaults; raises UserError naming the bad field and the fix."""
    spec = copy.deepcopy(spec)
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise UserError(f"world spec has unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}.")
    spec.setdefault("seed", 0)
    spec.setdefault("n_train", 16000)
    spec.setdefault("n_test", 4000)
    spec.setdefault("n_pool", 4000)
    spec.setdefault("image_size", 64)
    spec.setdefault("task", "shape")
    spec.setdefault("slices", [])
    _int(spec, "seed", 0, 2**31 - 1)
    _int(spec, "n_train", 20, 1_000_000)
    _int(spec, "n_test", 20, 1_000_000)
    _int(spec, "n_pool", 0, 1_000_000)
    _int(spec, "image_size", 32, 256)
    if spec["task"] not in ATTRIBUTES:
        raise UserError(f"world spec task '{spec['task']}' is not an attribute; pick one of {list(ATTRIBUTES)}.")
    for key, defaults, extra in (("clip", _CLIP_DEFAULTS, {"shared"}), ("blackbox", _BLACKBOX_DEFAULTS, set())):
        given = spec.get(key) or {}
        if not isinstance(given, dict) or set(given) - set(defaults) - extra:
            raise UserError(f"world spec '{key}' must be an object with keys among {sorted(set(defaults) | extra)}.")
        spec[key] = {**defaults, **given}
    if "shared" in spec["clip"]:
        if not isinstance(spec["clip"]["shared"], bool):
            raise UserError(f"world spec 'clip.shared' is {spec['clip']['shared']!r}; give true or false.")
        if not spec["clip"]["shared"]:  # false is the default: the same spec, the same hash as without it
            del spec["clip"]["shared"]
    for key, lo, hi in (("steps", 1, 1_000_000), ("batch_size", 2, 65536), ("n_images", 2, 10_000_000),
                        ("eval_every", 0, 1_000_000), ("n_eval", 1, 1_000_000)):
        v = spec["clip"][key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise UserError(f"world spec 'clip.{key}' is {v!r}; give an integer between {lo} and {hi}.")
    spec["clip"]["target"] = _fraction("'clip'", "target", spec["clip"]["target"])
    spec["clip"]["phrase_target"] = _fraction("'clip'", "phrase_target", spec["clip"]["phrase_target"])
    if not isinstance(spec["slices"], list):
        raise UserError("world spec 'slices' must be a list of slice objects.")
    names = set()
    spec["slices"] = [_normalise_slice(s, spec["task"], i) for i, s in enumerate(spec["slices"])]
    for s in spec["slices"]:
        if slug(s["name"]) in names:
            raise UserError(f"world spec has two slices named like '{s['name']}'; give each slice its own name.")
        names.add(slug(s["name"]))
    return spec


def _normalise_slice(s: dict, task: str, i: int) -> dict:
    where_txt = f"slice #{i + 1}"
    if not isinstance(s, dict) or "kind" not in s or "where" not in s:
        raise UserError(f"world spec {where_txt} needs at least 'kind' and 'where'.")
    s = dict(s)
    kind = s["kind"]
    if kind not in KINDS:
        raise UserError(f"world spec {where_txt} kind '{kind}' is unknown; use one of {list(KINDS)}.")
    where = s["where"]
    if not isinstance(where, dict) or not where:
        raise UserError(f"world spec {where_txt} 'where' must map attributes to values, e.g. {{\"shape\": \"star\"}}.")
    for attr, value in where.items():
        if attr not in ATTRIBUTES:
            raise UserError(f"world spec {where_txt} attribute '{attr}' is unknown; use one of {list(ATTRIBUTES)}.")
        if value not in ATTRIBUTES[attr]:
            raise UserError(
                f"world spec {where_txt} value '{value}' is not a {attr}; use one of {list(ATTRIBUTES[attr])}."
            )
    s.setdefault("name", " ".join(where[a] for a in ATTRIBUTES if a in where))
    param = KINDS[kind]
    if param not in s:
        raise UserError(f"world spec {where_txt} ({kind}) needs '{param}', a fraction between 0 and 1.")
    s[param] = _fraction(where_txt, param, s[param])
    labels = ATTRIBUTES[task]
    if kind == "correlation":
        if task not in where or len(where) < 2:
            raise UserError(
                f"world spec {where_txt} (correlation) must name the task attribute '{task}' and at least one "
                "other attribute (the spurious feature) in 'where'."
            )
        decoy = s.setdefault("decoy", labels[(labels.index(where[task]) + 1) % len(labels)])
        if decoy not in labels or decoy == where[task]:
            raise UserError(
                f"world spec {where_txt} decoy '{decoy}' must be a {task} other than '{where[task]}'."
            )
    if kind == "noisy_label" and "to" in s and s["to"] not in labels:
        raise UserError(f"world spec {where_txt} 'to' must be one of {list(labels)}.")
    allowed = {"name", "kind", "where", param, "decoy", "to"}
    if set(s) - allowed:
        raise UserError(f"world spec {where_txt} has unknown keys {sorted(set(s) - allowed)}.")
    return s


#: What :func:`random_spec` draws a slice's strength from: the ranges of the benchmark specs, the ones
#: that made slices fail (BENCHMARKS.md, "Offline world" and issue 13).
RANDOM_RANGES = {"rate": (0.001, 0.003), "strength": (0.93, 0.97), "noise": (0.4, 0.6)}
#: The size of a random world: the benchmark worlds' held-out split (4,000 rows: a three-attribute
#: group of 1/120 of the rows still has ~33 held-out rows to judge a name by) and image size (so the
#: benchmark specs with ``--shared-clip`` use the same CLIP); half their training split and an
#: eighth of their pool, to keep a build to a few minutes on a 2-core CPU.
RANDOM_SIZES = {"n_train": 8000, "n_test": 4000, "n_pool": 500, "image_size": 64}


def random_spec(seed: int, index: int = 0) -> dict:
    """The ``index``-th random world of ``seed``: a valid spec named ``random-<seed>-<index>``.

    Deterministic per (seed, index). The task is any of the four attributes; 2-5 slices, each of a
    random kind, defined by the task attribute's value (a correlation needs it; the benchmark
    worlds' rare and noisy-label slices that failed all had it) and one or two other attributes,
    values drawn uniformly; rate / strength / noise uniform in :data:`RANDOM_RANGES`; a
    correlation's decoy and, for a third of the noisy-label slices, a fixed wrong label ``to``
    drawn among the other task values. Slices never claim the same rows: what a slice touches (its
    ``where``; for a correlation, every row with its spurious feature, whose labels it rewrites)
    must contradict every other slice's on some attribute, else the slice is drawn again. Uses the
    shared CLIP (``"clip": {"shared": true}``) and :data:`RANDOM_SIZES`.
    """
    rng = np.random.default_rng([seed, index, 2026])
    attrs = list(ATTRIBUTES)
    while True:
        task = attrs[int(rng.integers(len(attrs)))]
        labels = ATTRIBUTES[task]
        slices, claims = [], []
        for _ in range(int(rng.integers(2, 6))):
            for _try in range(200):
                kind = list(KINDS)[int(rng.integers(len(KINDS)))]
                others = [a for a in attrs if a != task]
                chosen = [others[j] for j in sorted(rng.choice(len(others), int(rng.integers(1, 3)), replace=False))]
                where = {a: ATTRIBUTES[a][int(rng.integers(len(ATTRIBUTES[a])))] for a in [task, *chosen]}
                claim = {a: v for a, v in where.items() if a != task} if kind == "correlation" else where
                if all(any(a in c and c[a] != v for a, v in claim.items()) for c in claims):
                    break
            else:
                break  # no room left for another slice: keep those drawn
            lo, hi = RANDOM_RANGES[KINDS[kind]]
            s = {"kind": kind, "where": where, KINDS[kind]: round(float(rng.uniform(lo, hi)), 4)}
            wrong = [v for v in labels if v != where[task]]
            if kind == "correlation":
                s["decoy"] = wrong[int(rng.integers(len(wrong)))]
            elif kind == "noisy_label" and rng.random() < 1 / 3:
                s["to"] = wrong[int(rng.integers(len(wrong)))]
            slices.append(s)
            claims.append(claim)
        spec = {"name": f"random-{seed}-{index}", "seed": int(rng.integers(1000, 2**31 - 1)), **RANDOM_SIZES,
                "task": task, "slices": slices, "clip": {"shared": True}}
        if len(slices) < 2:
            continue
        try:
            normalise_spec(spec)
        except UserError:
            continue
        return spec


def spec_hash(spec: dict, clip_config: bytes = b"") -> str:
    """Stable 16-hex-digit hash of a normalised spec, the generator version and the CLIP config."""
    payload = json.dumps({"spec": spec, "v": GENERATOR_VERSION}, sort_keys=True).encode() + clip_config
    return hashlib.sha256(payload).hexdigest()[:16]
