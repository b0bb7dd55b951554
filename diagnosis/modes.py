"""Failure modes: which phrases name the model's failures (used by :func:`diagnosis.explain.explain`).

A phrase *retrieves* the rows CLIP finds most similar to it. Each row carries an *excess*: its
predicted loss minus ``EXCESS_RATIO`` x the mean, positive where the row fails more than that. The top ``r`` rows of a
phrase gather the sum of their excesses -- its *gain* -- and the best ``r`` is where its retrieval
stops finding failures. Names are chosen by that gain, greedily:

* **Names by what they describe.** The phrase and prefix gathering the most excess loss name the
  first mode. A precise phrase ("a blue circle") gathers the failing rows and nothing else; a vague
  one ("a blue object") gathers them too but pays for every blue square it also retrieves, and a
  too-specific one ("a small blue circle") misses half of them. Of the phrases within
  ``SPECIFIC_TOL`` of the best gain the most specific (most content words) wins.
* **Names true of their rows.** The name must be *faithful* to the failing rows it gathers
  (:data:`FAITHFUL_SHARE` of them show every part of it, :class:`Faithfulness`): a composition
  gathering two failures through rows that match two of its three words is true of neither.
* **One failure, one mode.** The rows a mode's name retrieves stop counting (their excess is set to
  zero) and the next mode is chosen the same way. Fragments of one failure seen through an
  irrelevant word ("a red / green ... triangle on a striped background") each gather a sixth of what
  "a triangle on a striped background" gathers, so the shared name wins and leaves them nothing;
  two different failures are never one name, because no phrase retrieves both without paying for
  everything between them.
* **Compositions.** The ``COMPOSE_TOP`` phrases gathering most are composed with each other
  (:class:`diagnosis.vocab.Grammar`: "a small object" + "a blue circle" -> "a small blue circle",
  "a dog" + "a photo at night" -> "a dog at night") and compete with the rest.

* **Names read off the failures.** Around each chosen name, and in each group of similar failing
  rows wherever they are (:func:`cluster_names`), the values most of the rows show are composed
  into names of up to three parts (:func:`describing_names`): a failure no phrase of the
  vocabulary retrieves on its own ("a small green object on a dark background") still gets its
  conjunction.
* **Failures across modes.** Once modes take their rows, a failure whose rows two of them share
  ("a small yellow object", across "a small star" and "a small triangle") gathers nothing; judged
  on the excess before any row was taken it is proposed again (:func:`_across`), and shown only
  when its images outside those modes fail too.

A name retrieving mostly rows an earlier mode's name retrieved gathers that failure's tail (the
part past the earlier prefix) and is recorded in the earlier mode's ``tails``, not as a mode of
its own. Selection stops when no phrase gathers ``MIN_GAIN_SHARE`` of the table's positive excess. Each mode
comes with ``candidates``: its name and then the other phrases that best gather the same rows, each
with ``phrase`` (index), ``r`` (rows of the selection sample), ``gain``, ``precision`` (share of its
retrieved rows predicted to fail) and ``coverage`` (of the failing rows among its top ``2r``, the
share in its top ``r``: low when the failure reaches past what the name retrieves, as a too
specific name's does). :func:`diagnosis.explain.explain` checks each name
against the data before showing it.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

N_EXAMPLES = 10
SELECT_ROWS = 50000  # phrases are ranked against a sample of this many rows (all rows below it)
GRID_POINTS = 48  # prefix sizes r on a geometric grid
MIN_PREFIX = 10
SPECIFIC_TOL = 0.02  # phrases within this share of the best gain compete on specificity
#: The line a row's predicted loss is measured from (x the mean): a name gathers the rows above it
#: and pays for those below. It is the failure line itself (the 2x a shown name's images must reach,
#: explain.FAIL_RATIO). A lower line (1.5x) also gathered failures just above 2x whose worst rows
#: another mode took, but on the default world it let one composed name ("a blue triangle on a
#: striped background") gather two failures at once, through the rows that match two of its words.
EXCESS_RATIO = 2.0
COMPOSE_TOP = 40  # phrases gathering the most excess loss, composed with each other
N_CANDIDATES = 6  # names per group checked against the data, best first
TAIL_SHARE = 0.5  # a name retrieving more than this share of an earlier one's rows is its tail
MIN_GAIN_SHARE = 0.01  # a mode gathers at least this share of all excess predicted loss
#: A name is *faithful* when it is true of most of the failing rows it gathers: at least this
#: share of them show every one of its parts ("blue", "triangle", "on a striped background"): for
#: each part CLIP prefers the name to every phrase saying another value in that part's place. A
#: composed name can gather two failures at once through rows matching two of its three words ("a
#: blue triangle on a striped background" gathers striped triangles of every colour and blue
#: triangles off stripes); it is false of most of its rows, so the best faithful name is chosen.
FAITHFUL_SHARE = 0.5
FAITH_CANDIDATES = 24  # phrases (by gain) tried for a faithful name before the best is kept anyway
MAX_RIVALS = 16  # rivals per part: the values nearest the part's own when it has more
MIN_FAITH_ROWS = 10
#: Names read off a failure's own rows (:func:`describing_names`): the single values ("a small
#: object", "a triangle", "an object on a striped background") at least ``PART_SHARE`` of its failing
#: rows show, ``PART_LIFT`` times as often as the table does, composed into names of up to
#: ``MAX_NAME_PARTS`` of them. This reaches conjunctions no phrase of the vocabulary gathers on its
#: own: "a small object" retrieves every small image and pays for all that do not fail, so it is never
#: among the best phrases composed, yet small striped triangles are a failure only it completes.
PART_SHARE = 0.7
PART_LIFT = 1.5
MAX_NAME_PARTS = 3
PART_CANDIDATES = 8  # values per kind tried on a failure's rows: those nearest the rows' mean (a value most of them show is near it)
#: Failing rows per group read for names wherever the failures are (:func:`cluster_names`), and
#: at most this many groups: 16 groups of ~90 rows took 0.5 s and found "a small green object on a
#: dark background" (89 held-out rows at 4.6x) that no phrase near the best names led to.
CLUSTER_ROWS = 40
MAX_CLUSTERS = 16
CLUSTER_PART_CANDIDATES = 3  # values per kind tried on a group's rows (a group is one kind of image: its value is nearest)
#: Failures across the modes found (:func:`_across`): the phrases tried (by gain before any row was
#: taken), at most this many found, each with at least ``ACROSS_SHARE`` of its retrieved rows in
#: the modes found (else the greedy choice judged it whole).
ACROSS_CANDIDATES = 64
MAX_ACROSS = 4
ACROSS_SHARE = 0.2
BASE_ROWS = 4000  # rows of the table sample the values' base rates are read from
_BLOCK_CELLS = 1 << 24

_FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "by",
                             "is", "that", "photo", "picture", "image", "object", "objects", "thing", "things"})


def content_words(phrase: str) -> frozenset[str]:
    """The words that carry a phrase's meaning: "a red object on a dark background" -> {red, dark,
    background}; articles, prepositions and placeholder nouns ("object", "photo") dropped."""
    return frozenset(w for w in re.findall(r"[a-z0-9]+", phrase.lower()) if w not in _FUNCTION_WORDS)


def overlap(a, b) -> float:
    """Overlap coefficient |A n B| / min(|A|, |B|) of two collections of row numbers."""
    a, b = set(a), set(b)
    return len(a & b) / max(1, min(len(a), len(b))) if a and b else 0.0


def rank_rows(X: np.ndarray, T: np.ndarray, r_max: int, cuts: np.ndarray | None = None) -> np.ndarray:
    """(m, r_max) int32: for each phrase, the rows of X most cosine-similar to it, most similar first;
    with ``cuts`` (prefix sizes) only as far as they are read: for each ``r`` in ``cuts`` the first
    ``r`` rows are the ``r`` most similar, in no order between two cuts. :func:`find_modes` reads
    prefixes at its grid and twice it only, and partitioning there instead of sorting took 1.8 s
    instead of 3.1 s for 1,150 phrases with ``r_max`` 20,000 of 50,000 rows."""
    n = len(X)
    r_max = max(1, min(int(r_max), n))
    out = np.empty((len(T), r_max), dtype=np.int32)
    step = max(1, _BLOCK_CELLS // max(1, n))
    kth = None if cuts is None else np.unique(np.clip(np.asarray(cuts, dtype=np.int64), 1, r_max)) - 1
    for s in range(0, len(T), step):
        sims = T[s : s + step] @ X.T
        if kth is not None:
            out[s : s + step] = np.argpartition(-sims, kth, axis=1)[:, :r_max]
            continue
        part = np.argpartition(-sims, r_max - 1, axis=1)[:, :r_max] if r_max < n else \
            np.broadcast_to(np.arange(n), sims.shape)
        o = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[s : s + step] = np.take_along_axis(part, o, axis=1)
    return out


def prefix_grid(r_max: int) -> np.ndarray:
    """Prefix sizes ``r`` at which a phrase's retrieval is judged: geometric from 10 to ``r_max``."""
    lo = min(MIN_PREFIX, r_max)
    return np.unique(np.geomspace(lo, r_max, GRID_POINTS).round().astype(np.int64))


