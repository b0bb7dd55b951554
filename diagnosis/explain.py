"""``llm2loss explain``: name the model's failure modes in words, worst first.

Two views, merged where they find the same samples:

* **words** -- every phrase of a vocabulary is scored across the modality gap: by default its
  predicted loss is the mean of the ensemble's (out-of-fold) predictions on the images CLIP retrieves
  for it (its "neighbourhood"); ``correction="projection"`` scores the ensemble at the mean of those
  images, ``"shift"`` at the text embedding moved by the mean offset (see :mod:`diagnosis.text`).
  The neighbourhood mean never asks the ensemble about a point off the image manifold (the mean of
  many images is one: there the projection scored "a blue object" 2.3, above every group's true loss),
  and has the lowest sum of planted-slice ranks, though the shift names more slices in its top 3
  (BENCHMARKS.md, issue 4). The worst phrases are failure modes. A phrase's group is its
  nearest images (by CLIP similarity) that are predicted to fail (:func:`fail_threshold`); its examples are
  the group's worst.
* **images** -- the samples predicted to fail are clustered (k-means on the unit sphere); each cluster
  is a failure group, named by the phrases nearest its centroid (both sides centred on their
  modality's mean, so the shared offset does not decide the name). A cluster whose best name is
  already one of a word mode's phrases is that mode (merged, like an overlapping one).

Two modes are the same when their groups overlap (overlap coefficient |A n B| / min(|A|, |B|) >= 0.5):
near-duplicate phrases fold into the worst one, and a word mode absorbs the image group it matches
(``source`` "both"). Modes that all specialise one broader phrase predicted to fail are one failure
seen through a word the model ignores, and are folded together too (:func:`diagnosis.modes.generalise`). Every
mode reports its size, mean true and predicted loss, and its share of the table's total loss (what
fixing it would be worth).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from diagnosis.modes import N_EXAMPLES, generalise, image_modes, merge_image_groups, word_modes
from diagnosis.text import Scorer, estimate_gap
from diagnosis.vocab import (
    compose_pairs,
    dataset_vocabulary,
    generic_concepts,
    generic_modifiers,
    generic_singles,
    read_vocab_file,
)
from indexer import schema as S
from indexer.errors import UserError

log = logging.getLogger(__name__)

FAIL_QUANTILE = 0.90
FAIL_RATIO = 2.0
_BLOCK_CELLS = 1 << 23  # query x row similarities computed at once by _top_neighbours


@dataclass
class FailureMode:
    """A named group of samples the model fails on.

    ``predicted_loss`` (loss units) is the score of the description itself (see :func:`explain`);
    ``mean_loss`` / ``mean_predicted_loss`` average the group's samples (``mean_loss`` is None
    without true losses); ``share_of_loss`` is the group's fraction of the table's total loss;
    ``ids`` lists every member (``examples``: the worst few, for display); ``phrases`` are the
    description and then the other phrases whose groups the mode absorbed and that are themselves
    predicted to fail, worst-scoring first.
    """

    description: str
    predicted_loss: float
    predicted_loss_std: float
    examples: list[str]
    size: int
    mean_loss: float | None
    mean_predicted_loss: float
    share_of_loss: float | None
    phrases: list[str]
    source: str  # "words" | "images" | "both"
    ids: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, with_ids: bool = False) -> dict:
        d = asdict(self)
        if not with_ids:
            d.pop("ids")
        return d

    def summary(self) -> str:
        loss = "n/a" if self.mean_loss is None else f"{self.mean_loss:.3f}"
        share = "n/a" if self.share_of_loss is None else f"{100 * self.share_of_loss:.1f}%"
        also = [p for p in self.phrases if p != self.description][:2]
        return (
            f"{self.description!r}: predicted loss {self.predicted_loss:.3f} +/- {self.predicted_loss_std:.3f}; "
            f"{self.size} samples, mean loss {loss} (predicted {self.mean_predicted_loss:.3f}), "
            f"{share} of all loss [{self.source}]"
            + (f"; also {', '.join(repr(p) for p in also)}" if also else "")
            + (f"; e.g. {', '.join(self.examples[:3])}" if self.examples else "")
        )


@dataclass
class _Table:
    ids: np.ndarray  # (n,) object
    X: np.ndarray  # (n, d) float32, L2-normalised
    loss: np.ndarray  # (n,) float64, NaN where unknown
    pred: np.ndarray  # (n,) float64, the stored out-of-fold predicted_loss
    std: np.ndarray  # (n,) float64, the stored predicted_loss_std

    @property
    def total_loss(self) -> float:
        return float(np.nansum(self.loss))


def _read_table(db) -> _Table:
    """Ids, embeddings, losses and stored predictions, all from one snapshot of the table (so in
    one row order, with no id lookups)."""
    from diagnosis.run import read_embeddings

    snap = db.snapshot()
    cols = [S.ID, S.LOSS, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD]
    t = pa.concat_tables(pa.Table.from_batches([b]) for b in db.iter_batches(cols, snapshot=snap))
    pred = t.column(S.PREDICTED_LOSS).to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(pred).any():
        raise UserError(
            f"{int(np.isnan(pred).sum())} rows of {db.path} have no predicted_loss; "
            f"run `llm2loss diagnose --db {db.path}` first."
        )
    X = read_embeddings(db, snap, t.num_rows)
    std = t.column(S.PREDICTED_LOSS_STD).to_numpy(zero_copy_only=False).astype(np.float64)
    return _Table(ids=t.column(S.ID).to_numpy(zero_copy_only=False), X=X,
                  loss=t.column(S.LOSS).to_numpy(zero_copy_only=False).astype(np.float64),
                  pred=pred, std=np.nan_to_num(std))


def _top_neighbours(X: np.ndarray, Q: np.ndarray, m: int, block: int = 65536) -> np.ndarray:
    """(q, m) row indices of the ``m`` rows of X most cosine-similar to each row of Q, streamed over
    row blocks so memory stays O((block + m) x q): the block shrinks as queries grow, so ~1,000
    phrases against 1M rows hold ~100 MB of similarities at a time, not 1.5 GB (issue 7)."""
    block = max(1024, min(int(block), _BLOCK_CELLS // max(1, len(Q))))
    best_s = np.full((len(Q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(Q), 0), dtype=np.int64)
    for s in range(0, len(X), block):
        sims = Q @ X[s : s + block].T  # (q, b)
        idx = np.broadcast_to(np.arange(s, s + sims.shape[1]), sims.shape)
        cat_s = np.concatenate([best_s, sims], axis=1)
        cat_i = np.concatenate([best_i, idx], axis=1)
        keep = np.argpartition(-cat_s, min(m, cat_s.shape[1]) - 1, axis=1)[:, :m]
        best_s = np.take_along_axis(cat_s, keep, axis=1)
        best_i = np.take_along_axis(cat_i, keep, axis=1)
    return best_i


def fail_threshold(pred: np.ndarray) -> float:
    """The predicted loss from which a sample is "predicted to fail": the top decile or at least
    twice the mean, whichever takes more rows (a failure group bigger than 10% of the table is kept
    whole)."""
    return min(float(np.quantile(pred, FAIL_QUANTILE)), FAIL_RATIO * float(np.mean(pred)))


def _stats(rows: np.ndarray, t: _Table) -> dict:
    rows = np.asarray(sorted(rows), dtype=np.int64)
    loss = t.loss[rows]
    known = np.isfinite(loss)
    order = rows[np.argsort(-t.pred[rows], kind="stable")]
    total = t.total_loss
    return {
        "examples": [str(i) for i in t.ids[order[:N_EXAMPLES]]],
        "size": len(rows),
        "mean_loss": float(loss[known].mean()) if known.any() else None,
        "mean_predicted_loss": float(t.pred[rows].mean()) if len(rows) else float("nan"),
        "share_of_loss": float(loss[known].sum() / total) if known.any() and total > 0 else None,
        "ids": [str(i) for i in t.ids[order]],
    }


def resolve_vocabulary(db, vocab) -> tuple[list[str], bool]:
    """(phrases, generic): a file path, a list of phrases, or None for the database's default."""
    if vocab is None:
        found = dataset_vocabulary(db)
        return (found[0], False) if found else (generic_singles(), True)
    if isinstance(vocab, str | os.PathLike):
        return read_vocab_file(vocab), False
    phrases = [str(p).strip() for p in vocab if str(p).strip()]
    if not phrases:
        raise UserError("the vocabulary is empty; give at least one phrase.")
    return list(dict.fromkeys(phrases)), False


