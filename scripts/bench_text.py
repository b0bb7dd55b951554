"""Text encoding with a real-size CLIP: open_clip's encode_text (all 77 positions) against the
truncated encoding of ``indexer.clip_text`` (only the positions a phrase uses), side by side.

    nice -n 10 .venv/bin/python scripts/bench_text.py [--threads 2] [--queries 200] [--extras int8,compile]

ViT-B-32 with random weights (the cost of a forward pass does not depend on the weights; equality is
checked on the same weights, so it does not depend on them either). Phrases are the real vocabulary
``explain`` uses on a dataset without its own: the shipped generic concepts and open_clip's ImageNet
class names (``diagnosis.vocab``), ~1,100 phrases. It prints:

* ``single``: one phrase per call, as a search query pays it: tokenise + forward + L2-normalise,
  ``full`` (the code before issue 27: ``model.encode_text``) and ``truncated`` (``ClipModel.encode_text``)
  interleaved phrase by phrase in alternating order, p50 / p99 and the ratio; at each ``--threads``;
* ``vocabulary``: every phrase in one call (batches of 256; the truncated encoder groups them by
  token length), seconds and the ratio;
* equality: cosine and max |difference| of the L2-normalised embeddings over the whole vocabulary
  (goal: cosine >= 0.99999);
* ``--extras``: ``compile``, the compiled encoding ``serve`` uses (``ClipModel.compile_text``:
  torch.compile with frozen weights; compile time printed apart; held to the same 0.99999), int8
  dynamic quantisation of the text MLPs (torch.ao ``quantize_dynamic``) and bfloat16 weights
  (``bf16``; both acceptable only if cosine to the float result >= 0.999), each timed single-phrase
  against the truncated float.

Goal (issue 27): truncated single-phrase p50 <= 15 ms at 2 threads on this machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from diagnosis.vocab import generic_singles, imagenet_classnames, with_article  # noqa: E402
from indexer.clip import ClipModel, ClipSpec, _normalise  # noqa: E402
from indexer.clip_text import encode_tokens, text_tower  # noqa: E402


def vocabulary() -> list[str]:
    return list(dict.fromkeys(generic_singles() + [with_article(n) for n in imagenet_classnames()]))


def pct(ts: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ts) * 1e3, q))


def time_interleaved(fns: dict, phrases: list[str], warmup: int = 5) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds per call of each fn on each phrase; the order of the fns
    alternates phrase by phrase, so both see the same machine load."""
    names = list(fns)
    for p in phrases[:warmup]:
        for n in names:
            fns[n](p)
    out = {n: [] for n in names}
    for i, p in enumerate(phrases):
        for n in names if i % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n](p)
            out[n].append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def report(title: str, times: dict[str, list[tuple[float, float]]], base: str):
    """p50 / p99 of wall time, p50 of CPU time (all threads of the process: it does not count the
    time other processes held the cores, so it is the steadier figure on a shared machine)."""
    print(f"\n{title}")
    print(f"  {'':28s} {'p50 ms':>9s} {'p99 ms':>9s} {'CPU p50':>9s} {'p50 ratio':>10s} {'CPU ratio':>10s}")
    wall = {n: [w for w, _ in ts] for n, ts in times.items()}
    cpu = {n: [c for _, c in ts] for n, ts in times.items()}
    for n in times:
        print(f"  {n:28s} {pct(wall[n], 50):9.2f} {pct(wall[n], 99):9.2f} {pct(cpu[n], 50):9.2f} "
              f"{pct(wall[base], 50) / pct(wall[n], 50):9.2f}x {pct(cpu[base], 50) / pct(cpu[n], 50):9.2f}x")


