"""Scoring words across the modality gap, vocabularies, and `llm2loss explain`."""

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from diagnosis.ensemble import DiagnosisEnsemble
from diagnosis.explain import explain
from diagnosis.run import diagnose
from diagnosis.text import Scorer, estimate_gap, score_text, text_to_image_space
from diagnosis.vocab import (
    compose_pairs,
    default_vocabulary,
    generic_concepts,
    generic_singles,
    read_vocab_file,
)
from indexer import schema as S
from indexer.errors import UserError
from tests.fakes import make_db


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_gap_correction_moves_text_among_images_and_ranks_concepts_better():
    """Images and captions of 8 concepts in two cones (a shared offset per modality, as in CLIP);
    the ensemble, fitted on images, scores the captions."""
    rng = np.random.default_rng(0)
    d, k = 32, 8
    concepts = _unit(rng.normal(size=(k, d)))
    u_img, u_txt = _unit(rng.normal(size=(2, d)))
    cl = rng.integers(0, k, 1200)
    X = _unit(1.5 * u_img + concepts[cl] + 0.3 * rng.normal(size=(1200, d))).astype(np.float32)
    concept_loss = np.linspace(3.0, 0.1, k)
    y = rng.gamma(2.0, concept_loss[cl] / 2)
    T = _unit(1.5 * u_txt + concepts + 0.05 * rng.normal(size=(k, d))).astype(np.float32)
    # the members that extrapolate (the kNN member reads a raw caption by its nearest images, which
    # is CLIP retrieval and already gap-robust in ranking, though not in scale)
    ens = DiagnosisEnsemble(n_members=4, n_folds=3, n_rff=256, kinds=("rff", "hgb", "mlp", "ridge"),
                            random_state=0).fit(X, y)

    gap = estimate_gap(X, T)
    Tc = text_to_image_space(T, gap)
    np.testing.assert_allclose(np.linalg.norm(Tc, axis=1), 1.0, rtol=1e-5)
    mean_img = _unit(X.mean(axis=0))
    assert (Tc @ mean_img).mean() > (T @ mean_img).mean() + 0.3  # now among the images
    raw, corrected = ens.predict(T), ens.predict(Tc)
    assert spearmanr(corrected, concept_loss).statistic > spearmanr(raw, concept_loss).statistic
    assert spearmanr(corrected, concept_loss).statistic > 0.95
    # and on the right scale: raw captions get squashed towards the average loss
    err = lambda p: np.abs(np.log1p(p) - np.log1p(concept_loss)).mean()  # noqa: E731
    assert err(corrected) < 0.5 * err(raw)
    assert np.argmax(corrected) == 0


def test_gap_helpers_accept_means_and_none():
    X = _unit(np.random.default_rng(1).normal(size=(10, 4)))
    np.testing.assert_allclose(estimate_gap(X.mean(0), X[:3].mean(0)), estimate_gap(X, X[:3]), rtol=1e-6)
    np.testing.assert_allclose(text_to_image_space(X[:2], None), X[:2].astype(np.float32))


def test_vocabularies(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# a comment\na red circle\n\na red circle\na blue square\n")
    assert read_vocab_file(f) == ["a red circle", "a blue square"]
    with pytest.raises(UserError, match="does not exist"):
        read_vocab_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UserError, match="no phrases"):
        read_vocab_file(tmp_path / "empty.txt")
    cats = generic_concepts()
    assert {"objects", "scenes", "colours", "lighting", "viewpoints", "textures"} <= set(cats)
    assert all(len(v) >= 8 for v in cats.values())
    assert compose_pairs(["a dog"], ["in the snow", "at night"]) == ["a dog in the snow", "a dog at night"]
    assert "a photo at night" in generic_singles()


