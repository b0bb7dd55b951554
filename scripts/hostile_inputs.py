"""Recount issue 14 as a hostile user would: every bad input the CLI can be given, against a small
world built in a temporary folder, and (``--http``) probes of a running ``serve``.

    nice -n 10 .venv/bin/python scripts/hostile_inputs.py [--jobs 2] [--http] [--json OUT.json]
    nice -n 10 .venv/bin/python scripts/hostile_inputs.py --only similar,select   # names containing these

Each case runs ``python -m search_ui.cli ...`` in a fresh process on its own copy of the database
(a 60-row tiny-CLIP database with a fitted ensemble, images and manifest beside it, a secret file and
a private folder among them, as a careless user would leave them). Counted per case:

* ``refused``: exit 2 and exactly one line on stderr that is not a log line, no "Traceback";
* ``refused, several lines``: exit 2 but more than one non-log line;
* ``traceback``: "Traceback" on stderr, or an exit status other than 0, 2 and 130;
* ``accepted``: exit 0 for an input that must be refused (silently accepted);
* ``said`` / ``silent``: for inputs that are fine but must be *said* (a search matching nothing,
  constant losses), exit 0 with / without the expected words;
* ``data lost``: the database copy's rows, ids or meta.json differ after a refused case, or a
  concurrent run leaves rows stored twice or a reader dying; ``code ran``: a crafted database file
  executed code.

``--http`` starts ``llm2loss serve`` on a free port over the same world and asks the file route for
files that are not indexed images (the manifest beside the images, a secret, a private key, the
database's own files, traversal and symlinks) and uploads an unreadable image to the similar-image
endpoint. Counted: files served that are not indexed images (goal 0) and the upload's answer. Then
(issue 25, :func:`http_issue25`) a second ``serve`` over a copy whose rows include files swapped
after indexing, odd ids and a newline in a file name: hostile filters on every route that takes
one, the swapped files on the image route, the file route and the export zip, cross-site
preflights and state changes, wrong JSON types, odd selection names and ids, the page's gallery,
then SIGTERM. Counted: process crashes, tracebacks, silent wrong results (an answer other than the
documented one), files served that are not indexed images, rows lost, temporary folders left.

Cases are tagged with the part of issue 14 they come from and the branch that fixes them (``input``:
hostile input; ``sec``: the serve allow-list, locks, export safety, pickles, NA ids); ``baseline``
cases were already handled before the issue and guard against regressions. Prints a table and a JSON
summary (the numbers BENCHMARKS.md records).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
TINY = ROOT / "indexer" / "configs" / "tiny-clip.json"


# ---- the world ------------------------------------------------------------------------------------
def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height pixels with ~100 bytes of data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def build_world(base: Path) -> dict:
    """World folder (images, manifest.csv, secret.txt, private/id_rsa), a database with a fitted
    ensemble, and the bad files the cases pass."""
    from diagnosis.run import diagnose
    from tests.fakes import make_db

    world = base / "world"
    db = make_db(world, n=60, predicted=False)
    diagnose(db, members=2, folds=2, progress=False)
    (world / "secret.txt").write_text("not an image\n")
    (world / "private").mkdir()
    (world / "private" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    os.symlink(world / "secret.txt", world / "images" / "zz_link.png")
    bad = base / "bad"
    bad.mkdir()
    png_header(bad / "bomb.png", 30000, 30000)
    png_header(bad / "big.png", 9000, 9000)  # 81 MP: under PIL's own limit, over the 40 MP budget
    (bad / "notes.png").write_text("text, not a PNG")
    (bad / "vocab.bin").write_bytes(bytes(range(256)) * 8)
    (bad / "vocab_dir").mkdir()
    (bad / "afile").write_text("keep me\n")
    (bad / "broken.json").write_text('{"embed_dim": 128, "vision_cfg": {')
    cfg = json.loads(TINY.read_text())
    (bad / "partial.json").write_text(json.dumps({"embed_dim": cfg["embed_dim"], "vision_cfg": cfg["vision_cfg"]}))
    (bad / "junk.pt").write_bytes(b"these are not weights")
    _write_unsafe_checkpoint(bad / "unsafe.pt", base / "MARKER_checkpoint")
    (bad / "models.py").write_text(MODELS)
    # a class folder with a name that is not UTF-8
    from PIL import Image

    (bad / "folder" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "folder" / "cat" / "ok.png")
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(bad / "folder" / "cat"), b"caf\xe9.png"))
    return {"world": world, "db": db.path, "bad": bad, "base": base}


MODELS = '''
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
            raise RuntimeError("pretend CUDA out of memory")
        y = self.lin(x)
        return {"logits": y} if self.kind == "dict" else y


def raises():
    raise ValueError("weights file missing")

def forward_raises():
    return Net(fail=True)

def non_tensor():
    return Net(kind="dict")

def wrong_width():
    return Net(out=4, classes=["circle", "square", "triangle"])
'''


class _Marker:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_unsafe_checkpoint(path: Path, marker: Path) -> None:
    import torch

    torch.save({"weights": _Marker(str(marker))}, path)


# ---- cases -------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    part: str  # "one sentence" | "said" | "security" | "data loss" | "baseline"
    owner: str  # "input" | "sec" | "baseline"
    args: list[str] = field(default_factory=list)
    expect: str = "refuse"  # "refuse" | "say" (exit 0 with `words`) | "safe" (custom check)
    words: list[str] = field(default_factory=list)
    setup: Callable[[dict, Path], None] | None = None
    env: dict = field(default_factory=dict)
    check: Callable[[dict, Path, list], str | None] | None = None  # -> a problem, or None
    runs: int = 1  # >1: that many copies of the command at once (concurrency)


def _manifest(edit=None, name="m.csv", drop_loss=False):
    """setup: a copy of the world's manifest with absolute image paths, edited."""
    def setup(w, d):
        import pandas as pd

        m = pd.read_csv(w["world"] / "manifest.csv")
        m["image"] = [str(w["world"] / p) for p in m["image"]]
        m["id"] = ["n" + i for i in m["id"]]  # new ids: the rows are added, not skipped as stored
        if drop_loss:
            m = m.drop(columns=["loss"])
        if edit:
            m = edit(m, w, d)
        m.to_csv(d / name, index=False)
    return setup


def _predictions(kind):
    def setup(w, d):
        import numpy as np
        import pandas as pd

        _manifest(drop_loss=True)(w, d)
        m = pd.read_csv(d / "m.csv")
        p = np.random.default_rng(0).dirichlet(np.ones(3), len(m))
        cols = {"circle": p[:, 0], "square": p[:, 1], "triangle": p[:, 2]}
        if kind == "nan":
            cols["square"][3] = np.nan
        elif kind == "inf":
            cols["circle"][2] = np.inf
        elif kind == "one column":
            cols = {"circle": p[:, 0]}
        pd.DataFrame({"id": m["id"], **cols}).to_csv(d / "p.csv", index=False)
    return setup


def _na_ids(w, d):
    _manifest(lambda m, w, d: m.assign(id=["nan", "NA", "null"] + list(m["id"][3:])))(w, d)


def _check_na_ids(w, d, procs):
    from indexer.store import Database

    ids = set(Database(d / "db").read(["id"]).column("id").to_pylist())
    missing = [i for i in ("nan", "NA", "null") if i not in ids]
    return f"ids {missing} were not stored as given" if missing else None


def _crafted_ensemble(w, d):
    import joblib

    joblib.dump(_Marker(str(d / "MARKER")), d / "db" / "diagnosis" / "ensemble.joblib")