def find_modes(X: np.ndarray, pred: np.ndarray, threshold: float, phrases: list[str], T: np.ndarray,
               encode: Callable[[list[str]], np.ndarray] | None = None, grammar=None, max_modes: int = 30,
               seed: int = 0, words: Faithfulness | None = None) -> tuple[list[dict], list[str], np.ndarray, np.ndarray]:
    """Name the failures of a table (see the module doc).

    ``pred``: (n,) predicted loss; ``threshold``: the predicted loss a row fails from (at least
    ``FAIL_RATIO`` x the mean); ``phrases`` / ``T`` (m, d): the vocabulary and its L2-normalised
    CLIP text embeddings; ``encode`` + ``grammar``: compose and encode new phrases, and judge names
    faithful (both skipped when None); ``words``: the :class:`Faithfulness` to judge with (its
    cache of rivals' embeddings kept for the caller; made here when None). Returns (modes, phrases, T, sample) where phrases / T include the compositions and
    ``sample`` holds the row numbers the phrases were ranked against (every row when the table has
    at most ``SELECT_ROWS``); a mode's ``r`` counts rows of that sample.
    """
    from diagnosis.vocab import compose_phrases

    n = len(X)
    rng = np.random.default_rng(seed)
    sample = np.arange(n) if n <= SELECT_ROWS else np.sort(rng.choice(n, SELECT_ROWS, replace=False))
    if not phrases or n == 0:
        return [], list(phrases), T, sample
    Xs, ps = X[sample], pred[sample]
    fail = ps >= threshold
    excess = ps - EXCESS_RATIO * float(pred.mean())  # > 0: worth gathering; < 0: a cost
    r_max = int(min(len(sample), max(4 * int(fail.sum()), 200)))
    grid = prefix_grid(r_max)
    cuts = np.concatenate([grid, 2 * grid])  # the prefixes read: each grid size, and twice it (coverage)
    phrases = list(phrases)
    order = rank_rows(Xs, T, r_max, cuts)
    if encode is not None and grammar is not None:
        gain = gains(order, grid, excess).max(axis=1)
        top = [phrases[j] for j in np.argsort(-gain, kind="stable")[:COMPOSE_TOP] if gain[j] > 0]
        new = compose_phrases(top, grammar, existing=phrases)
        if new:
            T2 = encode(new)
            phrases, T, order = phrases + new, np.vstack([T, T2]), np.vstack([order, rank_rows(Xs, T2, r_max, cuts)])
            log.info("explain: %d compositions of the %d best phrases scored", len(new), len(top))
    spec = np.array([len(content_words(p)) for p in phrases])

    left = excess.copy()
    stop = MIN_GAIN_SHARE * float(np.clip(excess, 0, None).sum())
    if encode is None or grammar is None:
        words = None
    elif words is None:
        words = Faithfulness(grammar, encode, phrases, T)
    else:
        words.remember(phrases, T)  # the compositions
    faithful_at: dict[int, np.ndarray] = {}

    def allowed(c: int) -> np.ndarray:
        """(len(grid),) bool: the prefixes of phrase c's ranking whose failing rows it is true of."""
        if c not in faithful_at:
            if words is None:
                faithful_at[c] = np.ones(len(grid), dtype=bool)
            else:
                rows = order[c]
                f = fail[rows]
                n_fail = np.cumsum(f)[grid - 1]
                n_show = np.cumsum(f & words.shows(phrases[c], Xs[rows]))[grid - 1]
                faithful_at[c] = (n_fail < MIN_FAITH_ROWS) | (n_show >= FAITHFUL_SHARE * n_fail)
        return faithful_at[c]

    refined: set[int] = set()  # phrases whose failing rows were already read for names (describing_names)
    base_share: dict[str, float] = {}
    base = Xs[np.sort(rng.choice(len(Xs), BASE_ROWS, replace=False))] if len(Xs) > BASE_ROWS else Xs
    clustered = words is None  # whether the failing rows no mode took were read for names

    def add_read_names(names: list[str]) -> list[str]:
        """Add the names read off failing rows (those not already phrases) to the running, encoded
        and ranked; they are never read for names again themselves. Returns the ones added."""
        nonlocal phrases, T, order, spec
        known = {q.lower() for q in phrases}
        new = [p for p in names if p.lower() not in known]
        if new:
            T2 = encode(new)
            refined.update(range(len(phrases), len(phrases) + len(new)))
            phrases, T, order = phrases + new, np.vstack([T, T2]), np.vstack([order, rank_rows(Xs, T2, r_max, cuts)])
            spec = np.concatenate([spec, [len(content_words(p)) for p in new]])
            words.remember(new, T2)
        return new

    modes = []
    while len(modes) < max_modes:
        J = gains(order, grid, left)
        if not modes:  # no row taken yet: the gains before any was (what _across judges by)
            J0 = J
        per_phrase = J.max(axis=1)
        best = float(per_phrase.max())
        if best <= max(stop, 0.0) and not clustered:
            # names read off each group of the failing rows no mode took, wherever they are: a
            # failure no good phrase retrieves (the vocabulary has no word for it alone) still
            # gets its own conjunction, and competes with the rest
            clustered = True
            rest = fail & (left > 0)
            new = add_read_names(cluster_names(Xs, rest, base, words, base_share, seed))
            if new:
                log.info("explain: %d names read off %d groups of the failing rows no mode took (%s, ...)", len(new),
                         n_clusters(int(rest.sum())), new[0])
                continue
        if best <= max(stop, 0.0):
            break
        # the best *faithful* gain: each phrase's prefixes restricted to those it is true of, tried
        # in order of unrestricted gain until no later phrase can come within SPECIFIC_TOL of it
        tried = []  # (phrase, faithful gain, grid index)
        for c in np.argsort(-per_phrase, kind="stable")[:FAITH_CANDIDATES]:
            top = max((g for _, g, _ in tried), default=-np.inf)
            if per_phrase[c] <= max(stop, 0.0) or per_phrase[c] < (1 - SPECIFIC_TOL) * top:
                break
            g = np.where(allowed(int(c)), J[c], -np.inf)
            tried.append((int(c), float(g.max()), int(np.argmax(g))))
        top = max((g for _, g, _ in tried), default=-np.inf)
        if top <= max(stop, 0.0):
            if words is None or not tried:
                break
            c = int(np.argmax(per_phrase))  # nothing faithful gathers enough: keep the best, said in the log
            tried, top = [(c, float(per_phrase[c]), int(np.argmax(J[c])))], float(per_phrase[c])
            log.info("explain: no faithful name among the %d best for a failure; keeping %r", FAITH_CANDIDATES,
                     phrases[c])
        near = [x for x in tried if x[1] >= (1 - SPECIFIC_TOL) * top]
        j, _, gj = max(near, key=lambda x: (spec[x[0]], x[1]))
        got = order[j, : grid[gj]]
        if words is not None and j not in refined:
            # what the failing rows around the best name say themselves: names it could not reach
            refined.add(j)
            around = order[j, : min(2 * int(grid[gj]), order.shape[1])]
            new = add_read_names(describing_names(Xs[around[fail[around] & (left[around] > 0)]], base, words, base_share))
            if new:
                log.info("explain: %d names read off a failure's rows (%s, ...)", len(new), new[0])
                continue  # choose again, the new names competing
        # other names for the same failing rows: the excess they gather from these rows alone
        mine = np.where(left > 0, 0.0, left)
        mine[got] = left[got]
        Jm = gains(order, grid, mine)
        alt = [int(a) for a in np.argsort(-Jm.max(axis=1), kind="stable")[:N_CANDIDATES + 1] if a != j]
        cands = []
        for c in [j, *alt][:N_CANDIDATES]:
            g = J[j] if c == j else np.where(allowed(c), Jm[c], -np.inf)
            gi = gj if c == j else int(np.argmax(g))
            if not np.isfinite(g[gi]):
                continue
            r = int(grid[gi])
            hit = fail[order[c, : 2 * r]]  # (the top 2r rows, or all r_max when fewer)
            cands.append({"phrase": c, "r": r, "gain": float(g[gi]),
                          "precision": float(hit[:r].mean()), "coverage": float(hit[:r].sum() / max(hit.sum(), 1))})
        left[got] = 0.0
        # a name retrieving mostly rows an earlier name already retrieved gathers that failure's
        # leftovers (its tail past the earlier name's prefix): the same failure, not a new one
        prior = [np.isin(got, m["retrieved"]).mean() for m in modes]
        if prior and max(prior) > TAIL_SHARE:
            m = modes[int(np.argmax(prior))]
            m["tails"].append({"phrase": j, "r": cands[0]["r"]})
            continue
        modes.append({"candidates": cands, "retrieved": got, "tails": []})
    if words is not None and modes:
        if len(J0) < len(order):  # phrases added after the first mode was chosen
            J0 = np.vstack([J0, gains(order[len(J0):], grid, excess)])
        modes += _across(modes, order, grid, J0, fail, allowed, phrases, stop)
    return modes, phrases, T, sample


