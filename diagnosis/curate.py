"""``llm2loss curate``: a labelling plan -- for each failure mode, what kind of fix it needs and
which items to spend a labelling budget on.

Since the diagnosis ensemble predicts a loss from an image alone, it scores the unlabeled pool
(``split = "pool"``) too; a failure's fix is one of two kinds, decided per mode from the table:

Scarce modes are collected first of all: when the share of the training split a mode's name
describes is below ``SCARCE`` x its share of the held-out rows, the model saw too few images like
it (a rare group), whatever their labels say. Otherwise:

``relabel``
    The mode's training images carry labels their own neighbours contradict: a training image is
    *suspect* when more of its ``NEIGHBOURS`` nearest training images *of the same mode* (CLIP
    space; the training images its name describes) carry another label than its own. A mode needs
    relabelling when it has at least ``MIN_TRAIN_ROWS`` training images and the share of suspect
    labels among them is at least ``RELABEL_SHARE`` and
    ``RELABEL_FACTOR`` x the share across the whole training split (each image against its
    neighbours there): wrong labels, not missing images, make the model fail there. A rare group
    or a spurious correlation has few or misleading images, but labels that agree with their
    look-alikes in the group. Items: the suspect training rows, most suspect first (the share of
    neighbours that disagree, then the model's loss on the row), each with the label its
    neighbours suggest.
``collect``
    Otherwise the mode needs more labelled images like its own. Items: unlabeled pool images its
    name retrieves (:func:`diagnosis.explain.pool_matches`), highest predicted loss first, spread
    out by maximal marginal relevance (``DIVERSITY``) so near-duplicates (cosine >=
    ``NEAR_DUPLICATE`` to an image already chosen, in any mode) never use the budget twice.

The budget goes first to the ``relabel`` modes, each up to all of its suspect labels (a known
wrong label removed is worth more than an image added), then over the ``collect`` modes shown by
``explain`` (or those named): half equally, so every failure gets a share, half by what each mode
costs (explain's ``cost``, the held-out loss its group carries above the mean), so costlier
failures get more; a mode's part is capped by the items it has (suspect labels, or pool images)
and what it cannot use goes to the others by the same rule. What no mode can use (every mode short
of items) buys the unlabeled images of highest predicted loss that no mode took, spread out the same
way (:data:`LEFTOVER`, number 0): a budget is spent where the model most likely fails. Every mode
comes with one sentence saying why, with its figures.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from diagnosis.explain import (
    TRAIN_SPLITS,
    FailureMode,
    _top_neighbours,
    explain_table,
    find_mode,
    name_matches,
)
from indexer import schema as S
from indexer.errors import UserError

log = logging.getLogger(__name__)

NEIGHBOURS = 10
RELABEL_SHARE = 0.10
RELABEL_FACTOR = 3.0
#: Fewer training images than this say too little of their labels: such a mode is collected.
MIN_TRAIN_ROWS = 20
#: A mode whose share of the training split is below this fraction of its share of the held-out
#: rows is *scarce* in training (a rare group, or one a spurious correlation kept out): it needs
#: images, whatever its few labels say.
SCARCE = 0.5
DESCRIBED_SAMPLE = 50_000  # held-out rows the representation is measured on (a fixed sample beyond)
#: Two images at cosine >= the *near-duplicate line* never both use the budget. The line is the 99th
#: percentile of the pool's nearest-neighbour cosines, kept within [NEAR_DUPLICATE, DUPLICATE]: a
#: CLIP that reads only an image's content puts distinct images of one kind very close (the offline
#: world's tiny CLIP: median nearest neighbour 0.9975), where a fixed 0.98 would call all of them
#: duplicates and leave the budget unspent; a copy of an image (cosine ~1) is always one.
NEAR_DUPLICATE = 0.98
DUPLICATE = 0.9999
DUPLICATE_SAMPLE = 5000  # pool images the line is measured on (a fixed sample beyond)
DIVERSITY = 0.3
BASE_SAMPLE = 2000  # training rows the split-wide share of suspect labels is measured on
#: A mode's training rows checked for suspect labels at most (a fixed sample beyond): neighbours are
#: computed among them, (r x r) similarities, so this bounds the cost of a vast mode.
MODE_SAMPLE = 20_000
COLLECT, RELABEL = "collect", "relabel"
#: The part of a plan that spends what no mode could use (``mode`` of its items, number 0).
LEFTOVER = "(no mode: the likeliest failures left)"
#: Columns of the plan's manifest, in order. ``plan_predicted_loss`` is the ensemble's predicted
#: loss when the plan was made (``predicted_loss`` is written by ``index``/``diagnose`` only, so a
#: manifest may not bring it): the file is indexable as it is.
COLUMNS = (S.ID, S.IMAGE, S.LABEL, S.SPLIT, S.LOSS, "mode", "action", "priority", "suggested_label",
           "plan_predicted_loss", "reason")


@dataclass
class ModePlan:
    """One mode's part of a plan: its ``action``, the ``reason`` (one sentence with figures), the
    items ``budget`` gave it and how many it has (``available``: suspect labels or pool images)."""

    number: int
    mode: str
    action: str
    reason: str
    budget: int = 0
    chosen: int = 0
    available: int = 0
    figures: dict = field(default_factory=dict)
    #: the mode's members (labelled rows, worst first), for callers that tie modes to groups
    members: list[str] = field(default_factory=list, repr=False)


@dataclass
class CurationPlan:
    """A labelling plan: ``modes`` (:class:`ModePlan`) and ``items`` (dicts with :data:`COLUMNS`):
    mode by mode, each mode's in the order to label them (``priority`` 1, 2, ...)."""

    budget: int
    modes: list[ModePlan]
    items: list[dict]
    rule: str

    def to_dict(self) -> dict:
        modes = [{k: v for k, v in asdict(m).items() if k != "members"} for m in self.modes]
        return {"budget": self.budget, "rule": self.rule, "modes": modes, "items": self.items}

    def table(self) -> pa.Table:
        """The plan as a manifest `llm2loss index` reads (:data:`COLUMNS`)."""
        return items_table(self.items)

    def summary(self) -> str:
        used = sum(m.chosen for m in self.modes)
        lines = [f"labelling plan: {used} of {self.budget} items over {len(self.modes)} failure modes ({self.rule})"]
        for m in self.modes:
            lines.append(f"{m.number:2d}. {m.mode!r}: {m.action} {m.chosen} (budget {m.budget}, "
                         f"{m.available} available) -- {m.reason}")
        return "\n".join(lines)