def _crafted_ensemble_and_new_rows(w, d):
    from indexer import schema as S
    from indexer.store import Database

    _crafted_ensemble(w, d)
    Database(d / "db").table.update(where="id = 's00001'", values={S.PREDICTED_LOSS: None})


def _one_big_image(m, w, d):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(d / "big64.png")  # 4096 pixels; the world's images have 1024
    m.loc[0, "image"] = str(d / "big64.png")
    return m


def _check_rejected_big(w, d, procs):
    import csv

    with open(d / "db" / "rejects.csv") as f:
        rows = list(csv.DictReader(f))
    if [r["reason"] for r in rows] != ["image too large"]:
        return f"rejects.csv lists {[r['reason'] for r in rows]}"
    return None


def _check_no_code(w, d, procs):
    return "a crafted database file ran code" if (d / "MARKER").exists() else None


def _check_checkpoint_marker(w, d, procs):
    return "the checkpoint ran code" if (w["base"] / "MARKER_checkpoint").exists() else None


def _corrupt_meta(w, d):
    (d / "db" / "meta.json").write_text('{"clip": ')


def _selections(content):
    def setup(w, d):
        (d / "db" / "selections.json").write_text(content)
    return setup


def _constant_losses(w, d):
    from indexer import schema as S
    from indexer.store import Database

    Database(d / "db").table.update(values={S.LOSS: 0.25})


def _check_files_kept(*paths):
    def check(w, d, procs):
        for p in paths:
            p = Path(str(p).format(db=d / "db", bad=w["bad"], d=d))
            if not p.exists():
                return f"{p} was destroyed"
        return None
    return check


def _check_out_regular(w, d, procs):
    out = d / "x.json"
    if out.is_dir():
        return "--out x.json made a folder"
    return None


def _two_index_setup(w, d):
    shutil.rmtree(d / "db")
    _manifest()(w, d)


def _check_once(w, d, procs):
    from indexer.store import Database

    ids = Database(d / "db").read(["id"]).column("id").to_pylist()
    if len(ids) != len(set(ids)):
        return f"{len(ids)} rows stored for {len(set(ids))} ids"
    if any(p.returncode not in (0, 2) for p in procs):
        return "a concurrent run died"
    return None


def _check_readers(w, d, procs):
    if any("Traceback" in p.stderr or p.returncode not in (0, 2) for p in procs):
        return "a concurrent run died with a traceback"
    return None


