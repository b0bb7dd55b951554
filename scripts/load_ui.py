"""Many people at once: 16 gradio_client users search the running app while the page keeps loading.

    python scripts/load_ui.py [--db DIR] [--users 16] [--queries 10]

Without --db it builds the tests' small database (tests/fakes.py, --rows images) in a temporary
folder. It launches the app in this process and measures, side by side in one run:

* one user alone: latency of ``/search`` (p50/p95 over ``--queries`` queries);
* ``--users`` users at once, each sending ``--queries`` searches and one ``/similar``: latency
  p50/p95, requests per second, and the ratio to the single user's p50;
* the page itself (GET /) fetched while the users and one slow ``/explain`` run: p50/p95 latency,
  which shows that queued queries do not block the page.

Prints one JSON document on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
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
    app = build_app(db)
    app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None))
    url = app.local_url
    try:
        warm = Client(url, verbose=False)
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
                    r = h.get(url)
                    r.raise_for_status()
                    page_lat.append(time.perf_counter() - t)
                    time.sleep(0.05)

        def user(u: int) -> list[float]:
            c = Client(url, verbose=False)
            lat = []
            for i in range(args.queries):
                t = time.perf_counter()
                res = c.predict(TEXTS[(u + i) % len(TEXTS)], 24, 0.5, "", [], api_name="/search")
                lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.predict(res[0]["id"], 12, 0.5, api_name="/similar")
            lat.append(time.perf_counter() - t)
            return lat

        app.llm2loss_context._modes.clear()  # a cold, slow explain runs during the load
        loader = threading.Thread(target=page_loader, daemon=True)
        loader.start()
        explainer = Client(url, verbose=False).submit(5, api_name="/explain")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.users) as pool:
            lats = [x for lat in pool.map(user, range(args.users)) for x in lat]
        wall = time.perf_counter() - t0
        explain_done = explainer.result() is not None
        stop.set()
        loader.join()
        out = {
            "rows": app.llm2loss_context.db.count_rows(),
            "users": args.users,
            "single_user_search_s": {"p50": statistics.median(single), "p95": pct(single, 0.95)},
            "concurrent_s": {"p50": statistics.median(lats), "p95": pct(lats, 0.95), "requests": len(lats),
                             "requests_per_s": len(lats) / wall, "wall_s": wall},
            "p50_ratio_concurrent_to_single": statistics.median(lats) / statistics.median(single),
            "page_get_under_load_s": {"p50": statistics.median(page_lat), "p95": pct(page_lat, 0.95),
                                      "n": len(page_lat)},
            "explain_finished": explain_done,
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # Gradio announces the shutdown on stdout
            app.close()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
