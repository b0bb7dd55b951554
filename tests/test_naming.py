"""Naming failure modes (issue 13): on a synthetic CLIP space where each attribute word is a
direction, an image is the sum of its attributes' directions (plus noise) and a phrase the sum of
its words', so the right name of every failure is known."""

import itertools
import json

import numpy as np
import pytest

from diagnosis.explain import FailureMode, _Table, name_modes
from diagnosis.vocab import Grammar, compose_phrases, dataset_phrases, real_vocabulary, with_article

ATTR = {"shape": ["circle", "square", "triangle", "star", "cross"],
        "color": ["red", "green", "blue", "yellow", "purple", "orange"],
        "size": ["small", "large"], "background": ["dark", "light", "striped", "noisy"]}
WORDS = [v for vals in ATTR.values() for v in vals]


def describe(where: dict) -> str:
    words = [where[a] for a in ("size", "color") if a in where] + [where.get("shape", "object")]
    text = with_article(" ".join(words))
    return text + (f" on a {where['background']} background" if "background" in where else "")


def vocab() -> list[str]:
    """Every attribute value and every pair of attributes, described (as the offline world's)."""
    return [describe(dict(zip(combo, vals, strict=True)))
            for k in (1, 2) for combo in itertools.combinations(ATTR, k)
            for vals in itertools.product(*(ATTR[a] for a in combo))]


class Space:
    def __init__(self, n=8000, d=48, seed=0, noise=0.1):
        self.rng = np.random.default_rng(seed)
        self.D = np.linalg.qr(self.rng.normal(size=(d, d)))[0][:, : len(WORDS)].T
        self.rows = {a: self.rng.choice(vals, n) for a, vals in ATTR.items()}
        self.noise, self.n = noise, n
        self.embed()
        self.loss = self.rng.gamma(2.0, 0.1, n)

    def embed(self):
        """The images' embeddings from their attributes (again, after ``rows`` changed)."""
        X = sum(self.D[[WORDS.index(v) for v in self.rows[a]]] for a in ATTR)
        X = X + self.noise * self.rng.normal(size=X.shape)
        self.X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)

    def where(self, **w) -> np.ndarray:
        return np.all([self.rows[a] == v for a, v in w.items()], axis=0)

    def encode(self, phrases: list[str]) -> np.ndarray:
        out = []
        for p in phrases:
            ws = [w for w in p.split() if w in WORDS]
            v = self.D[[WORDS.index(w) for w in ws]].sum(axis=0) if ws else np.zeros(self.D.shape[1])
            v = v + 0.05 * self.rng.normal(size=len(v))
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)

    def table(self, split=None) -> _Table:
        pred = self.loss * np.exp(self.rng.normal(0, 0.2, self.n))
        return _Table(ids=np.array([f"r{i:05d}" for i in range(self.n)], dtype=object), X=self.X,
                      loss=self.loss, pred=pred, std=np.full(self.n, 0.1), split=split)

    def explain(self, phrases, compose=True, **kw) -> list[FailureMode]:
        return name_modes(self.table(), phrases, self.encode(phrases), self.encode if compose else None, **kw)


def test_the_precise_phrase_beats_the_vague_one_for_the_same_failing_group():
    s = Space()
    blue_circle = s.where(shape="circle", color="blue")
    s.loss[blue_circle] *= 8
    modes = s.explain(["a blue object", "a blue circle", "a circle", "a small blue circle", "a red square",
                       "an object on a dark background"], compose=False)
    assert [m.description for m in modes] == ["a blue circle"]
    m = modes[0]
    assert m.shown and m.evidence["holds"] and m.evidence["true_loss_ratio"] > 3
    assert blue_circle[[int(i[1:]) for i in m.ids]].mean() > 0.9  # its members are blue circles
    assert m.size > 0.8 * blue_circle.sum() * 0.9  # and most of those predicted to fail
    assert "a blue object" not in {x.description for x in s.explain(["a blue object", "a blue circle"],
                                                                       compose=False, show_all=True)}