def items_table(items: list[dict]) -> pa.Table:
    """A plan's items (dicts, as in :attr:`CurationPlan.items` or its JSON) as the plan's manifest."""
    types = {S.LOSS: pa.float64(), "priority": pa.int64(), "plan_predicted_loss": pa.float64()}
    return pa.table({c: pa.array([it.get(c) for it in items], types.get(c, pa.string())) for c in COLUMNS})


RULE = ("relabel modes first, each up to all its suspect labels; the rest over the collect modes, half equally, "
        "half by what each costs, each capped by its items; what no mode can use goes to the pool's likeliest failures")


def plan_curation(db, budget: int, modes: list[str] | None = None, vocab=None, top: int = 10,
                  explained=None) -> CurationPlan:
    """Plan how to spend ``budget`` labels on the failure modes of ``db`` (module doc).

    ``modes``: numbers or descriptions of modes from ``explain`` (default: every mode it shows,
    at most ``top``). ``explained``: what :func:`diagnosis.explain.explain_table` returned for
    ``db``, when the caller already has it. Refuses a budget below 1 and a table without a fitted
    ensemble.
    """
    from diagnosis.run import open_db

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UserError(f"--budget {budget!r} must be a whole number of items, at least 1.")
    db = open_db(db)
    numbers = [int(x) for x in modes or [] if str(x).strip().isdigit()]
    found, t, words = explained or explain_table(db, vocab=vocab, top=max([top, *numbers]))
    if not found:
        why = f" ({found.note.rstrip('.')})" if getattr(found, "note", None) else ""
        raise UserError(f"`llm2loss explain` shows no failure mode for {db.path}{why}, so there is nothing to plan "
                        "for; curate by hand with `llm2loss select` and `export`.")
    cols = db.read([S.ID, S.IMAGE, S.LABEL])
    ids = cols.column(S.ID).to_pylist()
    info = {"image": dict(zip(ids, cols.column(S.IMAGE).to_pylist(), strict=True)),
            "label": dict(zip(ids, cols.column(S.LABEL).to_pylist(), strict=True))}
    return make_plan(found, t, words, info, budget, modes)


