"""`llm2loss demo --no-serve` on a tiny world: every stage runs once, a second run reuses them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_ui.cli import main
from search_ui.demo import run_demo

TINY = {
    "seed": 5, "n_train": 300, "n_test": 120, "n_pool": 60, "image_size": 32, "task": "shape",
    "slices": [
        {"name": "blue circles", "kind": "correlation", "where": {"shape": "circle", "color": "blue"},
         "strength": 0.9},
        {"name": "small stars", "kind": "rare", "where": {"shape": "star", "size": "small"}, "rate": 0.02},
    ],
    "clip": {"steps": 3, "batch_size": 32, "n_images": 64},
    "blackbox": {"epochs": 1, "batch_size": 64},
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, run_demo(spec=TINY, serve=False, cache_dir=cache, progress=False)


def test_first_run_indexes_diagnoses_and_explains(first_run, capsys):
    _, s = first_run
    # 420 labelled rows and the 60-image unlabeled pool, indexed and scored together
    assert s["rows"] == 420 and s["pool_rows"] == 60
    assert s["index"] == {"indexed": True, "reused": False, "rows": 480}
    assert s["diagnosis"] and not s["diagnosis"]["reused"] and s["diagnosis"]["rows"] == 480
    assert s["diagnosis"]["pool_rows"] == 60
    # explain names modes from the world's own vocab.txt (beside the manifest) by default, or from
    # compositions of its phrases, and lists only modes whose evidence holds: on this 420-row world
    # with a 3-step CLIP there may be none (issue 13)
    vocab = (Path(s["world"]) / "vocab.txt").read_text().splitlines()
    words = {w for p in vocab for w in p.split()}
    assert all(m["shown"] and m["size"] >= 20 and set(m["description"].split()) <= words for m in s["modes"])
    assert s["not_available"] == []
    assert [sl["name"] for sl in s["slices"]] == ["blue circles", "small stars"]
    assert any('search "a blue circle"' in q for q in s["queries"])


def test_second_run_reuses_world_index_and_ensemble(first_run, capsys):
    cache, s1 = first_run
    s2 = run_demo(spec=TINY, serve=False, cache_dir=cache, progress=False)
    assert s2["world"] == s1["world"] and s2["db"] == s1["db"]
    assert s2["index"]["reused"] and s2["diagnosis"]["reused"]
    # a reused ensemble reports the quality it was fitted with, not NaN
    for k in ("spearman", "auroc_top10"):
        assert s2["diagnosis"][k] == pytest.approx(s1["diagnosis"][k], rel=1e-12)
    out = capsys.readouterr().out
    assert "planted" not in out or "slice 'blue circles'" in out
    assert "loss ratio" in out and "llm2loss search" in out and "420 rows" in out


def test_cli_demo_with_spec_file(first_run, tmp_path, capsys, monkeypatch):
    import json

    cache, s1 = first_run
    monkeypatch.setenv("LLM2LOSS_CACHE", str(cache))
    spec = tmp_path / "world.json"
    spec.write_text(json.dumps(TINY))
    assert main(["demo", "--spec", str(spec), "--no-serve"]) == 0
    assert s1["db"] in capsys.readouterr().out


def test_cli_demo_refuses_a_bad_spec(tmp_path, capsys):
    spec = tmp_path / "bad.json"
    spec.write_text('{"task": "mood"}')
    assert main(["demo", "--spec", str(spec), "--no-serve"]) == 2
    assert "task" in capsys.readouterr().err


def test_summary_says_plainly_when_a_planted_slice_did_not_become_a_failure(first_run):
    from indexer.world import World
    from search_ui.demo import format_summary

    _, s = first_run
    world = World.load(s["world"])
    fails, not_fails = (dict(sl) for sl in world.slices)
    fails["loss_ratio"] = {**fails["loss_ratio"], "test": 3.5}
    not_fails["loss_ratio"] = {**not_fails["loss_ratio"], "test": 0.4}
    world.slices = [fails, not_fails]
    text = format_summary(world, {**s, "modes": []})
    assert ("planted slice 'small stars' did not become a failure: its held-out rows have 0.40x the mean "
            "held-out loss (a failure needs 2x)") in text
    assert "'blue circles' did not become" not in text
    lines = {ln.split("'")[1]: ln for ln in text.splitlines() if ln.startswith("  slice '")}
    assert lines["small stars"].endswith("NOT a failure (held-out ratio below 2x)")
    assert lines["blue circles"].endswith(": a failure")


def test_modes_are_attributed_only_to_slices_that_became_failures():
    import pandas as pd

    from search_ui.demo import _best_slice

    rows = pd.DataFrame({"slice_a": [True, True, False], "slice_b": [True, False, False]}, index=["x", "y", "z"])
    a = {"name": "a", "column": "slice_a"}
    b = {"name": "b", "column": "slice_b"}
    assert _best_slice(["x", "y"], rows, [a, b]) == {"name": "a", "precision": 1.0, "recall": 1.0}
    assert _best_slice(["x", "y"], rows, [b]) == {"name": "b", "precision": 0.5, "recall": 1.0}
    assert _best_slice(["z"], rows, [a, b]) is None


def test_a_mode_is_tied_to_a_planted_slice_only_when_it_is_most_of_the_mode_or_holds_most_of_it():
    import pandas as pd

    from search_ui.demo import _best_slice

    rows = pd.DataFrame({"slice_a": [True] * 10 + [False] * 90, "slice_b": [False] * 10 + [True] * 40 + [False] * 50},
                        index=[f"r{i}" for i in range(100)])
    slices = [{"name": "a", "column": "slice_a"}, {"name": "b", "column": "slice_b"}]
    # all of slice a inside a mode three times its size: named (recall 1.0), precision said as a third
    assert _best_slice([f"r{i}" for i in range(30)], rows, slices) == {"name": "a", "precision": 1 / 3, "recall": 1.0}
    # one row of slice b among forty others: no slice found
    assert _best_slice([f"r{i}" for i in range(49, 90)], rows, slices) is None
