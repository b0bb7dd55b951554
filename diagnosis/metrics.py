"""How well predicted losses match true ones: rank correlation, R^2, and finding the worst 10%."""

from __future__ import annotations

import numpy as np


def quality(loss: np.ndarray, predicted: np.ndarray, top: float = 0.10) -> dict:
    """Quality of ``predicted`` against true ``loss`` (both (n,) float, same units).

    Returns ``spearman`` (rank correlation), ``r2`` (coefficient of determination, loss units) and
    ``auroc_top10``: the AUROC of ``predicted`` for telling the top ``top`` fraction of true losses
    from the rest (0.5 = chance). Values are NaN where undefined (fewer than 3 samples, constant input).
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import r2_score

    loss = np.asarray(loss, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    ok = np.isfinite(loss) & np.isfinite(predicted)
    loss, predicted = loss[ok], predicted[ok]
    out = {"n": int(loss.size), "spearman": float("nan"), "r2": float("nan"), "auroc_top10": float("nan")}
    if loss.size < 3 or np.ptp(loss) == 0:
        return out
    if np.ptp(predicted) > 0:
        out["spearman"] = float(spearmanr(loss, predicted).statistic)
    out["r2"] = float(r2_score(loss, predicted))
    out["auroc_top10"] = auroc_top(loss, predicted, top)
    return out


def undefined_why(loss: np.ndarray, predicted: np.ndarray) -> str | None:
    """Why :func:`quality` leaves some figure NaN, as a clause for a person (None when all are defined)."""
    loss = np.asarray(loss, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    ok = np.isfinite(loss) & np.isfinite(predicted)
    loss, predicted = loss[ok], predicted[ok]
    if loss.size < 3:
        return f"only {loss.size} rows have both a loss and a prediction, and quality needs at least 3"
    if np.ptp(loss) == 0:
        return (f"every loss is {loss[0]:g}, so there is nothing to rank: Spearman, R^2 and AUROC are undefined "
                "(check that the losses were computed per sample)")
    if np.ptp(predicted) == 0:
        return f"every predicted loss is {predicted[0]:g}, so Spearman is undefined (the ensemble found no signal)"
    return None


def auroc_top(loss: np.ndarray, score: np.ndarray, top: float = 0.10) -> float:
    """AUROC of ``score`` for the samples whose ``loss`` is in the top ``top`` fraction."""
    from sklearn.metrics import roc_auc_score

    hard = loss >= np.quantile(loss, 1.0 - top)
    if hard.all() or not hard.any():
        return float("nan")
    return float(roc_auc_score(hard, score))
