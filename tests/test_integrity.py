"""Issue 25, integrity: derived files are stamped and verified on load (a mismatch is rebuilt or
refused, never used), `llm2loss check [--repair]`, and a damaged table met by any command is one
sentence pointing at `check`."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from indexer import ann
from indexer import schema as S
from indexer.errors import Unavailable, UserError
from indexer.store import Database
from search_ui.cli import main


@pytest.fixture(scope="module")
def base_db(tmp_path_factory) -> Path:
    """40 rows + a later append of 5 (a second fragment), an index, a fitted ensemble, a cached
    text mean: every kind of derived file."""
    from diagnosis.run import diagnose
    from diagnosis.text import Scorer
    from tests.fakes import make_db

    folder = tmp_path_factory.mktemp("integrity")
    db = make_db(folder, n=40, predicted=False)
    ann.build_index(db)
    extra = db.read().slice(0, 5)
    extra = extra.set_column(0, S.ID, pa.array([f"extra{i}" for i in range(5)]))
    db.update_meta(data_version=db.append(extra))
    diagnose(db, members=2, folds=2, progress=False)
    ann.build_index(db)
    _ = Scorer(db).default_text_mean
    return db.path


@pytest.fixture
def db_copy(base_db, tmp_path) -> Path:
    out = tmp_path / "db"
    shutil.copytree(base_db, out)
    return out


def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING", "DEBUG"))]


def _neighbours(db, sid="s00004", k=8) -> list[str]:
    from search_ui.engine import QueryEngine

    return [r.id for r in QueryEngine(db, device="cpu").similar(sid, k=k, weight=0.0)]


def _data_files(db: Path) -> list[str]:
    return sorted(glob.glob(str(db / "samples.lance" / "data" / "*.lance")), key=os.path.getmtime)


# ---- item 4: stamps, verified on load --------------------------------------------------------------
def test_faiss_ids_in_another_order_are_never_served(db_copy):
    before = _neighbours(db_copy)
    ids_path = db_copy / "faiss" / ann.IDS_FILE
    ids = np.load(ids_path)
    np.save(ids_path, np.roll(ids, 7))  # the same ids, another order: same size, other positions
    with pytest.raises(Unavailable, match="llm2loss check"):
        ann.load_index(db_copy, rebuild_if_stale=False)
    assert _neighbours(db_copy) == before  # rebuilt, not served
    assert np.array_equal(np.load(ids_path), ids) and ann.index_status(db_copy)["fresh"]


def test_truncated_faiss_index_reads_as_damaged_and_is_rebuilt(db_copy):
    path = db_copy / "faiss" / ann.INDEX_FILE
    os.truncate(path, path.stat().st_size // 2)
    status = ann.index_status(db_copy)
    assert not status["fresh"] and "damaged" in status["reason"] and "index.faiss" in status["reason"]
    index = ann.load_index(db_copy)
    assert index.ntotal == 45 and ann.index_status(db_copy)["fresh"]


def test_index_stamp_holds_checksums_and_the_id_order(db_copy):
    from indexer.integrity import file_checksum, ids_digest

    info = ann.index_status(db_copy)
    for name in (ann.INDEX_FILE, ann.IDS_FILE):
        assert info["files"][name] == file_checksum(db_copy / "faiss" / name)
    ids = np.load(db_copy / "faiss" / ann.IDS_FILE)
    assert info["ids_sha256"] == ids_digest(ids) != ids_digest(ids[::-1])


def test_damaged_ensemble_file_is_refused_with_one_sentence(db_copy):
    from diagnosis.run import IMAGE_MEAN_FILE, load_ensemble

    load_ensemble(db_copy)
    path = db_copy / "diagnosis" / IMAGE_MEAN_FILE
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the mean vector: still a valid .npy, silently wrong before
    path.write_bytes(bytes(raw))
    with pytest.raises(Unavailable, match=r"damaged \(image_mean.npy differs.*llm2loss check"):
        load_ensemble(db_copy)


def test_damaged_text_mean_cache_is_recomputed(db_copy):
    from diagnosis.text import Scorer

    (cache,) = (db_copy / "diagnosis").glob("text_mean_*.npy")
    want = np.load(cache)
    os.truncate(cache, cache.stat().st_size - 4)  # np.load raised ValueError before
    got = Scorer(db_copy).default_text_mean
    assert np.allclose(got, want, atol=1e-6)  # float32 text encoder, same inputs: last-bit differences only
    assert np.array_equal(np.load(cache), got)  # written again, stamped


# ---- item 5: llm2loss check ------------------------------------------------------------------------
def test_check_passes_a_sound_database(db_copy, capsys):
    rc, out, err = _run(capsys, "check", "--db", str(db_copy))
    assert rc == 0 and err == [], (out, err)
    for part in ("table", "faiss", "ensemble", "caches", "id index"):
        assert any(line.split()[:2] == ["OK", part.split()[0]] for line in out.splitlines()), (part, out)
    assert out.strip().endswith("all is well")


@pytest.mark.parametrize("damage", ["ids_order", "faiss_truncated", "cache"])
def test_check_finds_damaged_derived_files_and_repair_mends_them(db_copy, capsys, damage):
    if damage == "ids_order":
        ids = np.load(db_copy / "faiss" / ann.IDS_FILE)
        np.save(db_copy / "faiss" / ann.IDS_FILE, ids[::-1])
    elif damage == "faiss_truncated":
        os.truncate(db_copy / "faiss" / ann.INDEX_FILE, 100)
    else:
        (cache,) = (db_copy / "diagnosis").glob("text_mean_*.npy")
        cache.write_bytes(b"\0" * cache.stat().st_size)
    (db_copy / "faiss" / "tmpab12.faiss.tmp").write_bytes(b"left by a killed build")
    rc, out, _ = _run(capsys, "check", "--db", str(db_copy))
    assert rc == 1 and "DAMAGED  temp files" in out and "--repair" in out
    assert f"DAMAGED  {'caches' if damage == 'cache' else 'faiss'}" in out, out
    rc, out, _ = _run(capsys, "check", "--db", str(db_copy), "--repair")
    assert rc == 0 and "after the repair:" in out and out.strip().endswith("all is well"), out
    assert not list((db_copy / "faiss").glob("*.tmp"))
    rc, out, _ = _run(capsys, "check", "--db", str(db_copy))
    assert rc == 0 and "DAMAGED" not in out


def test_check_repair_goes_back_to_the_newest_intact_version_and_says_what_is_lost(db_copy, capsys):
    from diagnosis.run import load_ensemble

    appended = next(f for f in _data_files(db_copy) if Database(db_copy).table.to_lance().get_fragments()[1]
                    .data_files()[0].path.split("/")[-1] in f)
    os.truncate(appended, os.path.getsize(appended) // 2)  # the fragment of the 5 appended rows
    rc, _out, err = _run(capsys, "search", "a blue circle", "--db", str(db_copy))
    assert rc == 2 and len(err) == 1 and f"llm2loss check --db {db_copy}" in err[0], err
    rc, out, _ = _run(capsys, "check", "--db", str(db_copy))
    assert rc == 1 and "DAMAGED  table" in out and "5 rows (45 -> 40)" in out, out
    rc, out, _ = _run(capsys, "check", "--db", str(db_copy), "--repair")
    assert rc == 0 and "lost: " in out and "5 rows (45 -> 40)" in out, out
    db = Database(db_copy)
    assert db.count_rows() == 40 and not any(i.startswith("extra") for i in db.ids().tolist())
    assert ann.index_status(db)["fresh"] and ann.load_index(db, rebuild_if_stale=False).ntotal == 40
    with pytest.raises(UserError, match="stale"):  # fitted on 45 rows: never used on 40
        load_ensemble(db)
    rc, out, err = _run(capsys, "search", "a blue circle", "--db", str(db_copy), "-k", "3")
    assert rc == 0 and len(out.splitlines()) == 3, (out, err)


def test_check_repair_sets_a_truncated_latest_manifest_aside(db_copy, capsys):
    from indexer.check import manifest_versions

    uri = db_copy / "samples.lance"
    (latest, manifest), *_ = manifest_versions(uri)
    os.truncate(manifest, manifest.stat().st_size // 2)
    rc, _out, err = _run(capsys, "similar", "s00001", "--db", str(db_copy))
    assert rc == 2 and len(err) == 1 and "llm2loss check" in err[0], err
    rc, out, _ = _run(capsys, "check", "--db", str(db_copy), "--repair")
    assert rc == 0 and f"version {latest} and what it changed" in out, out
    assert [p.name for p in db_copy.glob("damaged-*/_versions/*")] == [manifest.name]
    db = Database(db_copy)
    assert db.count_rows() == 45 and ann.index_status(db)["fresh"]
    rc, out, _ = _run(capsys, "similar", "s00001", "--db", str(db_copy), "-k", "3")
    assert rc == 0 and len(out.splitlines()) == 3


@pytest.mark.parametrize("damage", ["truncated", "deleted", "zero-filled"])
def test_a_damaged_data_file_is_one_sentence_for_every_command(db_copy, capsys, damage):
    first = _data_files(db_copy)[0]  # the 40 first rows: shared by every version that holds rows
    if damage == "truncated":
        os.truncate(first, os.path.getsize(first) // 3)
    elif damage == "deleted":
        os.unlink(first)
    else:
        Path(first).write_bytes(b"\0" * os.path.getsize(first))
    d = str(db_copy)
    for argv in (["search", "a blue circle", "--db", d], ["similar", "s00001", "--db", d],
                 ["explain", "--db", d], ["export", "--db", d, "--query", "a circle", "--out", str(db_copy.parent / "x.csv")],
                 ["diagnose", "--db", d, "--members", "1", "--folds", "2"]):
        rc, _out, err = _run(capsys, *argv)
        assert rc == 2 and len(err) == 1 and f"run `llm2loss check --db {d}`" in err[0], (argv, err)
    rc, out, _ = _run(capsys, "check", "--db", d)
    assert rc == 1 and "no earlier version holding rows is intact" in out and "backup" in out, out


def test_the_api_answers_a_damaged_table_and_ensemble_with_503_sentences(db_copy):
    from fastapi.testclient import TestClient

    from search_ui.api import build_api
    from search_ui.ui.context import AppContext

    ens = db_copy / "diagnosis" / "ensemble.skops"
    os.truncate(ens, ens.stat().st_size - 1)
    client = TestClient(build_api(AppContext(db_copy)), raise_server_exceptions=False)
    health = client.get("/api/v1/health").json()
    assert not health["ensemble"]["fresh"] and "ensemble.skops" in health["ensemble"]["reason"], health
    r = client.get("/api/v1/explain", params={"top": 2})
    assert r.status_code == 503 and "llm2loss check" in r.json()["error"], r.text
    Path(_data_files(db_copy)[0]).write_bytes(b"\0" * 4096)
    r = client.post("/api/v1/search", json={"text": "a blue circle", "k": 3})
    assert r.status_code == 503 and "run `llm2loss check" in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]
