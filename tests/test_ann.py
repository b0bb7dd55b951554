"""FAISS index: exact equals numpy brute force, IVF recall is measured, staleness is never served."""

import json

import numpy as np
import pyarrow as pa
import pytest

from indexer import ann, ann_build
from indexer import schema as S
from indexer.errors import UserError
from indexer.store import Database
from tests.fakes import make_db


def synthetic_db(path, n=3000, d=32, clusters=40, seed=0) -> tuple[Database, np.ndarray, list[str]]:
    """A table of clustered unit vectors (no images): enough rows for an IVF index."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"r{i:06d}" for i in range(n)]
    db = Database(path, create=True)
    schema = S.table_schema(d)
    db.create_table(schema)
    db.table.add(pa.table({
        S.ID: ids, S.IMAGE: [f"/nowhere/{i}.png" for i in ids], S.LABEL: ["a"] * n, S.SPLIT: ["train"] * n,
        S.LOSS: pa.array(rng.random(n).astype(np.float32)),
        S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
        S.PREDICTED_LOSS: pa.nulls(n, pa.float32()), S.PREDICTED_LOSS_STD: pa.nulls(n, pa.float32()),
        **S.no_identity(n),
    }, schema=schema))
    db.update_meta(clip={"model": "synthetic"}, data_version=db.version, embed_dim=d)
    return db, x, ids


@pytest.fixture(scope="module")
def small_db(tmp_path_factory):
    return make_db(tmp_path_factory.mktemp("ann"), n=60)


def test_exact_index_equals_numpy_brute_force(small_db):
    info = ann.build_index(small_db, force=True)
    assert info["kind"] == "flat" and info["recall_at_10"] == 1.0 and info["num_rows"] == 60
    index = ann.load_index(small_db)
    ids, x = small_db.embeddings()
    rng = np.random.default_rng(1)
    q = rng.normal(size=(5, x.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims, got = index.search(q, 10)
    brute = q @ x.T
    for i in range(5):
        order = np.argsort(-brute[i], kind="stable")[:10]
        np.testing.assert_allclose(sims[i], brute[i, order], rtol=1e-5, atol=1e-6)
        assert list(got[i]) == list(ids[order])


def test_k_beyond_rows_is_capped(small_db):
    index = ann.load_index(small_db)
    sims, got = index.search(np.ones((1, 128), np.float32) / np.sqrt(128), 500)
    assert got.shape == (1, 60) and None not in got[0]


def test_ivf_recall_measured_and_reached(tmp_path):
    db, x, ids = synthetic_db(tmp_path / "db")
    info = ann.build_index(db, exact_max_rows=1000)
    assert info["kind"] == "ivf"
    assert info["nlist"] == min(round(4 * np.sqrt(3000)), 3000 // 39)  # faiss: >= 39 points per cell
    assert info["recall_at_10"] >= 0.95
    assert info["recall_curve"][str(info["nprobe"])] == info["recall_at_10"]
    assert info["recall_at_100"] >= 0.95 and info["nprobe_at_100"] >= info["nprobe"]
    on_disk = json.loads((db.faiss_dir / "info.json").read_text())
    assert on_disk["nprobe"] == info["nprobe"] and on_disk["index_bytes"] > 0
    # Recall measured here independently, on fresh queries, agrees with the stored figure.
    index = ann.load_index(db)
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 3000, 200), rng.integers(0, 3000, 200)
    q = x[a] + x[b]
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    _, got = index.search(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    id_arr = np.array(ids)
    recall = np.mean([len(set(got[i]) & set(id_arr[truth[i]])) / 10 for i in range(200)])
    assert recall >= 0.9
    # A wider probe finds at least as much.
    _, wide = index.search(q, 10, nprobe=info["nlist"])
    assert np.mean([len(set(wide[i]) & set(id_arr[truth[i]])) / 10 for i in range(200)]) >= max(recall, 0.99)  # float ties aside, exhaustive


def test_ivf_build_streams_rows_under_their_ids_with_exact_ground_truth(tmp_path, monkeypatch):
    """The IVF build reads the table in record batches only (never all vectors as one array), even
    after rows moved to a new fragment and left deletions behind: every row is in the index under
    its own id, the recall queries' own rows are where the sample says, and the streamed ground
    truth (a running top-k over the batches) is brute force over the whole table."""
    import faiss

    db, x, ids = synthetic_db(tmp_path / "db", n=2500)
    where = f"{S.ID} < 'r001250'"
    half = db.read(where=where)
    db.table.delete(where)  # these rows move to a new fragment (deletions in the old)
    db.append(half)
    tab_ids, tab_x = db.embeddings()  # the table's order now
    assert list(tab_ids) != ids
    batches, seen = [], {}
    stream = ann_build.stream

    def counted(ds, d):
        for item in stream(ds, d):
            batches.append(len(item[0]))
            yield item

    tune = ann_build.tune_both

    def spy(index, fams, exact, *rest):
        seen.update(fams=fams, exact=exact)
        return tune(index, fams, exact, *rest)

    monkeypatch.setattr(ann_build, "STREAM_BATCH_ROWS", 300)
    monkeypatch.setattr(ann_build, "stream", counted)
    monkeypatch.setattr(ann_build, "tune_both", spy)
    monkeypatch.setattr(Database, "embeddings", lambda *a, **k: pytest.fail("the IVF build read the whole table"))
    info = ann.build_index(db, exact_max_rows=1000)
    assert info["kind"] == "ivf" and info["num_rows"] == 2500 and info["recall_at_10"] >= 0.95
    assert sum(batches) == 2 * 2500 and len(batches) >= 2 * 9  # two passes (assign, add), many batches
    index = ann.load_index(db)
    _, pos = index.search_positions(tab_x, 1, nprobe=info["nlist"])  # exhaustive: each row finds itself
    assert (index.ids[pos[:, 0]] == tab_ids.astype(str)).all()
    own_q, own_pos = seen["fams"][0]
    np.testing.assert_array_equal(tab_x[own_pos], own_q)
    for (q, _), got in zip(seen["fams"], seen["exact"], strict=True):
        sims, _ = faiss.knn(q, tab_x, got.shape[1], metric=faiss.METRIC_INNER_PRODUCT)
        np.testing.assert_allclose(np.einsum("qd,qkd->qk", q, tab_x[got]), sims, rtol=1e-5, atol=1e-5)


def test_subset_search_is_exact_among_selected_rows(tmp_path):
    db, x, ids = synthetic_db(tmp_path / "db", n=2000)
    ann.build_index(db, exact_max_rows=500)
    index = ann.load_index(db)
    assert index.info["kind"] == "ivf"
    rng = np.random.default_rng(3)
    mask = rng.random(2000) < 0.05
    q = x[:3] + 0.1
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    sims, pos = index.search_subset(q, 20, mask)
    pos_of = {i: p for p, i in enumerate(index.ids.tolist())}
    xf = x[[ids.index(i) for i in index.ids.tolist()]]  # vectors in FAISS order
    for j in range(3):
        allowed = np.flatnonzero(mask)
        want = allowed[np.argsort(-(xf[allowed] @ q[j]), kind="stable")[:20]]
        assert set(pos[j].tolist()) == set(want.tolist())
        np.testing.assert_allclose(sims[j], np.sort(xf[allowed] @ q[j])[::-1][:20], rtol=1e-5, atol=1e-6)
    assert len(pos_of) == 2000


def test_update_columns_writes_only_those_columns_in_one_commit(tmp_path):
    """Writing predicted columns matches rows by id across fragments, leaves the row order and the
    embedding files alone (no rewrite of the vectors), ignores unknown ids, and is a single commit:
    a reader sees all of the new values or none."""
    db, x, ids = synthetic_db(tmp_path / "db", n=1200, d=8)
    more_ids = [f"z{i:06d}" for i in range(300)]  # a second fragment
    extra = db.read(where=f"{S.ID} < 'r000300'").to_pylist()
    for row, new_id in zip(extra, more_ids, strict=True):
        row[S.ID] = new_id
    db.append(pa.Table.from_pylist(extra, schema=db.table.schema))
    ds = db.table.to_lance()
    assert len(ds.get_fragments()) == 2
    embedding_files = {f.path for frag in ds.get_fragments() for f in frag.data_files()}
    before, order = db.version, db.ids().tolist()

    rng = np.random.default_rng(1)
    chosen = rng.permutation(ids + more_ids)[:1000].tolist()  # both fragments, shuffled
    values = rng.random(1000).astype(np.float32)
    written = db.update_columns(pa.table({
        S.ID: chosen + ["no-such-id"], S.PREDICTED_LOSS: pa.array(np.append(values, 9.0)),
        S.PREDICTED_LOSS_STD: pa.array(np.append(values / 10, 9.0))}))

    assert written == before + 1 == db.version
    t = db.read([S.ID, S.EMBEDDING, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD])
    assert t.column(S.ID).to_pylist() == order and t.num_rows == 1500
    got = dict(zip(t.column(S.ID).to_pylist(), t.column(S.PREDICTED_LOSS).to_pylist(), strict=True))
    np.testing.assert_allclose([got[i] for i in chosen], values)
    assert sum(v is None for v in got.values()) == 500  # the rest untouched
    std = dict(zip(t.column(S.ID).to_pylist(), t.column(S.PREDICTED_LOSS_STD).to_pylist(), strict=True))
    np.testing.assert_allclose([std[i] for i in chosen], values / 10, rtol=1e-6)
    emb = np.asarray(t.column(S.EMBEDDING).combine_chunks().values.to_numpy()).reshape(-1, 8)
    np.testing.assert_array_equal(emb[:1200], x)
    after = {f.path for frag in db.table.to_lance().get_fragments() for f in frag.data_files()}
    assert embedding_files < after  # the vectors' files are kept; only new column files were added
    assert db.update_columns(pa.table({S.ID: ["nope"], S.PREDICTED_LOSS: pa.array([1.0], pa.float32())})) == written


def test_stale_index_is_rebuilt_or_refused(tmp_path):
    db = make_db(tmp_path, n=30)
    ann.build_index(db)
    assert ann.index_status(db)["fresh"]
    # Writing predicted columns keeps the index fresh.
    t = db.read([S.ID, S.PREDICTED_LOSS])
    db.update_columns(t)
    assert ann.index_status(db)["fresh"]
    # Adding rows makes it stale: refused, or rebuilt to cover the new row.
    extra = db.read(where=f"{S.ID} = 's00000'").to_pylist()[0]
    extra[S.ID] = "new-row"
    db.table.add(pa.Table.from_pylist([extra], schema=db.table.schema))
    db.update_meta(data_version=db.version)
    status = ann.index_status(db)
    assert not status["fresh"] and "data version" in status["reason"]
    with pytest.raises(UserError, match="stale"):
        ann.load_index(db, rebuild_if_stale=False)
    index = ann.load_index(db)
    assert index.ntotal == 31 and "new-row" in set(index.ids.tolist())
    assert ann.index_status(db)["fresh"]


def test_build_keeps_fresh_index_unless_forced(small_db):
    first = ann.build_index(small_db, force=True)
    again = ann.build_index(small_db)
    assert again["build_seconds"] == first["build_seconds"]


def test_gpu_code_path_with_faiss_gpu_api_faked(tmp_path, monkeypatch):
    """The GPU branches (build, tune, save as CPU, load, per-call nprobe) run here with faiss's GPU
    functions replaced by CPU stand-ins, so they are exercised even where no GPU exists."""
    import faiss

    calls = []

    class Res:
        pass

    class GpuParameterSpace:
        def set_index_parameter(self, index, name, value):
            calls.append((name, value))
            faiss.ParameterSpace().set_index_parameter(index, name, value)

    monkeypatch.setattr(faiss, "StandardGpuResources", Res, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", GpuParameterSpace, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, dev, index: calls.append("to_gpu") or index,
                        raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: calls.append("to_cpu") or index, raising=False)
    db, x, ids = synthetic_db(tmp_path / "db")
    info = ann.build_index(db, exact_max_rows=1000)
    assert info["gpu"] and info["recall_at_10"] >= 0.95 and calls[:2] == ["to_gpu", "to_cpu"]
    index = ann.load_index(db)
    assert index.gpu_resources is not None
    sims, got = index.search(x[:2], 50)
    assert ("nprobe", index.nprobe_for(50)) in calls and got[0][0] == ids[0]
    with pytest.raises(NotImplementedError):
        index.search_subset(x[:1], 5, np.ones(3000, bool))
    from search_ui.engine import QueryEngine  # a GPU index: filters go through LanceDB instead

    assert len(QueryEngine(db).similar(ids[0], k=5, where="loss < 0.5")) == 5


@pytest.mark.gpu
def test_gpu_build_matches_cpu(tmp_path):
    if not ann.gpu_available():
        pytest.skip("faiss sees no GPU (faiss-cpu installed)")
    db, x, ids = synthetic_db(tmp_path / "db")
    info = ann.build_index(db, exact_max_rows=1000)
    assert info["gpu"] and info["recall_at_10"] >= 0.95


def test_deepening_search_probes_the_far_cells_only_when_the_near_ones_run_out(tmp_path):
    """``search_deepening``: a query whose most similar rows all lie in the nearer half of its near
    cells gets what probing those cells gives; one whose rows reach into the farther half (a query
    off the data) gets what probing the far cells gives: the same rows and similarities, from the
    same cells searched in two parts."""
    db, x, _ = synthetic_db(tmp_path / "db", n=3000)
    ann.build_index(db, exact_max_rows=1000)
    index = ann.load_index(db)
    assert index.info["kind"] == "ivf" and index.can_deepen
    nlist = index.info["nlist"]
    near, far, k = 4, min(16, nlist), 200
    cells = index.cells()
    assert cells.shape == (index.ntotal,) and cells.min() >= 0 and cells.max() < nlist

    def same(a, b):
        (sa, pa), (sb, pb) = a, b
        assert set(pa[0].tolist()) == set(pb[0].tolist())
        # the same float32 inner products, computed by the same FAISS kernel over the same cells
        np.testing.assert_array_equal(np.sort(sa[0]), np.sort(sb[0]))

    on_data = x[[1]]  # a stored row: its 5 nearest rows share its cell
    same(index.search_deepening(on_data, k, near, far, look=5), index.search_positions(on_data, k, nprobe=near))
    off = np.random.default_rng(1).normal(size=(1, x.shape[1])).astype(np.float32)
    off /= np.linalg.norm(off)
    deep = index.search_deepening(off, k, near, far, look=100)
    same(deep, index.search_positions(off, k, nprobe=far))
    assert set(deep[1][0].tolist()) != set(index.search_positions(off, k, nprobe=near)[1][0].tolist())
