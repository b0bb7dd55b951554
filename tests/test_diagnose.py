"""`llm2loss diagnose`: predictions written on every row, quality reported, the ensemble stamped."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from diagnosis.run import diagnose, load_ensemble, score_new_rows, stratified_subsample
from indexer import schema as S
from indexer.errors import UserError
from indexer.store import Database
from tests.fakes import make_db

FAST = {"members": 4, "folds": 3, "fit_split": "all"}


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """A 150-row database (blue circles planted to fail) after one diagnose run."""
    folder = tmp_path_factory.mktemp("diag")
    db = make_db(folder, n=150, predicted=False)
    report = diagnose(db, progress=False, **FAST)
    return folder, db, report


def _table(db):
    return db.read([S.ID, S.LOSS, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD, "color", S.LABEL]).to_pandas()


def test_every_row_gets_an_out_of_fold_prediction_that_finds_the_planted_failures(diagnosed):
    _, db, report = diagnosed
    df = _table(db)
    assert len(df) == report.rows == 150
    assert df[S.PREDICTED_LOSS].notna().all() and df[S.PREDICTED_LOSS_STD].notna().all()
    assert (df[S.PREDICTED_LOSS_STD] >= 0).all()
    bad = (df["color"] == "blue") & (df[S.LABEL] == "circle")
    # even with random-weight CLIP features the planted group stands out
    assert df.loc[bad, S.PREDICTED_LOSS].mean() > 2.5 * df.loc[~bad, S.PREDICTED_LOSS].mean()
    assert report.auroc_top10 > 0.85
    assert report.fitted_rows == 150 and report.folds == 3 and report.members == 4
    assert report.test is not None and report.test["n"] == 38  # make_db puts every 4th row in test


def test_the_report_matches_the_table(diagnosed):
    from diagnosis.metrics import quality

    _, db, report = diagnosed
    df = _table(db)
    q = quality(df[S.LOSS].to_numpy(), df[S.PREDICTED_LOSS].to_numpy())
    assert q["spearman"] == pytest.approx(report.spearman, abs=1e-3)
    assert q["auroc_top10"] == pytest.approx(report.auroc_top10, abs=1e-3)
    d = report.to_dict()
    assert {"rows", "fitted_rows", "spearman", "r2", "auroc_top10", "seconds"} <= set(d)
    assert "Spearman" in report.summary()


def test_ensemble_is_saved_stamped_and_old_versions_are_cleaned(diagnosed):
    _, db, report = diagnosed
    info = json.loads((db.diagnosis_dir / "info.json").read_text())
    assert info["data_version"] == db.data_version == report.data_version
    assert info["num_rows"] == 150 and info["clip"] == db.clip_identity
    loaded = load_ensemble(db)
    assert loaded.stale is None and loaded.image_mean.shape == (db.embed_dim,)
    # the saved ensemble reproduces what was written for rows it scores with the full ensemble
    ids, X = db.embeddings()
    pred = loaded.ensemble.predict(X[:5])
    assert pred.shape == (5,) and np.isfinite(pred).all()
    # diagnose compacted; it keeps the last hour's versions for readers still on them
    # (tests/test_safety.py), and drops older ones
    from datetime import timedelta

    db.cleanup(older_than=timedelta(0))
    assert len(db.table.list_versions()) <= 2


def test_added_rows_make_the_ensemble_stale_and_are_scored_by_the_full_ensemble(diagnosed, tmp_path):
    folder, db0, _ = diagnosed
    shutil.copytree(db0.path, tmp_path / "db")
    db = Database(tmp_path / "db")
    new = db.read().slice(0, 3).to_pandas()
    new[S.ID] = ["new0", "new1", "new2"]
    new[S.PREDICTED_LOSS] = None
    new[S.PREDICTED_LOSS_STD] = None
    db.table.add(pa.Table.from_pandas(new, schema=db.table.schema, preserve_index=False))
    db.update_meta(data_version=db.version)
    with pytest.raises(UserError, match="stale"):
        load_ensemble(db)
    assert "added or removed" in load_ensemble(db, allow_stale=True).stale
    assert score_new_rows(db, progress=False) == 3
    df = _table(db).set_index(S.ID)
    assert df[S.PREDICTED_LOSS].notna().all()
    # copies of the first rows, scored by all members, agree with those rows' out-of-fold scores
    # only roughly (different members) but exactly with the full ensemble's prediction
    _, X = db.embeddings()
    full = load_ensemble(db, allow_stale=True).ensemble.predict(X)
    ids = db.ids()
    row = {k: i for i, k in enumerate(ids)}
    # float32 members on a batch of 3 there, of every row here: see test_subsampled_fit_... for 1e-5
    assert df.loc["new0", S.PREDICTED_LOSS] == pytest.approx(full[row["new0"]], rel=1e-5, abs=1e-5)


def test_subsampled_fit_still_scores_every_row(tmp_path, monkeypatch):
    """diagnose streams the table in batches (here of 16 rows): the fitted rows carry their
    out-of-fold predictions, every other row the full ensemble's, and the image mean is over all."""
    from diagnosis import run

    monkeypatch.setattr(run, "SCORE_BATCH", 16)
    db = make_db(tmp_path, n=90, predicted=False)
    report = diagnose(db, max_rows=45, progress=False, members=2, folds=2, fit_split="all")
    assert report.fitted_rows == 45
    assert report.rows == 90
    assert db.count_rows(f"{S.PREDICTED_LOSS} IS NULL") == 0

    ids, X, loss, _ = run.read_training_data(db, progress=False)
    fitted = np.zeros(len(ids), dtype=bool)
    fitted[stratified_subsample(loss, 45)] = True
    t = db.read([S.ID, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD]).to_pandas().set_index(S.ID).loc[ids]
    loaded = load_ensemble(db)
    ens = loaded.ensemble
    # Tolerances from the precision of the work: the members compute in float32 (PCA and the MLP keep
    # float32 embeddings float32), on batches of 16 rows there and all rows at once here, so BLAS sums
    # round differently: ~1e-6 absolute in log1p space after 64-128-term sums, which expm1 carries to
    # loss units as ~1e-6 absolute (9.4e-7 seen: 1.0e-5 relative on a loss of 0.09). Hence 1e-5
    # relative and 1e-5 absolute; stored float32 adds only 6e-8 relative. The spread is a difference
    # of such predictions (cancellation), so it gets 1e-4 relative.
    np.testing.assert_allclose(t[S.PREDICTED_LOSS].to_numpy()[fitted], ens.oof_prediction_, rtol=1e-5, atol=1e-5)
    pred, std = ens.predict(X[~fitted], return_std=True)
    np.testing.assert_allclose(t[S.PREDICTED_LOSS].to_numpy()[~fitted], pred, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t[S.PREDICTED_LOSS_STD].to_numpy()[~fitted], std, rtol=1e-4, atol=1e-5)
    # a mean of 90 unit vectors' components (|x| < 1), summed in float64 there and in float32
    # (pairwise) here: both within ~1e-7 of the true mean
    np.testing.assert_allclose(loaded.image_mean, X.mean(axis=0), atol=1e-6)