CORRECTIONS = ("neighbourhood", "projection", "shift")


def neighbourhood_size(n: int) -> int:
    """Images a phrase is judged by: the 0.5% of the table CLIP finds most alike, 20 to 200."""
    return int(np.clip(0.005 * n, 20, 200))


def score_vocabulary(scorer: Scorer, phrases: list[str], generic: bool, correct_gap: bool = True,
                     refine: int = 8, correction: str = "neighbourhood", table: _Table | None = None,
                     k: int = 100):
    """Encode and score phrases; for the generic list, also pairs of the worst objects and modifiers.

    ``correction``: ``"neighbourhood"`` scores each phrase by the mean stored predicted loss (and
    spread) of its ``k`` most similar images in ``table``; ``"projection"`` by the ensemble at the
    mean of those images (:func:`diagnosis.text.neighbour_projection`); ``"shift"`` by the ensemble at
    its embedding moved by the mean image-minus-text offset; ``correct_gap=False`` scores raw text
    embeddings. Returns (phrases, raw text embeddings (m, d), predicted loss (m,), spread (m,)).
    """
    from diagnosis.text import neighbour_projection

    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if correct_gap and correction != "shift" and table is None:
        raise ValueError(f"the {correction} correction needs the table's embeddings")
    gap = None

    def score(T):
        nonlocal gap
        if not correct_gap:
            return scorer.score_text_embeddings(T, False)
        if correction == "neighbourhood":
            nn = _top_neighbours(table.X, T, k)
            return table.pred[nn].mean(axis=1), table.std[nn].mean(axis=1)
        if correction == "projection":
            return scorer.score_images(neighbour_projection(T, table.X, k))
        gap = scorer.gap(T) if gap is None else gap
        return scorer.score_text_embeddings(T, True, gap)

    T = scorer.encode_text(phrases)
    pred, std = score(T)
    if generic:
        objects = list(generic_concepts()["objects"])
        mods = generic_modifiers()
        by_phrase = dict(zip(phrases, pred, strict=True))
        top_o = sorted(objects, key=lambda p: -by_phrase.get(p, -np.inf))[:refine]
        top_m = sorted(mods, key=lambda m: -by_phrase.get(f"a photo {m}", -np.inf))[:refine]
        pairs = [p for p in dict.fromkeys(compose_pairs(top_o, mods) + compose_pairs(objects, top_m))
                 if p not in by_phrase]
        if pairs:
            T2 = scorer.encode_text(pairs)
            p2, s2 = score(T2)
            phrases, T = phrases + pairs, np.vstack([T, T2])
            pred, std = np.concatenate([pred, p2]), np.concatenate([std, s2])
    return phrases, T, pred, std


