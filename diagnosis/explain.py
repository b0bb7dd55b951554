"""``llm2loss explain``: name the model's failure modes in words, worst first, each with the evidence
that its name describes a real failure.

1. The rows predicted to fail (:func:`fail_threshold`) are named greedily by the phrase of the
   vocabulary -- or a composition of its best phrases -- whose retrieved images gather the most
   predicted loss above the failure line, among the names true of the failing images they gather
   (:mod:`diagnosis.modes`); fragments of one failure seen through one kind of word fold into what
   they share (:func:`generalise`), two failures never do.
2. Every name is checked against the data before it is shown (:func:`evidence`): the images it
   retrieves (as many as separate the group best) must fail -- their mean predicted loss, and
   their mean true loss on the held-out rows where losses are known, at least ``FAIL_RATIO`` x the
   table's mean, as must every judged row that shows the name (:func:`_check_described`) -- and
   the group must hold ``MIN_SAMPLES`` samples. A group whose best name fails the check is named by
   the next best separating phrase that passes, beyond noise once a name failed on true loss
   (:func:`_check_beyond_noise`); when none does, the mode is hidden (``show_all`` lists it, with
   ``shown`` false and the reason).

Only labelled rows are named and judged: the unlabeled pool (``split = "pool"``) has no loss to
judge a name by, so it stays out of the naming; each mode then says how many pool images its name
retrieves (:func:`name_matches`: ``pool_rows``), the images ``llm2loss curate`` can send for labelling.

Modes are listed by :func:`cost`, the share of the held-out loss their group carries above the
mean loss (a 95% interval beside it), so the failures that cost the most come first: a small group
failing badly before a large one failing mildly. Each mode reports its evidence (retrieved images, their true and predicted loss with bootstrap 95%
intervals, coverage and precision of the name against the group), its members (``ids``), their
mean true and predicted loss, and their share of the table's total loss.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa

from diagnosis.modes import (
    BASE_ROWS,
    EXCESS_RATIO,
    N_EXAMPLES,
    TAIL_SHARE,
    Faithfulness,
    content_words,
    describing_names,
    find_modes,
)
from diagnosis.text import Scorer
from diagnosis.vocab import (
    Grammar,
    compose_pairs,
    dataset_vocabulary,
    generic_concepts,
    generic_modifiers,
    read_vocab_file,
    real_vocabulary,
)
from indexer import schema as S
from indexer.errors import UserError

log = logging.getLogger(__name__)

FAIL_QUANTILE = 0.90
FAIL_RATIO = 2.0
MIN_SAMPLES = 20
MIN_EVIDENCE_ROWS = 10  # retrieved rows with a true loss needed before the true loss is judged
BOOTSTRAP = 500
TRAIN_SPLITS = frozenset({"train", "training"})
_BLOCK_CELLS = 1 << 23  # query x row similarities computed at once by _top_neighbours


@dataclass
class FailureMode:
    """A named group of samples the model fails on.

    ``predicted_loss`` (loss units) is the mean predicted loss of the images the description
    retrieves (``evidence``); ``mean_loss`` / ``mean_predicted_loss`` average the group's members
    (``mean_loss`` over the rows whose true loss counts: the held-out ones when the table has a
    training split; None without losses); ``share_of_loss`` is the members' fraction of those rows'
    total loss; ``ids`` lists every member, worst first (``examples``: a few the name retrieves,
    spread from the worst to the least bad, for display); ``phrases`` are the description and the next best separating phrases; ``shown`` is
    False for a mode whose evidence does not hold (``evidence["reason"]`` says why).
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
    evidence: dict = field(default_factory=dict)
    shown: bool = True
    #: what the group costs (:func:`cost`): its share of the judged rows' loss above their mean, with
    #: a 95% interval, and ``cost_basis`` saying which rows measured it
    cost: float | None = None
    cost_ci: list[float] | None = None
    cost_basis: str | None = None
    #: unlabeled pool images the name retrieves (:func:`pool_matches`); None without a pool
    pool_rows: int | None = None
    pool_ids: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, with_ids: bool = False) -> dict:
        d = asdict(self)
        if not with_ids:
            d.pop("ids")
            d.pop("pool_ids")
        return d

    def summary(self) -> str:
        loss = "n/a" if self.mean_loss is None else f"{self.mean_loss:.3f}"
        share = "n/a" if self.share_of_loss is None else f"{100 * self.share_of_loss:.1f}%"
        head = f"{self.description!r}: {self.size} samples, mean loss {loss} (predicted {self.mean_predicted_loss:.3f}), " \
               f"{share} of all loss"
        if self.cost is not None:
            lo, hi = self.cost_ci or (self.cost, self.cost)
            head += f"; costs {100 * self.cost:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of the loss above the mean"
        if not self.shown:
            head = f"[hidden: {self.evidence.get('reason')}] " + head
        ev = self.evidence
        out = head
        if ev:
            true = "true loss n/a" if ev.get("true_loss") is None else (
                f"true loss {ev['true_loss']:.3f} [{ev['true_loss_ci'][0]:.3f}, {ev['true_loss_ci'][1]:.3f}] "
                f"= {ev['true_loss_ratio']:.1f}x the mean")
            out += (f"\n      evidence: the {ev['retrieved']} {evidence_rows(ev)} have {true}, predicted "
                    f"{ev['predicted_loss']:.3f} [{ev['predicted_loss_ci'][0]:.3f}, {ev['predicted_loss_ci'][1]:.3f}] "
                    f"= {ev['predicted_loss_ratio']:.1f}x; it covers {100 * ev['coverage']:.0f}% of the group at "
                    f"{100 * ev['precision']:.0f}% precision")
            if ev.get("judged_by") == "described rows":
                lo, hi = ev["described_loss_ratio_ci"]
                out += (f"; the {ev['described_rows']} judged images that show the name: true loss "
                        f"{ev['described_loss_ratio']:.1f}x the mean [{lo:.1f}, {hi:.1f}]")
            if ev.get("renamed_from"):
                out += f"; named by what its failing images show, instead of {ev['renamed_from']!r} (whose evidence did not hold)"
            if ev.get("beyond_loss_ratio") is not None:
                out += (f"; it overlaps other modes, and its {ev['beyond_rows']} judged images that show none of "
                        f"their names have {ev['beyond_loss_ratio']:.1f}x the mean true loss")
        also = [p for p in self.phrases if p != self.description][:2]
        if also:
            out += f"\n      also: {', '.join(repr(p) for p in also)}"
        if self.examples:
            out += f"\n      e.g. {', '.join(self.examples[:3])}"
        if self.pool_rows is not None:
            out += f"\n      unlabeled pool: its name retrieves {self.pool_rows} images (`llm2loss curate` plans which to label)"
        return out


