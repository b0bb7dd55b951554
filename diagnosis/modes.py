"""Failure modes: how groups of samples are formed from phrases and from the images, and when two of
them are the same failure (used by :func:`diagnosis.explain.explain`).

A mode is a dict: ``description``, ``predicted_loss`` / ``predicted_loss_std`` (its description's
score), ``phrases``, ``rows`` (a set of table row numbers) and ``source`` ("words", "images",
"both"). Two modes are the same when their groups overlap (overlap coefficient
|A n B| / min(|A|, |B|) >= ``SAME_GROUP``) or when they specialise one broader phrase that is itself
predicted to fail (:func:`generalise`); the worse one keeps its name.
"""

from __future__ import annotations

import re

import numpy as np

SAME_GROUP = 0.5  # overlap coefficient above which two modes are one
N_EXAMPLES = 10
MAX_CLUSTER_ROWS = 20000  # k-means runs on a sample of the failing rows; all are then assigned


def overlap(a: set, b: set) -> float:
    return len(a & b) / max(1, min(len(a), len(b))) if a and b else 0.0


def fold(into: dict, other: dict) -> None:
    """Make ``other``'s samples and phrases part of mode ``into`` (which keeps its description)."""
    into["rows"] |= other["rows"]
    into["phrases"] += [p for p in other["phrases"] if p not in into["phrases"]]
    if into["source"] != other["source"]:
        into["source"] = "both"


_FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "by",
                             "photo", "picture", "image", "object", "objects", "thing", "things"})


def content_words(phrase: str) -> frozenset[str]:
    """The words that carry a phrase's meaning: "a red object on a dark background" -> {red, dark,
    background}; articles, prepositions and placeholder nouns ("object", "photo") dropped."""
    return frozenset(w for w in re.findall(r"[a-z0-9]+", phrase.lower()) if w not in _FUNCTION_WORDS)


def generalise(modes: list[dict], phrases: list[str], pred: np.ndarray, threshold: float) -> list[dict]:
    """Fold modes that are specialisations of one failing broader phrase into one mode.

    One failure often surfaces as several modes that differ in a word the model does not care about:
    "a red / a green / a large object on a dark background" are all "an object on a dark
    background". Broader phrases are taken worst first; one that is itself predicted to fail (its
    score at least ``threshold``, the samples' :func:`diagnosis.explain.fail_threshold`) and whose content words are
    in the descriptions of two or more modes not yet folded makes them one mode, named by the worst
    of them, with the broader phrase among its phrases. Each mode is folded at most once, so two
    failures (red squares; anything on a dark background) do not chain into one blob through a
    mode that has both ("a red object on a dark background").
    """
    words = [content_words(m["description"]) for m in modes]
    used = [False] * len(modes)
    gone: set[int] = set()
    for j in np.argsort(-pred, kind="stable"):
        if pred[j] < threshold:
            break
        broad = content_words(phrases[j])
        same = [i for i, w in enumerate(words) if broad and not used[i] and broad <= w]
        if len(same) < 2:
            continue
        keep = max(same, key=lambda i: modes[i]["predicted_loss"])
        for i in same:
            used[i] = True
            if i != keep:
                fold(modes[keep], modes[i])
                gone.add(i)
        if phrases[j] not in modes[keep]["phrases"]:
            modes[keep]["phrases"].insert(1, phrases[j])
    return [m for i, m in enumerate(modes) if i not in gone]


def word_modes(phrases: list[str], pred, std, order: np.ndarray, near: np.ndarray, fail: np.ndarray,
               row_pred: np.ndarray) -> list[dict]:
    """A mode per phrase ``order[i]`` (worst first), grouping its nearest rows ``near[i]`` that are
    predicted to fail (``fail``; ``row_pred``: each row's predicted loss); a phrase whose group
    overlaps an earlier mode's is a near-duplicate and joins that mode's phrases."""
    modes = []
    for j, rows in zip(order, near, strict=True):
        group = {int(r) for r in rows if fail[r]}
        if not group:  # nothing near it fails: its worst neighbours still illustrate it
            group = {int(r) for r in rows[np.argsort(-row_pred[rows])[:N_EXAMPLES]]}
        for m in modes:
            if overlap(m["rows"], group) >= SAME_GROUP:
                m["phrases"].append(phrases[j])
                break
        else:
            modes.append({"description": phrases[j], "predicted_loss": float(pred[j]),
                          "predicted_loss_std": float(std[j]), "phrases": [phrases[j]],
                          "rows": group, "source": "words"})
    return modes


def image_modes(X: np.ndarray, phrases: list[str], T: np.ndarray, pred, std, fail: np.ndarray, image_mean,
                seed: int = 0) -> list[dict]:
    """Cluster the failing rows; name each cluster by the phrases nearest its (centred) centroid."""
    from sklearn.cluster import KMeans

    rows = np.flatnonzero(fail)
    if len(rows) < 10:
        return []
    k = int(np.clip(round(np.sqrt(len(rows) / 20)), 1, 12))  # ~20 x k^2 failing rows per k clusters
    rng = np.random.default_rng(seed)
    fit_rows = rows if len(rows) <= MAX_CLUSTER_ROWS else rng.choice(rows, MAX_CLUSTER_ROWS, replace=False)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(X[fit_rows])
    assign = km.predict(X[rows])
    Tc = T - T.mean(axis=0)
    Tc /= np.maximum(np.linalg.norm(Tc, axis=1, keepdims=True), 1e-12)
    min_size = max(5, int(0.02 * len(rows)))
    modes = []
    for c in range(k):
        members = rows[assign == c]
        if len(members) < min_size:
            continue
        centre = X[members].mean(axis=0) - image_mean
        sims = Tc @ (centre / max(np.linalg.norm(centre), 1e-12))
        best = np.argsort(-sims)[:5]
        modes.append({"description": phrases[best[0]], "predicted_loss": float(pred[best[0]]),
                      "predicted_loss_std": float(std[best[0]]), "phrases": [phrases[b] for b in best],
                      "rows": {int(r) for r in members}, "source": "images"})
    return modes


def merge_image_groups(modes: list[dict], groups: list[dict], phrases: list[str], pred, std) -> list[dict]:
    """Fold each image group into the word modes it is (by shared samples, else by its best name);
    a group that matches none becomes a mode of its own, named by its best unused phrase."""
    phrase_index = {p: i for i, p in enumerate(phrases)}
    for g in groups:
        # every word mode lying (mostly) inside this image group is the same failure, named
        # several ways ("a red / a green object on a dark background"): fold them into the worst
        same = [w for w in modes if overlap(w["rows"], g["rows"]) >= SAME_GROUP]
        if not same:
            # the same best name as a word mode's phrase: the same failure, seen from the images
            same = [w for w in modes if g["phrases"][0] in w["phrases"]][:1]
        if same:
            match = max(same, key=lambda w: w["predicted_loss"])
            for w in same:
                if w is not match:
                    fold(match, w)
                    modes.remove(w)
            fold(match, g)
        else:
            # name it by its best phrase that no other mode already uses as its description
            used = {w["description"] for w in modes}
            fresh = [p for p in g["phrases"] if p not in used]
            if fresh:
                j = phrase_index[fresh[0]]
                g.update(description=fresh[0], predicted_loss=float(pred[j]),
                         predicted_loss_std=float(std[j]))
            modes.append(g)
    return modes