def make_plan(found: list[FailureMode], t, words, info: dict, budget: int, modes: list[str] | None = None
              ) -> CurationPlan:
    """The plan for modes ``found`` (from :func:`diagnosis.explain.explain_table`, pool attached) of
    table ``t`` judged by ``words``; ``info``: ``{"label": {id: label}, "image": {id: path}}``."""
    if modes:
        chosen = list(dict.fromkeys(found.index(find_mode(found, x, "--mode")) for x in modes))
    else:
        chosen = list(range(len(found)))
    train = _training_rows(t, info)
    base = _base_share(t, train, info)
    plans, cands = [], []
    for i in chosen:
        mp, c = _decide(i + 1, found[i], t, words, train, info, base)
        plans.append(mp)
        cands.append(c)
    picked = [found[i] for i in chosen]
    _allot(plans, picked, budget)
    items = _select(plans, cands, picked, t, info, budget)
    return CurationPlan(budget=budget, modes=plans, items=items, rule=RULE)


# ---- the table's labels, and the training split's neighbours ---------------------------------------
def _training_rows(t, info: dict) -> np.ndarray:
    """Rows of ``t`` in a training split with a label and a loss (the rows a model trained on)."""
    if t.split is None:
        return np.zeros(0, dtype=np.int64)
    split = np.array([str(s).lower() if s is not None else "" for s in t.split], dtype=object)
    labelled = np.array([info["label"].get(str(i)) is not None for i in t.ids])
    return np.flatnonzero(np.isin(split, list(TRAIN_SPLITS)) & labelled & np.isfinite(t.loss))


def _neighbour_votes(t, ref: np.ndarray, rows: np.ndarray, info: dict):
    """For rows ``rows`` of ``t``, their ``NEIGHBOURS`` nearest among the rows ``ref`` (sorted; the
    row itself left out): (the neighbours' most common label (r,) object, the share of neighbours
    whose label is not the row's own (r,) float, whether more neighbours carry that other label than
    the row's own (r,) bool: a *suspect* label)."""
    labels = np.array([info["label"][str(i)] for i in t.ids[ref]], dtype=object)
    own = np.array([info["label"][str(i)] for i in t.ids[rows]], dtype=object)
    k = min(NEIGHBOURS, len(ref) - 1)
    if k < 1:
        return own, np.zeros(len(rows)), np.zeros(len(rows), dtype=bool)
    nn = _top_neighbours(t.X[ref], t.X[rows], k + 1)
    self_pos = np.searchsorted(ref, rows)
    sugg, differ, suspect = [], np.zeros(len(rows)), np.zeros(len(rows), dtype=bool)
    for j, (p, near) in enumerate(zip(self_pos, nn, strict=True)):
        near = near[near != p][:k]  # not itself (a duplicate image may tie with it)
        vals, counts = np.unique(labels[near], return_counts=True)
        top = vals[np.argmax(counts)]
        sugg.append(top)
        differ[j] = float(np.mean(labels[near] != own[j]))
        suspect[j] = top != own[j] and counts.max() > np.sum(labels[near] == own[j])
    return np.array(sugg, dtype=object), differ, suspect


def _base_share(t, train: np.ndarray, info: dict) -> float:
    """Share of suspect labels across the training split (a fixed sample of ``BASE_SAMPLE`` rows,
    each against its neighbours in the whole split)."""
    if len(train) < 2:
        return 0.0
    rows = train if len(train) <= BASE_SAMPLE else np.sort(np.random.default_rng(0).choice(train, BASE_SAMPLE, replace=False))
    return float(_neighbour_votes(t, train, rows, info)[2].mean())