def test_a_fragmented_failure_is_one_mode_and_two_failures_stay_two():
    """Striped triangles fail whatever their colour: six colour-specific phrases describe fragments,
    "a triangle on a striped background" the whole; blue circles are a second failure."""
    s = Space(seed=1)
    striped = s.where(shape="triangle", background="striped")
    blue_circle = s.where(shape="circle", color="blue")
    s.loss[striped] *= 6
    s.loss[blue_circle] *= 8
    phrases = vocab() + [describe({"color": c, "shape": "triangle", "background": "striped"})
                         for c in ATTR["color"]]
    modes = s.explain(phrases)
    assert {m.description for m in modes} == {"a triangle on a striped background", "a blue circle"}
    by = {m.description: m for m in modes}
    rows = lambda m: np.array([int(i[1:]) for i in m.ids])  # noqa: E731
    assert striped[rows(by["a triangle on a striped background"])].mean() > 0.9
    assert blue_circle[rows(by["a blue circle"])].mean() > 0.9
    assert not set(by["a blue circle"].ids) & set(by["a triangle on a striped background"].ids)
    for m in modes:  # the evidence: its own images fail, and it covers its group
        assert m.evidence["true_loss_ratio"] > 2.5 and m.evidence["coverage"] > 0.7


@pytest.mark.parametrize("seed", [4, 6])
def test_a_composed_name_true_of_neither_of_two_failures_gives_way_to_their_own_names(seed):
    """Striped triangles and blue triangles fail; "a blue triangle on a striped background" gathers
    both (through the rows matching two of its three words) but is true of few of them."""
    s = Space(seed=seed, n=12000)
    s.loss[s.where(shape="triangle", background="striped")] *= 6
    s.loss[s.where(shape="triangle", color="blue")] *= 8
    names = {m.description for m in s.explain(vocab())}
    assert names == {"a triangle on a striped background", "a blue triangle"}


@pytest.mark.parametrize("seed", [4, 6])
def test_fragments_differing_in_one_kind_of_word_fold_into_what_they_share(seed):
    """Blue circles, triangles and stars fail (blue squares and crosses do not): one failure of blue
    objects seen through shape words, named "a blue object"; small crosses are another, kept apart
    (no "a small blue cross" gathering both)."""
    s = Space(seed=seed, n=12000)
    for shape, factor in (("circle", 8), ("triangle", 8), ("star", 6)):
        s.loss[s.where(shape=shape, color="blue")] *= factor
    s.loss[s.where(shape="cross", size="small")] *= 6
    modes = s.explain(vocab())
    assert [m.description for m in modes] == ["a blue object", "a small cross"]
    rows = np.array([int(i[1:]) for i in modes[0].ids])
    assert s.where(color="blue")[rows].mean() > 0.9


@pytest.mark.parametrize("seed", [4, 5])
def test_a_spurious_correlation_is_named_by_its_shared_word_judged_on_held_out_rows(seed):
    """The offline world's correlation slice: in the training split blue objects are nearly all
    squares, and a model that learned "blue -> square" fails on held-out blue circles, triangles
    and stars. Over the whole table blue rows are mostly those squares, which do not fail, so only
    the shape-specific fragments gather loss; they fold into "a blue object" because the held-out
    rows that show it fail (and "a triangle", shared with the striped triangles' failure, does not
    fold two failures)."""
    s = Space(seed=seed, n=16000)
    split = np.where(np.arange(s.n) < 0.8 * s.n, "train", "test").astype(object)
    train, test = split == "train", split == "test"
    blue_train = np.flatnonzero(s.where(color="blue") & train)
    s.rows["shape"][blue_train[s.rng.random(len(blue_train)) < 0.95]] = "square"
    s.embed()
    for shape, factor in (("circle", 8), ("triangle", 10), ("star", 6)):
        s.loss[s.where(shape=shape, color="blue") & test] *= factor
    s.loss[s.where(shape="triangle", background="striped")] *= 6
    modes = name_modes(s.table(split), vocab(), s.encode(vocab()), s.encode)
    names = [m.description for m in modes]
    assert set(names) == {"a blue object", "a triangle on a striped background"}
    blue = modes[names.index("a blue object")]
    assert blue.evidence["rows"] == "held-out rows that show the name" and blue.evidence["true_loss_ratio"] >= 2
    rows = np.array([int(i[1:]) for i in blue.ids])
    assert s.where(color="blue")[rows].mean() > 0.9


def test_three_attribute_failure_is_named_by_a_composition():
    s = Space(seed=2)
    s.loss[s.where(shape="star", size="small", background="dark")] *= 10
    modes = s.explain(vocab())
    assert modes[0].description == "a small star on a dark background"  # composed, not in vocab()
    assert "a small star on a dark background" not in vocab()


def test_a_group_below_20_samples_is_hidden_unless_all_is_asked():
    s = Space(seed=3)
    rare = np.flatnonzero(s.where(shape="cross", color="green", size="large", background="noisy"))[:15]
    s.loss[rare] *= 15
    phrases = vocab() + ["a large green cross on a noisy background"]
    assert s.explain(phrases, compose=False) == []
    hidden = s.explain(phrases, compose=False, show_all=True)
    assert hidden and not any(m.shown for m in hidden)
    m = next(m for m in hidden if "cross" in m.description)
    assert m.size < 20 and "fewer than 20" in m.evidence["reason"]
    assert "[hidden: " in m.summary()