def cases() -> list[Case]:
    db, bad = "{db}", "{bad}"
    models = f"{bad}/models.py"
    m = "{d}/m.csv"
    C = Case
    return [
        # ---- baseline: handled before issue 14 --------------------------------------------------
        C("manifest missing", "baseline", "baseline", ["index", "{d}/nope.csv", "--db", db]),
        C("manifest of another type", "baseline", "baseline", ["index", f"{bad}/broken.json", "--db", db]),
        C("manifest without image column", "baseline", "baseline", ["index", m, "--db", db],
          setup=_manifest(lambda m, w, d: m.rename(columns={"image": "path"}))),
        C("duplicate ids", "baseline", "baseline", ["index", m, "--db", db],
          setup=_manifest(lambda m, w, d: m.assign(id=["x"] * len(m)))),
        C("no loss source", "baseline", "baseline", ["index", m, "--db", db], setup=_manifest(drop_loss=True)),
        C("another CLIP model", "baseline", "baseline", ["index", m, "--db", db, "--clip", "RN50", "--pretrained", "none"],
          setup=_manifest()),
        C("unknown id for similar", "baseline", "baseline", ["similar", "no-such-id", "--db", db]),
        C("bad --where SQL", "baseline", "baseline", ["search", "a circle", "--db", db, "--where", "nope >"]),
        C("weight outside [0, 1]", "baseline", "baseline", ["search", "a circle", "--db", db, "--weight", "3"]),
        C("-k 0", "baseline", "baseline", ["search", "a circle", "--db", db, "-k", "0"]),
        C("--db not a database", "baseline", "baseline", ["search", "a circle", "--db", "{d}"]),
        C("unknown selection", "baseline", "baseline", ["select", "show", "nope", "--db", db]),
        C("corrupt image with --strict", "baseline", "baseline", ["index", m, "--db", db, "--strict"],
          setup=_manifest(lambda m, w, d: m.assign(image=[str(w["bad"] / "notes.png")] + list(m["image"][1:])))),
        # ---- one sentence, never a traceback ---------------------------------------------------
        C("decompression bomb to similar FILE", "one sentence", "input", ["similar", f"{bad}/bomb.png", "--db", db]),
        C("decompression bomb to search --image", "one sentence", "input",
          ["search", "a circle", "--image", f"{bad}/bomb.png", "--db", db]),
        C("unreadable file to similar FILE", "one sentence", "input", ["similar", f"{bad}/notes.png", "--db", db]),
        # hostile labels and ids are exported under safe, distinct names (exit 0), not refused
        C("export folder: label over 255 characters", "one sentence", "sec",
          ["export", "--db", db, "--ids", "{d}/ids.txt", "--out", "{d}/out", "--format", "folder"], expect="safe",
          setup=lambda w, d: (_relabel(d, "x" * 300), (d / "ids.txt").write_text("s00001\n")),
          check=_check_folder_export(1)),
        C("export folder: label named manifest.csv", "one sentence", "sec",
          ["export", "--db", db, "--ids", "{d}/ids.txt", "--out", "{d}/out", "--format", "folder"], expect="safe",
          setup=lambda w, d: (_relabel(d, "manifest.csv"), (d / "ids.txt").write_text("s00001\n")),
          check=_check_folder_export(1)),
        C("export folder: two ids that sanitise to one name", "one sentence", "sec",
          ["export", "--db", db, "--ids", "{d}/ids.txt", "--out", "{d}/out", "--format", "folder"], expect="safe",
          setup=_same_sanitised, check=_check_folder_export(2)),
        C("class folder with a non-UTF-8 file name", "one sentence", "input", ["index", f"{bad}/folder", "--db", "{d}/new"]),
        C("--model whose loader raises", "one sentence", "input", ["index", m, "--db", db, "--model", f"{models}:raises"],
          setup=_manifest(drop_loss=True)),
        C("--model whose forward raises", "one sentence", "input",
          ["index", m, "--db", db, "--model", f"{models}:forward_raises"], setup=_manifest(drop_loss=True)),
        C("--model returning a non-tensor", "one sentence", "input",
          ["index", m, "--db", db, "--model", f"{models}:non_tensor"], setup=_manifest(drop_loss=True)),
        C("--model whose forward raises, new --db", "one sentence", "input",
          ["index", m, "--db", "{d}/new", "--model", f"{models}:forward_raises"], setup=_manifest(drop_loss=True),
          check=lambda w, d, p: "an empty table was left behind" if (d / "new").exists() else None),
        C("malformed JSON CLIP config", "one sentence", "input",
          ["index", m, "--db", "{d}/new", "--clip", f"{bad}/broken.json"], setup=_manifest()),
        C("corrupt meta.json", "one sentence", "sec", ["search", "a circle", "--db", db], setup=_corrupt_meta),
        C("selections.json a list", "one sentence", "input", ["select", "list", "--db", db], setup=_selections("[1, 2]")),
        C("selections.json ids not a list", "one sentence", "input", ["select", "show", "a", "--db", db],
          setup=_selections('{"a": "s00001"}')),
        C("binary --vocab", "one sentence", "input", ["explain", "--db", db, "--vocab", f"{bad}/vocab.bin"]),
        C("--workers -3", "one sentence", "input", ["index", m, "--db", db, "--workers", "-3"], setup=_manifest()),
        C("--db an existing file", "one sentence", "input", ["index", m, "--db", f"{bad}/afile"], setup=_manifest(),
          check=_check_files_kept(f"{bad}/afile")),
        C("--db under a file", "one sentence", "input", ["index", m, "--db", f"{bad}/afile/db"], setup=_manifest()),
        C("--db that cannot be created", "one sentence", "input", ["index", m, "--db", "/proc/llm2loss/db"],
          setup=_manifest()),
        # ---- said, not silently accepted -------------------------------------------------------
        C("NaN prediction score", "said", "input", ["index", m, "--db", db, "--predictions", "{d}/p.csv"],
          setup=_predictions("nan")),
        C("infinite prediction score", "said", "input", ["index", m, "--db", db, "--predictions", "{d}/p.csv"],
          setup=_predictions("inf")),
        C("--model width differs from its classes", "said", "input",
          ["index", m, "--db", db, "--model", f"{models}:wrong_width"], setup=_manifest(drop_loss=True)),
        C("single-column predictions, string labels", "said", "input",
          ["index", m, "--db", db, "--predictions", "{d}/p.csv"], setup=_predictions("one column")),
        C("--where with a trailing statement", "said", "input",
          ["search", "a circle", "--db", db, "--where", "split = 'train'; DROP TABLE samples"]),
        C("empty query", "said", "input", ["search", "", "--db", db]),
        C("--candidates 0", "said", "input", ["search", "a circle", "--db", db, "--candidates", "0"]),
        C("constant losses", "said", "input", ["diagnose", "--db", db, "--members", "2", "--folds", "2"],
          expect="say", words=["undefined", "every loss is 0.25"], setup=_constant_losses),
        C("search matching nothing", "said", "input",
          ["search", "a circle", "--db", db, "--where", "label = 'hexagon'"], expect="say", words=["no results"]),
        C("corrupt checkpoint", "said", "input",
          ["index", m, "--db", "{d}/new", "--clip", str(TINY), "--clip-checkpoint", f"{bad}/junk.pt"],
          setup=_manifest(), words=["junk.pt", "not a readable"]),
        C("unsafe checkpoint", "said", "input",
          ["index", m, "--db", "{d}/new", "--clip", str(TINY), "--clip-checkpoint", f"{bad}/unsafe.pt"],
          setup=_manifest(), words=["unsafe.pt", "pickled Python objects"], check=_check_checkpoint_marker),
        C("incomplete CLIP config", "said", "input", ["index", m, "--db", "{d}/new", "--clip", f"{bad}/partial.json"],
          setup=_manifest(), words=["incomplete"]),
        C("--vocab a folder", "said", "input", ["explain", "--db", db, "--vocab", f"{bad}/vocab_dir"],
          words=["is a folder"]),
        C("export --out x.json", "said", "sec", ["export", "--db", db, "--query", "a circle", "--out", "{d}/x.json"],
          check=_check_out_regular),
        C("image over the pixel budget to similar", "said", "input", ["similar", f"{bad}/big.png", "--db", db],
          words=["81.0 MP", "40 MP budget"]),
        C("image over the pixel budget to index", "said", "input", ["index", m, "--db", db], expect="say",
          words=["image too large"], setup=_manifest(_one_big_image), env={"LLM2LOSS_MAX_PIXELS": "2000"},
          check=_check_rejected_big),
        # ---- security ------------------------------------------------------------------------
        C("crafted ensemble file, explain", "security", "sec", ["explain", "--db", db], expect="safe",
          setup=_crafted_ensemble, check=_check_no_code),
        C("crafted ensemble file, diagnose --score-new", "security", "sec", ["diagnose", "--db", db, "--score-new"],
          expect="safe", setup=_crafted_ensemble_and_new_rows, check=_check_no_code),
        # ---- data loss -----------------------------------------------------------------------
        C("export --out DB/meta.json", "data loss", "sec", ["export", "--db", db, "--query", "a circle",
          "--out", "{db}/meta.json"], check=_check_meta_json),
        C("export --out inside the table", "data loss", "sec", ["export", "--db", db, "--query", "a circle",
          "--out", "{db}/samples.lance/x.csv"]),
        C("export --out an existing file", "data loss", "sec", ["export", "--db", db, "--query", "a circle",
          "--out", "{d}/keep.csv"], setup=lambda w, d: (d / "keep.csv").write_text("mine\n"),
          check=lambda w, d, p: None if (d / "keep.csv").read_text() == "mine\n" else "an existing file was replaced"),
        C("ids nan, NA, null", "data loss", "sec", ["index", m, "--db", db], expect="safe", setup=_na_ids,
          check=_check_na_ids),
        C("two index runs at once", "data loss", "sec", ["index", m, "--db", db, "--clip", str(TINY)], expect="safe", runs=2,
          setup=_two_index_setup, check=_check_once),
        C("two diagnose runs at once", "data loss", "sec", ["diagnose", "--db", db, "--members", "2", "--folds", "2"],
          expect="safe", runs=2, check=_check_readers),
        # ---- issue 25: filters are a language; a swapped file is never handed out; names, vocab ----
        *[C(f"--where {what}", "issue 25", "sec25", ["search", "a circle", "--db", db, "--where", where], words=[words])
          for what, where, words in HOSTILE_FILTERS],
        C("select add --query --where repeat(...)", "issue 25", "sec25",
          ["select", "add", "x", "--db", db, "--query", "a circle", "--where", "repeat(id, 100000000) = 'x'"],
          words=["calls the function repeat"]),
        C("export --query --where regexp_match(...)", "issue 25", "sec25",
          ["export", "--db", db, "--query", "a circle", "--out", "{d}/o.csv", "--where", "regexp_match(id, 'a') IS NULL"],
          words=["calls the function regexp_match"]),
        C("similar --where a cast", "issue 25", "sec25",
          ["similar", "s00001", "--db", db, "--where", "CAST(loss AS VARCHAR) = '1'"], words=["calls the function CAST"]),
        C("select add ' lead'", "issue 25", "sec25", ["select", "add", " lead", "--db", db, "--query", "a circle"],
          words=["is not valid"]),
        C("select add 'lead\\n'", "issue 25", "sec25", ["select", "add", "lead\n", "--db", db, "--query", "a circle"],
          words=["is not valid"]),
        C("explain --vocab 200,000 lines", "issue 25", "sec25", ["explain", "--db", db, "--vocab", "{d}/big_vocab.txt"],
          setup=lambda w, d: (d / "big_vocab.txt").write_text("\n".join(f"a thing number {i}" for i in range(200_000))),
          words=["more than the 20,000"]),
        *[C(f"export folder{' --copy' if copy else ''}: {kind}", "issue 25", "sec25",
            ["export", "--db", db, "--ids", "{d}/ids.txt", "--format", "folder", "--out", "{d}/out", *(["--copy"] if copy else [])],
            setup=_swapped(kind), words=["no longer the file that was indexed"], check=_check_nothing_exported)
          for kind in ("symlink re-pointed to secret.txt", "text file renamed .png", "same size and time, other bytes")
          for copy in (False, True)],
    ]


