"""Reading manifests and class folders: column types, paths, ids, and whole-run refusals."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from indexer import schema as S
from indexer.errors import UserError
from indexer.manifest import read_source


def _img(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def test_csv_paths_ids_labels_and_metadata_types(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    absolute = _img(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "m.csv").write_text(
        "image,label,split,age,score,flag,note\n"
        f"imgs/a.png,3,train,7,0.5,true,hello\n"
        f"{absolute},12,test,9,,false,\n"
    )
    m = read_source(tmp_path / "m.csv")
    t = m.table
    assert m.kind == "csv" and len(m) == 2
    # id defaults to the image path exactly as written; image becomes absolute
    assert t.column(S.ID).to_pylist() == ["imgs/a.png", str(absolute)]
    assert t.column(S.IMAGE).to_pylist() == [str(tmp_path / "imgs" / "a.png"), str(absolute)]
    assert t.column(S.LABEL).to_pylist() == ["3", "12"]  # labels are strings, not ints
    assert t.column(S.SPLIT).to_pylist() == ["train", "test"]
    meta = m.metadata_schema
    assert meta.names == ["age", "score", "flag", "note"]
    assert meta.field("age").type == pa.int64()
    assert meta.field("score").type == pa.float64()
    assert meta.field("flag").type == pa.bool_()
    assert meta.field("note").type == pa.string()
    assert t.column("score").to_pylist() == [0.5, None]
    assert not m.has_loss
    assert m.image_roots() == sorted([str(tmp_path)])  # elsewhere/ is under the manifest folder


def test_parquet_with_ids_and_loss(tmp_path):
    pd.DataFrame({"id": [10, 11], "image": ["x.png", "y.png"], "label": [1.0, None],
                  "loss": [0.25, 1.5]}).to_parquet(tmp_path / "m.parquet")
    m = read_source(tmp_path / "m.parquet")
    assert m.kind == "parquet"
    assert m.table.column(S.ID).to_pylist() == ["10", "11"]
    assert m.table.column(S.LABEL).to_pylist() == ["1", None]  # integral float label prints as "1"
    assert m.table.column(S.LOSS).to_pylist() == [0.25, 1.5]
    assert m.has_loss


def test_image_roots_cover_images_outside_the_manifest_folder(tmp_path):
    out = _img(tmp_path / "other" / "sub" / "c.png")
    (tmp_path / "man").mkdir()
    (tmp_path / "man" / "m.csv").write_text(f"image\nx.png\n{out}\n")
    m = read_source(tmp_path / "man" / "m.csv")
    assert m.image_roots() == sorted([str(tmp_path / "man"), str(tmp_path / "other" / "sub")])


def test_class_folder(tmp_path):
    _img(tmp_path / "root" / "dog" / "1.png")
    _img(tmp_path / "root" / "cat" / "2.jpg")
    _img(tmp_path / "root" / "cat" / "1.png")
    (tmp_path / "root" / "cat" / "notes.txt").write_text("not an image")
    m = read_source(tmp_path / "root")
    assert m.kind == "folder"
    assert m.table.column(S.ID).to_pylist() == ["cat/1.png", "cat/2.jpg", "dog/1.png"]
    assert m.table.column(S.LABEL).to_pylist() == ["cat", "cat", "dog"]
    assert m.table.column(S.IMAGE).to_pylist()[2] == str(tmp_path / "root" / "dog" / "1.png")


def test_loss_cells_that_are_not_numbers_are_per_row_problems(tmp_path):
    (tmp_path / "m.csv").write_text("image,loss\na.png,0.5\nb.png,oops\nc.png,\n")
    m = read_source(tmp_path / "m.csv")
    assert m.table.column(S.LOSS).to_pylist() == [0.5, None, None]
    assert m.loss_problems == {1: "loss 'oops' is not a number"}
    assert m.has_loss


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("absent.csv", None, "does not exist"),
        ("m.txt", "image\na.png\n", "neither CSV nor Parquet"),
        ("m.csv", "path,label\na.png,1\n", "no `image` column"),
        ("m.csv", "image,id\na.png,x\nb.png,x\n", "rows 1 and 2"),
        ("m.csv", "image\na.png\na.png\n", "share the id 'a.png'"),
        ("m.csv", "image,embedding\na.png,1\n", "`embedding`"),
        ("m.csv", "image\n", "no rows"),
        ("m.parquet", "not parquet at all", "could not be read as Parquet"),
    ],
)
def test_whole_run_refusals_name_the_file(tmp_path, name, content, needle):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(UserError) as e:
        read_source(p)
    msg = str(e.value)
    assert needle in msg and name in msg
    assert msg.count(". ") == 0  # one sentence


def test_empty_class_folder_is_refused(tmp_path):
    (tmp_path / "root" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images laid out as root/<class>/<image>"):
        read_source(tmp_path / "root")


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_ids_and_text_that_look_like_missing_values_are_kept_as_written(tmp_path, kind):
    """pandas/Arrow spell a missing value "nan", "NA", "null", "None": in a manifest those are text."""
    words = ["nan", "NA", "null", "None", "NaN", "n/a"]
    df = pd.DataFrame({"id": words, "image": [f"{i}.png" for i in range(6)], "label": words,
                       "split": ["NA"] * 6, "note": words, "loss": [0.5] * 6})
    if kind == "csv":
        df.to_csv(tmp_path / "m.csv", index=False)
    else:
        df.to_parquet(tmp_path / "m.parquet")
    t = read_source(tmp_path / f"m.{kind}").table
    assert t.column(S.ID).to_pylist() == words
    assert t.column(S.LABEL).to_pylist() == words
    assert t.column(S.SPLIT).to_pylist() == ["NA"] * 6
    assert t.column("note").to_pylist() == words


def test_an_empty_cell_is_no_value_except_an_id_which_is_refused_with_its_row(tmp_path):
    (tmp_path / "m.csv").write_text("id,image,label,note,loss\na,a.png,,,NA\nb,b.png,cat,x,0.5\n")
    t = read_source(tmp_path / "m.csv").table
    assert t.column(S.LABEL).to_pylist() == [None, "cat"] and t.column("note").to_pylist() == [None, "x"]
    assert t.column(S.LOSS).to_pylist() == [None, 0.5]  # numeric columns keep the usual null spellings
    (tmp_path / "m.csv").write_text("id,image\na,a.png\n,b.png\nc,c.png\n")
    with pytest.raises(UserError, match=r"row 2 of .*m\.csv has an empty `id`"):
        read_source(tmp_path / "m.csv")
    pd.DataFrame({"id": ["a", None], "image": ["a.png", "b.png"]}).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(UserError, match=r"row 2 of .*m\.parquet has an empty `id`"):
        read_source(tmp_path / "m.parquet")