class Modes(list):
    """:func:`explain`'s answer: the modes, ``note``, one sentence saying why it shows none (None
    when it shows some), and ``hidden``, how many modes failed their check (listed only with
    ``show_all``)."""

    note: str | None = None
    hidden: int = 0


def why_none(modes: list[FailureMode], no_skill: str | None) -> str | None:
    """Why ``explain`` shows no mode, in one sentence (None when it shows one): the ensemble has no
    skill (``no_skill``, from the diagnosis), or every name found failed its check against the
    data, or no group the vocabulary can name gathers the predicted failures."""
    if any(m.shown for m in modes):
        return None
    if no_skill:
        return no_skill[0].upper() + no_skill[1:]
    hidden = [m for m in modes if not m.shown]
    if hidden:
        return (f"No failure mode is shown: the {len(hidden)} group(s) found failed their check against the data "
                f"(the first, {hidden[0].description!r}: {hidden[0].evidence.get('reason')}).")
    return (f"No failure mode is shown: no group of images the vocabulary can name gathers the predicted failures "
            f"(at least {FAIL_RATIO:g}x the mean loss over {MIN_SAMPLES} images); a vocabulary of what the images "
            "show (--vocab FILE) may name them.")


def evidence_rows(ev: dict) -> str:
    """Which images a mode's evidence counts, for a sentence ("the 686 held-out images that show
    the name have ...")."""
    return {"held-out rows that show the name": "held-out images that show the name",
            "rows that show the name": "images that show the name"}.get(ev.get("rows"), "images the name retrieves")


@dataclass
class _Table:
    ids: np.ndarray  # (n,) object
    X: np.ndarray  # (n, d) float32, L2-normalised
    loss: np.ndarray  # (n,) float64, NaN where unknown
    pred: np.ndarray  # (n,) float64, the stored out-of-fold predicted_loss
    std: np.ndarray  # (n,) float64, the stored predicted_loss_std
    split: np.ndarray | None = None  # (n,) object, or None
    pool: _Pool | None = None  # the unlabeled rows, kept out of every array above

    @cached_property
    def total_loss(self) -> float:
        return float(np.nansum(self.loss[self.judged]))

    @cached_property
    def row(self) -> dict[str, int]:
        """id -> its row in these arrays."""
        return {str(x): i for i, x in enumerate(self.ids)}

    @cached_property
    def judged(self) -> np.ndarray:
        """(n,) bool: rows whose true loss is evidence: those with a loss, and of them only the
        held-out ones when the table has both a training split and another (training losses of a
        model that memorised its training set say little of where it fails). Computed once per
        table (it parses the split column); the table's arrays are not changed after reading."""
        known = np.isfinite(self.loss)
        if self.split is None:
            return known
        split = np.array([str(s).lower() if s is not None else "" for s in self.split], dtype=object)
        train = np.isin(split, list(TRAIN_SPLITS))
        held = known & ~train & (split != "")
        return held if train.any() and held.sum() >= MIN_SAMPLES else known


@dataclass
class _Pool:
    """The unlabeled rows (``split = "pool"``): ids (p,) object, X (p, d) float32, pred (p,) float64."""

    ids: np.ndarray
    X: np.ndarray
    pred: np.ndarray

    @cached_property
    def row(self) -> dict[str, int]:
        """id -> its row in these arrays."""
        return {str(x): j for j, x in enumerate(self.ids)}


def _read_table(db) -> _Table:
    """Ids, embeddings, losses and stored predictions, all from one snapshot of the table (so in
    one row order, with no id lookups); the unlabeled pool's rows are set apart in ``pool``."""
    from diagnosis.run import read_embeddings

    snap = db.snapshot()
    cols = [S.ID, S.LOSS, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD]
    if S.SPLIT in db.table.schema.names:
        cols.append(S.SPLIT)
    t = pa.concat_tables(pa.Table.from_batches([b]) for b in db.iter_batches(cols, snapshot=snap))
    pred = t.column(S.PREDICTED_LOSS).to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(pred).any():
        raise UserError(
            f"{int(np.isnan(pred).sum())} rows of {db.path} have no predicted_loss; "
            f"run `llm2loss diagnose --db {db.path}` first."
        )
    X = read_embeddings(db, snap, t.num_rows)
    std = t.column(S.PREDICTED_LOSS_STD).to_numpy(zero_copy_only=False).astype(np.float64)
    ids = t.column(S.ID).to_numpy(zero_copy_only=False)
    loss = t.column(S.LOSS).to_numpy(zero_copy_only=False).astype(np.float64)
    split = t.column(S.SPLIT).to_numpy(zero_copy_only=False) if S.SPLIT in t.column_names else None
    unl = (split == S.POOL_SPLIT) if split is not None else np.zeros(len(ids), dtype=bool)
    if not unl.any():
        return _Table(ids=ids, X=X, loss=loss, pred=pred, std=np.nan_to_num(std), split=split)
    keep = ~unl
    return _Table(ids=ids[keep], X=X[keep], loss=loss[keep], pred=pred[keep], std=np.nan_to_num(std[keep]),
                  split=split[keep], pool=_Pool(ids=ids[unl], X=X[unl], pred=pred[unl]))


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


