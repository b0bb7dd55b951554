"""``index_dataset`` end to end with the tiny random CLIP: every loss source, meta.json, reruns."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from indexer import schema as S
from indexer.clip import ClipSpec, load_clip
from indexer.errors import UserError
from indexer.pipeline import index_dataset
from indexer.store import Database
from search_ui.cli import main
from tests.fakes import make_images

N = 18


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    df = make_images(folder, N)
    return folder, df


def _rows(db) -> pd.DataFrame:
    return Database(db).read().to_pandas().set_index(S.ID).sort_index()


def test_loss_column_embeddings_metadata_and_meta(world, tmp_path, tiny_clip_spec):
    folder, df = world
    report = index_dataset(folder / "manifest.csv", tmp_path / "db", clip=tiny_clip_spec, batch_size=5,
                           workers=1, progress=False, commit_rows=5)
    assert (report.rows_written, report.rows_already_stored, sum(report.rejected.values())) == (N, 0, 0)
    assert report.images_per_second > 0
    db = Database(tmp_path / "db")
    rows = _rows(tmp_path / "db")
    assert list(rows.index) == sorted(df["id"])
    want = df.set_index("id").sort_index()
    np.testing.assert_allclose(rows[S.LOSS], want["loss"], rtol=1e-6)  # float32 storage
    assert (rows[S.LABEL] == want["label"]).all() and (rows["color"] == want["color"]).all()
    assert (rows[S.SPLIT] == want["split"]).all()
    assert rows[S.IMAGE].tolist() == [str(folder / p) for p in want["image"]]
    assert rows[S.PREDICTED_LOSS].isna().all()
    assert db.table.schema.field("color").type == pa.string()

    # embeddings are exactly what the model gives for the image, L2-normalised
    model = load_clip(tiny_clip_spec, "cpu")
    pixels = torch.stack([model.preprocess(Image.open(folder / p).convert("RGB")) for p in want["image"]])
    expected = model.encode_images(pixels)
    got = np.stack(rows[S.EMBEDDING].to_numpy())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    meta = json.loads((tmp_path / "db" / "meta.json").read_text())
    assert meta["clip"] == tiny_clip_spec.identity()
    assert meta["clip_spec"]["model"] == str(tiny_clip_spec.config_path.resolve())
    assert meta["embed_dim"] == 128 and meta["data_version"] == report.data_version
    assert meta["data_version"] >= 1 + N // 5  # table creation + one commit per 5 rows
    assert meta["sources"] == [str(folder / "manifest.csv")] and meta["image_roots"] == [str(folder)]
    assert not (tmp_path / "db" / "rejects.csv").exists()

    # a finished rerun is a no-op: nothing written, the table version does not move
    version = db.version
    again = index_dataset(folder / "manifest.csv", tmp_path / "db", clip=None, workers=0, progress=False)
    assert (again.rows_written, again.rows_already_stored) == (0, N)
    assert Database(tmp_path / "db").version == version

    # another CLIP model is refused
    with pytest.raises(UserError, match="holds embeddings from CLIP model 'tiny-clip'"):
        index_dataset(folder / "manifest.csv", tmp_path / "db", clip=ClipSpec("RN50", None), progress=False)


def test_appending_a_manifest_adds_only_new_ids(world, tmp_path, tiny_clip_spec):
    folder, df = world
    df.iloc[:10].to_csv(folder / "first.csv", index=False)
    index_dataset(folder / "first.csv", tmp_path / "db", clip=tiny_clip_spec, workers=0, progress=False)
    # the second manifest overlaps the first on rows 5..9 and has fewer metadata columns
    df.iloc[5:].drop(columns=["color"]).to_csv(folder / "second.csv", index=False)
    r = index_dataset(folder / "second.csv", tmp_path / "db", workers=0, progress=False)
    assert (r.rows_written, r.rows_already_stored) == (N - 10, 5)
    rows = _rows(tmp_path / "db")
    assert sorted(rows.index) == sorted(df["id"]) and rows.index.is_unique
    assert rows["color"].isna().sum() == N - 10
    meta = Database(tmp_path / "db").read_meta()
    assert meta["sources"] == [str(folder / "first.csv"), str(folder / "second.csv")]


def test_per_row_problems_are_rejected_and_listed(world, tmp_path, tiny_clip_spec):
    folder, df = world
    bad = df.iloc[:8].copy()
    bad.loc[1, "image"] = "images/absent.png"
    (folder / "images" / "corrupt.png").write_bytes(b"this is not a png")
    bad.loc[2, "image"] = "images/corrupt.png"
    bad.loc[3, "loss"] = -1.0
    bad.loc[4, "loss"] = np.inf
    bad.to_csv(tmp_path / "bad.csv", index=False)
    # the manifest lives elsewhere: make its image paths absolute
    bad["image"] = [str(folder / p) for p in bad["image"]]
    bad.to_csv(tmp_path / "bad.csv", index=False)
    r = index_dataset(tmp_path / "bad.csv", tmp_path / "db", clip=tiny_clip_spec, workers=1, progress=False)
    assert r.rows_written == 4
    assert r.rejected == {"image not found": 1, "unreadable image": 1, "loss is negative": 1, "loss is infinite": 1}
    rej = pd.read_csv(tmp_path / "db" / "rejects.csv")
    assert rej["row"].tolist() == [2, 3, 4, 5]
    assert rej["id"].tolist() == bad["id"].iloc[1:5].tolist()
    assert rej["reason"].tolist() == ["image not found", "unreadable image", "loss is negative", "loss is infinite"]
    assert sorted(_rows(tmp_path / "db").index) == sorted(bad["id"].iloc[[0, 5, 6, 7]])
    assert "rows rejected: 4" in r.summary() and "unreadable image" in r.summary()


def test_predictions_source(world, tmp_path, tiny_clip_spec):
    folder, df = world
    classes = ["circle", "square", "triangle"]
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (N, 3))
    pred = pd.DataFrame(logits, columns=classes)
    pred.insert(0, "id", df["id"])
    pred.to_csv(tmp_path / "pred.csv", index=False)
    df.drop(columns=["loss"]).to_csv(folder / "noloss.csv", index=False)
    r = index_dataset(folder / "noloss.csv", tmp_path / "db", clip=tiny_clip_spec, predictions=tmp_path / "pred.csv",
                      workers=0, progress=False)
    assert r.rows_written == N
    y = torch.tensor([classes.index(lab) for lab in df["label"]])
    ce = torch.nn.functional.cross_entropy(torch.tensor(logits), y, reduction="none").numpy()
    got = _rows(tmp_path / "db").loc[df["id"], S.LOSS].to_numpy()
    np.testing.assert_allclose(got, ce, rtol=1e-6)


MODEL_SRC = '''
import torch

class Net(torch.nn.Module):
    """Scores 3 shapes from the mean colour of a 32x32 image, deterministically."""
    classes = ["circle", "square", "triangle"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        assert x.shape[1:] == (3, 32, 32), x.shape
        return self.fc(x.mean(dim=(2, 3)))

def load():
    return Net()
'''


def test_model_source_runs_over_the_images(world, tmp_path, tiny_clip_spec):
    folder, df = world
    (tmp_path / "mymodel.py").write_text(MODEL_SRC)
    df.drop(columns=["loss"]).to_csv(folder / "noloss.csv", index=False)
    r = index_dataset(folder / "noloss.csv", tmp_path / "db", clip=tiny_clip_spec,
                      model=f"{tmp_path / 'mymodel.py'}:load", batch_size=4, workers=1, progress=False)
    assert r.rows_written == N
    import importlib.util

    spec = importlib.util.spec_from_file_location("mymodel_ref", tmp_path / "mymodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.load().eval()
    from torchvision.transforms.functional import to_tensor

    x = torch.stack([to_tensor(Image.open(folder / p).convert("RGB")) for p in df["image"]])
    y = torch.tensor([net.classes.index(lab) for lab in df["label"]])
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(net(x), y, reduction="none").numpy()
    got = _rows(tmp_path / "db").loc[df["id"], S.LOSS].to_numpy()
    np.testing.assert_allclose(got, ce, rtol=1e-5)


def test_class_folder_through_the_cli(world, tmp_path, tiny_clip_spec, capsys):
    folder, df = world
    root = tmp_path / "classes"
    for _, row in df.iterrows():
        (root / row["label"]).mkdir(parents=True, exist_ok=True)
        (root / row["label"] / f"{row['id']}.png").write_bytes((folder / row["image"]).read_bytes())
    (tmp_path / "mymodel.py").write_text(MODEL_SRC)
    rc = main(["index", str(root), "--db", str(tmp_path / "db"), "--clip", str(tiny_clip_spec.model),
               "--model", f"{tmp_path / 'mymodel.py'}:load", "--workers", "0", "--batch-size", "7"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"rows written: {N}" in out.out and "images/s" in out.out
    rows = _rows(tmp_path / "db")
    assert rows.index[0].count("/") == 1 and set(rows[S.LABEL]) == {"circle", "square", "triangle"}
    # a second run with no --clip reuses the recorded model and writes nothing
    assert main(["index", str(root), "--db", str(tmp_path / "db"), "--model", f"{tmp_path / 'mymodel.py'}:load",
                 "--workers", "0"]) == 0
    assert "rows written: 0" in capsys.readouterr().out


def test_pretrained_tag_without_weights_or_network_fails_at_once(world, tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE and an unreachable hub: a UserError saying how to provide weights, no db."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors"), str):
        pytest.skip("the ViT-B-32 weights are cached on this machine")
    folder, _ = world
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    with pytest.raises(UserError, match="--clip-checkpoint PATH") as e:
        index_dataset(folder / "manifest.csv", tmp_path / "db", clip=None, progress=False)  # default ViT-B-32
    # refused by the up-front reachability check, not after open_clip's download retries gave up
    assert "Error" not in str(e.value), str(e.value)
    assert not (tmp_path / "db").exists()
