"""The Gradio app: it starts, every API endpoint answers through gradio_client with the library's
numbers, errors come back as one readable sentence, and the file route serves dataset images only."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from scipy.stats import spearmanr

from indexer import schema as S
from indexer.errors import UserError
from search_ui.ui.context import ImageGuard, caption
from tests.fakes import make_db
from tests.ui_helpers import fit_ensemble_keep_planted

gradio_client = pytest.importorskip("gradio_client")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


needs_selections = pytest.mark.skipif(not (_has("search_ui.selections") and _has("search_ui.export")),
                                      reason="search_ui.selections / search_ui.export not written yet")
needs_explain = pytest.mark.skipif(not _has("diagnosis.explain"), reason="diagnosis.explain not written yet")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(app, url, db, folder): the app over a 120-row database, on a free port."""
    from search_ui.app import build_app, launch_kwargs

    folder = tmp_path_factory.mktemp("app")
    db = make_db(folder, n=120)
    fit_ensemble_keep_planted(db)
    (folder / "secret.txt").write_text("not an image")
    app = build_app(db)
    app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None))
    yield app, app.local_url, db, folder
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


def test_api_names(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/search", "/similar", "/explain", "/details", "/selections", "/add_to_selection",
            "/selection", "/health", "/download", "/similar_image"} <= names


def test_search_ranks_planted_failures_first(client, served):
    # weight 1 ranks the candidate pool by predicted loss alone: the planted blue circles lead.
    res = client.predict("a blue circle", 5, 1.0, "", [], api_name="/search")
    assert len(res) == 5
    assert all(r["color"] == "blue" and r["label"] == "circle" for r in res)
    preds = [r["predicted_loss"] for r in res]
    assert preds == sorted(preds, reverse=True)
    assert {"id", "image", "label", "split", "loss", "predicted_loss", "predicted_loss_std",
            "similarity", "score"} <= set(res[0])


def test_search_filter_and_same_answer_as_engine(client, served):
    res = client.predict("a red square", 8, 0.5, "split = 'test'", ["a circle"], api_name="/search")
    assert res and all(r["split"] == "test" for r in res)
    # The app's own engine: the test CLIP has random weights, drawn anew by each load.
    direct = served[0].llm2loss_context.engine.search("a red square", k=8, where="split = 'test'", weight=0.5,
                                           negatives=["a circle"])
    assert [r["id"] for r in res] == [r.id for r in direct]


def test_similar_and_details(client, served):
    res = client.predict("s00003", 6, 0.5, api_name="/similar")
    assert len(res) == 6 and "s00003" not in [r["id"] for r in res]
    rows = client.predict(["s00007", "s00003", "nope"], api_name="/details")
    assert [r["id"] for r in rows] == ["s00007", "s00003"]
    assert "embedding" not in rows[0]
    table = served[2].rows_by_id(["s00007"], [S.LOSS]).to_pylist()
    assert rows[0]["loss"] == pytest.approx(table[0][S.LOSS])


def test_similar_image_upload(client, served):
    folder = served[3]
    out = client.predict(gradio_client.handle_file(str(folder / "images" / "00006_blue_circle.png")), "",
                         5, 0.5, api_name="/similar_image")
    gallery, status, *_ = out
    assert len(gallery) == 5 and "5 results" in status


def test_health_numbers(client, served):
    h = client.predict(api_name="/health")
    t = served[2].read([S.LOSS, S.PREDICTED_LOSS, S.LABEL]).to_pandas()
    assert h["rows"] == 120
    assert h["spearman"] == pytest.approx(spearmanr(t[S.LOSS], t[S.PREDICTED_LOSS]).statistic, abs=1e-9)
    by_label = {r["label"]: r for r in h["labels"]}
    assert by_label["circle"]["mean_loss"] == pytest.approx(t[t[S.LABEL] == "circle"][S.LOSS].mean(), rel=1e-5)
    assert h["labels"][0]["label"] == "circle"  # worst first: the blue circles fail