def _across(modes: list[dict], order: np.ndarray, grid: np.ndarray, J0: np.ndarray, fail: np.ndarray,
            allowed: Callable[[int], np.ndarray], phrases: list[str], floor: float) -> list[dict]:
    """Failures that cut across the modes found: a name whose rows two or more modes took, none of
    them most of its rows ("a small yellow object" on a colour task, whose stars and triangles
    "a small star" and "a small triangle" took), gathers nothing once they are taken, yet is a
    failure of its own when its other rows fail too (checked on true loss by
    :func:`diagnosis.explain.name_modes`). Candidates are judged on the excess before anything was
    taken: faithful names gathering at least ``floor`` (what a mode must gather), whose retrieved rows
    are at most ``TAIL_SHARE`` in any one mode (else a tail or fragment of it) and at least
    ``ACROSS_SHARE`` in the modes together (else the greedy choice judged them whole); each one found
    counts as a mode for the next. Marked ``across``: their members may be other modes' members too.
    ``J0``: :func:`gains` of every phrase on the excess before any row was taken."""
    held = np.zeros((len(modes) + MAX_ACROSS, len(fail)), dtype=bool)  # the rows each mode (and each found) retrieved
    for i, m in enumerate(modes):
        held[i, m["retrieved"]] = True

    def shares(got: np.ndarray, k: int) -> tuple[float, float]:
        """The largest share of ``got`` one of the first ``k`` modes holds, and the share they hold together."""
        h = held[:k, got]
        return float(h.mean(axis=1).max()), float(h.any(axis=0).mean())

    best = J0.max(axis=1)
    found: list[dict] = []
    for c in np.argsort(-best, kind="stable")[:ACROSS_CANDIDATES]:
        if best[c] < max(floor, 0.0) or len(found) >= MAX_ACROSS:
            break
        k = len(modes) + len(found)
        if shares(order[c, : grid[int(np.argmax(J0[c]))]], k)[0] > TAIL_SHARE:
            continue  # its best rows are one mode's: a fragment of it (checked before the costlier faithfulness)
        g = np.where(allowed(int(c)), J0[c], -np.inf)
        gi = int(np.argmax(g))
        if not np.isfinite(g[gi]) or g[gi] < floor:
            continue
        got = order[c, : grid[gi]]
        one, together = shares(got, k)
        if one > TAIL_SHARE or together < ACROSS_SHARE:
            continue
        held[k, got] = True
        r = int(grid[gi])
        hit = fail[order[c, : 2 * r]]
        log.info("explain: %r cuts across the modes found (at most %.0f%% of its rows in one, %.0f%% in all)",
                 phrases[c], 100 * one, 100 * together)
        found.append({"candidates": [{"phrase": int(c), "r": r, "gain": float(g[gi]), "precision": float(hit[:r].mean()),
                                      "coverage": float(hit[:r].sum() / max(hit.sum(), 1))}],
                      "retrieved": got, "tails": [], "across": True})
    return found