#: (what, filter, words of the refusal): payloads of the class of `repeat(id, 100000000)` (issue 25).
HOSTILE_FILTERS = [
    ("repeat(id, 100000000)", "repeat(id, 100000000) = 'x'", "calls the function repeat"),
    ("regexp_like, catastrophic pattern", "regexp_like(id, '(a|a)*b')", "calls the function regexp_like"),
    ("lpad to 1e9", "lpad(id, 1000000000, 'x') = 'x'", "calls the function lpad"),
    ("a subquery", "id IN (SELECT id FROM samples)", "expected a value"),
    ("a second statement", "split = 'test'; DELETE FROM samples", "a `;`"),
    ("a comment", "loss > 1 -- and the rest", "is refused"),
    ("nesting 500 deep", "(" * 500 + "loss > 1" + ")" * 500, "nests more than"),
    ("NOT 500 times", "NOT " * 500 + "loss > 1", "nests more than"),
    ("an IN list of 1,500", "loss IN (" + ",".join(str(i) for i in range(1500)) + ")", "more than 1000 values"),
    ("a LIKE of 300 wildcards", "id LIKE '" + "%_" * 150 + "'", "LIKE pattern"),
    ("a 100 kB string", "id = '" + "x" * 100_000 + "'", "characters long"),
    ("a number of 400 digits", "loss > 1" + "0" * 400, "digits long"),
    ("CASE", "CASE WHEN loss > 1 THEN true ELSE false END", "CASE is SQL outside"),
    ("the vector column", "embedding IS NOT NULL", "holds vectors"),
]


def swap_file(img: Path, kind: str, secret: Path, scratch: Path) -> None:
    """Replace an indexed image after indexing, as an attacker or a failing disk would: re-point its
    symlink at ``secret`` (``symlink...``), put a text file in its place (``text...``), or keep its
    size and modification time with other bytes (anything else)."""
    if kind.startswith("symlink"):
        img.unlink()
        os.symlink(secret, img)
    elif kind.startswith("text"):
        (scratch / "notes.png").write_text("a text file, not a PNG\n")
        os.replace(scratch / "notes.png", img)
    else:
        st = img.stat()
        img.write_bytes(b"x" * st.st_size)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))


def _swapped(kind: str):
    """setup: the case's database gets a row whose image (a file of the case's own, indexed as
    `index` records it) is swapped afterwards: a symlink re-pointed at secret.txt, a text file
    renamed over it, or other bytes of the same size and time."""
    def setup(w, d):
        from indexer import schema as S
        from indexer.identity import identity_columns
        from indexer.store import Database

        db = Database(d / "db")
        src = Path(db.read([S.IMAGE], where="id = 's00005'").column(0)[0].as_py())
        img = d / "mine.png"
        if kind.startswith("symlink"):
            os.symlink(src, img)
        else:
            shutil.copy2(src, img)
        ident = {k: v[0].as_py() for k, v in identity_columns([str(img)]).items()}
        db.table.update(where="id = 's00005'", values={S.IMAGE: str(img), **ident})
        swap_file(img, kind, w["world"] / "secret.txt", d)
        (d / "ids.txt").write_text("s00004\ns00005\n")
    return setup


def _check_nothing_exported(w, d, procs):
    out = d / "out"
    if out.exists() and any(p.is_file() for p in out.rglob("*")):
        return "an export was left behind"
    return None


def _check_folder_export(n: int):
    """check: the folder export exited 0 and wrote ``n`` distinct image files (names under 255
    bytes) beside its own readable manifest.csv listing them."""
    def check(w, d, procs):
        import pandas as pd

        if procs[0].returncode != 0:
            return f"the export exited {procs[0].returncode}"
        out = d / "out"
        files = [p for p in out.rglob("*") if p.is_file() and p != out / "manifest.csv"]
        if len(files) != n or len({p.resolve() for p in files}) != n:
            return f"{len(files)} files exported for {n} ids"
        if any(len(part.encode()) >= 255 for p in files for part in p.relative_to(out).parts):
            return "a file name of 255 bytes or more"
        if len(pd.read_csv(out / "manifest.csv")) != n:
            return "the export's manifest.csv does not list every file"
        return None
    return check


def _relabel(d: Path, label: str) -> None:
    from indexer import schema as S
    from indexer.store import Database

    Database(d / "db").table.update(where="id = 's00001'", values={S.LABEL: label})


def _same_sanitised(w, d):
    """Two new rows whose ids differ only in characters a file name cannot hold."""
    import pyarrow as pa

    from indexer import schema as S
    from indexer.store import Database

    db = Database(d / "db")
    t = db.read(where="id IN ('s00001', 's00002')")
    t = t.set_column(t.column_names.index(S.ID), S.ID, pa.array(["a/b", "a:b"], pa.string()))
    db.table.add(t)
    (d / "ids.txt").write_text("a/b\na:b\n")


def _check_meta_json(w, d, procs):
    try:
        json.loads((d / "db" / "meta.json").read_text())
    except (OSError, ValueError):
        return "meta.json was destroyed"
    return None



# ==== issue 25, integrity: damaged storage, a full disk, a read-only database ============================
# (the integrity branch's cases, kept in this block; the security branch adds its own block elsewhere)
#
# Each damage case breaks the case's copy of the database the way a failing disk would (a Lance data
# file truncated, deleted or zero-filled, the latest version manifest truncated, faiss/index.faiss
# truncated, faiss/ids.npy holding the same ids in another order, one byte of the ensemble flipped)
# and runs a command over it: a query must answer right (rebuilt) or say one sentence naming
# `llm2loss check`; `check` must find it, `check --repair` mend what it can. The disk-full and
# read-only cases mount a small tmpfs (root / CAP_SYS_ADMIN; left out, and said, where mounting is
# refused), and their check reruns the command with space: it must complete.
_MOUNTS: list[Path] = []


