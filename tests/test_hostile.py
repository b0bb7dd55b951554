"""Hostile and careless inputs (issue 14): each gets one sentence naming the input and exit 2, never
a traceback, and nothing is silently accepted or left half-written."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from indexer import schema as S
from indexer.errors import UserError
from indexer.pipeline import index_dataset
from indexer.store import Database
from tests.fakes import make_db, make_images
from tests.test_bad_input import _state


def one_sentence(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg and msg.rstrip(".").count(". ") == 0, msg


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with a few bytes of data: a
    decompression bomb to anything that decodes it (PIL itself refuses past ~179 MP)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(folder, db): a 30-row database with predictions, and its images."""
    folder = tmp_path_factory.mktemp("hostile")
    return folder, make_db(folder, n=30)


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "search_ui.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def refused(capsys, *args) -> str:
    """Run the CLI in-process (a traceback would fail the test); exit 2 with one line on stderr."""
    from search_ui.cli import main

    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    line = err.strip().splitlines()[-1]
    one_sentence(line)
    return line


# ---- images: one opening function, a pixel budget, bombs ----------------------------------------
def test_a_decompression_bomb_is_one_sentence_for_similar_and_search(world, tmp_path):
    folder, db = world
    bomb = png_header(tmp_path / "bomb.png", 30000, 30000)  # 900 MP declared, 100 bytes on disk
    for args in (["similar", bomb], ["search", "a circle", "--image", bomb]):
        p = run_cli(*args, "--db", db.path)
        assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
        line = p.stderr.strip().splitlines()[-1]
        one_sentence(line)
        assert "bomb.png" in line and "decompression bomb" in line


def test_the_pixel_budget_refuses_before_decoding(world, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from indexer.images import TOO_LARGE, ImageRefused, open_image

    folder, db = world
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(big)
    monkeypatch.setenv("LLM2LOSS_MAX_PIXELS", "19999")
    with pytest.raises(ImageRefused) as e:
        open_image(big)
    assert e.value.reason == TOO_LARGE and "200x100" in e.value.detail
    monkeypatch.setenv("LLM2LOSS_MAX_PIXELS", "20000")
    assert open_image(big).size == (200, 100)  # at the budget: fine
    # the header alone is read: a file whose pixel data is garbage is refused for its size, not decoded
    png_header(tmp_path / "fake.png", 30000, 20000)
    monkeypatch.setenv("LLM2LOSS_MAX_PIXELS", "40000000")
    with pytest.raises(ImageRefused, match="declares 600.0 MP .a decompression bomb., over the 40 MP budget"):
        open_image(tmp_path / "fake.png")
    line = refused(capsys, "similar", tmp_path / "fake.png", "--db", db.path)
    assert "LLM2LOSS_MAX_PIXELS" in line
    monkeypatch.setenv("LLM2LOSS_MAX_PIXELS", "lots")
    assert "LLM2LOSS_MAX_PIXELS='lots'" in refused(capsys, "similar", big, "--db", db.path)


def test_index_rejects_images_over_the_budget_as_a_row(tmp_path, monkeypatch, tiny_clip_spec):
    from PIL import Image

    df = make_images(tmp_path, 6)
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "big.png")  # 4096 pixels; the others 1024
    df.loc[2, "image"] = "images/big.png"
    df.to_csv(tmp_path / "m.csv", index=False)
    monkeypatch.setenv("LLM2LOSS_MAX_PIXELS", "2000")
    r = index_dataset(tmp_path / "m.csv", tmp_path / "db", clip=tiny_clip_spec, workers=0, progress=False)
    assert r.rows_written == 5 and r.rejected == {"image too large": 1}
    rej = pd.read_csv(tmp_path / "db" / "rejects.csv")
    assert rej["id"].tolist() == ["s00002"] and "64x64 pixels" in rej["detail"][0]


