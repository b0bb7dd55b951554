"""The unlabeled pool (issue 24) end to end on real databases: rows with neither a label nor a loss
are indexed as ``split = 'pool'``, never fitted, scored; search, export, the API and `curate` work
on them, and a plan's manifest goes back into `index`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import requests

from diagnosis.run import diagnose, score_new_rows
from indexer import schema as S
from indexer.errors import UserError
from indexer.pipeline import index_dataset
from indexer.store import Database
from search_ui.cli import main
from tests.fakes import COLORS, SHAPES, draw, make_images


def _pool_manifest(folder, n=60, seed=7, start=0) -> pd.DataFrame:
    """``n`` unlabeled images (an `image` column only) in ``folder/pool.csv``; returns their truth."""
    (folder / "pool").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        shape, color = SHAPES[i % 3], list(COLORS)[(i // 3) % 3]
        rel = f"pool/p{i:05d}.png"
        draw(shape, color, seed=seed * 100003 + i).save(folder / rel)
        rows.append({"image": rel, "shape": shape, "color": color})
    truth = pd.DataFrame(rows)
    truth[["image"]].to_csv(folder / "pool.csv", index=False)
    return truth


@pytest.fixture(scope="module")
def pooled(tmp_path_factory, tiny_clip_spec):
    """(folder, db): 150 labelled rows (blue circles fail) fitted, then 60 pool images indexed."""
    folder = tmp_path_factory.mktemp("pool")
    make_images(folder, n=150)
    index_dataset(folder / "manifest.csv", folder / "db", clip=tiny_clip_spec, progress=False, workers=0)
    diagnose(folder / "db", members=2, folds=3, progress=False)  # as test_the_ensemble_never_fits_a_pool_row refits: the same ensemble whichever test runs first
    truth = _pool_manifest(folder)
    truth[S.ID] = truth["image"]  # a manifest without ids: the image path, as written, is the id
    truth.to_csv(folder / "pool_truth.csv", index=False)
    report = index_dataset(folder / "pool.csv", folder / "db", progress=False, workers=0)
    assert report.rows_written == 60 and report.pool_rows == 60 and not report.rejected
    assert "unlabeled rows (no label, no loss): 60" in report.summary()
    return folder, Database(folder / "db")


def test_a_pool_only_manifest_indexes_and_gets_predicted_losses(pooled):
    folder, db = pooled
    t = db.read([S.ID, S.LABEL, S.LOSS, S.SPLIT, S.PREDICTED_LOSS]).to_pandas()
    pool = t[t[S.SPLIT] == S.POOL_SPLIT]
    assert len(pool) == 60 and pool[S.LOSS].isna().all() and pool[S.LABEL].isna().all()
    assert pool[S.PREDICTED_LOSS].isna().all()  # added after the fit: not scored yet
    from diagnosis.run import load_ensemble

    assert load_ensemble(db, allow_stale=True).stale  # rows came after the fit
    assert score_new_rows(db, progress=False) == 60
    t = db.read([S.SPLIT, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD]).to_pandas()
    assert t[S.PREDICTED_LOSS].notna().all() and (t[S.PREDICTED_LOSS_STD] >= 0).all()
    # they were unlabeled, nothing the fit could have learned from: once scored, the ensemble is
    # current again (explain and curate use it without a refit)
    assert load_ensemble(db).stale is None


def test_the_ensemble_never_fits_a_pool_row(pooled, monkeypatch):
    from diagnosis import ensemble

    folder, db = pooled
    seen = {}
    fit = ensemble.DiagnosisEnsemble.fit

    def spy(self, X, y):
        seen["n"], seen["finite"] = len(y), bool(np.isfinite(y).all())
        return fit(self, X, y)

    monkeypatch.setattr(ensemble.DiagnosisEnsemble, "fit", spy)
    report = diagnose(db, members=2, folds=3, progress=False)
    t = db.read([S.SPLIT, S.LOSS, S.PREDICTED_LOSS]).to_pandas()
    held_out = (t[S.SPLIT] == "test").sum()  # the table has train and test rows: held-out ones are fitted
    assert seen == {"n": held_out, "finite": True} and report.fitted_rows == held_out
    assert report.pool_rows == 60 and "unlabeled pool: 60 rows scored" in report.summary()
    assert t[S.PREDICTED_LOSS].notna().all()  # every row scored, the pool included


def test_labelled_and_pool_rows_mixed_in_one_manifest(tmp_path, tiny_clip_spec):
    df = make_images(tmp_path, n=30)
    df.loc[[0, 1, 2], ["label", "loss"]] = None  # unlabeled: pool rows, whatever split they were given
    df.loc[3, "split"] = "pool"  # a labelled row cannot claim the pool's split
    df.loc[4, "loss"] = None  # a label but no loss: a missing loss, as before
    df.to_csv(tmp_path / "mixed.csv", index=False)
    report = index_dataset(tmp_path / "mixed.csv", tmp_path / "db", clip=tiny_clip_spec, progress=False, workers=0)
    assert report.pool_rows == 3 and report.rows_written == 28
    assert report.rejected == {"loss is missing": 1, "split 'pool' on a labelled row": 1}
    t = Database(tmp_path / "db").read([S.ID, S.SPLIT, S.LOSS, S.LABEL]).to_pandas().set_index(S.ID)
    assert (t.loc[df["id"][:3], S.SPLIT] == S.POOL_SPLIT).all() and t.loc[df["id"][:3], S.LOSS].isna().all()
    assert (t.drop(df["id"][:3])[S.SPLIT] != S.POOL_SPLIT).all() and t.drop(df["id"][:3])[S.LOSS].notna().all()


def test_a_manifest_with_some_labels_and_no_loss_source_is_still_refused(tmp_path, tiny_clip_spec):
    df = make_images(tmp_path, n=12).drop(columns=["loss"])
    df.loc[[0, 1], "label"] = None
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(UserError, match="no `loss` column.*unlabeled pool"):
        index_dataset(tmp_path / "m.csv", tmp_path / "db", clip=tiny_clip_spec, progress=False, workers=0)
    assert not (tmp_path / "db").exists()


def test_search_and_export_restricted_to_the_pool(pooled, tmp_path, capsys):
    import json

    folder, db = pooled
    score_new_rows(db, progress=False)
    assert main(["search", "a blue circle", "--db", str(db.path), "-k", "8", "--pool", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 8 and all(h["split"] == S.POOL_SPLIT and h["loss"] is None for h in hits)
    assert all(h["predicted_loss"] is not None for h in hits)
    assert main(["export", "--db", str(db.path), "--query", "a blue circle", "-k", "5", "--pool",
                 "--out", str(tmp_path / "queue.csv")]) == 0
    out = pd.read_csv(tmp_path / "queue.csv")
    assert len(out) == 5 and (out[S.SPLIT] == S.POOL_SPLIT).all()


def _words_encoder(db, monkeypatch):
    """Text embeddings that mean what they say on the tiny random CLIP: a phrase is the mean image
    of the rows whose colour and shape it names (as test_explain's), pool rows included."""
    from diagnosis.explain import _read_table
    from diagnosis.text import Scorer

    t = _read_table(db)
    ids = list(t.ids) + list(t.pool.ids)
    X = np.vstack([t.X, t.pool.X])
    lab = db.read([S.ID, S.LABEL, "color"]).to_pandas().set_index(S.ID)
    folder = db.path.parent
    truth = pd.read_csv(folder / "pool_truth.csv").set_index(S.ID)
    color = [lab.at[i, "color"] if i in lab.index and isinstance(lab.at[i, "color"], str) else truth.at[i, "color"]
             for i in ids]
    shape = [lab.at[i, S.LABEL] if i in lab.index and isinstance(lab.at[i, S.LABEL], str) else truth.at[i, "shape"]
             for i in ids]
    color, shape = np.array(color), np.array(shape)

    def encode(self, phrases):
        out = []
        for p in phrases:
            w = p.split()
            m = np.ones(len(ids), bool)
            if np.isin(color, w).any():
                m &= np.isin(color, w)
            if np.isin(shape, w).any():
                m &= np.isin(shape, w)
            v = X[m].mean(axis=0) if m.any() else X.mean(axis=0)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)

    monkeypatch.setattr(Scorer, "encode_text", encode)


