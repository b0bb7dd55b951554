"""An index run killed with SIGKILL mid-run and rerun stores every sample exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from indexer import schema as S
from indexer.store import Database
from tests.fakes import make_images

N, BATCH = 24, 4

SLOW_MODEL = '''
import time
import torch

class Slow(torch.nn.Module):
    """Deterministic 3-class scores from the mean colour; sleeps so the run can be killed mid-way."""
    classes = ["circle", "square", "triangle"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        time.sleep(0.4)
        return self.fc(x.mean(dim=(2, 3)))

def load():
    return Slow()
'''

RUN = f"""
import sys
from indexer.clip import ClipSpec
from indexer.configs import TINY_CLIP
from indexer.pipeline import index_dataset
r = index_dataset(sys.argv[1], sys.argv[2], clip=ClipSpec(str(TINY_CLIP)), model=sys.argv[3],
                  batch_size={BATCH}, commit_rows={BATCH}, workers=1, progress=False)
print(r.rows_written, r.rows_already_stored)
"""


def _run(args, cwd) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", RUN, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(db: Path) -> int:
    meta = db / "meta.json"
    try:
        return int(json.loads(meta.read_text()).get("data_version", 0)) if meta.exists() else 0
    except ValueError:  # read while being replaced: try again on the next poll
        return 0


def test_kill_9_mid_run_then_rerun_stores_each_sample_once(tmp_path):
    df = make_images(tmp_path, N)
    df.drop(columns=["loss"]).to_csv(tmp_path / "manifest.csv", index=False)  # losses come from the model
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    db = tmp_path / "db"
    args = [str(tmp_path / "manifest.csv"), str(db), f"{tmp_path / 'slowmodel.py'}:load"]

    proc = _run(args, tmp_path)
    deadline = time.monotonic() + 120
    while _committed(db) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # version 1 = empty table, 2 = first batch, 3 = second batch
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    partial = Database(db).ids()
    assert BATCH <= len(partial) < N and len(set(partial)) == len(partial)

    out, err = _run(args, tmp_path).communicate(timeout=300)
    assert out.split() == [str(N - len(partial)), str(len(partial))], err[-2000:]

    rows = Database(db).read([S.ID, S.LOSS, S.EMBEDDING]).to_pandas()
    assert sorted(rows[S.ID]) == sorted(df["id"]) and rows[S.ID].is_unique
    assert np.isfinite(rows[S.LOSS]).all() and (rows[S.LOSS] > 0).all()
    emb = np.stack(rows[S.EMBEDDING].to_numpy())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # rows stored before the kill and after it come from the same (seeded) model: images that
    # look alike (same shape and colour) get near-identical embeddings whichever run made them
    frame = rows.merge(df[["id", "label", "color"]], on="id")
    for _, g in frame.groupby(["label", "color"]):
        e = np.stack(g[S.EMBEDDING].to_numpy())
        assert (e @ e.T).min() > 0.9
    meta = Database(db).read_meta()
    assert meta["data_version"] == Database(db).data_version > 0
    assert pd.read_json(db / "faiss" / "info.json", typ="series")["num_rows"] == N