def _can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else why not."""
    probe = Path(tempfile.mkdtemp(prefix="llm2loss-mount-"))
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True)
        if r.returncode != 0:
            return r.stderr.strip() or f"mount exited {r.returncode}"
        subprocess.run(["umount", str(probe)], capture_output=True)
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _mount(d: Path, size: str, copy_db: bool = True) -> Path:
    disk = d / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True, capture_output=True)
    _MOUNTS.append(disk)
    if copy_db:
        shutil.copytree(d / "db", disk / "db")
    return disk


def _umount(d: Path) -> None:
    subprocess.run(["umount", "-l", str(d / "disk")], capture_output=True)


def umount_all() -> None:
    for disk in _MOUNTS:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill_disk(disk: Path, leave: int = 0) -> Path:
    filler = disk / "filler.bin"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError as e:  # full: what we wanted (the open itself fails when the copy already filled it)
        if e.errno != errno.ENOSPC:
            raise
        filler.touch(exist_ok=True)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _cli_run(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search_ui.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _lance_files(d: Path) -> list[Path]:
    return sorted((d / "db" / "samples.lance" / "data").glob("*.lance"), key=lambda p: p.stat().st_mtime)


def _damage(kind: str):
    """setup: break the case's database copy (see the block's comment)."""
    def setup(w, d):
        import numpy as np

        db = d / "db"
        if kind in ("faiss truncated", "ids reordered"):
            from indexer.ann import build_index

            build_index(db)  # the world's database is diagnosed but never searched: no index yet
        if kind == "data truncated":
            f = _lance_files(d)[0]
            os.truncate(f, f.stat().st_size // 3)
        elif kind == "data deleted":
            _lance_files(d)[0].unlink()
        elif kind == "data zero-filled":
            f = _lance_files(d)[0]
            f.write_bytes(b"\0" * f.stat().st_size)
        elif kind == "manifest truncated":
            from indexer.check import manifest_versions

            (_v, f), *_ = manifest_versions(db / "samples.lance")
            os.truncate(f, f.stat().st_size // 2)
        elif kind == "faiss truncated":
            f = db / "faiss" / "index.faiss"
            os.truncate(f, f.stat().st_size // 2)
        elif kind == "ids reordered":
            ids = np.load(db / "faiss" / "ids.npy")
            np.save(db / "faiss" / "ids.npy", np.roll(ids, 11))
        elif kind == "ensemble byte flipped":
            f = db / "diagnosis" / "image_mean.npy"
            raw = bytearray(f.read_bytes())
            raw[-5] ^= 0xFF
            f.write_bytes(bytes(raw))
        elif kind == "cache truncated":
            from diagnosis.text import Scorer

            Scorer(db).default_text_mean  # noqa: B018 -- writes the cache
            (cache,) = (db / "diagnosis").glob("text_mean_*.npy")
            os.truncate(cache, cache.stat().st_size - 8)
    return setup


def _check_same_as_pristine(query: str):
    """check: the command's printed ids equal the same command's on the undamaged world database
    (a damaged index answering other neighbours is a silent wrong result)."""
    def check(w, d, procs):
        ref = _cli_run("similar", query, "--db", w["db"], "-k", "10", "--json")
        import json as _json

        want = [r["id"] for r in _json.loads(ref.stdout)]
        try:
            got = [r["id"] for r in _json.loads(procs[0].stdout)]
        except ValueError:
            return f"silent wrong result: no JSON answer ({procs[0].stderr.strip()[-200:]})"
        return None if got == want else f"silent wrong result: other neighbours {got[:3]} vs {want[:3]}"
    return check


def _check_check(rc: int, words: list[str], then: list[list[str]] | None = None):
    """check: `check` exited ``rc`` and said ``words``; then each command of ``then`` exits 0."""
    def check(w, d, procs):
        if procs[0].returncode != rc or any(x not in procs[0].stdout for x in words):
            return f"check exited {procs[0].returncode}, said {procs[0].stdout.strip()[-300:]!r}"
        for argv in then or []:
            r = _cli_run(*[_fill(a, w, d) for a in argv])
            if r.returncode != 0:
                return f"after the repair `{argv[0]}` exited {r.returncode}: {r.stderr.strip()[-200:]}"
        return None
    return check


def _check_rerun(argv: list[str], make_room, expect_rows: int | None = None, unchanged: bool = False):
    """check: nothing half-written (no *.tmp, no 0-row database), then room is made and the
    command, rerun, completes. Unmounts the case's tmpfs."""
    def check(w, d, procs):
        disk = d / "disk"
        try:
            tmps = [str(p.relative_to(disk)) for p in disk.rglob("*.tmp")]
            if tmps:
                return f"temporary files left behind: {tmps[:3]}"
            if unchanged and procs[0].returncode == 2 and (disk / "db" / "meta.json").exists():
                from diagnosis.run import load_ensemble

                load_ensemble(disk / "db")  # the old ensemble is still there and verifies
            make_room(w, d)
            r = _cli_run(*[_fill(a, w, d) for a in argv])
            if r.returncode != 0:
                return f"the rerun with room exited {r.returncode}: {r.stderr.strip()[-200:]}"
            if expect_rows is not None:
                from indexer.store import Database

                n = Database(disk / "db").count_rows()
                if n != expect_rows:
                    return f"the rerun stored {n} rows, not {expect_rows}"
            return None
        except Exception as e:  # a check that cannot read what the case left: said
            return f"the check could not run ({type(e).__name__}: {str(e)[:150]})"
        finally:
            _umount(d)
    return check


def _check_new_db_absent(argv, rows):
    inner = _check_rerun(argv, lambda w, d: subprocess.run(["mount", "-o", "remount,size=64m", str(d / "disk")],
                                                           check=True), expect_rows=rows)

    def check(w, d, procs):
        if (d / "disk" / "db").exists():
            _umount(d)
            return "a database was left behind (destroyed nothing, but half-written)"
        return inner(w, d, procs)
    return check


def _remove_filler(w, d):
    (d / "disk" / "filler.bin").unlink()


def _setup_full_new(w, d):
    _manifest()(w, d)
    _mount(d, "48k", copy_db=False)


def _setup_full_faiss(w, d):
    disk = _mount(d, "64m")
    (disk / "db" / "faiss" / "info.json").unlink()  # the index must be written again
    _fill_disk(disk)


def _setup_full_ensemble(w, d):
    disk = _mount(d, "64m")
    _fill_disk(disk, leave=256 * 1024)  # room for locks and JSON, not for the ~1 MB ensemble


def _setup_read_only(w, d):
    _mount(d, "64m")
    (d / "ids.txt").write_text("s00001\ns00002\n")
    subprocess.run(["mount", "-o", "remount,ro", str(d / "disk")], check=True, capture_output=True)


def _check_read_only(w, d, procs):
    _umount(d)
    return None


def _setup_binary_ids(w, d):
    (d / "ids.bin").write_bytes(bytes(range(256)) * 4)


def integrity_cases() -> list[Case]:
    """The issue-25 integrity cases (owner ``int``); those needing a tmpfs only where one mounts."""
    db = "{db}"
    C = Case
    out = [
        # derived files: rebuilt, never served
        C("ids.npy reordered, similar", "integrity", "int", ["similar", "s00001", "--db", db, "-k", "10", "--json"],
          expect="safe", setup=_damage("ids reordered"), check=_check_same_as_pristine("s00001")),
        C("index.faiss truncated, similar", "integrity", "int", ["similar", "s00001", "--db", db, "-k", "10", "--json"],
          expect="safe", setup=_damage("faiss truncated"), check=_check_same_as_pristine("s00001")),
        C("ensemble byte flipped, explain", "integrity", "int", ["explain", "--db", db], setup=_damage("ensemble byte flipped"),
          words=["damaged", "llm2loss check"]),
        C("text-mean cache truncated, explain", "integrity", "int", ["explain", "--db", db, "--top", "2"], expect="safe",
          setup=_damage("cache truncated")),
        C("ids.npy reordered, check", "integrity", "int", ["check", "--db", db], expect="safe",
          setup=_damage("ids reordered"), check=_check_check(1, ["DAMAGED  faiss", "--repair"])),
        # damaged table: one sentence naming check; check finds it; --repair goes back
        C("Lance data file truncated, search", "integrity", "int", ["search", "a circle", "--db", db],
          setup=_damage("data truncated"), words=["llm2loss check --db"]),
        C("Lance data file deleted, similar", "integrity", "int", ["similar", "s00001", "--db", db],
          setup=_damage("data deleted"), words=["llm2loss check --db"]),
        C("Lance data file zero-filled, explain", "integrity", "int", ["explain", "--db", db],
          setup=_damage("data zero-filled"), words=["llm2loss check --db"]),
        C("Lance data file zero-filled, export", "integrity", "int",
          ["export", "--db", db, "--query", "a circle", "--out", "{d}/x.csv"], setup=_damage("data zero-filled"),
          words=["llm2loss check --db"]),
        C("latest manifest truncated, search", "integrity", "int", ["search", "a circle", "--db", db],
          setup=_damage("manifest truncated"), words=["llm2loss check --db"]),
        C("index.faiss truncated, check", "integrity", "int", ["check", "--db", db], expect="safe",
          setup=_damage("faiss truncated"), check=_check_check(1, ["DAMAGED  faiss"])),
        C("Lance data file truncated, check", "integrity", "int", ["check", "--db", db], expect="safe",
          setup=_damage("data truncated"), check=_check_check(1, ["DAMAGED  table", "backup"])),
        C("latest manifest truncated, check --repair", "integrity", "int", ["check", "--db", db, "--repair"],
          expect="safe", setup=_damage("manifest truncated"),
          check=_check_check(0, ["lost:", "all is well"], then=[["search", "a circle", "--db", db]])),
        C("select add --ids a binary file", "integrity", "int", ["select", "--db", db, "add", "hard", "--ids", "{d}/ids.bin"],
          setup=_setup_binary_ids, words=["not UTF-8"]),
    ]
    why = _can_mount()
    if why is not None:
        print(f"integrity: the disk-full and read-only cases are left out: a tmpfs cannot be mounted here ({why})",
              file=sys.stderr)
        return out
    new_db = ["index", "{d}/m.csv", "--db", "{d}/disk/db", "--clip", str(TINY), "--pretrained", "none"]
    world_index = ["index", "{world}/manifest.csv", "--db", "{d}/disk/db"]
    diag = ["diagnose", "--db", "{d}/disk/db", "--members", "2", "--folds", "2"]
    return out + [
        C("disk full: index into a new database", "integrity", "int", new_db, setup=_setup_full_new,
          words=["no space"], check=_check_new_db_absent(new_db, 60)),
        C("disk full: index at the FAISS write", "integrity", "int", world_index, setup=_setup_full_faiss,
          words=["no space", "FAISS"], check=_check_rerun(world_index, _remove_filler)),
        C("disk full: diagnose at the ensemble write", "integrity", "int", diag, setup=_setup_full_ensemble,
          words=["no space"], check=_check_rerun(diag, _remove_filler, unchanged=True)),
        C("read-only database: select add", "integrity", "int",
          ["select", "--db", "{d}/disk/db", "add", "hard", "--ids", "{d}/ids.txt"], setup=_setup_read_only,
          words=["read-only"], check=_check_read_only),
    ]


