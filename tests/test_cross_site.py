"""Cross-site requests change nothing (issue 25, security 3): served under a host name other than
localhost without --auth, Gradio approved a CORS preflight from any origin (origin echoed,
credentials and DELETE allowed), and a page anywhere could delete a selection. Now no origin is
approved unless given with --cors-origin, and a browser request from another origin that is not a
read is refused before any route runs."""

from __future__ import annotations

import httpx
import pytest

from indexer.errors import UserError
from search_ui.selections import Selections
from search_ui.serving import normalise_origin, parse_cors_origins
from tests.fakes import make_db

EVIL = "http://evil.example"
GOOD = "https://dash.example:8443"


@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    """`serve --host 0.0.0.0 --cors-origin GOOD`, reached as myserver.lan (a Host header), no --auth."""
    from search_ui.app import serve

    folder = tmp_path_factory.mktemp("lan")
    db = make_db(folder, n=30)
    server = serve(db, host="0.0.0.0", port=None, block=False, cors_origins=[GOOD])
    port = server.server_port
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Host": f"myserver.lan:{port}"},
                      timeout=30) as client:
        yield client, db, port
    server.close()


def _keep(db, name="keep"):
    Selections(db).add(name, ["s00001", "s00002"])
    return name


def test_a_preflight_from_another_origin_is_not_approved(lan):
    client, db, _ = lan
    for path in ("/api/v1/selections/keep", "/gradio_api/queue/join", "/gradio_api/upload", "/"):
        r = client.options(path, headers={"Origin": EVIL, "Access-Control-Request-Method": "DELETE",
                                          "Access-Control-Request-Headers": "content-type"})
        assert r.status_code == 403, (path, r.status_code)
        assert not any(k.lower().startswith("access-control-") for k in r.headers), (path, r.headers)
        assert "--cors-origin" in r.json()["error"]


