"""CLIP embedding and FAISS on the GPU against the CPU path, on the same machine, in one run.

    python scripts/gpu_check.py [--images 2048] [--faiss-rows 200000] [--out gpu_check.json]

Needs only torch, open_clip, faiss, numpy and Pillow (it imports ``indexer.clip``,
``indexer.images`` and ``indexer.configs``, never LanceDB or pyarrow), so it runs on a machine that
cannot carry the database libraries. It measures:

* CLIP image embedding through the product's own path (``indexer.images.image_batches``: a torch
  DataLoader decoding PNGs in worker processes, then ``ClipModel.encode_images``; bf16 autocast on
  CUDA), for ViT-B-32 (random weights: the cost of a forward pass does not depend on them) and the
  offline world's tiny CLIP: images/s on each device, with the embedding agreement between devices
  (cosine; bf16 on the GPU is not bit-identical to fp32 on the CPU);
* text encoding latency of one phrase (a query's encode step), per device;
* FAISS: the product's IVF recipe (``IndexIVFFlat``, inner product, nlist = 4 sqrt(n), trained on
  64 nlist rows) built on CPU and on GPU over the same clustered 512-d unit vectors, then 1,000
  queries batched and one at a time at the same nprobe, with recall@10 against exact search.

It degrades instead of failing: without CUDA it says so and measures the CPU only; with a faiss
built without GPU support it says so and reports CPU FAISS only. Prints a table on stdout, then the
JSON document (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- CLIP -----------------------------------------------------------------------------------------
def write_images(folder: Path, n: int, size: int = 96, seed: int = 0) -> list[str]:
    """``n`` small PNGs of coloured boxes and discs on noisy backgrounds (decoding is part of the cost)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        bg = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        im = Image.fromarray(bg)
        d = ImageDraw.Draw(im)
        a, b = sorted(rng.integers(4, size - 4, 2))
        box = (int(a), int(a), int(max(b, a + 8)), int(max(b, a + 8)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if i % 2 else d.rectangle)(box, fill=colour)
        p = folder / f"{i:06d}.png"
        im.save(p)
        paths.append(str(p))
    return paths


def embed_images(spec, device: str, paths: list[str], batch_size: int, workers: int) -> dict:
    """Images/s of image_batches + encode_images on ``device``; returns timings and the embeddings."""
    import torch

    from indexer.clip import load_clip
    from indexer.images import image_batches

    t = time.perf_counter()
    clip = load_clip(spec, device)
    load_s = time.perf_counter() - t
    warm = image_batches(paths[:batch_size], list(range(batch_size)), [clip.preprocess], batch_size, 0)
    for b in warm:  # first call allocates (cuDNN autotune, kernels)
        clip.encode_images(b.inputs[0])
    _sync(device)
    out = []
    t = time.perf_counter()
    batches = image_batches(paths, list(range(len(paths))), [clip.preprocess], batch_size, workers,
                            pin_memory=device.startswith("cuda"))
    for b in batches:
        out.append(clip.encode_images(b.inputs[0]))
    _sync(device)
    seconds = time.perf_counter() - t
    del batches
    phrases = [f"a photo of a {c} object number {i}" for i, c in enumerate(["red", "blue", "green"] * 12)]
    clip.encode_text(phrases[:2])
    ts = []
    for p in phrases:
        t = time.perf_counter()
        clip.encode_text([p])
        _sync(device)
        ts.append(time.perf_counter() - t)
    emb = np.concatenate(out)
    res = {"device": device, "images": len(emb), "seconds": round(seconds, 2),
           "images_per_s": round(len(emb) / seconds, 1), "load_s": round(load_s, 2),
           "text_encode_p50_ms": round(1000 * float(np.median(ts)), 2), "embed_dim": int(emb.shape[1])}
    del clip
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"result": res, "emb": emb}