def integrity_http_probes(w: dict, base: Path) -> dict:
    """``serve`` over a read-only copy (selection add / delete must be a 503 sentence, not 500) and
    over a copy with a zero-filled data file (search: a 503 sentence naming check)."""
    out: dict = {}
    if _can_mount() is None:
        d = base / "http-ro"
        d.mkdir()
        shutil.copytree(w["db"], d / "db")
        disk = _mount(d, "64m")
        from search_ui.selections import Selections

        Selections(disk / "db").add("kept", ["s00003"])
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        try:
            out["read_only"] = _probe_serve(disk / "db", [("POST", "/api/v1/selections/hard/add", {"ids": ["s00001"]}),
                                                          ("DELETE", "/api/v1/selections/kept", None)])
        finally:
            _umount(d)
    d = base / "http-damaged"
    d.mkdir()
    shutil.copytree(w["db"], d / "db")
    # damaged before it starts: serve exits with the sentence; damaged while it serves: each answer
    # is right (from what it holds in memory) or a 503 sentence, never a 500
    _damage("data zero-filled")(w, d)
    started = _probe_serve(d / "db", [])
    lines = [ln for ln in started.get("error", "").replace("serve exited: ", "").splitlines()
             if ln.strip() and not LOG_LINE.match(ln)]
    out["damaged_at_start"] = {"exits_with_one_sentence": len(lines) == 1 and "llm2loss check" in lines[0],
                               "message": (lines or [""])[-1][:300]}
    d = base / "http-damaged-later"
    d.mkdir()
    shutil.copytree(w["db"], d / "db")
    out["damaged_while_serving"] = _probe_serve(
        d / "db", [("POST", "/api/v1/search", {"text": "a circle", "k": 3}), ("GET", "/api/v1/samples/s00001", None),
                   ("POST", "/api/v1/similar", {"id": "s00002", "k": 3}), ("POST", "/api/v1/export",
                                                                            {"ids": ["s00001"], "format": "csv"})],
        before=lambda: _damage("data zero-filled")(w, d))
    answers = [a for v in out.values() for a in v.get("answers", [])]
    out["answered_500"] = sum(1 for a in answers if a["status"] >= 500 and a["status"] != 503)
    out["sentences_4xx_5xx_not_500"] = sum(1 for a in answers if a["status"] in (400, 503) and a["one_sentence"])
    out["probes"] = len(answers)
    return out


def _probe_serve(db: Path, requests_: list, before=None) -> dict:
    """Start ``serve`` over ``db``, call ``before()`` once it answers, then send ``requests_``."""
    import httpx

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen([sys.executable, "-m", "search_ui.cli", "serve", "--db", str(db), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        if (error := wait_for_serve(serve, url + "/api/v1/health", (200, 503))) is not None:
            return {"error": error}
        if before is not None:
            before()
        answers = []
        for method, path, body in requests_:
            r = httpx.request(method, url + path, json=body, timeout=60)
            try:
                msg = r.json().get("error", "")
            except ValueError:
                msg = r.text[:200]
            answers.append({"route": f"{method} {path}", "status": r.status_code, "message": msg[:300],
                            "one_sentence": r.status_code == 200 or (bool(msg) and "\n" not in msg
                                                                      and "Traceback" not in msg)})
        return {"answers": answers}
    finally:
        _stop(serve)


def integrity_summary(results: list[dict]) -> dict:
    """The issue-25 integrity recount: this block's cases only."""
    mine = [r for r in results if r["owner"] == "int"]
    counts = Counter(r["outcome"] for r in mine)
    return {
        "cases": len(mine),
        "one_sentence_refusals": counts["refused"],
        "handled_safely": counts["safe"],
        "tracebacks": counts["traceback"],
        "process_crashes": sum(1 for r in mine if any(rc not in (0, 1, 2, 130) for rc in r["rc"])),
        "silent_wrong_results": sum(1 for r in mine if "wrong" in (r["problem"] or "")),
        "left_half_written": sum(1 for r in mine if any(k in (r["problem"] or "") for k in ("left behind", "temporary"))),
        "rerun_failed": sum(1 for r in mine if "rerun" in (r["problem"] or "")),
        "rows_lost": sum(1 for r in mine if r["data_lost"]),
        "not_ok": [r["name"] for r in mine if r["outcome"] not in ("refused", "safe") or r["data_lost"]],
    }
# ==== end of issue 25, integrity ========================================================================


# ---- running -------------------------------------------------------------------------------------
def db_state(db: Path) -> dict | None:
    if not (db / "meta.json").exists():
        return None
    from indexer.store import Database

    try:
        ids = Database(db).read(["id"]).column("id").to_pylist()
    except Exception as e:  # a case may have broken the table: that is what we count
        return {"error": type(e).__name__}
    meta = (db / "meta.json").read_bytes()
    return {"rows": len(ids), "ids": sorted(ids), "meta": meta}


def _fill(arg: str, w: dict, d: Path) -> str:
    return arg.format(db=d / "db", bad=w["bad"], world=w["world"], d=d)


def run_case(i: int, case: Case, w: dict, work: Path) -> dict:
    d = work / f"{i:02d}"
    d.mkdir()
    shutil.copytree(w["db"], d / "db")
    if case.setup:
        try:
            case.setup(w, d)
        except (OSError, subprocess.CalledProcessError) as e:  # the harness's own failure, not the product's
            return {"name": case.name, "part": case.part, "owner": case.owner, "outcome": "setup failed",
                    "rc": [], "data_lost": False, "stderr_lines": 0, "missing_words": None,
                    "message": "", "problem": f"{type(e).__name__}: {str(e)[:200]}", "seconds": 0.0}
    before = db_state(d / "db")
    args = [_fill(a, w, d) for a in case.args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **case.env}
    cmd = [sys.executable, "-m", "search_ui.cli", *args]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=d)
             for _ in range(case.runs)]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    seconds = time.perf_counter() - t0
    after = db_state(d / "db")
    try:
        problem = case.check(w, d, done) if case.check else None
    except Exception as e:  # the check itself could not read what the case left: say so
        problem = f"the check could not run ({type(e).__name__}: {str(e)[:150]})"
    return classify(case, done, before, after, problem) | {"name": case.name, "part": case.part,
                                                             "owner": case.owner, "seconds": round(seconds, 1)}