# ---- deciding each mode's fix --------------------------------------------------------------------
def _decide(number: int, m: FailureMode, t, words, train: np.ndarray, info: dict, base: float):
    """(the mode's :class:`ModePlan` without its budget, its candidate items in order)."""
    mine = train[name_matches(t, m, words, t.X[train])] if len(train) else train
    represented = _representation(t, m, words, train, len(mine))
    if len(mine) > MODE_SAMPLE:
        mine = np.sort(np.random.default_rng(0).choice(mine, MODE_SAMPLE, replace=False))
    mean_train = float(t.loss[train].mean()) if len(train) else float("nan")
    fig = {"train_rows": int(len(mine)), "base_suspect_share": round(base, 4), "pool_rows": m.pool_rows or 0,
           "share_of_loss": m.share_of_loss, "train_share": represented[0], "held_out_share": represented[1]}
    scarce = represented[1] > 0 and represented[0] < SCARCE * represented[1]
    if len(mine):
        # neighbours among the mode's own training images: in a group with wrong labels they
        # contradict each other; a rare group's few images agree among themselves (their
        # neighbours in the whole split are other groups' images, which would not)
        sugg, differ, suspect = _neighbour_votes(t, mine, mine, info)
        share = float(suspect.mean())
        loss_ratio = float(t.loss[mine].mean() / mean_train) if mean_train > 0 else float("nan")
        fig.update(suspect_share=round(share, 4), suspect_rows=int(suspect.sum()),
                   train_loss_ratio=round(loss_ratio, 3))
    else:
        share, suspect = 0.0, np.zeros(0, dtype=bool)
    pool_pred = t.pool.pred[[t.pool.row[i] for i in m.pool_ids]] if t.pool is not None and m.pool_ids else np.zeros(0)
    mean_pred = _mean_pred(t)
    if len(pool_pred):
        fig["pool_predicted_ratio"] = round(float(pool_pred.mean() / mean_pred), 3) if mean_pred > 0 else None
    if not scarce and len(mine) >= MIN_TRAIN_ROWS and share >= max(RELABEL_SHARE, RELABEL_FACTOR * base) \
            and suspect.sum() > 0:
        order = np.lexsort((-t.loss[mine[suspect]], -differ[suspect]))
        rows = mine[suspect][order]
        cands = [{"row": int(r), "suggested_label": str(sg), "differ": float(d)}
                 for r, sg, d in zip(rows, sugg[suspect][order], differ[suspect][order], strict=True)]
        reason = (f"{100 * share:.0f}% of its {len(mine)} training images carry a label that most of their "
                  f"{NEIGHBOURS} nearest images among them contradict ({100 * base:.0f}% across the training split), "
                  f"and the model's loss on them is {fig['train_loss_ratio']:.1f}x the training mean: wrong labels, "
                  f"not missing images, make it fail; {int(suspect.sum())} labels to check")
        return ModePlan(number, m.description, RELABEL, reason, available=len(cands), figures=fig, members=m.ids), cands
    cands = [{"pool": i} for i in m.pool_ids]
    if scarce:
        why = (f"images like it are {100 * represented[0]:.2f}% of the training split against "
               f"{100 * represented[1]:.2f}% of the held-out rows: the model saw too few of them")
    elif len(mine):
        why = (f"{100 * share:.0f}% of its {len(mine)} training images carry a label their neighbours contradict "
               f"({100 * base:.0f}% across the training split), so its labels are not the problem and it needs more "
               "images like these")
    else:
        why = "the training split holds no labelled image its name describes, so it needs images like these"
    if cands:
        ratio = fig.get("pool_predicted_ratio")
        why += (f"; the unlabeled pool holds {len(cands)} images its name retrieves"
                + (f", predicted {ratio:.1f}x the mean loss" if ratio else ""))
    else:
        why += "; the unlabeled pool holds none its name retrieves: index unlabeled images of this kind"
    return ModePlan(number, m.description, COLLECT, why, available=len(cands), figures=fig, members=m.ids), cands


def _representation(t, m: FailureMode, words, train: np.ndarray, n_train: int) -> tuple[float, float]:
    """(share of the training split the mode's name describes, share of the judged held-out rows it
    describes); (0, 0) without a training split or held-out rows."""
    judged = np.flatnonzero(t.judged)
    held = np.setdiff1d(judged, train, assume_unique=True) if len(train) else judged
    if not len(train) or not len(held):
        return 0.0, 0.0
    if len(held) > DESCRIBED_SAMPLE:
        held = np.sort(np.random.default_rng(0).choice(held, DESCRIBED_SAMPLE, replace=False))
    n_held = len(name_matches(t, m, words, t.X[held]))
    return round(n_train / len(train), 5), round(n_held / len(held), 5)


def _mean_pred(t) -> float:
    """Mean predicted loss over every row, labelled and unlabeled."""
    return float(np.concatenate([t.pred, t.pool.pred]).mean()) if t.pool is not None else float(t.pred.mean())


# ---- splitting the budget --------------------------------------------------------------------------
def _allot(plans: list[ModePlan], modes: list[FailureMode], budget: int) -> None:
    """Set each plan's ``budget`` by the module doc's rule: the ``relabel`` modes first, each up to
    all of its suspect labels (split by :func:`_shares` when they hold more than the budget), then
    the rest over the ``collect`` modes (:func:`_shares`, capped by ``available``).

    A suspect label is a known wrong fact the model learned from; one relabelled removes it, where
    one more image only dilutes it. Measured (BENCHMARKS issue 24): a noisy-label slice whose plan
    relabelled 199 of its suspects still failed at 2.85x, where relabelling every wrong label (the
    oracle) brought it to 0.35x."""
    for action in (RELABEL, COLLECT):
        mine = [i for i, p in enumerate(plans) if p.action == action]
        if not mine:
            continue
        got = _shares([modes[i] for i in mine], [plans[i].available for i in mine], budget)
        for i, n in zip(mine, got, strict=True):
            plans[i].budget = n
        budget -= sum(got)


