"""The JSON HTTP API against the engine it serves and against Gradio's API, in one run.

    PYTHONPATH=. python scripts/bench_api.py --db DIR [--queries 200] [--clients 16] [--total 500]
                                             [--api-total 8000] [--k 24] [--out FILE.json]

It starts the real server, ``python -m search_ui.cli serve --db DIR`` (this checkout's code), in its
own process on a free local port, and measures:

1. **One client**: ``POST /api/v1/search`` (``http.client``, one kept-alive connection) against
   ``QueryEngine.search`` in this process, on the same database and the same ``--queries`` phrases
   (the dataset's own vocabulary), interleaved query by query and alternating which goes first, so
   both see the same machine load. Twice: ``distinct`` (each phrase's first query: both sides
   encode it with CLIP) and ``repeated`` (the same phrases again: both reuse the text embedding
   from their LRU; ``requests`` is timed beside them). Reported: p50 / p99 of each, the ratio of
   the p50s, and whether the API returned exactly the engine's ids in the same order every time.
2. **Under load**: ``--clients`` threads sending ``--total`` searches in all (k = ``--k``, cycling
   through the phrases from a different offset each), first to ``/api/v1/search``, then the same
   load to Gradio's ``/search`` through ``gradio_client``: errors, throughput, p50 / p99; then
   ``--api-total`` searches (16 x 500) to the API alone. Meanwhile a page loader fetches what a
   browser needs to show the page (``GET /`` and ``GET /config``) every 0.25 s: p50 / p99 / max.

Prints one JSON document on stdout (progress on stderr). A benchmark, not a test: run it on a quiet
machine and record the numbers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scripts.load_ui import free_port, stop_server  # noqa: E402 -- after the path set-up above


def ms(xs, q) -> float:
    return round(1000 * float(np.percentile(np.asarray(xs, float), q)), 2) if len(xs) else float("nan")


def start_server(db: str, log_path: Path, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """``python -m search_ui.cli serve`` (this checkout's code, unlike load_ui's ``llm2loss``) on a free
    port; (process, url) once /api/v1/health answers."""
    import requests

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    log = open(log_path, "w")  # noqa: SIM115 -- the server's output, kept for the whole run
    proc = subprocess.Popen([sys.executable, "-m", "search_ui.cli", "serve", "--db", db, "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=log, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}; see {log_path}")
        try:
            if requests.get(url + "api/v1/health", timeout=5).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not answer on {url} within {timeout:.0f} s; see {log_path}")


def phrases_for(db, n: int) -> list[str]:
    from diagnosis.vocab import default_vocabulary

    vocab = list(dict.fromkeys(default_vocabulary(db)))
    rng = np.random.default_rng(0)
    return [vocab[i] for i in rng.permutation(len(vocab))[:n]]


class Lean:
    """A kept-alive ``http.client`` connection: the least a Python caller can spend on a request."""

    def __init__(self, url: str):
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)

    def post(self, path: str, obj) -> dict:
        self.conn.request("POST", path, body=json.dumps(obj).encode(), headers={"content-type": "application/json"})
        r = self.conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {body[:200]!r}")
        return json.loads(body)


def one_client(engine, url: str, phrases: list[str], k: int) -> dict:
    """Interleaved, query by query, alternating who goes first: the engine in this process and the
    API through ``http.client``; in the repeated pass also through ``requests`` (what most callers
    use; it costs ~0.8 ms a call of its own). The two processes have their own text caches, so in
    the distinct pass each side meets every phrase uncached."""
    import requests

    out = {}
    lean = Lean(url)
    with requests.Session() as s:
        for label in ("distinct", "repeated"):
            lat: dict[str, list[float]] = {"engine": [], "api": [], "api_requests": []}
            same = 0
            for i, p in enumerate(phrases):
                got: dict[str, list[str]] = {}
                calls = {
                    "engine": lambda p=p: [r.id for r in engine.search([(p, 1.0)], k=k)],
                    "api": lambda p=p: [x["id"] for x in lean.post("/api/v1/search", {"text": p, "k": k})["results"]],
                    "api_requests": lambda p=p: [x["id"] for x in s.post(url + "api/v1/search", json={
                        "text": p, "k": k}).json()["results"]],
                }
                names = ["engine", "api"] if i % 2 else ["api", "engine"]
                if label == "repeated":
                    names.append("api_requests")
                for name in names:
                    t = time.perf_counter()
                    got[name] = calls[name]()
                    lat[name].append(time.perf_counter() - t)
                same += all(ids == got["engine"] for ids in got.values())
            row = {"queries": len(phrases)}
            for name, xs in lat.items():
                if xs:
                    row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = ms(xs, 50), ms(xs, 99)
            row["ratio_p50"] = round(float(np.median(lat["api"]) / np.median(lat["engine"])), 2)
            if lat["api_requests"]:
                row["ratio_p50_requests"] = round(float(np.median(lat["api_requests"]) / np.median(lat["engine"])), 2)
            row["same_ids_in_order"] = same
            out[label] = row
            print(f"one client, {label}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return out


def under_load(kind: str, url: str, phrases: list[str], clients: int, total: int, k: int) -> dict:
    """``clients`` threads sending ``total`` searches in all (spread evenly) to ``kind`` ("api" or
    "gradio"), while a page loader fetches the page; every failure is counted, none stops the run."""
    per = [total // clients + (c < total % clients) for c in range(clients)]
    import requests

    errors: list[str] = []
    stop = threading.Event()
    page: list[float] = []

    def page_loader():
        with requests.Session() as s:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    s.get(url, timeout=60).raise_for_status()
                    s.get(url + "config", timeout=60).raise_for_status()
                except requests.RequestException as e:
                    errors.append(f"page: {type(e).__name__}: {str(e)[:200]}")
                else:
                    page.append(time.perf_counter() - t)
                stop.wait(0.25)

    def client(c: int) -> list[float]:
        lat = []
        if kind == "api":
            s = requests.Session()

            def call(p):
                r = s.post(url + "api/v1/search", json={"text": p, "k": k}, timeout=120)
                r.raise_for_status()
                return r.json()["results"]
        else:
            from gradio_client import Client

            try:
                g = Client(url, verbose=False, httpx_kwargs={"timeout": 120})
            except Exception as e:  # noqa: BLE001 -- a client that cannot connect is an error to count
                errors.append(f"connect: {type(e).__name__}: {str(e)[:200]}")
                return lat

            def call(p):
                return g.predict(p, k, 0.5, "", [], api_name="/search")

        for i in range(per[c]):
            p = phrases[(c * 37 + i) % len(phrases)]
            t = time.perf_counter()
            try:
                res = call(p)
                if len(res) != k:
                    raise RuntimeError(f"{len(res)} results for k={k}")
            except Exception as e:  # noqa: BLE001 -- every failure is counted, none stops the run
                errors.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
            else:
                lat.append(time.perf_counter() - t)
        return lat

    loader = threading.Thread(target=page_loader, daemon=True)
    loader.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lats = [x for lat in pool.map(client, range(clients)) for x in lat]
    wall = time.perf_counter() - t0
    stop.set()
    loader.join()
    out = {"clients": clients, "queries": total, "errors": len(errors),
           "error_examples": sorted(set(errors))[:5], "wall_s": round(wall, 1),
           "throughput_per_s": round(len(lats) / wall, 1), "p50_ms": ms(lats, 50), "p99_ms": ms(lats, 99),
           "page_loads": len(page), "page_p50_ms": ms(page, 50), "page_p99_ms": ms(page, 99),
           "page_max_ms": round(1000 * max(page), 1) if page else None}
    print(f"under load, {kind}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="database folder to serve")
    ap.add_argument("--queries", type=int, default=200, help="distinct phrases (the one-client comparison)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--total", type=int, default=500, help="searches in all under load, spread over the clients "
                    "(the same load for the API and for Gradio)")
    ap.add_argument("--api-total", type=int, default=8000, help="then this many against the API alone "
                    "(16 x 500; 0: skip)")
    ap.add_argument("--k", type=int, default=24, help="results per search (the UI's default)")
    ap.add_argument("--skip-gradio", action="store_true", help="load only the JSON API")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import requests

    from indexer.store import Database
    from search_ui.engine import QueryEngine

    db = Database(args.db)
    phrases = phrases_for(db, args.queries)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_api_server_{os.getpid()}.log"
    print(f"{db.count_rows():,} rows, {len(phrases)} phrases; server log {log_path}", file=sys.stderr)
    t = time.perf_counter()
    proc, url = start_server(str(db.path), log_path)
    result: dict = {"rows": db.count_rows(), "server_start_s": round(time.perf_counter() - t, 1), "k": args.k}
    try:
        warm = [f"warm-up phrase {i}" for i in range(5)]  # never among the measured phrases
        engine = QueryEngine(db)
        for p in warm:
            engine.search(p, k=args.k)
            requests.post(url + "api/v1/search", json={"text": p, "k": args.k}, timeout=600).raise_for_status()
        result["one_client"] = one_client(engine, url, phrases, args.k)
        result["load_api"] = under_load("api", url, phrases, args.clients, args.total, args.k)
        if not args.skip_gradio:
            result["load_gradio"] = under_load("gradio", url, phrases, args.clients, args.total, args.k)
        if args.api_total:
            result["load_api_long"] = under_load("api", url, phrases, args.clients, args.api_total, args.k)
    finally:
        stop_server(proc)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
