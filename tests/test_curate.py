"""`llm2loss curate` (issue 24): which fix each failure mode needs, the budget, the items.

The decisions are tested on the synthetic CLIP space of test_naming (each attribute word a
direction, so the right name of every failure is known) with a training split, a held-out split and
an unlabeled pool; the command end to end on a real database in test_pool.py.
"""

import numpy as np
import pytest

from diagnosis.curate import (
    COLLECT,
    DUPLICATE,
    LEFTOVER,
    NEAR_DUPLICATE,
    RELABEL,
    _allot,
    _spread,
    make_plan,
    near_duplicate_line,
)
from diagnosis.explain import FailureMode, Faithfulness, _Pool, _Table, attach_pool, name_modes
from diagnosis.vocab import Grammar
from tests.test_naming import ATTR, Space, vocab

SHAPES = ATTR["shape"]


def planted_world(seed: int = 4, n: int = 16000):
    """Train 70%, test 20%, pool 10%. Striped triangles: half their training labels wrong (the
    model's loss on those rows is high; held-out loss 6x). Small stars: rare in training (all but
    a handful drawn again as other shapes; held-out loss 8x). The pool is uniform, unlabeled, and
    the ensemble predicts its failures (predicted loss ~ what the model would lose)."""
    s = Space(seed=seed, n=n)
    r = s.rng.random(n)
    split = np.where(r < 0.7, "train", np.where(r < 0.9, "test", "pool")).astype(object)
    train, pool = split == "train", split == "pool"
    small_star_train = np.flatnonzero(s.where(shape="star", size="small") & train)
    keep = s.rng.choice(small_star_train, 12, replace=False)
    redraw = np.setdiff1d(small_star_train, keep)
    s.rows["shape"][redraw] = s.rng.choice(["circle", "square", "triangle", "cross"], len(redraw))
    s.embed()
    labels = s.rows["shape"].astype(object).copy()
    striped = s.where(shape="triangle", background="striped")
    noisy = np.flatnonzero(striped & train)
    wrong = noisy[s.rng.random(len(noisy)) < 0.5]
    labels[wrong] = [SHAPES[(SHAPES.index("triangle") + int(k)) % 5] for k in s.rng.integers(1, 5, len(wrong))]
    s.loss[wrong] *= 15  # the model cannot fit them: high training loss
    s.loss[striped & ~train] *= 6
    small_star = s.where(shape="star", size="small")
    s.loss[small_star & ~train] *= 8
    labels[pool] = None
    t = s.table(split)
    t.loss[pool] = np.nan
    keep_rows = ~pool
    full_ids = t.ids.copy()
    table = _Table(ids=t.ids[keep_rows], X=t.X[keep_rows], loss=t.loss[keep_rows], pred=t.pred[keep_rows],
                   std=t.std[keep_rows], split=split[keep_rows],
                   pool=_Pool(ids=t.ids[pool], X=t.X[pool],
                              pred=t.pred[pool] * np.where(small_star[pool], 8, 1) * np.where(striped[pool], 6, 1)))
    info = {"label": dict(zip(full_ids, labels, strict=True)),
            "image": {i: f"/images/{i}.png" for i in full_ids}}
    return s, table, info, {"striped": striped, "small_star": small_star, "wrong": wrong, "pool": pool}


def _modes(s, table):
    phrases = vocab()
    T = s.encode(phrases)
    words = Faithfulness(Grammar(phrases), s.encode, phrases, T)
    modes = name_modes(table, phrases, T, s.encode, words=words)
    attach_pool(modes, table, words)
    return modes, words


@pytest.fixture(scope="module")
def world():
    s, table, info, truth = planted_world()
    modes, words = _modes(s, table)
    return s, table, info, truth, modes, words