def _shares(modes: list[FailureMode], caps: list[int], budget: int) -> list[int]:
    """``budget`` split over ``modes``: weights half equal, half each mode's share of the loss;
    parts capped by ``caps``, and what a capped mode cannot use goes to the others by the same rule
    (largest remainders round to whole items)."""
    cost = np.array([m.cost if m.cost is not None else m.share_of_loss if m.share_of_loss is not None
                     else m.size * m.mean_predicted_loss for m in modes], dtype=np.float64)
    cost = np.nan_to_num(np.clip(cost, 0, None))
    cost = cost / cost.sum() if cost.sum() > 0 else np.full(len(modes), 1 / len(modes))
    weight = 0.5 / len(modes) + 0.5 * cost
    cap = np.asarray(caps, dtype=int)
    got = np.zeros(len(modes), dtype=int)
    left = budget
    while left > 0:
        open_ = got < cap
        if not open_.any():
            break
        w = np.where(open_, weight, 0.0)
        share = left * w / w.sum()
        add = np.floor(share).astype(int)
        rest = left - add.sum()  # largest remainders get one more
        add[np.argsort(-(share - add), kind="stable")[:rest]] += 1
        add = np.minimum(add, cap - got)
        if add.sum() == 0:
            break
        got += add
        left -= int(add.sum())
    return [int(g) for g in got]


# ---- choosing the items ------------------------------------------------------------------------------
def near_duplicate_line(X: np.ndarray) -> float:
    """The cosine from which two of the images ``X`` ((p, d) float32, L2-normalised) count as
    near-duplicates: the 99th percentile of their nearest-neighbour cosines (on a fixed sample of
    ``DUPLICATE_SAMPLE``), within [``NEAR_DUPLICATE``, ``DUPLICATE``]."""
    if len(X) < 2:
        return DUPLICATE
    if len(X) > DUPLICATE_SAMPLE:
        X = X[np.sort(np.random.default_rng(0).choice(len(X), DUPLICATE_SAMPLE, replace=False))]
    nn = _top_neighbours(X, X, 2)  # itself and its nearest other
    sims = np.einsum("ij,ij->i", X[nn[:, 0]], X[nn[:, 1]])
    return float(np.clip(np.quantile(sims, 0.99), NEAR_DUPLICATE, DUPLICATE))


def _select(plans: list[ModePlan], cands: list[list[dict]], modes: list[FailureMode], t, info: dict,
            budget: int) -> list[dict]:
    """Choose each mode's items (module doc) for the budgets :func:`_allot` set, in passes: a mode
    whose candidates ran short (taken by an earlier mode, or near-duplicates of images already
    chosen) is closed, and what the budget has left is split again over the others (:func:`_shares`).
    Each plan's ``budget`` ends as what it was given, ``chosen`` as what it used."""
    items: list[dict] = []
    chosen_X: list[np.ndarray] = []  # collected images so far, across modes (near-duplicates)
    used: set[str] = set()
    mean_pred = _mean_pred(t)
    line = near_duplicate_line(t.pool.X) if t.pool is not None else DUPLICATE
    want = [p.budget for p in plans]
    closed = [p.available == 0 for p in plans]
    while True:
        for i, (p, c) in enumerate(zip(plans, cands, strict=True)):
            if want[i] > 0 and not closed[i]:
                got = _pick(p, c, want[i], t, info, used, chosen_X, line, mean_pred)
                items += got
                p.chosen += len(got)
                closed[i] = len(got) < want[i]
        left = budget - len(items)
        open_ = [i for i in range(len(plans)) if not closed[i]]
        if left <= 0 or not open_:
            break
        extra = _shares([modes[i] for i in open_], [plans[i].available - plans[i].chosen for i in open_], left)
        if not any(extra):
            break
        want = [0] * len(plans)
        for i, n in zip(open_, extra, strict=True):
            want[i] = n
            plans[i].budget += n
    left = budget - len(items)
    if left > 0 and t.pool is not None and len(t.pool.ids) > len(used):
        # what no mode could use buys the likeliest failures of the pool, spread like the modes' own
        rest = [{"pool": str(t.pool.ids[r])} for r in np.argsort(-t.pool.pred, kind="stable")
                if str(t.pool.ids[r]) not in used]
        p = ModePlan(number=0, mode=LEFTOVER, action=COLLECT, available=len(rest), budget=min(left, len(rest)), reason=(
            f"the modes could use {len(items)} of the {budget} items ({100 * len(items) / budget:.0f}%); the other "
            f"{left} go to the unlabeled images of highest predicted loss that no mode took, spread out like the "
            "modes' own"))
        got = _pick(p, rest, left, t, info, used, chosen_X, line, mean_pred)
        if got:
            p.chosen = len(got)
            plans.append(p)
            items += got
    return items


