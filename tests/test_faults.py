"""Faults and load, quick versions: kills mid-index, searches during writes, repeated diagnose.

The long versions are scripts: ``scripts/kill_resume.py`` (10 kills) and ``scripts/stress_search.py``
(8 threads x 200 searches); these tests run the same functions with less.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from indexer.store import Database

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def one_torch_thread():
    """Searcher threads each run the text encoder; on 2 shared cores one intra-op thread is faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def test_index_killed_at_random_points_and_resumed_stores_every_row_once(tmp_path):
    from tests.fakes import make_images

    kr = _script("kill_resume")
    make_images(tmp_path, 48, seed=3)
    summary = kr.kill_and_resume(tmp_path / "manifest.csv", tmp_path / "db", kills=3, seed=1)
    # every kill landed mid-run, after at least one commit and before the end
    assert len(summary["kills"]) + summary["finished_early"] == 3
    assert len(summary["kills"]) >= 2, summary
    stored = [k["rows_stored"] for k in summary["kills"]]
    assert all(0 < s <= 48 for s in stored) and stored == sorted(stored), summary
    written, already = map(int, summary["final_run"])
    assert written + already == 48 and already >= stored[-1]
    check = kr.check_table(tmp_path / "manifest.csv", tmp_path / "db")  # asserts each id exactly once
    assert check == {**check, "rows": 48, "unique": 48, "faiss_fresh": True}


def test_searches_during_diagnose_see_one_table_version_each(tmp_path, one_torch_thread):
    stress = _script("stress_search")
    db = stress.diagnose_setup(tmp_path, 150)
    r = stress.search_while_writing(db, stress.diagnose_writes(db, 2), threads=4, searches=15)
    assert r["errors"] == 0, r["error_examples"]
    assert r["inconsistent"] == 0 and r["short_answers"] == 0, r
    assert r["searches"] >= 4 * 15 and r["states"] == 3
    # the check has teeth only if answers came from more than one version: before and after a write
    assert len(r["answers_per_state"]) >= 2, r


def test_searches_during_a_reindex_never_fail_nor_mix_rows(tmp_path, one_torch_thread):
    stress = _script("stress_search")
    db, reindex = stress.reindex_setup(tmp_path, 120)
    assert Database(db).count_rows() == 80
    r = stress.search_while_writing(db, [reindex], threads=4, searches=15)
    assert r["errors"] == 0, r["error_examples"]
    assert r["inconsistent"] == 0 and r["short_answers"] == 0, r
    assert Database(db).count_rows() == 120


def test_consistency_check_catches_an_answer_mixing_two_versions():
    stress = _script("stress_search")
    states = [{"a": (1.0, 0.5), "b": (2.0, 0.7)}, {"a": (1.0, 0.6), "b": (2.0, 0.8)}]
    assert stress._consistent({"a": (1.0, 0.5), "b": (2.0, 0.7)}, states) == 0
    assert stress._consistent({"a": (1.0, 0.6)}, states) == 1
    assert stress._consistent({"a": (1.0, 0.5), "b": (2.0, 0.8)}, states) is None
    assert stress._consistent({"c": (0.0, 0.0)}, states) is None


def test_repeated_diagnose_does_not_grow_the_database_folder(tmp_path, monkeypatch):
    from datetime import timedelta

    from diagnosis.run import diagnose
    from indexer import ann, store
    from tests.fakes import make_db

    # versions younger than KEEP_VERSIONS_FOR (an hour) stay for live readers (tests/test_safety.py);
    # here every version is "old", as it is an hour after each run
    monkeypatch.setattr(store, "KEEP_VERSIONS_FOR", timedelta(0))
    db = make_db(tmp_path, 120)
    ann.build_index(db)
    sizes, versions = [], []
    for seed in range(6):
        diagnose(db.path, members=1, folds=2, random_state=seed, progress=False)
        sizes.append(folder_bytes(db.path))
        versions.append(len(Database(db.path).table.list_versions()))
    # old versions are dropped each run: after the first runs the folder stays within a small margin
    assert max(sizes[2:]) <= 1.25 * sizes[1], sizes
    assert max(versions) <= 3, versions
    assert ann.index_status(db.path)["fresh"]  # predicted_loss writes do not make the index stale
