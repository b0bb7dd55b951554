"""Sampling a world's rows (attributes, planted slices, captions) and rendering their images.

Everything is a pure function of the spec's seed: rows are drawn with one numpy Generator per
split, and each image from its row's ``render_seed``, so rendering can run in any order or process.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from indexer.world.spec import ATTRIBUTES, slug

SPLIT_CODES = {"train": 1, "test": 2, "clip": 3, "clip_eval": 4, "pool": 5, "clip_phrases": 6}

#: Object colours in RGB; backgrounds are grey so that colour names stay unambiguous.
RGB = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 225),
    "yellow": (235, 215, 30),
    "purple": (135, 45, 185),
    "orange": (250, 135, 15),
}
#: Circumradius of an object as a fraction of the image side.
RADIUS = {"small": 0.2, "large": 0.3}

#: (words for "on a ... background", short word) per background.
BG_WORDS = {
    "dark": ("dark", "dark"),
    "light": ("light", "light"),
    "striped": ("striped", "stripes"),
    "noisy": ("noisy", "noise"),
}
#: Caption templates; the first is canonical (evaluation and the vocabulary use it). Partial
#: templates teach the text tower short queries like "a blue circle".
TEMPLATES = (
    "a {size} {color} {shape} on a {bg} background",
    "{color} {shape}, {size}, {bgshort}",
    "a photo of a {size} {shape} that is {color}, on a {bg} background",
    "a {bg} background with a {size} {color} {shape}",
    "{size} {color} {shape} on {bgshort}",
    "a {color} {shape}",
    "a {size} {shape} on a {bg} background",
    "a {color} {shape} on a {bg} background",
)
TEMPLATE_P = np.array([0.2, 0.12, 0.12, 0.12, 0.12, 0.12, 0.1, 0.1])
#: The attributes each template states (in :data:`ATTRIBUTES` order): "a {color} {shape}" says
#: nothing of size or background, so it also describes images of any size on any background.
_PLACEHOLDERS = {"shape": ("{shape}",), "color": ("{color}",), "size": ("{size}",), "background": ("{bg}", "{bgshort}")}
TEMPLATE_STATES = np.array([[any(p in t for p in _PLACEHOLDERS[a]) for a in ATTRIBUTES] for t in TEMPLATES])


def caption(attrs: dict, template: int = 0) -> str:
    """One caption of a row's attributes (``template`` indexes :data:`TEMPLATES`)."""
    bg, bgshort = BG_WORDS[attrs["background"]]
    text = TEMPLATES[template].format(
        size=attrs["size"], color=attrs["color"], shape=attrs["shape"], bg=bg, bgshort=bgshort
    )
    return with_articles(text)


def with_articles(text: str) -> str:
    """English articles: "a orange star" -> "an orange star"."""
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)


def describe(where: dict) -> str:
    """``{"shape": "circle", "color": "blue"}`` -> ``"a blue circle"``; canonical word order.

    Any subset of the attributes: ``{"color": "blue"}`` -> ``"a blue object"``,
    ``{"background": "noisy"}`` -> ``"an object on a noisy background"``. The vocabulary
    ``llm2loss explain`` ranks and the tiny CLIP's partial training captions both come from here.
    """
    words = [where[a] for a in ("size", "color") if a in where]
    words.append(where.get("shape", "object"))
    text = "a " + " ".join(words)
    if "background" in where:
        text += f" on a {BG_WORDS[where['background']][0]} background"
    return with_articles(text)


#: Share of training captions drawn from :data:`TEMPLATES` (varied wording, most of them stating all
#: four attributes); the rest describe a random subset of the attributes with :func:`describe`.
FULL_CAPTION_SHARE = 0.4
#: Probability of describing 1, 2, 3 or 4 attributes in a partial caption.
SUBSET_SIZE_P = np.array([0.3, 0.4, 0.2, 0.1])


