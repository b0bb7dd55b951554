"""Scoring words with the diagnosis ensemble, across CLIP's modality gap.

CLIP's text and image embeddings lie in two separate cones of the unit sphere (the "modality gap",
Liang et al. 2022): a caption's embedding is nearer every other caption than the image it describes.
The ensemble was fitted on image embeddings only, so a raw text embedding asks it about a region it
never saw. We move text embeddings by the mean image-minus-text offset, estimated from the stored
images and a vocabulary of phrases, and renormalise::

    gap = mean(image embeddings) - mean(text embeddings)
    t'  = (t + gap) / |t + gap|

The offset is common to all phrases, so what distinguishes one phrase from another (its direction
within the text cone) is kept while the phrase lands among the images. ``scripts/eval_diagnosis.py``
measures what this buys against scoring raw text embeddings.
"""

from __future__ import annotations

import hashlib
import logging
from functools import cached_property

import numpy as np

from diagnosis.run import LoadedEnsemble, load_ensemble, open_db
from indexer.integrity import load_cached_array, save_cached_array

log = logging.getLogger(__name__)

#: A vocabulary smaller than this estimates its own text mean badly (one phrase's mean is itself),
#: so the default vocabulary's mean is used instead.
MIN_GAP_PHRASES = 32


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def estimate_gap(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """(d,) float32 mean image-minus-text offset.

    ``image_emb``: (n, d) image embeddings or their (d,) mean; ``text_emb``: (m, d) text embeddings
    or their (d,) mean; all L2-normalised.
    """
    mi = np.asarray(image_emb, dtype=np.float64)
    mt = np.asarray(text_emb, dtype=np.float64)
    mi = mi.mean(axis=0) if mi.ndim == 2 else mi
    mt = mt.mean(axis=0) if mt.ndim == 2 else mt
    return (mi - mt).astype(np.float32)


def text_to_image_space(text_emb: np.ndarray, gap: np.ndarray | None) -> np.ndarray:
    """(m, d) L2-normalised text embeddings moved by ``gap`` and renormalised; ``None`` = unchanged."""
    t = np.atleast_2d(np.asarray(text_emb, dtype=np.float32))
    if gap is None:
        return t
    return _normalise(t + gap)


def neighbour_projection(text_emb: np.ndarray, image_emb: np.ndarray, k: int, block: int = 65536) -> np.ndarray:
    """(m, d) text embeddings -> (m, d): the normalised mean of each phrase's ``k`` most similar images.

    A per-phrase gap correction: where the global shift keeps a phrase's direction within the text
    cone (which a small CLIP may encode poorly), this lands the phrase exactly on the image manifold,
    at the images CLIP retrieves for it. Measured on the offline world (BENCHMARKS.md, Diagnosis):
    the planted slice's phrase ranked 94th of 121 with the shift and 1st-4th with this.
    """
    from diagnosis.explain import _top_neighbours

    T = np.atleast_2d(np.asarray(text_emb, dtype=np.float32))
    k = max(1, min(int(k), len(image_emb)))
    nn = _top_neighbours(image_emb, T, k, block)
    proj = np.stack([image_emb[rows].mean(axis=0) for rows in nn])
    return _normalise(proj)


class Scorer:
    """The fitted ensemble of a database, ready to score images and phrases.

    Loads the ensemble once (refusing a missing one, and a stale one unless ``allow_stale``) and the
    database's CLIP model lazily, on the first phrase to encode. Used by ``explain``, the query engine
    and the UI.
    """

    def __init__(self, db, allow_stale: bool = False, device: str | None = "cpu", clip=None):
        self.db = open_db(db)
        self.loaded: LoadedEnsemble = load_ensemble(self.db, allow_stale=allow_stale)
        self.device = device
        if clip is not None:  # the caller's loaded model of this database (a server's, maybe compiled)
            if clip.spec.identity() != self.db.clip_identity:
                raise ValueError("the CLIP model given is not the one this database was indexed with")
            self.clip = clip

    @property
    def ensemble(self):
        return self.loaded.ensemble

    @property
    def image_mean(self) -> np.ndarray:
        return self.loaded.image_mean

    @cached_property
    def clip(self):
        from indexer.clip import clip_for_database

        return clip_for_database(self.db.read_meta(), self.device)

    def encode_text(self, phrases: list[str]) -> np.ndarray:
        """Phrases -> (m, d) float32 raw CLIP text embeddings, L2-normalised."""
        return self.clip.encode_text(list(phrases))

    @cached_property
    def default_text_mean(self) -> np.ndarray:
        """(d,) mean text embedding of the database's default vocabulary, cached beside the ensemble
        (keyed by the vocabulary) because encoding it costs seconds with a real CLIP."""
        from diagnosis.vocab import default_vocabulary

        phrases = default_vocabulary(self.db)
        key = hashlib.sha256("\n".join(phrases).encode()).hexdigest()[:12]
        path = self.db.diagnosis_dir / f"text_mean_{key}.npy"
        # stamped with what it was computed from; a damaged or foreign cache is recomputed
        built_from = {"vocabulary_sha256": hashlib.sha256("\n".join(phrases).encode()).hexdigest(),
                      "clip": self.db.clip_identity}
        mean = load_cached_array(path, built_from)
        if mean is None:
            mean = self.encode_text(phrases).mean(axis=0).astype(np.float32)
            save_cached_array(path, mean, built_from)  # a read-only database still scores, only slower
        return mean

    def gap(self, text_emb: np.ndarray | None = None) -> np.ndarray:
        """(d,) image-minus-text offset. The text mean is the default vocabulary's, so that a phrase
        scores the same wherever it is asked; pass a vocabulary's ``text_emb`` to use its own mean
        (when it has at least ``MIN_GAP_PHRASES`` phrases)."""
        if text_emb is not None and len(text_emb) >= MIN_GAP_PHRASES:
            return estimate_gap(self.image_mean, text_emb)
        return estimate_gap(self.image_mean, self.default_text_mean)

    def to_image_space(self, text_emb: np.ndarray, correct_gap: bool = True,
                       gap: np.ndarray | None = None) -> np.ndarray:
        """Raw text embeddings -> where the ensemble should read them (see the module doc)."""
        if not correct_gap:
            return np.atleast_2d(np.asarray(text_emb, dtype=np.float32))
        return text_to_image_space(text_emb, self.gap() if gap is None else gap)

    def score_images(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) image embeddings -> predicted loss (n,) and member spread (n,), loss units."""
        return self.ensemble.predict(np.atleast_2d(emb), return_std=True)

    def score_text_embeddings(self, text_emb: np.ndarray, correct_gap: bool = True,
                              gap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) raw text embeddings -> predicted loss (m,) and member spread (m,) after the gap
        correction (``correct_gap=False`` scores them raw, for comparison)."""
        return self.ensemble.predict(self.to_image_space(text_emb, correct_gap, gap), return_std=True)

    def score_text(self, phrases: list[str], correct_gap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Phrases -> predicted loss (m,) and member spread (m,)."""
        return self.score_text_embeddings(self.encode_text(phrases), correct_gap)


def score_text(db, phrases: list[str], correct_gap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Predicted loss and member spread of each phrase ((m,) float64 each, loss units)."""
    return Scorer(db).score_text(phrases, correct_gap)