def clip_section(models: list[str], devices: list[str], n_images: int, batch_size: int, workers: int) -> list[dict]:
    from indexer.clip import ClipSpec
    from indexer.configs import TINY_CLIP

    specs = {"ViT-B-32": ClipSpec("ViT-B-32"), "tiny": ClipSpec(str(TINY_CLIP))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm2loss-gpu-") as tmp:
        paths = write_images(Path(tmp), n_images)
        for name in models:
            embs = {}
            for dev in devices:
                log(f"CLIP {name} on {dev}: {n_images} images, batch {batch_size}, {workers} workers")
                r = embed_images(specs[name], dev, paths, batch_size, workers)
                embs[dev] = r["emb"]
                rows.append({"model": name, **r["result"]})
            if len(embs) == 2:
                a, b = embs.values()
                cos = np.sum(a * b, axis=1)
                rows[-1]["cosine_to_cpu_min"] = round(float(cos.min()), 4)
                rows[-1]["cosine_to_cpu_mean"] = round(float(cos.mean()), 5)
                cpu = next(r for r in rows if r["model"] == name and r["device"] == "cpu")
                rows[-1]["speedup_vs_cpu"] = round(rows[-1]["images_per_s"] / cpu["images_per_s"], 1)
    return rows


# ---- FAISS ----------------------------------------------------------------------------------------
def clustered(n: int, d: int = 512, clusters: int = 1000, seed: int = 0, sample_seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit vectors around ``clusters`` centres (drawn from ``seed``); the samples
    come from ``sample_seed``, so another sample_seed gives fresh points around the same centres."""
    c = np.random.default_rng(seed).standard_normal((clusters, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, sample_seed])
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        x[s : s + m] = c[rng.integers(0, clusters, m)] + (0.8 / math.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def faiss_gpu_status() -> tuple[bool, str]:
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return False, "this faiss build has no GPU support (faiss-cpu); GPU FAISS not measured"
    n = faiss.get_num_gpus()
    if n == 0:
        return False, "faiss has GPU support but sees no GPU; GPU FAISS not measured"
    return True, f"faiss sees {n} GPU(s)"


def faiss_section(n: int, queries: int, nprobe: int, gpu: bool) -> list[dict]:
    import faiss

    d = 512
    x = clustered(n, d)
    q = clustered(queries, d, sample_seed=1)  # same centres, fresh samples: like new images
    k = 10
    truth = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
    rng = np.random.default_rng(0)
    train = x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
    rows = []
    for dev in ["cpu"] + (["cuda"] if gpu else []):
        log(f"FAISS IVF{nlist},Flat over {n} x {d} on {dev}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        res = None
        if dev == "cuda":
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, index)
        t = time.perf_counter()
        index.train(train)
        train_s = time.perf_counter() - t
        index.add(x)
        build_s = time.perf_counter() - t
        if dev == "cuda":
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        else:
            index.nprobe = nprobe
        index.search(q[:8], k)  # warm-up
        t = time.perf_counter()
        _, got = index.search(q, k)
        batch_s = time.perf_counter() - t
        single = []
        for i in range(min(queries, 300)):
            t = time.perf_counter()
            index.search(q[i : i + 1], k)
            single.append(time.perf_counter() - t)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth.tolist(), got.tolist(), strict=True)]))
        rows.append({"device": dev, "rows": n, "nlist": nlist, "nprobe": nprobe, "train_s": round(train_s, 2),
                     "build_s": round(build_s, 2), "batch_queries": queries,
                     "batch_qps": round(queries / batch_s), "single_query_p50_ms": round(1000 * float(np.median(single)), 3),
                     "single_query_p99_ms": round(1000 * float(np.percentile(single, 99)), 3),
                     "recall_at_10": round(recall, 4)})
        del index, res
    if len(rows) == 2:
        rows[1]["build_speedup"] = round(rows[0]["build_s"] / rows[1]["build_s"], 1)
        rows[1]["batch_speedup"] = round(rows[1]["batch_qps"] / rows[0]["batch_qps"], 1)
    return rows


def table(report: dict) -> str:
    lines = [f"machine: {report['machine']}", *[f"note: {n}" for n in report["notes"]], "",
             "| CLIP model | device | images/s | speedup | one text encode p50 ms | cos to CPU (min) |",
             "|---|---|---|---|---|---|"]
    for r in report["clip"]:
        lines.append(f"| {r['model']} | {r['device']} | {r['images_per_s']} | {r.get('speedup_vs_cpu', '-')} | "
                     f"{r['text_encode_p50_ms']} | {r.get('cosine_to_cpu_min', '-')} |")
    lines += ["", "| FAISS IVF | device | build s (train) | 1000 queries: q/s | one query p50 / p99 ms | recall@10 |",
              "|---|---|---|---|---|---|"]
    for r in report["faiss"]:
        lines.append(f"| {r['rows']:,} rows, nlist {r['nlist']}, nprobe {r['nprobe']} | {r['device']} | "
                     f"{r['build_s']} ({r['train_s']}) | {r['batch_qps']:,} | {r['single_query_p50_ms']} / "
                     f"{r['single_query_p99_ms']} | {r['recall_at_10']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048, help="images to embed per model and device")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: the product's)")
    ap.add_argument("--models", default="ViT-B-32,tiny")
    ap.add_argument("--faiss-rows", type=int, default=200_000)
    ap.add_argument("--faiss-queries", type=int, default=1000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch/faiss CPU threads (default: all cores)")
    ap.add_argument("--skip-clip", action="store_true")
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import faiss
    import torch

    from indexer.images import default_workers

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    notes = []
    cuda = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    if not cuda:
        notes.append("torch sees no CUDA GPU: CLIP measured on the CPU only")
    faiss_gpu, why = faiss_gpu_status()
    notes.append(why)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, faiss {faiss.__version__}" + (
        f", GPU {gpu_name}" if gpu_name else ", no GPU")
    report = {"machine": machine, "notes": notes, "clip": [], "faiss": []}
    if not args.skip_clip:
        devices = ["cpu"] + (["cuda"] if cuda else [])
        workers = default_workers() if args.workers is None else args.workers
        report["clip"] = clip_section(args.models.split(","), devices, args.images, args.batch_size, workers)
    if not args.skip_faiss:
        report["faiss"] = faiss_section(args.faiss_rows, args.faiss_queries, args.nprobe, faiss_gpu)
    print(table(report))
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