def test_a_cross_site_delete_or_post_changes_nothing(lan):
    client, db, port = lan
    name = _keep(db)
    for headers in ({"Origin": EVIL}, {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"}, {"Origin": "null"},
                    {"Origin": f"http://myserver.lan:{port + 1}", "Sec-Fetch-Site": "same-site"},
                    {"Sec-Fetch-Site": "cross-site"}):
        r = client.delete(f"/api/v1/selections/{name}", headers=headers)
        assert r.status_code == 403 and "cross-site requests change nothing" in r.json()["error"], headers
        r = client.post(f"/api/v1/selections/{name}/add", json={"ids": ["s00003"]}, headers=headers)
        assert r.status_code == 403, headers
        r = client.post("/gradio_api/call/add_to_selection", json={"data": [name, ["s00004"]]}, headers=headers)
        assert r.status_code == 403, headers
    assert Selections(db).get(name) == ["s00001", "s00002"]
    # reads still answer, but no CORS header lets another origin's page read them
    r = client.get("/api/v1/health", headers={"Origin": EVIL})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = client.get("/gradio_api/info", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in r.headers


def test_the_page_itself_scripts_and_configured_origins_may_change_state(lan):
    client, db, port = lan
    name = _keep(db, "own")
    assert client.post(f"/api/v1/selections/{name}/add", json={"ids": ["s00003"]},
                       headers={"Origin": f"http://myserver.lan:{port}"}).status_code == 200
    assert client.post(f"/api/v1/selections/{name}/add", json={"ids": ["s00004"]},
                       headers={"Sec-Fetch-Site": "same-origin", "Origin": f"http://myserver.lan:{port}"}).status_code == 200
    assert client.post(f"/api/v1/selections/{name}/add", json={"ids": ["s00005"]}).status_code == 200  # curl
    pre = client.options(f"/api/v1/selections/{name}", headers={"Origin": GOOD, "Access-Control-Request-Method": "DELETE"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == GOOD
    assert "DELETE" in pre.headers["access-control-allow-methods"]
    r = client.delete(f"/api/v1/selections/{name}", headers={"Origin": GOOD, "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == GOOD
    assert name not in Selections(db).all()


def test_a_loopback_server_answers_only_as_localhost(tmp_path):
    """DNS rebinding: a page whose host name resolves to 127.0.0.1 is same-origin with itself."""
    from search_ui.app import serve

    db = make_db(tmp_path, n=20)
    server = serve(db, port=None, block=False)
    try:
        url = server.local_url.rstrip("/")
        assert httpx.get(f"{url}/api/v1/health", timeout=30).status_code == 200
        assert httpx.get(f"{url}/api/v1/health", headers={"Host": "localhost"}, timeout=30).status_code == 200
        r = httpx.get(f"{url}/api/v1/health", headers={"Host": "rebound.example"}, timeout=30)
        assert r.status_code == 403 and "only as localhost" in r.json()["error"]
        r = httpx.post(f"{url}/api/v1/selections/x/add", json={"ids": ["s00001"]},
                       headers={"Host": "rebound.example", "Origin": "http://rebound.example"}, timeout=30)
        assert r.status_code == 403 and "x" not in Selections(db).all()
    finally:
        server.close()


def test_cors_origins_are_checked():
    assert parse_cors_origins(["HTTPS://Dash.Example:443/", "http://a.b:80"]) == ("https://dash.example", "http://a.b")
    for bad in ("*", "dash.example", "https://x/path", "ftp://x", "null"):
        with pytest.raises(UserError, match="--cors-origin"):
            parse_cors_origins([bad])
    assert normalise_origin("null") is None


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")
def test_a_page_of_another_origin_cannot_change_a_selection_in_chromium(tmp_path):
    """A real browser: a page served from another port fetches DELETE (preflighted), POSTs a
    text/plain body (no preflight) and submits a form to the server; the selection stays, and the
    page cannot read the answers. The server's own page can still change it."""
    import http.server
    import threading

    sync_api = pytest.importorskip("playwright.sync_api")
    from search_ui.app import serve

    db = make_db(tmp_path, n=20)
    Selections(db).add("keep", ["s00001", "s00002"])
    server = serve(db, port=None, block=False)
    api = server.local_url.rstrip("/") + "/api/v1"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(f"""<html><body>
<form id="f" method="POST" action="{api}/selections/keep/add" enctype="text/plain">
<input name='{{"ids": ["s00003"], "x": "' value='"}}'></form>
<script>
async function attack() {{
  const out = {{}};
  try {{ const r = await fetch("{api}/selections/keep", {{method: "DELETE"}}); out.del = r.status; }}
  catch (e) {{ out.del = "blocked"; }}
  try {{ await fetch("{api}/selections/keep/add", {{method: "POST", mode: "no-cors",
                      headers: {{"content-type": "text/plain"}}, body: '{{"ids": ["s00003"]}}'}}); out.post = "sent"; }}
  catch (e) {{ out.post = "blocked"; }}
  try {{ const r = await fetch("{api}/selections/keep"); out.read = await r.text(); }}
  catch (e) {{ out.read = "blocked"; }}
  return out;
}}
</script></body></html>""")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "site"), **k)  # noqa: E731
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{site.server_address[1]}/index.html")
            out = page.evaluate("attack()")
            assert out["del"] == "blocked" and out["read"] == "blocked", out
            with page.expect_navigation():
                page.evaluate("document.getElementById('f').submit()")
            assert Selections(db).get("keep") == ["s00001", "s00002"]
            own = browser.new_page()  # the server's own page: same origin, allowed
            own.goto(server.local_url)
            status = own.evaluate(f"""fetch("{api}/selections/keep/add", {{method: "POST",
                headers: {{"content-type": "application/json"}}, body: '{{"ids": ["s00003"]}}'}}).then(r => r.status)""")
            assert status == 200 and Selections(db).get("keep") == ["s00001", "s00002", "s00003"]
            browser.close()
    finally:
        site.shutdown()
        server.close()
