"""The compressed (IVF-PQ) FAISS index: chosen beyond the size threshold, built by streaming, its
stored recall is the recall a brute-force check measures, and the query path serves it."""

import json

import numpy as np
import pytest

from indexer import ann, ann_large
from tests.test_ann import synthetic_db


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return synthetic_db(tmp_path_factory.mktemp("annl") / "db", n=4000, d=32, clusters=30)


def test_pq_size_fits_dimension_and_gpu():
    assert ann_large.pq_bytes(512) == 64
    assert ann_large.pq_bytes(768) == 96
    assert ann_large.pq_bytes(32) == 4
    assert ann_large.pq_bytes(512, 20) == 16  # 20 does not divide 512
    assert ann_large.wants_compressed(5_000_000, 512) and not ann_large.wants_compressed(1_000_000, 512)


def test_build_index_switches_to_ivfpq_and_its_recall_is_true(big, monkeypatch):
    db, x, ids = big
    monkeypatch.setattr(ann_large, "FLAT_MAX_BYTES", 1000)  # 4000 x 32 float32 = 512 KB: "too large"
    monkeypatch.setattr(ann_large, "MAX_TRAIN_ROWS", 4000)
    info = ann.build_index(db, force=True)
    assert (info["kind"], info["codec"], info["nlist"]) == ("ivf", "PQ4x8", 4000 // 39)
    assert info["bytes_per_vector"] == 4 and info["index_bytes"] < x.nbytes / 4  # 32x smaller codes + lists
    on_disk = json.loads((db.faiss_dir / ann.INFO_FILE).read_text())
    assert on_disk["recall_at_10"] == info["recall_at_10"] and on_disk["num_rows"] == 4000
    assert ann.index_status(db)["fresh"]

    # the stored recall is what brute force says, on fresh queries (midpoints, as text queries sit)
    index = ann.load_index(db, rebuild_if_stale=False)
    assert index.info["codec"] == "PQ4x8" and index.index.nprobe == info["nprobe"]
    rng = np.random.default_rng(5)
    q = x[rng.integers(0, 4000, 200)] + x[rng.integers(0, 4000, 200)]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, got = index.search(q, 10)
    pos = {s: i for i, s in enumerate(ids)}
    recall = np.mean([len(set(t) & {pos[g] for g in row if g is not None}) / 10 for t, row in zip(truth, got, strict=True)])
    assert abs(recall - info["recall_at_10"]) < 0.1
    assert info["recall_10_at_100"] > info["recall_at_10"]  # re-ranking a pool of 100 recovers more
    assert info["recall_curve"][str(info["nprobe"])] == info["recall_at_10"]


def test_ids_are_written_through_a_memory_map_and_map_positions(big):
    db, x, ids = big
    ann_large.build_compressed(db, nlist=16)
    stored = np.load(db.faiss_dir / ann.IDS_FILE, mmap_mode="r")
    assert stored.shape == (4000,) and stored.tolist() == ids  # FAISS position i is table row ids[i]
    index = ann.load_index(db, rebuild_if_stale=False)
    _, got = index.search(x[:50], 1, nprobe=16)
    pos = {s: i for i, s in enumerate(ids)}
    true_sim = np.einsum("ij,ij->i", x[:50], x[[pos[g] for g in got[:, 0]]])
    exact_best = np.sort(x[:50] @ x.T, axis=1)[:, -2]  # best other row (4 bytes a vector cannot tell twins)
    assert np.median(true_sim) > 0.9 * np.median(exact_best)
