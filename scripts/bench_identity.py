"""What recording and checking image identities costs (issue 25, security 2), side by side with
what indexing an image costs anyway.

    nice -n 10 .venv/bin/python scripts/bench_identity.py [--n 2000] [--size 64]

Renders ``n`` images of the offline world (PNG, as the world writes them) into a temporary folder,
then times per image, on warm caches (the decoder has just read the file):

* ``identity``: :func:`indexer.identity.read_identity` (realpath, fstat, SHA-256 of the bytes): what
  ``index`` adds per row;
* ``decode``: :func:`indexer.images.open_image` + the tiny CLIP's preprocess: what ``index`` does anyway;
* ``clip``: the tiny CLIP's image tower on a batch of 64, per image (CPU);
* ``verify``: :func:`indexer.identity.verify` with ``read=True``: what serving one image adds.

Prints the milliseconds and the ratio identity / (decode + clip), and the same for a 5 MB file
(a large photo's JPEG), where the hash, not the file system, is the cost.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def per_item(fn, items, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from indexer.clip import ClipSpec, load_clip
    from indexer.configs import TINY_CLIP
    from indexer.identity import read_identity, verify
    from indexer.images import open_image
    from indexer.world.generate import render_all, sample_rows

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory() as tmp:
        images = render_all(sample_rows(args.n, 0, "train"), args.size)
        paths = []
        for i, im in enumerate(images):
            p = Path(tmp) / f"{i:06d}.png"
            Image.fromarray(im).save(p, compress_level=1)
            paths.append(str(p))
        mean_bytes = np.mean([os.path.getsize(p) for p in paths])
        clip = load_clip(ClipSpec(model=str(TINY_CLIP), pretrained=None), "cpu")
        t_decode = per_item(lambda p: clip.preprocess(open_image(p)), paths[:500])
        t_ident = per_item(read_identity, paths)
        recorded = {p: read_identity(p) for p in paths}
        t_verify = per_item(lambda p: verify(p, recorded[p], read=True), paths)
        batch = torch.stack([clip.preprocess(open_image(p)) for p in paths[:64]])
        clip.encode_images(batch)
        t0 = time.perf_counter()
        for _ in range(3):
            clip.encode_images(batch)
        t_clip = (time.perf_counter() - t0) / 3 / 64 * 1000
        big = Path(tmp) / "big.jpg"
        big.write_bytes(os.urandom(5 * 2**20))
        t_big = per_item(read_identity, [str(big)] * 20)
    print(f"{args.n} world images of {args.size} px, PNG, {mean_bytes:,.0f} bytes each on average")
    print(f"  identity (realpath + fstat + SHA-256): {t_ident:.3f} ms/image")
    print(f"  decode + preprocess:                   {t_decode:.3f} ms/image")
    print(f"  tiny CLIP image tower (CPU, batch 64): {t_clip:.3f} ms/image")
    print(f"  identity / (decode + CLIP):            {t_ident / (t_decode + t_clip):.1%}")
    print(f"  verify on serving (read + hash):       {t_verify:.3f} ms/image")
    print(f"  identity of a 5 MiB file:              {t_big:.2f} ms ({5 / t_big * 1000 / 1024:.2f} GiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
