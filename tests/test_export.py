"""Export: manifests that `index` reads back into the same rows, and class folders."""

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from indexer import schema as S
from indexer.errors import UserError
from indexer.manifest import read_source
from search_ui.export import export
from search_ui.selections import Selections
from tests.fakes import make_db

KEPT = [S.ID, S.IMAGE, S.LABEL, S.SPLIT, S.LOSS, "color"]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    torch.manual_seed(0)
    return make_db(tmp_path_factory.mktemp("export"), n=24)


def stored(db, ids):
    t = db.rows_by_id(ids, KEPT).to_pylist()
    return {r[S.ID]: r for r in t}


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_manifest_export_reads_back_as_the_same_rows(db, tmp_path, suffix):
    ids = ["s00005", "s00001", "s00010"]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    out = export(db, tmp_path / f"sel.{suffix}", ids=str(tmp_path / "ids.txt"))
    assert out == (tmp_path / f"sel.{suffix}").resolve()
    m = read_source(out)
    got = m.table.to_pylist()
    assert [r[S.ID] for r in got] == ids  # the given order
    assert set(m.table.column_names) == set(KEPT)
    want = stored(db, ids)
    for r in got:
        for c in KEPT:
            if c == S.LOSS:
                assert r[c] == pytest.approx(want[r[S.ID]][c], rel=1e-6)
            else:
                assert r[c] == want[r[S.ID]][c], c
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_then_index_gives_back_the_same_rows(db, tmp_path):
    from indexer.pipeline import index_dataset

    Selections(db).add("retrain", ["s00002", "s00004", "s00009", "s00020"])
    out = export(db, tmp_path / "retrain.parquet", selection="retrain")
    assert pq.read_table(out).num_rows == 4
    torch.manual_seed(0)  # the same random-weight tiny CLIP as make_db's
    spec_db = db.read_meta()["clip_spec"]
    from indexer.clip import ClipSpec

    report = index_dataset(out, tmp_path / "db2", clip=ClipSpec(**spec_db), workers=0, progress=False)
    assert report is not None
    from indexer.store import Database

    db2 = Database(tmp_path / "db2")
    again = {r[S.ID]: r for r in db2.read(KEPT + [S.EMBEDDING]).to_pylist()}
    want = {r[S.ID]: r for r in db.rows_by_id(list(again), KEPT + [S.EMBEDDING]).to_pylist()}
    assert set(again) == {"s00002", "s00004", "s00009", "s00020"}
    for i, r in again.items():
        for c in KEPT:
            assert r[c] == want[i][c], c
        np.testing.assert_allclose(r[S.EMBEDDING], want[i][S.EMBEDDING], atol=1e-5)


@pytest.mark.parametrize("link", [True, False])
def test_folder_export(db, tmp_path, link):
    ids = ["s00000", "s00001", "s00002", "s00003"]
    out = export(db, tmp_path / "folder", ids=ids, link=link)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    want = stored(db, ids)
    assert files == sorted(f"{want[i][S.LABEL]}/{os.path.basename(want[i][S.IMAGE])}" for i in ids)
    assert all((out / f).is_symlink() == link for f in files)
    # As a class folder: labels from the subfolders.
    m = read_source(out)
    assert sorted(m.table.column(S.LABEL).to_pylist()) == sorted(want[i][S.LABEL] for i in ids)
    # Through its manifest: ids, losses and metadata kept, images relative to the folder.
    rows = read_source(out / "manifest.csv").table.to_pylist()
    assert [r[S.ID] for r in rows] == ids
    assert all(Path(r[S.IMAGE]).read_bytes() == Path(want[r[S.ID]][S.IMAGE]).read_bytes() for r in rows)
    assert [r["color"] for r in rows] == [want[i]["color"] for i in ids]


