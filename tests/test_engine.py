"""Query engine: rankings equal a numpy brute-force computation of the documented score."""

import logging
import math
import shutil
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from indexer import schema as S
from indexer.errors import UserError
from search_ui.engine import QueryEngine, parse_weighted
from search_ui.ranking import rank_scores, zscore
from tests.fakes import make_db


def seeded_engine(db, **kw) -> QueryEngine:
    """An engine whose random-weight tiny CLIP is the very model make_db embedded the images with
    (random init is reproducible under the same torch seed)."""
    engine = QueryEngine(db, **kw)
    torch.manual_seed(0)
    assert engine.clip is not None
    return engine


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    torch.manual_seed(0)
    return make_db(tmp_path_factory.mktemp("engine"), n=120)


@pytest.fixture(scope="module")
def engine(db):
    return seeded_engine(db)


@pytest.fixture(scope="module")
def table(db):
    ids, x = db.embeddings()
    t = db.read([S.ID, S.PREDICTED_LOSS, S.SPLIT, S.LABEL])
    pred = dict(zip(t.column(S.ID).to_pylist(), t.column(S.PREDICTED_LOSS).to_pylist(), strict=True))
    meta = {i: (s, lab) for i, s, lab in zip(t.column(S.ID).to_pylist(), t.column(S.SPLIT).to_pylist(),
                                             t.column(S.LABEL).to_pylist(), strict=True)}
    return list(ids), x, pred, meta


def _otsu_count(s, least):
    """The pool, from scratch: split the leading rows by Otsu's threshold (the split maximising
    a*b*(mean_a - mean_b)^2) while it explains >= 0.9 of their variance and keeps >= least rows."""
    if len(s) <= least:
        return len(s)
    c, found = len(s), False
    while c > least:
        t = s[:c]
        a = max(range(1, c), key=lambda a: a * (c - a) * (t[:a].mean() - t[a:].mean()) ** 2)
        explained = a * (c - a) * (t[:a].mean() - t[a:].mean()) ** 2 / c**2 / t.var() if t.var() > 0 else 0
        if explained < 0.9 or a < least:
            break
        c, found = a, True
    if not found:
        return least
    deepest = s[least - 1] - (s[0] - s[least - 1])  # no deeper below the least-th than the least span
    return max(least, min(c, sum(1 for v in s if v >= deepest)))