def test_stratified_subsample_keeps_the_tail():
    loss = np.random.default_rng(0).gamma(0.5, 1.0, 100_000)
    idx = stratified_subsample(loss, 1000)
    assert len(idx) == 1000 and len(np.unique(idx)) == len(idx)
    tail = loss >= np.quantile(loss, 0.95)
    assert tail[idx].mean() == pytest.approx(0.05, abs=0.006)


def test_bad_requests_are_refused_with_one_sentence(tmp_path):
    db = make_db(tmp_path, n=30, predicted=False)
    with pytest.raises(UserError, match="--folds"):
        diagnose(db, folds=1)
    db.update_columns(pa.table({S.ID: db.ids(), S.LOSS: pa.nulls(30, pa.float32())}))
    with pytest.raises(UserError, match="rows with a loss"):
        diagnose(db, progress=False)
    assert not (db.diagnosis_dir / "ensemble.skops").exists()  # nothing half-written
    with pytest.raises(UserError, match="no diagnosis ensemble"):
        load_ensemble(db)


def test_cli_prints_json_quality(diagnosed, tmp_path, capsys):
    from search_ui.cli import main

    shutil.copytree(diagnosed[1].path, tmp_path / "db")
    rc = main(["diagnose", "--db", str(tmp_path / "db"), "--members", "2", "--folds", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    # the table has train and test rows: by default only the held-out (test) ones are fitted
    assert rc == 0 and out["rows"] == 150 and out["fit_split"] == "held-out" and out["fitted_rows"] == 38
    assert main(["diagnose", "--db", str(tmp_path / "nope")]) == 2


def test_training_losses_are_not_fitted_when_held_out_rows_exist(tmp_path):
    """A model's losses on its own training rows reflect memorisation; with a held-out split present,
    the ensemble learns from held-out rows and scores the training rows with the full ensemble."""
    db = make_db(tmp_path, n=120, predicted=False)
    report = diagnose(db, members=2, folds=2, progress=False)
    assert report.fit_split == "held-out" and report.fitted_rows == 30 and report.rows == 120
    assert db.count_rows(f"{S.PREDICTED_LOSS} IS NULL") == 0
    assert json.loads((db.diagnosis_dir / "info.json").read_text())["fit_split"] == "held-out"
    with pytest.raises(UserError, match="fit split"):
        diagnose(db, fit_split="train", progress=False)


def test_cli_score_new_scores_only_the_added_rows(diagnosed, tmp_path, capsys):
    from search_ui.cli import main

    _, db0, _ = diagnosed
    shutil.copytree(db0.path, tmp_path / "db")
    db = Database(tmp_path / "db")
    before = _table(db).set_index(S.ID)[S.PREDICTED_LOSS]
    new = db.read().slice(0, 2).to_pandas()
    new[S.ID] = ["late0", "late1"]
    new[S.PREDICTED_LOSS] = None
    new[S.PREDICTED_LOSS_STD] = None
    db.table.add(pa.Table.from_pandas(new, schema=db.table.schema, preserve_index=False))
    db.update_meta(data_version=db.version)
    assert main(["diagnose", "--db", str(db.path), "--score-new", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"scored_rows": 2}
    after = _table(db).set_index(S.ID)[S.PREDICTED_LOSS]
    assert after[["late0", "late1"]].notna().all()
    assert after[before.index].equals(before)  # the fitted rows keep their out-of-fold scores
    # --engine ray means scoring on Ray, never a distributed refit
    assert main(["diagnose", "--db", str(db.path), "--engine", "ray"]) == 2
    assert "--score-new" in capsys.readouterr().err


def test_embedding_batches_gather_small_fragments_in_table_order(tmp_path):
    """A freshly indexed table is many small fragments; the scoring stream still comes in full
    batches, every row once, in the table's order, with its own embedding."""
    from diagnosis.run import embedding_batches
    from tests.test_ann import synthetic_db

    db, x, _ = synthetic_db(tmp_path / "db", n=1000, d=8)
    rows = db.read()
    db.table.delete("true")
    for s in range(0, 1000, 100):
        db.append(rows.slice(s, 100))
    assert len(db.snapshot().get_fragments()) == 10
    out = list(embedding_batches(db, db.snapshot(), 256))
    assert [len(r) for r, _ in out] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([r for r, _ in out]), np.arange(1000))
    np.testing.assert_array_equal(np.concatenate([e for _, e in out]), x)
