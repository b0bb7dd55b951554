"""The world's black-box model: a small torch CNN for the task attribute, trained on the biased
training split; its per-sample cross-entropy on every split is the manifest's ``loss``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """(n, 3, S, S) float in [-1, 1] -> (n, classes) logits; four stride-2 conv blocks + pooling."""

    def __init__(self, classes: int, width: int = 24):
        super().__init__()
        layers, cin = [], 3
        for cout in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def train_blackbox(images: np.ndarray, labels: np.ndarray, classes: int, epochs: int, batch_size: int,
                   lr: float, seed: int, width: int = 24, progress: bool = True) -> SmallCNN:
    """Fit :class:`SmallCNN` on (n, S, S, 3) uint8 ``images`` and (n,) int64 ``labels``.

    No augmentation and no reweighting: the model should learn the training split's biases, the
    way a real model trained on biased data does.
    """
    torch.manual_seed(seed)
    model = SmallCNN(classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(images)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    warm = max(1, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    y = torch.from_numpy(labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc="black-box CNN", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(_to_tensor(images[idx.numpy()])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model


@torch.inference_mode()
def per_sample_loss(model: SmallCNN, images: np.ndarray, labels: np.ndarray, batch: int = 512
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float32 cross-entropy (nats) of each sample's ``labels`` and (n,) int64 predicted class."""
    losses, preds = [], []
    y = torch.from_numpy(labels.astype(np.int64))
    for i in range(0, len(images), batch):
        logits = model(_to_tensor(images[i : i + batch]))
        losses.append(nn.functional.cross_entropy(logits, y[i : i + batch], reduction="none"))
        preds.append(logits.argmax(1))
    return torch.cat(losses).numpy().astype(np.float32), torch.cat(preds).numpy()