def _pick(p: ModePlan, c: list[dict], k: int, t, info: dict, used: set[str], chosen_X: list[np.ndarray],
          line: float, mean_pred: float) -> list[dict]:
    """Up to ``k`` more items of mode ``p`` from its candidates ``c`` (not in ``used``), ranked
    after the ``p.chosen`` it already has."""
    out = []
    if p.action == RELABEL:
        picked = [x for x in c if str(t.ids[x["row"]]) not in used][:k]
        for rank, x in enumerate(picked, p.chosen + 1):
            sid = str(t.ids[x["row"]])
            used.add(sid)
            label, loss = info["label"][sid], float(t.loss[x["row"]])
            out.append(_item(sid, info, label, "train", loss, p, rank, x["suggested_label"], float(t.pred[x["row"]]),
                             f"labelled {label!r} but {round(x['differ'] * NEIGHBOURS)} of its {NEIGHBOURS} nearest "
                             f"look-alikes in the mode are not; they say {x['suggested_label']!r}; training loss "
                             f"{loss:.2f}"))
        return out
    rows = np.array([t.pool.row[x["pool"]] for x in c if x["pool"] not in used], dtype=np.int64)
    for rank, r in enumerate(_spread(rows, t.pool.X, t.pool.pred, k, chosen_X, line), p.chosen + 1):
        sid = str(t.pool.ids[r])
        used.add(sid)
        pred = float(t.pool.pred[r])
        out.append(_item(sid, info, None, S.POOL_SPLIT, None, p, rank, None, pred,
                         f"unlabeled image the name {p.mode!r} retrieves, predicted loss {pred:.2f} "
                         f"({pred / mean_pred:.1f}x the mean)" if mean_pred > 0 else
                         f"unlabeled image the name {p.mode!r} retrieves"))
    return out


def _item(sid, info, label, split, loss, p: ModePlan, rank, suggested, pred, reason) -> dict:
    return {S.ID: sid, S.IMAGE: info["image"][sid], S.LABEL: label, S.SPLIT: split, S.LOSS: loss, "mode": p.mode,
            "action": p.action, "priority": rank, "suggested_label": suggested, "plan_predicted_loss": pred,
            "reason": reason}


def _spread(rows: np.ndarray, X: np.ndarray, pred: np.ndarray, k: int, chosen_X: list[np.ndarray],
            line: float = NEAR_DUPLICATE) -> list[int]:
    """Up to ``k`` of ``rows`` (sorted by predicted loss, highest first) by maximal marginal
    relevance: each step takes the row maximising ``(1 - DIVERSITY) x`` its predicted loss (scaled
    to [0, 1] over the candidates) ``- DIVERSITY x`` its cosine to the nearest image chosen so far,
    never one at cosine ``line`` (the near-duplicate line) or closer. Appends the chosen embeddings
    to ``chosen_X``."""
    if k <= 0 or not len(rows):
        return []
    rows = rows[: max(10 * k, 200)]  # the likeliest failures; diversity is weighed among these
    Xc, p = X[rows], pred[rows]
    span = float(p.max() - p.min())
    rel = (p - p.min()) / span if span > 0 else np.ones(len(rows))
    near = np.full(len(rows), -1.0)
    for prev in chosen_X:
        near = np.maximum(near, Xc @ prev)
    out: list[int] = []
    free = np.ones(len(rows), dtype=bool)
    while len(out) < k:
        score = (1 - DIVERSITY) * rel - DIVERSITY * np.maximum(near, 0.0)
        score[~free | (near >= line)] = -np.inf
        j = int(np.argmax(score))
        if not np.isfinite(score[j]):
            break
        out.append(int(rows[j]))
        free[j] = False
        chosen_X.append(Xc[j])
        near = np.maximum(near, Xc @ Xc[j])
    return out
