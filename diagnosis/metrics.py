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


#: Skill: a figure at least this many of its standard errors under "no association" above chance...
SKILL_Z = 3.0
#: ...and above chance by at least this much (Spearman rho; AUROC - 0.5): at a million rows 3
#: standard errors are 0.003, an association too weak to name anything by.
MIN_SKILL = 0.05


def chance_lines(n: int, top: float = 0.10) -> tuple[float, float]:
    """(Spearman, AUROC(top ``top``)) above which ``n`` out-of-fold predictions are beyond noise of
    chance: ``SKILL_Z`` standard errors under no association (Spearman: 1/sqrt(n-1); AUROC: the
    Mann-Whitney null, sqrt((n1+n0+1) / (12 n1 n0))), and at least ``MIN_SKILL`` above chance."""
    n1 = max(1, round(top * n))
    n0 = max(1, n - n1)
    rho = SKILL_Z / np.sqrt(max(1, n - 1))
    auc = SKILL_Z * np.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    return float(max(rho, MIN_SKILL)), float(0.5 + max(auc, MIN_SKILL))


def no_skill(q: dict, why_undefined: str | None = None) -> str | None:
    """One sentence when the ensemble has no skill -- neither its out-of-fold Spearman nor its
    AUROC(top 10% losses) (``q``: :func:`quality`) is beyond noise of chance (:func:`chance_lines`)
    -- else None. ``why_undefined``: :func:`undefined_why`, used when the figures are undefined."""
    n = int(q.get("n") or 0)
    rho, auc = q.get("spearman", float("nan")), q.get("auroc_top10", float("nan"))
    if n < 3 or not (np.isfinite(rho) or np.isfinite(auc)):
        why = why_undefined or f"only {n} rows have both a loss and a prediction"
        return f"the embeddings do not explain these losses: {why}."
    rho_line, auc_line = chance_lines(n)
    if (np.isfinite(rho) and rho >= rho_line) or (np.isfinite(auc) and auc >= auc_line):
        return None
    fig = lambda x: f"{x:.3f}" if np.isfinite(x) else "undefined"  # noqa: E731
    return (f"the embeddings do not explain these losses: out-of-fold Spearman {fig(rho)} and AUROC(top 10% "
            f"losses) {fig(auc)} on {n:,} rows are within noise of chance (skill starts at {rho_line:.3f} and "
            f"{auc_line:.3f}), so no group of images can be named as where the model fails; check that each "
            "loss belongs to its image (ids, row order) and that the failures show in the images.")