def explain(db, vocab=None, top: int = 10, correct_gap: bool = True, neighbours: int | None = None,
            images: bool = True, correction: str = "neighbourhood") -> list[FailureMode]:
    """The ``top`` worst failure modes of ``db``, worst (highest predicted loss) first.

    ``vocab``: a file of phrases, a list of phrases, or None (the dataset's ``vocab.txt``, else the
    generic concepts composed into pairs). ``neighbours``: images considered near a phrase (default
    2% of the table, between 50 and 2000). ``images``: also discover groups by clustering.
    ``correction``: how phrases cross the modality gap: ``"neighbourhood"`` (default: the mean
    predicted loss of the phrase's :func:`neighbourhood_size` most similar images), ``"projection"``
    (the ensemble at their mean) or ``"shift"`` (the mean offset; see :mod:`diagnosis.text`);
    ``correct_gap=False`` scores raw text embeddings (for measuring what the correction buys).
    """
    from diagnosis.run import open_db

    if top < 1:
        raise UserError(f"--top {top} must be at least 1.")
    db = open_db(db)
    scorer = Scorer(db)
    phrases, generic = resolve_vocabulary(db, vocab)
    t = _read_table(db)
    phrases, T, pred, std = score_vocabulary(scorer, phrases, generic, correct_gap, correction=correction,
                                             table=t, k=neighbourhood_size(len(t.ids)))
    threshold = fail_threshold(t.pred)
    fail = t.pred >= threshold
    m = neighbours or int(np.clip(0.02 * len(t.ids), 50, 2000))
    m = min(m, len(t.ids))
    order = np.argsort(-pred, kind="stable")[: max(4 * top, 40)]
    modes = word_modes(phrases, pred, std, order, _top_neighbours(t.X, T[order], m), fail, t.pred)
    if images:
        groups = image_modes(t.X, phrases, T, pred, std, fail, scorer.image_mean)
        modes = merge_image_groups(modes, groups, phrases, pred, std)
    modes = generalise(modes, phrases, pred, threshold)
    modes.sort(key=lambda w: -w["predicted_loss"])
    score = dict(zip(phrases, pred, strict=True))
    out = []
    for w in modes[:top]:
        # the name first, then the other phrases that are themselves predicted to fail, worst first
        # (a phrase whose group merely touched this one, "a blue square" beside failing blue circles,
        # does not describe the failure)
        others = [p for p in w["phrases"] if p != w["description"] and score[p] >= threshold]
        w["phrases"] = [w["description"]] + sorted(others, key=lambda p: -score[p])
        rows = np.fromiter(w.pop("rows"), dtype=np.int64)
        out.append(FailureMode(**w, **_stats(rows, t)))
    return out


def explain_gap_report(db, vocab=None) -> dict:
    """Diagnostics of the modality gap on ``db``: the gap's norm, and the mean cosine of phrases to
    the mean image before and after the correction (higher = the ensemble reads them in-distribution)."""
    db_scorer = Scorer(db)
    phrases, _ = resolve_vocabulary(db_scorer.db, vocab)
    T = db_scorer.encode_text(phrases)
    gap = estimate_gap(db_scorer.image_mean, T)
    mi = db_scorer.image_mean / np.linalg.norm(db_scorer.image_mean)
    return {
        "gap_norm": float(np.linalg.norm(gap)),
        "cos_to_image_mean_raw": float((T @ mi).mean()),
        "cos_to_image_mean_corrected": float((db_scorer.to_image_space(T, gap=gap) @ mi).mean()),
    }
