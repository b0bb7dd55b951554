"""Loss functions against torch's, score-kind detection, labels -> classes, predictions files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from indexer.errors import UserError
from indexer.losses import (
    binary_cross_entropy,
    check_losses,
    cross_entropy,
    is_probability,
    losses_from_column,
    losses_from_predictions,
    squared_error,
)
from indexer.manifest import read_source

RNG = np.random.default_rng(0)


def test_cross_entropy_matches_torch_for_logits_and_probabilities():
    z = RNG.normal(0, 3, (50, 4))
    y = RNG.integers(0, 4, 50)
    ref = F.cross_entropy(torch.tensor(z), torch.tensor(y), reduction="none").numpy()
    np.testing.assert_allclose(cross_entropy(z, y, probabilities=False), ref, rtol=1e-10)
    p = torch.softmax(torch.tensor(z), 1).numpy()
    np.testing.assert_allclose(cross_entropy(p, y, probabilities=True), ref, rtol=1e-8)
    assert is_probability(p, "classification") and not is_probability(z, "classification")
    # values in [0, 1] that do not sum to 1 are logits for single-label classification
    assert not is_probability(np.full((3, 4), 0.5), "classification")


def test_bce_matches_torch_for_logits_and_probabilities():
    z = RNG.normal(0, 4, (40, 5))
    t = (RNG.random((40, 5)) < 0.3).astype(float)
    ref = F.binary_cross_entropy_with_logits(torch.tensor(z), torch.tensor(t), reduction="none").mean(1).numpy()
    np.testing.assert_allclose(binary_cross_entropy(z, t, probabilities=False), ref, rtol=1e-10)
    p = torch.sigmoid(torch.tensor(z)).numpy()
    np.testing.assert_allclose(binary_cross_entropy(p, t, probabilities=True), ref, rtol=1e-6)
    assert is_probability(p, "multilabel")


def test_squared_error_and_loss_checks():
    np.testing.assert_allclose(squared_error(np.array([1.0, 3.0]), np.array([0.5, 5.0])), [0.25, 4.0])
    r = check_losses(np.array([0.1, np.nan, np.inf, -0.5, 0.0]), rows=np.array([10, 11, 12, 13, 14]))
    assert {k: v[0] for k, v in r.items()} == {11: "loss is NaN", 12: "loss is infinite", 13: "loss is negative"}


def _manifest(tmp_path, labels, loss=None):
    df = pd.DataFrame({"id": [f"s{i}" for i in range(len(labels))],
                       "image": [f"{i}.png" for i in range(len(labels))], "label": labels})
    if loss is not None:
        df["loss"] = loss
    df.to_csv(tmp_path / "m.csv", index=False)
    return read_source(tmp_path / "m.csv")


def _preds(tmp_path, ids, scores, columns, name="p.csv"):
    df = pd.DataFrame(scores, columns=columns)
    df.insert(0, "id", ids)
    path = tmp_path / name
    df.to_parquet(path) if name.endswith(".parquet") else df.to_csv(path, index=False)
    return path


def test_loss_column_rows_rejected_with_reasons(tmp_path):
    # Parquet keeps NaN apart from null (a CSV reader reads "nan" as an empty cell)
    pq.write_table(pa.table({"image": [f"{i}.png" for i in range(5)],
                             "loss": pa.array([0.5, np.nan, np.inf, -1.0, None], pa.float64())}), tmp_path / "m.pq")
    m = read_source(tmp_path / "m.pq")
    r = losses_from_column(m)
    assert r.values[0] == 0.5 and np.isnan(r.values[1:]).all()
    assert {k: v[0] for k, v in r.rejects.items()} == {
        1: "loss is NaN", 2: "loss is infinite", 3: "loss is negative", 4: "loss is missing"}


def test_predictions_named_classes_probabilities_in_shuffled_order(tmp_path):
    m = _manifest(tmp_path, ["cat", "dog", "cat", "bird"])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5], [0.2, 0.2, 0.6]])
    order = [3, 1, 0, 2]  # the predictions file lists ids in another order
    path = _preds(tmp_path, [f"s{i}" for i in order], p[order], ["cat", "dog", "bird"], "p.parquet")
    r = losses_from_predictions(m, path)
    assert r.task == "classification" and not r.rejects
    np.testing.assert_allclose(r.values, -np.log([0.7, 0.8, 0.25, 0.6]))


def test_predictions_integer_labels_logits_and_unknown_label(tmp_path):
    m = _manifest(tmp_path, [0, 2, 1, 5])  # label 5 is not one of the 4 classes
    z = RNG.normal(size=(4, 4)) * 3
    r = losses_from_predictions(m, _preds(tmp_path, [f"s{i}" for i in range(4)], z, ["p0", "p1", "p2", "p3"]))
    ref = F.cross_entropy(torch.tensor(z[:3]), torch.tensor([0, 2, 1]), reduction="none").numpy()
    np.testing.assert_allclose(r.values[:3], ref, rtol=1e-10)
    assert r.rejects[3][0] == "unknown label" and np.isnan(r.values[3])


def test_predictions_multilabel_and_regression(tmp_path):
    m = _manifest(tmp_path, ["a|b", "c", "", "a|zz"])
    z = RNG.normal(size=(4, 3))
    r = losses_from_predictions(m, _preds(tmp_path, [f"s{i}" for i in range(4)], z, ["a", "b", "c"]))
    t = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=float)
    ref = F.binary_cross_entropy_with_logits(torch.tensor(z[:3]), torch.tensor(t), reduction="none").mean(1)
    assert r.task == "multilabel"
    np.testing.assert_allclose(r.values[:3], ref.numpy(), rtol=1e-10)
    assert r.rejects == {3: ("unknown label", "label part 'zz' is not a class")}

    m = _manifest(tmp_path, [1.5, 2.0, 0.0])
    r = losses_from_predictions(m, _preds(tmp_path, ["s0", "s1", "s2"], [[1.0], [2.5], [-1.0]], ["y"]))
    assert r.task == "regression"
    np.testing.assert_allclose(r.values, [0.25, 0.25, 1.0])


@pytest.mark.parametrize("case, needle", [
    ("missing_id", "have no row in the predictions file"),
    ("too_few_classes", "gives 2 classes but the manifest's labels need 3"),
    ("no_label_matches", "names one of the 2 classes"),
    ("duplicate_id", "repeated id 's0'"),
    ("not_numeric", "is not numeric"),
])
def test_predictions_whole_run_errors(tmp_path, case, needle):
    labels = {"too_few_classes": [0, 1, 2], "no_label_matches": ["x", "y", "z"]}.get(case, ["a", "b", "a"])
    m = _manifest(tmp_path, labels)
    ids, scores, cols = ["s0", "s1", "s2"], np.full((3, 2), 0.5), ["a", "b"]
    if case == "missing_id":
        ids = ["s0", "s1", "other"]
    if case == "duplicate_id":
        ids = ["s0", "s0", "s2"]
    path = _preds(tmp_path, ids, scores, cols)
    if case == "not_numeric":
        path.write_text("id,a,b\ns0,x,1\ns1,y,1\ns2,z,1\n")
    with pytest.raises(UserError, match=needle) as e:
        losses_from_predictions(m, path)
    assert "p.csv" in str(e.value)


MODEL_FILE = '''
import torch

class Reg(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True)[:, :, 0, 0]  # (b, 1)

class Cls(torch.nn.Module):
    classes = ["a", "b"]
    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, -m], dim=1)  # logits

def regression():
    return Reg(), (lambda img: torch.zeros(3, 2, 2))

def classifier():
    return Cls()
'''


def test_model_loss_regression_and_classification(tmp_path):
    from indexer.losses import ModelLoss

    (tmp_path / "m.py").write_text(MODEL_FILE)
    x = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    reg = ModelLoss(f"{tmp_path / 'm.py'}:regression", ["1.5", "2", "x"], task="regression", device="cpu")
    assert reg.preprocess(None).shape == (3, 2, 2)  # the returned preprocess is used
    values, rejects = reg(x, np.array([0, 1, 2]))
    assert reg.task == "regression"
    np.testing.assert_allclose(values[:2], [0.25, 0.0])
    assert rejects == {2: ("unknown label", "label 'x' is not a number (regression)")}

    cls = ModelLoss(f"{tmp_path / 'm.py'}:classifier", ["a", "b", "zebra"], device="cpu")
    assert cls.upfront_rejects() == {2: ("unknown label", "label 'zebra' is not one of the 2 classes")}
    values, rejects = cls(x[:2], np.array([0, 1]))
    z = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
    # the logits are exact in float32 and the losses are computed from them in float64, so the
    # reference is too (a float32 reference is off by ~1e-7 absolute: 7e-6 relative on 0.018)
    ref = F.cross_entropy(z.double(), torch.tensor([0, 1]), reduction="none").numpy()
    np.testing.assert_allclose(values, ref, rtol=1e-10)
    assert not rejects


def test_model_entry_point_errors(tmp_path):
    from indexer.losses import ModelLoss

    with pytest.raises(UserError, match="is not MODULE:FUNCTION"):
        ModelLoss("nocolon", ["a"])
    with pytest.raises(UserError, match="importing no_such_module_xyz failed"):
        ModelLoss("no_such_module_xyz:load", ["a"])
    (tmp_path / "m.py").write_text(MODEL_FILE)
    with pytest.raises(UserError, match="has no function 'nothere'"):
        ModelLoss(f"{tmp_path / 'm.py'}:nothere", ["a"])
