"""The JSON HTTP API against a real server on a free localhost port: every route answers the
documented fields with the library's numbers, errors are one sentence with a 4xx status, no route
opens a path the caller sends, and with a login every route refuses a caller without it."""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests

from indexer import schema as S
from indexer.errors import UserError
from tests.fakes import make_db
from tests.ui_helpers import fit_ensemble_keep_planted

RESULT_FIELDS = {"id", "image", "label", "split", "loss", "predicted_loss", "predicted_loss_std",
                 "similarity", "score"}
# Both sides compute the same float32 FAISS inner products and float64 z-scores, on one machine;
# the tolerance only allows for float32's last bits (see the README's testing notes).
REL = 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, api base url, db, folder): `serve` over a 120-row database, on a free port."""
    from search_ui.app import serve

    folder = tmp_path_factory.mktemp("api")
    db = make_db(folder, n=120)
    fit_ensemble_keep_planted(db)
    (folder / "secret.txt").write_text("not an image")
    server = serve(db, port=None, block=False)
    yield server, server.local_url.rstrip("/") + "/api/v1", db, folder
    server.close()


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def engine(served):
    from search_ui.engine import QueryEngine

    return QueryEngine(served[2])


def _same(api: list[dict], direct) -> None:
    direct = [r.to_dict() for r in direct]
    assert [r["id"] for r in api] == [r["id"] for r in direct]
    for a, d in zip(api, direct, strict=True):
        assert set(a) == set(d)
        for key, v in d.items():
            if isinstance(v, float):
                assert a[key] == pytest.approx(v, rel=REL, abs=1e-6), key
            else:
                assert a[key] == v, key


def _refusal(e: pytest.ExceptionInfo) -> str:
    return str(e.value)


def _one_sentence(r: requests.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    msg = body["error"]
    assert msg.endswith(".") and "\n" not in msg and "Traceback" not in msg
    return msg


# ---- search and similar -----------------------------------------------------------------------
def test_search_fields_and_equal_to_the_engine(served, http, engine):
    _, url, _, _ = served
    r = http.post(f"{url}/search", json={"text": "a red square", "k": 8})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"results", "notes"} and len(body["results"]) == 8
    assert all(set(x) >= RESULT_FIELDS | {"color"} for x in body["results"])
    _same(body["results"], engine.search([("a red square", 1.0)], k=8))


def test_search_every_field_equal_to_the_engine(served, http, engine):
    _, url, _, _ = served
    req = {"text": "a red square", "k": 6, "weight": 0.8, "where": "split = 'test'",
           "negatives": ["a blue circle:0.7"], "also": ["a green shape:0.5"], "image": "s00004",
           "image_weight": 0.5, "candidates": 40}
    body = http.post(f"{url}/search", json=req).json()
    direct = engine.search([("a red square", 1.0), "a green shape:0.5"], k=6, where="split = 'test'", weight=0.8,
                           negatives=["a blue circle:0.7"], image=("s00004", 0.5), candidates=40)
    _same(body["results"], direct)
    assert all(x["split"] == "test" for x in body["results"])


def test_search_ranks_planted_failures_first(served, http):
    """weight 1 ranks the pool by predicted loss: make_db plants the blue circles' failures."""
    _, url, db, _ = served
    res = http.post(f"{url}/search", json={"text": "a blue circle", "k": 5, "weight": 1.0}).json()["results"]
    pred = [x["predicted_loss"] for x in res]
    assert pred == sorted(pred, reverse=True)


def test_similar_equal_to_the_engine_and_leaves_the_query_out(served, http, engine):
    _, url, _, _ = served
    body = http.post(f"{url}/similar", json={"id": "s00007", "k": 5, "weight": 0.3}).json()
    assert "s00007" not in [x["id"] for x in body["results"]]
    _same(body["results"], engine.similar("s00007", k=5, weight=0.3))