def test_evidence_fields_and_the_cli_json(monkeypatch, capsys, tmp_path):
    import diagnosis.explain
    from search_ui.cli import main

    s = Space(seed=4)
    s.loss[s.where(shape="circle", color="blue")] *= 8
    s.loss[np.flatnonzero(s.where(shape="cross", color="green", size="large"))[:12]] *= 20
    modes = s.explain(vocab() + ["a large green cross"], compose=False, show_all=True)
    monkeypatch.setattr(diagnosis.explain, "explain",
                        lambda db, vocab=None, top=10, show_all=False:
                        diagnosis.explain.Modes(m for m in modes if show_all or m.shown))
    assert main(["explain", "--db", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [m["description"] for m in shown] == ["a blue circle"]
    ev = shown[0]["evidence"]
    assert {"retrieved", "retrieved_examples", "true_loss", "true_loss_ci", "true_loss_ratio", "predicted_loss",
            "predicted_loss_ci", "predicted_loss_ratio", "coverage", "precision", "holds", "reason"} <= set(ev)
    assert ev["true_loss_ci"][0] <= ev["true_loss"] <= ev["true_loss_ci"][1]
    assert ev["predicted_loss_ci"][0] <= ev["predicted_loss"] <= ev["predicted_loss_ci"][1]
    assert 0 < ev["coverage"] <= 1 and 0 < ev["precision"] <= 1 and ev["holds"] and ev["reason"] is None
    assert len(ev["retrieved_examples"]) == 10 and ev["retrieved"] >= 10
    assert shown[0]["shown"] is True and shown[0]["size"] >= 20
    assert main(["explain", "--db", str(tmp_path), "--json", "--all"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert len(every) > 1 and all(not m["shown"] and m["evidence"]["reason"] for m in every[1:])
    assert main(["explain", "--db", str(tmp_path), "--all"]) == 0
    text = capsys.readouterr().out
    assert "evidence: the " in text and "[hidden: " in text and "precision" in text


def test_true_loss_evidence_counts_held_out_rows_only():
    s = Space(seed=5)
    split = np.where(np.arange(s.n) % 4 == 0, "test", "train").astype(object)
    blue = s.where(shape="circle", color="blue")
    s.loss[blue & (split == "test")] *= 8  # the model memorised its training rows: low loss there
    t = s.table(split=split)
    t.pred = np.where(blue, 8 * 0.2, 0.2) * np.exp(s.rng.normal(0, 0.1, s.n))
    modes = name_modes(t, vocab(), s.encode(vocab()), None)
    assert modes[0].description == "a blue circle"
    ev = modes[0].evidence
    assert ev["true_rows"] < 0.35 * ev["retrieved"]  # a quarter of the rows are held out
    assert ev["true_loss_ratio"] > 3  # on all rows it would be diluted by the training rows


@pytest.mark.parametrize(("a", "b", "out"), [
    ("a blue circle", "an object on a dark background", "a blue circle on a dark background"),
    ("a small object", "a blue circle", "a small blue circle"),
    ("an orange object", "a small object", "a small orange object"),
    ("a red object", "a blue object", None),
    ("a circle", "a square", None),
    ("a circle on a dark background", "an object on a noisy background", None),
])
def test_world_phrases_compose_by_the_vocabulary_s_own_grammar(a, b, out):
    assert Grammar(vocab()).compose(a, b) == out


def test_generic_phrases_compose_object_and_modifier():
    from diagnosis.vocab import generic_singles

    g = Grammar(generic_singles())
    assert g.compose("a dog", "a photo in the snow") == "a dog in the snow"
    assert g.compose("grass", "a photo at night") == "grass at night"
    assert g.compose("a photo that is red", "a photo that is blue") is None
    assert g.compose("a dog", "a cat") is None
    assert compose_phrases(["a dog", "a photo at night", "a cat"], g) == ["a dog at night", "a cat at night"]


class _StubDB:
    """Just what dataset_phrases reads: a table schema and columns."""

    def __init__(self, table):
        import pyarrow as pa

        self._t = pa.table(table)
        self.table = type("T", (), {"schema": self._t.schema})()

    def has_table(self):
        return True

    def read(self, cols):
        return self._t.select(cols)


def test_a_real_dataset_gets_its_labels_captions_imagenet_and_generic_concepts():
    db = _StubDB({"id": ["1", "2", "3", "4"], "label": ["golden_retriever", "tabby cat", "tabby cat", "7"],
                  "caption": ["a dog on a sofa", "a cat asleep", "a cat asleep", None]})
    found = dataset_phrases(db)
    assert found == {"labels": ["a tabby cat", "a golden retriever"], "captions": ["a cat asleep", "a dog on a sofa"]}
    v = real_vocabulary(db)
    assert v[:4] == ["a tabby cat", "a golden retriever", "a cat asleep", "a dog on a sofa"]
    assert "a tench" in v and "a goldfish" in v  # open_clip's ImageNet class names, offline
    assert "a photo at night" in v and "a dog" in v and len(v) == len(set(v)) > 1000


def test_a_name_untrue_of_its_images_is_hidden_with_the_reason():
    """The check behind a kept fallback: "a blue circle" over images of red squares is hidden."""
    from diagnosis.explain import MIN_SAMPLES, _check_true_of
    from diagnosis.modes import Faithfulness

    s = Space(seed=7)
    phrases = vocab()
    words = Faithfulness(Grammar(phrases), s.encode, phrases, s.encode(phrases))
    ev = {"holds": True, "reason": None}
    _check_true_of(ev, "a blue circle", s.X[s.where(shape="square", color="red")][: 2 * MIN_SAMPLES], words)
    assert ev["holds"] is False and ev["true_of"] < 0.1 and "true of" in ev["reason"]
    ok = {"holds": True, "reason": None}
    _check_true_of(ok, "a blue circle", s.X[s.where(shape="circle", color="blue")][: 2 * MIN_SAMPLES], words)
    assert ok["holds"] and ok["true_of"] > 0.9


def test_a_name_whose_nearest_images_fail_but_not_what_it_describes_is_hidden():
    """Only the yellow triangles nearest the phrase fail (3.5x, 30% of them): the name's retrieved
    images fail, yellow triangles taken whole do not (1.75x < 2x), so "a yellow triangle" is not a
    failure mode; it is listed with the reason under show_all."""
    s = Space(seed=2, n=24000)
    yt = np.flatnonzero(s.where(shape="triangle", color="yellow"))
    phrases = vocab()
    sims = s.X[yt] @ s.encode(["a yellow triangle"])[0]
    near = yt[np.argsort(-sims)[: int(0.3 * len(yt))]]
    s.loss[near] *= 3.5
    ratio = s.loss[yt].mean() / s.loss.mean()
    assert 1.5 < ratio < 2.0
    modes = s.explain(phrases, compose=False, show_all=True)
    by = {m.description: m for m in modes}
    m = by["a yellow triangle"]
    assert not m.shown and m.evidence["true_loss_ratio"] > 2  # its nearest images do fail
    assert m.evidence["described_loss_ratio"] < 2 and "judged images it describes" in m.evidence["reason"]
    assert m.evidence["described_rows"] > 0.8 * len(yt)
    assert not [x for x in modes if x.shown]


#: The vocabulary with every size x colour x shape phrase ("a small yellow triangle").
TRIPLES = vocab() + [describe({"size": z, "color": c, "shape": h})
                     for z in ATTR["size"] for c in ATTR["color"] for h in ATTR["shape"]]


def _forking_world(small_factor: float, tail_share: float, tail_factor: float, seed: int = 6):
    """Yellow triangles all predicted to fail (small ones 3.5x, large ones 2.8x), their true loss
    set per size: large ones 1.5x the base, small ones ``small_factor`` with ``tail_share`` of them
    at ``tail_factor``."""
    s = Space(seed=seed, n=8000)
    base = float(s.loss.mean())
    yt = s.where(shape="triangle", color="yellow")
    small = np.flatnonzero(yt & s.where(size="small"))
    s.loss[yt & s.where(size="large")] = 1.5 * base
    s.loss[small] = small_factor * base
    s.loss[small[: round(tail_share * len(small))]] = tail_factor * base
    t = s.table()
    t.pred = np.where(yt, np.where(s.where(size="small"), 3.5, 2.8) * base, t.pred)
    return s, t, yt, small


def test_a_group_that_does_not_fail_is_not_named_by_the_narrower_name_whose_sample_reaches_2x():
    """"a yellow triangle" gathers rows predicted to fail whose true loss is 1.8x: it is hidden.
    Its narrower names are tried next, each on half the rows or fewer; "a small yellow triangle"
    reaches 2x only through a few rows at 12x (its 95% interval starts well below 2x), so it is
    not shown either: a name found by trying one after another must fail beyond noise."""
    s, t, yt, small = _forking_world(small_factor=1.55, tail_share=0.05, tail_factor=12)
    ratio = s.loss[small].mean() / s.loss.mean()
    assert 2.0 <= ratio < 2.2 and s.loss[yt].mean() / s.loss.mean() < 2
    modes = name_modes(t, TRIPLES, s.encode(TRIPLES), s.encode, show_all=True)
    assert not [m for m in modes if m.shown and "yellow" in m.description]
    hidden = {m.description: m for m in modes if not m.shown}
    assert "below 2x" in hidden["a yellow triangle"].evidence["reason"]
    assert "a small yellow triangle" in hidden["a yellow triangle"].phrases  # tried, and refused


def test_a_real_narrower_failure_is_named_after_its_wider_name_fails():
    """Yellow triangles all predicted to fail, but only those on a dark background (a quarter of
    them) truly do (6x; the rest 0.6x): "a yellow triangle" (under 2x) is hidden, and the narrower
    name tried after it clears 2x far beyond noise, so it is shown."""
    s = Space(seed=7, n=8000)
    base = float(s.loss.mean())
    yt = s.where(shape="triangle", color="yellow")
    dark = yt & s.where(background="dark")
    s.loss[yt] = 0.6 * base * s.rng.gamma(2.0, 0.5, int(yt.sum()))
    s.loss[dark] = 6 * base * s.rng.gamma(2.0, 0.5, int(dark.sum()))
    assert s.loss[yt].mean() / s.loss.mean() < 2
    t = s.table()
    t.pred = np.where(yt, np.where(dark, 3.5, 3.0) * base, t.pred)
    phrases = vocab() + [describe({"color": c, "shape": h, "background": b})
                         for c in ATTR["color"] for h in ATTR["shape"] for b in ATTR["background"]]
    modes = name_modes(t, phrases, s.encode(phrases), s.encode, show_all=True)
    shown = [m for m in modes if m.shown]
    assert [m.description for m in shown] == ["a yellow triangle on a dark background"]
    ev = shown[0].evidence
    assert ev["described_loss_ratio_ci"][0] >= 2 and ev["described_loss_ratio"] > 4


def test_the_rows_a_name_describes_overrule_its_retrieved_rows_on_true_loss():
    """A name's retrieved rows are its nearest images as far as predicted loss reached: they may
    include neighbours that are not what it says. When the judged rows that show the name are
    enough to judge, they decide: "a large purple square" whose squares fail at 3x is shown even
    though its retrieved rows (squares and circles) are below 2x; "a large purple circle", whose
    circles do not fail, stays hidden whatever its retrieved rows."""
    from diagnosis.explain import _check_described, _described_sample, evidence
    from diagnosis.modes import Faithfulness

    s = Space(seed=8)
    base = float(s.loss.mean())
    sq = np.flatnonzero(s.where(shape="square", color="purple", size="large"))
    ci = np.flatnonzero(s.where(shape="circle", color="purple", size="large"))
    s.loss[sq] = 3.0 * base
    s.loss[ci] = 0.5 * base
    t = s.table()
    t.pred[sq], t.pred[ci] = 3 * base, 3 * base  # both predicted to fail
    words = Faithfulness(Grammar(TRIPLES), s.encode, TRIPLES, s.encode(TRIPLES))
    retrieved = np.concatenate([sq, ci])  # half squares, half circles: (3 + 0.5) / 2 < 2x
    for name, shown in (("a large purple square", True), ("a large purple circle", False)):
        ev = evidence(t, retrieved, 100, 0.9, 0.9, 1.0)
        assert not ev["holds"] and "true loss" in ev["reason"]
        _check_described(ev, name, t, _described_sample(t), words)
        assert ev["judged_by"] == "described rows" and ev["described_rows"] >= 0.8 * len(sq)
        assert ev["holds"] is shown and (ev["reason"] is None) is shown
        assert (ev["described_loss_ratio"] >= 2) is shown


def test_a_mode_whose_tails_bring_it_to_20_samples_is_judged_on_them(monkeypatch):
    """A failure's name retrieved too few of its failing rows to be shown alone (12), and its
    tail -- the rest of the same failure, past the name's prefix -- brings it to 20 or more: the
    mode is judged on its whole membership, not hidden for the 12 it started with."""
    import diagnosis.explain as ex

    s = Space(seed=4)
    blue_circle = s.where(shape="circle", color="blue")
    s.loss[blue_circle] *= 8
    t = s.table()
    t.pred = np.where(blue_circle, 8 * float(t.pred.mean()), t.pred)  # every blue circle predicted to fail
    phrases = vocab() + ["a small blue circle"]
    T = s.encode(phrases)
    name, tail = phrases.index("a blue circle"), phrases.index("a small blue circle")

    def one_group(X, pred, threshold, phrases, T, **kw):
        cand = {"phrase": name, "r": 12, "gain": 1.0, "precision": 1.0, "coverage": 0.1}
        return ([{"candidates": [cand], "retrieved": np.arange(12), "tails": [{"phrase": tail, "r": 80}]}],
                phrases, T, np.arange(len(X)))

    monkeypatch.setattr(ex, "find_modes", one_group)
    [m] = name_modes(t, phrases, T, s.encode, show_all=True)
    assert m.description == "a blue circle" and m.size >= 20
    assert blue_circle[[int(i[1:]) for i in m.ids]].all()  # tails of the same failure: blue circles only
    assert m.shown and m.evidence["holds"] and m.evidence["reason"] is None, m.evidence
    assert m.evidence["true_loss_ratio"] > 4  # its images fail: 8x, diluted by nothing but noise


@pytest.mark.parametrize("seed", [0, 3])
def test_a_small_costly_group_outranks_a_large_mildly_failing_one(seed):
    """Green stars (1/30 of the images) fail at ~6.5x the mean loss, small objects on a dark
    background (1/8) at ~2.3x; the rare group's failure is under-predicted, as regressors shrink what
    they saw little of. Green stars cost more of the loss above the mean (~18% against ~16%), and
    come first: modes are ordered by that cost, measured on the true losses of the rows that show
    each name -- ordering by predicted excess over the members put the large group first (issue 26)."""
    s = Space(n=20000, seed=seed, noise=0.15)
    small, large = s.where(shape="star", color="green"), s.where(size="small", background="dark")
    s.loss[small] *= 8
    s.loss[large] *= 2.8
    mean = s.loss.mean()
    pred = s.loss * np.exp(s.rng.normal(0, 0.15, s.n))
    pred[small] = mean + 0.35 * (pred[small] - mean)
    t = _Table(ids=np.array([f"r{i:05d}" for i in range(s.n)], dtype=object), X=s.X, loss=s.loss, pred=pred,
               std=np.full(s.n, 0.1))
    modes = name_modes(t, vocab(), s.encode(vocab()), s.encode, top=5)
    assert [m.description for m in modes] == ["a green star", "a small object on a dark background"]
    truth = [(s.loss[g] - mean).sum() / s.loss.sum() for g in (small, large)]
    assert truth[0] > truth[1]
    for m, true_cost in zip(modes, truth, strict=True):
        # the rows that show the name are (nearly) the group: CLIP-like noise misreads a few
        assert m.cost == pytest.approx(true_cost, abs=0.01) and m.cost_ci[0] <= m.cost <= m.cost_ci[1]
        assert m.cost_basis == "judged rows that show the name"
    impact = [m.size * (m.mean_predicted_loss - 2 * pred.mean()) for m in modes]
    assert impact[0] < impact[1]  # the order by members' predicted excess was the other way round


@pytest.mark.parametrize("seed", [1, 2])
def test_a_three_attribute_group_is_named_by_all_three_parts_read_off_its_rows(seed):
    """Small triangles on a striped background fail (4.5x), red triangles mildly. No phrase of the
    vocabulary joins "small" with "triangle" or "striped", and "a small object" gathers no loss on
    its own (it retrieves every small image), so composing the best phrases never reaches the
    group's name; the values its failing rows show (:func:`diagnosis.modes.describing_names`) do."""
    from diagnosis.modes import Faithfulness, describing_names

    phrases = [p for p in vocab() if not ("small" in p and ("triangle" in p or "striped" in p))]
    s = Space(n=20000, seed=seed, noise=0.15)
    group = s.where(shape="triangle", size="small", background="striped")
    s.loss[group] *= 4.5
    s.loss[s.where(shape="triangle", color="red")] *= 2.5
    modes = s.explain(phrases, top=5)
    assert [m.description for m in modes] == ["a small triangle on a striped background", "a red triangle"]
    rows = np.array([int(i[1:]) for i in modes[0].ids])
    assert group[rows].mean() > 0.9
    # the names read off the group's rows: its three values, alone and composed
    words = Faithfulness(Grammar(phrases), s.encode, phrases, s.encode(phrases))
    names = describing_names(s.X[group][:300], s.X[:4000], words)
    assert "a small triangle on a striped background" in names
    assert all(Grammar(phrases).n_parts(n) <= 3 for n in names)
    assert describing_names(s.X[:300], s.X[:4000], words) == []  # rows of every kind: no value sets them apart


def test_names_are_read_off_each_group_of_failing_rows_wherever_it_is():
    """Two failures at once, small green objects on a dark background and red triangles: no value
    is shown by most of all the failing rows together, so nothing names them as one group; split
    into groups of similar images (:func:`diagnosis.modes.cluster_names`), each group's own values
    name it, with all three parts where it has three (random-26-7: "a small green object on a dark
    background", 4.6x held out, which no phrase near the best names led to)."""
    from diagnosis.modes import CLUSTER_ROWS, Faithfulness, cluster_names, describing_names

    s = Space(n=20000, seed=4, noise=0.15)
    green, red = s.where(size="small", color="green", background="dark"), s.where(shape="triangle", color="red")
    failing = green | red
    words = Faithfulness(Grammar(vocab()), s.encode, vocab(), s.encode(vocab()))
    base = s.X[:4000]
    assert describing_names(s.X[failing], base, words) == []
    names = cluster_names(s.X, failing, base, words)
    assert "a small green object on a dark background" in names and "a red triangle" in names
    assert all(Grammar(vocab()).n_parts(n) <= 3 for n in names)
    few = np.zeros(s.n, dtype=bool)
    few[np.flatnonzero(green)[: 2 * CLUSTER_ROWS - 1]] = True
    assert cluster_names(s.X, few, base, words) == []  # under two groups' worth: left to the names around the best phrase


@pytest.mark.parametrize("seed", [0, 2])
def test_a_failure_across_two_modes_is_named_when_its_other_rows_fail_too(seed, monkeypatch):
    """Small stars and small triangles fail (5x), and so do small yellow objects (6x) -- including
    the yellow stars and triangles the first two modes take. Once those rows are taken, what is left
    of the yellow failure is under-predicted (the ensemble shrinks it), so the greedy choice never
    reaches "a small yellow object"; judged on the excess before any row was taken, and on the true
    loss of its images that are neither stars nor triangles (2.9x), it is a failure of its own
    (:func:`diagnosis.modes._across`; random-26-5's small yellow squares)."""
    import diagnosis.modes as modes_mod

    s = Space(n=20000, seed=seed, noise=0.15)
    stars, triangles = s.where(size="small", shape="star"), s.where(size="small", shape="triangle")
    yellow = s.where(size="small", color="yellow")
    factor = np.ones(s.n)
    factor[stars | triangles] = 5
    factor[yellow] = 6
    s.loss *= factor
    mean = s.loss.mean()
    pred = s.loss * np.exp(s.rng.normal(0, 0.15, s.n))
    rest = yellow & ~stars & ~triangles
    pred[rest] = mean + 0.35 * (pred[rest] - mean)
    assert s.loss[rest].mean() > 2.5 * mean
    t = _Table(ids=np.array([f"r{i:05d}" for i in range(s.n)], dtype=object), X=s.X, loss=s.loss, pred=pred,
               std=np.full(s.n, 0.1))
    modes = name_modes(t, vocab(), s.encode(vocab()), s.encode, top=5)
    assert sorted(m.description for m in modes) == ["a small star", "a small triangle", "a small yellow object"]
    m = next(m for m in modes if m.description == "a small yellow object")
    assert m.evidence["beyond_loss_ratio"] > 2.5 and m.evidence["beyond_rows"] > 300
    assert "judged images that show none of their names have" in m.summary()
    for other in modes:  # members shared with each other mode: at most half of the smaller
        if other is not m:
            shared = len(set(m.ids) & set(other.ids)) / min(len(m.ids), len(other.ids))
            assert shared <= 0.5
    monkeypatch.setattr(modes_mod, "_across", lambda *a, **k: [])
    assert "a small yellow object" not in [m.description for m in name_modes(t, vocab(), s.encode(vocab()), s.encode, top=5)]


def test_a_view_across_two_failures_that_fails_only_through_them_is_not_shown(caplog):
    """Small stars and small triangles fail (5x); small yellow objects are 2.5x the base loss, so
    "a small yellow object" gathers much excess through its stars and triangles and is tried as a
    failure across those two modes; its circles, squares and crosses are ~1.1x the mean: it fails
    only where they do, so it is not a mode, not even a hidden one."""
    import logging

    s = Space(n=20000, seed=5, noise=0.15)
    s.loss[s.where(size="small", shape="star") | s.where(size="small", shape="triangle")] *= 5
    s.loss[s.where(size="small", color="yellow")] *= 2.5
    with caplog.at_level(logging.DEBUG, logger="diagnosis"):
        modes = s.explain(vocab(), top=10, show_all=True)
    assert sorted(m.description for m in modes) == ["a small star", "a small triangle"]
    judged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("'a small yellow object' beyond")]
    assert len(judged) == 1  # tried, and judged on its other rows: ~1.1x the mean true loss
    assert 0.8 < float(judged[0].split(" rows, ")[1].split(" x ")[0]) < 1.5


def test_ranking_partitioned_at_the_prefixes_read_gives_the_sorted_sets_there():
    """find_modes reads each phrase's ranking only at its grid of prefix sizes and twice them, so
    :func:`diagnosis.modes.rank_rows` partitions there instead of sorting: every prefix read holds
    exactly the rows the full sort puts there (ties aside: none in random floats)."""
    from diagnosis.modes import prefix_grid, rank_rows

    rng = np.random.default_rng(0)
    X, T = rng.normal(size=(3000, 16)), rng.normal(size=(7, 16))
    for r_max in (500, 3000):
        grid = prefix_grid(r_max)
        cuts = np.concatenate([grid, 2 * grid])
        full, part = rank_rows(X, T, r_max), rank_rows(X, T, r_max, cuts)
        assert part.shape == full.shape == (7, r_max)
        for r in np.unique(np.minimum(cuts, r_max)):
            assert all(set(full[i, :r]) == set(part[i, :r]) for i in range(7))


def _named_as(s: Space, name: str, r: int, encode: bool = True) -> list[FailureMode]:
    """name_modes on ``s`` with find_modes giving one group, named ``name``, retrieving ``r`` rows."""
    import diagnosis.explain as ex

    phrases = vocab() + [name]
    T = s.encode(phrases)
    j = phrases.index(name)

    def one_group(X, pred, threshold, phrases, T, **kw):
        cand = {"phrase": j, "r": r, "gain": 1.0, "precision": 1.0, "coverage": 0.5}
        return ([{"candidates": [cand], "retrieved": np.arange(r), "tails": []}], phrases, T, np.arange(len(X)))

    real, ex.find_modes = ex.find_modes, one_group
    try:
        return name_modes(s.table(), phrases, T, s.encode if encode else None, show_all=True)
    finally:
        ex.find_modes = real


@pytest.mark.parametrize("seed", [0, 3])
def test_a_name_with_a_wrong_part_is_renamed_from_its_failing_images_before_it_is_hidden(seed):
    """Small triangles on a striped background fail (2.6x). A group named with a wrong part -- "a
    blue triangle on a striped background", colour where the failure is in the size: its blue
    triangles fail only when small, 1.8x as described -- would be hidden; the values its failing
    images show swap the part: "a small triangle on a striped background" (2.5x), and the evidence
    says which name it replaced (issue 26: a size + shape + background group named by colour + shape
    + background and hidden for 1.8x)."""
    s = Space(n=20000, seed=seed, noise=0.15)
    group = s.where(size="small", shape="triangle", background="striped")
    s.loss[group] *= 2.6
    [m] = _named_as(s, "a blue triangle on a striped background", 120)
    assert m.shown and m.description == "a small triangle on a striped background"
    assert m.evidence["renamed_from"] == "a blue triangle on a striped background"
    assert "instead of 'a blue triangle on a striped background'" in m.summary()
    assert m.evidence["described_loss_ratio"] > 2.2
    assert group[[int(i[1:]) for i in m.ids]].mean() > 0.9
    # without an encoder nothing can be read off the images: the wrong name stays, hidden
    [h] = _named_as(s, "a blue triangle on a striped background", 120, encode=False)
    assert not h.shown and h.description == "a blue triangle on a striped background"


@pytest.mark.parametrize("seed", [0, 1])
def test_a_part_that_does_not_set_the_failure_apart_is_dropped(seed):
    """Blue objects on a noisy background fail at every size (8x). A name that says "large" too
    describes images failing no more than the name without it: the part is dropped (random-27-6: "a
    large blue object on a noisy background", 15x, for blue objects on noise of every size, 13x).
    A part that does set the failure apart stays: small triangles on stripes fail 4.5x, triangles on
    stripes of both sizes ~2.7x."""
    s = Space(n=20000, seed=seed, noise=0.15)
    s.loss[s.where(color="blue", background="noisy")] *= 8
    [m] = [m for m in _named_as(s, "a large blue object on a noisy background", 200) if m.shown]
    assert m.description == "a blue object on a noisy background"
    assert m.evidence["true_loss_ratio"] > 5

    s = Space(n=20000, seed=seed, noise=0.15)
    s.loss[s.where(size="small", shape="triangle", background="striped")] *= 4.5
    [m] = [m for m in _named_as(s, "a small triangle on a striped background", 200) if m.shown]
    assert m.description == "a small triangle on a striped background"