def test_query_export_and_bad_requests(db, tmp_path):
    out = export(db, tmp_path / "q.csv", query="a blue circle", k=5)
    assert read_source(out).table.num_rows == 5
    with pytest.raises(UserError, match="exactly one"):
        export(db, tmp_path / "x.csv", query="a", ids=["s00001"])
    with pytest.raises(UserError, match="not in"):
        export(db, tmp_path / "x.csv", ids=["nope"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        export(db, tmp_path / "full", ids=["s00001"])
    assert not (tmp_path / "x.csv").exists()


def test_mode_export_by_number_or_description(db, tmp_path, monkeypatch):
    import diagnosis.explain
    from diagnosis.explain import FailureMode

    def mode(desc, ids):
        return FailureMode(description=desc, predicted_loss=1.0, predicted_loss_std=0.1, examples=ids[:1],
                           size=len(ids), mean_loss=1.0, mean_predicted_loss=1.0, share_of_loss=0.1,
                           phrases=[desc], source="words", ids=ids)

    modes = [mode("a blue circle", ["s00006", "s00015", "s00024"]), mode("a small star", ["s00001"]),
             mode("a blue square", ["s00007"])]
    monkeypatch.setattr(diagnosis.explain, "explain", lambda db, top=10, **kw: modes[:top])
    out = export(db, tmp_path / "m.csv", mode="1", k=2)
    assert [r[S.ID] for r in read_source(out).table.to_pylist()] == ["s00006", "s00015"]
    out = export(db, tmp_path / "m2.csv", mode="small star")
    assert [r[S.ID] for r in read_source(out).table.to_pylist()] == ["s00001"]
    with pytest.raises(UserError, match="matches several"):
        export(db, tmp_path / "m3.csv", mode="blue")
    with pytest.raises(UserError, match="out of range"):
        export(db, tmp_path / "m3.csv", mode="7")


def test_export_never_writes_into_a_database_onto_a_device_or_over_a_file_unasked(db, tmp_path):
    import hashlib

    from search_ui.cli import main

    def digest():
        return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(db.path.rglob("*")) if p.is_file()}

    before = digest()
    for out, match in [
        (db.path / "meta.json", "inside the llm2loss database"),
        (db.path / "samples.lance" / "x.csv", "inside the llm2loss database"),
        (db.path / "diagnosis" / "x.parquet", "inside the llm2loss database"),
        (db.path, "inside the llm2loss database"),
        ("/dev/null", "not a regular file"),
        (tmp_path / "x.json", r"extension \.json, which export does not write; end it in \.csv or \.parquet"),
    ]:
        with pytest.raises(UserError, match=match):
            export(db, out, ids=["s00001"])
    assert digest() == before and os.path.exists("/dev/null") and not Path("/dev/null").is_file()
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "a_dir.csv").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        export(db, tmp_path / "a_dir.csv", ids=["s00001"])
    # an existing file: refused without --force, replaced (atomically, by rename) with it
    (tmp_path / "old.csv").write_text("keep me\n")
    with pytest.raises(UserError, match="already exists; pass --force"):
        export(db, tmp_path / "old.csv", ids=["s00001"])
    assert (tmp_path / "old.csv").read_text() == "keep me\n"
    assert main(["export", "--db", str(db.path), "--ids", str(_ids_file(tmp_path, ["s00001"])),
                 "--out", str(tmp_path / "old.csv")]) == 2
    assert main(["export", "--db", str(db.path), "--ids", str(_ids_file(tmp_path, ["s00001"])),
                 "--out", str(tmp_path / "old.csv"), "--force"]) == 0
    assert read_source(tmp_path / "old.csv").table.column(S.ID).to_pylist() == ["s00001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.csv", "ids.txt", "old.csv"]  # no temp files


def _ids_file(folder, ids):
    (folder / "ids.txt").write_text("\n".join(ids) + "\n")
    return folder / "ids.txt"


def test_folder_export_with_hostile_labels_and_ids_is_made_unique(tmp_path):
    import pyarrow as pa

    from indexer.identity import identity_columns
    from indexer.store import Database

    base = make_db(tmp_path / "src", n=6)
    t = base.read()
    long_label = "ü" * 200  # 400 bytes: over the 255-byte file name limit
    labels = ["manifest.csv", long_label, long_label, "a/b", "a_b", "MANIFEST.CSV"]
    ids = ["x/1", "x_1", "y" * 300, "z", "w", "v"]
    img = t.column(S.IMAGE).to_pylist()
    # rows 0/1: one image file name and ids that sanitise alike; rows 1/2: one long label, one file name
    images = [img[0], img[0], img[0], img[3], img[4], img[5]]
    t = t.set_column(t.column_names.index(S.LABEL), S.LABEL, pa.array(labels))
    t = t.set_column(t.column_names.index(S.ID), S.ID, pa.array(ids))
    t = t.set_column(t.column_names.index(S.IMAGE), S.IMAGE, pa.array(images))
    for name, values in identity_columns(images).items():  # what `index` records for those files
        t = t.set_column(t.column_names.index(name), name, values)
    db = Database(tmp_path / "src" / "db")
    db.table.delete("true")
    db.append(t)
    out = export(db, tmp_path / "out", ids=ids, link=False)
    rows = read_source(out / "manifest.csv").table.to_pylist()
    assert [r[S.ID] for r in rows] == ids and [r[S.LABEL] for r in rows] == labels  # true labels kept
    paths = [Path(r[S.IMAGE]).relative_to(out) for r in rows]
    assert len(set(paths)) == 6 and all((out / p).is_file() for p in paths)
    assert all(len(part.encode()) <= 255 for p in paths for part in p.parts)
    # one folder per distinct label ("a/b" and "a_b" apart), none of them the manifest
    assert (out / "manifest.csv").is_file() and len({p.parts[0] for p in paths}) == 5
