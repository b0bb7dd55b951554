"""Phrases in the world's own words: slice descriptions and the vocabulary ``llm2loss explain`` ranks."""

from __future__ import annotations

import itertools
from pathlib import Path

from indexer.world.generate import BG_WORDS, with_articles
from indexer.world.spec import ATTRIBUTES


def describe(where: dict) -> str:
    """``{"shape": "circle", "color": "blue"}`` -> ``"a blue circle"``; canonical word order."""
    words = [where[a] for a in ("size", "color") if a in where]
    words.append(where.get("shape", "object"))
    text = "a " + " ".join(words)
    if "background" in where:
        text += f" on a {BG_WORDS[where['background']][0]} background"
    return with_articles(text)


def vocabulary(extra: list[str] = ()) -> list[str]:
    """Every single attribute value and every pair of attributes, described; plus ``extra``.

    Pairs are where the planted slices live; triples are left out so that a slice's own
    description does not compete with near-copies of itself.
    """
    phrases = []
    attrs = list(ATTRIBUTES)
    for r in (1, 2):
        for combo in itertools.combinations(attrs, r):
            for values in itertools.product(*(ATTRIBUTES[a] for a in combo)):
                phrases.append(describe(dict(zip(combo, values, strict=True))))
    for p in extra:
        if p not in phrases:
            phrases.append(p)
    return phrases


def write_vocab(path: Path, extra: list[str] = ()) -> Path:
    """Write :func:`vocabulary` one phrase per line (UTF-8)."""
    path.write_text("\n".join(vocabulary(extra)) + "\n")
    return path
