"""Vocabularies of descriptions for ``llm2loss explain``.

Three sources, in order of preference: a file the user names (one phrase per line); a ``vocab.txt``
beside the dataset's manifest (the offline world writes one from its attribute words); else the
generic visual concepts shipped in ``diagnosis/data/generic_concepts.txt`` (objects, scenes, colours,
lighting, viewpoints, textures), which ``explain`` composes into object + modifier pairs.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from indexer.errors import UserError

log = logging.getLogger(__name__)

GENERIC_FILE = Path(__file__).with_name("data") / "generic_concepts.txt"
DATASET_VOCAB = "vocab.txt"
OBJECTS = "objects"
#: Phrases a vocabulary file may hold. Naming failure modes costs about 6 s per 1,000 phrases on two
#: shared CPU cores with the tiny CLIP (1,000: 5.6 s, 5,000: 30 s, 20,000: 116 s; BENCHMARKS.md
#: "issue 25"), so 20,000 phrases take about two minutes and 200,000 would take twenty: refused.
MAX_VOCAB_PHRASES = 20_000


def read_vocab_file(path: str | os.PathLike) -> list[str]:
    """Phrases of a vocabulary file: one per line; blank lines and ``#`` comments skipped, duplicates
    dropped (first kept)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"vocabulary file {p} is a folder; pass a text file with one phrase per line.")
    if not p.is_file():
        raise UserError(f"vocabulary file {p} does not exist; pass a text file with one phrase per line.")
    try:
        raw = p.read_bytes()
        if b"\0" in raw:  # valid UTF-8 but binary (UTF-16 text, an image, a database file)
            at = raw.index(b"\0")
            raise UnicodeDecodeError("utf-8", raw, at, at + 1, "a NUL byte")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"vocabulary file {p} is not UTF-8 text ({e.reason} at byte {e.start}); pass a text "
                        "file with one phrase per line.") from e
    except OSError as e:
        raise UserError(f"vocabulary file {p} cannot be read ({type(e).__name__}: {e.strerror}); pass a "
                        "readable text file.") from e
    phrases = _unique(line.strip() for line in text.splitlines())
    phrases = [s for s in phrases if s and not s.startswith("#")]
    if not phrases:
        raise UserError(f"vocabulary file {p} holds no phrases; write one description per line.")
    if len(phrases) > MAX_VOCAB_PHRASES:
        raise UserError(f"vocabulary file {p} holds {len(phrases):,} phrases, more than the {MAX_VOCAB_PHRASES:,} "
                        "explain accepts (about 6 s per 1,000 on a CPU); keep the descriptions you care about.")
    if len(phrases) >= 1000:
        log.info("naming failure modes with %d phrases of %s: about %d s on two CPU cores", len(phrases), p,
                 round(6 * len(phrases) / 1000))
    return phrases


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))


@lru_cache(maxsize=1)
def generic_concepts() -> dict[str, tuple[str, ...]]:
    """Category -> concepts from the shipped list (``objects`` are noun phrases, the rest modifiers)."""
    cats: dict[str, list[str]] = {}
    current = None
    for line in GENERIC_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            cats[current] = []
        elif current is not None:
            cats[current].append(line)
    return {k: tuple(v) for k, v in cats.items()}


def generic_modifiers() -> list[str]:
    return [m for cat, items in generic_concepts().items() if cat != OBJECTS for m in items]


def generic_singles() -> list[str]:
    """Each object alone ("a dog") and each modifier on its own ("a photo in the snow")."""
    return list(generic_concepts()[OBJECTS]) + [f"a photo {m}" for m in generic_modifiers()]


def compose_pairs(objects: list[str], modifiers: list[str]) -> list[str]:
    """Object x modifier phrases: ``["a dog"] x ["in the snow"] -> ["a dog in the snow"]``."""
    return _unique(f"{o} {m}" for o in objects for m in modifiers)


def dataset_vocabulary(db) -> tuple[list[str], Path] | None:
    """The ``vocab.txt`` beside one of the database's manifests (meta.json ``sources``), if any."""
    for src in db.read_meta().get("sources") or []:
        src = Path(src)
        for folder in (src, src.parent) if src.is_dir() else (src.parent,):
            cand = folder / DATASET_VOCAB
            if cand.is_file():
                return read_vocab_file(cand), cand
    return None