def _exit_codes(case: Case) -> tuple[int, ...]:
    """Exit statuses that are answers, not crashes: 0, 2 (refused), 130 (interrupted), and 1 for
    `check` (something is damaged, as git fsck)."""
    return (0, 1, 2, 130) if case.args[:1] == ["check"] else (0, 2, 130)


def classify(case: Case, procs: list, before, after, problem: str | None) -> dict:
    p = procs[0]
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip() and not LOG_LINE.match(ln)
             and not ln.startswith(("indexing", "reading", "scoring")) and "%|" not in ln]  # tqdm bars
    tb = any("Traceback" in q.stderr or q.returncode not in _exit_codes(case) for q in procs)
    said = "\n".join([p.stdout, p.stderr])
    missing = [w for w in case.words if w not in said]
    lost = None
    if case.expect == "refuse" and before is not None and after != before:
        lost = "the database changed" if after is not None else "the database is gone"
    if problem and any(k in problem for k in ("destroyed", "replaced", "stored", "died", "left behind")):
        lost = lost or problem
    if tb and case.runs == 1:
        outcome = "traceback"
    elif case.expect == "refuse":
        if p.returncode == 2 and len(lines) == 1 and not missing:
            outcome = "refused"
        elif p.returncode == 2 and len(lines) == 1:
            outcome = "refused, words missing"
        elif p.returncode == 2:
            outcome = "refused, several lines"
        else:
            outcome = "accepted"
    elif case.expect == "say":
        outcome = "said" if p.returncode == 0 and not missing else ("silent" if p.returncode == 0 else "failed")
    else:  # safe: no code ran, nothing lost, no traceback
        outcome = "traceback" if tb else ("safe" if problem is None else "unsafe")
    if problem and "code" in problem:
        outcome = "code ran"
    last = lines[-1] if lines else ""
    return {"outcome": outcome, "rc": [q.returncode for q in procs], "stderr_lines": len(lines),
            "message": last[:300], "missing_words": missing, "data_lost": lost, "problem": problem}