def n_clusters(n_failing: int) -> int:
    """How many groups :func:`cluster_names` splits ``n_failing`` failing rows into."""
    return int(min(MAX_CLUSTERS, n_failing // CLUSTER_ROWS))


def cluster_names(Xs: np.ndarray, failing: np.ndarray, base: np.ndarray, words: Faithfulness,
                  base_share: dict[str, float] | None = None, seed: int = 0) -> list[str]:
    """Names read off the failing rows (``failing``, (n,) bool over ``Xs``) group by group: the
    rows split by spherical k-means into :func:`n_clusters` groups of similar images, and
    :func:`describing_names` of each group of at least ``MIN_FAITH_ROWS``, the groups in order of
    size. One group per :data:`CLUSTER_ROWS` failing rows, at most :data:`MAX_CLUSTERS`; none
    below two groups' worth (the names around the best phrase cover a single failure)."""
    import faiss

    rows = np.flatnonzero(failing)
    k = n_clusters(len(rows))
    if k < 2:
        return []
    Xf = np.ascontiguousarray(Xs[rows], dtype=np.float32)
    km = faiss.Kmeans(Xf.shape[1], k, niter=20, seed=int(seed) + 1, spherical=True, verbose=False,
                      max_points_per_centroid=256)
    km.train(Xf)
    _, label = km.index.search(Xf, 1)
    label = label[:, 0]
    out: list[str] = []
    for c in np.argsort(-np.bincount(label, minlength=k), kind="stable"):
        for p in describing_names(Xf[label == c], base, words, base_share, CLUSTER_PART_CANDIDATES):
            if p not in out:
                out.append(p)
    return out


def describing_names(Xf: np.ndarray, base: np.ndarray, words: Faithfulness,
                     base_share: dict[str, float] | None = None, candidates: int = PART_CANDIDATES) -> list[str]:
    """Names of up to ``MAX_NAME_PARTS`` values that are true of failing rows ``Xf`` ((f, d)) and set
    them apart from ``base`` ((b, d), a sample of the table): each value (``grammar.single_parts``,
    the ``PART_CANDIDATES`` of each kind nearest the rows' mean) that at least ``PART_SHARE`` of the
    rows show (:meth:`Faithfulness.shows`), at least ``PART_LIFT`` times the share of ``base`` that
    does; then every composition of one to ``MAX_NAME_PARTS`` of the four most set apart, most set
    apart first. Empty when fewer than ``MIN_FAITH_ROWS`` rows or no value qualifies. ``base_share``:
    a cache of each value's share of ``base``, kept by the caller across failures."""
    base_share = {} if base_share is None else base_share
    if len(Xf) < MIN_FAITH_ROWS or words.encode is None:
        return []
    grammar = words.grammar
    centre = Xf.mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    found = []  # (lift, kind, phrase)
    by_kind: dict[str, list[str]] = {}
    for kind, phrase in grammar.single_parts():
        by_kind.setdefault(kind, []).append(phrase)
    for kind, singles in by_kind.items():
        if len(singles) > candidates:
            near = np.argsort(-(words.vectors(singles) @ centre), kind="stable")[:candidates]
            singles = [singles[i] for i in sorted(near)]
        for p in singles:
            share = float(words.shows(p, Xf).mean())
            if share < PART_SHARE:
                continue
            if p not in base_share:
                base_share[p] = float(words.shows(p, base).mean())
            lift = share / max(base_share[p], 1.0 / len(base))
            if lift >= PART_LIFT:
                found.append((lift, kind, p))
    found = [p for _, _, p in sorted(found, key=lambda x: -x[0])[:4]]
    out = []
    for k in range(1, MAX_NAME_PARTS + 1):
        for combo in itertools.combinations(found, k):
            name = combo[0]
            for p in combo[1:]:
                name = grammar.compose(name, p) if name is not None else None
            if name is not None and grammar.n_parts(name) == k and name not in out:
                out.append(name)
    return out


class Faithfulness:
    """Which rows show a name, and whether a name is true of the rows it gathers (see
    :data:`FAITHFUL_SHARE`).

    ``grammar`` (:class:`diagnosis.vocab.Grammar`) gives each part's rivals, ``encode`` their text
    embeddings (cached, seeded with the vocabulary's own ``T``)."""

    def __init__(self, grammar, encode: Callable[[list[str]], np.ndarray] | None, phrases: list[str],
                 T: np.ndarray | None):
        self.grammar, self.encode = grammar, encode
        self.cache: dict[str, np.ndarray] = {}
        self._parts_of: dict[str, list] = {}  # phrase -> its parts and rivals, when they can no longer change
        if T is not None:
            self.remember(phrases, T)

    def remember(self, phrases: list[str], T: np.ndarray) -> None:
        """Phrases whose embeddings (rows of ``T``) are known, so they are never encoded again."""
        self.cache.update((p.lower(), T[i]) for i, p in enumerate(phrases))

    def vectors(self, phrases: list[str]) -> np.ndarray:
        new = [p for p in dict.fromkeys(phrases) if p.lower() not in self.cache]
        if new:
            for p, v in zip(new, self.encode(new), strict=True):
                self.cache[p.lower()] = v
        return np.stack([self.cache[p.lower()] for p in phrases])

    def _parts(self, phrase: str) -> list[tuple[list[tuple[str, str]], bool]]:
        """Each part of ``phrase``: (the rivals it is tested against, whether all of its rivals
        could be: without an encoder only phrases already encoded can). With an encoder the answer
        cannot change, so it is kept: a name is tested on many row sets (its rows, the table's base
        rates, each failure's rows), and choosing the nearest of ~1,000 rival nouns costs ~10 ms."""
        if phrase in self._parts_of:
            return self._parts_of[phrase]
        out = []
        for _, own, rivals in self.grammar.parts(phrase):
            n_all = len(rivals)
            if self.encode is None:  # only phrases already encoded can be rivals
                rivals = [r for r in rivals if r[0].lower() in self.cache and r[1].lower() in self.cache]
            complete = bool(rivals) and len(rivals) == n_all
            if len(rivals) > MAX_RIVALS:  # the values nearest this part's own ("a cat" for "a dog")
                if self.encode is None and own.lower() not in self.cache:
                    rivals = rivals[:MAX_RIVALS]
                else:
                    V = self.vectors([v for v, _ in rivals])
                    near = np.argsort(-(V @ self.vectors([own])[0]), kind="stable")[:MAX_RIVALS]
                    rivals = [rivals[i] for i in sorted(near)]
            out.append((rivals, complete))
        if self.encode is not None:
            self._parts_of[phrase] = out
        return out

    def tested(self, phrase: str) -> bool:
        """Whether :meth:`shows` tests every part of ``phrase`` against all its rivals (without an
        encoder, only vocabulary phrases can be rivals); where one is missing, the rows that show
        the phrase are more than it describes."""
        parts = self._parts(phrase)
        return bool(parts) and all(complete for _, complete in parts)

    def shows(self, phrase: str, X: np.ndarray, block: int = 65536) -> np.ndarray:
        """(n,) bool: the rows of X that show every part of ``phrase`` -- for each part CLIP prefers
        ``phrase`` to each of its rivals (at most :data:`MAX_RIVALS`, those whose value is nearest
        the part's: "a cat" for "a dog"; only the chosen rivals are encoded):
        the group the phrase describes, with no prefix size to choose."""
        q = self.vectors([phrase])[0]
        out = np.ones(len(X), dtype=bool)
        for rivals, _ in self._parts(phrase):
            if not rivals:
                continue
            R = self.vectors([r for _, r in rivals])
            for s in range(0, len(X), block):
                x = X[s : s + block]
                out[s : s + block] &= x @ q > (x @ R.T).max(axis=1)
        return out


def gains(order: np.ndarray, grid: np.ndarray, excess: np.ndarray) -> np.ndarray:
    """(m, len(grid)): the excess predicted loss each phrase's top ``grid[g]`` rows gather."""
    out = np.empty((len(order), len(grid)), dtype=np.float64)
    step = max(1, _BLOCK_CELLS // max(1, order.shape[1]))
    for s in range(0, len(order), step):
        out[s : s + step] = np.cumsum(excess[order[s : s + step]], axis=1)[:, grid - 1]
    return out