def _members(rows: np.ndarray, retrieved: np.ndarray, t: _Table) -> dict:
    """A mode's members: size, mean true / predicted loss, share of the loss, ids (worst first) and
    examples: members its name retrieves (then others), spread evenly from the worst to the least
    bad, so they show the group rather than its worst corner (the worst striped triangles are all
    blue ones, which fail twice over)."""
    rows = np.asarray(sorted(rows), dtype=np.int64)
    judged = rows[t.judged[rows]]
    order = rows[np.argsort(-t.pred[rows], kind="stable")]
    named = np.isin(order, retrieved)
    pool = np.concatenate([order[named], order[~named]]) if named.sum() < N_EXAMPLES else order[named]
    shown = pool[np.unique(np.linspace(0, len(pool) - 1, min(N_EXAMPLES, len(pool))).round().astype(int))] \
        if len(pool) else pool
    total = t.total_loss
    return {
        "examples": [str(i) for i in t.ids[shown]],
        "size": len(rows),
        "mean_loss": float(t.loss[judged].mean()) if len(judged) else None,
        "mean_predicted_loss": float(t.pred[rows].mean()) if len(rows) else float("nan"),
        "share_of_loss": float(t.loss[judged].sum() / total) if len(judged) and total > 0 else None,
        "ids": [str(i) for i in t.ids[order]],
    }


