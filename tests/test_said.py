"""Said, not silently accepted; bounded (issue 25): selection names are stored as given or refused,
every stored id is reachable over HTTP (ids holding `/` or a newline, images whose file name holds
a newline), an oversized vocabulary is refused at once, and `serve` leaves no temporary folder
behind after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from indexer import schema as S
from indexer.errors import UserError
from indexer.identity import identity_columns
from indexer.store import Database
from search_ui.cli import main
from search_ui.selections import Selections
from tests.fakes import make_db

ROOT = Path(__file__).resolve().parents[1]
ODD_IDS = ["x/image", "a/b/c", "line\nbreak", "tab\there", "pct%2Fliteral", "x", "sp ace", "ü/ß"]


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A served database whose ids hold `/`, newlines and the like, and whose first image's file
    name holds a newline."""
    from search_ui.app import serve

    folder = tmp_path_factory.mktemp("odd")
    db = make_db(folder, n=len(ODD_IDS) + 4)
    t = db.read()
    images = t.column(S.IMAGE).to_pylist()
    newline = Path(images[0]).with_name("new\nline.png")
    os.replace(images[0], newline)
    images[0] = str(newline)
    ids = ODD_IDS + t.column(S.ID).to_pylist()[len(ODD_IDS):]
    t = t.set_column(t.column_names.index(S.ID), S.ID, __import__("pyarrow").array(ids))
    t = t.set_column(t.column_names.index(S.IMAGE), S.IMAGE, __import__("pyarrow").array(images))
    for name, values in identity_columns(images).items():
        t = t.set_column(t.column_names.index(name), name, values)
    db.table.delete("true")
    db.append(t)
    db = Database(db.path)
    db.update_meta(data_version=db.version)
    server = serve(db, port=None, block=False)
    yield server, server.local_url.rstrip("/") + "/api/v1", db
    server.close()


def test_every_stored_id_is_reachable_percent_encoded(odd):
    _, api, db = odd
    for sid in ODD_IDS:
        r = requests.get(f"{api}/samples/{quote(sid, safe='')}", timeout=30)
        assert r.status_code == 200 and r.json()[S.ID] == sid, (sid, r.status_code, r.text[:200])
        img = requests.get(f"{api}/samples/{quote(sid, safe='')}/image", timeout=30)
        path = db.rows_by_id([sid], [S.IMAGE]).column(0)[0].as_py()
        assert img.status_code == 200 and img.content == Path(path).read_bytes(), sid
    # a literal `/image` names the image of the id before it; the id "x/image" is `x%2Fimage`
    assert requests.get(f"{api}/samples/x/image", timeout=30).content == \
        Path(db.rows_by_id(["x"], [S.IMAGE]).column(0)[0].as_py()).read_bytes()
    assert requests.get(f"{api}/samples/x%2Fimage", timeout=30).json()[S.ID] == "x/image"
    assert requests.get(f"{api}/samples/nobody%0A", timeout=30).status_code == 404
    assert requests.get(f"{api}/samples/%FF%FE", timeout=30).status_code == 400


def test_an_image_whose_file_name_holds_a_newline_is_shown_by_the_page(odd):
    gradio_client = pytest.importorskip("gradio_client")
    server, _, db = odd
    ctx = server.blocks.llm2loss_context
    rec = ctx.rows(["x/image"])[0]
    assert "\n" in rec[S.IMAGE]
    items, shown = ctx.gallery([rec])
    assert shown == [rec] and "\n" not in items[0][0] and Path(items[0][0]).read_bytes() == \
        Path(rec[S.IMAGE]).read_bytes()
    # end to end: the gallery of /similar_image holds every row, downloaded through Gradio's file route
    c = gradio_client.Client(server.local_url, verbose=False)
    gallery, _ = c.predict(None, ODD_IDS[1], 30, 0.0, api_name="/similar_image")
    got = [Path(g["image"]).read_bytes() for g in gallery]
    assert Path(rec[S.IMAGE]).read_bytes() in got


def test_selection_names_are_stored_as_given_or_refused(odd, capsys):
    _, api, db = odd
    for bad in (" lead", "lead\n", "lead ", "a\tb", "", "-x", "x" * 101):
        with pytest.raises(UserError, match="is not valid"):
            Selections(db).add(bad, ["x"])
        if bad.strip() and "\t" not in bad and "\n" not in bad:
            r = requests.post(f"{api}/selections/{quote(bad, safe='')}/add", json={"ids": ["x"]}, timeout=30)
            assert r.status_code == 400 and "is not valid" in r.json()["error"], bad
    r = requests.post(f"{api}/selections/lead%0A/add", json={"ids": ["x"]}, timeout=30)
    assert r.status_code in (400, 404) and "lead" not in Selections(db).all()
    assert main(["select", "add", " lead", "--db", str(db.path), "--ids", str(_ids_file(db.path.parent, ["x"]))]) == 2
    assert "is not valid" in capsys.readouterr().err
    assert "lead" not in Selections(db).all()
    ok = requests.post(f"{api}/selections/lead-2.v1_x/add", json={"ids": ["x"]}, timeout=30).json()
    assert ok == {"name": "lead-2.v1_x", "size": 1} and "lead-2.v1_x" in Selections(db).all()


def _ids_file(folder: Path, ids: list[str]) -> Path:
    p = folder / "ids.txt"
    p.write_text("\n".join(ids) + "\n")
    return p


def test_a_vocabulary_over_the_bound_is_refused_at_once(tmp_path, capsys):
    from diagnosis.vocab import MAX_VOCAB_PHRASES, read_vocab_file

    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(f"a phrase number {i}" for i in range(MAX_VOCAB_PHRASES + 1)))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=f"more than the {MAX_VOCAB_PHRASES:,}"):
        read_vocab_file(p)
    assert time.perf_counter() - t0 < 30  # refused on reading, not after scoring (a generous bound)
    p.write_text("\n".join(f"a phrase number {i}" for i in range(MAX_VOCAB_PHRASES)))
    assert len(read_vocab_file(p)) == MAX_VOCAB_PHRASES


def test_serve_leaves_no_temporary_folder_after_sigterm(tmp_path):
    db = make_db(tmp_path / "w", n=12)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, "-m", "search_ui.cli", "serve", "--db", str(db.path), "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "llm2loss UI for" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert list(tmp.glob("llm2loss-ui-*"))  # made while serving
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(tmp.glob("llm2loss-ui-*")), list(tmp.iterdir())
