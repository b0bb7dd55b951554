"""The Ray engine against the single-machine path: same table, same rejects, same meta; a killed run
resumes without duplicates; distributed scoring equals ``score_new_rows``.

One local Ray with 2 CPUs serves the whole module (its start-up is the slow part); skipped when the
``ray`` extra is not installed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")

from indexer import ray_engine  # noqa: E402
from indexer import schema as S  # noqa: E402
from indexer.errors import UserError  # noqa: E402
from indexer.pipeline import index_dataset  # noqa: E402
from indexer.ray_engine import index_dataset_ray  # noqa: E402
from indexer.store import Database  # noqa: E402
from search_ui.cli import main  # noqa: E402
from tests.fakes import make_images  # noqa: E402

N = 24


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_spec):
    """A manifest with one missing and one corrupt image, and its single-machine database."""
    folder = tmp_path_factory.mktemp("rayworld")
    df = make_images(folder, N)
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    extra = pd.DataFrame([
        {"id": "missing", "image": "images/nope.png", "label": "circle", "color": "red", "split": "train", "loss": 1.0},
        {"id": "broken", "image": "images/broken.png", "label": "circle", "color": "red", "split": "train", "loss": 1.0},
    ])
    pd.concat([df, extra]).to_csv(folder / "manifest.csv", index=False)
    ref = folder / "db_single"
    index_dataset(folder / "manifest.csv", ref, clip=tiny_clip_spec, batch_size=8, workers=0, progress=False)
    return folder, ref


def _rows(db) -> pd.DataFrame:
    return Database(db).read().to_pandas().set_index(S.ID).sort_index()


def _assert_same_table(got, want):
    a, b = _rows(got), _rows(want)
    assert list(a.index) == list(b.index)  # same ids, none twice
    np.testing.assert_allclose(np.stack(a[S.EMBEDDING]), np.stack(b[S.EMBEDDING]), atol=1e-5)
    np.testing.assert_array_equal(a[S.LOSS].to_numpy(), b[S.LOSS].to_numpy())
    cols = [S.IMAGE, S.LABEL, S.SPLIT, "color"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert Database(got).table.schema == Database(want).table.schema


def test_same_table_rejects_and_meta_as_single_machine(local_ray, world, tmp_path, tiny_clip_spec):
    folder, ref = world
    report = index_dataset_ray(folder / "manifest.csv", tmp_path / "db", clip=tiny_clip_spec, batch_size=4,
                               actors=2, commit_rows=8, fragment_rows=4, progress=False)
    assert (report.rows_written, report.rows_already_stored) == (N, 0)
    assert report.rejected == {"image not found": 1, "unreadable image": 1}
    _assert_same_table(tmp_path / "db", ref)

    meta, ref_meta = Database(tmp_path / "db").read_meta(), Database(ref).read_meta()
    assert {k: v for k, v in meta.items() if k != "data_version"} == \
        {k: v for k, v in ref_meta.items() if k != "data_version"}
    # several commits of ~8 rows: data_version is the version of the last one, holding every row
    lance_ds = Database(tmp_path / "db").table.to_lance()
    assert lance_ds.checkout_version(meta["data_version"]).count_rows() == N
    assert lance_ds.checkout_version(meta["data_version"] - 1).count_rows() < N
    assert (tmp_path / "db" / "rejects.csv").read_text() == (ref / "rejects.csv").read_text()
    info = json.loads((tmp_path / "db" / "faiss" / "info.json").read_text())
    assert (info["num_rows"], info["data_version"]) == (N, meta["data_version"])


def test_killed_run_resumes_without_duplicates(local_ray, world, tmp_path, tiny_clip_spec, monkeypatch, capsys):
    folder, ref = world
    real_commit = ray_engine._commit
    calls = []

    def commit_then_die(uri, frags):
        calls.append(len(frags))
        if len(calls) > 1:  # the second commit never happens: as if the driver were killed here
            raise KeyboardInterrupt
        return real_commit(uri, frags)

    monkeypatch.setattr(ray_engine, "_commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        index_dataset_ray(folder / "manifest.csv", tmp_path / "db", clip=tiny_clip_spec, batch_size=4, actors=1,
                          commit_rows=8, fragment_rows=8, progress=False)
    db = Database(tmp_path / "db")
    first = db.count_rows()
    assert 8 <= first < N
    assert db.read_meta()["data_version"] == db.version
    assert len(set(db.ids().tolist())) == first

    monkeypatch.setattr(ray_engine, "_commit", real_commit)
    code = main(["index", str(folder / "manifest.csv"), "--db", str(tmp_path / "db"), "--engine", "ray",
                 "--batch-size", "4"])
    assert code == 0
    assert f"already stored: {first}" in capsys.readouterr().out
    _assert_same_table(tmp_path / "db", ref)
    # and a finished rerun is a no-op
    again = index_dataset_ray(folder / "manifest.csv", tmp_path / "db", progress=False)
    assert (again.rows_written, again.rows_already_stored) == (0, N)


def test_strict_refusal_leaves_nothing(local_ray, world, tmp_path, tiny_clip_spec):
    folder, _ = world
    (folder / "ok.csv").write_text("id,image,loss\na,images/00000_red_circle.png,0.5\nb,images/broken.png,0.1\n")
    with pytest.raises(UserError, match=r"id 'b'.*unreadable image"):
        index_dataset_ray(folder / "ok.csv", tmp_path / "db", clip=tiny_clip_spec, strict=True, actors=1,
                          progress=False)
    assert not (tmp_path / "db").exists()


def test_distributed_scoring_equals_score_new_rows(local_ray, tmp_path):
    from diagnosis.ensemble import DiagnosisEnsemble
    from diagnosis.ray_score import score_new_rows_ray
    from diagnosis.run import IMAGE_MEAN_FILE, score_new_rows
    from tests.fakes import make_db

    db = make_db(tmp_path / "a", n=60, predicted=False)
    ids, X = db.embeddings()
    loss = db.read([S.ID, S.LOSS]).to_pandas().set_index(S.ID).loc[ids, S.LOSS].to_numpy()
    ens = DiagnosisEnsemble(n_members=2, n_folds=2, kinds=("ridge",), random_state=0).fit(X, loss)
    _save_ensemble(db, ens, X, IMAGE_MEAN_FILE)
    # rows scored by an earlier diagnose keep their values; the 20 "new" rows are null
    old = ids[20:]
    db.update_columns(pa.table({S.ID: pa.array(old.tolist()), S.PREDICTED_LOSS: pa.array(np.full(40, 7.0, np.float32)),
                                S.PREDICTED_LOSS_STD: pa.array(np.full(40, 0.5, np.float32))}))
    shutil.copytree(tmp_path / "a" / "db", tmp_path / "b")

    assert score_new_rows(db, progress=False) == 20
    assert score_new_rows_ray(tmp_path / "b", actors=2, batch_rows=7, progress=False) == 20
    a, b = _rows(db.path), _rows(tmp_path / "b")
    np.testing.assert_allclose(b[S.PREDICTED_LOSS], a[S.PREDICTED_LOSS], rtol=1e-5, atol=1e-5)  # float32 BLAS sums differ by batch (~1e-6 absolute)
    np.testing.assert_allclose(b[S.PREDICTED_LOSS_STD], a[S.PREDICTED_LOSS_STD], rtol=1e-4, atol=1e-5)  # a spread: cancellation
    assert (b.loc[old, S.PREDICTED_LOSS] == 7.0).all()
    pred, _ = ens.predict(X[:20], return_std=True)
    np.testing.assert_allclose(b.loc[ids[:20], S.PREDICTED_LOSS], pred.astype(np.float32), rtol=1e-5, atol=1e-5)
    assert not list((tmp_path / "b").glob(".scores-*"))  # the staging folder is gone
    assert score_new_rows_ray(tmp_path / "b", progress=False) == 0


def _save_ensemble(db, ens, X, image_mean_file):
    """The files ``diagnose`` writes, for a hand-fitted ensemble (stamped with the table's version)."""
    from diagnosis.ensemble import save_ensemble
    from diagnosis.run import ENSEMBLE_FILE, INFO_FILE
    from indexer.store import write_json_atomic

    db.diagnosis_dir.mkdir(parents=True, exist_ok=True)
    save_ensemble(ens, db.diagnosis_dir / ENSEMBLE_FILE)
    np.save(db.diagnosis_dir / image_mean_file, X.mean(0).astype(np.float32))
    write_json_atomic(db.diagnosis_dir / INFO_FILE, {"data_version": db.data_version, "num_rows": db.count_rows(),
                                                     "clip": db.clip_identity})


def test_missing_cluster_address_is_one_sentence(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def refuse(*a, **k):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(UserError, match=r"--address 10\.0\.0\.1:6379: could not join a Ray cluster"):
        ray_engine.connect("10.0.0.1:6379")


def test_model_losses_equal_single_machine(local_ray, tmp_path, tiny_clip_spec):
    """``--model``: each actor runs the user's model over its images; losses as on one machine."""
    from tests.test_index import MODEL_SRC

    df = make_images(tmp_path, 12)
    df.drop(columns=["loss"]).to_csv(tmp_path / "noloss.csv", index=False)
    (tmp_path / "mymodel.py").write_text(MODEL_SRC)
    entry = f"{tmp_path / 'mymodel.py'}:load"
    index_dataset(tmp_path / "noloss.csv", tmp_path / "one", clip=tiny_clip_spec, model=entry, batch_size=4,
                  workers=0, progress=False)
    r = index_dataset_ray(tmp_path / "noloss.csv", tmp_path / "ray", clip=tiny_clip_spec, model=entry, batch_size=4,
                          actors=2, progress=False)
    assert r.rows_written == 12
    a, b = _rows(tmp_path / "ray"), _rows(tmp_path / "one")
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a[S.LOSS], b[S.LOSS], rtol=1e-5)
    assert np.isfinite(a[S.LOSS]).all() and a[S.LOSS].std() > 0