def test_a_class_folder_with_non_utf8_names_is_one_sentence(tmp_path, tiny_clip_spec):
    from PIL import Image

    (tmp_path / "src" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "cat" / "ok.png")
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(tmp_path / "src" / "cat"), b"caf\xe9.png"))
    with pytest.raises(UserError) as e:
        index_dataset(tmp_path / "src", tmp_path / "db", clip=tiny_clip_spec, workers=0, progress=False)
    one_sentence(str(e.value))
    assert "not valid UTF-8" in str(e.value) and "caf\\xe9.png" in str(e.value)
    assert not (tmp_path / "db").exists()


# ---- --model: the user's code fails ------------------------------------------------------------------
MODELS = '''
import numpy as np
import torch


class Net(torch.nn.Module):
    def __init__(self, out=3, fail=False, kind="tensor", classes=None):
        super().__init__()
        self.lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(out))
        self.fail, self.kind = fail, kind
        if classes is not None:
            self.classes = classes

    def forward(self, x):
        if self.fail:
            raise RuntimeError("CUDA out of memory (pretend)")
        y = self.lin(x)
        if self.kind == "dict":
            return {"logits": y}
        if self.kind == "nan":
            y = y.clone()
            y[1, 0] = float("nan")
        return y


def raises():
    raise ValueError("weights file missing")

def forward_raises():
    return Net(fail=True)

def non_tensor():
    return Net(kind="dict")

def nan_scores():
    return Net(kind="nan")

def wrong_width():
    return Net(out=4, classes=["circle", "square", "triangle"])
'''


@pytest.fixture()
def half(tmp_path, tiny_clip_spec):
    """(manifest without losses, a database holding the other rows, models.py)."""
    df = make_images(tmp_path, 12)
    df.iloc[:6].to_csv(tmp_path / "first.csv", index=False)
    df.iloc[6:].drop(columns=["loss"]).to_csv(tmp_path / "second.csv", index=False)
    index_dataset(tmp_path / "first.csv", tmp_path / "db", clip=tiny_clip_spec, workers=0, progress=False)
    (tmp_path / "models.py").write_text(MODELS)
    return tmp_path / "second.csv", tmp_path / "db", tmp_path / "models.py"


@pytest.mark.parametrize("fn, words", [
    ("raises", ["calling raises()", "ValueError: weights file missing"]),
    ("forward_raises", ["failed on the images of manifest rows 1 to 2", "CUDA out of memory"]),
    ("non_tensor", ["returned dict", "not scores"]),
    ("nan_scores", ["the score nan", "manifest row 2"]),
    ("wrong_width", ["lists 3 `classes` but outputs 4 scores"]),
])
def test_a_failing_model_is_one_sentence_and_writes_nothing(half, fn, words, tmp_path, tiny_clip_spec):
    source, db, models = half
    before = _state(db)
    for target in (db, tmp_path / "new" / "db"):
        with pytest.raises(UserError) as e:
            index_dataset(source, target, clip=tiny_clip_spec, model=f"{models}:{fn}", batch_size=2,
                          commit_rows=2, workers=0, progress=False)
        one_sentence(str(e.value))
        for w in words:
            assert w in str(e.value)
    assert _state(db) == before
    assert not (tmp_path / "new" / "db").exists()  # no empty table left behind


# ---- predictions: scores no loss can honestly come from ----------------------------------------------
def _predictions(path: Path, ids, columns: dict) -> Path:
    pd.DataFrame({"id": list(ids), **columns}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case, words", [
    ("one column", ["one score per sample", "every loss would be 0"]),
    ("infinite", ["the score inf", "'circle'", "id 's00008'"]),
    ("nan", ["the score nan", "id 's00007'", "and non-finite scores for 1 more rows"]),
])
def test_predictions_that_would_give_made_up_losses_are_refused(half, case, words, tmp_path, tiny_clip_spec):
    source, db, _ = half
    ids = pd.read_csv(source)["id"]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), len(ids))
    cols = {c: probs[:, j] for j, c in enumerate(["circle", "square", "triangle"])}
    if case == "one column":
        cols = {"circle": probs[:, 0]}
    elif case == "infinite":
        cols["circle"][2] = np.inf  # as probabilities, clipped to 1: a loss of -0.0 before the fix
    else:
        cols["square"][1] = np.nan
        cols["square"][4] = np.nan
    before = _state(db)
    with pytest.raises(UserError) as e:
        index_dataset(source, db, clip=tiny_clip_spec, predictions=_predictions(tmp_path / "p.csv", ids, cols),
                      workers=0, progress=False)
    one_sentence(str(e.value))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert _state(db) == before


