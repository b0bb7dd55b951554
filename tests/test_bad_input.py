"""Every bad input: one sentence naming the file or row and the fix, and the database as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from indexer import schema as S
from indexer.clip import ClipSpec
from indexer.errors import UserError
from indexer.pipeline import index_dataset
from indexer.store import Database
from tests.fakes import make_images

N = 12
CLASSES = ["circle", "square", "triangle"]

TWO_CLASS_MODEL = '''
import torch

def load():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_clip_spec):
    """A world of images and a database holding its first half."""
    folder = tmp_path_factory.mktemp("bad")
    df = make_images(folder, N)
    df.iloc[: N // 2].to_csv(folder / "first.csv", index=False)
    index_dataset(folder / "first.csv", folder / "db", clip=tiny_clip_spec, workers=0, progress=False)
    return folder, df


def _state(db: Path) -> dict:
    """What must not change: the rows, meta.json, rejects.csv and every file outside the table."""
    if not db.exists():
        return {"exists": False}
    files = {str(p.relative_to(db)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(db.rglob("*")) if p.is_file() and "samples.lance" not in p.parts}
    rows = None
    if (db / "samples.lance").exists():
        t = Database(db).read([S.ID, S.LOSS, S.EMBEDDING]).to_pandas().sort_values(S.ID)
        rows = (t[S.ID].tolist(), t[S.LOSS].tolist(), np.stack(t[S.EMBEDDING].to_numpy()).round(6).tolist())
    return {"exists": True, "files": files, "rows": rows}


def _second(folder: Path, df: pd.DataFrame, tmp_path: Path, edit=None, name="second.csv", drop_loss=False) -> Path:
    """The other half of the world as a new manifest (absolute image paths), edited."""
    m = df.iloc[N // 2:].copy().reset_index(drop=True)
    m["image"] = [str(folder / p) for p in m["image"]]
    if drop_loss:
        m = m.drop(columns=["loss"])
    if edit:
        m = edit(m) if callable(edit) else m
    path = tmp_path / name
    m.to_csv(path, index=False)
    return path


def _preds(tmp_path: Path, ids, k: int = 3, columns=None) -> Path:
    p = pd.DataFrame(np.random.default_rng(0).normal(size=(len(ids), k)), columns=columns or CLASSES[:k])
    p.insert(0, "id", list(ids))
    p.to_csv(tmp_path / "pred.csv", index=False)
    return tmp_path / "pred.csv"


def _corrupt_last(folder: Path):
    def edit(m):
        (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        m.loc[len(m) - 1, "image"] = str(folder / "images" / "broken.png")
        return m
    return edit


def _set(col, value, row=2):
    def edit(m):
        m[col] = m[col].astype(object)
        m.loc[row, col] = value
        return m
    return edit


def _case(name, folder, df, tmp_path):
    """(source, keyword arguments, words the message must contain) for each bad input."""
    second = lambda *a, **k: _second(folder, df, tmp_path, *a, **k)  # noqa: E731
    ids = df["id"].iloc[N // 2:]
    if name == "manifest missing":
        return tmp_path / "nope.csv", {}, ["nope.csv", "does not exist"]
    if name == "wrong type":
        (tmp_path / "m.json").write_text("{}")
        return tmp_path / "m.json", {}, ["m.json", "neither CSV nor Parquet"]
    if name == "no image column":
        return second(lambda m: m.rename(columns={"image": "path"})), {}, ["second.csv", "no `image` column"]
    if name == "image path does not exist":
        return second(_set("image", "/no/such/file.png")), {"strict": True}, ["row 3", "/no/such/file.png", "does not exist"]
    if name == "corrupt image":
        return second(_corrupt_last(folder)), {"strict": True}, ["row 6", "not a readable image"]
    if name == "NaN loss":
        return second(_set("loss", "nan")), {"strict": True}, ["row 3", "loss is missing"]
    if name == "infinite loss":
        return second(_set("loss", "inf")), {"strict": True}, ["row 3", "loss is infinite"]
    if name == "negative loss":
        return second(_set("loss", -0.5)), {"strict": True}, ["row 3", "negative"]
    if name == "duplicate ids":
        return second(_set("id", "s00007", row=3)), {}, ["rows 2 and 4", "s00007", "unique"]
    if name == "predictions ids do not match":
        return second(drop_loss=True), {"predictions": _preds(tmp_path, ["x", *ids[1:]])}, ["pred.csv", "no row"]
    if name == "predictions class count":
        src = second(lambda m: m.assign(label=[str(i % 3) for i in range(len(m))]), drop_loss=True)
        return src, {"predictions": _preds(tmp_path, ids, k=2, columns=["p0", "p1"])}, ["pred.csv", "2 classes", "need 3"]
    if name == "unknown label":
        src = second(_set("label", "hexagon"), drop_loss=True)
        return src, {"predictions": _preds(tmp_path, ids), "strict": True}, ["row 3", "'hexagon'", "unknown label"]
    if name == "model outputs do not fit the labels":
        (tmp_path / "twoclass.py").write_text(TWO_CLASS_MODEL)
        return second(drop_loss=True), {"model": f"{tmp_path / 'twoclass.py'}:load"}, ["2 classes", "need 3"]
    if name == "images differ in size without a model preprocess":
        (tmp_path / "twoclass.py").write_text(TWO_CLASS_MODEL)
        from PIL import Image

        Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
        src = second(_set("image", str(tmp_path / "big.png"), row=1), drop_loss=True)
        return src, {"model": f"{tmp_path / 'twoclass.py'}:load"}, ["differ in size", "preprocess"]
    if name == "no loss source":
        return second(drop_loss=True), {}, ["second.csv", "no `loss` column"]
    if name == "two loss sources":
        return second(), {"predictions": _preds(tmp_path, ids)}, ["exactly one source"]
    if name == "another CLIP model":
        return second(), {"clip": ClipSpec("RN50", None)}, ["'tiny-clip'", "'RN50'"]
    raise AssertionError(name)


CASES = ["manifest missing", "wrong type", "no image column", "image path does not exist", "corrupt image",
         "NaN loss", "infinite loss", "negative loss", "duplicate ids", "predictions ids do not match",
         "predictions class count", "unknown label", "model outputs do not fit the labels",
         "images differ in size without a model preprocess", "no loss source",
         "two loss sources", "another CLIP model"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_leaves_the_database_as_it_was(name, base, tmp_path, tiny_clip_spec):
    folder, df = base
    db = tmp_path / "db"
    shutil.copytree(folder / "db", db)
    source, kwargs, words = _case(name, folder, df, tmp_path)
    kwargs.setdefault("clip", tiny_clip_spec)
    before = _state(db)
    with pytest.raises(UserError) as e:
        index_dataset(source, db, batch_size=2, commit_rows=2, workers=0, progress=False, **kwargs)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg and msg.rstrip(".").count(". ") == 0, msg  # one sentence
    assert _state(db) == before


@pytest.mark.parametrize("name", ["corrupt image", "model outputs do not fit the labels", "unknown label"])
def test_bad_input_into_a_new_folder_leaves_nothing(name, base, tmp_path, tiny_clip_spec):
    folder, df = base
    source, kwargs, _ = _case(name, folder, df, tmp_path)
    with pytest.raises(UserError):
        index_dataset(source, tmp_path / "new" / "db", clip=tiny_clip_spec, batch_size=2, commit_rows=2,
                      workers=0, progress=False, **kwargs)
    assert not (tmp_path / "new" / "db").exists()


def test_corrupt_image_mid_run_is_undone_after_commits(base, tmp_path, tiny_clip_spec):
    """The corrupt image is the last row: five rows were committed before it, and are rolled back."""
    folder, df = base
    shutil.copytree(folder / "db", tmp_path / "db")
    source, kwargs, _ = _case("corrupt image", folder, df, tmp_path)
    rows_before = Database(tmp_path / "db").count_rows()
    version_before = Database(tmp_path / "db").version
    with pytest.raises(UserError):
        index_dataset(source, tmp_path / "db", clip=tiny_clip_spec, batch_size=1, commit_rows=1,
                      workers=0, progress=False, **kwargs)
    db = Database(tmp_path / "db")
    assert db.version >= version_before + 5 + 1  # five commits happened, then the restore
    assert db.count_rows() == rows_before
    # without --strict the same run stores the good rows and lists the broken one
    r = index_dataset(source, tmp_path / "db", workers=0, progress=False)
    assert r.rows_written == N // 2 - 1 and r.rejected == {"unreadable image": 1}
    assert "broken.png" in (tmp_path / "db" / "rejects.csv").read_text()