def default_vocabulary(db) -> list[str]:
    """The dataset's own ``vocab.txt`` if its manifest has one, else the generic singles."""
    found = dataset_vocabulary(db)
    if found is not None:
        log.info("vocabulary: %d phrases from %s", len(found[0]), found[1])
        return found[0]
    singles = generic_singles()
    log.info("vocabulary: %d generic concepts (composed into pairs by explain)", len(singles))
    return singles


# ---- the phrases of a real dataset ---------------------------------------------------------------

#: Manifest columns read as captions when present (free text describing each image).
CAPTION_COLUMNS = ("caption", "captions", "text", "description", "title")
MAX_LABELS = 5000
MAX_CAPTIONS = 2000


def with_article(noun: str) -> str:
    """``"orange"`` -> ``"an orange"``; a phrase that already starts with an article is kept."""
    noun = noun.strip()
    first = noun.split(" ", 1)[0].lower()
    if first in _ARTICLES:
        return noun
    return ("an " if first[:1] in "aeiou" else "a ") + noun


def imagenet_classnames() -> list[str]:
    """open_clip's shipped ImageNet-1k class names (offline; empty if this open_clip lacks them)."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    except ImportError:  # pragma: no cover - every supported open_clip ships them
        return []
    return list(IMAGENET_CLASSNAMES)


def _top_strings(values, limit: int) -> list[str]:
    """The distinct non-empty, non-numeric strings of ``values``, most frequent first."""
    from collections import Counter

    counts = Counter(str(v).strip() for v in values if v is not None and str(v).strip())
    out = [s for s, _ in counts.most_common() if not re.fullmatch(r"[-+0-9.eE]+", s)]
    return out[:limit]


def dataset_phrases(db) -> dict[str, list[str]]:
    """``{"labels": [...], "captions": [...]}`` read from the table: its label names (as "a dog")
    and a caption-like text column of the manifest, if it has one (most frequent first)."""
    from indexer import schema as S

    cols = set(db.table.schema.names) if db.has_table() else set()
    out = {"labels": [], "captions": []}
    if S.LABEL in cols:
        labels = db.read([S.LABEL]).column(S.LABEL).to_pylist()
        names = _top_strings(labels, MAX_LABELS)
        out["labels"] = [with_article(n.replace("_", " ")) for n in names]
    for c in CAPTION_COLUMNS:
        if c in cols and str(db.table.schema.field(c).type) in ("string", "large_string"):
            out["captions"] = _top_strings(db.read([c]).column(c).to_pylist(), MAX_CAPTIONS)
            break
    return out


def real_vocabulary(db) -> list[str]:
    """The vocabulary of a dataset without a ``vocab.txt``: its label names, its caption column,
    open_clip's ImageNet class names and the shipped generic concepts (objects alone, modifiers as
    "a photo <modifier>"); ``explain`` composes the best of them into pairs."""
    found = dataset_phrases(db)
    imagenet = [with_article(n) for n in imagenet_classnames()]
    phrases = _unique(found["labels"] + found["captions"] + generic_singles() + imagenet)
    log.info("vocabulary: %d label names, %d captions, %d ImageNet classes and %d generic concepts",
             len(found["labels"]), len(found["captions"]), len(imagenet), len(generic_singles()))
    return phrases


# ---- composing phrases ---------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
#: Head nouns that only carry modifiers: "a blue object", "a photo at night".
PLACEHOLDERS = frozenset({"object", "photo", "picture", "image", "thing"})
#: Words that open a trailing modifier: "a dog | in the snow", "a circle | on a dark background".
_SUFFIX_START = frozenset({"on", "in", "at", "with", "under", "over", "near", "by", "from", "seen", "that",
                           "which", "inside", "behind", "against", "during"})


@dataclass(frozen=True)
class Parsed:
    article: str  # "", "a", "an", "the"
    adjectives: tuple[str, ...]  # known adjectives before the head: ("small", "blue")
    head: str  # "circle", "object", "great white shark"
    suffix: str  # "on a dark background", ""

    @property
    def placeholder(self) -> bool:
        return self.head in PLACEHOLDERS


class Grammar:
    """How the phrases of one vocabulary compose: "a blue circle" + "an object on a dark background"
    -> "a blue circle on a dark background"; "a dog" + "a photo at night" -> "a dog at night".

    Learned from the vocabulary itself, so it holds for any phrase set written that way:
    *adjectives* are the words standing before a placeholder head ("a blue object" -> blue); two
    adjectives may join only if some phrase of the vocabulary joins them ("a small blue object"),
    in that phrase's order; two heads join only if one is a placeholder; two trailing modifiers
    join unless they open with the same word ("on a dark ..." and "on a striped ..." exclude each
    other, as do "that is red" and "that is blue").
    """

    def __init__(self, phrases: list[str]):
        self.adjectives: set[str] = set()
        for p in phrases:
            w = p.lower().split()
            for i, t in enumerate(w):
                if t in PLACEHOLDERS:
                    self.adjectives.update(x for x in w[:i] if x not in _ARTICLES)
                    break
        self.order: dict[tuple[str, str], int] = {}  # (a, b) -> +1 when a goes before b
        self.heads: set[str] = set()  # nouns the vocabulary names ("circle", "dog"), placeholders aside
        self.suffixes: set[str] = set()  # its trailing modifiers ("on a dark background", "at night")
        for p in phrases:
            parsed = self.parse(p)
            adj = parsed.adjectives
            for i, a in enumerate(adj):
                for b in adj[i + 1 :]:
                    self.order[(a, b)], self.order[(b, a)] = 1, -1
            if parsed.head and not parsed.placeholder:
                self.heads.add(parsed.head.lower())
            if parsed.suffix:
                self.suffixes.add(parsed.suffix)

    def parse(self, phrase: str) -> Parsed:
        w = phrase.strip().split()
        article = w[0].lower() if w and w[0].lower() in _ARTICLES else ""
        rest = w[1:] if article else w
        cut = len(rest)
        for i, t in enumerate(rest):
            if t.lower() in PLACEHOLDERS:
                cut = i + 1
                break
            if i > 0 and t.lower() in _SUFFIX_START:
                cut = i
                break
        noun, suffix = rest[:cut], " ".join(rest[cut:])
        adj = []
        while len(noun) > 1 and noun[0].lower() in self.adjectives:
            adj.append(noun.pop(0).lower())
        return Parsed(article, tuple(adj), " ".join(noun), suffix)

    def _adjectives(self, a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...] | None:
        out = list(a)
        for x in b:
            if x in out:
                continue
            if any((y, x) not in self.order for y in out):
                return None
            pos = next((i for i, y in enumerate(out) if self.order[(x, y)] > 0), len(out))
            out.insert(pos, x)
        return tuple(out)

    def render(self, p: Parsed) -> str:
        """The phrase of a parse: ``Parsed("a", ("small",), "star", "")`` -> "a small star"."""
        words = " ".join([*p.adjectives, p.head or "object"])
        text = with_article(words) if p.article or not p.head else words
        return f"{text} {p.suffix}".strip()

    def parts(self, phrase: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """What each part of ``phrase`` says, as ``(part, its own phrase, [(rival value's own phrase,
        rival phrase), ...])``: the rivals say another value in its place -- another adjective of its
        kind (two adjectives are of one kind when no phrase of the vocabulary joins them: "blue" and
        "red", not "blue" and "small"), another head noun, another trailing modifier opening with
        the same word. "a small star" -> ("small", "a small object", [("a large object", "a large
        star")]), ("star", "a star", [("a circle", "a small circle"), ...]). Parts without rivals
        are left out; a value's own phrase ("a circle") lets a caller pick the nearest rivals
        without encoding them all."""
        p = self.parse(phrase)
        alone = lambda adj=(), head="object", suffix="": self.render(Parsed("a", adj, head, suffix))  # noqa: E731
        out = []
        for a in p.adjectives:
            rest = tuple(x for x in p.adjectives if x != a)
            rivals = []
            for b in sorted(self.adjectives):
                if b == a or b in rest or (a, b) in self.order:
                    continue
                adj = self._adjectives(rest, (b,))
                if adj is not None:
                    rivals.append((alone(adj=(b,)), self.render(Parsed(p.article, adj, p.head, p.suffix))))
            if rivals:
                out.append((a, alone(adj=(a,)), rivals))
        if p.head and not p.placeholder:
            rivals = [(alone(head=h), self.render(Parsed(p.article, p.adjectives, h, p.suffix))) for h in sorted(self.heads)
                      if h != p.head.lower()]
            if rivals:
                out.append((p.head, alone(head=p.head), rivals))
        if p.suffix:
            first = p.suffix.split()[0].lower()
            rivals = [(alone(suffix=s), self.render(Parsed(p.article, p.adjectives, p.head, s)))
                      for s in sorted(self.suffixes) if s != p.suffix and s.split()[0].lower() == first]
            if rivals:
                out.append((p.suffix, alone(suffix=p.suffix), rivals))
        return out

    def single_parts(self) -> list[tuple[str, str]]:
        """Every value the vocabulary says, on its own, as (kind, phrase): ("adjective", "a small
        object"), ("head", "a triangle"), ("suffix", "an object on a striped background")."""
        alone = lambda adj=(), head="object", suffix="": self.render(Parsed("a", adj, head, suffix))  # noqa: E731
        return ([("adjective", alone(adj=(a,))) for a in sorted(self.adjectives)]
                + [("head", alone(head=h)) for h in sorted(self.heads)]
                + [("suffix", alone(suffix=x)) for x in sorted(self.suffixes)])

    def n_parts(self, phrase: str) -> int:
        """How many values ``phrase`` says: its adjectives, its head noun unless a placeholder, and
        its trailing modifiers ("a small triangle on a striped background": 3)."""
        p = self.parse(phrase)
        suffix = p.suffix.lower().split()
        return len(p.adjectives) + bool(p.head and not p.placeholder) + \
            sum(1 for i, w in enumerate(suffix) if w in _SUFFIX_START and (i == 0 or suffix[i - 1] not in _SUFFIX_START))

    def extra_parts(self, phrase: str, shared: str) -> list[tuple[str, str]] | None:
        """What ``phrase`` says beyond ``shared``, as (kind, part) pairs -- ``("adjective", "blue")``,
        ``("head", "circle")``, ``("suffix", "on a dark background")`` -- or None when ``phrase``
        does not say everything ``shared`` says."""
        a, s = self.parse(phrase), self.parse(shared)
        if not set(s.adjectives) <= set(a.adjectives):
            return None
        if not s.placeholder and s.head.lower() != a.head.lower():
            return None
        if s.suffix and s.suffix != a.suffix:
            return None
        out = [("adjective", x) for x in a.adjectives if x not in s.adjectives]
        if s.placeholder and a.head and not a.placeholder:
            out.append(("head", a.head.lower()))
        if a.suffix and not s.suffix:
            out.append(("suffix", a.suffix))
        return out

    def rivals(self, x: tuple[str, str], y: tuple[str, str]) -> bool:
        """Whether two parts (as :meth:`extra_parts` gives them) say values of one kind: two heads,
        two adjectives no phrase joins ("blue", "red"), two suffixes opening with the same word."""
        if x[0] != y[0]:
            return False
        if x[0] == "adjective":
            return (x[1], y[1]) not in self.order
        if x[0] == "suffix":
            return x[1].split()[0].lower() == y[1].split()[0].lower()
        return True

    def compose(self, a: str, b: str) -> str | None:
        """The phrase saying both ``a`` and ``b``, or None when they do not compose."""
        pa, pb = self.parse(a), self.parse(b)
        if not pa.head or not pb.head:
            return None
        if pa.placeholder and not pb.placeholder:
            pa, pb = pb, pa
        if not pb.placeholder and pa.head.lower() != pb.head.lower():
            return None
        adj = self._adjectives(pa.adjectives, pb.adjectives)
        if adj is None:
            return None
        if pa.suffix and pb.suffix and pa.suffix != pb.suffix:
            if pa.suffix.split()[0].lower() == pb.suffix.split()[0].lower():
                return None
            suffix = f"{pa.suffix} {pb.suffix}"
        else:
            suffix = pa.suffix or pb.suffix
        head = pa.head
        if pa.placeholder and pb.placeholder and (adj and "object" in (pa.head, pb.head)):
            head = "object"
        words = " ".join([*adj, head])
        article = (pa.article or pb.article) if pa.placeholder else pa.article
        text = with_article(words) if article else words
        out = f"{text} {suffix}".strip()
        return None if out.lower() in (a.lower(), b.lower()) else out


def compose_phrases(phrases: list[str], grammar: Grammar, existing=(), limit: int = 2000) -> list[str]:
    """Every composition of two of ``phrases`` (taken in order, so the best pairs come first) that
    says more than either and is not in ``existing``; at most ``limit``."""
    seen = {p.lower() for p in existing} | {p.lower() for p in phrases}
    out = []
    for i, a in enumerate(phrases):
        for b in phrases[i + 1 :]:
            c = grammar.compose(a, b)
            if c is not None and c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
                if len(out) >= limit:
                    return out
    return out
