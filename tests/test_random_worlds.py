"""Random evaluation worlds (``random_spec``) and the shared tiny CLIP (``"clip": {"shared": true}``)."""

from __future__ import annotations

import itertools

import pytest

from indexer.configs import TINY_CLIP
from indexer.errors import UserError
from indexer.world import build as world_build
from indexer.world import build_world, tiny_clip
from indexer.world.spec import ATTRIBUTES, RANDOM_RANGES, default_spec, load_spec, random_spec, spec_hash


def _disjoint(a: dict, b: dict) -> bool:
    return any(k in b and b[k] != v for k, v in a.items())


def _claim(s: dict, task: str) -> dict:
    return {k: v for k, v in s["where"].items() if k != task} if s["kind"] == "correlation" else s["where"]


def test_random_specs_are_deterministic_valid_and_varied():
    specs = [random_spec(s, i) for s in (0, 26) for i in range(12)]
    assert specs == [random_spec(s, i) for s in (0, 26) for i in range(12)]  # same (seed, index), same spec
    assert random_spec(26, 0) != random_spec(26, 1) != random_spec(27, 0)
    assert {s["task"] for s in specs} == set(ATTRIBUTES)  # every attribute is a task somewhere
    widths = set()
    for spec in specs:
        norm = load_spec(spec)  # the ordinary validation accepts it
        assert norm["name"].startswith("random-") and norm["clip"]["shared"] is True
        assert 2 <= len(spec["slices"]) <= 5
        for s in spec["slices"]:
            widths.add(len(s["where"]))
            assert spec["task"] in s["where"]
            param = {"rare": "rate", "correlation": "strength", "noisy_label": "noise"}[s["kind"]]
            lo, hi = RANDOM_RANGES[param]
            assert lo <= s[param] <= hi
        # no two slices touch the same rows: their claims contradict on some attribute
        for a, b in itertools.combinations(spec["slices"], 2):
            assert _disjoint(_claim(a, spec["task"]), _claim(b, spec["task"])), (spec["name"], a, b)
    assert widths == {2, 3}
    assert {s["kind"] for spec in specs for s in spec["slices"]} == {"rare", "correlation", "noisy_label"}


def test_shared_clip_is_opt_in_and_leaves_the_default_spec_and_its_hash_alone():
    cfg = TINY_CLIP.read_bytes()
    base = load_spec(None)
    assert "shared" not in base["clip"]
    # the default world's hash as before the setting existed (update only with a GENERATOR_VERSION bump)
    assert spec_hash(base, cfg) == "4416d47caf11dbdd"
    off = load_spec({**default_spec(), "clip": {**default_spec()["clip"], "shared": False}})
    assert off == base and spec_hash(off, cfg) == spec_hash(base, cfg)
    on = load_spec({**default_spec(), "clip": {**default_spec()["clip"], "shared": True}})
    assert spec_hash(on, cfg) != spec_hash(base, cfg)
    with pytest.raises(UserError, match="clip.shared"):
        load_spec({**default_spec(), "clip": {"shared": "yes"}})


SMALL = {"n_train": 200, "n_test": 80, "n_pool": 20, "image_size": 32, "task": "shape",
         "slices": [{"kind": "rare", "where": {"shape": "star", "size": "small"}, "rate": 0.02}],
         "clip": {"steps": 2, "batch_size": 16, "n_images": 48, "n_eval": 20, "eval_every": 0, "shared": True},
         "blackbox": {"epochs": 1, "batch_size": 64}}


@pytest.fixture
def counted_training(monkeypatch):
    monkeypatch.setattr(world_build, "SHARED_PHRASE_IMAGES", 40)
    calls = []
    real = tiny_clip.train_clip

    def counting(*a, **k):
        calls.append(a[2])  # the images' rows
        return real(*a, **k)

    monkeypatch.setattr(tiny_clip, "train_clip", counting)
    return calls


def test_two_worlds_share_one_clip_trained_once(tmp_path, counted_training):
    a = build_world({**SMALL, "seed": 1}, cache_dir=tmp_path, progress=False)
    b = build_world({**SMALL, "seed": 2, "task": "color",
                     "slices": [{"kind": "noisy_label", "where": {"color": "red", "size": "large"}, "noise": 0.5}]},
                    cache_dir=tmp_path, progress=False)
    assert len(counted_training) == 1 and len(counted_training[0]) == 48  # once, on its own uniform pool
    clips = [p for p in (tmp_path / "clips").iterdir()]
    assert len(clips) == 1 and (clips[0] / "clip.json").is_file()  # no temp folder left
    weights = (clips[0] / "tiny-clip.pt").read_bytes()
    assert a.clip_checkpoint.read_bytes() == weights == b.clip_checkpoint.read_bytes()
    assert a.clip_config.read_bytes() == TINY_CLIP.read_bytes()
    sa, sb = (w.quality["clip"]["training"]["shared"] for w in (a, b))
    assert sa["trained_by_this_build"] and not sb["trained_by_this_build"]
    assert sa["hash"] == sb["hash"] == clips[0].name
    # each world's CLIP is still measured on that world's own images
    for w in (a, b):
        c = w.quality["clip"]
        assert set(c["zero_shot"]) >= set(ATTRIBUTES) and 0 <= c["recall_at_10"] <= 1
        assert 0 <= c["phrase_precision"]["min"] <= c["phrase_precision"]["mean"] <= 1
        assert c["training"]["steps"] == 2 and c["training"]["phrase_images"] == 40
        assert "shared with other worlds" in w.summary()
    # a world without the setting trains its own and leaves the shared one alone
    own = build_world({**SMALL, "seed": 1, "clip": {**SMALL["clip"], "shared": False}}, cache_dir=tmp_path,
                      progress=False)
    assert len(counted_training) == 2 and "shared" not in own.quality["clip"]["training"]
    assert own.hash != a.hash and [p.name for p in (tmp_path / "clips").iterdir()] == [clips[0].name]


def test_a_failed_shared_clip_training_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(world_build, "SHARED_PHRASE_IMAGES", 40)

    def boom(*a, **k):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(tiny_clip, "train_clip", boom)
    with pytest.raises(RuntimeError):
        build_world({**SMALL, "seed": 1}, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "clips").iterdir()) == [] and list((tmp_path / "worlds").iterdir()) == []
