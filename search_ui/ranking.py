"""The ranking score of search results and the result object (pure numpy; no database, no model).

The score
---------
A query (text, image, or a weighted mix of both, see :mod:`search_ui.engine`) first selects its
*neighbourhood* ``B``: the ``NEIGHBOURHOOD * N`` rows most similar to it (``N = candidates``, by
default ``max(100, 10 * k)``), among the rows matching ``--where`` when one is given (on an IVF
index found with the cells a search ``2 N`` deep probes: :mod:`search_ui.engine`, "Probing the
neighbourhood"). The *pool*
``C``, the rows results are drawn from, is the part of ``B`` that stands out as about the query:
the narrowest group of most similar rows that Otsu's threshold on the similarities (the cut that
best splits them into a more and a less similar group) marks off by a clear gap, found by splitting
``B`` again and again, cut where its similarity falls further below the ``N``-th row's than the
``N`` most similar rows span (:func:`pool_size`), and never fewer than the ``N`` most similar; the
``N`` most similar when no group stands out. Over ``B``::

    z(x)_i   = (x_i - mean_B(x)) / std_B(x)                          (0 when the std is 0; ddof = 0)
    score_i  = (1 - w) * z(similarity)_i + w * (p_i - mean_B(p)) / max(std_B(p), s_p)

with ``p`` the predicted loss and ``s_p`` its spread (std) over the whole table; the top ``k`` of ``C``
by ``score`` are returned, ties broken by higher similarity, then id. ``w`` (``--weight``, default
0.5) trades relevance for failure: 0 ranks by similarity alone, 1 by predicted loss alone among the
pool. Because the pool holds only rows that are about the query, the default surfaces the likely
failures among results really about the query, instead of the dataset's hardest samples that merely
look a little like it.

Why the pool follows the query and the units come from the neighbourhood: when many rows are
equally about the query (360 small yellow objects), a fixed pool of the 100 most similar is an
arbitrary slice of them (on one world all on striped backgrounds, where the model rarely failed),
and standardising over rows that are all about the query inflates their tiny similarity
differences to the same weight as predicted loss. Measured in BENCHMARKS.md (issue 13, search). The
floor ``s_p`` keeps the converse from happening: among rows that all look easy, differences of
predicted loss far below the table's spread do not outrank relevance.

A row without ``predicted_loss`` (``llm2loss diagnose`` not run, or rows added since) counts as
``z = 0`` (average); when no row of the pool has one, the order is by similarity alone and the
engine says so in a warning.

The engine ranks with :func:`rank`, one call for the whole rule (the parts :func:`pool_size`,
:func:`rank_scores` and :func:`rank_order` composed, in fewer array passes: it runs on every
query, where numpy's per-call overhead costs more than its arithmetic over 1,000 rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_WEIGHT = 0.5
NEIGHBOURHOOD = 10  # the neighbourhood holds this many times the least pool
MAX_NEIGHBOURHOOD = 20_000  # rows; a larger least pool is its own neighbourhood
CLEAR_SPLIT = 0.9  # share of the similarities' variance a split must explain to mark a group


def default_candidates(k: int) -> int:
    """The least pool for ``k`` results (``N`` of the module doc)."""
    return max(100, 10 * int(k))


def neighbourhood_size(n: int) -> int:
    """Rows of the neighbourhood for a least pool of ``n``: ``NEIGHBOURHOOD * n``, at most
    ``MAX_NEIGHBOURHOOD`` unless ``n`` itself is more."""
    return max(int(n), min(NEIGHBOURHOOD * int(n), MAX_NEIGHBOURHOOD))


def _mean_var(x: np.ndarray, total: float | None = None) -> tuple[float, float]:
    """Mean and variance (ddof 0) of a non-empty float64 array with ``x.mean()``'s and ``x.var()``'s
    own arithmetic (a pairwise sum over n, then the mean square of the deviations; the std is
    ``math.sqrt`` of it, as ``x.std()``): the same values in a few array passes instead of numpy's
    Python-level reductions, which cost more than the arithmetic at the neighbourhood's 1,000 rows
    (this runs several times on every query). ``total``: ``np.add.reduce(x)``, when already known."""
    n = len(x)
    mu = (np.add.reduce(x) if total is None else total) / n
    d = x - mu
    return float(mu), float(np.add.reduce(d * d) / n)


def _otsu(s: np.ndarray, cumsum: np.ndarray, a: np.ndarray, var: float | None = None) -> tuple[int, float]:
    """Otsu's split of ``s`` (sorted, most similar first): the leading count ``a`` maximising the
    between-group variance, and the share of ``s``'s variance that split explains (1: two points).

    ``cumsum`` is ``np.cumsum(s)`` and ``a`` ``np.arange(1, len(s))`` (float64), passed in because
    :func:`pool_size` splits prefixes of one neighbourhood: a prefix's cumulative sums are the head
    of the whole one's (cumsum adds in order), so one cumsum serves every split. ``var``: ``s``'s
    variance when already known."""
    m = len(s)
    left = cumsum[:-1]
    rest = m - a
    between = a * rest * (left / a - (cumsum[-1] - left) / rest) ** 2 / (m * m)
    i = int(np.argmax(between))
    var = _mean_var(s)[1] if var is None else var
    return i + 1, float(between[i]) / var if var > 0 else 0.0


def pool_size(similarity: np.ndarray, least: int) -> int:
    """How many leading rows of the neighbourhood form the pool (module doc).

    ``similarity`` (m,) sorted from most to least similar. The neighbourhood is split by Otsu's
    threshold while the split is a clear gap (it explains at least :data:`CLEAR_SPLIT` of the
    variance; a flat band of similarities explains 0.75, a normal one 0.64) and its leading group
    keeps at least ``least`` rows: splitting again inside a group keeps a phrase's pool to the
    narrowest group about it ("a blue cross" stops at the blue crosses, not at the blue objects).
    The pool is that group, but reaching no further below the ``least``-th row than the ``least``
    most similar rows span (a group's edge, where CLIP blurs it into the next, stays out); the
    ``least`` most similar rows when no group stands out.
    """
    return _pool_size(np.asarray(similarity, dtype=np.float64), least)


def _pool_size(s: np.ndarray, least: int, var: float | None = None) -> int:
    """:func:`pool_size` of float64 ``s``, whose variance ``var`` may be known already."""
    least = max(int(least), 1)
    if len(s) <= least:
        return len(s)
    cumsum, counts = np.cumsum(s), np.arange(1, len(s), dtype=np.float64)
    c, found = len(s), False
    while c > least:
        a, explained = _otsu(s[:c], cumsum[:c], counts[: c - 1], var if c == len(s) else None)
        if explained < CLEAR_SPLIT or a < least:
            break
        c, found = a, True
    if not found:
        return least
    floor = s[least - 1] - (s[0] - s[least - 1])
    return max(least, min(c, int(np.searchsorted(-s, -floor, side="right"))))


def zscore(x: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """(n,) -> (n,) float64 standardised over its finite entries, by ``max(std, floor)``; NaN
    entries become 0."""
    x = np.asarray(x, dtype=np.float64)
    ok, mu, var = _moments(x)
    return _standardise(x, ok, mu, max(math.sqrt(var), floor))


def _moments(x: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """The units of :func:`zscore` for float64 ``x``: the mask of its finite entries (None when all
    are), their mean and variance (0, 0 when there are none)."""
    total = np.add.reduce(x)
    if x.size and math.isfinite(total):  # the common case: every entry is finite (else the sum is
        return None, *_mean_var(x, total)  # not), without a mask (this runs on every query)
    ok = np.isfinite(x)
    if not ok.any():
        return ok, 0.0, 0.0
    return ok, *_mean_var(x[ok])


def _standardise(head: np.ndarray, ok: np.ndarray | None, mu: float, sd: float) -> np.ndarray:
    """:func:`zscore`'s values of ``head``, the first entries of the array ``ok``, ``mu`` and ``sd``
    were taken from."""
    if not sd > 0:
        return np.zeros(len(head))
    if ok is None:
        return (head - mu) / sd
    ok = ok[: len(head)]
    z = np.zeros(len(head))
    z[ok] = (head[ok] - mu) / sd
    return z


def rank_scores(similarity: np.ndarray, predicted_loss: np.ndarray, weight: float = DEFAULT_WEIGHT,
                loss_spread: float = 0.0) -> np.ndarray:
    """The documented score (module doc) of each neighbourhood row: (m,) float64.

    ``similarity`` (m,) cosine (or composite) similarity; ``predicted_loss`` (m,) float with NaN
    where missing; ``weight`` in [0, 1]; ``loss_spread`` ``s_p``, the std of predicted loss over
    the table (0: no floor).
    """
    return (1.0 - weight) * zscore(similarity) + weight * zscore(predicted_loss, floor=loss_spread)


def loss_spread(predicted_loss: np.ndarray) -> float:
    """``s_p``: std of the finite predicted losses of the table (0 when there are none)."""
    p = np.asarray(predicted_loss, dtype=np.float64)
    p = p[np.isfinite(p)]
    return float(p.std()) if len(p) else 0.0


def rank_order(score: np.ndarray, similarity: np.ndarray, ids: list[str]) -> np.ndarray:
    """Positions sorted by score desc, then similarity desc, then id (deterministic ties)."""
    # lexsort takes the unicode id array as its last-priority key directly (no double argsort)
    return np.lexsort((np.asarray(ids, dtype=str), -np.asarray(similarity, np.float64),
                       -np.asarray(score, np.float64)))


def rank(similarity: np.ndarray, predicted_loss: np.ndarray, ids, least: int, k: int,
         weight: float = DEFAULT_WEIGHT, loss_spread: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of a neighbourhood's pool by the documented score (module doc): their
    positions in the neighbourhood, best first, and their scores (float64), each (<= k,).

    The same rows in the same order, with the same scores, as the composition of the parts::

        score = rank_scores(similarity, predicted_loss, weight, loss_spread)
        c = pool_size(similarity, least)
        order = rank_order(score[:c], similarity[:c], ids[:c])[:k]

    done with fewer array passes, as it runs on every query: scores are computed for the pool's
    rows only (their mean and spread still come from the whole neighbourhood), and only the rows
    that can reach the top ``k`` (a score at least the ``k``-th highest, ties included) are sorted.
    ``similarity`` (m,) most similar first; ``predicted_loss`` (m,), NaN where missing; ``ids``
    (m,) str (the last tie-break), or a function of neighbourhood indices (int array) returning
    their ids, so that only the rows that can reach the top ``k`` are looked up.
    """
    s = np.asarray(similarity, dtype=np.float64)
    p = np.asarray(predicted_loss, dtype=np.float64)
    s_ok, s_mu, s_var = _moments(s)
    c = _pool_size(s, least, s_var if s_ok is None else None)  # the first split's variance is the z-score's
    p_ok, p_mu, p_var = _moments(p)
    score = ((1.0 - weight) * _standardise(s[:c], s_ok, s_mu, math.sqrt(s_var))
             + weight * _standardise(p[:c], p_ok, p_mu, max(math.sqrt(p_var), loss_spread)))
    neg = -score
    k = min(int(k), c)
    # the k-th highest score, negated (NaN sorts last); NaN: fewer than k scores are numbers
    kth = np.partition(neg, k - 1)[k - 1] if k < c else math.nan
    cand = np.arange(c) if math.isnan(kth) else np.flatnonzero(neg <= kth)
    cand_ids = ids(cand) if callable(ids) else np.asarray(ids)[cand]
    order = cand[np.lexsort((np.asarray(cand_ids, dtype=str), -s[cand], neg[cand]))][:k]
    return order, score[order]


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class SearchResult:
    """One ranked row: the sample, its losses, how similar it is and its ranking ``score``.

    ``similarity`` is the cosine similarity to the query (for composite queries the weighted
    combination described in :mod:`search_ui.engine`); ``metadata`` holds the manifest's other
    columns.
    """

    id: str
    image: str
    label: str | None
    split: str | None
    loss: float | None
    predicted_loss: float | None
    predicted_loss_std: float | None
    similarity: float
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict: the documented fields, then the metadata columns."""
        d = {
            "id": self.id, "image": self.image, "label": self.label, "split": self.split,
            "loss": _num(self.loss), "predicted_loss": _num(self.predicted_loss),
            "predicted_loss_std": _num(self.predicted_loss_std),
            "similarity": _num(self.similarity), "score": _num(self.score),
        }
        for k, v in self.metadata.items():
            d.setdefault(k, v)
        return d

    def summary(self) -> str:
        """One line for the terminal."""
        def f(x, spec=".3f"):
            return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

        pred = f(self.predicted_loss)
        if self.predicted_loss_std is not None:
            pred += f"±{f(self.predicted_loss_std, '.2f')}"
        return (f"{self.id}  score {f(self.score, '+.2f')}  sim {f(self.similarity)}  predicted loss {pred}  "
                f"loss {f(self.loss)}  label {self.label if self.label is not None else '-'}  {self.image}")
