"""Decoding and preprocessing images in worker processes, so that it overlaps the model's forward pass.

:func:`image_batches` yields :class:`ImageBatch` objects in the order of the given rows. An image
that is missing or cannot be decoded does not stop the run: it comes back in ``failed`` with its
reason, and the batch holds only the good images.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Transform = Callable[[object], torch.Tensor]


@dataclass
class ImageBatch:
    """``rows`` (b,) int64 manifest rows of the decoded images; ``inputs[j]`` (b, ...) float tensors
    from the j-th transform; ``failed`` ``[(row, reason, detail)]`` for images that did not decode."""

    rows: np.ndarray
    inputs: list[torch.Tensor]
    failed: list[tuple[int, str, str]]


class ImageDataset(Dataset):
    """Item ``i``: the image at ``paths[i]`` (manifest row ``rows[i]``) through each transform.

    ``paths`` is a sequence of str or an Arrow string array (compact, and shared with forked
    workers without copying).

    Returns ``(row, tensors | None, failure | None)``; a failure is ``(reason, detail)``.
    """

    def __init__(self, paths: Sequence[str], rows: Sequence[int], transforms: Sequence[Transform]):
        self.paths = paths
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        row = int(self.rows[i])
        path = self.paths[i]
        path = path.as_py() if hasattr(path, "as_py") else path  # an Arrow string array's scalar
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's EXIF/palette warnings would flood stderr
                with Image.open(path) as im:
                    im.load()
                    rgb = im.convert("RGB")
        except FileNotFoundError:
            return row, None, ("image not found", f"{path} does not exist")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            return row, None, ("unreadable image", f"{path} is not a readable image ({type(e).__name__})")
        return row, [t(rgb) for t in self.transforms], None


def collate(items) -> ImageBatch:
    """Stack the good items of a batch; runs inside the worker."""
    rows, tensors, failed = [], [], []
    for row, ts, fail in items:
        if fail is None:
            rows.append(row)
            tensors.append(ts)
        else:
            failed.append((row, *fail))
    inputs: list[torch.Tensor] = []
    if tensors:
        for j in range(len(tensors[0])):
            col = [t[j] for t in tensors]
            shapes = {tuple(c.shape) for c in col}
            if len(shapes) > 1:
                raise ShapeMismatch(sorted(shapes)[:2])
            inputs.append(torch.stack(col))
    return ImageBatch(np.asarray(rows, dtype=np.int64), inputs, failed)


class ShapeMismatch(ValueError):
    """Preprocessed images of one batch differ in shape (no resizing preprocess was given)."""


def _worker_init(_worker_id: int) -> None:
    # Each worker decodes one image at a time; torch's intra-op threads would only fight the model.
    torch.set_num_threads(1)


def default_workers(device: str | None = None) -> int:
    """Decoding processes for a model on ``device`` (None: cuda when torch sees a GPU, else cpu).

    With a GPU, one per core but one (the model's feeder), at most 8. On the CPU, none: torch's
    intra-op threads already use every core, and a decoding process taking one from them slowed
    the tiny CLIP's pass 2.6x on 2 cores (scripts/bench_index.py), while decoding in between the
    forward passes costs ~0.4 ms an image against ~4 ms for the tiny model's forward pass.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not str(device).startswith("cuda"):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(cores - 1, 8))


def image_batches(paths: Sequence[str], rows: Sequence[int], transforms: Sequence[Transform],
                  batch_size: int, workers: int | None = None, pin_memory: bool = False,
                  device: str | None = None) -> Iterator[ImageBatch]:
    """Batches of decoded, preprocessed images, in ``rows`` order (see :class:`ImageBatch`).

    ``workers``: decoding processes (default :func:`default_workers` for ``device``; 0 decodes
    in this process).
    """
    workers = default_workers(device) if workers is None else workers
    dataset = ImageDataset(paths, rows, transforms)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        pin_memory=pin_memory,
        # fork, not forkserver/spawn: those re-import the caller's __main__ in every worker (a
        # script without a main guard would rerun itself) and need picklable user transforms.
        multiprocessing_context="fork" if workers else None,
    )
    with warnings.catch_warnings():
        # lance/lancedb warn that a forked child using them might deadlock; these children never
        # touch a table: they only decode images and run transforms.
        warnings.filterwarnings("ignore", message="lancedb fork support")
        warnings.filterwarnings("ignore", message="lance is not fork-safe")
        return iter(loader)