def test_errors_are_one_readable_sentence(client):
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict("", 5, 0.5, "", [], api_name="/search")
    assert "search box is empty" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict("a dog", 5, 0.5, "no_such_column > 1", [], api_name="/search")
    assert "has no column 'no_such_column'" in str(e.value)
    # A typed path is never opened: only stored ids (or uploads) are accepted.
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict("/etc/passwd", 3, 0.5, api_name="/similar")
    assert "no sample has the id" in str(e.value)


# ---- the file route -------------------------------------------------------------------------------
def _get(url: str, path: str) -> httpx.Response:
    return httpx.get(f"{url.rstrip('/')}/gradio_api/file={path}", timeout=10)


def test_file_route_serves_dataset_images_only(served):
    _, url, db, folder = served
    image = folder / "images" / "00000_red_circle.png"
    assert _get(url, str(image)).status_code == 200
    refused = [
        "/etc/passwd",
        str(folder / "manifest.csv"),                     # beside the images, not an image folder
        str(folder / "secret.txt"),
        str(db.path / "meta.json"),                       # the database folder is blocked
        str(folder / "images" / ".." / "manifest.csv"),   # ../ out of an image folder
        str(folder / "images" / ".." / ".." / ".." / "etc" / "passwd"),
        quote(str(folder / "images" / ".." / "secret.txt"), safe=""),   # percent-encoded
        str(folder / "images") + "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        str(Path.cwd() / "pyproject.toml"),
        "../../../../etc/passwd",
    ]
    for p in refused:
        r = _get(url, p)
        assert r.status_code in (403, 404), (p, r.status_code)
        assert b"root:" not in r.content and b"not an image" not in r.content


def test_search_gallery_urls_resolve(served):
    """The gallery's images reach the browser through the file route."""
    app, url, _, _ = served
    c = gradio_client.Client(url, verbose=False, download_files=False)
    gallery, status, *_ = c.predict(None, "s00000", 4, 0.5, api_name="/similar_image")
    assert len(gallery) == 4 and "sim" in gallery[0]["caption"]
    r = httpx.get(gallery[0]["image"]["url"], timeout=10)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"


# ---- the guard, without a server ------------------------------------------------------------------
def test_image_guard(tmp_path):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    inside = root / "imgs" / "a.png"
    inside.write_bytes(b"\x89PNG")
    outside = tmp_path / "b.png"
    outside.write_bytes(b"\x89PNG")
    (root / "imgs" / "link.png").symlink_to(outside)
    (root / "notes.txt").write_text("x")
    g = ImageGuard([root])
    assert g.check(inside) == str(inside.resolve())
    assert g.check(root / "imgs" / ".." / "imgs" / "a.png") == str(inside.resolve())
    assert g.check(outside) is None
    assert g.check(root / "imgs" / ".." / ".." / "b.png") is None
    assert g.check(root / "imgs" / "link.png") is None  # a symlink out of the root
    assert g.check(root / "notes.txt") is None  # not an image
    assert g.check(root / "imgs" / "missing.png") is None
    assert g.check(None) is None


def test_caption():
    rec = {"label": "cat", "loss": 2.5, "predicted_loss": 1.25, "predicted_loss_std": 0.5, "similarity": 0.31}
    assert caption(rec) == "cat · loss 2.50 · pred 1.25±0.50 · sim 0.31"
    assert caption({"label": None, "loss": float("nan")}) == "? · loss – · pred –±–"


def test_map_click_finds_the_point(served):
    from search_ui.ui import health as H

    h = H.load_health(served[2])
    _, geom = H.plot_map(h)
    worst = int(np.nanargmax(h.pred))
    px, py = geom.to_pixel(*h.xy[worst])
    assert geom.to_data(px, py) == pytest.approx(tuple(h.xy[worst]))
    ids = H.ids_near(h, geom, px, py)
    assert ids and ids[0] == h.ids[worst]
    assert H.ids_near(h, geom, -5, -5) == []  # outside the axes