def test_the_noisy_label_group_is_relabelled_and_the_rare_group_collected(world):
    s, table, info, truth, modes, words = world
    names = [m.description for m in modes]
    assert "a triangle on a striped background" in names and "a small star" in names
    plan = make_plan(modes, table, words, info, budget=400)
    by = {m.mode: m for m in plan.modes}
    noisy, rare = by["a triangle on a striped background"], by["a small star"]
    assert noisy.action == RELABEL and rare.action == COLLECT
    assert noisy.figures["suspect_share"] > 0.3 > 3 * noisy.figures["base_suspect_share"]
    assert rare.figures["train_share"] < 0.1 * rare.figures["held_out_share"]  # scarce in training
    assert "too few" in rare.reason
    assert noisy.figures["train_share"] > 0.5 * noisy.figures["held_out_share"]
    for m in (noisy, rare):  # one sentence, with its figures
        assert "%" in m.reason and "\n" not in m.reason
    items = plan.items
    row = {i: j for j, i in enumerate(s.table().ids)}
    relabel = [it for it in items if it["mode"] == noisy.mode]
    collect = [it for it in items if it["mode"] == rare.mode]
    assert relabel and collect
    wrong = set(truth["wrong"].tolist())
    # the suspect labels are the corrupted ones, nearly all, and their neighbours' label is the truth
    assert np.mean([row[it["id"]] in wrong for it in relabel]) > 0.9
    assert np.mean([it["suggested_label"] == "triangle" for it in relabel]) > 0.8
    assert all(it["split"] == "train" and it["label"] is not None for it in relabel)
    # collected: unlabeled pool images, nearly all small stars, the likeliest failures first
    assert all(it["split"] == "pool" and it["label"] is None and it["loss"] is None for it in collect)
    assert np.mean([truth["small_star"][row[it["id"]]] for it in collect]) > 0.9
    assert len({it["id"] for it in items}) == len(items)


def test_the_budget_is_respected_and_split_by_the_documented_rule(world):
    s, table, info, truth, modes, words = world
    for budget in (1, 7, 60, 400, 100000):
        plan = make_plan(modes, table, words, info, budget=budget)
        assert len(plan.items) == sum(m.chosen for m in plan.modes) <= budget
        assert all(m.chosen <= m.budget <= m.available for m in plan.modes)
        if budget <= min(m.available for m in plan.modes):
            assert sum(m.budget for m in plan.modes) == budget  # nothing left over while every mode has items
    # half equal, half by cost (the share of loss when a mode has no cost): a mode costing nothing
    # still gets its equal half
    plans = [type("P", (), {"available": 1000, "budget": 0, "action": "collect"})() for _ in range(2)]
    fm = [FailureMode("a", 1, 0, [], 10, 1.0, 1.0, 1.0, [], "both"), FailureMode("b", 1, 0, [], 10, 1.0, 1.0, 0.0, [], "both")]
    _allot(plans, fm, 100)
    assert [p.budget for p in plans] == [75, 25]
    fm[0].cost, fm[1].cost = 0.0, 0.3  # explain's cost decides where it is known
    _allot(plans, fm, 100)
    assert [p.budget for p in plans] == [25, 75]
    fm[0].cost = fm[1].cost = None
    plans[1].available = 5  # capped: what it cannot use goes to the other
    _allot(plans, fm, 100)
    assert [p.budget for p in plans] == [95, 5]
    # a relabel mode gets all its suspect labels first, the collect modes what is left
    plans = [type("P", (), {"available": a, "budget": 0, "action": act})()
             for a, act in ((1000, "collect"), (30, "relabel"), (1000, "collect"))]
    fm.append(FailureMode("c", 1, 0, [], 10, 1.0, 1.0, 1.0, [], "both"))
    _allot(plans, fm, 100)
    assert [p.budget for p in plans] == [35, 30, 35]
    plans[1].available = 500  # more suspects than the budget: they take it all
    _allot(plans, fm, 100)
    assert [p.budget for p in plans] == [0, 100, 0]