def test_one_sigmoid_column_is_still_fine_for_multilabel(half, tmp_path, tiny_clip_spec):
    source, db, _ = half
    ids = pd.read_csv(source)["id"]
    p = _predictions(tmp_path / "p.csv", ids, {"circle": np.linspace(0.1, 0.9, len(ids))})
    m = pd.read_csv(source)
    m["label"] = ["circle" if i % 2 else "" for i in range(len(m))]
    m.to_csv(tmp_path / "ml.csv", index=False)
    r = index_dataset(tmp_path / "ml.csv", db, clip=tiny_clip_spec, predictions=p, task="multilabel",
                      workers=0, progress=False)
    assert r.rows_written == 6
    got = Database(db).read([S.ID, S.LOSS], where="id IN ('s00006', 's00007')").to_pandas().set_index(S.ID)
    # BCE of one probability: s00006 has no positive class (p = 0.1), s00007 is a circle (p = 0.26)
    assert got.loc["s00006", S.LOSS] == pytest.approx(-np.log(0.9), rel=1e-5)
    assert got.loc["s00007", S.LOSS] == pytest.approx(-np.log(0.1 + 0.8 / 5), rel=1e-5)


# ---- CLIP configs and checkpoints ---------------------------------------------------------------------
def _clip_error(spec) -> str:
    from indexer.clip import load_clip

    with pytest.raises(UserError) as e:
        load_clip(spec, "cpu")
    one_sentence(str(e.value))
    assert "no network" not in str(e.value)
    return str(e.value)


def test_bad_clip_configs_and_checkpoints_say_what_is_wrong_with_the_file(tmp_path):
    from indexer.clip import ClipSpec, load_clip
    from indexer.configs import TINY_CLIP

    (tmp_path / "broken.json").write_text('{"embed_dim": 12,')
    assert "broken.json is not valid JSON" in _clip_error(ClipSpec(str(tmp_path / "broken.json")))
    (tmp_path / "part.json").write_text('{"embed_dim": 12, "vision_cfg": {}}')
    assert "part.json is incomplete: it lacks `text_cfg`" in _clip_error(ClipSpec(str(tmp_path / "part.json")))
    # a broken config no longer poisons open_clip's registry for the rest of the process
    assert load_clip(ClipSpec(str(TINY_CLIP)), "cpu").embed_dim == 128

    for junk in (b"definitely not weights", b"these are not weights", b"PK\x03\x04 truncated zip"):
        (tmp_path / "junk.pt").write_bytes(junk)  # "t" is a pickle opcode: torch fails with an IndexError
        msg = _clip_error(ClipSpec(str(TINY_CLIP), checkpoint=str(tmp_path / "junk.pt")))
        assert "junk.pt could not be loaded: it is not a readable torch or safetensors file" in msg

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"weights": Payload()}, tmp_path / "evil.pt")
    msg = _clip_error(ClipSpec(str(TINY_CLIP), checkpoint=str(tmp_path / "evil.pt")))
    assert "evil.pt could not be loaded: it holds pickled Python objects" in msg
    assert not (tmp_path / "pwned").exists()

    torch.save({"not_a_clip": torch.zeros(2)}, tmp_path / "other.pt")
    msg = _clip_error(ClipSpec(str(TINY_CLIP), checkpoint=str(tmp_path / "other.pt")))
    assert "other.pt could not be loaded: it is not a state dict of tiny-clip" in msg