@pytest.fixture(scope="module")
def explained_db(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    db = make_db(folder, n=150, predicted=False)
    diagnose(db, members=4, folds=3, progress=False, fit_split="all")
    return folder, db


def test_default_vocabulary_is_the_dataset_vocab_txt_else_generic(explained_db):
    folder, db = explained_db
    assert default_vocabulary(db) == generic_singles()
    (folder / "vocab.txt").write_text("a blue circle\na red square\n")
    try:
        assert default_vocabulary(db) == ["a blue circle", "a red square"]
    finally:
        (folder / "vocab.txt").unlink()


def test_score_text_matches_the_scorer_and_the_gap_changes_scores(explained_db):
    _, db = explained_db
    phrases = ["a blue circle", "a red square"]
    pred, std = score_text(db, phrases)
    assert pred.shape == std.shape == (2,) and (std >= 0).all()
    sc = Scorer(db)
    np.testing.assert_allclose(sc.score_text(phrases)[0], pred)
    assert not np.allclose(sc.score_text(phrases, correct_gap=False)[0], pred)
    # the default vocabulary's text mean is cached beside the ensemble
    assert list(db.diagnosis_dir.glob("text_mean_*.npy"))


def test_a_phrase_is_scored_by_the_stored_predictions_of_its_nearest_images(explained_db):
    from diagnosis.explain import _read_table, _top_neighbours, score_vocabulary

    _, db = explained_db
    sc, t = Scorer(db), _read_table(db)
    phrases = ["a blue circle", "a red square", "a green triangle"]
    got, T, pred, std = score_vocabulary(sc, phrases, False, table=t, k=7)
    T_raw = sc.encode_text(phrases)
    np.testing.assert_allclose(T, T_raw)
    sims = T_raw @ t.X.T
    for i in range(3):
        near = np.argsort(-sims[i])[:7]
        assert set(_top_neighbours(t.X, T_raw[i : i + 1], 7)[0]) == set(near)
        assert pred[i] == pytest.approx(t.pred[near].mean())
        assert std[i] == pytest.approx(t.std[near].mean())
    # never above the worst stored prediction: no extrapolation off the image manifold
    assert pred.max() <= t.pred.max()
    # the other corrections ask the ensemble itself
    proj = score_vocabulary(sc, phrases, False, correction="projection", table=t, k=7)[2]
    shift = score_vocabulary(sc, phrases, False, correction="shift")[2]
    assert not np.allclose(proj, pred) and not np.allclose(shift, pred)
    with pytest.raises(ValueError, match="correction"):
        score_vocabulary(sc, phrases, False, correction="nope", table=t)


def test_explain_names_the_planted_failure_group(explained_db, tmp_path):
    _, db = explained_db
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(f"a {c} {s}" for c in ("red", "green", "blue")
                               for s in ("circle", "square", "triangle")))
    modes = explain(db, vocab=str(vocab), top=20)
    assert len(modes) < 20  # 9 phrases: near-duplicates fold together
    preds = [m.predicted_loss for m in modes]
    assert preds == sorted(preds, reverse=True)
    table = db.read([S.ID, S.LOSS, "color", S.LABEL]).to_pandas().set_index(S.ID)
    mean_loss = table[S.LOSS].mean()
    for m in modes:
        d = m.to_dict()
        assert {"description", "predicted_loss", "examples", "size", "mean_loss", "mean_predicted_loss",
                "share_of_loss", "phrases", "source"} <= set(d) and "ids" not in d
        assert set(m.examples) <= set(table.index) and len(m.examples) <= 10
        assert m.size == len(m.ids) and set(m.examples) <= set(m.ids)
        assert 0 <= m.share_of_loss <= 1 and m.source in ("words", "images", "both")
        assert m.description in m.phrases
    assert len({m.description for m in modes}) == len(modes)
    # the group discovered from the images is the planted one: blue circles, ~9x the mean loss
    # (random-weight CLIP features blur it, so some neighbours come along)
    found = [m for m in modes if m.source in ("images", "both") and m.mean_loss > 3 * mean_loss]
    assert found
    best = max(found, key=lambda m: m.share_of_loss)
    blue_circle = (table["color"] == "blue") & (table[S.LABEL] == "circle")
    assert blue_circle[best.ids].mean() > 0.5
    assert blue_circle[best.ids].sum() > 0.6 * blue_circle.sum()
    assert best.share_of_loss > 0.5


def test_explain_with_the_generic_vocabulary_composes_pairs(explained_db):
    _, db = explained_db
    modes = explain(db, top=3)
    assert 1 <= len(modes) <= 3
    singles = set(generic_singles())
    # the worst single concepts were composed into object + modifier pairs and scored too
    assert any(p not in singles for m in modes for p in m.phrases)


def test_explain_cli_json_and_bad_input(explained_db, tmp_path, capsys):
    from search_ui.cli import main

    _, db = explained_db
    vocab = tmp_path / "v.txt"
    vocab.write_text("a blue circle\na red square\na green triangle\n")
    assert main(["explain", "--db", str(db.path), "--vocab", str(vocab), "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and 1 <= len(out) <= 2 and {"description", "examples"} <= set(out[0])
    assert main(["explain", "--db", str(db.path), "--vocab", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_content_words_drop_articles_prepositions_and_placeholder_nouns():
    from diagnosis.modes import content_words

    assert content_words("A red object on a dark background") == {"red", "dark", "background"}
    assert content_words("an object on a dark background") <= content_words("a square on a dark background")
    assert content_words("a photo in low light") == {"low", "light"}
    assert content_words("a photo of an object") == frozenset()


def test_modes_specialising_one_failing_broader_phrase_become_one_mode():
    """One failure split by a word the model ignores ("a red / green / large object on a dark
    background") is one mode once the broader phrase itself is predicted to fail; a mode folds once,
    so a second failure (red squares) does not chain into it through "a red object on a dark
    background"; a broader phrase below the failure threshold merges nothing."""
    from diagnosis.modes import generalise

    def mode(description, loss, rows):
        return {"description": description, "predicted_loss": loss, "predicted_loss_std": 0.1,
                "phrases": [description], "rows": set(rows), "source": "words"}

    modes = [mode("a red object on a dark background", 1.5, range(0, 10)),
             mode("a green object on a dark background", 1.2, range(10, 20)),
             mode("a large object on a dark background", 1.0, range(15, 30)),
             mode("a red square", 0.98, range(40, 50)),
             mode("a red object", 0.66, range(45, 55)),
             mode("a blue circle", 0.5, range(60, 70)),
             mode("a blue triangle", 0.45, range(70, 80))]
    phrases = ["an object on a dark background", "a red object", "a blue object", "a square"]
    pred = np.array([0.87, 0.66, 0.30, 0.9])
    out = generalise(modes, phrases, pred, threshold=0.44)

    assert [m["description"] for m in out] == ["a red object on a dark background", "a red square",
                                               "a blue circle", "a blue triangle"]
    dark, red, *_ = out
    assert dark["rows"] == set(range(30)) and dark["predicted_loss"] == 1.5
    assert dark["phrases"][:2] == ["a red object on a dark background", "an object on a dark background"]
    assert {"a green object on a dark background", "a large object on a dark background"} <= set(dark["phrases"])
    assert red["rows"] == set(range(40, 55)) and red["phrases"] == ["a red square", "a red object"]
    # "a square" fails but only one mode specialises it: nothing to merge
    assert generalise([mode("a red square", 1.0, [1]), mode("a blue circle", 0.9, [2])],
                       ["a square"], np.array([2.0]), 0.44)[0]["phrases"] == ["a red square"]