def test_safe_defaults(served):
    from search_ui.app import launch_kwargs, parse_auth
    from search_ui.cli import build_parser

    app, _, db, folder = served
    kw = launch_kwargs(app)
    assert kw["server_name"] == "127.0.0.1" and kw["auth"] is None
    assert kw["allowed_paths"] == [str((folder / "images").resolve())]
    assert str(db.path) in kw["blocked_paths"]
    assert build_parser().parse_args(["serve", "--db", "x"]).host == "127.0.0.1"
    assert parse_auth("ana:s3:cret") == ("ana", "s3:cret")
    for bad in ("ana", ":pw", "ana:"):
        with pytest.raises(UserError, match="USER:PASS"):
            parse_auth(bad)


def test_auth_required(served):
    from search_ui.app import build_app, launch_kwargs

    app = build_app(served[2])
    app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None, auth="ana:s3cret"))
    try:
        with pytest.raises(Exception):  # noqa: B017 -- the client raises a plain ValueError/httpx error
            gradio_client.Client(app.local_url, verbose=False)
        c = gradio_client.Client(app.local_url, auth=("ana", "s3cret"), verbose=False)
        assert c.predict(api_name="/health")["rows"] == 120
        r = httpx.get(f"{app.local_url.rstrip('/')}/gradio_api/file="
                      f"{served[3] / 'images' / '00000_red_circle.png'}", timeout=10)
        assert r.status_code in (401, 403)
    finally:
        app.close()


# ---- curation and failure modes (need the selections / export / explain libraries) ----------------
@needs_selections
def test_selections_and_download(client, served, tmp_path):
    assert client.predict("mine", ["s00003", "s00006", "s00003"], api_name="/add_to_selection") == 2
    assert client.predict(api_name="/selections")["mine"] == 2
    s = client.predict("mine", api_name="/selection")
    assert s["size"] == 2 and sorted(s["ids"]) == ["s00003", "s00006"]
    # s00003 is a green circle, s00006 a blue one: one label, both rows.
    assert [(m["label"], m["count"], m["share"]) for m in s["labels"]] == [("circle", 2, 1.0)]
    losses = served[2].rows_by_id(["s00003", "s00006"], [S.LOSS]).column(S.LOSS).to_pylist()
    assert s["labels"][0]["mean_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    path = client.predict("mine", "csv", api_name="/download")
    import pandas as pd

    df = pd.read_csv(path)
    assert sorted(df["id"]) == ["s00003", "s00006"]
    assert all(os.path.isfile(p) for p in df["image"])


@needs_explain
def test_explain_endpoint(client, served):
    from diagnosis.explain import explain

    modes = client.predict(3, api_name="/explain")
    direct = [m.to_dict() for m in explain(served[2], top=3)]
    assert [m["description"] for m in modes] == [m["description"] for m in direct]
    assert all(set(m) >= {"description", "predicted_loss", "examples"} for m in modes)


def test_a_long_operation_blocks_neither_queries_nor_the_page(client, served, monkeypatch):
    """While one visitor's failure-mode search is still running, another's query and the page answer."""
    import threading

    ctx = served[0].llm2loss_context
    started, release = threading.Event(), threading.Event()

    def slow_modes(top, vocab=None, progress=None):
        started.set()
        assert release.wait(60), "the test never released the slow operation"
        return []

    monkeypatch.setattr(ctx, "modes", slow_modes)
    job = gradio_client.Client(served[1], verbose=False).submit(5, api_name="/explain")
    assert started.wait(30)
    try:
        res = client.predict("a blue circle", 3, 1.0, "", [], api_name="/search")
        page = httpx.get(served[1], timeout=10)
        assert len(res) == 3 and page.status_code == 200
        assert not job.done()  # still held: the answers above did not wait for it
    finally:
        release.set()
    assert job.result(timeout=30) == []


def test_upload_endpoint_refuses_server_paths(served):
    """A crafted request naming a server file as the 'uploaded' image is refused, not opened."""
    _, url, _, folder = served
    for path in ("/etc/hostname", str(folder / "images" / "00006_blue_circle.png")):
        r = httpx.post(f"{url.rstrip('/')}/gradio_api/call/similar_image", timeout=10,
                       json={"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, "", 3, 0.5]})
        answer = httpx.get(f"{url.rstrip('/')}/gradio_api/call/similar_image/{r.json()['event_id']}",
                           timeout=30).text
        assert "event: error" in answer and "not uploaded by a user" in answer
        assert "results for" not in answer