# ---- files in the database and beside it ----------------------------------------------------------
@pytest.mark.parametrize("content", ["[1, 2]", '"hard"', '{"hard": "s00001"}', '{"hard": [1, 2]}'])
def test_a_selections_file_that_is_not_an_object_of_id_lists(world, tmp_path, content, capsys):
    import shutil

    folder, db = world
    shutil.copytree(db.path, tmp_path / "db")
    (tmp_path / "db" / "selections.json").write_text(content)
    line = refused(capsys, "select", "list", "--db", tmp_path / "db")
    assert "selections.json" in line


def test_vocabulary_files_that_are_binary_or_folders(tmp_path):
    from diagnosis.vocab import read_vocab_file

    (tmp_path / "v.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "v16.txt").write_text("a dog\na cat\n", encoding="utf-16")
    (tmp_path / "folder").mkdir()
    for name, words in (("v.bin", "is not UTF-8 text"), ("v16.txt", "is not UTF-8 text"), ("folder", "is a folder")):
        with pytest.raises(UserError) as e:
            read_vocab_file(tmp_path / name)
        one_sentence(str(e.value))
        assert name in str(e.value) and words in str(e.value) and "does not exist" not in str(e.value)
    (tmp_path / "ok.txt").write_text("\ufeffa dog\n# note\na dog\nsnow\n", encoding="utf-8")
    assert read_vocab_file(tmp_path / "ok.txt") == ["a dog", "snow"]


# ---- options ---------------------------------------------------------------------------------------
def test_bad_options_are_one_sentence(world, tmp_path, capsys):
    folder, db = world
    (tmp_path / "afile").write_text("x")
    manifest = folder / "manifest.csv"
    assert "--workers -3 is negative" in refused(capsys, "index", manifest, "--db", tmp_path / "db", "--workers", "-3")
    # the writer lock (indexer.store.writer_lock) is taken first and names the problem itself
    assert "is a file, not a folder" in refused(capsys, "index", manifest, "--db", tmp_path / "afile")
    assert "cannot be created or written" in refused(capsys, "index", manifest, "--db", tmp_path / "afile" / "db")
    assert not (tmp_path / "db").exists() and (tmp_path / "afile").read_text() == "x"
    assert "--candidates 0 leaves no rows" in refused(capsys, "search", "a circle", "--db", db.path, "--candidates", "0")
    assert "--candidates -5" in refused(capsys, "similar", "s00001", "--db", db.path, "--candidates", "-5")


def test_a_where_with_a_second_statement_is_refused(world, capsys):
    folder, db = world
    for where in ("split = 'train'; DROP TABLE samples", "split = 'train';"):
        assert "a `;` (a filter is one expression" in refused(capsys, "search", "a circle", "--db", db.path,
                                                              "--where", where)
    # Issue 25: a function call in a filter (LanceDB allocated 100 GB and aborted the process) is refused.
    assert "calls the function repeat" in refused(capsys, "search", "a circle", "--db", db.path, "--where",
                                                  "repeat(id, 100000000) = 'x'")
    assert "calls the function regexp_match" in refused(capsys, "select", "add", "x", "--db", db.path, "--query",
                                                        "a circle", "--where", "regexp_match(id, 'a') IS NULL")
    from search_ui.engine import QueryEngine
    from search_ui.filters import parse_filter

    schema = Database(db.path).table.schema
    assert parse_filter("label = 'a;b' AND \"split\" != ';'", schema).sql == "`label` = 'a;b' AND `split` != ';'"
    assert parse_filter("label = 'it''s; fine'", schema).sql == "`label` = 'it''s; fine'"
    assert QueryEngine(db).search("a circle", k=3, where="label = 'x;y'") == []


def test_an_empty_query_on_the_cli_is_refused(world, capsys):
    folder, db = world
    for args in (["search", ""], ["search", "   ", "--also", "red"], ["search", "red", "--also", ":0.5"],
                 ["search", "red", "--negative", " "]):
        line = refused(capsys, *args, "--db", db.path)
        assert "empty" in line or "has no phrase" in line
    from search_ui.cli import main

    assert main(["search", "", "--image", "s00003", "--db", str(db.path), "-k", "2"]) == 0  # an image alone is a query
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_a_search_that_matches_nothing_says_so(world, capsys):
    from search_ui.cli import main

    folder, db = world
    assert main(["search", "a circle", "--db", str(db.path), "--where", "label = 'hexagon'"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"no results: no row of {db.path} matches --where \"label = 'hexagon'\"."
    assert main(["search", "a circle", "--db", str(db.path), "--where", "label = 'hexagon'", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


# ---- diagnose: figures that cannot be computed say why ----------------------------------------------
def test_constant_losses_say_why_the_quality_figures_are_undefined(tmp_path, capsys):
    from search_ui.cli import main

    db = make_db(tmp_path, n=40, predicted=False)
    db.table.update(values={S.LOSS: 0.25})
    assert main(["diagnose", "--db", str(db.path), "--members", "2", "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "Spearman undefined, R^2 undefined, AUROC(top 10% losses) undefined" in out
    assert "every loss is 0.25, so there is nothing to rank" in out and "nan" not in out
    assert main(["diagnose", "--db", str(db.path), "--members", "2", "--folds", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["spearman"] is None and d["quality_note"].startswith("every loss is 0.25")


def test_undefined_why_names_each_cause():
    from diagnosis.metrics import quality, undefined_why

    y = np.linspace(0, 1, 50)
    assert undefined_why(y, y) is None and quality(y, y)["spearman"] == pytest.approx(1.0)
    assert "every predicted loss is 0.5" in undefined_why(y, np.full(50, 0.5))
    assert "only 2 rows" in undefined_why(y[:2], y[:2])
    assert np.isnan(quality(y, np.full(50, 0.5))["spearman"]) and np.isnan(quality(y[:2], y[:2])["r2"])


# ---- the web UI's upload -----------------------------------------------------------------------------
def test_an_unreadable_upload_is_the_same_one_sentence(world, tmp_path):
    import gradio as gr

    from search_ui.ui.context import AppContext
    from search_ui.ui.handlers import Handlers

    folder, db = world
    ui = Handlers(AppContext(db))
    (tmp_path / "notes.png").write_text("this is text, not a PNG")
    png_header(tmp_path / "huge.png", 30000, 30000)
    for name, words in (("notes.png", "is not a readable image"), ("huge.png", "decompression bomb")):
        with pytest.raises(gr.Error) as e:
            ui.similar(str(tmp_path / name), "", 5, 0.5, progress=lambda *a, **k: None)
        msg = str(e.value.message)
        one_sentence(msg)
        assert f"the dropped file '{name}'" in msg and words in msg and str(tmp_path) not in msg
    items, status, shown = ui.similar(str(folder / "images" / "00006_blue_circle.png"), "", 4, 0.5,
                                      progress=lambda *a, **k: None)
    assert len(shown) == 4 and "4 results" in status


def test_the_served_upload_answers_a_bad_file_in_one_sentence(world, tmp_path):
    gradio_client = pytest.importorskip("gradio_client")
    from search_ui.app import build_app, launch_kwargs

    folder, db = world
    app = build_app(db)
    app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None))
    try:
        client = gradio_client.Client(app.local_url, verbose=False)
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        with pytest.raises(gradio_client.exceptions.AppError) as e:
            client.predict(gradio_client.handle_file(str(tmp_path / "broken.png")), "", 5, 0.5,
                           api_name="/similar_image")
        msg = str(e.value)
        assert "the dropped file 'broken.png' is not a readable image" in msg and "preprocess" not in msg.lower()
        gallery, status, *_ = client.predict(gradio_client.handle_file(str(folder / "images" / "00006_blue_circle.png")),
                                             "", 3, 0.5, api_name="/similar_image")
        assert len(gallery) == 3 and "3 results" in status
    finally:
        app.close()
