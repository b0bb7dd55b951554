"""Vocabularies of descriptions for ``llm2loss explain``.

Three sources, in order of preference: a file the user names (one phrase per line); a ``vocab.txt``
beside the dataset's manifest (the offline world writes one from its attribute words); else the
generic visual concepts shipped in ``diagnosis/data/generic_concepts.txt`` (objects, scenes, colours,
lighting, viewpoints, textures), which ``explain`` composes into object + modifier pairs.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from indexer.errors import UserError

log = logging.getLogger(__name__)

GENERIC_FILE = Path(__file__).with_name("data") / "generic_concepts.txt"
DATASET_VOCAB = "vocab.txt"
OBJECTS = "objects"


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
