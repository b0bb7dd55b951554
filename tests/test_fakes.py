"""The fake database is laid out like a real one (other tests rely on it)."""

import numpy as np

from indexer import schema as S
from tests.fakes import make_db


def test_make_db_layout(tmp_path):
    db = make_db(tmp_path, n=30)
    assert db.count_rows() == 30
    ids, emb = db.embeddings()
    assert emb.shape == (30, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    t = db.read([S.ID, S.LOSS, S.PREDICTED_LOSS, "color"])
    blue_circles = [c == "blue" and i % 3 == 0 for i, c in enumerate(t.column("color").to_pylist())]
    losses = np.array(t.column(S.LOSS).to_pylist())
    assert losses[np.array(blue_circles)].mean() > 5 * losses[~np.array(blue_circles)].mean()
    assert db.data_version == db.version
    assert db.clip_identity["model"] == "tiny-clip"