def compare(a: np.ndarray, b: np.ndarray) -> str:
    cos = (a * b).sum(1)
    return f"cosine min {cos.min():.7f} mean {cos.mean():.7f}, max |diff| {np.abs(a - b).max():.2e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--threads", default="2,1", help="comma-separated torch thread counts (default 2,1)")
    ap.add_argument("--queries", type=int, default=200, help="single-phrase calls per method (default 200)")
    ap.add_argument("--extras", default="", help="comma-separated: int8, bf16, compile (default none)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])

    t0 = time.perf_counter()
    clip = ClipModel(ClipSpec(model=args.model), "cpu")  # random weights from a fixed seed
    print(f"{args.model} (random weights) loaded in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; text tower truncatable: {clip.text_tower is not None}")
    model, tok = clip.model, clip.tokenizer
    vocab = vocabulary()
    rng = np.random.default_rng(0)
    queries = list(rng.choice(vocab, min(args.queries, len(vocab)), replace=False))
    ntok = (tok(queries).argmax(-1) + 1).numpy()
    print(f"vocabulary: {len(vocab)} phrases; queries: {len(queries)}, tokens incl. start/end: "
          f"median {np.median(ntok):.0f}, max {ntok.max()}")

    @torch.inference_mode()
    def full(p: str | list[str]) -> np.ndarray:
        texts = [p] if isinstance(p, str) else p
        return np.concatenate([_normalise(model.encode_text(tok(texts[i : i + 256])))
                               for i in range(0, len(texts), 256)])

    def truncated(p: str | list[str]) -> np.ndarray:
        return clip.encode_text([p] if isinstance(p, str) else p)

    for n in threads:
        torch.set_num_threads(n)
        times = time_interleaved({"full (encode_text)": full, "truncated": truncated}, queries)
        report(f"single phrase, {n} thread(s), {len(queries)} phrases", times, "full (encode_text)")
    torch.set_num_threads(threads[0])

    tf = time.perf_counter()
    a = full(vocab)
    tf = time.perf_counter() - tf
    tt = time.perf_counter()
    b = truncated(vocab)
    tt = time.perf_counter() - tt
    print(f"\nvocabulary ({len(vocab)} phrases, one call, {threads[0]} threads): full {tf:.2f} s, "
          f"truncated {tt:.2f} s = {tf / tt:.2f}x")
    print(f"truncated vs full: {compare(a, b)}")

    def variant(m, tower):
        """Truncated encoding with a modified copy ``m`` of the model (its ``tower``), normalised."""
        @torch.inference_mode()
        def encode(p: str | list[str]) -> np.ndarray:
            return _normalise(encode_tokens(m, tower, tok([p] if isinstance(p, str) else p)))
        return encode

    extras = {e for e in args.extras.split(",") if e}
    fns = {"truncated float": truncated}
    if "int8" in extras:
        qmodel = copy.deepcopy(model)
        qmodel.transformer = torch.ao.quantization.quantize_dynamic(qmodel.transformer, {torch.nn.Linear},
                                                                    dtype=torch.qint8)
        for blk in qmodel.transformer.resblocks:  # open_clip reads the cast dtype from c_fc.weight
            blk.mlp.c_fc.int8_original_dtype = torch.float32
        fns["truncated int8"] = variant(qmodel, text_tower(qmodel))
        print(f"\nint8 dynamic (the MLPs' nn.Linear layers) vs float: {compare(fns['truncated int8'](vocab), a)}")
    if "bf16" in extras:
        bmodel = copy.deepcopy(model).to(torch.bfloat16)
        fns["truncated bf16"] = variant(bmodel, text_tower(bmodel))
        print(f"\nbfloat16 weights vs float: {compare(fns['truncated bf16'](vocab), a)}")
    if "compile" in extras:  # the product's compiled path (ClipModel.compile_text: what `serve` uses)
        cclip = ClipModel(ClipSpec(model=args.model), "cpu")  # the same weights (fixed seed)
        tc = time.perf_counter()
        ok = cclip.compile_text()
        tc = time.perf_counter() - tc
        tv = time.perf_counter()
        got = cclip.encode_text(vocab)
        tv = time.perf_counter() - tv
        print(f"\nClipModel.compile_text (torch.compile, frozen weights): compiled {ok} in {tc:.1f} s; "
              f"vocabulary in one call {tv:.2f} s; vs full: {compare(got, a)}")
        fns["truncated compiled"] = lambda p: cclip.encode_text([p] if isinstance(p, str) else p)
    if len(fns) > 1:
        report(f"single phrase, {threads[0]} threads, extras", time_interleaved(fns, queries), "truncated float")


if __name__ == "__main__":
    main()