def brute_force(u, table, k, n, weight=0.5, keep=None, exclude=()):
    """The documented score, from scratch: neighbourhood = 10 n most similar rows, pool = its rows
    narrowest group a clear Otsu split marks off (at least n), z-scores over the neighbourhood with predicted loss's std
    floored by its spread over the table, weighted sum."""
    ids, x, pred, meta = table
    sims = x.astype(np.float64) @ u.astype(np.float64)
    rows = [i for i in range(len(ids)) if (keep is None or keep(meta[ids[i]])) and ids[i] not in exclude]
    hood = sorted(rows, key=lambda i: -sims[i])[: 10 * n]
    s = sims[hood]
    p = np.array([pred[ids[i]] if pred[ids[i]] is not None else np.nan for i in hood], np.float64)
    spread = np.std([v for v in pred.values() if v is not None])
    zs = (s - s.mean()) / s.std()
    zp = (p - p.mean()) / max(p.std(), spread)
    score = (1 - weight) * zs + weight * zp
    c = _otsu_count(s, n)
    order = sorted(range(c), key=lambda j: (-score[j], -s[j]))[:k]
    return [ids[hood[j]] for j in order], score[order], s[order]


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_text_search_equals_brute_force(engine, table, weight):
    results = engine.search("a blue circle", k=10, weight=weight, candidates=40)
    u = engine.encode_text(["a blue circle"])[0]
    want_ids, want_score, want_sim = brute_force(u, table, k=10, n=40, weight=weight)
    assert [r.id for r in results] == want_ids
    np.testing.assert_allclose([r.score for r in results], want_score, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([r.similarity for r in results], want_sim, rtol=1e-5, atol=1e-6)
    assert set(engine.timings) >= {"encode", "ann", "fetch", "rank", "total"}


def test_default_surfaces_failures_among_relevant_rows(engine, table):
    results = engine.search("a blue circle", k=10, candidates=40)
    pool_ids, _, _ = brute_force(engine.encode_text(["a blue circle"])[0], table, k=120, n=40, weight=0.0)
    assert {r.id for r in results} <= set(pool_ids)  # only rows about the query
    by_pred = engine.search("a blue circle", k=10, candidates=40, weight=1.0)
    preds = [r.predicted_loss for r in by_pred]
    assert preds == sorted(preds, reverse=True)
    assert by_pred[0].predicted_loss == max(table[2][i] for i in pool_ids)


def test_result_fields(engine):
    r = engine.search("a red square", k=3)[0]
    d = r.to_dict()
    assert list(d)[:9] == ["id", "image", "label", "split", "loss", "predicted_loss", "predicted_loss_std",
                           "similarity", "score"]
    assert d["color"] in ("red", "green", "blue")
    assert r.id in r.summary() and "predicted loss" in r.summary()


def test_zscore_and_score_edge_cases():
    np.testing.assert_array_equal(zscore(np.array([2.0, 2.0, 2.0])), [0, 0, 0])
    z = zscore(np.array([1.0, np.nan, 3.0]))
    np.testing.assert_allclose(z, [-1, 0, 1])
    np.testing.assert_allclose(rank_scores(np.array([0.1, 0.3]), np.array([np.nan, np.nan]), 0.5), [-0.5, 0.5])


# Row cache + FAISS id selector; without the cache: FAISS with post-filter, and LanceDB's filtered scan.
@pytest.mark.parametrize("cache,max_fetch", [(True, 4096), (False, 10_000), (False, 1)])
def test_where_filter_returns_k_matching_rows(db, table, cache, max_fetch):
    engine = QueryEngine(db, max_ann_fetch=max_fetch, cache_rows=cache)
    where = "split = 'test' AND label = 'circle'"
    assert db.count_rows(where) == 10
    results = engine.search("a blue circle", k=10, where=where, candidates=40)
    assert len(results) == 10
    assert all(r.split == "test" and r.label == "circle" for r in results)
    u = engine.encode_text(["a blue circle"])[0]
    want, score, _ = brute_force(u, table, k=10, n=40, keep=lambda m: m == ("test", "circle"))
    assert [r.id for r in results] == want
    np.testing.assert_allclose([r.score for r in results], score, rtol=1e-4, atol=1e-4)


def test_where_with_few_matches_and_none(engine):
    assert len(engine.search("a shape", k=10, where="id = 's00003'")) == 1
    assert engine.search("a shape", k=10, where="loss < 0") == []
    with pytest.raises(UserError, match="--where"):
        engine.search("a shape", where="no_such_column > 1")


def test_similar_stored_id_excludes_itself(engine, table):
    results = engine.similar("s00006", k=8, candidates=30)
    ids, x, _, _ = table
    u = x[ids.index("s00006")]
    want, score, _ = brute_force(u, table, k=8, n=30, exclude={"s00006"})
    assert [r.id for r in results] == want
    # The random tiny CLIP maps all images within ~1e-4 cosine of each other, so z(similarity)
    # magnifies float32 rounding (FAISS) against this float64 brute force.
    np.testing.assert_allclose([r.score for r in results], score, atol=2e-2)


@pytest.mark.parametrize("cache", [True, False])
def test_similar_with_filter_excludes_itself(db, table, cache):
    engine = QueryEngine(db, cache_rows=cache)
    results = engine.similar("s00000", k=50, where="label = 'circle'", weight=0.0)
    assert len(results) == 39 and all(r.label == "circle" for r in results)
    assert "s00000" not in {r.id for r in results}


def test_similar_new_image_file_is_embedded_on_the_fly(engine, db, tmp_path):
    src = db.read([S.IMAGE], where="id = 's00007'").column(S.IMAGE)[0].as_py()
    copy = tmp_path / "query.png"
    shutil.copy(src, copy)
    results = engine.similar(str(copy), k=5, weight=0.0)
    assert results[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert "s00007" in [r.id for r in results if r.similarity > 0.9999]
    with pytest.raises(UserError, match="neither a sample id"):
        engine.similar(str(tmp_path / "missing.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="junk.png is not a readable image"):
        engine.similar(str(tmp_path / "junk.png"))


def test_composite_query_similarity_is_the_documented_weighted_mean(engine, table):
    ids, x, _, _ = table
    phrases = ["a blue circle", "a red shape", "a square"]
    c = engine.encode_text(phrases)
    img = x[ids.index("s00006")]
    results = engine.search(["a blue circle", "a red shape:0.5"], negatives=["a square:0.8"], image=("s00006", 2.0),
                            k=120, candidates=120, weight=0.0)
    comps = [(c[0], 1.0, 1), (c[1], 0.5, 1), (c[2], 0.8, -1), (img, 2.0, 1)]
    a = [(v, w / (x @ v).std(), sign) for v, w, sign in comps]  # sigma over all rows: n < sample size
    total = sum(ai for _, ai, sign in a if sign > 0)
    sim = sum(sign * ai * (x @ v) for v, ai, sign in a) / total
    got = {r.id: r.similarity for r in results}
    np.testing.assert_allclose([got[i] for i in ids], sim, rtol=1e-4, atol=1e-5)
    ranked = [r.similarity for r in results]
    assert ranked == sorted(ranked, reverse=True)


def test_negative_phrase_moves_results_away(engine, table):
    ids, x, _, _ = table
    neg = engine.encode_text(["a green triangle"])[0]
    plain = engine.search("a shape", k=10, weight=0.0)
    away = engine.search("a shape", negatives=["a green triangle:2"], k=10, weight=0.0)
    cos = {i: float(x[j] @ neg) for j, i in enumerate(ids)}
    assert np.mean([cos[r.id] for r in away]) < np.mean([cos[r.id] for r in plain])


def test_parse_weighted():
    assert parse_weighted("snow:0.5") == ("snow", 0.5)
    assert parse_weighted("a sign saying: stop") == ("a sign saying: stop", 1.0)
    assert parse_weighted("a dog", 0.5) == ("a dog", 0.5)
    assert parse_weighted(("x", 2)) == ("x", 2.0)


def test_bad_queries_are_refused(engine):
    with pytest.raises(UserError, match="at least one"):
        engine.search("  ")
    with pytest.raises(UserError, match="weight"):
        engine.search("a circle", weight=1.5)
    with pytest.raises(UserError, match="-k"):
        engine.search("a circle", k=0)
    with pytest.raises(UserError, match="positive"):
        engine.search("a circle", negatives=["red:-1"])


def test_without_predicted_loss_ranks_by_similarity_and_says_so(tmp_path, caplog):
    db = make_db(tmp_path, n=30, predicted=False)
    engine = QueryEngine(db)
    with caplog.at_level(logging.WARNING):
        results = engine.search("a circle", k=5)
    sims = [r.similarity for r in results]
    assert sims == sorted(sims, reverse=True)
    assert any("diagnose" in n for n in engine.notes) and "diagnose" in caplog.text
    assert all(r.to_dict()["predicted_loss"] is None for r in results)


def test_stale_index_is_rebuilt_or_refused(tmp_path):
    db = make_db(tmp_path, n=30)
    engine = QueryEngine(db)
    assert len(engine.search("a circle", k=50)) == 30
    row = db.read(where="id = 's00001'").to_pylist()[0]
    row[S.ID] = "added"
    db.table.add(pa.Table.from_pylist([row], schema=db.table.schema))
    db.update_meta(data_version=db.version)
    assert "added" in [r.id for r in engine.search("a circle", k=50)]  # rebuilt, not served stale
    row[S.ID] = "added-2"
    db.table.add(pa.Table.from_pylist([row], schema=db.table.schema))
    db.update_meta(data_version=db.version)
    with pytest.raises(UserError, match="stale"):
        QueryEngine(db, rebuild_if_stale=False).search("a circle")


def test_row_cache_sees_new_predictions_and_matches_lancedb_fetch(tmp_path):
    db = make_db(tmp_path, n=30)
    cached, direct = seeded_engine(db), seeded_engine(db, cache_rows=False)  # the same text tower
    a = [r.to_dict() for r in cached.search("a circle", k=8)]
    b = [r.to_dict() for r in direct.search("a circle", k=8)]
    assert [{**r, "score": pytest.approx(r["score"])} for r in a] == b  # pool order: float sums differ
    time.sleep(1.1)  # old enough for the engine to trust its cheap change signature (see _refresh)
    cached.search("a circle", k=8)
    assert cached._seen_signature is not None
    # `diagnose` rewrites predicted_loss (merge_insert: new Lance version, same rows, same index).
    t = db.read([S.ID, S.PREDICTED_LOSS])
    new = pa.array(np.arange(30, dtype=np.float32) * 10)
    db.update_columns(t.set_column(1, S.PREDICTED_LOSS, new))
    got = {r.id: r.predicted_loss for r in cached.search("a circle", k=30)}
    want = dict(zip(t.column(S.ID).to_pylist(), new.to_pylist(), strict=True))
    assert got == want


@pytest.mark.parametrize("cache", [True, False])
def test_filters_on_an_ivf_index_still_return_k_rows(tmp_path, cache):
    from indexer import ann
    from tests.test_ann import synthetic_db

    db, x, ids = synthetic_db(tmp_path / "db", n=3000)
    ann.build_index(db, exact_max_rows=1000)
    engine = QueryEngine(db, cache_rows=cache)
    few = ",".join(f"'{i}'" for i in ids[::200])  # 15 rows spread over the whole index
    got = engine.similar(ids[1], k=10, where=f"id IN ({few})", weight=0.0)
    want = sorted(ids[::200], key=lambda i: -float(x[ids.index(i)] @ x[1]))[:10]
    assert [r.id for r in got] == want  # so selective a filter is searched exactly
    assert len(engine.similar(ids[1], k=30, where="loss < 0.25", weight=0.0)) == 30
    assert len(engine.similar(ids[1], k=10, where=f"id IN ({few})", candidates=15)) == 10


@pytest.mark.parametrize("cache", [True, False])
def test_ivf_neighbourhood_probes_the_pools_cells_not_the_neighbourhoods(tmp_path, monkeypatch, cache):
    """The 10 N neighbourhood is searched with the cells a search POOL_PROBE_DEPTH N deep needs (and
    enough to hold it), not with nprobe_for(10 N); a probe that finds too few rows is repeated as
    deep as the neighbourhood."""
    from indexer import ann
    from search_ui import engine as E
    from tests.test_ann import synthetic_db

    db, x, ids = synthetic_db(tmp_path / "db", n=3000)
    ann.build_index(db, exact_max_rows=1000)
    engine = QueryEngine(db, cache_rows=cache)
    index = engine.ann
    calls = []
    real = ann.AnnIndex.search_positions

    def spy(self, queries, k, nprobe=None):
        calls.append((k, nprobe))
        return real(self, queries, k, nprobe)

    monkeypatch.setattr(ann.AnnIndex, "search_positions", spy)
    n, nb = 50, 500  # least pool and its neighbourhood (10 N)
    got = engine.similar(x[1], k=10, weight=0.0, candidates=n)
    want = E.neighbourhood_nprobe(index, n, nb)
    hold = math.ceil(E.PROBE_FILL * nb * index.info["nlist"] / index.ntotal)
    assert want == max(index.nprobe_for(E.POOL_PROBE_DEPTH * n), hold) < index.nprobe_for(nb)
    assert calls == [(nb, want)]
    assert [r.id for r in got] == [ids[i] for i in np.argsort(-(x @ x[1]), kind="stable")[:10]]
    if cache:  # a probe finding fewer rows than the neighbourhood asks for is repeated as deep as it
        calls.clear()
        monkeypatch.setattr(E, "neighbourhood_nprobe", lambda *a, **kw: 1)
        assert len(engine.similar(x[1], k=10, candidates=n)) == 10
        assert calls == [(nb, 1), (nb, None)]


def test_two_step_probe_returns_what_probing_twice_the_pool_returns(tmp_path, monkeypatch):
    """Unfiltered queries probe N's cells first and 2 N's only when the neighbourhood reaches the far
    half of them (module doc, "Probing the neighbourhood"): on- and off-data queries get the same
    results, in the same order, as probing 2 N's cells every time."""
    from indexer import ann
    from search_ui import engine as E
    from tests.test_ann import synthetic_db

    db, x, _ = synthetic_db(tmp_path / "db", n=6000)
    ann.build_index(db, exact_max_rows=1000)
    engine = QueryEngine(db)
    index = engine.ann
    # on 6,000 rows the tuned probes for depths 20 and 40 coincide; wider tuned values (as a large
    # table has) make N's and 2 N's cells differ
    index.info["nprobe"], index.info["nprobe_at_100"] = 16, 64
    n = 20  # the least pool; its neighbourhood is neighbourhood_size(20) rows
    assert E.neighbourhood_nprobe(index, n, E.neighbourhood_size(n), depth=1) < \
        E.neighbourhood_nprobe(index, n, E.neighbourhood_size(n))  # two steps are possible here
    rng = np.random.default_rng(4)
    off = rng.normal(size=(6, x.shape[1])).astype(np.float32)
    queries = [x[i] for i in (1, 50, 700)] + list(off / np.linalg.norm(off, axis=1, keepdims=True))
    deepened = []
    real = ann.AnnIndex.search_deepening

    def spy(self, *a, **kw):
        deepened.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(ann.AnnIndex, "search_deepening", spy)
    one_step = [[r.id for r in engine.similar(q, k=5, candidates=n)] for q in queries]
    assert not deepened  # an index this small is probed in one step (TWO_STEP_MIN_SCAN)
    monkeypatch.setattr(E, "TWO_STEP_MIN_SCAN", 0)
    two_step = [[r.id for r in engine.similar(q, k=5, candidates=n)] for q in queries]
    assert len(deepened) == len(queries)  # every one went through the two-step probe
    assert two_step == one_step
    monkeypatch.setattr(ann.AnnIndex, "can_deepen", property(lambda self: False))
    assert [[r.id for r in engine.similar(q, k=5, candidates=n)] for q in queries] == two_step
    # ... and for the off-data queries N's cells alone find other neighbourhoods: the equality above
    # holds because they went on to the far cells
    near = E.neighbourhood_nprobe(index, n, E.neighbourhood_size(n), depth=1)
    far = E.neighbourhood_nprobe(index, n, E.neighbourhood_size(n))

    def hood(q, nprobe):
        return set(index.search_positions(q[None, :], E.neighbourhood_size(n), nprobe=nprobe)[1][0].tolist())

    assert any(hood(q, near) != hood(q, far) for q in queries[3:])
