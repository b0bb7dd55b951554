"""The ranking's pool and units (search_ui.ranking), on synthetic neighbourhoods: pure numpy."""

import numpy as np

from search_ui.ranking import loss_spread, pool_size, rank_order, rank_scores


def _top(sims, pred, k=10, least=100, weight=0.5, spread=0.0):
    """The engine's order over a neighbourhood sorted most similar first."""
    score = rank_scores(sims, pred, weight, spread)
    c = pool_size(sims, least)
    ids = [f"r{i:04d}" for i in range(len(sims))]
    return rank_order(score[:c], sims[:c], ids[:c])[:k]


def _neighbourhood(rng, relevant=360, other=640):
    """1,000 rows most similar first: ``relevant`` rows all about the query (cosine 0.59-0.65)
    above ``other`` rows that are not (0.38-0.48), as a phrase's neighbourhood on the world."""
    sims = np.concatenate([rng.uniform(0.59, 0.65, relevant), rng.uniform(0.38, 0.48, other)])
    return np.sort(sims)[::-1]


def test_pool_is_the_rows_that_stand_out_never_fewer_than_least():
    rng = np.random.default_rng(0)
    sims = _neighbourhood(rng)
    # the group's upper part: no deeper below the 100th row than the 100 most similar span
    n = pool_size(sims, 100)
    assert 100 < n < 360 and sims[n - 1] >= sims[99] - (sims[0] - sims[99])
    assert sims[n] < sims[99] - (sims[0] - sims[99])
    assert pool_size(sims, 500) == 500  # never fewer than the least pool
    assert pool_size(sims[:80], 100) == 80  # a neighbourhood below the least pool is all of it
    assert pool_size(np.full(300, 0.5), 100) == 100  # nothing stands out: the least pool
    # two near-duplicates far above the rest: they stand out, but the pool keeps the least
    assert pool_size(np.concatenate([[0.99, 0.98], rng.uniform(0.49, 0.51, 998)]), 100) == 100
    assert pool_size(np.concatenate([[0.99, 0.98], sims]), 100) > 100  # nor do they hide the 360
    # a group inside the group is the pool: 150 rows (blue crosses) stand out among the 360 (blue objects)
    nested = np.sort(np.concatenate([rng.uniform(0.70, 0.72, 150), rng.uniform(0.60, 0.62, 210),
                                     rng.uniform(0.30, 0.40, 640)]))[::-1]
    assert pool_size(nested, 100) == 150
    # three groups that no split marks off clearly: the least pool (relevance first)
    blurred = np.sort(np.concatenate([rng.uniform(0.70, 0.74, 150), sims[150:]]))[::-1]
    assert pool_size(blurred, 100) == 100
    # a flat band of similarities (real data, a vague query) marks no group: the least pool
    assert pool_size(np.linspace(0.6, 0.3, 1000), 100) == 100


def test_failures_among_many_equally_relevant_rows_are_found():
    """360 rows are all "a small yellow object"; the model fails on 60 of them a little less
    similar than the 100 most similar (say those on light backgrounds). The 100 most similar rows
    hold none of them, so no ranking within a fixed pool of 100 can find them; the pool does."""
    rng = np.random.default_rng(1)
    sims = _neighbourhood(rng)
    pred = np.full(len(sims), 0.05) + rng.normal(0, 0.01, len(sims))
    failing = np.zeros(len(sims), bool)
    failing[110:170] = True
    pred[failing] += 1.0
    assert not failing[:100].any()
    top = _top(sims, pred, spread=loss_spread(pred))
    assert failing[top].all()
    # the irrelevant rows never come up, even when they look harder than the relevant ones
    pred2 = pred.copy()
    pred2[360:] += 3.0
    assert (_top(sims, pred2, spread=loss_spread(pred2)) < 360).all()


def test_tiny_differences_of_predicted_loss_do_not_outrank_similarity():
    """Every row of the neighbourhood looks easy (predicted loss 0.02 +- 1e-4) in a table whose
    predicted losses spread 1.0: the results follow similarity. Without the floor the noise, scaled
    to unit std, reorders them."""
    rng = np.random.default_rng(2)
    sims = _neighbourhood(rng)
    pred = 0.02 + rng.normal(0, 1e-4, len(sims))
    by_similarity = np.arange(10)
    assert np.array_equal(_top(sims, pred, spread=1.0), by_similarity)
    assert not np.array_equal(_top(sims, pred, spread=0.0), by_similarity)


def test_loss_spread_ignores_missing_predictions():
    assert loss_spread(np.array([1.0, np.nan, 3.0])) == 1.0
    assert loss_spread(np.array([np.nan, np.nan])) == 0.0


def test_rank_is_the_composition_of_the_parts():
    """``rank`` (the engine's one call) returns the rows, order and scores of pool_size + rank_scores +
    rank_order: on groups that stand out, ties of score and similarity, missing predictions."""
    from search_ui.ranking import rank

    rng = np.random.default_rng(3)
    for trial in range(300):
        m = int(rng.choice([1, 50, 100, 101, 1000]))
        s = [rng.normal(0.3, 0.05, m), np.round(rng.normal(0.3, 0.05, m), 2), np.full(m, 0.5),
             np.concatenate([rng.uniform(0.6, 0.65, m // 3), rng.uniform(0.3, 0.45, m - m // 3)])][trial % 4]
        s = np.sort(s)[::-1].copy()
        pred = np.round(rng.gamma(1.0, 0.4, m), 1 if trial % 3 == 0 else 6)
        if trial % 5 == 1:
            pred[rng.random(m) < 0.3] = np.nan
        if trial % 7 == 2:
            pred[:] = np.nan
        ids = np.array([f"r{i:04d}" for i in rng.permutation(m)])
        least, k = int(rng.choice([1, 10, 100])), int(rng.choice([1, 10, 200]))
        weight, spread = float(rng.choice([0.0, 0.5, 1.0])), float(rng.choice([0.0, 0.4]))
        score = rank_scores(s, pred, weight, spread)
        c = pool_size(s, least)
        want = rank_order(score[:c], s[:c], ids[:c])[:k]
        for form in (ids, ids.tolist(), ids.__getitem__):  # ids as an array, a list, a lookup
            order, got = rank(s, pred, form, least, k, weight, spread)
            assert np.array_equal(order, want), trial
            np.testing.assert_allclose(got, score[want], rtol=1e-12, atol=0)
    order, got = rank(np.zeros(0), np.zeros(0), np.zeros(0, str), 100, 10)
    assert len(order) == len(got) == 0
