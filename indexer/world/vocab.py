"""Phrases in the world's own words: slice descriptions and the vocabulary ``llm2loss explain`` ranks."""

from __future__ import annotations

import itertools
from pathlib import Path

from indexer.world.generate import describe
from indexer.world.spec import ATTRIBUTES

__all__ = ["describe", "vocabulary", "vocabulary_items", "write_vocab"]


def vocabulary_items(up_to: int = 2) -> list[tuple[str, dict]]:
    """(phrase, the attributes it states) for every single attribute value and every pair (and
    every triple with ``up_to=3``: what any slice of up to three attributes can be described by)."""
    items = []
    attrs = list(ATTRIBUTES)
    for r in range(1, up_to + 1):
        for combo in itertools.combinations(attrs, r):
            for values in itertools.product(*(ATTRIBUTES[a] for a in combo)):
                where = dict(zip(combo, values, strict=True))
                items.append((describe(where), where))
    return items


def vocabulary(extra: list[str] = ()) -> list[str]:
    """Every single attribute value and every pair of attributes, described; plus ``extra``.

    Pairs are where the planted slices live; triples are left out so that a slice's own
    description does not compete with near-copies of itself.
    """
    phrases = [p for p, _ in vocabulary_items()]
    for p in extra:
        if p not in phrases:
            phrases.append(p)
    return phrases


def write_vocab(path: Path, extra: list[str] = ()) -> Path:
    """Write :func:`vocabulary` one phrase per line (UTF-8)."""
    path.write_text("\n".join(vocabulary(extra)) + "\n")
    return path
