"""Closing the loop on the offline world: retrain its black box on a curated set and measure again.

A team given a labelling plan sends the collected pool images to a labeller (who returns their
true labels) and has the suspect training labels checked (the labeller returns the right ones);
the model is retrained with the same seed and epochs on the corrected training split plus the
collected images, and its held-out (test) loss is measured per planted slice. The simulated
labeller reads the truth the world keeps aside: the pool's ``pool_truth.parquet`` and each training
row's true task attribute.

:class:`Retrainer` loads the world's images once, so several arms (the plan, a random set, ...) of
one world cost one black-box training each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from indexer.world import blackbox
from indexer.world.spec import ATTRIBUTES

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """Held-out results of one trained model: ``mean_loss`` and ``accuracy`` over the test split,
    per planted slice its ``slices[name] = {"mean_loss", "ratio"}`` (ratio: the slice's mean test
    loss / the test split's mean), and what the training set was (``train_rows``, ``added``,
    ``relabelled``, ``relabel_fixed``: relabelled rows whose label was wrong)."""

    mean_loss: float
    accuracy: float
    slices: dict = field(default_factory=dict)
    train_rows: int = 0
    added: int = 0
    relabelled: int = 0
    relabel_fixed: int = 0


class Retrainer:
    """Retrain ``world``'s black box (same seed, epochs and width as its build) on its training split
    with labels corrected and pool images added, and measure the test split."""

    def __init__(self, world, progress: bool = False):
        self.world, self.progress = world, progress
        rows = world.rows()
        self.task = world.spec["task"]
        self.classes = list(ATTRIBUTES[self.task])
        self.train = rows[rows["split"] == "train"].reset_index(drop=True)
        self.test = rows[rows["split"] == "test"].reset_index(drop=True)
        self.pool = world.pool_truth().set_index("id")
        import pandas as pd

        manifest = pd.read_parquet(world.manifest, columns=["id", "image", "split"])
        unl = manifest[manifest["split"] == "pool"]
        self.pool_image = dict(zip(unl["id"], unl["image"], strict=True))
        self.train_px = self._load(self.train["image"])
        self.test_px = self._load(self.test["image"])
        self._pool_px: dict[str, np.ndarray] = {}

    def _load(self, images) -> np.ndarray:
        return np.stack([np.asarray(Image.open(self.world.root / p).convert("RGB")) for p in images])

    def _y(self, labels) -> np.ndarray:
        return np.asarray([self.classes.index(v) for v in labels], dtype=np.int64)

    def baseline(self) -> Outcome:
        """The world's own model, as built (its losses are the manifest's)."""
        loss = self.test["loss"].to_numpy(np.float64)
        acc = float((self.test["prediction"] == self.test[self.task]).mean())
        return self._outcome(loss, acc, len(self.train))

    def retrain(self, add: list[str] = (), relabel: list[str] = ()) -> Outcome:
        """Train on the training split with the rows ``relabel`` (ids) given their true label and the
        pool images ``add`` (ids) given theirs; measure the test split."""
        labels = self.train["label"].to_numpy(object).copy()
        at = {i: j for j, i in enumerate(self.train["id"])}
        fixed = 0
        for sid in relabel:
            j = at[sid]
            fixed += labels[j] != self.train[self.task].iat[j]
            labels[j] = self.train[self.task].iat[j]  # the labeller returns the truth
        add = [a for a in add if a in self.pool.index]
        pool_px = self._pool_images(add)
        images = np.concatenate([self.train_px, pool_px]) if len(add) else self.train_px
        y = np.concatenate([self._y(labels), self._y(self.pool.loc[add, "label"])]) if len(add) else self._y(labels)
        bb = self.world.spec["blackbox"]
        cnn = blackbox.train_blackbox(images, y, len(self.classes), bb["epochs"], bb["batch_size"], bb["lr"],
                                      self.world.spec["seed"], bb["width"], self.progress)
        loss, pred = blackbox.per_sample_loss(cnn, self.test_px, self._y(self.test[self.task]))
        acc = float((pred == self._y(self.test[self.task])).mean())
        out = self._outcome(loss.astype(np.float64), acc, len(images))
        out.added, out.relabelled, out.relabel_fixed = len(add), len(relabel), int(fixed)
        return out

    def _pool_images(self, ids: list[str]) -> np.ndarray:
        new = [i for i in ids if i not in self._pool_px]
        if new:
            paths = [self.pool_image[i] for i in new]
            for i, px in zip(new, self._load(paths), strict=True):
                self._pool_px[i] = px
        return np.stack([self._pool_px[i] for i in ids]) if ids else np.zeros((0,), dtype=np.uint8)

    def _outcome(self, loss: np.ndarray, acc: float, n_train: int) -> Outcome:
        mean = float(loss.mean())
        slices = {}
        for s in self.world.slices:
            m = self.test[s["column"]].to_numpy(bool)
            sl = float(loss[m].mean()) if m.any() else float("nan")
            slices[s["name"]] = {"mean_loss": sl, "ratio": sl / mean if mean > 0 else float("nan")}
        return Outcome(mean_loss=mean, accuracy=acc, slices=slices, train_rows=n_train)