def sample_captions(rows: pd.DataFrame, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Fresh training captions for ``rows`` (attribute columns): one per row, drawn anew each call.

    Returns the captions and an (n, 4) bool mask of the attributes each one states (in
    :data:`ATTRIBUTES` order), so a contrastive loss can tell which other images a caption also
    describes. Every phrase form of the vocabulary ("a star", "a blue object", "a small object on a
    striped background", ...) has a non-zero chance for every row.
    """
    attrs = list(ATTRIBUTES)
    n = len(rows)
    records = rows[attrs].to_dict("records")
    full = rng.random(n) < FULL_CAPTION_SHARE
    templates = rng.choice(len(TEMPLATES), n, p=TEMPLATE_P)
    sizes = rng.choice(len(SUBSET_SIZE_P), n, p=SUBSET_SIZE_P) + 1
    mask = np.ones((n, len(attrs)), dtype=bool)
    out = []
    for i, rec in enumerate(records):
        if full[i]:
            out.append(caption(rec, int(templates[i])))
            mask[i] = TEMPLATE_STATES[templates[i]]
            continue
        keep = np.zeros(len(attrs), dtype=bool)
        keep[rng.choice(len(attrs), sizes[i], replace=False)] = True
        mask[i] = keep
        out.append(describe({a: rec[a] for a, k in zip(attrs, keep, strict=True) if k}))
    return out, mask


def sample_rows(n: int, seed: int, split: str) -> pd.DataFrame:
    """``n`` rows with independent uniform attributes plus nuisances (position, rotation, seeds)."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split]])
    df = pd.DataFrame({a: np.asarray(vals)[rng.integers(0, len(vals), n)] for a, vals in ATTRIBUTES.items()})
    _nuisances(df, rng)
    return df


def _nuisances(df: pd.DataFrame, rng: np.random.Generator) -> None:
    n = len(df)
    # Centre in [0.38, 0.62] of the side keeps a large object (nearly) inside the image.
    df["x"] = rng.uniform(0.38, 0.62, n).round(4)
    df["y"] = rng.uniform(0.38, 0.62, n).round(4)
    df["rotation"] = rng.uniform(0, 360, n).round(1)
    df["render_seed"] = rng.integers(0, 2**31 - 1, n)
    df["template"] = rng.choice(len(TEMPLATES), n, p=TEMPLATE_P)


def _match(df: pd.DataFrame, where: dict) -> np.ndarray:
    m = np.ones(len(df), dtype=bool)
    for a, v in where.items():
        m &= (df[a] == v).to_numpy()
    return m


def _set_attr(df: pd.DataFrame, idx: np.ndarray, attr: str, values: np.ndarray) -> None:
    df.loc[df.index[idx], attr] = values


def plant_train(df: pd.DataFrame, spec: dict, seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """Plant the spec's slices into the uniform training rows ``df`` (returned as a new frame).

    Returns the rows, with ``label`` (the task attribute's value, corrupted where a noisy_label
    slice says so) and ``label_corrupted``, and per slice what was achieved in this split
    (``achieved``: the measured rate / strength / noise, to compare with the spec's).
    """
    rng = np.random.default_rng([seed, 17])
    task = spec["task"]
    labels = np.asarray(ATTRIBUTES[task])
    df = df.copy()
    # Correlations first: they change attributes, which the rare slices' counts then respect.
    for s in spec["slices"]:
        if s["kind"] != "correlation":
            continue
        spurious = {a: v for a, v in s["where"].items() if a != task}
        idx = np.flatnonzero(_match(df, spurious))
        rng.shuffle(idx)
        k = round(s["strength"] * len(idx))
        _set_attr(df, idx[:k], task, np.full(k, s["decoy"]))
        others = labels[labels != s["decoy"]]
        _set_attr(df, idx[k:], task, others[rng.integers(0, len(others), len(idx) - k)])
    for s in spec["slices"]:
        if s["kind"] == "rare":
            df = _resample_rare(df, s, rng, spec)
    df = df.reset_index(drop=True)
    df["label"] = df[task].astype(str)
    df["label_corrupted"] = False
    for s in spec["slices"]:
        if s["kind"] != "noisy_label":
            continue
        idx = np.flatnonzero(_match(df, s["where"]) & ~df["label_corrupted"].to_numpy())
        rng.shuffle(idx)
        idx = idx[: round(s["noise"] * len(idx))]
        true = df[task].to_numpy()[idx]
        if "to" in s:
            new = np.full(len(idx), s["to"], dtype=object)
            keep = true == s["to"]  # a row already showing the target cannot be corrupted to it
            new[keep] = [labels[(list(labels).index(t) + 1) % len(labels)] for t in true[keep]]
        else:
            off = rng.integers(1, len(labels), len(idx))  # a shift of 1..k-1 never lands on the truth
            pos = np.array([list(labels).index(t) for t in true], dtype=int)
            new = labels[(pos + off) % len(labels)]
        df.loc[idx, "label"] = new
        df.loc[idx, "label_corrupted"] = True
    return df, [achieved(df, s, task) for s in spec["slices"]]


def _resample_rare(df: pd.DataFrame, s: dict, rng: np.random.Generator, spec: dict) -> pd.DataFrame:
    """Keep exactly ``round(rate * n)`` group rows; refill the rest from fresh non-group rows.

    Fresh rows go through the same correlation planting, so the conditional distributions other
    slices planted are kept.
    """
    n = len(df)
    in_group = _match(df, s["where"])
    want = round(s["rate"] * n)
    group = df[in_group]
    if len(group) >= want:
        group = group.iloc[np.sort(rng.choice(len(group), want, replace=False))]
    else:  # upsampling: repeat group rows with fresh nuisances so images differ
        extra = group.iloc[rng.integers(0, len(group), want - len(group))].copy() if len(group) else group
        _nuisances(extra, rng)
        group = pd.concat([group, extra])
    rest = df[~in_group]
    while len(rest) < n - want:
        fresh = sample_rows(n, int(rng.integers(2**31 - 1)), "train")
        fresh, _ = plant_train(fresh, {**spec, "slices": [x for x in spec["slices"] if x["kind"] == "correlation"]},
                               int(rng.integers(2**31 - 1)))
        fresh = fresh.drop(columns=["label", "label_corrupted"])
        rest = pd.concat([rest, fresh[~_match(fresh, s["where"])]])
    rest = rest.iloc[: n - want]
    out = pd.concat([group, rest])
    return out.iloc[rng.permutation(len(out))]


def achieved(df: pd.DataFrame, s: dict, task: str) -> dict:
    """What a slice's planting measures in ``df`` (a training split): rate, strength or noise."""
    m = _match(df, s["where"])
    out = {"name": s["name"], "kind": s["kind"], "rows": int(m.sum())}
    if s["kind"] == "rare":
        out["rate"] = float(m.mean())
    elif s["kind"] == "correlation":
        spurious = _match(df, {a: v for a, v in s["where"].items() if a != task})
        out["strength"] = float((df[task].to_numpy()[spurious] == s["decoy"]).mean()) if spurious.any() else 0.0
    else:
        out["noise"] = float((df["label"].to_numpy()[m] != df[task].to_numpy()[m]).mean()) if m.any() else 0.0
    return out


def finish_rows(df: pd.DataFrame, spec: dict, split: str) -> pd.DataFrame:
    """Add ``split``, ``label`` (test: the truth), slice columns and the caption."""
    df = df.reset_index(drop=True).copy()
    df["split"] = split
    if "label" not in df:
        df["label"] = df[spec["task"]].astype(str)
        df["label_corrupted"] = False
    for s in spec["slices"]:
        df[slug(s["name"])] = _match(df, s["where"])
    df["caption"] = [caption(r, int(t)) for r, t in zip(df[list(ATTRIBUTES)].to_dict("records"),
                                                         df["template"], strict=True)]
    return df


# ---- rendering ----------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(1.0, a) for a in (45, 135, 225, 315)]
    elif shape == "triangle":
        r *= 1.15
        pts = [(1.0, a) for a in (90, 210, 330)]
    elif shape == "star":
        r *= 1.15
        pts = [(1.0 if i % 2 == 0 else 0.42, 90 + 36 * i) for i in range(10)]
    elif shape == "cross":
        w = 0.34  # half the arm width, relative to the arm length
        corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w),
                   (-1, w), (-w, w), (-w, 1)]
        pts = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in corners]
    else:
        raise ValueError(shape)
    return [(cx + r * d * math.cos(math.radians(a + rot)), cy - r * d * math.sin(math.radians(a + rot)))
            for d, a in pts]


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "dark":
        img = np.full((size, size, 3), rng.integers(15, 55), dtype=np.uint8)
    elif kind == "light":
        img = np.full((size, size, 3), rng.integers(190, 240), dtype=np.uint8)
    elif kind == "striped":
        period = rng.uniform(5, 10) * size / 64
        theta = rng.choice([0, 45, 90, 135]) * math.pi / 180
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform(0, 1)
        lo, hi = int(rng.integers(40, 90)), int(rng.integers(160, 220))
        img = np.where((phase % 1.0) < 0.5, lo, hi).astype(np.uint8)[..., None].repeat(3, axis=2)
    elif kind == "noisy":
        cell = int(rng.integers(1, 3))
        g = rng.integers(30, 226, (size // cell + 1, size // cell + 1), dtype=np.uint8)
        g = g.repeat(cell, 0).repeat(cell, 1)[:size, :size]
        img = g[..., None].repeat(3, axis=2)
    else:
        raise ValueError(kind)
    return img


def render(row: dict, size: int) -> np.ndarray:
    """One row (attributes + nuisances) -> (size, size, 3) uint8 RGB image."""
    rng = np.random.default_rng(int(row["render_seed"]))
    img = Image.fromarray(_background(row["background"], size, rng))
    draw = ImageDraw.Draw(img)
    jitter = rng.integers(-18, 19, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(RGB[row["color"]], jitter, strict=True))
    cx, cy = row["x"] * size, row["y"] * size
    r = RADIUS[row["size"]] * size * rng.uniform(0.9, 1.1)
    if row["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(row["shape"], cx, cy, r, row["rotation"]), fill=fill)
    return np.asarray(img)


def render_all(df: pd.DataFrame, size: int) -> np.ndarray:
    """All rows -> (n, size, size, 3) uint8."""
    cols = [*ATTRIBUTES, "x", "y", "rotation", "render_seed"]
    out = np.empty((len(df), size, size, 3), dtype=np.uint8)
    for i, row in enumerate(df[cols].to_dict("records")):
        out[i] = render(row, size)
    return out
