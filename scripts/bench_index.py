"""Benchmark `llm2loss index`: throughput against a bare open_clip forward pass, and peak memory.

Throughput: for each model, in one run and on the same images, with the same batch size:
  * bare: ``model.encode_image`` over batches preprocessed beforehand (no decoding, no writing);
  * index: ``index_dataset`` into a fresh database (decoding in workers, embedding, Lance commits),
    counted over its embedding loop (rows written / loop seconds; model loading excluded).
The two alternate ``--repeats`` times (so load from other processes hits both alike); the ratio
of the medians is printed. Goal: index >= 0.8 x bare.

Memory: indexing N small images with the tiny model, each N in a fresh subprocess: peak RSS of
the indexing process during ingestion (sampled every 50 ms from /proc), its peak over the whole
run (ru_maxrss, including the FAISS build, which holds all embeddings by design) and the decoding
workers' peak (RUSAGE_CHILDREN). Ingestion's peak must not grow with N.

    nice -n 10 .venv/bin/python scripts/bench_index.py [--tiny-images 2000] [--vit-images 512]
        [--memory 10000,100000] [--batch-size 64] [--work DIR]

Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_index")


def make_images(folder: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """``n`` distinct small PNGs (coloured blocks + noise) and a manifest with a loss column."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    manifest = folder / f"manifest_{n}.csv"
    if manifest.exists():
        return manifest
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = ["image,label,loss"]
    for i in range(n):
        rel = f"images/{i:06d}.png"
        if not (folder / rel).exists():
            base = rng.integers(0, 256, 3, dtype=np.uint8)
            px = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(folder / rel, compress_level=1)
        lines.append(f"{rel},c{i % 10},{rng.gamma(1.0, 0.5):.6f}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def bare_pass(model, manifest: Path, batch_size: int) -> float:
    """Images per second of ``encode_image`` alone over batches preprocessed beforehand."""
    import torch
    from PIL import Image

    root = manifest.parent
    paths = [line.split(",")[0] for line in manifest.read_text().splitlines()[1:]]
    batches = [torch.stack([model.preprocess(Image.open(root / p).convert("RGB")) for p in paths[i:i + batch_size]])
               for i in range(0, len(paths), batch_size)]
    with torch.inference_mode():
        model.model.encode_image(batches[0][:2])  # warm-up, as the index run's first batch is not
        t0 = time.perf_counter()
        for b in batches:
            model.model.encode_image(b)
        return len(paths) / (time.perf_counter() - t0)


def index_pass(spec, manifest: Path, db: Path, batch_size: int) -> tuple[float, float]:
    """(images/s of the embedding loop, wall seconds of the whole call) into a fresh database."""
    import shutil

    from indexer.pipeline import index_dataset

    shutil.rmtree(db, ignore_errors=True)
    t0 = time.perf_counter()
    r = index_dataset(manifest, db, clip=spec, batch_size=batch_size, progress=False)
    return r.images_per_second, time.perf_counter() - t0


def throughput(name: str, spec, manifest: Path, work: Path, batch_size: int, repeats: int) -> dict:
    from indexer.clip import load_clip

    model = load_clip(spec, "cpu")
    bare, index, wall = [], [], []
    for k in range(repeats):
        bare.append(bare_pass(model, manifest, batch_size))
        ips, w = index_pass(spec, manifest, work / f"db_{name}", batch_size)
        index.append(ips)
        wall.append(w)
        log.info("%s repeat %d: bare %.1f img/s, index %.1f img/s", name, k, bare[-1], index[-1])
    n = len(manifest.read_text().splitlines()) - 1
    return {"model": name, "images": n, "batch_size": batch_size, "torch_threads": _threads(),
            "bare_img_per_s": [round(v, 1) for v in bare], "index_img_per_s": [round(v, 1) for v in index],
            "index_wall_s": [round(v, 1) for v in wall],
            "ratio_of_medians": round(statistics.median(index) / statistics.median(bare), 3)}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- memory (runs in a subprocess per N) ---------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(manifest: str, db: str, batch_size: int) -> None:
    import indexer.pipeline as P
    from indexer.clip import ClipSpec
    from indexer.configs import TINY_CLIP

    peak = {"ingest": 0.0}
    phase = {"ingest": True}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            if phase["ingest"]:
                peak["ingest"] = max(peak["ingest"], _rss_mib())
            time.sleep(0.05)

    build_ann = P._build_ann

    def ann_phase(database):  # marks where ingestion ends and the FAISS build starts
        phase["ingest"] = False
        return build_ann(database)

    P._build_ann = ann_phase
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    r = P.index_dataset(manifest, db, clip=ClipSpec(str(TINY_CLIP)), batch_size=batch_size, progress=False)
    stop.set()
    kib = 1.0 / 1024
    print(json.dumps({
        "rows_written": r.rows_written, "img_per_s": round(r.images_per_second, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "ingest_peak_rss_mib": round(peak["ingest"], 1),
        "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib, 1),
        "workers_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib, 1),
    }))


def memory(ns: list[int], work: Path, batch_size: int) -> list[dict]:
    out = []
    for n in ns:
        manifest = make_images(work / "mem", n)
        db = work / f"db_mem_{n}"
        import shutil

        shutil.rmtree(db, ignore_errors=True)
        log.info("memory: indexing %d images in a subprocess", n)
        res = subprocess.run([sys.executable, __file__, "--memory-child", str(manifest), str(db), str(batch_size)],
                             capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        out.append({"images": n, **json.loads(res.stdout.strip().splitlines()[-1])})
        log.info("memory %d: %s", n, out[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-images", type=int, default=2000)
    ap.add_argument("--vit-images", type=int, default=512, help="0 skips ViT-B-32 (random weights)")
    ap.add_argument("--memory", default="10000,100000", help="comma-separated N; empty skips")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child:
        logging.getLogger().setLevel(logging.WARNING)
        m, db, bs = args.memory_child
        return memory_child(m, db, int(bs))

    from indexer.clip import ClipSpec
    from indexer.configs import TINY_CLIP

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_index_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"cpu_count": os.cpu_count(), "throughput": [], "memory": []}
    if args.tiny_images:
        manifest = make_images(work / "tiny", args.tiny_images)
        result["throughput"].append(throughput("tiny-clip", ClipSpec(str(TINY_CLIP)), manifest, work,
                                               args.batch_size, args.repeats))
    if args.vit_images:
        manifest = make_images(work / "vit", args.vit_images)
        result["throughput"].append(throughput("ViT-B-32 (random weights)", ClipSpec("ViT-B-32", None),
                                               manifest, work, args.batch_size, args.repeats))
    if args.memory:
        result["memory"] = memory([int(n) for n in args.memory.split(",")], work, args.batch_size)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