# ---- the HTTP part -------------------------------------------------------------------------------
def wait_for_serve(serve: subprocess.Popen, url: str, statuses: tuple[int, ...]) -> str | None:
    """Wait (up to 2 minutes) until ``url`` answers one of ``statuses``; why not, if it does not."""
    import httpx

    for _ in range(240):
        try:
            if httpx.get(url, timeout=2).status_code in statuses:
                return None
        except httpx.HTTPError:
            pass
        if serve.poll() is not None:
            return "serve exited: " + serve.stdout.read()[-500:]
        time.sleep(0.5)
    return f"serve did not answer {url} within 2 minutes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_probes(w: dict) -> dict:
    """Start ``serve`` over the world and ask for what must not be served; upload a bad image."""
    import httpx

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen([sys.executable, "-m", "search_ui.cli", "serve", "--db", str(w["db"]), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        if (error := wait_for_serve(serve, url, (200,))) is not None:
            return {"error": error}
        world, db = w["world"], w["db"]
        image = world / "images" / "00000_red_circle.png"
        must_not = [world / "manifest.csv", world / "secret.txt", world / "private" / "id_rsa",
                    f"{db}/../manifest.csv", db / "meta.json", f"{world}/images/../secret.txt",
                    world / "images" / "zz_link.png", "/etc/passwd", "/etc/hostname",
                    db / "diagnosis" / "ensemble.joblib", db / "faiss" / "info.json"]
        from urllib.parse import quote

        probes = {}
        routes = [("{}/gradio_api/file={}", str), ("{}/file={}", str),  # today's route and the old one
                  ("{}/gradio_api/file={}", lambda p: quote(str(p)).replace(".", "%2e"))]  # percent-encoded
        for path in [image, *must_not]:
            for route, enc in routes:
                r = httpx.get(route.format(url, enc(path)), timeout=10)
                probes[route.format("", enc(path))] = r.status_code
        served_bad = [k for k, code in probes.items() if code == 200 and str(image) not in k
                      and quote(str(image)).replace(".", "%2e") not in k]
        upload = _upload_probe(url, w["bad"] / "notes.png")
        return {"url": url, "indexed_image_served": probes[f"/gradio_api/file={image}"] == 200, "probes": probes,
                "files_served_not_indexed_images": len(served_bad), "served": served_bad, "upload": upload}
    finally:
        _stop(serve)


def http_issue25(w: dict) -> dict:
    """Issue 25 over HTTP: hostile filters, swapped files, cross-site requests, strict types, odd
    names and ids, against a `serve` of a copy of the world whose rows include swapped files, odd
    ids and an image whose file name holds a newline; then SIGTERM and its temporary folder."""
    import httpx
    import pyarrow as pa

    from indexer import schema as S
    from indexer.identity import identity_columns
    from indexer.store import Database
    from search_ui.selections import Selections

    home = w["world"] / "images" / "http25"  # under the dataset's image folder, as indexed images are
    home.mkdir()
    shutil.copytree(w["db"], home / "db")
    db = Database(home / "db")
    odd = db.read(where="id IN ('s00008', 's00009', 's00010')")
    newline = home / "new\nline.png"
    shutil.copy2(odd.column(S.IMAGE)[2].as_py(), newline)
    images = odd.column(S.IMAGE).to_pylist()[:2] + [str(newline)]
    odd = odd.set_column(odd.column_names.index(S.ID), S.ID, pa.array(["x/image", "line\nbreak", "newline-file"]))
    odd = odd.set_column(odd.column_names.index(S.IMAGE), S.IMAGE, pa.array(images))
    for name, values in identity_columns(images).items():
        odd = odd.set_column(odd.column_names.index(name), name, values)
    db.append(odd)
    db.update_meta(data_version=db.version)
    swaps = {}
    for sid, kind in (("s00005", "symlink"), ("s00006", "text"), ("s00007", "bytes")):
        src = Path(db.read([S.IMAGE], where=f"id = '{sid}'").column(0)[0].as_py())
        img = home / f"{sid}.png"
        os.symlink(src, img) if kind == "symlink" else shutil.copy2(src, img)
        ident = {k: v[0].as_py() for k, v in identity_columns([str(img)]).items()}
        db.table.update(where=f"id = '{sid}'", values={S.IMAGE: str(img), **ident})
        swaps[sid] = (kind, img)
    Selections(db).add("keep", ["s00001", "s00002"])
    before = sorted(db.read([S.ID]).column(0).to_pylist())
    tmp = home / "tmp"
    tmp.mkdir()
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    serve = subprocess.Popen([sys.executable, "-m", "search_ui.cli", "serve", "--db", str(db.path), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api/v1"
    wrong, served_bad, crashed = [], [], []

    def expect(what: str, got: int, want) -> None:
        if got not in (want if isinstance(want, tuple) else (want,)):
            wrong.append(f"{what}: HTTP {got}, expected {want}")
        if serve.poll() is not None:
            crashed.append(what)

    try:
        for _ in range(240):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if serve.poll() is not None:
                return {"error": "serve exited: " + serve.stdout.read()[-500:]}
            time.sleep(0.5)
        for kind, img in swaps.values():  # the swaps, after indexing and while serving
            swap_file(img, kind, w["world"] / "secret.txt", home)
        c = httpx.Client(timeout=120)
        for what, where, _ in HOSTILE_FILTERS:
            for route, body in (("search", {"text": "a circle"}), ("similar", {"id": "s00001"}),
                                ("export", {"query": "a circle"})):
                r = c.post(f"{api}/{route}", json={**body, "where": where})
                expect(f"{route} where {what}", r.status_code, 400)
        for sid, (kind, img) in swaps.items():
            r = c.get(f"{api}/samples/{sid}/image")
            expect(f"image route, {kind}", r.status_code, 403)
            if r.status_code == 200:
                served_bad.append(f"/api/v1/samples/{sid}/image ({kind})")
            r = c.get(f"{url}/gradio_api/file={img}")
            expect(f"file route, {kind}", r.status_code, 403)
            if r.status_code == 200:
                served_bad.append(f"/gradio_api/file={img} ({kind})")
            r = c.post(f"{api}/export", json={"ids": ["s00004", sid], "format": "folder"})
            expect(f"export zip, {kind}", r.status_code, 400)
            if r.status_code == 200:
                served_bad.append(f"export zip with {sid} ({kind})")
        evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        r = c.options(f"{api}/selections/keep", headers={**evil, "Access-Control-Request-Method": "DELETE"})
        expect("preflight from another origin", 403 if "access-control-allow-origin" not in r.headers else 200, 403)
        expect("cross-site DELETE", c.delete(f"{api}/selections/keep", headers=evil).status_code, 403)
        expect("cross-site POST add", c.post(f"{api}/selections/keep/add", json={"ids": ["s00003"]},
                                             headers=evil).status_code, 403)
        expect("cross-site Gradio event", c.post(f"{url}/gradio_api/call/add_to_selection",
                                                 json={"data": ["keep", ["s00003"]]}, headers=evil).status_code, 403)
        expect("another Host (DNS rebinding)", c.get(f"{api}/health", headers={"Host": "rebound.example"}).status_code, 403)
        if Selections(db).all().get("keep") != ["s00001", "s00002"]:
            wrong.append("a cross-site request changed the selection")
        for body in ({"text": "x", "k": "10"}, {"text": "x", "k": True}, {"text": "x", "weight": "0.5"}):
            expect(f"search {body}", c.post(f"{api}/search", json=body).status_code, 422)
        for name in ("%20lead", "lead%20", "lead%0A"):
            expect(f"selection name {name}", c.post(f"{api}/selections/{name}/add", json={"ids": ["s00001"]}).status_code,
                   (400, 404))
        for sid in ("x/image", "line\nbreak", "newline-file"):
            from urllib.parse import quote

            r = c.get(f"{api}/samples/{quote(sid, safe='')}")
            expect(f"id {sid!r}", r.status_code if r.status_code != 200 or r.json().get("id") == sid else 500, 200)
            expect(f"image of id {sid!r}", c.get(f"{api}/samples/{quote(sid, safe='')}/image").status_code, 200)
        try:
            import gradio_client

            gal, _ = gradio_client.Client(url, verbose=False).predict(None, "s00001", 80, 0.0, api_name="/similar_image")
            if newline.read_bytes() not in [Path(g["image"]).read_bytes() for g in gal]:
                wrong.append("the image whose file name holds a newline is not in the page's gallery")
        except ImportError:
            pass
        except Exception as e:  # the page's answer
            wrong.append(f"the page's gallery failed ({type(e).__name__}: {str(e)[:120]})")
        alive = serve.poll() is None
    finally:
        _stop(serve, timeout=30)
    log = serve.stdout.read()
    after = sorted(Database(home / "db").read([S.ID]).column(0).to_pylist())
    left = [p.name for p in tmp.glob("llm2loss-ui-*")]
    return {"process_crashes": 0 if alive and not crashed else 1, "crashed_at": crashed[:3],
            "tracebacks": log.count("Traceback"), "silent_wrong_results": len(wrong), "wrong": wrong,
            "files_served_not_indexed_images": len(served_bad), "served": served_bad,
            "rows_lost": len(set(before) - set(after)), "temp_folders_left_after_sigterm": left}


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a `serve`, and kill it if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def _upload_probe(url: str, path: Path) -> dict:
    try:
        import gradio_client
    except ImportError:
        return {"skipped": "gradio_client not installed"}
    client = gradio_client.Client(url, verbose=False)
    try:
        client.predict(gradio_client.handle_file(str(path)), "", 5, 0.5, api_name="/similar_image")
    except Exception as e:  # the app's answer to a bad upload is an error: that is what we read
        msg = str(e)
        return {"message": msg[:300], "one_sentence": "\n" not in msg.strip() and "preprocess" not in msg.lower()}
    return {"message": "accepted", "one_sentence": False}


# ---- main --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--only", default=None, help="comma-separated words: run the cases whose names contain one")
    ap.add_argument("--http", action="store_true", help="also start `serve` and probe its file route and upload")
    ap.add_argument("--json", default=None, help="write the full results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="llm2loss-hostile-"))
    t0 = time.perf_counter()
    try:
        w = build_world(base)
        todo = cases() + integrity_cases()
        if args.only:
            words = [x.strip() for x in args.only.split(",")]
            todo = [c for c in todo if any(x in c.name for x in words)]
        work = base / "cases"
        work.mkdir()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(lambda ic: run_case(ic[0], ic[1], w, work), enumerate(todo)))
        http = http_probes(w) if args.http else None
        http_int = integrity_http_probes(w, base) if args.http else None
        if http is not None:
            http["issue25"] = http_issue25(w)
    finally:
        umount_all()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    for r in results:
        flag = "" if r["outcome"] in ("refused", "said", "safe") else "  <--"
        print(f"{r['outcome']:24s} {r['part']:12s} {r['owner']:8s} {r['name']}{flag}")
        if flag or r["data_lost"]:
            print(f"{'':24s}   rc {r['rc']}, {r['stderr_lines']} stderr lines: {r['message'][:200]}"
                  + (f"; problem: {r['problem']}" if r["problem"] else "")
                  + (f"; missing words {r['missing_words']}" if r["missing_words"] else ""))
    counts = Counter(r["outcome"] for r in results)
    summary = {
        "cases_tried": len(results),
        "one_sentence_refusals": counts["refused"],
        "said": counts["said"],
        "safe": counts["safe"],
        "tracebacks": counts["traceback"],
        "silently_accepted": counts["accepted"] + counts["silent"],
        "refused_several_lines": counts["refused, several lines"],
        "refused_words_missing": counts["refused, words missing"],
        "code_ran": counts["code ran"],
        "unsafe": counts["unsafe"],
        "data_lost": sum(1 for r in results if r["data_lost"]),
        "harness_setup_failed": counts["setup failed"],
        "by_owner_not_ok": dict(Counter(r["owner"] for r in results
                                        if r["outcome"] not in ("refused", "said", "safe") or r["data_lost"])),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if http is not None:
        summary["http_files_served_not_indexed_images"] = http.get("files_served_not_indexed_images")
        summary["http_upload_one_sentence"] = (http.get("upload") or {}).get("one_sentence")
    summary["integrity"] = integrity_summary(results)
    if http_int is not None:
        summary["integrity"]["http"] = http_int
    if http is not None:
        i25 = http.get("issue25") or {}
        summary["http_issue25"] = {k: i25.get(k) for k in ("process_crashes", "tracebacks", "silent_wrong_results",
                                                           "files_served_not_indexed_images", "rows_lost",
                                                           "temp_folders_left_after_sigterm")}
    print(json.dumps(summary, indent=2))
    if http is not None:
        print(json.dumps(http, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "cases": results, "http": http,
                                               "http_integrity": http_int}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