def test_queries_run_concurrently_with_the_same_answers(served):
    """16 clients at once get exactly the answers of one client (the engine is shared by threads)."""
    _, url, _, _ = served
    phrases = ["a red square", "a blue circle", "a green triangle", "a small star"]
    with requests.Session() as s:
        expected = {p: [x["id"] for x in s.post(f"{url}/search", json={"text": p, "k": 7}).json()["results"]]
                    for p in phrases}
    got, errors = [], []

    def client(i):
        with requests.Session() as s:
            for j in range(12):
                p = phrases[(i + j) % len(phrases)]
                r = s.post(f"{url}/search", json={"text": p, "k": 7, "where": "loss >= 0" if j % 3 == 0 else None})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    got.append((p, [x["id"] for x in r.json()["results"]]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(got) == 16 * 12
    assert all(ids == expected[p] for p, ids in got)


# ---- samples ----------------------------------------------------------------------------------
def test_sample_fields_and_image(served, http):
    _, url, db, folder = served
    r = http.get(f"{url}/samples/s00007")
    assert r.status_code == 200
    rec = r.json()
    stored = db.rows_by_id(["s00007"], list(S.RESULT_COLUMNS) + ["color"]).to_pylist()[0]
    assert set(rec) == set(stored) and S.EMBEDDING not in rec
    assert rec[S.LOSS] == pytest.approx(stored[S.LOSS], rel=REL)
    assert rec[S.LABEL] == stored[S.LABEL] and rec["color"] == stored["color"]
    img = http.get(f"{url}/samples/s00007/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == Path(stored[S.IMAGE]).read_bytes()


# ---- explain, selections, export, health ------------------------------------------------------
def test_explain_is_the_library_answer_and_cached(served, http):
    from diagnosis.explain import explain

    server, url, db, _ = served
    r = http.get(f"{url}/explain", params={"top": 3})
    assert r.status_code == 200
    modes = r.json()
    direct = [m.to_dict() for m in explain(db, top=3)]
    assert [m["description"] for m in modes] == [m["description"] for m in direct]
    assert [m["examples"] for m in modes] == [m["examples"] for m in direct]
    assert all(set(m) >= {"description", "predicted_loss", "examples"} and "ids" not in m for m in modes)
    assert (db.version, 3, None) in server.llm2loss_context._modes  # kept for this table version
    assert http.get(f"{url}/explain", params={"top": 3}).json() == modes


def test_selections_add_get_remove_drop(served, http):
    _, url, db, _ = served
    r = http.post(f"{url}/selections/api-set/add", json={"ids": ["s00003", "s00006", "s00003"]})
    assert r.status_code == 200 and r.json() == {"name": "api-set", "size": 2}
    assert http.get(f"{url}/selections").json()["api-set"] == 2
    assert http.get(f"{url}/selections/api-set").json() == {"name": "api-set", "size": 2,
                                                            "ids": ["s00003", "s00006"]}
    from search_ui.selections import Selections

    assert Selections(db).get("api-set") == ["s00003", "s00006"]  # the same file as the CLI's
    assert http.post(f"{url}/selections/api-set/remove", json={"ids": ["s00003"]}).json()["size"] == 1
    assert http.delete(f"{url}/selections/api-set").json() == {"name": "api-set", "size": 0}
    assert "api-set" not in http.get(f"{url}/selections").json()


def test_selection_errors(served, http):
    _, url, _, _ = served
    msg = _one_sentence(http.get(f"{url}/selections/nope"), 404)
    assert "no selection is named 'nope'" in msg
    _one_sentence(http.delete(f"{url}/selections/nope"), 404)
    msg = _one_sentence(http.post(f"{url}/selections/x/add", json={"ids": ["s00001", "ghost"]}), 400)
    assert "ghost" in msg
    _one_sentence(http.post(f"{url}/selections/x/add", json={"ids": []}), 400)
    _one_sentence(http.post(f"{url}/selections/x/add", json={"ids": "s00001"}), 422)  # a string is no list


def test_export_formats(served, http):
    _, url, db, _ = served
    http.post(f"{url}/selections/exp/add", json={"ids": ["s00006", "s00003"]})
    r = http.post(f"{url}/export", json={"selection": "exp", "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    df = pd.read_csv(io.BytesIO(r.content))
    assert list(df["id"]) == ["s00006", "s00003"] and S.EMBEDDING not in df
    losses = db.rows_by_id(["s00006", "s00003"], [S.ID, S.LOSS]).to_pandas().set_index(S.ID)[S.LOSS]
    np.testing.assert_allclose(df[S.LOSS], losses.loc[["s00006", "s00003"]], rtol=REL)

    pq = pd.read_parquet(io.BytesIO(http.post(f"{url}/export", json={"ids": ["s00001"], "format": "parquet"}).content))
    assert list(pq["id"]) == ["s00001"]

    z = zipfile.ZipFile(io.BytesIO(http.post(f"{url}/export", json={"selection": "exp", "format": "folder"}).content))
    names = z.namelist()
    assert "manifest.csv" in names and sum(n.endswith(".png") for n in names) == 2

    q = pd.read_csv(io.BytesIO(http.post(f"{url}/export", json={"query": "a red square", "k": 4}).content))
    assert len(q) == 4


def test_export_errors(served, http):
    _, url, _, _ = served
    msg = _one_sentence(http.post(f"{url}/export", json={"selection": "exp", "ids": ["s00001"]}), 400)
    assert "exactly one of" in msg
    _one_sentence(http.post(f"{url}/export", json={"ids": ["s00001"], "format": "exe"}), 422)
    _one_sentence(http.post(f"{url}/export", json={"ids": ["s00001"], "out": "/tmp/x.csv"}), 422)  # no paths


def test_health(served, http):
    _, url, db, _ = served
    h = http.get(f"{url}/health").json()
    assert h["rows"] == 120 and h["table_version"] == db.version and h["data_version"] == db.data_version
    assert h["index"]["exists"] and h["index"]["fresh"] and h["index"]["reason"] is None
    assert h["ensemble"]["exists"] and h["ensemble"]["fresh"]
    assert h["clip"] == db.clip_identity


def test_openapi_lists_every_route(served, http):
    _, url, _, _ = served
    paths = http.get(f"{url}/openapi.json").json()["paths"]
    assert set(paths) == {f"/api/v1{p}" for p in (
        "/search", "/similar", "/samples/{sample_id}", "/samples/{sample_id}/image", "/explain", "/selections",
        "/selections/{name}", "/selections/{name}/add", "/selections/{name}/remove", "/export", "/curate", "/health")}


def test_the_page_keeps_its_file_policy_through_the_mount(served):
    """`serve` hands Gradio the same allowed and blocked folders as before: an indexed image is
    served, the file beside it and the database folder are not."""
    server, _, db, folder = served
    base = server.local_url.rstrip("/") + "/gradio_api/file="
    image = db.rows_by_id(["s00006"], [S.IMAGE]).column(S.IMAGE)[0].as_py()
    assert requests.get(base + image, timeout=30).status_code == 200
    for path in (folder / "secret.txt", db.meta_path, "/etc/hostname"):
        assert requests.get(f"{base}{path}", timeout=30).status_code == 403
    assert requests.get(server.local_url, timeout=30).status_code == 200


def test_gradio_endpoints_stay(served):
    gradio_client = pytest.importorskip("gradio_client")
    c = gradio_client.Client(served[0].local_url, verbose=False)
    assert c.predict(api_name="/health")["rows"] == 120
    assert len(c.predict("a blue circle", 3, 0.5, "", [], api_name="/search")) == 3


# ---- refusals: one sentence, the CLI's, 4xx ---------------------------------------------------
def test_refusals_are_the_cli_sentences(served, http, engine):
    _, url, _, _ = served
    with pytest.raises(UserError) as e:
        engine.search("a red square", k=3, where="colour = 'red'")
    assert _one_sentence(http.post(f"{url}/search", json={"text": "a red square", "where": "colour = 'red'"}),
                         400) == _refusal(e)
    with pytest.raises(UserError) as e:
        engine.search("a red square", k=0)
    assert _one_sentence(http.post(f"{url}/search", json={"text": "a red square", "k": 0}), 400) == _refusal(e)
    with pytest.raises(UserError) as e:
        engine.search("a red square", weight=2.0)
    assert _one_sentence(http.post(f"{url}/search", json={"text": "a red square", "weight": 2}), 400) == _refusal(e)
    msg = _one_sentence(http.post(f"{url}/search", json={"text": "   "}), 400)
    assert "empty" in msg
    msg = _one_sentence(http.post(f"{url}/similar", json={"id": "ghost"}), 400)
    assert "no sample has the id 'ghost'" in msg
    assert "no sample has the id 'ghost'" in _one_sentence(http.get(f"{url}/samples/ghost"), 404)
    _one_sentence(http.get(f"{url}/samples/ghost/image"), 404)


def test_bounds(served, http):
    from search_ui import api

    _, url, _, _ = served
    assert str(api.MAX_K) in _one_sentence(http.post(f"{url}/search", json={"text": "x", "k": api.MAX_K + 1}), 400)
    _one_sentence(http.post(f"{url}/search", json={"text": "x" * (api.MAX_TEXT_CHARS + 1)}), 400)
    _one_sentence(http.post(f"{url}/search", json={"text": "x", "negatives": ["y"] * (api.MAX_PHRASES + 1)}), 400)
    _one_sentence(http.post(f"{url}/search", json={"text": "x", "candidates": api.MAX_CANDIDATES + 1}), 400)
    _one_sentence(http.get(f"{url}/explain", params={"top": 0}), 400)
    _one_sentence(http.get(f"{url}/explain", params={"top": api.MAX_TOP + 1}), 400)
    big = b'{"text": "' + b"x" * (api.MAX_BODY_BYTES + 10) + b'"}'
    _one_sentence(http.post(f"{url}/search", data=big, headers={"content-type": "application/json"}), 413)

    def chunked():  # no Content-Length: the guard counts the bytes itself
        for _ in range(api.MAX_BODY_BYTES // 2**16 + 2):
            yield b" " * 2**16

    _one_sentence(http.post(f"{url}/search", data=chunked(), headers={"content-type": "application/json"}), 413)


def test_malformed_requests(served, http):
    _, url, _, _ = served
    _one_sentence(http.post(f"{url}/search", data=b"{not json", headers={"content-type": "application/json"}), 422)
    assert "'k'" in _one_sentence(http.post(f"{url}/search", json={"text": "x", "k": "many"}), 422)
    assert "'text'" in _one_sentence(http.post(f"{url}/search", json={"k": 3}), 422)
    _one_sentence(http.post(f"{url}/search", json={"text": "x", "colour": "red"}), 422)  # unknown field
    # Strict types on every body (issue 25): a number in quotes or a boolean is not quietly converted.
    for route, body in (("search", {"text": "x", "k": "10"}), ("search", {"text": "x", "k": True}),
                        ("search", {"text": "x", "weight": "0.5"}), ("search", {"text": "x", "weight": True}),
                        ("search", {"text": 5}), ("search", {"text": "x", "negatives": [1]}),
                        ("similar", {"id": "s00001", "k": "10"}), ("similar", {"id": 1}),
                        ("similar", {"id": "s00001", "candidates": False}),
                        ("selections/x/add", {"ids": [1, 2]}), ("selections/x/remove", {"ids": [True]}),
                        ("export", {"ids": ["s00001"], "k": "5"}), ("export", {"selection": 3})):
        assert "is not valid" in _one_sentence(http.post(f"{url}/{route}", json=body), 422), (route, body)
    assert http.post(f"{url}/search", json={"text": "x", "k": 3, "weight": 1}).status_code == 200  # an int is a number
    # What a cross-site form can send (text/plain) is not taken as JSON.
    _one_sentence(http.post(f"{url}/search", data=b'{"text": "x"}', headers={"content-type": "text/plain"}), 422)
    assert "no route" in _one_sentence(http.get(f"{url}/nothing-here"), 404)


def test_no_route_opens_a_path_the_caller_sends(served, http):
    """An image given by path (a server file, or even an indexed image's own path) is refused."""
    _, url, db, folder = served
    indexed = db.rows_by_id(["s00006"], [S.IMAGE]).column(S.IMAGE)[0].as_py()
    for path in ("/etc/hostname", str(folder / "secret.txt"), indexed):
        _one_sentence(http.post(f"{url}/similar", json={"id": path}), 400)
        _one_sentence(http.post(f"{url}/search", json={"text": "a circle", "image": path}), 400)
        _one_sentence(http.get(f"{url}/samples/{path}"), 404)


# ---- login ------------------------------------------------------------------------------------
ROUTES = [("post", "/search", {"text": "a red square"}), ("post", "/similar", {"id": "s00001"}),
          ("get", "/samples/s00001", None), ("get", "/samples/s00001/image", None), ("get", "/explain", None),
          ("get", "/selections", None), ("get", "/selections/x", None),
          ("post", "/selections/x/add", {"ids": ["s00001"]}), ("post", "/selections/x/remove", {"ids": ["s00001"]}),
          ("delete", "/selections/x", None), ("post", "/export", {"ids": ["s00001"]}), ("get", "/health", None),
          ("get", "/openapi.json", None), ("get", "/docs", None), ("get", "/nothing", None)]


def test_auth_refuses_every_route_without_the_login(served):
    from search_ui.app import serve

    server = serve(served[2], port=None, auth="ana:s3cret", block=False)
    url = server.local_url.rstrip("/") + "/api/v1"
    try:
        for method, path, body in ROUTES:
            for auth in (None, ("ana", "wrong"), ("bob", "s3cret")):
                r = requests.request(method, url + path, json=body, auth=auth, timeout=30)
                assert r.status_code == 401, (method, path, auth)
                assert r.headers["www-authenticate"].startswith("Basic")
                assert "login" in r.json()["error"]
            r = requests.request(method, url + path, json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
            assert r.status_code == 401
        for path in ("//api/v1/health", "/api//v1/health", "/%61pi/v1/health"):  # no way around the check
            r = requests.get(server.local_url.rstrip("/") + path, timeout=30)
            assert r.status_code in (401, 404) and "rows" not in r.text
        ok = requests.get(f"{url}/health", auth=("ana", "s3cret"), timeout=30)
        assert ok.status_code == 200 and ok.json()["rows"] == 120
        res = requests.post(f"{url}/search", json={"text": "a red square", "k": 2}, auth=("ana", "s3cret"), timeout=30)
        assert len(res.json()["results"]) == 2
        # The page and Gradio's own API keep Gradio's login.
        page = server.local_url.rstrip("/")
        assert requests.get(f"{page}/config", timeout=30).status_code == 401
        assert requests.get(f"{page}/gradio_api/info", timeout=30).status_code == 401
    finally:
        server.close()


# ---- the text-embedding cache -----------------------------------------------------------------
def test_repeated_phrases_reuse_their_embedding(served):
    from search_ui.engine import TEXT_CACHE, QueryEngine

    eng = QueryEngine(served[2])
    calls = []
    real = eng.clip.encode_text

    def counting(texts):
        calls.append(list(texts))
        return real(texts)

    eng.clip.encode_text = counting  # our own ClipModel instance, not a third-party class
    TEXT_CACHE.clear()
    first = eng.search("a purple hexagon", k=5)
    again = eng.search("a purple hexagon", k=5)
    eng.search(["a purple hexagon", "a tiny dot"], k=5, negatives=["a purple hexagon:0.3"])
    assert calls == [["a purple hexagon"], ["a tiny dot"]]
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    assert TEXT_CACHE.hits >= 3
    np.testing.assert_array_equal(eng.encode_text(["a purple hexagon"])[0], real(["a purple hexagon"])[0])


def test_text_cache_is_bounded_and_keyed_by_model():
    from search_ui.engine import TextEmbeddingCache

    c = TextEmbeddingCache(maxsize=2)
    c.put(("m1", "a"), np.ones(3))
    c.put(("m1", "b"), np.zeros(3))
    assert c.get(("m2", "a")) is None  # another model's entry is never served
    c.get(("m1", "a"))  # 'a' is now the most recent
    c.put(("m1", "c"), np.ones(3))
    assert len(c) == 2 and c.get(("m1", "b")) is None and c.get(("m1", "a")) is not None
    with pytest.raises(ValueError):
        c.get(("m1", "a"))[0] = 5.0  # entries are read-only


def test_hostile_filters_are_400_and_the_server_lives(served, http):
    """Issue 25: `repeat(id, 100000000)` in a filter aborted the whole server (LanceDB asked for
    100 GB); every payload of that class is now refused by the filter language, one sentence."""
    _, url, _, _ = served
    payloads = {
        "repeat(id, 100000000) = 'x'": "calls the function repeat",
        "regexp_like(id, '(a|a)*b')": "calls the function regexp_like",
        "CAST(loss AS VARCHAR) = '1'": "calls the function CAST",
        "id IN (SELECT id FROM samples)": "expected a value",
        "split = 'test'; SELECT 1": "a `;`",
        "(" * 200 + "loss > 1" + ")" * 200: "nests more than",
        "loss IN (" + ",".join(str(i) for i in range(1500)) + ")": "more than 1000 values",
        "id LIKE '" + "%_" * 200 + "'": "LIKE pattern",
        "x" * 30_000: "characters long",
    }
    for where, words in payloads.items():
        for route, body in (("search", {"text": "a circle", "where": where}), ("similar", {"id": "s00001", "where": where}),
                            ("export", {"query": "a circle", "where": where})):
            msg = _one_sentence(http.post(f"{url}/{route}", json=body), 400)
            assert words in msg, (route, msg)
    assert http.get(f"{url}/health").status_code == 200
    ok = http.post(f"{url}/search", json={"text": "a circle", "k": 3, "where": "split = 'test' AND loss >= 0"})
    assert ok.status_code == 200 and all(r["split"] == "test" for r in ok.json()["results"])
