"""`llm2loss demo --no-serve` on a tiny world: every stage runs once, a second run reuses them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_ui.cli import main
from search_ui.demo import run_demo

TINY = {
    "seed": 5, "n_train": 300, "n_test": 120, "image_size": 32, "task": "shape",
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
    assert s["rows"] == 420 and s["index"] == {"indexed": True, "reused": False, "rows": 420}
    assert s["diagnosis"] and not s["diagnosis"]["reused"] and s["diagnosis"]["rows"] == 420
    assert s["modes"]
    # explain names modes from the world's own vocab.txt (beside the manifest) by default
    vocab = set((Path(s["world"]) / "vocab.txt").read_text().splitlines())
    assert all(m["description"] in vocab for m in s["modes"])
    assert s["not_available"] == []
    assert [sl["name"] for sl in s["slices"]] == ["blue circles", "small stars"]
    assert any('search "a blue circle"' in q for q in s["queries"])


def test_second_run_reuses_world_index_and_ensemble(first_run, capsys):
    cache, s1 = first_run
    s2 = run_demo(spec=TINY, serve=False, cache_dir=cache, progress=False)
    assert s2["world"] == s1["world"] and s2["db"] == s1["db"]
    assert s2["index"]["reused"] and s2["diagnosis"]["reused"]
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
