"""The ranking score of search results and the result object (pure numpy; no database, no model).

The score
---------
A query (text, image, or a weighted mix of both, see :mod:`search_ui.engine`) first selects its
*candidate pool* ``C``: the ``N`` rows most similar to it (``N = candidates``, by default
``max(100, 10 * k)``), among the rows matching ``--where`` when one is given. Within ``C``::

    z(x)_i   = (x_i - mean_C(x)) / std_C(x)            (0 when std_C(x) = 0; std with ddof = 0)
    score_i  = (1 - w) * z(similarity)_i + w * z(predicted_loss)_i

and the top ``k`` of ``C`` by ``score`` are returned, ties broken by higher similarity, then id.
``w`` (``--weight``, default 0.5) trades relevance for failure: 0 ranks by similarity alone, 1 by
predicted loss alone among the pool. Because the pool holds only rows that are about the query, the
default surfaces the likely failures among results really about the query, instead of the
dataset's hardest samples that merely look a little like it.

A row without ``predicted_loss`` (``llm2loss diagnose`` not run, or rows added since) counts as
``z = 0`` (average); when no row of the pool has one, the order is by similarity alone and the
engine says so in a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_WEIGHT = 0.5


def default_candidates(k: int) -> int:
    """Size of the candidate pool for ``k`` results."""
    return max(100, 10 * int(k))


def zscore(x: np.ndarray) -> np.ndarray:
    """(n,) -> (n,) float64 standardised over its finite entries; NaN entries become 0."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if x.size and ok.all():  # the common case, without masking (this runs on every query)
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
    out = np.zeros_like(x)
    if not ok.any():
        return out
    mu, sd = x[ok].mean(), x[ok].std()
    if sd > 0:
        out[ok] = (x[ok] - mu) / sd
    return out


def rank_scores(similarity: np.ndarray, predicted_loss: np.ndarray, weight: float = DEFAULT_WEIGHT) -> np.ndarray:
    """The documented score (module doc) of each pool row: (n,) float64.

    ``similarity`` (n,) cosine (or composite) similarity; ``predicted_loss`` (n,) float with NaN
    where missing; ``weight`` in [0, 1].
    """
    return (1.0 - weight) * zscore(similarity) + weight * zscore(predicted_loss)


def rank_order(score: np.ndarray, similarity: np.ndarray, ids: list[str]) -> np.ndarray:
    """Positions sorted by score desc, then similarity desc, then id (deterministic ties)."""
    # lexsort takes the unicode id array as its last-priority key directly (no double argsort)
    return np.lexsort((np.asarray(ids, dtype=str), -np.asarray(similarity, np.float64),
                       -np.asarray(score, np.float64)))


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
