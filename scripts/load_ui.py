"""Many people at once: 16 gradio_client users search the running app while the page keeps loading.

    python scripts/load_ui.py [--db DIR] [--users 16] [--queries 10]

Without --db it builds the tests' small database (tests/fakes.py, --rows images) in a temporary
folder. It launches the app in this process and measures, side by side in one run:

* one user alone: latency of ``/search`` (p50/p95 over ``--queries`` queries);
* ``--users`` users at once, each sending ``--queries`` searches and one ``/similar``: latency
  p50/p95, requests per second, and the ratio to the single user's p50;
* the page itself (GET /) fetched while the users and one slow ``/explain`` run: p50/p95 latency,
  which shows that queued queries do not block the page.

With ``--serve`` the app is the real command, ``llm2loss serve --db DIR --host 127.0.0.1`` in its
own process, and ``--total`` spreads that many searches over the users (issue 7's check:
``--serve --users 16 --total 500``). Every call's failure is counted (``errors``) instead of
stopping the run, and p99 is reported beside p50/p95. All loops are bounded; the server is stopped
at the end.

Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TEXTS = ["a blue circle", "a red square", "a green triangle", "a small shape", "a dark background",
         "a circle", "a square on black", "a bright object"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default=None, help="database to serve (default: a fresh test database)")
    p.add_argument("--rows", type=int, default=600, help="rows of the test database (without --db)")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--queries", type=int, default=10, help="searches per user")
    p.add_argument("--total", type=int, default=None, help="searches in all, spread over the users "
                   "(overrides --queries)")
    p.add_argument("--serve", action="store_true", help="run `llm2loss serve` in its own process and load it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import httpx
    from gradio_client import Client

    from search_ui.app import build_app, launch_kwargs

    tmp = None
    db = args.db
    if db is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.fakes import make_db
        from tests.ui_helpers import fit_ensemble_keep_planted

        tmp = tempfile.TemporaryDirectory(prefix="llm2loss-load-")
        print(f"building a {args.rows}-row test database", file=sys.stderr)
        db = make_db(Path(tmp.name), n=args.rows)
        fit_ensemble_keep_planted(db)
    server = app = None
    if args.serve:
        server, url = start_server(getattr(db, "path", db))
    else:
        app = build_app(db)
        app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None))
        url = app.local_url
    per_user = [args.queries] * args.users
    if args.total is not None:
        per_user = [args.total // args.users + (u < args.total % args.users) for u in range(args.users)]
    errors: list[str] = []
    try:
        def client():
            # a patient user: gradio_client's 5 s default for fetching the API description times
            # out on a 2-core machine running 16 users; latency is measured, not cut off
            return Client(url, verbose=False, httpx_kwargs={"timeout": 60})

        warm = client()
        warm.predict("warm up", 5, 0.5, "", [], api_name="/search")  # loads CLIP and FAISS once

        single = []
        for i in range(args.queries):
            t = time.perf_counter()
            warm.predict(TEXTS[i % len(TEXTS)], 24, 0.5, "", [], api_name="/search")
            single.append(time.perf_counter() - t)

        stop = threading.Event()
        page_lat: list[float] = []

        def page_loader():
            with httpx.Client(timeout=60) as h:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        h.get(url).raise_for_status()
                    except httpx.HTTPError as e:
                        errors.append(f"page: {type(e).__name__}: {str(e)[:200]}")
                    else:
                        page_lat.append(time.perf_counter() - t)
                    time.sleep(0.05)

        def call(c, *a, **kw):
            """One timed request; a failure is counted, not raised (the run measures them)."""
            t = time.perf_counter()
            try:
                return c.predict(*a, **kw), time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 -- any failure is what this measures
                errors.append(f"{kw.get('api_name')}: {type(e).__name__}: {str(e)[:200]}")
                return None, None

        def user(u: int) -> list[float]:
            try:
                c = client()
            except Exception as e:  # noqa: BLE001 -- a user who cannot connect is an error, not a crash
                errors.append(f"connect: {type(e).__name__}: {str(e)[:200]}")
                return []
            lat, res = [], None
            for i in range(per_user[u]):
                out, dt = call(c, TEXTS[(u + i) % len(TEXTS)], 24, 0.5, "", [], api_name="/search")
                if dt is not None:
                    lat.append(dt)
                    res = out or res
            if res:
                _, dt = call(c, res[0]["id"], 12, 0.5, api_name="/similar")
                if dt is not None:
                    lat.append(dt)
            return lat

        if app is not None:
            app.llm2loss_context._modes.clear()  # a cold, slow explain runs during the load
        loader = threading.Thread(target=page_loader, daemon=True)
        loader.start()
        explainer = client().submit(5, api_name="/explain")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.users) as pool:
            lats = [x for lat in pool.map(user, range(args.users)) for x in lat]
        wall = time.perf_counter() - t0
        explain_done = explainer.result() is not None
        stop.set()
        loader.join()
        from indexer.store import Database

        out = {
            "rows": Database(getattr(db, "path", db)).count_rows(),
            "server": "llm2loss serve (own process)" if args.serve else "in-process app",
            "users": args.users,
            "searches_sent": sum(per_user),
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:5],
            "single_user_search_s": {"p50": statistics.median(single), "p95": pct(single, 0.95)},
            "concurrent_s": {"p50": statistics.median(lats), "p95": pct(lats, 0.95), "p99": pct(lats, 0.99),
                             "requests": len(lats),
                             "requests_per_s": len(lats) / wall, "wall_s": wall},
            "p50_ratio_concurrent_to_single": statistics.median(lats) / statistics.median(single),
            "page_get_under_load_s": {"p50": statistics.median(page_lat), "p95": pct(page_lat, 0.95),
                                      "n": len(page_lat)},
            "explain_finished": explain_done,
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    finally:
        if server is not None:
            stop_server(server)
        else:
            with contextlib.redirect_stdout(sys.stderr):  # Gradio announces the shutdown on stdout
                app.close()
        if tmp is not None:
            tmp.cleanup()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Start `llm2loss serve` on a free local port; return (process, url) once the page answers."""
    import httpx

    port = free_port()
    exe = Path(sys.executable).with_name("llm2loss")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "search_ui.cli"]
    proc = subprocess.Popen([*cmd, "serve", "--db", str(db), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=sys.stderr, stderr=sys.stderr, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`llm2loss serve` exited with status {proc.returncode} before answering")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"`llm2loss serve` did not answer on {url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)  # the CLI's clean shutdown
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
