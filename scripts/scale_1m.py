"""At scale: ingest, FAISS, queries, diagnose and explain on 10k -> 100k -> 1M CLIP-like vectors.

    nice -n 10 .venv/bin/python scripts/scale_1m.py --sizes 10000,100000 [--out scale.json]
    nice -n 10 .venv/bin/python scripts/scale_1m.py --sizes 1000000 --queries 1000

The data (512-d, L2-normalised, clustered, losses that depend on the cluster) are written through the
product's own table path: ``indexer.schema.table_schema`` + ``Database.append`` in commits of
``indexer.pipeline.COMMIT_ROWS`` rows, each followed by ``meta.json``'s ``data_version`` stamp, exactly
as ``llm2loss index`` commits (only the CLIP image encoder is replaced by the generator; embedding
speed is the GPU script's business, ``scripts/gpu_check.py``).

How the vectors look like CLIP's: 1,000 concepts "a {colour} {object} {place}" are encoded by a
512-d CLIP text tower (the world's tiny architecture widened to 512 output dims, random weights);
each concept's image cluster centre is its text embedding minus the text mean (the modality gap),
plus a shared image direction, so a caption finds its images the way a real CLIP caption does.
Samples are their centre plus Gaussian noise (cosine ~0.78 to the centre), normalised. 5% of the
concepts are failure concepts with ~8x the mean loss. Cluster sizes are uneven (gamma weights).

Each step runs in its own process so its peak memory is its own: the process's resident set after
imports and model loading is the baseline (the "models" part), ``/proc/self/clear_refs`` resets the
kernel's high-water mark, and ``VmHWM`` after the step is the peak; the step's own cost is
peak - baseline, compared with the raw vector bytes (n x 512 x 4).

Steps per size: ``ingest`` (rows/s into LanceDB), ``ann`` (``indexer.ann.build_index``), ``query``
(``QueryEngine.search(text, k=10)`` against bare ``encode_text`` + FAISS ``search(u, 10)`` on the same
model and index, interleaved query by query, 1 torch and 1 FAISS thread for both), ``recall`` (the
served index against exact search, for the text queries and for held-out image-like vectors),
``diagnose`` and ``explain``. ``--vit-queries`` also times ViT-B-32's text tower (random weights: the
cost of a forward pass does not depend on them) so the real model's query latency can be read off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DIM = 512
SEED = 0
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "grey"]
OBJECTS = ["dog", "cat", "car", "bird", "chair", "boat", "horse", "truck", "plane", "bottle"]
PLACES = ["on snow", "on grass", "in a street", "indoors", "at night", "on a beach", "in fog",
          "in a forest", "on a table", "in water"]
FAIL_SHARE = 0.05
NOISE = 0.8  # |noise| relative to the unit centre: cos(sample, centre) ~ 1/sqrt(1 + 0.8^2)
CHUNK = 16384  # rows generated at a time (32 MiB: the generator's memory stays flat and small)

# The world's tiny CLIP, widened to CLIP ViT-B-32's 512 output dims (text tower: 3 layers x 128).
TINY512 = {
    "embed_dim": DIM,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 32, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


# ---- memory ---------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


class Peak:
    """Peak resident memory of a block, over the resident memory at its start (bytes).

    ``extra``: the kernel's high-water mark (VmHWM) over the start. It also counts file-backed pages
    (shared-library code paged in on first use: lance's is large), so ``anon_extra`` samples the
    anonymous memory (RssAnon: the data) every 10 ms and reports its peak over the start.
    """

    def __enter__(self):
        import threading

        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.base = _status_kib("VmRSS") * 1024
        self.anon_base = self.anon_peak = _status_kib("RssAnon") * 1024
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.01):
                self.anon_peak = max(self.anon_peak, _status_kib("RssAnon") * 1024)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._sampler.join()
        self.peak = _status_kib("VmHWM") * 1024
        self.extra = max(0, self.peak - self.base)
        self.anon_extra = max(0, max(self.anon_peak, _status_kib("RssAnon") * 1024) - self.anon_base)

    def to_dict(self, n: int) -> dict:
        raw = n * DIM * 4
        return {"seconds": round(self.seconds, 2), "rss_base_mib": round(self.base / 2**20),
                "rss_peak_mib": round(self.peak / 2**20), "step_mib": round(self.extra / 2**20),
                "step_over_raw": round(self.extra / raw, 2), "anon_step_mib": round(self.anon_extra / 2**20),
                "anon_step_over_raw": round(self.anon_extra / raw, 2)}


# ---- the synthetic world --------------------------------------------------------------------------
def concepts() -> list[str]:
    return [f"a {c} {o} {p}" for c in COLOURS for o in OBJECTS for p in PLACES]


def spec_for(work: Path):
    from indexer.clip import ClipSpec

    path = work / "scale-tiny512.json"
    if not path.exists():
        path.write_text(json.dumps(TINY512, indent=2))
    return ClipSpec(model=str(path))


class World:
    """Concept centres (k, 512), cluster weights (k,), mean loss per concept (k,), failure mask (k,)."""

    def __init__(self, clip):
        rng = np.random.default_rng(SEED)
        self.phrases = concepts()
        T = clip.encode_text(self.phrases).astype(np.float64)
        mean_t = T.mean(axis=0)
        u = mean_t / np.linalg.norm(mean_t)
        R = T - mean_t
        R -= np.outer(R @ u, u)  # what tells one caption from another, without the text cone's axis
        R /= np.linalg.norm(R, axis=1, keepdims=True)
        img_axis = rng.normal(size=DIM)
        img_axis -= (img_axis @ u) * u
        img_axis /= np.linalg.norm(img_axis)
        C = R + 0.8 * img_axis  # images share an axis of their own: CLIP's image cone
        self.centres = (C / np.linalg.norm(C, axis=1, keepdims=True)).astype(np.float32)
        k = len(self.phrases)
        w = rng.gamma(2.0, 1.0, k)
        self.weights = w / w.sum()
        self.failing = np.zeros(k, bool)
        self.failing[rng.choice(k, int(FAIL_SHARE * k), replace=False)] = True
        self.mean_loss = np.where(self.failing, 2.5, rng.gamma(2.0, 0.15, k))

    def chunk(self, start: int, m: int, stream: int = 0):
        """Rows start..start+m of a stream (0: the table, 1: held-out queries): (x (m, 512) float32
        unit, concept (m,), loss (m,) float32, is_test (m,) bool), the same on every call."""
        rng = np.random.default_rng([SEED, stream, start])
        c = rng.choice(len(self.weights), size=m, p=self.weights)
        x = self.centres[c] + (NOISE / np.sqrt(DIM)) * rng.standard_normal((m, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        loss = (self.mean_loss[c] * rng.gamma(2.0, 0.5, m)).astype(np.float32)
        return x, c, loss, rng.random(m) < 0.2


# ---- steps (each in its own process) --------------------------------------------------------------
def _open(db_path: Path):
    from indexer.store import Database

    return Database(db_path)


def step_ingest(db_path: Path, n: int, work: Path) -> dict:
    import pyarrow as pa

    from indexer import schema as S
    from indexer.clip import load_clip
    from indexer.pipeline import COMMIT_ROWS
    from indexer.store import Database

    spec = spec_for(work)
    world = World(load_clip(spec, "cpu"))
    (work / "vocab.txt").write_text("\n".join(world.phrases) + "\n")  # explain's dataset vocabulary
    meta_schema = pa.schema([pa.field("concept", pa.string())])
    gen_s = 0.0
    with Peak() as pk:
        db = Database(db_path, create=True)
        schema = S.table_schema(DIM, meta_schema)
        db.create_table(schema)
        db.update_meta(clip=spec.identity(), clip_spec=spec.to_dict(), embed_dim=DIM,
                       sources=[str(work / "manifest.parquet")], image_roots=[str(work / "images")])
        for start in range(0, n, CHUNK):
            t = time.perf_counter()
            x, c, loss, test = world.chunk(start, min(CHUNK, n - start))
            gen_s += time.perf_counter() - t
            for s in range(0, len(x), COMMIT_ROWS):  # one Lance commit per COMMIT_ROWS, as `index` does
                e = slice(s, s + COMMIT_ROWS)
                m = len(x[e])
                ids = np.arange(start + s, start + s + m)
                t = time.perf_counter()
                data = pa.Table.from_arrays([
                    pa.array([f"r{i:07d}" for i in ids]),
                    pa.array([f"{work}/images/{i:07d}.png" for i in ids]),
                    pa.array([f"class_{j % 20}" for j in c[e]]),
                    pa.array(np.where(test[e], "test", "train")),
                    pa.array(loss[e]),
                    pa.FixedSizeListArray.from_arrays(pa.array(x[e].reshape(-1)), DIM),
                    pa.nulls(m, pa.float32()), pa.nulls(m, pa.float32()), *S.no_identity(m).values(),
                    pa.array([world.phrases[j] for j in c[e]]),
                ], schema=schema)
                gen_s += time.perf_counter() - t
                version = db.append(data)
                db.update_meta(data_version=version)
    out = pk.to_dict(n)
    write_s = pk.seconds - gen_s
    ds = db.table.to_lance()
    out.update(rows=db.count_rows(), write_seconds=round(write_s, 2), rows_per_s=round(n / write_s),
               commits=-(-n // COMMIT_ROWS), fragments=len(ds.get_fragments()),
               versions=len(db.table.list_versions()), folder_mib=round(_du(db_path) / 2**20))
    return out


def step_ann(db_path: Path, n: int, work: Path) -> dict:
    from indexer import ann

    db = _open(db_path)
    with Peak() as pk:
        info = ann.build_index(db)
    return {**pk.to_dict(n), **{k: info.get(k) for k in ("kind", "nlist", "nprobe", "recall_at_10",
                                                         "build_seconds", "index_bytes")}}


def _pct(xs, q) -> float:
    return round(1000 * float(np.percentile(xs, q)), 2)


def step_query(db_path: Path, n: int, work: Path, queries: int) -> dict:
    import faiss
    import torch

    from search_ui.engine import QueryEngine

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(1)
    phrases = list(rng.permutation(concepts()))
    phrases = (phrases * (queries // len(phrases) + 1))[:queries]
    t0 = time.perf_counter()
    engine = QueryEngine(_open(db_path), device="cpu")
    clip, index = engine.clip, engine.ann  # load CLIP and FAISS before timing (a server's steady state)
    load_s = time.perf_counter() - t0
    for p in phrases[:5]:  # warm-up: first calls allocate
        engine.search(p, k=10)
        index.search(clip.encode_text([p]), 10)
    eng, bare, bare_enc, bare_ann = [], [], [], []
    parts: dict[str, list[float]] = {k: [] for k in ("encode", "check", "ann", "fetch", "rank")}
    with Peak() as pk:
        for i, p in enumerate(phrases):
            def run_bare(p=p):
                t = time.perf_counter()
                u = clip.encode_text([p])
                t1 = time.perf_counter()
                index.search(u, 10)
                t2 = time.perf_counter()
                bare_enc.append(t1 - t), bare_ann.append(t2 - t1), bare.append(t2 - t)

            def run_engine(p=p):
                t = time.perf_counter()
                engine.search(p, k=10)
                eng.append(time.perf_counter() - t)
                for k in parts:
                    parts[k].append(engine.timings.get(k, 0.0))

            # alternate which path goes first so neither always meets a warm cache
            for f in ((run_bare, run_engine) if i % 2 else (run_engine, run_bare)):
                f()
    eng_a, bare_a = np.array(eng), np.array(bare)
    post = eng_a - np.array(parts["encode"])
    return {
        **pk.to_dict(n), "queries": queries, "load_seconds": round(load_s, 2),
        "engine_p50_ms": _pct(eng_a, 50), "engine_p99_ms": _pct(eng_a, 99),
        "bare_p50_ms": _pct(bare_a, 50), "bare_p99_ms": _pct(bare_a, 99),
        "ratio_p50": round(float(np.median(eng_a) / np.median(bare_a)), 3),
        "ratio_p99": round(float(np.percentile(eng_a, 99) / np.percentile(bare_a, 99)), 3),
        "bare_encode_p50_ms": _pct(bare_enc, 50), "bare_faiss_p50_ms": _pct(bare_ann, 50),
        "bare_faiss_p99_ms": _pct(bare_ann, 99),
        "engine_after_encode_p50_ms": _pct(post, 50), "engine_after_encode_p99_ms": _pct(post, 99),
        "parts_p50_ms": {k: _pct(v, 50) for k, v in parts.items()},
        "nprobe_pool": index.nprobe_for(100), "index_kind": index.info.get("kind"),
    }


def step_recall(db_path: Path, n: int, work: Path, queries: int) -> dict:
    """Recall@10 of the served index (as the engine loads it) against exact inner-product search."""
    import faiss

    from indexer.clip import clip_for_database
    from search_ui.engine import QueryEngine
    from search_ui.ranking import neighbourhood_size

    db = _open(db_path)
    clip = clip_for_database(db.read_meta(), "cpu")
    world = World(clip)
    engine = QueryEngine(db, device="cpu", rebuild_if_stale=False)
    served = engine.ann  # the index as the engine loads it
    ids, x = db.embeddings()
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    del x
    rng = np.random.default_rng(2)
    text_q = clip.encode_text(list(rng.choice(world.phrases, min(queries, len(world.phrases)), replace=False)))
    img_q = world.chunk(0, queries, stream=1)[0]
    out = {}
    for name, q in (("text", text_q), ("image", img_q)):
        _, truth = exact.search(q, 10)
        _, got = served.search(q, 10)
        tid = ids[truth]
        out[f"recall10_{name}"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                       zip(tid.tolist(), got.tolist(), strict=True)])), 4)
        # the engine's least pool: the 100 most similar rows of the neighbourhood the engine
        # searches for a default query (k = 10: 1,000 rows, its probing rule included)
        _, truth100 = exact.search(q, 100)
        got100 = [engine._pool(u, neighbourhood_size(100), 100, None, set()).ids(np.arange(100)).tolist()
                  for u in q]
        out[f"recall100_pool_{name}"] = round(float(np.mean([len(set(a) & set(b)) / 100 for a, b in
                                                             zip(ids[truth100].tolist(), got100,
                                                                 strict=True)])), 4)
    out["queries"] = {"text": len(text_q), "image": len(img_q)}
    return out


def step_diagnose(db_path: Path, n: int, work: Path, max_rows: int | None, members: int | None) -> dict:
    from diagnosis.run import diagnose

    db = _open(db_path)
    with Peak() as pk:
        r = diagnose(db, members=members, max_rows=max_rows, progress=False)
    return {**pk.to_dict(n), "fitted_rows": r.fitted_rows, "members": r.members, "folds": r.folds,
            "spearman": round(r.spearman, 3), "auroc_top10": round(r.auroc_top10, 3), "timings": r.timings,
            "versions": len(db.table.list_versions()), "folder_mib": round(_du(db_path) / 2**20)}


def step_explain(db_path: Path, n: int, work: Path) -> dict:
    from diagnosis.explain import explain
    from indexer.clip import clip_for_database

    db = _open(db_path)
    world = World(clip_for_database(db.read_meta(), "cpu"))
    failing = {p for p, f in zip(world.phrases, world.failing, strict=True) if f}
    with Peak() as pk:
        modes = explain(db, top=10)
    hits = sum(m.description in failing for m in modes)
    return {**pk.to_dict(n), "modes": len(modes), "top10_failure_concepts": hits,
            "worst": modes[0].description if modes else None}


def step_vit(queries: int) -> dict:
    import torch

    from indexer.clip import ClipSpec, load_clip

    torch.set_num_threads(1)
    clip = load_clip(ClipSpec("ViT-B-32"), "cpu")
    phrases = concepts()[: queries + 2]
    clip.encode_text(phrases[:2])
    ts = []
    for p in phrases[2:]:
        t = time.perf_counter()
        clip.encode_text([p])
        ts.append(time.perf_counter() - t)
    return {"vit_b32_text_encode_p50_ms": _pct(ts, 50), "vit_b32_text_encode_p99_ms": _pct(ts, 99),
            "queries": len(ts)}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---- orchestration --------------------------------------------------------------------------------
STEPS = ("ingest", "ann", "diagnose", "explain", "query", "recall")


def run_step(name: str, db: Path, n: int, work: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--step", name, "--db", str(db), "--rows", str(n), "--work", str(work),
           "--queries", str(args.queries), "--vit-queries", str(args.vit_queries)]
    if args.max_rows:
        cmd += ["--max-rows", str(args.max_rows)]
    if args.members:
        cmd += ["--members", str(args.members)]
    print(f"[{n:,}] {name} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}"}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = round(time.perf_counter() - t, 1)
    print(f"[{n:,}] {name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def table(results: dict) -> str:
    sizes = list(results)

    def row(label, f):
        cells = []
        for s in sizes:
            try:
                cells.append(f(results[s]))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        return f"| {label} | " + " | ".join(cells) + " |"

    head = "| | " + " | ".join(f"{int(s):,} rows" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes),
             row("ingest rows/s (LanceDB, commits of 1024)", lambda r: f"{r['ingest']['rows_per_s']:,}"),
             row("ingest peak over base (x raw)", lambda r: f"{r['ingest']['step_mib']} MiB ({r['ingest']['step_over_raw']}x)"),
             row("ingest anonymous (data) peak over base (x raw)", lambda r: f"{r['ingest']['anon_step_mib']} MiB ({r['ingest']['anon_step_over_raw']}x)"),
             row("table folder / fragments / versions", lambda r: f"{r['ingest']['folder_mib']} MiB / {r['ingest']['fragments']} / {r['ingest']['versions']}"),
             row("FAISS build s (kind, nlist, nprobe)", lambda r: f"{r['ann']['build_seconds']} ({r['ann']['kind']}, {r['ann']['nlist']}, {r['ann']['nprobe']})"),
             row("FAISS build peak over base (x raw)", lambda r: f"{r['ann']['step_mib']} MiB ({r['ann']['step_over_raw']}x)"),
             row("FAISS build anonymous (data) peak over base (x raw)", lambda r: f"{r['ann']['anon_step_mib']} MiB ({r['ann']['anon_step_over_raw']}x)"),
             row("recall@10 served vs exact: text / image queries", lambda r: f"{r['recall']['recall10_text']} / {r['recall']['recall10_image']}"),
             row("recall@100 of the engine's pool: text / image", lambda r: f"{r['recall']['recall100_pool_text']} / {r['recall']['recall100_pool_image']}"),
             row("query p50 / p99 ms: engine", lambda r: f"{r['query']['engine_p50_ms']} / {r['query']['engine_p99_ms']}"),
             row("query p50 / p99 ms: bare encode + FAISS k=10", lambda r: f"{r['query']['bare_p50_ms']} / {r['query']['bare_p99_ms']}"),
             row("ratio engine / bare: p50 / p99", lambda r: f"{r['query']['ratio_p50']} / {r['query']['ratio_p99']}"),
             row("engine after encoding p50 / p99 ms (bare FAISS p50)", lambda r: f"{r['query']['engine_after_encode_p50_ms']} / {r['query']['engine_after_encode_p99_ms']} ({r['query']['bare_faiss_p50_ms']})"),
             row("engine parts p50 ms: encode/check/ann/fetch/rank", lambda r: "/".join(str(v) for v in r['query']['parts_p50_ms'].values())),
             row("served memory: engine RSS after load", lambda r: f"{r['query']['rss_base_mib']} MiB"),
             row("diagnose s (fit rows, members x folds)", lambda r: f"{r['diagnose']['seconds']} ({r['diagnose']['fitted_rows']:,}, {r['diagnose']['members']}x{r['diagnose']['folds']})"),
             row("diagnose peak over base (x raw)", lambda r: f"{r['diagnose']['step_mib']} MiB ({r['diagnose']['step_over_raw']}x)"),
             row("diagnose anonymous (data) peak over base (x raw)", lambda r: f"{r['diagnose']['anon_step_mib']} MiB ({r['diagnose']['anon_step_over_raw']}x)"),
             row("diagnose out-of-fold Spearman", lambda r: str(r['diagnose']['spearman'])),
             row("explain s (failure concepts in top 10)", lambda r: f"{r['explain']['seconds']} ({r['explain']['top10_failure_concepts']}/10)"),
             row("explain peak over base (x raw)", lambda r: f"{r['explain']['step_mib']} MiB ({r['explain']['step_over_raw']}x)"),
             row("explain anonymous (data) peak over base (x raw)", lambda r: f"{r['explain']['anon_step_mib']} MiB ({r['explain']['anon_step_over_raw']}x)"),
             ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated row counts")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--vit-queries", type=int, default=20, help="ViT-B-32 text encodes to time (0: skip)")
    ap.add_argument("--max-rows", type=int, default=None, help="diagnose --max-rows (default: the product's)")
    ap.add_argument("--members", type=int, default=None, help="diagnose --members (default: the product's)")
    ap.add_argument("--dir", default=None, help="parent folder of the databases (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the databases")
    ap.add_argument("--out", default=None, help="also write all results as JSON here")
    # internal: run one step in this process
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.step:
        db, work, n = Path(args.db), Path(args.work), args.rows
        fn = {"ingest": lambda: step_ingest(db, n, work), "ann": lambda: step_ann(db, n, work),
              "query": lambda: step_query(db, n, work, args.queries),
              "recall": lambda: step_recall(db, n, work, args.queries),
              "diagnose": lambda: step_diagnose(db, n, work, args.max_rows, args.members),
              "explain": lambda: step_explain(db, n, work), "vit": lambda: step_vit(args.vit_queries)}
        print(json.dumps(fn[args.step]()), flush=True)
        return

    steps = [s for s in args.steps.split(",") if s]
    root = Path(args.dir or tempfile.mkdtemp(prefix="llm2loss-scale-"))
    results: dict = {}
    extra = {}
    if args.vit_queries:
        extra["vit"] = run_step("vit", root, 0, root, args)
    for n in (int(s) for s in args.sizes.split(",")):
        work = root / f"n{n}"
        db = work / "db"
        if "ingest" in steps and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        results[n] = {s: run_step(s, db, n, work, args) for s in steps}
        if args.out:
            Path(args.out).write_text(json.dumps({"results": results, **extra}, indent=1))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if "vit" in extra:
        print(f"\nViT-B-32 text tower, 1 thread: {json.dumps(extra['vit'])}")


if __name__ == "__main__":
    main()
