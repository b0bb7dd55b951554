"""Issue 25, one sentence never a traceback: a full disk (a small tmpfs) during `index`, at the FAISS
write and at the ensemble write; a read-only database for `select add` and the API's selection
routes; a binary ids file. Nothing half-written is left behind, and a rerun with space completes.

The disk-full and read-only cases mount a tmpfs (root or CAP_SYS_ADMIN); where mounting is not
permitted they skip, saying so."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from indexer import ann
from indexer.configs import TINY_CLIP
from indexer.store import Database
from search_ui.cli import main


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the block (skips the test where mounting fails)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full case ({r.stderr.strip() or r.returncode}); "
                    "it needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up, then give ``leave`` bytes back; returns the filler."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _run(capsys, *argv) -> tuple[int, list[str]]:
    rc = main([str(a) for a in argv])
    _out, err = capsys.readouterr()
    return rc, [line for line in err.splitlines()
                if line.strip() and not line.startswith(("INFO", "WARNING", "DEBUG")) and "%|" not in line]


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


INDEX_ARGS = ["--clip", str(TINY_CLIP), "--pretrained", "none", "--workers", "0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from tests.fakes import make_images

    folder = tmp_path_factory.mktemp("faults")
    make_images(folder, 40)
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def fitted_db(tmp_path_factory) -> Path:
    from diagnosis.run import diagnose
    from tests.fakes import make_db

    db = make_db(tmp_path_factory.mktemp("fitted"), n=40, predicted=False)
    diagnose(db, members=2, folds=2, progress=False)
    ann.build_index(db)
    return db.path


def test_index_into_a_new_database_on_a_full_disk_leaves_nothing_and_reruns(images, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "48k") as disk:  # the first commit of rows does not fit
        rc, err = _run(capsys, "index", images, "--db", disk / "db", *INDEX_ARGS)
        assert rc == 2 and len(err) == 1 and "no space is left" in err[0] and "half-written" in err[0], err
        assert list(disk.iterdir()) == []  # no 0-row database left behind
        remount(disk, "size=8m")
        rc, err = _run(capsys, "index", images, "--db", disk / "db", *INDEX_ARGS)
        assert rc == 0, err
        db = Database(disk / "db")
        assert db.count_rows() == 40 and ann.index_status(db)["fresh"]


def test_index_failing_at_the_faiss_write_leaves_no_temporary_file(images, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        assert _run(capsys, "index", images, "--db", disk / "db", *INDEX_ARGS)[0] == 0
        (disk / "db" / "faiss" / ann.INFO_FILE).unlink()  # the index must be built again
        filler = fill(disk)
        rc, err = _run(capsys, "index", images, "--db", disk / "db", *INDEX_ARGS)
        assert rc == 2 and len(err) == 1 and "FAISS index" in err[0] and "no space" in err[0], err
        assert _tmp_files(disk / "db") == []
        assert not ann.index_status(disk / "db")["fresh"]  # never taken for a sound index
        filler.unlink()
        rc, err = _run(capsys, "index", images, "--db", disk / "db", *INDEX_ARGS)
        assert rc == 0, err
        assert ann.index_status(disk / "db")["fresh"] and Database(disk / "db").count_rows() == 40


def test_diagnose_failing_at_the_ensemble_write_keeps_the_table_and_the_old_ensemble(fitted_db, tmp_path, capsys):
    from diagnosis.run import load_ensemble

    with tmpfs(tmp_path / "disk", "16m") as disk:
        shutil.copytree(fitted_db, disk / "db")
        db = Database(disk / "db")
        version, before = db.version, load_ensemble(db).info["checksums"]
        filler = fill(disk, leave=256 * 1024)  # room for the lock, not for the ~1 MB ensemble
        rc, err = _run(capsys, "diagnose", "--db", disk / "db", "--members", "2", "--folds", "2")
        assert rc == 2 and len(err) == 1 and "no space" in err[0] and "diagnose" in err[0], err
        assert _tmp_files(disk / "db") == []
        assert Database(disk / "db").version == version  # the table was not touched
        assert load_ensemble(disk / "db").info["checksums"] == before  # the old one, verified, still there
        filler.unlink()
        rc, err = _run(capsys, "diagnose", "--db", disk / "db", "--members", "2", "--folds", "2")
        assert rc == 0, err
        assert load_ensemble(disk / "db").info["checksums"] != before


def test_read_only_database_select_add_is_one_sentence_and_search_still_works(fitted_db, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("s00001\ns00002\n")
    with tmpfs(tmp_path / "disk", "16m") as disk:
        shutil.copytree(fitted_db, disk / "db")
        remount(disk, "ro")
        rc, err = _run(capsys, "select", "--db", disk / "db", "add", "hard", "--ids", ids)
        assert rc == 2 and len(err) == 1 and "read-only" in err[0] and "selections" in err[0], err
        rc, err = _run(capsys, "search", "a blue circle", "--db", disk / "db", "-k", "3")
        assert rc == 0, err


def test_read_only_database_api_selection_changes_answer_503_sentences(fitted_db, tmp_path):
    from fastapi.testclient import TestClient

    from search_ui.api import build_api
    from search_ui.selections import Selections
    from search_ui.ui.context import AppContext

    with tmpfs(tmp_path / "disk", "16m") as disk:
        shutil.copytree(fitted_db, disk / "db")
        Selections(disk / "db").add("kept", ["s00003"])
        remount(disk, "ro")
        client = TestClient(build_api(AppContext(disk / "db")))
        for method, url, body in (("POST", "/api/v1/selections/hard/add", {"ids": ["s00001"]}),
                                  ("DELETE", "/api/v1/selections/kept", None)):
            r = client.request(method, url, json=body)
            assert r.status_code == 503, (url, r.status_code, r.text)
            msg = r.json()["error"] if "error" in r.json() else r.json()["detail"]
            assert "read-only" in msg and "\n" not in msg, msg
        assert client.get("/api/v1/selections/kept").json()  # still there, readable


def test_select_add_with_a_binary_ids_file_is_one_sentence(fitted_db, tmp_path, capsys):
    binary = tmp_path / "ids.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    rc, err = _run(capsys, "select", "--db", fitted_db, "add", "hard", "--ids", binary)
    assert rc == 2 and len(err) == 1 and "not UTF-8 text" in err[0], err