@pytest.fixture()
def planned(pooled, monkeypatch):
    folder, db = pooled
    score_new_rows(db, progress=False)
    _words_encoder(db, monkeypatch)
    (folder / "vocab.txt").write_text("\n".join([f"a {c} {s}" for c in COLORS for s in SHAPES]
                                               + ["a blue object", "a circle"]))
    return folder, db


def test_curate_writes_an_indexable_plan_within_budget_and_never_overwrites(planned, tmp_path, capsys,
                                                                               tiny_clip_spec):
    import json

    folder, db = planned
    out = tmp_path / "plan.csv"
    assert main(["curate", "--db", str(db.path), "--budget", "12", "--out", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["modes"] and plan["modes"][0]["mode"] in ("a blue circle", "a blue object")
    items = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert 0 < len(items) <= 12 and len(items) == len(plan["items"])
    assert list(items.columns) == ["id", "image", "label", "split", "loss", "mode", "action", "priority",
                                   "suggested_label", "plan_predicted_loss", "reason"]
    collect = items[items["action"] == "collect"]
    assert len(collect) and (collect[S.SPLIT] == S.POOL_SPLIT).all() and collect[S.LABEL].isna().all()
    for m in plan["modes"]:
        assert m["action"] in ("collect", "relabel") and m["chosen"] <= m["budget"] and "%" in m["reason"]
    # the plan goes back into `index`: the same ids, collected rows as pool rows
    report = index_dataset(out, tmp_path / "again", clip=tiny_clip_spec, progress=False, workers=0)
    assert report.rows_written == len(items) and not report.rejected
    back = Database(tmp_path / "again").read([S.ID, S.SPLIT, "action"]).to_pandas()
    assert sorted(back[S.ID]) == sorted(items[S.ID])
    assert (back.loc[back["action"] == "collect", S.SPLIT] == S.POOL_SPLIT).all()
    # an existing file is replaced only with --force; a budget below 1 is refused in one sentence
    assert main(["curate", "--db", str(db.path), "--budget", "5", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and len(pd.read_csv(out)) == len(items)
    assert main(["curate", "--db", str(db.path), "--budget", "5", "--out", str(out), "--force"]) == 0
    assert len(pd.read_csv(out)) <= 5
    assert main(["curate", "--db", str(db.path), "--budget", "0", "--out", str(tmp_path / "z.csv")]) == 2
    assert "at least 1" in capsys.readouterr().err and not (tmp_path / "z.csv").exists()


def test_explain_names_on_labelled_rows_and_counts_the_pool_its_name_retrieves(planned):
    from diagnosis.explain import explain

    folder, db = planned
    modes = explain(db, top=5)
    assert modes and all(m.pool_rows is not None for m in modes)
    pool_ids = set(db.read([S.ID, S.SPLIT]).to_pandas().query("split == 'pool'")[S.ID])
    for m in modes:
        assert not set(m.ids) & pool_ids  # members are labelled rows
        assert set(m.pool_ids) <= pool_ids and len(m.pool_ids) == m.pool_rows
        assert "pool_ids" not in m.to_dict()
    truth = pd.read_csv(folder / "pool_truth.csv").set_index(S.ID)
    blue = modes[0]
    assert blue.description in ("a blue circle", "a blue object")
    got = truth.loc[blue.pool_ids]
    assert len(got) and (got["color"] == "blue").mean() > 0.8  # the pool images it retrieves show it


def test_the_api_curates_and_searches_the_pool(planned):
    from search_ui.app import serve

    folder, db = planned
    server = serve(db, port=None, block=False)
    try:
        api = server.local_url.rstrip("/") + "/api/v1"
        r = requests.post(f"{api}/curate", json={"budget": 10})
        assert r.status_code == 200, r.text
        plan = r.json()
        assert plan["modes"] and sum(m["chosen"] for m in plan["modes"]) == len(plan["items"]) <= 10
        r = requests.post(f"{api}/curate", json={"budget": 10, "format": "csv"})
        assert r.status_code == 200 and r.text.splitlines()[0].startswith('"id","image"')
        assert requests.post(f"{api}/curate", json={"budget": 0}).status_code == 400
        assert requests.post(f"{api}/curate", json={"budget": 10, "modes": ["no such mode"]}).status_code == 400
        r = requests.post(f"{api}/search", json={"text": "a red square", "k": 5, "pool": True})
        assert r.status_code == 200 and all(h["split"] == S.POOL_SPLIT for h in r.json()["results"])
    finally:
        server.close()


def test_the_curate_tab_makes_a_plan_and_offers_its_manifest(planned):
    import gradio as gr

    from search_ui.ui.context import AppContext
    from search_ui.ui.handlers import Handlers

    folder, db = planned
    ui = Handlers(AppContext(db))
    md, rows, items, path = ui.plan(9, progress=lambda *a, **k: None)
    assert "Labelling plan" in md and rows and all(r[2] in ("collect", "relabel") for r in rows)
    plan = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert 0 < len(plan) <= 9 and sum(r[3] for r in rows) == len(plan) and len(items) == len(plan)
    with pytest.raises(gr.Error, match="not a whole number"):
        ui.plan("lots", progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="at least 1"):
        ui.plan(0, progress=lambda *a, **k: None)
    # the search tab's pool toggle
    gallery, msg, shown = ui.search("a red square", 6, 0.5, "", "", True, progress=lambda *a, **k: None)
    assert "unlabeled pool" in msg and shown and all(r["split"] == S.POOL_SPLIT for r in shown)


def test_rows_added_with_a_loss_leave_the_ensemble_stale_after_scoring(tmp_path, tiny_clip_spec):
    from diagnosis.run import load_ensemble

    df = make_images(tmp_path, n=40)
    df.iloc[:30].to_csv(tmp_path / "first.csv", index=False)
    df.iloc[30:].to_csv(tmp_path / "second.csv", index=False)
    index_dataset(tmp_path / "first.csv", tmp_path / "db", clip=tiny_clip_spec, progress=False, workers=0)
    diagnose(tmp_path / "db", members=2, folds=2, progress=False, fit_split="all")
    index_dataset(tmp_path / "second.csv", tmp_path / "db", progress=False, workers=0)
    assert score_new_rows(tmp_path / "db", progress=False) == 10
    assert "rows were added" in load_ensemble(tmp_path / "db", allow_stale=True).stale
