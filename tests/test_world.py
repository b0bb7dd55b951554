"""The offline world on tiny specs: determinism, planting of each slice kind, caching, the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from indexer.errors import UserError
from indexer.world import build as world_build
from indexer.world import build_world, default_spec, load_spec, slug
from indexer.world.generate import (
    TEMPLATE_STATES,
    TEMPLATES,
    caption,
    finish_rows,
    plant_train,
    render_all,
    sample_captions,
    sample_rows,
)
from indexer.world.spec import ATTRIBUTES
from indexer.world.vocab import describe, vocabulary, vocabulary_items

TINY = {
    "seed": 3, "n_train": 400, "n_test": 160, "n_pool": 120, "image_size": 32, "task": "shape",
    "slices": [
        {"name": "blue circles", "kind": "correlation", "where": {"shape": "circle", "color": "blue"},
         "strength": 0.9},
        {"name": "small stars", "kind": "rare", "where": {"shape": "star", "size": "small"}, "rate": 0.02},
        {"name": "striped triangles", "kind": "noisy_label",
         "where": {"shape": "triangle", "background": "striped"}, "noise": 0.5},
    ],
    "clip": {"steps": 3, "batch_size": 32, "n_images": 96},
    "blackbox": {"epochs": 1, "batch_size": 64},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(TINY, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


# ---- generation and planting (no training: cheap, so big samples make the rates exact) -----------
def _train_rows(spec: dict, n: int = 6000) -> pd.DataFrame:
    spec = load_spec({**spec, "n_train": n})
    rows, _ = plant_train(sample_rows(n, spec["seed"], "train"), spec, spec["seed"])
    return finish_rows(rows, spec, "train")


def test_same_seed_same_rows_and_pixels_other_seed_differs():
    a = finish_rows(sample_rows(50, 1, "test"), load_spec(TINY), "test")
    b = finish_rows(sample_rows(50, 1, "test"), load_spec(TINY), "test")
    c = finish_rows(sample_rows(50, 2, "test"), load_spec(TINY), "test")
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(render_all(a, 32), render_all(b, 32))
    assert not a[list(ATTRIBUTES)].equals(c[list(ATTRIBUTES)])
    assert not np.array_equal(render_all(a, 32), render_all(c, 32))


def test_rare_slice_has_exactly_its_rate_in_training():
    rows = _train_rows({"slices": [{"name": "small stars", "kind": "rare",
                                    "where": {"shape": "star", "size": "small"}, "rate": 0.004}]})
    assert len(rows) == 6000
    assert rows["slice_small_stars"].sum() == 24  # 0.004 * 6000, not the natural ~600
    other = rows[~rows["slice_small_stars"]]
    # Removing the group leaves the other attributes' balance alone.
    assert (other["size"] == "small").mean() == pytest.approx(0.4 / 0.9, abs=0.02)


def test_rare_slice_can_also_be_made_common():
    rows = _train_rows({"slices": [{"name": "green crosses", "kind": "rare",
                                    "where": {"shape": "cross", "color": "green"}, "rate": 0.2}]})
    assert rows["slice_green_crosses"].mean() == pytest.approx(0.2, abs=1e-3)


def test_correlation_slice_makes_the_spurious_feature_predict_the_decoy():
    spec = {"slices": [{"name": "blue circles", "kind": "correlation",
                        "where": {"shape": "circle", "color": "blue"}, "strength": 0.9}]}
    rows = _train_rows(spec)
    blue = rows[rows["color"] == "blue"]
    assert (blue["shape"] == "square").mean() == pytest.approx(0.9, abs=2e-3)  # default decoy: next shape
    assert (blue["shape"] == "circle").mean() < 0.05  # the group breaks the rule, so it is scarce
    not_blue = rows[rows["color"] != "blue"]
    assert (not_blue["shape"] == "circle").mean() == pytest.approx(0.2, abs=0.03)  # untouched
    # The test split keeps every group at its natural rate.
    test = finish_rows(sample_rows(6000, 0, "test"), load_spec(spec), "test")
    assert test["slice_blue_circles"].mean() == pytest.approx(1 / 30, abs=0.01)
    assert ((test["color"] == "blue") & (test["shape"] == "square")).mean() == pytest.approx(1 / 30, abs=0.01)


def test_correlation_with_explicit_decoy():
    rows = _train_rows({"slices": [{"name": "noisy red stars", "kind": "correlation", "decoy": "cross",
                                    "where": {"shape": "star", "color": "red", "background": "noisy"},
                                    "strength": 0.8}]})
    spurious = rows[(rows["color"] == "red") & (rows["background"] == "noisy")]
    assert (spurious["shape"] == "cross").mean() == pytest.approx(0.8, abs=5e-3)


def test_noisy_label_slice_corrupts_exactly_its_share_and_nothing_else():
    rows = _train_rows({"slices": [{"name": "striped triangles", "kind": "noisy_label",
                                    "where": {"shape": "triangle", "background": "striped"}, "noise": 0.3}]})
    g = rows[rows["slice_striped_triangles"]]
    assert (g["label"] != g["shape"]).mean() == pytest.approx(0.3, abs=2e-3)
    assert (g["label"] != g["shape"]).eq(g["label_corrupted"]).all()
    assert set(g.loc[g["label_corrupted"], "label"]) <= set(ATTRIBUTES["shape"]) - {"triangle"}
    rest = rows[~rows["slice_striped_triangles"]]
    assert (rest["label"] == rest["shape"]).all()


def test_noisy_label_to_a_fixed_target():
    rows = _train_rows({"slices": [{"name": "dark stars", "kind": "noisy_label", "to": "circle",
                                    "where": {"shape": "star", "background": "dark"}, "noise": 0.6}]})
    g = rows[rows["slice_dark_stars"]]
    assert (g["label"] == "circle").mean() == pytest.approx(0.6, abs=5e-3)


def test_task_can_be_another_attribute():
    spec = {"task": "color", "slices": [{"name": "red on stripes", "kind": "correlation",
                                         "where": {"color": "red", "background": "striped"}, "strength": 1.0}]}
    rows = _train_rows(spec)
    assert (rows["label"] == rows["color"]).all()
    assert (rows.loc[rows["background"] == "striped", "color"] == "green").all()


@pytest.mark.parametrize("bad, words", [
    ({"task": "mood"}, "task"),
    ({"n_train": 3}, "n_train"),
    ({"slices": [{"kind": "rare", "where": {"shape": "blob"}, "rate": 0.1}]}, "blob"),
    ({"slices": [{"kind": "rare", "where": {"shape": "star"}}]}, "rate"),
    ({"slices": [{"kind": "often", "where": {"shape": "star"}}]}, "kind"),
    ({"slices": [{"kind": "correlation", "where": {"color": "red"}, "strength": 0.9}]}, "spurious"),
    ({"slices": [{"kind": "noisy_label", "where": {"shape": "star"}, "noise": 1.5}]}, "fraction"),
    ({"colour": 3}, "unknown keys"),
    ({"clip": {"target": 1.5}}, "target"),
    ({"clip": {"steps": 0}}, "clip.steps"),
    ({"clip": {"eval_every": "often"}}, "clip.eval_every"),
    ({"clip": {"phrase_target": -0.1}}, "phrase_target"),
])
def test_bad_specs_are_refused_with_the_field_named(bad, words):
    with pytest.raises(UserError, match=words):
        load_spec(bad)


def test_default_spec_is_valid_and_has_one_slice_of_each_kind():
    spec = load_spec(None)
    assert spec == load_spec(default_spec())
    assert {s["kind"] for s in spec["slices"]} == {"rare", "correlation", "noisy_label"}
    assert len(ATTRIBUTES["shape"]) >= 5 and len(ATTRIBUTES["color"]) == 6
    assert len(ATTRIBUTES["size"]) == 2 and len(ATTRIBUTES["background"]) == 4


def test_descriptions_and_vocabulary():
    assert describe({"shape": "circle", "color": "blue"}) == "a blue circle"
    assert describe({"shape": "triangle", "background": "striped"}) == "a triangle on a striped background"
    assert describe({"color": "orange"}) == "an orange object"
    v = vocabulary()
    assert len(v) == len(set(v)) and {"a small star", "a blue circle"} <= set(v)
    assert [p for p, _ in vocabulary_items()] == v
    assert all(describe(where) == p for p, where in vocabulary_items())


# ---- the tiny CLIP's captions, loss, stopping rule and phrase precision ---------------------------
def test_caption_sampler_produces_every_phrase_form_of_the_vocabulary():
    rows = sample_rows(4000, 0, "clip")
    rng = np.random.default_rng(0)
    captions, masks = [], []
    for _ in range(3):  # three training "epochs": each draws fresh captions
        c, m = sample_captions(rows, rng)
        captions += c
        masks.append(m)
    mask = np.concatenate(masks)
    assert set(vocabulary()) <= set(captions)  # every single value and every pair, in describe()'s words
    # every phrase form: each of the 15 non-empty attribute subsets is stated by some caption
    assert len({tuple(m) for m in mask}) == 15
    # three-attribute descriptions (a slice's own, e.g. "a small blue star") are taught too
    assert {"a small blue star", "a small star on a striped background"} <= set(captions)
    # each caption states exactly the attributes its mask says, true of its own image
    recs = rows[list(ATTRIBUTES)].to_dict("records")
    # (a template such as "a {color} {shape}" states two: other sizes and backgrounds are positives)
    for text, m, r in zip(captions[:4000], mask[:4000], recs, strict=True):
        by_template = [t for t in range(len(TEMPLATES)) if caption(r, t) == text]
        if by_template:  # describe() of some subsets has a template's words too: either reading fits
            assert any((TEMPLATE_STATES[t] == m).all() for t in by_template), (text, m)
        else:
            assert text == describe({a: r[a] for a, k in zip(ATTRIBUTES, m, strict=True) if k})
    assert TEMPLATE_STATES.sum(1).tolist() == [4, 4, 4, 4, 4, 2, 3, 3]
    # four-attribute captions: 0.4 x 0.68 (the templates stating all four) + 0.6 x 0.1 (partials) = 0.33
    assert 0.3 < mask.all(1).mean() < 0.37


def test_multi_positive_loss_is_clip_loss_when_every_caption_is_unique_and_counts_shared_ones():
    import open_clip
    import torch

    from indexer.world.tiny_clip import multi_positive_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    codes = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [2, 0, 1, 1], [3, 2, 1, 2]])
    full = torch.ones(4, 4, dtype=torch.bool)
    ours = multi_positive_loss(img, txt, scale, codes, full)
    assert float(ours) == pytest.approx(float(open_clip.ClipLoss()(img, txt, scale)), rel=1e-5)
    # caption 0 states only the size (code 0), which images 0 and 1 share: both are its positives
    mask = full.clone()
    mask[0] = torch.tensor([False, False, True, False])
    logits = scale * txt @ img.T
    t2i = [-(0.5 * logits[0].log_softmax(0)[0] + 0.5 * logits[0].log_softmax(0)[1])]
    t2i += [-logits[j].log_softmax(0)[j] for j in (1, 2, 3)]
    col = logits.log_softmax(0)  # image i over captions
    i2t = [-col[0, 0], -(0.5 * col[0, 1] + 0.5 * col[1, 1]), -col[2, 2], -col[3, 3]]
    expected = 0.5 * (torch.stack(t2i).mean() + torch.stack(i2t).mean())
    assert float(multi_positive_loss(img, txt, scale, codes, mask)) == pytest.approx(float(expected), rel=1e-5)


def _tiny_training(target: float, steps: int = 6, phrase_target: float | None = None):
    from indexer.configs import TINY_CLIP
    from indexer.world import tiny_clip

    clip = {"steps": steps, "batch_size": 16, "n_images": 48, "target": target, "eval_every": 2, "n_eval": 40}
    if phrase_target is not None:
        clip["phrase_target"] = phrase_target
    spec = load_spec({**TINY, "clip": clip})
    _, pre, _ = tiny_clip.create(TINY_CLIP)
    pool = sample_rows(48, 0, "clip")
    watch = sample_rows(40, 0, "clip_eval")
    px = tiny_clip.preprocess_images(render_all(pool, 32), pre)
    wpx = tiny_clip.preprocess_images(render_all(watch, 32), pre)
    check = None
    if phrase_target is not None:  # "the world": 60 other images, and the vocabulary
        world = sample_rows(60, 0, "test")
        check = (tiny_clip.preprocess_images(render_all(world, 32), pre), world, vocabulary_items())
    return tiny_clip.train_clip(TINY_CLIP, px, pool, spec["clip"], 0, (wpx, watch), progress=False,
                                phrase_check=check)


def test_training_waits_for_every_phrase_once_zero_shot_holds():
    # zero-shot's target is met at the first check, but no phrase is retrieved perfectly after 6
    # steps of 16 captions: the phrase rule alone keeps training to the cap, measuring at each check
    _, rec = _tiny_training(target=0.0, phrase_target=1.0)
    assert rec["stopped"] == "cap" and rec["steps"] == 6 and rec["phrase_target"] == 1.0
    checks = [h["phrase_precision"] for h in rec["history"] if "phrase_precision" in h]
    assert len(checks) == 2 and all(c["k"] == 100 for c in checks)  # at steps 2 and 4; the cap is 6
    assert all(c["min"] < 1.0 and c["min"] <= c["mean"] <= 1.0 for c in checks)
    assert rec["eval_images"] == 40 and rec["phrase_images"] == 60
    # met at once: stops at the first check, like zero-shot alone
    _, rec = _tiny_training(target=0.0, phrase_target=0.0)
    assert rec["stopped"] == "target" and rec["steps"] == 2 and "phrase_precision" in rec["history"][0]


def test_training_stops_as_soon_as_every_zero_shot_accuracy_reaches_the_target():
    _, rec = _tiny_training(target=0.0)
    assert rec["stopped"] == "target" and rec["steps"] == 2 and rec["cap"] == 6
    assert rec["history"][0]["step"] == 2 and set(rec["history"][0]["zero_shot"]) >= set(ATTRIBUTES)
    assert rec["eval_images"] == 40


def test_training_stops_at_the_cap_when_the_target_is_not_reached():
    _, rec = _tiny_training(target=1.0)  # every attribute perfect after 6 steps of 16 captions: never
    assert rec["stopped"] == "cap" and rec["steps"] == 6
    assert [h["step"] for h in rec["history"]] == [2, 4, 6]  # evaluations at 2 and 4, the final one at 6
    for h in rec["history"]:
        assert all(0.0 <= h["zero_shot"][a] <= 1.0 and 0.0 <= h["partial_zero_shot"][a] <= 1.0 for a in ATTRIBUTES)


def test_phrase_precision_on_a_hand_made_case():
    from indexer.world.tiny_clip import phrase_precision

    # six images on a line; phrase "red" points at images 0..2 by similarity 1.0, 0.9, 0.8, ...
    rows = pd.DataFrame({"color": ["red", "blue", "red", "red", "blue", "red"],
                         "shape": ["star", "star", "circle", "star", "star", "star"]})
    angles = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # image i at angle i*0.1 from the x axis
    img = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    txt = np.array([[1.0, 0.0], [1.0, 0.0], [np.cos(0.5), np.sin(0.5)]])
    phrases = [("a red object", {"color": "red"}), ("a red star", {"color": "red", "shape": "star"}),
               ("a blue circle", {"color": "blue", "shape": "circle"})]
    out = phrase_precision(img, rows, phrases, txt, k=3)
    # "a red object": top 3 = images 0, 1, 2 -> red, blue, red -> 2/3
    # "a red star": 3 match (0, 3, 5), top 3 = 0, 1, 2 -> only image 0 -> 1/3
    # "a blue circle": no image matches: skipped
    assert out["per_phrase"] == pytest.approx({"a red object": 2 / 3, "a red star": 1 / 3})
    assert out["mean"] == pytest.approx(0.5) and out["min"] == pytest.approx(1 / 3)
    assert out["worst"][0] == ["a red star", pytest.approx(1 / 3)]
    # k above the number of matching images: the share of that many nearest (2 blue: 1, 4)
    out = phrase_precision(img, rows, [("a blue object", {"color": "blue"})], np.array([[np.cos(0.25), np.sin(0.25)]]),
                           k=100)
    assert out["per_phrase"]["a blue object"] == pytest.approx(0.0)  # nearest two are images 2 and 3, red


# ---- a built tiny world ---------------------------------------------------------------------------
def test_world_manifest_columns_and_files(world):
    rows = world.rows()
    assert len(rows) == 560 and rows["split"].value_counts().to_dict() == {"train": 400, "test": 160}
    for col in ("image", "id", "label", "split", "loss", "caption", *ATTRIBUTES,
                "slice_blue_circles", "slice_small_stars", "slice_striped_triangles"):
        assert col in rows.columns
    assert rows["id"].is_unique
    assert (world.manifest.parent / rows["image"].iloc[0]).is_file()
    assert np.isfinite(rows["loss"]).all() and (rows["loss"] >= 0).all()
    assert (rows.loc[rows["split"] == "test", "label"] == rows.loc[rows["split"] == "test", "shape"]).all()
    assert rows.loc[rows["split"] == "train", "slice_small_stars"].sum() == 8  # 0.02 * 400
    assert world.clip_config.is_file() and world.clip_checkpoint.is_file()
    phrases = world.vocab.read_text().splitlines()
    assert {"a blue circle", "a small star", "a triangle on a striped background"} <= set(phrases)


def test_world_reports_quality_numbers(world):
    q = world.quality
    assert set(ATTRIBUTES) <= set(q["clip"]["zero_shot"])
    assert 0.0 <= q["clip"]["recall_at_10"] <= 1.0
    for s in world.slices:
        assert s["column"] == slug(s["name"]) and s["loss_ratio"]["all"] > 0
        assert s["planted"]["kind"] == s["kind"]
    tr = q["clip"]["training"]
    assert tr["cap"] == 3 and tr["steps"] == 3 and tr["stopped"] == "cap"  # eval_every 25 > cap: no early stop
    pp = q["clip"]["phrase_precision"]
    assert pp["k"] == 100 and 0.0 <= pp["min"] <= pp["mean"] <= 1.0
    assert set(pp["per_phrase"]) == set(world.vocab.read_text().splitlines())  # every phrase, the slices' too
    assert len(pp["worst"]) == 5 and pp["worst"][0][1] == pp["min"]
    text = world.summary()
    assert "zero-shot" in text and "slice 'blue circles'" in text and "phrase precision@100" in text
    assert "3 of at most 3 steps" in text
    for s in world.slices:
        assert s["failure"] == (s["loss_ratio"]["test"] >= 2.0)
        assert ("NOT a failure" in text.split(f"slice '{s['name']}'")[1].splitlines()[0]) == (not s["failure"])


def test_world_is_deterministic(world, tmp_path):
    again = build_world(TINY, cache_dir=tmp_path, progress=False)
    a, b = world.rows(), again.rows()
    pd.testing.assert_frame_equal(a.drop(columns=["loss", "prediction"]), b.drop(columns=["loss", "prediction"]))
    assert np.allclose(a["loss"], b["loss"], atol=1e-4)
    for img in a["image"].iloc[:20]:
        assert (world.root / img).read_bytes() == (again.root / img).read_bytes()


def test_cache_reuses_and_a_spec_change_rebuilds(world, monkeypatch):
    cache = world.root.parent.parent

    def refuse(*a, **k):
        raise AssertionError("rebuilt a cached world")

    monkeypatch.setattr(world_build, "_build", refuse)
    again = build_world(dict(TINY), cache_dir=cache, progress=False)
    assert again.root == world.root
    with pytest.raises(AssertionError, match="rebuilt"):
        build_world({**TINY, "seed": 4}, cache_dir=cache, progress=False)


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    from indexer.world import tiny_clip

    def boom(*a, **k):  # after the images are on disk: a half-built world exists at this point
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_clip, "train_clip", boom)
    with pytest.raises(KeyboardInterrupt):
        build_world(TINY, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "worlds").iterdir()) == []


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2LOSS_CACHE", str(tmp_path / "a"))
    assert world_build.cache_root() == tmp_path / "a"
    monkeypatch.delenv("LLM2LOSS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert world_build.cache_root() == tmp_path / "x" / "llm2loss"


def test_spec_file_is_accepted(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps(TINY))
    assert load_spec(p)["n_train"] == 400
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_spec(p)


def test_manifest_is_indexed_by_the_ordinary_path(world, tmp_path):
    from indexer.clip import ClipSpec
    from indexer.pipeline import index_dataset
    from indexer.store import Database

    report = index_dataset(world.manifest, tmp_path / "db",
                           clip=ClipSpec(model=str(world.clip_config), checkpoint=str(world.clip_checkpoint)),
                           progress=False, workers=0)
    assert report.rows_written == 560 + 120 and report.pool_rows == 120 and not report.rejected
    db = Database(tmp_path / "db")
    t = db.read(["id", "loss", "label", "split", "slice_blue_circles", "shape"]).to_pandas().set_index("id")
    rows = world.rows().set_index("id")
    assert np.allclose(t.loc[rows.index, "loss"], rows["loss"], atol=1e-6)
    assert (t.loc[rows.index, "slice_blue_circles"] == rows["slice_blue_circles"]).all()
    # the unlabeled pool: stored without label, loss or anything that gives its truth away
    truth = world.pool_truth().set_index("id")
    pool = t[t["split"] == "pool"]
    assert sorted(pool.index) == sorted(truth.index) and len(truth) == 120
    assert pool["loss"].isna().all() and pool["label"].isna().all() and pool["shape"].isna().all()
    assert set(truth["label"]) <= {"circle", "square", "triangle", "star", "cross"}
    assert np.isfinite(truth["loss"]).all()


def test_the_pool_is_drawn_like_the_test_split_and_leaves_the_labelled_world_as_it_was(world, tmp_path):
    """The pool is uniform like the test split (no planting), and adding it changes nothing else: the
    labelled rows are those of the same spec without a pool."""
    truth = world.pool_truth()
    assert len(truth) == 120 and not truth["slice_small_stars"].all()
    # uniform: every shape and colour appears (120 draws of 5 shapes / 6 colours)
    assert set(truth["shape"]) == set(ATTRIBUTES["shape"]) and set(truth["color"]) == set(ATTRIBUTES["color"])
    none = build_world({**TINY, "n_pool": 0}, cache_dir=tmp_path, progress=False)
    a, b = world.rows(), none.rows()
    assert list(a["id"]) == list(b["id"]) and (a["label"] == b["label"]).all()
    assert len(none.pool_truth()) == 0 and none.manifest_rows() == len(b)


def test_retraining_uses_the_truth_the_world_keeps_aside(world):
    """The simulated labeller: relabelled training rows get their true label, collected pool images
    theirs; the retrained model is measured on the test split per planted slice."""
    from indexer.world.retrain import Retrainer

    rt = Retrainer(world)
    before = rt.baseline()
    rows = world.rows()
    test = rows[rows["split"] == "test"]
    assert before.accuracy == pytest.approx(float((test["prediction"] == test["shape"]).mean()))
    assert set(before.slices) == {"blue circles", "small stars", "striped triangles"}
    corrupted = rows.loc[rows["label_corrupted"], "id"].tolist()
    clean = rows.loc[(rows["split"] == "train") & ~rows["label_corrupted"], "id"].tolist()[:3]
    pool = world.pool_truth()["id"].tolist()[:20]
    out = rt.retrain(add=pool, relabel=corrupted + clean)
    assert out.added == 20 and out.relabelled == len(corrupted) + 3 and out.relabel_fixed == len(corrupted) > 0
    assert out.train_rows == (rows["split"] == "train").sum() + 20
    assert 0 <= out.accuracy <= 1 and np.isfinite(out.mean_loss)
    for s in out.slices.values():
        assert s["ratio"] == pytest.approx(s["mean_loss"] / out.mean_loss)
    # same seed, same data: the same model
    again = rt.retrain(add=pool, relabel=corrupted + clean)
    assert again.mean_loss == pytest.approx(out.mean_loss, rel=1e-4)


def test_a_killed_builds_temp_folder_is_removed_by_the_next_build(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    worlds = tmp_path / "worlds"
    half = worlds / f".tmp-abc-{int(dead.stdout)}-x1"  # what SIGKILL mid-build leaves
    (half / "images").mkdir(parents=True)
    alive = worlds / f".tmp-abc-{os.getpid()}-x2"  # a build still running
    alive.mkdir()
    world_build._remove_abandoned(worlds)
    assert not half.exists() and alive.exists()
