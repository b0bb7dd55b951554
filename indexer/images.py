"""Decoding and preprocessing images in worker processes, so that it overlaps the model's forward pass.

:func:`image_batches` yields :class:`ImageBatch` objects in the order of the given rows. An image
that is missing or cannot be decoded does not stop the run: it comes back in ``failed`` with its
reason, and the batch holds only the good images.

:func:`open_image` is the one way the project opens an image file (indexing, ``similar FILE``,
``search --image FILE``, the web UI): a file over the pixel budget (``LLM2LOSS_MAX_PIXELS``, default
40 million pixels) is refused from its header, before anything is decoded, and a decompression bomb,
a truncated or non-image file comes back as :class:`ImageRefused` with a reason, never a traceback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from indexer.errors import UserError

Transform = Callable[[object], torch.Tensor]

#: Images over this many pixels are refused unless ``LLM2LOSS_MAX_PIXELS`` says otherwise: 40 MP
#: decodes to 120 MB of RGB (a 144 MP photo cost +0.9 GB of memory per decoding process).
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "LLM2LOSS_MAX_PIXELS"

#: Reasons :func:`open_image` gives (they become the ``reason`` column of rejects.csv).
NOT_FOUND, UNREADABLE, TOO_LARGE = "image not found", "unreadable image", "image too large"


class ImageRefused(Exception):
    """An image that :func:`open_image` will not decode: ``reason`` (one of ``NOT_FOUND``,
    ``UNREADABLE``, ``TOO_LARGE``) and ``detail``, a clause naming the file."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def user_error(self, fix: str = "pass a PNG/JPEG file or a stored sample id") -> UserError:
        """The refusal as one sentence for a person: the detail, then ``fix``."""
        extra = f" (or raise {MAX_PIXELS_ENV})" if self.reason == TOO_LARGE else ""
        return UserError(f"cannot use the image: {self.detail}; {fix}{extra}.")


def max_pixels() -> int:
    """The pixel budget: ``LLM2LOSS_MAX_PIXELS`` (a positive integer, ``4e7`` allowed), else 40 MP."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value < 1e15):
        raise UserError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive number of pixels; set it to a number like "
                        f"{DEFAULT_MAX_PIXELS} or unset it.")
    return int(value)


def open_image(path, limit: int | None = None):
    """The image file at ``path`` as a decoded PIL RGB image, or :class:`ImageRefused`.

    The size is read from the header and checked against ``limit`` (default :func:`max_pixels`)
    before the pixels are decoded, so an oversized file or a decompression bomb costs no memory.
    """
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels() if limit is None else int(limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's EXIF/palette/bomb warnings would flood stderr
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:
                    raise ImageRefused(TOO_LARGE, f"{path} is {w}x{h} pixels ({w * h / 1e6:.1f} MP), over the "
                                                  f"{limit / 1e6:g} MP budget")
                im.load()
                return im.convert("RGB")
    except ImageRefused:
        raise
    except FileNotFoundError:
        raise ImageRefused(NOT_FOUND, f"{path} does not exist") from None
    except Image.DecompressionBombError as e:  # PIL's own check, at open, past ~179 MP
        import re

        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(n.group(1)) / 1e6:.1f} MP" if n else "more pixels than PIL allows"
        raise ImageRefused(TOO_LARGE, f"{path} declares {size} (a decompression bomb), over the "
                                      f"{limit / 1e6:g} MP budget") from None
    except IsADirectoryError:
        raise ImageRefused(UNREADABLE, f"{path} is a folder, not an image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError, EOFError) as e:
        raise ImageRefused(UNREADABLE, f"{path} is not a readable image ({type(e).__name__})") from None


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
        self.limit = max_pixels()  # read once here: the env var of the parent, not of each worker

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        path = self.paths[i]
        path = path.as_py() if hasattr(path, "as_py") else path  # an Arrow string array's scalar
        try:
            rgb = open_image(path, self.limit)
        except ImageRefused as e:
            return row, None, (e.reason, e.detail)
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
