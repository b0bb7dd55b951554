"""The diagnosis ensemble: the scikit-learn contract, learning a planted relation, out-of-fold scoring."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from diagnosis.ensemble import DiagnosisEnsemble, GramRidgeCV, NeighboursRegressor
from diagnosis.metrics import auroc_top, quality


@parametrize_with_checks([DiagnosisEnsemble(n_members=4, n_folds=2, n_rff=64, pca_dim=8, random_state=0),
                          NeighboursRegressor(n_neighbors=3), GramRidgeCV()])
def test_sklearn_contract(estimator, check):
    check(estimator)


def test_neighbours_member_learns_an_interaction_a_linear_model_cannot():
    # "blue but not a square" fails: loss = a AND NOT b on two binary attributes; the best linear fit
    # predicts the (a, b) = (1, 1) cell halfway up, the neighbours member gets every cell right
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 2000), rng.integers(0, 2, 2000)
    X = np.c_[a, b, 0.05 * rng.normal(size=(2000, 6))].astype(np.float32)
    y = (a & (1 - b)).astype(float)
    knn = NeighboursRegressor(n_neighbors=10).fit(X[:1500], y[:1500])
    lin = DiagnosisEnsemble(n_members=1, n_folds=2, kinds=("ridge",), target="identity",
                            random_state=0).fit(X[:1500], y[:1500])
    cell = (a[1500:] == 1) & (b[1500:] == 1)
    assert np.abs(knn.predict(X[1500:]) - y[1500:]).max() < 1e-9
    assert lin.predict(X[1500:])[cell].mean() > 0.2


def test_neighbours_member_ivf_path_agrees_with_exact_and_survives_pickling():
    import pickle

    X, y, _ = planted(n=3000)
    exact = NeighboursRegressor(n_neighbors=10).fit(X, y)
    ivf = NeighboursRegressor(n_neighbors=10, exact_max_rows=1000, nprobe=64).fit(X, y)
    Xt, _, _ = planted(n=500, fresh=True)
    p = exact.predict(Xt)
    assert np.corrcoef(p, ivf.predict(Xt))[0, 1] > 0.99
    again = pickle.loads(pickle.dumps(exact))
    np.testing.assert_allclose(again.predict(Xt), p)  # the FAISS index travels as bytes
    ivf_again = pickle.loads(pickle.dumps(ivf))
    np.testing.assert_allclose(ivf_again.predict(Xt), ivf.predict(Xt))


def planted(n=1500, d=64, k=8, bad=(0, 1), seed=0, fresh=False):
    """L2-normalised points around k cluster centres; clusters in ``bad`` have ~20x the loss
    (gamma-distributed, so heavy-tailed like real per-sample losses)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    if fresh:  # same centres, new samples
        rng = np.random.default_rng(seed + 1000)
    cl = rng.integers(0, k, n)
    X = centres[cl] + 0.6 * rng.normal(size=(n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.where(np.isin(cl, bad), rng.gamma(4.0, 0.5, n), rng.gamma(1.0, 0.1, n))
    return X.astype(np.float32), y, cl


@pytest.fixture(scope="module")
def fitted():
    X, y, cl = planted()
    ens = DiagnosisEnsemble(n_members=4, n_folds=3, n_rff=256, random_state=0).fit(X, y)
    return ens, X, y, cl


def test_out_of_fold_predictions_find_the_planted_clusters(fitted):
    ens, X, y, cl = fitted
    q = quality(y, ens.oof_prediction_)
    # within a cluster the loss is pure noise, so even the true cluster means only reach
    # Spearman 0.73 / AUROC 0.93 here; the ensemble must come close
    oracle = quality(y, np.where(np.isin(cl, (0, 1)), 2.0, 0.1))
    assert q["auroc_top10"] > 0.97 * oracle["auroc_top10"]
    assert q["spearman"] > 0.5
    assert q["r2"] > 0.5
    # the planted clusters are predicted worse than the rest, by a wide margin
    bad = np.isin(cl, (0, 1))
    assert ens.oof_prediction_[bad].mean() > 5 * ens.oof_prediction_[~bad].mean()


def test_held_out_samples_are_scored_as_well_as_out_of_fold(fitted):
    ens, *_ = fitted
    # same cluster centres (drawn first from the seed), fresh cluster draws and noise: unseen rows
    Xt, yt, _ = planted(n=1500, seed=0, k=8, d=64, bad=(0, 1), fresh=True)
    pred, std = ens.predict(Xt, return_std=True)
    assert pred.shape == std.shape == (1500,)
    assert (std >= 0).all()
    assert auroc_top(yt, pred) > 0.9


def test_oof_prediction_comes_only_from_the_fold_that_held_the_sample_out(fitted):
    ens, X, y, _ = fitted
    P = ens.member_predictions(X)  # (folds, members, n)
    own = P[ens.fold_, :, np.arange(len(X))]  # (n, members): the held-out fold's members
    # X is float32 and the members compute in float32 (PCA and the MLP keep it), ~1e-7 per operation;
    # the fit scored each fold's rows alone, this scores all rows at once, so BLAS blocks (and the last
    # bits) differ: after 64-128-term sums ~1e-6 absolute in log1p space, ~1e-6 absolute in loss units
    # (3e-6 relative seen on AMD EPYC, 1e-5 on a small loss elsewhere). Hence rtol and atol 1e-5; the
    # spread is a difference of such values, so the same absolute floor.
    np.testing.assert_allclose(own.mean(axis=1), ens.oof_prediction_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(own.std(axis=1), ens.oof_std_, rtol=1e-5, atol=1e-5)
    # the full ensemble (which saw each sample in all other folds) predicts the fitted rows better
    # than the out-of-fold members did: the OOF score is honest, the in-sample one is optimistic
    full = P.mean(axis=(0, 1))
    assert np.mean((full - y) ** 2) < np.mean((ens.oof_prediction_ - y) ** 2)


def test_an_unlearnable_outlier_is_not_memorised_out_of_fold():
    X, y, _ = planted(n=800, seed=3)
    rng = np.random.default_rng(9)
    far = rng.normal(size=(1, X.shape[1]))
    X = np.vstack([X, (far / np.linalg.norm(far)).astype(np.float32)])
    y = np.append(y, 50.0)  # one huge loss at a point no other sample is near
    ens = DiagnosisEnsemble(n_members=4, n_folds=4, n_rff=256, random_state=0).fit(X, y)
    in_sample = ens.predict(X[-1:])[0]
    assert ens.oof_prediction_[-1] < in_sample  # members that never saw it cannot know it


def test_log1p_target_beats_raw_losses_on_a_heavy_tail():
    # a loss that is log-linear in the embedding: a few samples have losses 100x the median
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1200, 32))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    s = X @ rng.normal(size=32)
    y = np.expm1(np.clip(0.5 + 1.2 * s / s.std() + 0.3 * rng.normal(size=1200), 0, None))
    assert y.max() > 50 * np.median(y)
    base = DiagnosisEnsemble(n_members=1, n_folds=3, kinds=("ridge",), random_state=0)
    logt = quality(y, clone(base).fit(X, y).oof_prediction_)
    raw = quality(y, clone(base).set_params(target="identity").fit(X, y).oof_prediction_)
    assert logt["spearman"] > raw["spearman"] + 0.02
    assert logt["r2"] > raw["r2"] + 0.05


def test_fitting_is_reproducible_with_a_seed():
    X, y, _ = planted(n=300, seed=2)
    a = DiagnosisEnsemble(n_members=4, n_folds=2, n_rff=64, random_state=5).fit(X, y)
    b = DiagnosisEnsemble(n_members=4, n_folds=2, n_rff=64, random_state=5).fit(X, y)
    np.testing.assert_allclose(a.oof_prediction_, b.oof_prediction_)
    assert len(a.estimators_) == 2 and len(a.estimators_[0]) == 4


def test_bad_parameters_are_refused():
    X, y, _ = planted(n=50)
    with pytest.raises(ValueError, match="n_folds"):
        DiagnosisEnsemble(n_folds=1).fit(X, y)
    with pytest.raises(ValueError, match="target"):
        DiagnosisEnsemble(target="sqrt").fit(X, y)


def test_rff_members_fit_at_most_rff_max_rows_and_knn_members_unique_rows(monkeypatch):
    from sklearn.dummy import DummyRegressor

    import diagnosis.ensemble as E

    seen = []

    class Recorder(DummyRegressor):
        def fit(self, X, y, sample_weight=None):
            seen.append((self.kind, len(X), len(np.unique(X, axis=0))))
            return super().fit(X, y)

    def member(kind, *args):
        r = Recorder()
        r.kind = kind
        return r

    monkeypatch.setattr(E, "_member", member)
    monkeypatch.setattr(E, "clone", lambda est: est)
    X, y, _ = planted(n=600)
    DiagnosisEnsemble(n_members=2, n_folds=3, kinds=("rff", "knn"), rff_max_rows=100, random_state=0).fit(X, y)
    rff = [s for s in seen if s[0] == "rff"]
    knn = [s for s in seen if s[0] == "knn"]
    assert len(rff) == len(knn) == 3
    assert all(n == 100 for _, n, _ in rff)  # a random subset of the 400-row bootstrap sample
    assert all(n == u < 400 for _, n, u in knn)  # the bootstrap sample's distinct rows only


def test_knn_members_share_one_index_and_score_as_if_each_had_its_own():
    """The kNN members of an ensemble search one index over all fitted rows, each keeping its own
    nearest rows among the candidates: every member predicts exactly what a NeighboursRegressor
    fitted on its own (bootstrap, distinct) rows predicts, and the index is stored once."""
    import pickle

    X, y, _ = planted(n=900)
    ens = DiagnosisEnsemble(n_members=2, n_folds=3, kinds=("knn", "rff"), n_rff=32, random_state=0).fit(X, y)
    Xt, _, _ = planted(n=300, fresh=True)
    P = ens.member_predictions(Xt)
    for k, members in enumerate(ens.estimators_):
        knn = members[0]
        assert knn.rows_ is not None and np.array_equal(knn.rows_, np.unique(knn.rows_))
        assert not np.isin(knn.rows_, np.flatnonzero(ens.fold_ == k)).any()  # never its held-out fold
        alone = NeighboursRegressor(n_neighbors=10).fit(X[knn.rows_], knn.y_)
        # the same neighbours and distances; float64 weights summed in another order: last bits
        np.testing.assert_allclose(ens._inverse(np.clip(alone.predict(Xt), *ens.z_range_)), P[k, 0], rtol=1e-12)
    state = pickle.dumps(ens)
    assert len(state) < 900 * 64 * 4 * 1.5  # one copy of the fitted vectors, not one per fold
    np.testing.assert_array_equal(pickle.loads(state).member_predictions(Xt), P)


@pytest.mark.parametrize("exact_max_rows", [20000, 100])
def test_knn_scores_do_not_depend_on_the_batch(exact_max_rows):
    """FAISS computes 250+ queries through BLAS and fewer by another loop (last bits differ): a row's
    kNN score must not depend on how many rows it is scored with (``diagnose --score-new``)."""
    X, y, _ = planted(n=1200)
    knn = NeighboursRegressor(n_neighbors=10, exact_max_rows=exact_max_rows, nprobe=64).fit(X, y)
    Xt, _, _ = planted(n=600, fresh=True)
    whole = knn.predict(Xt)
    one_by_one = np.array([knn.predict(Xt[i : i + 1])[0] for i in range(0, 600, 37)])
    np.testing.assert_array_equal(one_by_one, whole[::37])


def test_ensemble_threads_do_not_change_the_result():
    X, y, _ = planted(n=400)
    one = DiagnosisEnsemble(n_members=4, n_folds=3, n_rff=64, random_state=0, n_jobs=1).fit(X, y)
    two = DiagnosisEnsemble(n_members=4, n_folds=3, n_rff=64, random_state=0, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(two.oof_prediction_, one.oof_prediction_)  # one BLAS thread per member
    Xt, _, _ = planted(n=3000, fresh=True)
    # two threads score two halves: BLAS on other block sizes rounds float32 sums differently
    np.testing.assert_allclose(two.predict(Xt), one.predict(Xt), rtol=1e-5, atol=1e-6)


def test_gram_ridge_chooses_and_fits_as_ridgecv():
    """The rff members' ridge: same leave-one-out choice of alpha and the same fit as scikit-learn's
    RidgeCV (an SVD of the design), through the Gram matrix instead."""
    from sklearn.kernel_approximation import RBFSampler
    from sklearn.linear_model import RidgeCV

    X, y, _ = planted(n=1500)
    Z = RBFSampler(gamma=0.5, n_components=256, random_state=0).fit_transform(X)
    z = np.log1p(y)
    ref = RidgeCV(alphas=np.logspace(-3, 3, 7)).fit(Z, z)
    got = GramRidgeCV(alphas=tuple(np.logspace(-3, 3, 7))).fit(Z, z)
    assert got.alpha_ == ref.alpha_
    # float64 solves of the same system by two decompositions: agree to ~1e-10 relative of |y|
    np.testing.assert_allclose(got.predict(Z), ref.predict(Z), atol=1e-7)
    # float32 features (what the rff members score) are widened block by block (3,000 rows: two
    # blocks), not all at once: float64 products as of the whole widened array, to float64 rounding
    # of a 256-term dot product (~1e-13 of its terms' magnitudes)
    Z32 = np.vstack([Z, Z]).astype(np.float32)
    whole = Z32.astype(np.float64) @ got.coef_ + got.intercept_
    np.testing.assert_allclose(got.predict(Z32), whole, rtol=0, atol=1e-12 * np.abs(got.coef_).sum())