def test_near_duplicates_do_not_use_the_budget_twice():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 16))
    X = np.vstack([X, X[:3] + 1e-4 * rng.normal(size=(3, 16))])  # rows 6-8 duplicate rows 0-2
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    pred = np.array([5, 4, 3, 1, 1, 1, 6, 5.5, 3.5])
    rows = np.argsort(-pred, kind="stable")
    chosen = _spread(rows, X, pred, 6, [])
    assert len(chosen) == 6 and len(set(chosen)) == 6
    pairs = {(0, 6), (1, 7), (2, 8)}
    assert not any({a, b} <= set(chosen) for a, b in pairs)
    assert max(X[a] @ X[b] for a in chosen for b in chosen if a != b) < NEAR_DUPLICATE
    assert chosen[0] == 6  # the likeliest failure first
    # an image close to one an earlier mode took is not taken again
    taken = [X[6]]
    assert 0 not in _spread(rows, X, pred, 8, taken)


def test_the_near_duplicate_line_follows_how_close_distinct_images_are():
    """A CLIP that ignores nuisances puts distinct images of one kind at cosine ~0.997: a fixed 0.98
    would call them all duplicates and spend a fraction of the budget; copies stay duplicates."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 32))
    X = centres[rng.integers(0, 5, 400)] + 0.05 * rng.normal(size=(400, 32))  # tight kinds: cosine ~0.997
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    line = near_duplicate_line(X)
    assert NEAR_DUPLICATE < line <= DUPLICATE
    pred = rng.random(400)
    rows = np.argsort(-pred)
    assert len(_spread(rows, X, pred, 200, [], line)) == 200  # the budget is spent
    assert len(_spread(rows, X, pred, 200, [], NEAR_DUPLICATE)) <= 5  # a fixed 0.98: one per kind
    spread_out = rng.normal(size=(400, 32))
    spread_out /= np.linalg.norm(spread_out, axis=1, keepdims=True)
    assert near_duplicate_line(spread_out.astype(np.float32)) == pytest.approx(NEAR_DUPLICATE)
    copies = np.vstack([X[:10], X[:10]])
    assert len(set(_spread(np.arange(20), copies, np.ones(20), 20, [], near_duplicate_line(copies)))) == 10


def test_a_mode_whose_pool_images_another_took_leaves_its_budget_to_the_others(world):
    """Two names retrieving the same pool images ("a small star" and a twin): the second runs short
    of images the first has not taken, and what it leaves is spent by the other modes."""
    import copy

    s, table, info, truth, modes, words = world
    star = next(m for m in modes if m.description == "a small star")
    alone = make_plan(modes, table, words, info, budget=1).modes
    suspects = sum(m.available for m in alone if m.action == RELABEL)
    images = sum(m.available for m in alone if m.action == COLLECT)  # distinct pool images the names retrieve
    budget = suspects + 300  # the relabel modes take their suspects first; the rest for the collect modes
    plan = make_plan([*modes, copy.copy(star)], table, words, info, budget=budget)
    first, twin = [m for m in plan.modes if m.mode == "a small star"]
    assert first.action == twin.action == COLLECT and images < 300
    assert twin.chosen < twin.budget  # it ran short: the first took its images
    # nothing that could be spent was left unspent: every suspect, every pool image the names
    # retrieve, and the rest on the pool's likeliest failures that no mode took
    leftover = plan.modes[-1]
    assert leftover.mode == LEFTOVER and leftover.number == 0 and leftover.chosen == budget - suspects - images
    assert len(plan.items) == sum(m.chosen for m in plan.modes) == budget
    assert len({it["id"] for it in plan.items}) == len(plan.items)
    rest = [it for it in plan.items if it["mode"] == LEFTOVER]
    assert all(it["split"] == "pool" for it in rest)
    pred = dict(zip(table.pool.ids, table.pool.pred, strict=True))
    taken = {it["id"] for it in plan.items if it["mode"] != LEFTOVER}
    others = sorted((p for i, p in pred.items() if i not in taken), reverse=True)
    # the likeliest failures: spread out, but from the top of what was left
    assert np.median([pred[it["id"]] for it in rest]) >= others[len(others) // 4]
