"""Safety of a database folder: what a corrupt or hostile folder can do (nothing), what `serve`
hands out (the indexed images only), and processes running at once (no row twice, no lost files)."""

from __future__ import annotations

import pytest

from indexer.errors import UserError
from search_ui.cli import main
from tests.fakes import make_db


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    return folder, make_db(folder, n=40)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b""])
def test_a_corrupt_meta_json_is_one_sentence_naming_the_file(tmp_path, small_db, capsys, content):
    import shutil

    shutil.copytree(small_db[1].path, tmp_path / "db")
    (tmp_path / "db" / "meta.json").write_bytes(content)
    from indexer.store import Database

    with pytest.raises(UserError, match=r"meta\.json is not a JSON object .*restore it"):
        Database(tmp_path / "db").read_meta()
    assert main(["search", "a circle", "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "meta.json" in err and "Traceback" not in err


# ---- serve hands out exactly the indexed images --------------------------------------------------
@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    """The app over a database whose images share their folder with things that must stay private."""
    import os

    from search_ui.app import build_app, launch_kwargs

    folder = tmp_path_factory.mktemp("served")
    db = make_db(folder, n=30)
    images = folder / "images"
    (images / "manifest.csv").write_text("id,image,loss\nsecret-row,a.png,0.1\n")
    (images / "secret.txt").write_text("not an image")
    (images / "private").mkdir()
    (images / "private" / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----")
    (images / "unindexed.png").write_bytes((images / "00000_red_circle.png").read_bytes())
    os.symlink("/etc/passwd", images / "passwd.png")
    os.symlink(db.path / "meta.json", images / "meta.png")
    os.symlink(images / "private", images / "sub")
    app = build_app(db)
    app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None))
    yield app, app.local_url.rstrip("/"), db, folder
    app.close()


def test_serve_hands_out_only_indexed_images_over_http(served_folder):
    import httpx

    app, url, db, folder = served_folder
    images = folder / "images"
    get = lambda p: httpx.get(f"{url}/gradio_api/file={p}", timeout=10)  # noqa: E731
    indexed = images / "00000_red_circle.png"
    ok = get(indexed)
    assert ok.status_code == 200 and ok.content == indexed.read_bytes()
    assert get(str(images / "private" / ".." / "00000_red_circle.png")).status_code == 200  # same file
    refused = [
        images / "manifest.csv", images / "secret.txt", images / "private" / "id_rsa",
        images / "sub" / "id_rsa",                       # through a symlinked folder
        images / "passwd.png", images / "meta.png",      # symlinks inside the images folder
        images / "unindexed.png",                        # an image, but not one the table indexes
        f"{db.path}/../manifest.csv", f"{db.path}/meta.json", f"{images}/../manifest.csv",
        folder / "manifest.csv", "/etc/passwd", f"{images}/%2e%2e/manifest.csv", "http://127.0.0.1:1/x.png",
    ]
    for p in refused:
        for method in (httpx.get, httpx.head):
            r = method(f"{url}/gradio_api/file={p}", timeout=10)
            assert r.status_code == 403, (p, method, r.status_code)
        assert httpx.get(f"{url}/gradio_api/file/{p}", timeout=10).status_code in (403, 404), p
    # the client removes the ../ itself, so this one reaches no route at all (404)
    assert get("../../../../etc/passwd").status_code in (403, 404)
    for p in refused:
        r = get(p)
        assert b"root:" not in r.content and b"PRIVATE" not in r.content and b"secret-row" not in r.content


def test_the_allow_list_is_a_plain_function_other_routes_can_call(served_folder):
    from search_ui.app import served_file

    app, _, db, folder = served_folder
    images = folder / "images"
    assert served_file(app, str(images / "00000_red_circle.png")) == str((images / "00000_red_circle.png").resolve())
    for p in ("manifest.csv", "passwd.png", "secret.txt", "unindexed.png"):
        assert served_file(app, str(images / p)) is None


# ---- a database folder never runs code ------------------------------------------------------------
class Payload:
    """What a hostile file would carry: building it (unpickling, or skops calling __setstate__)
    writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))

    def __setstate__(self, state):
        open(state["marker"], "w").close()


@pytest.mark.parametrize("rows", [600, 4400])  # 4,400 rows in 2 folds: the MLPs take the Adam path (2,000+)
def test_the_stored_ensemble_predicts_exactly_as_in_memory_for_every_member_kind(tmp_path, rows):
    import numpy as np

    from diagnosis.ensemble import ALL_KINDS, DiagnosisEnsemble, load_ensemble_file, save_ensemble

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = rng.gamma(1.0, 0.2, rows) + 2.0 * (X[:, 0] > 0.3)
    ens = DiagnosisEnsemble(n_members=6, n_folds=2, kinds=ALL_KINDS + ("knn",), n_rff=64, random_state=0).fit(X, y)
    ens.estimators_[0][5].set_params(exact_max_rows=100)  # one kNN member on the IVF path
    ens.estimators_[0][5].fit(X[:300], np.log1p(y[:300]))
    save_ensemble(ens, tmp_path / "e.skops")
    again = load_ensemble_file(tmp_path / "e.skops")
    Xt = rng.normal(size=(200, 16)).astype(np.float32)
    Xt /= np.linalg.norm(Xt, axis=1, keepdims=True)
    # the same arrays, the same sklearn/FAISS code and the same batch: normally equal to the last bit;
    # the tolerance is float32's (members compute in float32; a BLAS may pick another kernel for
    # differently aligned copies of the arrays), far below what a lost or altered member would move
    for a, b in zip(ens.predict(Xt, return_std=True), again.predict(Xt, return_std=True), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again.oof_prediction_, ens.oof_prediction_)
    import zipfile

    with zipfile.ZipFile(tmp_path / "e.skops") as z:  # arrays and JSON, no pickle inside
        assert all(n.endswith((".npy", ".json")) for n in z.namelist())
        assert not any(b"\x80\x04\x95" in z.read(n) or b"\x80\x05\x95" in z.read(n) for n in z.namelist())


def _diagnosed_copy(tmp_path, small_db):
    import shutil

    from diagnosis.run import diagnose

    src = small_db[1]
    if not (src.diagnosis_dir / "ensemble.skops").exists():
        diagnose(src, members=2, folds=2, progress=False, fit_split="all")
    shutil.copytree(src.path, tmp_path / "db")
    return tmp_path / "db"


@pytest.mark.parametrize("how", ["old joblib pickle", "skops with an untrusted type", "corrupt skops"])
def test_a_hostile_ensemble_file_runs_nothing_and_is_one_sentence(tmp_path, small_db, capsys, how):
    import pickle

    import skops.io as sio

    from diagnosis.run import load_ensemble

    db = _diagnosed_copy(tmp_path, small_db)
    marker = tmp_path / "pwned"
    ens = db / "diagnosis" / "ensemble.skops"
    if how == "old joblib pickle":
        ens.unlink()
        (db / "diagnosis" / "ensemble.joblib").write_bytes(pickle.dumps(Payload(marker)))
        match = "re-run `llm2loss diagnose"
    elif how == "skops with an untrusted type":
        sio.dump({"ensemble": Payload(marker)}, ens)
        match = "not trusted"
    else:
        ens.write_bytes(b"PK\x03\x04 not really a zip")
        match = "could not be read"
    if ens.exists():
        with pytest.raises(UserError, match="damaged"):  # its checksum is not the one stamped at fitting
            load_ensemble(db)
        _restamp(db)  # a crafted folder carries a matching stamp: the skops layer must hold on its own
    with pytest.raises(UserError, match=match):
        load_ensemble(db)
    for argv in (["explain", "--db", str(db)], ["diagnose", "--score-new", "--db", str(db)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.count("\n") == 0 and "re-run `llm2loss diagnose" in err, err
    assert not marker.exists()


def _restamp(db) -> None:
    import json

    from indexer.integrity import file_checksum

    info_path = db / "diagnosis" / "info.json"
    info = json.loads(info_path.read_text())
    info["checksums"]["ensemble.skops"] = file_checksum(db / "diagnosis" / "ensemble.skops")
    info_path.write_text(json.dumps(info))


# ---- one database, several processes -----------------------------------------------------------------
def _cli(*args, cwd=None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "-m", "search_ui.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_index_runs_at_once_store_every_sample_exactly_once(tmp_path):
    from indexer.configs import TINY_CLIP
    from indexer.store import Database
    from tests.fakes import make_images

    df = make_images(tmp_path, 1200)
    db = tmp_path / "db"
    args = ["index", tmp_path / "manifest.csv", "--db", db, "--clip", TINY_CLIP, "--pretrained", "none",
            "--workers", "0", "--device", "cpu"]
    procs = [_cli(*args), _cli(*args)]
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in outs)
    ids = Database(db).ids().tolist()
    assert len(ids) == len(set(ids)) == 1200 and set(ids) == set(df["id"])
    # either the second found the lock held and said so in one sentence, or the first had finished
    assert codes in ([0, 0], [0, 2]), outs
    for rc, _, err in outs:
        if rc == 2:
            last = err.strip().splitlines()[-1]
            assert "is writing to the database" in last and "Traceback" not in err, err


def test_a_second_writer_is_refused_in_one_sentence_while_the_first_holds_the_lock(small_db, tmp_path):
    import shutil

    from indexer.store import Database, writer_lock

    shutil.copytree(small_db[1].path, tmp_path / "db")
    db = tmp_path / "db"
    before = Database(db).version
    with writer_lock(db, "index"):  # this process is "the first writer"
        for args in (["diagnose", "--db", db, "--members", "1", "--folds", "2"], ["diagnose", "--score-new", "--db", db],
                     ["index", small_db[0] / "manifest.csv", "--db", db]):
            p = _cli(*args)
            rc, (_, err) = p.wait(timeout=300), p.communicate()
            assert rc == 2, err
            assert err.strip().count("\n") == 0 and "`llm2loss index` (pid" in err and "is writing to the database" in err, err
    assert Database(db).version == before  # nothing was written
    with writer_lock(db, "index"), writer_lock(db, "diagnose"):  # released: taken again, re-entrant
        pass


def test_a_reader_on_an_old_version_keeps_its_files_through_two_diagnose_runs(small_db, tmp_path):
    import shutil
    from datetime import timedelta

    from diagnosis.run import diagnose
    from indexer import schema as S
    from indexer.store import Database

    shutil.copytree(small_db[1].path, tmp_path / "db")
    db = Database(tmp_path / "db")
    pinned = db.snapshot()  # a long scan that began before the writes
    want = pinned.to_table(columns=[S.ID, S.PREDICTED_LOSS])
    for _ in range(2):
        diagnose(db, members=1, folds=2, progress=False, fit_split="all")
    got = pinned.to_table(columns=[S.ID, S.PREDICTED_LOSS])  # "Not found: ...lance" before the fix
    assert got.equals(want)
    assert len(db.table.list_versions()) > 2  # recent versions are kept ...
    db.cleanup(older_than=timedelta(0))
    assert len(db.table.list_versions()) <= 2  # ... until they are old enough


def test_the_writer_lock_leaves_no_folder_behind_a_failed_first_run_and_refuses_a_file(tmp_path):
    from indexer.store import writer_lock

    with pytest.raises(UserError, match="bad manifest"), writer_lock(tmp_path / "new" / "nested" / "db", "index") as existed:
        assert not existed and (tmp_path / "new" / "nested" / "db" / ".writer.lock").exists()
        raise UserError("bad manifest")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"), writer_lock(tmp_path / "file", "index"):
        pass
