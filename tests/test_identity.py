"""A served or exported image is the file that was indexed (issue 25, security 2): `index` records
each image's real path, size, time and SHA-256; a symlink re-pointed after indexing (at
secret.txt), or an image replaced by a text file under its name, is refused by the image route
(403), Gradio's file route (403), the page's galleries and every export (one sentence)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import requests

from indexer import schema as S
from indexer.errors import UserError
from indexer.identity import FileIdentity, read_identity
from indexer.pipeline import index_dataset
from indexer.store import Database
from tests.fakes import make_images


@pytest.fixture(scope="module")
def swapped(tmp_path_factory, tiny_clip_spec):
    """A database indexed through `index` whose images include a symlink; after indexing the
    symlink is re-pointed at secret.txt and another image overwritten by text. Yields (server,
    api url, db, folder, ids)."""
    from search_ui.app import serve

    folder = tmp_path_factory.mktemp("swapped")
    df = make_images(folder, 12)
    images = folder / "images"
    target = images / df["image"][1].split("/")[-1]
    link = images / "linked.png"
    os.symlink(target, link)
    df.loc[0, "image"] = "images/linked.png"  # row 0 is indexed through the symlink
    df.to_csv(folder / "manifest.csv", index=False)
    (folder / "secret.txt").write_text("the secret\n")
    index_dataset(folder / "manifest.csv", folder / "db", clip=tiny_clip_spec, workers=0, progress=False)
    db = Database(folder / "db")
    ids = {"linked": df["id"][0], "replaced": df["id"][2], "intact": df["id"][3], "renamed": df["id"][4]}
    recorded = {r[S.ID]: r for r in db.read([S.ID, S.IMAGE, *S.IDENTITY_COLUMNS]).to_pylist()}
    # index recorded the file the symlink led to, not the link
    assert recorded[ids["linked"]][S.IMAGE_REAL] == str(target.resolve())
    assert FileIdentity.from_row(recorded[ids["intact"]]) == read_identity(recorded[ids["intact"]][S.IMAGE])
    server = serve(db, port=None, block=False)
    # the swaps, after indexing and after the server started
    link.unlink()
    os.symlink(folder / "secret.txt", link)
    replaced = recorded[ids["replaced"]][S.IMAGE]
    st = os.stat(replaced)
    with open(replaced, "r+b") as f:  # same size and time, other bytes: only the content hash sees it
        size = f.seek(0, 2)
        f.seek(0)
        f.write((b"not an image, " * size)[:size])
    os.utime(replaced, ns=(st.st_atime_ns, st.st_mtime_ns))
    (images / "notes.png").write_text("a text file named .png\n")
    os.replace(images / "notes.png", recorded[ids["renamed"]][S.IMAGE])
    yield server, server.local_url.rstrip("/"), db, folder, ids, recorded
    server.close()


def test_the_image_route_refuses_a_swapped_file(swapped):
    _, url, _, _, ids, recorded = swapped
    for name in ("linked", "replaced", "renamed"):
        r = requests.get(f"{url}/api/v1/samples/{ids[name]}/image", timeout=30)
        assert r.status_code == 403, (name, r.status_code)
        assert "no longer the file that was indexed" in r.json()["error"]
        assert b"secret" not in r.content and b"text" not in r.content and b"not an image" not in r.content
    ok = requests.get(f"{url}/api/v1/samples/{ids['intact']}/image", timeout=30)
    assert ok.status_code == 200 and ok.content == Path(recorded[ids["intact"]][S.IMAGE]).read_bytes()
    assert ok.headers["content-type"] == "image/png"


def test_the_file_route_and_the_page_refuse_a_swapped_file(swapped):
    server, url, _, folder, ids, recorded = swapped
    for name in ("linked", "replaced", "renamed"):
        path = recorded[ids[name]][S.IMAGE]
        r = requests.get(f"{url}/gradio_api/file={path}", timeout=30)
        assert r.status_code == 403 and b"secret" not in r.content, name
    r = requests.get(f"{url}/gradio_api/file={folder / 'secret.txt'}", timeout=30)
    assert r.status_code == 403
    assert requests.get(f"{url}/gradio_api/file={recorded[ids['intact']][S.IMAGE]}", timeout=30).status_code == 200
    ctx = server.blocks.llm2loss_context
    items, shown = ctx.gallery([recorded[i] for i in ids.values()])
    assert [r[S.ID] for r in shown] == [ids["intact"]]


def test_every_export_refuses_a_swapped_file_in_one_sentence(swapped, tmp_path):
    from search_ui.export import export

    _, url, db, _, ids, _ = swapped
    for name in ("linked", "replaced", "renamed"):
        for link in (True, False):
            with pytest.raises(UserError, match="no longer the file that was indexed") as e:
                export(db, tmp_path / f"out_{name}_{link}", fmt="folder", ids=[ids["intact"], ids[name]], link=link)
            assert "\n" not in str(e.value)
            assert not (tmp_path / f"out_{name}_{link}").exists() and not list(tmp_path.glob(".out_*"))
        r = requests.post(f"{url}/api/v1/export", json={"ids": [ids[name]], "format": "folder"}, timeout=60)
        assert r.status_code == 400 and "no longer the file that was indexed" in r.json()["error"]
    out = export(db, tmp_path / "ok", fmt="folder", ids=[ids["intact"]], link=False)
    copied = next(p for p in out.rglob("*.png"))
    assert copied.read_bytes() == Path(db.rows_by_id([ids["intact"]], [S.IMAGE]).column(0)[0].as_py()).read_bytes()
    r = requests.post(f"{url}/api/v1/export", json={"ids": [ids["intact"]], "format": "folder"}, timeout=60)
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert any(n.endswith(".png") for n in names)
    # csv / parquet exports hand out paths, not files: they still work, without the identity columns
    csv = export(db, tmp_path / "m.csv", ids=[ids["intact"], ids["linked"]])
    assert not set(S.IDENTITY_COLUMNS) & set(pd.read_csv(csv).columns)


def test_a_database_from_before_identities_opens_and_serves_by_path(tmp_path, caplog):
    """Tables indexed before the identity columns existed still open: files are checked by path
    only (as before), and the log says so once."""
    import lancedb

    from search_ui.ui.context import AppContext
    from tests.fakes import make_db

    db = make_db(tmp_path, n=10)
    old = db.read().drop_columns(list(S.IDENTITY_COLUMNS))
    conn = lancedb.connect(db.path)
    conn.drop_table(S.TABLE_NAME)
    conn.create_table(S.TABLE_NAME, old)
    db = Database(db.path)
    db.update_meta(data_version=db.version)
    assert S.IMAGE_SHA256 not in db.table.schema.names
    ctx = AppContext(db)
    first = old.column(S.IMAGE)[0].as_py()
    with caplog.at_level("WARNING"):
        assert ctx.files.check(first) == os.path.realpath(first)
    assert "checked by path only" in caplog.text and ctx.files.checks_identity is False
    assert ctx.files.check(str(tmp_path / "manifest.csv")) is None
    from search_ui.engine import QueryEngine

    assert len(QueryEngine(db).search("a circle", k=3)) == 3
