"""ViT-B-32's truncated text encoding in other runtimes (issue 27, goal 1), one phrase at a time, 2 threads.

    python scripts/bench_text_runtimes.py [--runtimes compile,ort] [--queries 150]

Eager PyTorch (the product's path, :mod:`indexer.clip_text`) against ``torch.compile`` (inductor,
dynamic shapes; its compile time is printed) and ONNX Runtime (one exported graph per token length:
the legacy exporter bakes the length into the attention's reshapes), on phrases of the real
vocabulary, random weights (a forward pass costs the same with any weights). ONNX Runtime is not a
dependency: install it beside the venv (``pip install --target /tmp/ortpkgs onnxruntime onnx``) and
run with ``PYTHONPATH=/tmp/ortpkgs:.``. Prints p50 / p99 per runtime and the least cosine of its
embeddings to the eager ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _unit(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _time(name: str, encode, tokens: list[torch.Tensor], ref: list[np.ndarray]) -> None:
    for t in tokens[:5]:  # warm-up
        encode(t)
    seconds, out = [], []
    for t in tokens:
        start = time.perf_counter()
        z = encode(t)
        seconds.append(time.perf_counter() - start)
        out.append(_unit(np.asarray(z)[0]))
    cos = min(float(a @ b) for a, b in zip(out, ref, strict=True))
    print(f"{name:28s} p50 {1000 * np.median(seconds):6.2f} ms  p99 {1000 * np.percentile(seconds, 99):6.2f} ms"
          f"  cosine min {cos:.7f}", flush=True)


def _onnx_runtime(module: torch.nn.Module, lengths: set[int]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {}
    for n in sorted(lengths):
        path = Path(tempfile.gettempdir()) / f"llm2loss_vitb32_text_{n}.onnx"
        if not path.exists():
            torch.onnx.export(module, (torch.ones(1, n, dtype=torch.long),), str(path), input_names=["tokens"],
                              output_names=["emb"], dynamo=False, opset_version=17)
        sessions[n] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda t: sessions[t.shape[1]].run(None, {"tokens": t.numpy()})[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtimes", default="compile,ort", help="comma-separated: compile, freeze, ort")
    ap.add_argument("--queries", type=int, default=150)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # open_clip warns that the weights are random
    import open_clip

    from diagnosis.vocab import generic_singles, imagenet_classnames, with_article
    from indexer.clip_text import GroupEncoder, text_tower

    torch.set_num_threads(2)
    model = open_clip.create_model("ViT-B-32").eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    tower = text_tower(model)
    phrases = generic_singles() + [with_article(n) for n in imagenet_classnames()]
    phrases = [phrases[i] for i in np.random.default_rng(0).permutation(len(phrases))[: args.queries]]
    tokens = []
    for p in phrases:
        t = tokenizer([p])
        tokens.append(t[:, : int(tower.pooled_positions(t)[0]) + 1].contiguous())
    module = GroupEncoder(tower).eval()  # the product's compiled module (indexer.clip_text)
    with torch.inference_mode():
        ref = [_unit(tower.encode(tokenizer([p]))[0].numpy()) for p in phrases]
        _time("eager (truncated)", lambda t: module(t).numpy(), tokens, ref)
        runtimes = args.runtimes.split(",")
        if "ort" in runtimes:
            _time("onnxruntime, 2 threads", _onnx_runtime(module, {t.shape[1] for t in tokens}), tokens, ref)
        if "freeze" in runtimes:  # inductor with frozen weights (prepacked for oneDNN)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            start = time.perf_counter()
            frozen = torch.compile(module, dynamic=True)
            frozen(tokens[0])
            print(f"torch.compile, freezing: first call {time.perf_counter() - start:.1f} s", flush=True)
            _time("torch.compile (frozen)", lambda t: frozen(t).numpy(), tokens, ref)
            inductor_config.freezing = False
        if "compile" in runtimes:
            start = time.perf_counter()
            compiled = torch.compile(module, dynamic=True)
            compiled(tokens[0])
            print(f"torch.compile: first call {time.perf_counter() - start:.1f} s", flush=True)
            _time("torch.compile (inductor)", lambda t: compiled(t).numpy(), tokens, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