def bootstrap_ci(values: np.ndarray, n_boot: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (at most 5,000 of them resampled)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if len(v) > 5000:
        v = rng.choice(v, 5000, replace=False)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return (float(lo), float(hi))


def retrieve(t: _Table, q: np.ndarray, r: int) -> np.ndarray:
    """Row numbers of the ``r`` rows most similar to the (d,) text embedding ``q``, most similar first."""
    sims = t.X @ q
    r = max(1, min(int(r), len(sims)))
    top = np.argpartition(-sims, r - 1)[:r] if r < len(sims) else np.arange(len(sims))
    return top[np.argsort(-sims[top], kind="stable")]


def evidence(t: _Table, retrieved: np.ndarray, size: int, coverage: float, precision: float, gain: float) -> dict:
    """Whether a name's own images fail: the retrieved rows' mean predicted loss (and, on the
    judged rows among them, true loss) with bootstrap 95% intervals and their ratio to the
    table's mean; ``holds`` and, when it does not, ``reason``."""
    judged = t.judged
    mean_pred = float(t.pred.mean())
    mean_true = float(t.loss[judged].mean()) if judged.any() else None
    p = t.pred[retrieved]
    truth = t.loss[retrieved[judged[retrieved]]]
    ev = {"retrieved": len(retrieved), "retrieved_examples": [str(i) for i in t.ids[retrieved[:N_EXAMPLES]]],
          "predicted_loss": float(p.mean()), "predicted_loss_ci": list(bootstrap_ci(p)),
          "predicted_loss_ratio": float(p.mean() / mean_pred) if mean_pred > 0 else None,
          "true_rows": len(truth), "true_loss": None, "true_loss_ci": None, "true_loss_ratio": None,
          "coverage": coverage, "precision": precision, "excess_loss": gain,
          "rows": "images the name retrieves"}
    if len(truth) and mean_true is not None:
        ev.update(true_loss=float(truth.mean()), true_loss_ci=list(bootstrap_ci(truth)),
                  true_loss_ratio=float(truth.mean() / mean_true) if mean_true > 0 else None)
    reason = None
    if size < MIN_SAMPLES:
        reason = f"{size} samples, fewer than {MIN_SAMPLES}"
    elif ev["predicted_loss_ratio"] is not None and ev["predicted_loss_ratio"] < FAIL_RATIO:
        reason = f"its images are predicted {ev['predicted_loss_ratio']:.1f}x the mean loss, below {FAIL_RATIO:g}x"
    elif len(truth) >= MIN_EVIDENCE_ROWS and (ev["true_loss_ratio"] or 0) < FAIL_RATIO:
        reason = f"its images' true loss is {ev['true_loss_ratio'] or 0:.1f}x the mean, below {FAIL_RATIO:g}x"
        ev["failed_on"] = "retrieved true loss"  # which :func:`_check_described` may overrule
    ev["holds"], ev["reason"] = reason is None, reason
    return ev


#: A name true of fewer of its failing images than this (they show another value of one of its
#: words: squares under "a blue triangle ...") is hidden. Names are chosen true of half of what
#: they gather (modes.FAITHFUL_SHARE); this catches the fallback kept when no true name was found.
MIN_TRUE_SHARE = 0.25


def _check_true_of(ev: dict, name: str, Xm: np.ndarray, words: Faithfulness) -> None:
    """Add ``true_of`` (share of the members ``Xm`` that show every part of ``name``) to a mode's
    evidence, and fail the evidence when it is below :data:`MIN_TRUE_SHARE`."""
    share = float(words.shows(name, Xm).mean()) if len(Xm) else None
    ev["true_of"] = share
    if ev["holds"] and share is not None and len(Xm) >= MIN_SAMPLES and share < MIN_TRUE_SHARE:
        ev["holds"] = False
        ev["reason"] = (f"its name is true of {100 * share:.0f}% of its failing images (CLIP reads another "
                        "value of one of its words in the rest)")


#: A mode's name loses a part when the name without it describes images failing at least this share
#: as much ("a large blue object on a noisy background" 15x, blue objects on noise of every size
#: 13x: "large" is not what fails).
KEEP_SHARE = 0.8
REREAD_NAMES = 8  # names read off a hidden mode's failing images, judged before it is hidden
DESCRIBED_ROWS = 50_000  # judged rows the described-rows check reads at most (a fixed sample beyond)


def _described_sample(t: _Table) -> np.ndarray:
    """The judged rows :func:`_check_described` reads: all, or a fixed sample of ``DESCRIBED_ROWS``."""
    judged = np.flatnonzero(t.judged)
    if len(judged) > DESCRIBED_ROWS:
        judged = np.sort(np.random.default_rng(0).choice(judged, DESCRIBED_ROWS, replace=False))
    return judged


def _loss_ratio(t: _Table, rows: np.ndarray, judged: np.ndarray) -> float | None:
    """The mean true loss of ``rows`` over that of the ``judged`` rows; None without rows or loss."""
    mean_true = float(t.loss[judged].mean()) if len(judged) else 0.0
    return float(t.loss[rows].mean() / mean_true) if len(rows) and mean_true > 0 else None


def _judged_ratio(ev: dict) -> float:
    """A mode's own true-loss ratio as its evidence judged it: of the judged rows that show its name
    when those decided (``judged_by``), else of the rows it retrieves; 0 when neither is known."""
    ratio = ev.get("described_loss_ratio") if ev.get("judged_by") == "described rows" else None
    return float(ratio or ev.get("true_loss_ratio") or 0.0)


def _check_described(ev: dict, name: str, t: _Table, judged: np.ndarray, words: Faithfulness) -> None:
    """Judge a name by *every* judged row it describes, not only the ones it retrieves: the
    held-out rows (all rows with a loss when there is no split) that show the name
    (:meth:`Faithfulness.shows`) must have a mean true loss of at least ``FAIL_RATIO`` x the mean.
    The retrieved rows are the group's best-separating top; a name whose top fails while what it
    says, taken whole, fails less than that ("a yellow triangle": its nearest images fail, yellow
    triangles at large 1.9x) would tell the reader more than the data does.

    When it describes ``MIN_EVIDENCE_ROWS`` judged rows or more, these rows decide the true-loss
    verdict, also for a name whose *retrieved* rows fell short: those are its nearest images as far
    as its predicted loss reached, which include neighbours CLIP does not read as the name ("a
    large purple square" retrieves large purple circles past its squares: 1.8x, while the large
    purple squares themselves fail at 2.4x). ``judged``: the rows of :func:`_described_sample`.
    Adds ``described_rows``, ``described_loss_ratio`` and its 95% interval, and ``judged_by``."""
    if not len(judged) or not words.tested(name):
        return
    if not ev["holds"] and ev.get("failed_on") != "retrieved true loss":
        return
    rows = judged[words.shows(name, t.X[judged])]
    mean_true = float(t.loss[judged].mean())
    ratio = _loss_ratio(t, rows, judged)
    ev["described_rows"], ev["described_loss_ratio"] = int(len(rows)), ratio
    ev["described_loss_ratio_ci"] = [x / mean_true for x in bootstrap_ci(t.loss[rows])] \
        if ratio is not None else None
    if len(rows) < MIN_EVIDENCE_ROWS or ratio is None:
        return
    ev["judged_by"] = "described rows"
    if ratio >= FAIL_RATIO and ev.get("failed_on") == "retrieved true loss":
        ev["holds"], ev["reason"], ev["failed_on"] = True, None, None
    elif ratio < FAIL_RATIO and ev["holds"]:
        ev["holds"], ev["failed_on"] = False, "described true loss"
        ev["reason"] = (f"the {len(rows)} judged images it describes have {ratio:.1f}x the mean true loss, below "
                        f"{FAIL_RATIO:g}x (only its nearest images fail)")


def _check_beyond_modes(ev: dict, name: str, t: _Table, judged: np.ndarray, words: Faithfulness,
                        earlier: list[str]) -> None:
    """For a name found across earlier modes (:func:`diagnosis.modes._across`): its judged rows
    that show none of the ``earlier`` modes' names must fail too (``FAIL_RATIO`` x the mean true
    loss, over ``MIN_EVIDENCE_ROWS`` rows at least), or it is only a view across those failures
    ("a small object on a striped background" across "a small star" and "a small triangle": its
    circles and squares do not fail). Adds ``beyond_rows`` and ``beyond_loss_ratio``."""
    if not ev["holds"] or not len(judged):
        return
    rows = judged[words.shows(name, t.X[judged])]
    for other in earlier:
        rows = rows[~words.shows(other, t.X[rows])]
    ratio = _loss_ratio(t, rows, judged)
    ev["beyond_rows"], ev["beyond_loss_ratio"] = int(len(rows)), ratio
    log.debug("%r beyond %s: %d judged rows, %s x the mean true loss", name, earlier, len(rows), ratio)
    if len(rows) < MIN_EVIDENCE_ROWS or ratio is None or ratio < FAIL_RATIO:
        ev["holds"], ev["failed_on"] = False, "beyond earlier modes"
        ev["reason"] = (f"its {len(rows)} judged images outside the modes it overlaps have "
                        + (f"{ratio:.1f}x" if ratio is not None else "no") + " the mean true loss: "
                        "it fails only where those modes do")


def _fails_on_truth(ev: dict) -> bool:
    """Whether the evidence failed because the true losses say the name's images do not fail (its
    retrieved rows, or the judged rows it describes, below ``FAIL_RATIO`` x the mean)."""
    if ev["holds"]:
        return False
    if ev.get("judged_by") == "described rows":
        return (ev.get("described_loss_ratio") or 0) < FAIL_RATIO
    return bool(ev["true_rows"] >= MIN_EVIDENCE_ROWS and (ev["true_loss_ratio"] or 0) < FAIL_RATIO)


def _check_beyond_noise(ev: dict, t: _Table) -> None:
    """For a group whose better names failed on their true loss: a later name holds only when its
    failure clears ``FAIL_RATIO`` beyond the noise -- the low end of the 95% bootstrap interval of
    its described rows' loss ratio (of its retrieved held-out rows' when it describes too few).
    Trying one name after another for rows that do not fail ("a yellow triangle" 1.7x, then "a
    small ...", "a large ...", "... on a dark background": each half the rows) would otherwise
    show whichever narrower group's sample happens to reach 2x; a real narrower failure ("small
    yellow triangles" at 4x) clears it."""
    if not ev["holds"]:
        return
    judged = t.judged
    mean_true = float(t.loss[judged].mean()) if judged.any() else 0.0
    if (ev.get("described_rows") or 0) >= MIN_EVIDENCE_ROWS and ev.get("described_loss_ratio_ci"):
        lo, rows = ev["described_loss_ratio_ci"][0], f"the {ev['described_rows']} judged images it describes"
    elif ev["true_rows"] >= MIN_EVIDENCE_ROWS and ev["true_loss_ci"] and mean_true > 0:
        lo, rows = ev["true_loss_ci"][0] / mean_true, f"its {ev['true_rows']} judged images"
    else:
        return
    ev["beyond_noise"] = lo >= FAIL_RATIO
    if not ev["beyond_noise"]:
        ev["holds"] = False
        ev["reason"] = (f"a better name for its images failed on their true loss, and {rows} do not clear "
                        f"{FAIL_RATIO:g}x beyond noise (95% interval from {lo:.1f}x)")


def _untrue(ev: dict) -> bool:
    """Whether the evidence failed because the name is not true of its images."""
    return ev.get("true_of") is not None and ev["true_of"] < MIN_TRUE_SHARE


def cost(m: FailureMode, t: _Table, words: Faithfulness, described: np.ndarray) -> None:
    """Set what mode ``m`` costs (``cost``, ``cost_ci``, ``cost_basis``): the share of the judged
    rows' total true loss that its group carries *above their mean loss* -- what the model would
    save if it did as well on the group as on an average image -- with a 95% bootstrap interval.

    The group is measured, in order of preference, by the judged rows that show the name
    (``described``: :func:`_described_sample`; :meth:`Faithfulness.shows`), when its parts can all
    be tested and at least ``MIN_EVIDENCE_ROWS`` of them show it; else by the mode's judged members;
    else by its members' *predicted* loss above the table's mean predicted loss (as a share of
    the total predicted loss). A small group failing badly can so cost more than a large group
    failing mildly: a group of 1.75% of the images at 3.4x the mean loss costs 4.2% of the loss,
    one of 2.2% at 2.15x costs 2.6%."""
    basis, values, mean, total = None, None, 0.0, 0.0
    if len(described) and words.tested(m.description):
        rows = described[words.shows(m.description, t.X[described])]
        if len(rows) >= MIN_EVIDENCE_ROWS:
            basis, values = "judged rows that show the name", t.loss[rows]
            mean, total = float(t.loss[described].mean()), float(t.loss[described].sum())
    if basis is None and m.ids:
        rows = np.asarray([t.row[i] for i in m.ids], dtype=np.int64)
        judged = rows[t.judged[rows]]
        if len(judged) >= MIN_EVIDENCE_ROWS:
            basis, values = "judged members", t.loss[judged]
            mean, total = float(t.loss[t.judged].mean()), t.total_loss
        else:
            basis, values = "members' predicted loss", t.pred[rows]
            mean, total = float(t.pred.mean()), float(t.pred.sum())
    if basis is None or total <= 0:
        return
    lo, hi = bootstrap_ci(values)
    m.cost = float(len(values) * (values.mean() - mean) / total)
    m.cost_ci = [float(len(values) * (lo - mean) / total), float(len(values) * (hi - mean) / total)]
    m.cost_basis = basis


def _cost_key(m: FailureMode) -> tuple:
    """Shown modes first, each part costliest first (a mode without a cost last)."""
    return (not m.shown, -(m.cost if m.cost is not None else -np.inf))


def generalise(modes: list[FailureMode], t: _Table, phrases: list[str], T: np.ndarray, fail: np.ndarray,
               words: Faithfulness, described: np.ndarray) -> list[FailureMode]:
    """Fold fragments of one failure into one mode named by what they share, when the group that
    shared name describes is itself a failure.

    *Fragments* are modes whose names say a shared phrase S and at most one part more, the extra
    parts all of one kind: "a blue triangle" and "a blue circle" (S "a blue object", two shapes),
    or "a triangle on a striped background" and its leftover "a small triangle on a striped
    background" (S the former). Names differing in parts of different kinds -- "a triangle on a
    striped background" and "a blue triangle" -- are two failures and never fold into "a
    triangle". S is judged by the rows that *show* it (:meth:`Faithfulness.shows`: CLIP prefers S
    to each rival of each of its parts), on the held-out rows when the table has them (a biased
    training split says little of where the model fails): those rows must fail (:func:`evidence`)
    and must hold at least half of each fragment's members. Shared phrases are tried most specific
    first, then by how much their rows fail; a mode folds once per pass, and passes repeat until
    nothing folds. The folded mode's members are its fragments' and the other failing rows that
    show S.
    """
    grammar = words.grammar
    held_out = bool(t.judged.sum() < np.isfinite(t.loss).sum())
    excess = t.pred - EXCESS_RATIO * float(t.pred.mean())
    masks: dict[int, np.ndarray] = {}

    def mask(m: FailureMode) -> np.ndarray:
        """(n,) bool: the mode's members; made once per mode, and only for modes a shared name is
        tried on (one lookup per member in the table's id map, :attr:`_Table.row`)."""
        if id(m) not in masks:
            masks[id(m)] = np.zeros(len(t.ids), dtype=bool)
            masks[id(m)][[t.row[x] for x in m.ids]] = True
        return masks[id(m)]

    def fails_as_much(p: str, m: FailureMode) -> bool:
        """Whether the ``described`` rows (:func:`_described_sample`) that show ``p`` fail at least
        ``KEEP_SHARE`` x as much as mode ``m``'s own images, and at least ``FAIL_RATIO`` x the mean."""
        rows = described[words.shows(p, t.X[described])]
        ratio = _loss_ratio(t, rows, described) if len(rows) >= MIN_EVIDENCE_ROWS else None
        return ratio is not None and ratio >= FAIL_RATIO and ratio >= KEEP_SHARE * _judged_ratio(m.evidence)

    changed = True
    while changed and modes:
        changed = False
        found = []
        for j, p in enumerate(phrases):
            extras = {i: grammar.extra_parts(m.description, p) for i, m in enumerate(modes) if m.ids}
            group = [i for i, e in extras.items() if e is not None and len(e) <= 1]
            single = [extras[i][0] for i in group if extras[i]]
            # one mode alone folds into its name less one part when that part does not set its
            # failure apart (the shorter name's images fail nearly as much: KEEP_SHARE), judged below
            alone = len(group) == 1 and len(single) == 1 and modes[group[0]].shown
            if (len(group) < 2 and not alone) or any(not grammar.rivals(a, b) for a in single for b in single):
                continue
            if alone and not fails_as_much(p, modes[group[0]]):
                continue  # judged on the sample of judged rows first: a full pass over 1M rows costs ~1 s
            show = words.shows(p, t.X)
            if min(float(show[mask(modes[i])].mean()) for i in group) < 0.5:
                continue
            mine, others = np.zeros(len(t.ids), dtype=bool), np.zeros(len(t.ids), dtype=bool)
            for i, m in enumerate(modes):
                (mine if i in group else others)[mask(m)] = True
            members = np.flatnonzero(mine | (show & fail & ~others))
            rows = np.flatnonzero(show & t.judged) if held_out else np.flatnonzero(show)
            rows = rows[np.argsort(-(t.X[rows] @ T[j]), kind="stable")]
            ev = evidence(t, rows, len(members), float(show[members].mean()), float(fail[rows].mean()) if len(rows) else 0.0,
                          float(excess[rows].sum()))
            ev["rows"] = "held-out rows that show the name" if held_out else "rows that show the name"
            if alone and ev["holds"] and (ev["true_loss_ratio"] or 0.0) < KEEP_SHARE * _judged_ratio(modes[group[0]].evidence):
                ev["holds"], ev["reason"] = False, "the part it drops sets the failure apart"
            log.debug("shared name %r for %s: %d rows show it; %s", p, [modes[i].description for i in group],
                      int(show.sum()), ev.get("reason"))
            if ev["holds"]:
                found.append((len(content_words(p)), ev["true_loss_ratio"] or ev["predicted_loss_ratio"], j, group,
                              rows, members, ev))
        used: set[int] = set()
        merged = []
        for _, _, j, group, rows, members, ev in sorted(found, key=lambda f: (-f[0], -f[1])):
            if used & set(group):
                continue
            used |= set(group)
            others = [x for i in group for x in [modes[i].description, *modes[i].phrases[1:2]] if x != phrases[j]]
            merged.append(FailureMode(
                description=phrases[j], predicted_loss=ev["predicted_loss"], predicted_loss_std=float(t.std[rows].mean()),
                phrases=[phrases[j], *dict.fromkeys(others)], source="both", evidence=ev, shown=True,
                **_members(members, rows, t)))
        if merged:
            modes = [m for i, m in enumerate(modes) if i not in used] + merged
            changed = True
    return modes


def resolve_vocabulary(db, vocab) -> tuple[list[str], bool]:
    """(phrases, generic): a file path, a list of phrases, or None for the database's default (its
    ``vocab.txt``, else :func:`diagnosis.vocab.real_vocabulary`, ``generic`` True)."""
    if vocab is None:
        found = dataset_vocabulary(db)
        return (found[0], False) if found else (real_vocabulary(db), True)
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


def explain(db, vocab=None, top: int = 10, show_all: bool = False, compose: bool = True,
            seed: int = 0, clip=None) -> Modes:
    """The ``top`` worst failure modes of ``db`` whose evidence holds, costliest (:func:`cost`: the
    share of the held-out loss the group carries above the mean) first; with ``show_all``, then every mode whose evidence
    does not hold (``shown`` False). Its ``note`` says why it shows none (:func:`why_none`); when
    the diagnosis found the ensemble without skill (``diagnose``'s ``no_skill``) nothing is named.

    ``vocab``: a file of phrases, a list of phrases, or None (the dataset's ``vocab.txt``, else
    :func:`diagnosis.vocab.real_vocabulary`). ``compose``: also name groups by compositions of their
    best phrases ("a small" + "blue circle"). See the module doc for how names are chosen and checked.
    ``clip``: the database's CLIP model when the caller has it loaded (a server: its compiled text
    encoding is then used too); loaded here otherwise.
    """
    return explain_table(db, vocab, top, show_all, compose, seed, clip)[0]


def explain_table(db, vocab=None, top: int = 10, show_all: bool = False, compose: bool = True, seed: int = 0,
                  clip=None):
    """:func:`explain`, also returning the table it read (labelled rows; the pool in ``pool``) and
    the :class:`Faithfulness` that judged the names, for callers that go on with them (curate)."""
    from diagnosis.run import open_db

    if top < 1:
        raise UserError(f"--top {top} must be at least 1.")
    db = open_db(db)
    scorer = Scorer(db, clip=clip)
    phrases, _ = resolve_vocabulary(db, vocab)
    t = _read_table(db)
    if not len(t.ids):
        raise UserError(f"{db.path} holds only unlabeled rows; index rows with a loss (or a label and "
                        "--predictions/--model) to name where the model fails.")
    skill = (scorer.loaded.info.get("quality") or {}).get("no_skill")
    words = Faithfulness(Grammar(phrases), scorer.encode_text if compose else None, phrases, None)
    if skill:  # predicted losses that are noise name nothing: say so instead of naming noise
        log.info("explain: %s", skill)
        modes, every = Modes(), []
    else:
        T = scorer.encode_text(phrases)
        words.remember(phrases, T)
        every = name_modes(t, phrases, T, words.encode, top, True, seed, words=words)
        modes = Modes(every if show_all else [m for m in every if m.shown])
        modes.hidden = sum(not m.shown for m in every)
        attach_pool(modes, t, words)
    modes.note = why_none(every, skill)  # judged on every mode found, listed or not
    return modes, t, words


def attach_pool(modes: list[FailureMode], t: _Table, words: Faithfulness) -> None:
    """Set each mode's ``pool_rows`` / ``pool_ids``: the unlabeled images its name retrieves
    (:func:`name_matches`), highest predicted loss first; nothing when the table has no pool."""
    if t.pool is None:
        return
    for m in modes:
        rows = name_matches(t, m, words, t.pool.X)
        rows = rows[np.argsort(-t.pool.pred[rows], kind="stable")]
        m.pool_rows, m.pool_ids = len(rows), [str(i) for i in t.pool.ids[rows]]


def name_matches(t: _Table, m: FailureMode, words: Faithfulness, X: np.ndarray) -> np.ndarray:
    """Rows of ``X`` ((r, d) float32 image embeddings: the unlabeled pool, or some labelled rows)
    that mode ``m``'s name retrieves: those that *show* the name (:meth:`Faithfulness.shows`: for
    each part CLIP prefers the name to every rival value) when the vocabulary can test every part;
    otherwise those at least as similar to the name as the least similar labelled image of ``t``
    its evidence retrieved."""
    name = m.description
    if words.tested(name):
        return np.flatnonzero(words.shows(name, X))
    q = words.vectors([name])[0]
    r = max(1, min(int(m.evidence.get("retrieved") or MIN_SAMPLES), len(t.ids)))
    sims = t.X @ q
    line = float(np.partition(sims, len(sims) - r)[len(sims) - r])
    return np.flatnonzero(X @ q >= line)


def find_mode(modes: list[FailureMode], text, option: str = "--mode") -> FailureMode:
    """The mode ``text`` names: its 1-based number in ``modes``, or its description (exact, else a
    unique substring); refuses anything else with the list."""
    text = str(text).strip()
    if text.isdigit():
        number = int(text)
        if not 1 <= number <= len(modes):
            raise UserError(f"{option} {number} is out of range; `llm2loss explain` lists modes 1-{len(modes)}.")
        return modes[number - 1]
    exact = [m for m in modes if m.description.lower() == text.lower()]
    partial = [m for m in modes if text.lower() in m.description.lower()]
    found = exact or partial
    if len(found) != 1:
        listing = "; ".join(f"{i}. {m.description}" for i, m in enumerate(modes, 1)) or "none"
        why = "matches no" if not found else "matches several"
        raise UserError(f"{option} {text!r} {why} failure mode ({listing}); pass its number or full description.")
    return found[0]


def name_modes(t: _Table, phrases: list[str], T: np.ndarray, encode=None, top: int = 10, show_all: bool = False,
               seed: int = 0, words: Faithfulness | None = None) -> list[FailureMode]:
    """:func:`explain` on a table already read, with the vocabulary's (m, d) text embeddings ``T``;
    ``encode`` (phrases -> embeddings) lets it score compositions of the best phrases; ``words``
    a :class:`Faithfulness` to share (its cache of rivals' embeddings), else one is made."""
    grammar = Grammar(phrases) if words is None else words.grammar
    if words is None:
        words = Faithfulness(grammar, encode, phrases, T)  # one cache of rivals' embeddings for every step
    groups, phrases, T, sample = find_modes(t.X, t.pred, fail_threshold(t.pred), phrases, T, encode=encode,
                                            grammar=grammar if encode is not None else None, seed=seed,
                                            words=words if encode is not None else None)
    phrases = list(phrases)  # names read off a hidden mode's images are added to it (reread)
    if encode is None:
        words.remember(phrases, T)
    scale = len(t.ids) / len(sample)
    fail = t.pred >= fail_threshold(t.pred)
    taken = np.zeros(len(t.ids), dtype=bool)  # failing rows already a member of an earlier mode
    described = _described_sample(t)

    def judge(c: dict, got: np.ndarray, members: np.ndarray, doubted: bool) -> dict:
        """The evidence for naming ``members`` by candidate ``c`` (which retrieved ``got``), every check applied."""
        name = phrases[c["phrase"]]
        ev = evidence(t, got, len(members), c["coverage"], c["precision"], c["gain"] * scale)
        _check_described(ev, name, t, described, words)  # may overrule evidence()
        _check_true_of(ev, name, t.X[members], words)
        if doubted:
            _check_beyond_noise(ev, t)
        return ev

    base: list[np.ndarray] = []  # a sample of the table, for the values a hidden mode's images show

    def reread(checked: list) -> tuple | None:
        """Before a mode is hidden: the names read off its own failing images (the values most of
        them show, :func:`diagnosis.modes.describing_names`), so that a part few of them show is
        swapped for one most of them do ("a blue triangle on a striped background" for small
        triangles of every colour on stripes: "a small triangle on a striped background"). Each is
        judged like any name, retrieving as many rows as the hidden name did; of those that hold,
        the one whose images fail the most (true loss). None when none holds."""
        nonlocal T
        c0, _, members0, ev0, doubted0 = checked[0]
        if len(members0) < MIN_SAMPLES:
            return None
        if not base:
            rng = np.random.default_rng(seed)
            base.append(t.X[np.sort(rng.choice(len(t.X), BASE_ROWS, replace=False))] if len(t.X) > BASE_ROWS else t.X)
        tried = {phrases[x[0]["phrase"]].lower() for x in checked} | {p.lower() for p in used}
        names = [p for p in describing_names(t.X[members0], base[0], words) if p.lower() not in tried]
        names = sorted(names, key=lambda p: -words.grammar.n_parts(p))[:REREAD_NAMES]  # the most specific first
        if not names:
            return None
        first = len(phrases)
        phrases.extend(names)
        T = np.vstack([T, encode(names)])
        words.remember(names, T[first:])
        excess = t.pred - EXCESS_RATIO * float(t.pred.mean())
        r = max(1, round(c0["r"] * scale))
        held = []
        for j in range(first, len(phrases)):
            wide = retrieve(t, T[j], 2 * r)
            got, hit = wide[:r], fail[wide]
            c = {"phrase": j, "r": c0["r"], "gain": float(excess[got].sum()) / scale,
                 "precision": float(hit[:r].mean()), "coverage": float(hit[:r].sum() / max(hit.sum(), 1))}
            members = got[fail[got] & ~taken[got]]
            ev = judge(c, got, members, doubted0)
            log.debug("reread %r for %r: %s", phrases[j], phrases[c0["phrase"]], ev.get("reason"))
            if ev["holds"]:
                ev["renamed_from"] = phrases[c0["phrase"]]
                held.append((_judged_ratio(ev), len(content_words(phrases[j])), (c, got, members, ev, doubted0)))
        if not held:
            return None
        best = max(held, key=lambda h: (h[0], h[1]))[2]
        log.info("explain: %r (hidden: %s) renamed %r, read off its failing images", phrases[c0["phrase"]],
                 ev0.get("reason"), phrases[best[0]["phrase"]])
        return best

    out, used, member_rows = [], set(), []
    for g in groups:
        checked, doubted = [], False  # doubted: a better name for the group failed on true loss
        for c in g["candidates"]:
            if phrases[c["phrase"]] in used:
                continue
            got = retrieve(t, T[c["phrase"]], round(c["r"] * scale))
            members = got[fail[got] & ~taken[got]]
            if g.get("across"):
                # a failure across earlier modes keeps the failing rows they hold too, unless it
                # would then share more than half of one's members (its own rows only, then)
                every = got[fail[got]]
                if all(np.isin(every, rows).sum() <= TAIL_SHARE * min(len(every), len(rows))
                       for m, rows in zip(out, member_rows, strict=True) if m.shown):
                    members = every
            ev = judge(c, got, members, doubted)
            if g.get("across"):
                _check_beyond_modes(ev, phrases[c["phrase"]], t, described, words, [m.description for m in out if m.shown])
            checked.append((c, got, members, ev, doubted))
            if ev["holds"] or (len(members) < MIN_SAMPLES and not _untrue(ev)):
                break
            doubted = doubted or _fails_on_truth(ev)
        if not checked:
            continue
        c, got, members, ev, doubted = next((x for x in checked if x[3]["holds"]), checked[0])
        if g.get("across") and not ev["holds"]:
            continue  # a view across other modes, not a failure of its own: nothing to show or fold
        if not ev["holds"] and encode is not None:
            c, got, members, ev, doubted = reread(checked) or (c, got, members, ev, doubted)
        for tail in g["tails"]:  # the failure's leftovers past its name's prefix
            extra = retrieve(t, T[tail["phrase"]], round(tail["r"] * scale))
            extra = extra[fail[extra] & ~taken[extra]]
            members = np.union1d(members, extra)
        if g["tails"]:  # the same name judged again on its whole membership (its size, true_of)
            ev = judge(c, got, members, doubted)
        taken[members] = True
        member_rows.append(members)
        used.add(phrases[c["phrase"]])
        others = [phrases[x["phrase"]] for x in g["candidates"] if x is not c]
        out.append(FailureMode(
            description=phrases[c["phrase"]], predicted_loss=ev["predicted_loss"],
            predicted_loss_std=float(t.std[got].mean()), phrases=[phrases[c["phrase"]], *others], source="both",
            evidence=ev, shown=ev["holds"], **_members(members, got, t)))
    out = generalise(out, t, phrases, T, fail, words, described)
    for m in out:
        cost(m, t, words, described)
    out.sort(key=_cost_key)
    shown = [m for m in out if m.shown][:top]
    return shown + ([m for m in out if not m.shown] if show_all else [])
