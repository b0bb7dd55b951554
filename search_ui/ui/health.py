"""Model health as pictures: loss distribution, predicted against true loss, mean loss per label,
and a 2-D map of the embeddings coloured by predicted loss that answers a click with its images.

Everything is read from the table's columns (``loss``, ``predicted_loss``, ``label``, ``embedding``)
and drawn with matplotlib into PIL images. The map keeps the geometry of its axes so a click's pixel
position maps back to data coordinates.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from indexer import schema as S
from indexer.store import Database

log = logging.getLogger(__name__)

#: Points drawn on the map and used for the plots; a uniform subsample above this.
MAX_POINTS = 20_000
DPI = 100


@dataclass
class HealthData:
    """Columns of (a subsample of) the table. ``loss``/``pred``/``std`` are (n,) float64 with NaN
    where missing; ``xy`` is (n, 2) float64, the first two principal components of the embeddings."""

    ids: np.ndarray
    labels: np.ndarray
    loss: np.ndarray
    pred: np.ndarray
    std: np.ndarray
    xy: np.ndarray
    total_rows: int
    explained: tuple[float, float]

    @property
    def has_predictions(self) -> bool:
        return bool(np.isfinite(self.pred).any())

    def spearman(self) -> float:
        """Spearman rho of predicted against true loss over rows having both (NaN if < 3 rows)."""
        from scipy.stats import spearmanr

        ok = np.isfinite(self.loss) & np.isfinite(self.pred)
        if ok.sum() < 3:
            return float("nan")
        return float(spearmanr(self.loss[ok], self.pred[ok]).statistic)

    def label_means(self) -> list[dict]:
        """Per label: count, mean true loss, mean predicted loss; worst (by true loss) first."""
        out = []
        for lab in np.unique(self.labels):
            m = self.labels == lab
            out.append({"label": str(lab), "count": int(m.sum()),
                        "mean_loss": _nanmean(self.loss[m]), "mean_predicted_loss": _nanmean(self.pred[m])})
        return sorted(out, key=lambda r: -np.nan_to_num(r["mean_loss"], nan=-np.inf))

    def summary(self) -> dict:
        return {"rows": self.total_rows, "plotted_rows": len(self.ids),
                "mean_loss": _nanmean(self.loss), "mean_predicted_loss": _nanmean(self.pred),
                "spearman": _finite_or_none(self.spearman()), "labels": self.label_means()}


def _nanmean(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def _finite_or_none(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _floats(col) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in col.to_pylist()], dtype=np.float64)


def load_health(db: Database, max_points: int = MAX_POINTS, seed: int = 0) -> HealthData:
    """Read the columns in batches, keeping a uniform subsample of at most ``max_points`` rows."""
    from sklearn.decomposition import PCA

    n = db.count_rows()
    keep = min(1.0, max_points / max(n, 1))
    rng = np.random.default_rng(seed)
    cols = [S.ID, S.LABEL, S.LOSS, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD, S.EMBEDDING]
    parts: dict[str, list] = {c: [] for c in cols}
    for b in db.iter_batches(cols):
        mask = rng.random(b.num_rows) < keep if keep < 1 else np.ones(b.num_rows, bool)
        b = b.filter(mask)
        parts[S.ID].append(np.asarray(b.column(S.ID).to_pylist(), dtype=object))
        parts[S.LABEL].append(np.asarray([str(v) for v in b.column(S.LABEL).to_pylist()], dtype=object))
        for c in (S.LOSS, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD):
            parts[c].append(_floats(b.column(c)))
        d = b.column(S.EMBEDDING).type.list_size
        parts[S.EMBEDDING].append(np.asarray(b.column(S.EMBEDDING).values.to_numpy()).reshape(-1, d))
    emb = np.concatenate(parts[S.EMBEDDING]).astype(np.float32)
    if len(emb) >= 3:
        pca = PCA(n_components=2, random_state=seed).fit(emb)
        xy, explained = pca.transform(emb).astype(np.float64), tuple(map(float, pca.explained_variance_ratio_))
    else:
        xy, explained = np.zeros((len(emb), 2)), (0.0, 0.0)
    return HealthData(ids=np.concatenate(parts[S.ID]), labels=np.concatenate(parts[S.LABEL]),
                      loss=np.concatenate(parts[S.LOSS]), pred=np.concatenate(parts[S.PREDICTED_LOSS]),
                      std=np.concatenate(parts[S.PREDICTED_LOSS_STD]), xy=xy, total_rows=n,
                      explained=explained)


# ---- drawing ---------------------------------------------------------------------------------
def _figure(w: float = 6.4, h: float = 4.2):
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on a server
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _to_image(fig):
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def plot_loss_distribution(h: HealthData):
    fig = _figure()
    ax = fig.add_subplot()
    finite = [x for x in (h.loss, h.pred) if np.isfinite(x).any()]
    hi = max(float(np.nanmax(x)) for x in finite) if finite else 1.0
    bins = np.linspace(0, max(hi, 1e-6), 40)
    if np.isfinite(h.loss).any():
        ax.hist(h.loss[np.isfinite(h.loss)], bins=bins, alpha=0.6, label="true loss", color="#1f77b4")
    if h.has_predictions:
        ax.hist(h.pred[np.isfinite(h.pred)], bins=bins, alpha=0.6, label="predicted loss", color="#ff7f0e")
    ax.set_xlabel("loss")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.set_title(f"Loss distribution ({len(h.ids)} samples)")
    ax.legend()
    return _to_image(fig)


def plot_predicted_vs_true(h: HealthData):
    fig = _figure()
    ax = fig.add_subplot()
    ok = np.isfinite(h.loss) & np.isfinite(h.pred)
    if ok.any():
        ax.scatter(h.loss[ok], h.pred[ok], s=6, alpha=0.4, color="#1f77b4", linewidths=0)
        hi = float(max(h.loss[ok].max(), h.pred[ok].max()))
        ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="perfect prediction")
        ax.legend(loc="upper left")
        ax.set_title(f"Predicted against true loss: Spearman rho = {h.spearman():.3f}")
    else:
        ax.set_title("No predicted loss yet: run `llm2loss diagnose`")
    ax.set_xlabel("true loss")
    ax.set_ylabel("predicted loss (out-of-fold)")
    return _to_image(fig)


def plot_label_means(h: HealthData, max_labels: int = 30):
    rows = h.label_means()[:max_labels]
    fig = _figure(6.4, max(3.0, 0.28 * len(rows) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    true = [np.nan if r["mean_loss"] is None else r["mean_loss"] for r in rows]
    pred = [np.nan if r["mean_predicted_loss"] is None else r["mean_predicted_loss"] for r in rows]
    ax.barh(y - 0.2, true, height=0.4, label="mean true loss", color="#1f77b4")
    ax.barh(y + 0.2, pred, height=0.4, label="mean predicted loss", color="#ff7f0e")
    ax.set_yticks(y, [f"{r['label']} (n={r['count']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("loss")
    ax.set_title("Mean loss per label, worst first")
    ax.legend(loc="lower right")
    return _to_image(fig)


@dataclass
class MapGeometry:
    """Where the map's axes sit in its image, to turn a click's pixel into data coordinates.

    ``box`` is (left, top, right, bottom) in image pixels (origin top-left); ``xlim``/``ylim`` are the
    data limits of the axes.
    """

    box: tuple[float, float, float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def to_data(self, px: float, py: float) -> tuple[float, float] | None:
        left, top, right, bottom = self.box
        if not (left <= px <= right and top <= py <= bottom):
            return None
        x = self.xlim[0] + (px - left) / (right - left) * (self.xlim[1] - self.xlim[0])
        y = self.ylim[1] - (py - top) / (bottom - top) * (self.ylim[1] - self.ylim[0])
        return x, y

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        px = left + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left)
        py = top + (self.ylim[1] - y) / (self.ylim[1] - self.ylim[0]) * (bottom - top)
        return px, py


def plot_map(h: HealthData):
    """(image, geometry): the PCA map coloured by predicted loss (true loss before `diagnose`)."""
    fig = _figure(7.0, 5.6)
    ax = fig.add_subplot()
    colour, what = (h.pred, "predicted loss") if h.has_predictions else (h.loss, "true loss")
    order = np.argsort(np.nan_to_num(colour, nan=-np.inf))  # worst drawn last, on top
    size = float(np.clip(4000 / max(len(h.ids), 1), 3, 40))  # dots stay visible, crowds stay readable
    sc = ax.scatter(h.xy[order, 0], h.xy[order, 1], c=colour[order], s=size, cmap="inferno_r",
                    linewidths=0, plotnonfinite=True)
    fig.colorbar(sc, ax=ax, label=what)
    ax.set_xlabel(f"PC 1 ({h.explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({h.explained[1]:.0%} of variance)")
    ax.set_title(f"Embeddings coloured by {what}: click a region to see its images")
    fig.canvas.draw()  # fixes the constrained layout so the axes' position is final
    bbox = ax.get_window_extent()
    height = fig.bbox.height
    geom = MapGeometry(box=(bbox.x0, height - bbox.y1, bbox.x1, height - bbox.y0),
                       xlim=tuple(map(float, ax.get_xlim())), ylim=tuple(map(float, ax.get_ylim())))
    return _to_image(fig), geom


def ids_near(h: HealthData, geom: MapGeometry, px: float, py: float, k: int = 16,
             radius: float = 0.06) -> list[str]:
    """Ids of the (at most ``k``) points nearest the clicked pixel, within ``radius`` of the axes'
    span, most predicted-to-fail first. Empty when the click is outside the axes or near no point."""
    at = geom.to_data(px, py)
    if at is None or len(h.ids) == 0:
        return []
    span = np.array([geom.xlim[1] - geom.xlim[0], geom.ylim[1] - geom.ylim[0]])
    d = np.linalg.norm((h.xy - np.asarray(at)) / span, axis=1)
    near = np.argsort(d)[:k]
    near = near[d[near] <= radius]
    key = h.pred if h.has_predictions else h.loss
    near = near[np.argsort(-np.nan_to_num(key[near], nan=-np.inf), kind="stable")]
    return [str(i) for i in h.ids[near]]
