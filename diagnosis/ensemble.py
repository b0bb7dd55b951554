"""The diagnosis ensemble: CLIP embedding -> the black-box model's loss on that sample.

A scikit-learn regressor holding K x M fitted members: for each of K folds, M lightweight regressors
of different kinds (nearest neighbours on FAISS, random Fourier features + ridge, a small MLP and
gradient-boosted trees on a PCA projection; plain ridge on request), each on a bootstrap sample of the other folds. Fitting therefore scores every
training sample out-of-fold for free (``oof_prediction_``: only the members of the fold that held the
sample out score it), and new samples are scored by all K x M members.

Losses are heavy-tailed (most near 0, a few large), so members fit ``log1p(loss)``. Back in loss
units ``expm1`` of a log-space prediction estimates a median, below the mean; one scale factor, fitted
by least squares on the out-of-fold predictions, removes that bias without changing any ranking
(Duan's smearing factor was tried first: being multiplicative on 1 + loss it lifted every near-zero
prediction, which cost R^2 on small tables).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, TransformerMixin, clone
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import RBFSampler
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

#: Member kinds, in the order members cycle through them (member i has kind ``KINDS[i % 4]``).
#: ``ridge`` is available but not a default: being linear it cannot represent a failure that is an
#: interaction of attributes ("blue, but not a square"), and on the default world it predicted blue
#: squares (true loss 0.02) at 0.75, lifting every blue phrase in ``explain`` (BENCHMARKS.md).
KINDS = ("knn", "rff", "hgb", "mlp")
ALL_KINDS = ("knn", "rff", "hgb", "mlp", "ridge")
_ALPHAS = np.logspace(-3, 3, 7)


class _GlobalScale(TransformerMixin, BaseEstimator):
    """Multiply all features by one factor so that their mean squared value is 1.

    Unlike per-feature standardisation this keeps PCA's ordering of variance: standardising would
    blow the noise in the last components up to the size of the signal in the first (measured: it
    cost the MLP members AUROC 0.99 -> 0.90 on a 150-row table).
    """

    def fit(self, X, y=None):
        X = validate_data(self, X)
        self.scale_ = 1.0 / max(float(np.sqrt(np.mean(X.astype(np.float64) ** 2))), 1e-12)
        return self

    def transform(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False) * self.scale_


class GramRidgeCV(RegressorMixin, BaseEstimator):
    """Ridge regression (with an unpenalised intercept), its ``alpha`` chosen from ``alphas`` by exact
    leave-one-out error, as scikit-learn's ``RidgeCV`` does, but solved through the (p, p) Gram
    matrix's eigendecomposition instead of an SVD of the (n, p) design: for the rff members (20,000
    rows x 1,024 features) the SVD was most of their fitting time; two matrix products and a
    1,024 x 1,024 eigendecomposition do the same work several times faster (BENCHMARKS.md, issue 27).
    Meant for n >> p (it holds two (n, p) float64 arrays).
    """

    def __init__(self, alphas=tuple(_ALPHAS)):
        self.alphas = alphas

    def fit(self, X, y):
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        n, p = X.shape
        x_mean, y_mean = X.mean(axis=0), float(y.mean())
        # in row blocks, so that besides X only one (n, p) array is held (the design in the Gram
        # matrix's eigenbasis): RidgeCV's SVD held about three
        blocks = [slice(i, i + 4096) for i in range(0, n, 4096)]
        C = np.zeros((p, p))
        for r in blocks:
            Xc = X[r] - x_mean
            C += Xc.T @ Xc
        s, V = np.linalg.eigh(C)
        s = np.maximum(s, 0.0)
        U = np.empty((n, p))
        for r in blocks:
            U[r] = (X[r] - x_mean) @ V
        alphas = np.asarray(self.alphas, dtype=np.float64)
        inv = 1.0 / (s[:, None] + alphas[None, :])  # (p, alphas)
        yc = y - y_mean
        b = U.T @ yc
        hat = np.empty((n, len(alphas)))
        for r in blocks:
            hat[r] = (U[r] * U[r]) @ inv + 1.0 / n  # leverage, the intercept's 1/n included
        loo = (yc[:, None] - U @ (b[:, None] * inv)) / (1.0 - hat)
        err = np.mean(loo**2, axis=0)
        self.alpha_ = float(alphas[int(np.argmin(err))])
        self.coef_ = V @ (b / (s + self.alpha_))
        self.intercept_ = y_mean - float(x_mean @ self.coef_)
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        # float32 rows are widened a block at a time: ``X @ coef_`` would first copy all of X to
        # float64 (268 MB for a 65,536-row scoring batch of 1,024 features; 25x the product's time),
        # and narrowing coef_ instead would change the predictions' last digits
        out = np.empty(X.shape[0])
        for s in range(0, X.shape[0], 2048):
            out[s : s + 2048] = X[s : s + 2048].astype(np.float64, copy=False) @ self.coef_
        return out + self.intercept_


def _member(kind: str, n_samples: int, n_features: int, gamma: float, n_rff: int, pca_dim: int,
            seed: int):
    """An unfitted member of ``kind``, sized for ``n_samples`` x ``n_features`` training data."""
    pca = min(pca_dim, n_features, max(1, n_samples - 1))
    if kind == "ridge":
        return RidgeCV(alphas=_ALPHAS)
    if kind == "knn":
        return NeighboursRegressor(n_neighbors=10)
    if kind == "rff":
        # An RBF kernel on L2-normalised embeddings is a smooth function of cosine similarity;
        # random features make it linear-time in n.
        return make_pipeline(RBFSampler(gamma=gamma, n_components=n_rff, random_state=seed),
                             GramRidgeCV(alphas=tuple(_ALPHAS)))
    if kind == "mlp":
        head = [PCA(n_components=pca, random_state=seed), _GlobalScale()]
        if n_samples < 2000:
            # small data: full-batch L-BFGS converges to a nearby optimum, where hundreds of tiny
            # Adam steps would amplify last-bit float differences into visibly different fits
            return make_pipeline(*head, MLPRegressor(hidden_layer_sizes=(128,), alpha=1e-2, solver="lbfgs",
                                                     max_iter=300, random_state=seed))
        batch = 256
        epochs = int(np.clip(np.ceil(3000 / np.ceil(n_samples / batch)), 20, 300))
        return make_pipeline(*head, MLPRegressor(
            hidden_layer_sizes=(128,), alpha=1e-2, batch_size=batch, learning_rate_init=2e-3,
            max_iter=epochs, early_stopping=True, n_iter_no_change=4, random_state=seed))
    if kind == "hgb":
        return make_pipeline(
            PCA(n_components=min(pca, 32), random_state=seed),
            HistGradientBoostingRegressor(max_iter=150, learning_rate=0.1, max_leaf_nodes=31,
                                          early_stopping=n_samples >= 1000, random_state=seed),
        )
    raise ValueError(f"unknown member kind {kind!r}; use one of {ALL_KINDS}")


def _neighbour_index(X: np.ndarray, exact_max_rows: int):
    """A FAISS index over the (n, d) float32 rows ``X``: exact up to ``exact_max_rows`` rows, beyond
    an IVF index over float16 vectors."""
    import faiss

    n, d = X.shape
    if n <= exact_max_rows:
        index = faiss.IndexFlatL2(d)
    else:
        # as many lists as the search index (indexer.ann): scoring the rest of a 1M table is
        # the cost that matters, and 4x the lists scan 4x fewer rows per query (measured on
        # 100k x 512, one thread: 0.31 s against 0.89 s per 5,000 queries, recall@10 0.999)
        nlist = int(np.clip(4 * np.sqrt(n), 16, 65536))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_L2)
        sample = np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)
        index.train(X[np.sort(sample)])
    index.add(X)
    return index


def _search(index, X: np.ndarray, k: int, nprobe: int):
    """(d2, nn) of the ``k`` nearest indexed rows of each row of float32 ``X``, nearest first (nn -1
    where an IVF search came back short). On an exact index the candidates' squared distances are
    recomputed row by row from the vectors: FAISS computes a batch of 250+ queries through BLAS and a
    smaller one by another loop, whose last bits differ, so without this a row's score would depend
    on the size of the batch it came in (``diagnose --score-new`` of 3 rows against the whole table).
    """
    import faiss

    if isinstance(index, faiss.IndexIVF):
        index.nprobe = int(nprobe)
        return index.search(X, k)
    d2, nn = index.search(X, k)
    xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    for s in range(0, len(X), 512):
        q, ids = X[s : s + 512], nn[s : s + 512]
        diff = xb[np.maximum(ids, 0)] - q[:, None, :]
        d2[s : s + 512] = np.where(ids >= 0, np.einsum("rkd,rkd->rk", diff, diff), np.inf)
    order = np.argsort(d2, axis=1, kind="stable")
    return np.take_along_axis(d2, order, axis=1), np.take_along_axis(nn, order, axis=1)


class NeighboursRegressor(RegressorMixin, BaseEstimator):
    """k-nearest-neighbour regression (inverse-distance weighted) on a FAISS index.

    The most local member: CLIP places near-duplicates together, so a sample's nearest fitted
    samples' losses are the most direct evidence of its own. Measured on the default world's
    held-out rows: Spearman 0.82 against 0.61-0.75 for any other single kind (BENCHMARKS.md).
    Exact search up to ``exact_max_rows`` fitted rows; beyond, an IVF index over float16 vectors
    (the fitted rows of a 1M-row table are at most ``--max-rows``, but scoring the rest of the table
    is 1M queries, and five folds' references in float32 would cost 0.8x the raw table's memory).
    The index holds the only copy of the fitted vectors; it is stored as FAISS's serialised bytes
    (see :func:`save_ensemble`).

    Inside a :class:`DiagnosisEnsemble` the kNN members share one index over all the ensemble's
    fitted rows (each member keeps only which of them are its own, ``rows_``): a row is searched
    once for all of them and each takes its own nearest rows among the candidates (see
    :func:`_knn_predictions`), which is what each would have found in an index of its own rows.
    One search instead of one per fold was most of the time of scoring a 1M-row table.

    Parameters
    ----------
    n_neighbors : int, default 10
    exact_max_rows : int, default 20000
        Beyond this many fitted rows an IVF index: scoring a 1M-row table is ~1M queries, and an exact
        scan of 25,000 references per query made the kNN members most of a 50,000-row fit's time.
    nprobe : int, default 4
        IVF lists searched per query. Recall of the true neighbours is not critical here: a near
        neighbour's loss is nearly as good evidence as the nearest one's. On the 1M-row benchmark
        tables (200,000 fitted rows, 1,788 lists) 4 lists find 91.5% of the 10 nearest rows against
        99.7% for 8, with the same out-of-fold Spearman and AUROC to the third digit on both, and
        diagnose the table 12% faster (163 -> 143 s; BENCHMARKS.md, issue 27). Tables under
        ``exact_max_rows`` fitted rows are searched exactly and do not see it.
    """

    def __init__(self, n_neighbors=10, exact_max_rows=20000, nprobe=4):
        self.n_neighbors = n_neighbors
        self.exact_max_rows = exact_max_rows
        self.nprobe = nprobe

    def fit(self, X, y):
        X, y = validate_data(self, X, y, y_numeric=True, dtype=[np.float32, np.float64])
        X = np.ascontiguousarray(X, dtype=np.float32)
        self.y_ = np.asarray(y, dtype=np.float64)
        self.n_neighbors_ = max(1, min(int(self.n_neighbors), len(X)))
        self.rows_ = None  # every row of its own index
        self._cache = {"index": _neighbour_index(X, int(self.exact_max_rows))}  # FAISS indexes do not pickle
        return self

    def _fit_shared(self, shared: dict, rows: np.ndarray, y: np.ndarray, n_features: int):
        """Fit on the rows ``rows`` (sorted, distinct) of an index shared with other members;
        ``shared`` holds it ({"index": ...}), ``y`` their targets."""
        self.n_features_in_ = n_features
        self.y_ = np.asarray(y, dtype=np.float64)
        self.rows_ = np.asarray(rows, dtype=np.int64)
        self.n_neighbors_ = max(1, min(int(self.n_neighbors), len(rows)))
        self._cache = shared
        return self

    def _positions(self, n_index: int) -> np.ndarray:
        """(n_index,) int: this member's position of each indexed row, -1 for rows not its own."""
        if self.rows_ is None:
            return np.arange(n_index)
        pos = np.full(n_index, -1, dtype=np.int64)
        pos[self.rows_] = np.arange(len(self.rows_))
        return pos

    def __getstate__(self):
        import faiss

        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns __dict__ itself
        cache = state.pop("_cache", None)
        if cache is not None and self.rows_ is None:  # a shared index is stored by its ensemble
            state["_index_bytes"] = faiss.serialize_index(cache["index"])
        return state

    def __setstate__(self, state):
        import faiss

        blob = state.pop("_index_bytes", None)
        state.setdefault("rows_", None)  # stored before indexes were shared
        super().__setstate__(state)
        if blob is not None:
            self._cache = {"index": faiss.deserialize_index(blob)}

    def predict(self, X):
        check_is_fitted(self)
        X = np.ascontiguousarray(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]),
                                 dtype=np.float32)
        return _knn_predictions([self], X)[0]

    def _from_candidates(self, d2, nn, pos):
        """(m,) predictions from the candidates (d2, nn) of an index; ``pos`` from :meth:`_positions`.
        Also (m,) bool: rows with fewer than ``n_neighbors_`` own rows among the candidates."""
        mine = pos[np.maximum(nn, 0)]
        mine[nn < 0] = -1
        own = mine >= 0
        rank = np.cumsum(own, axis=1)
        keep = own & (rank <= self.n_neighbors_)
        d = np.sqrt(np.maximum(d2, 0.0))
        w = np.where(keep, 1.0 / np.maximum(d, 1e-6), 0.0)
        exact = keep & (d <= 1e-6)  # a query equal to fitted samples takes their mean
        w = np.where(exact.any(axis=1, keepdims=True), exact.astype(float), w)
        vals = self.y_[np.maximum(mine, 0)]
        wsum = w.sum(axis=1)
        out = np.where(wsum > 0, (w * vals).sum(axis=1) / np.maximum(wsum, 1e-300), self.y_.mean())
        return out, rank[:, -1] < self.n_neighbors_


def _knn_predictions(members: list, X: np.ndarray) -> np.ndarray:
    """(len(members), m) predictions of kNN members that search one index (their ``_cache``) for
    float32 rows ``X``: one search, each member taking its own nearest rows among the candidates.
    Rows where a member found fewer than its ``n_neighbors_`` own rows among them are searched again
    with 4x the candidates (until the index is exhausted or an IVF search comes back short), so each
    member gets what a search of its own rows would give."""
    index = members[0]._cache["index"]
    n_index = int(index.ntotal)
    pos = [m._positions(n_index) for m in members]
    share = min(len(m.y_) for m in members) / max(n_index, 1)
    k = min(n_index, int(np.ceil(2 * max(m.n_neighbors_ for m in members) / max(share, 1e-9))))
    out = np.empty((len(members), len(X)))
    todo = None  # every row, in slices (views, not copies: this runs on batches of 65,536 rows)
    while todo is None or len(todo):
        again = []
        for s in range(0, len(X) if todo is None else len(todo), 65536):
            rows = np.arange(s, min(len(X), s + 65536)) if todo is None else todo[s : s + 65536]
            d2, nn = _search(index, X[s : s + 65536] if todo is None else X[rows], k, members[0].nprobe)
            short = np.zeros(len(rows), dtype=bool)
            for j, m in enumerate(members):
                out[j, rows], short_j = m._from_candidates(d2, nn, pos[j])
                short |= short_j
            # another search helps only where every candidate came back and more rows exist
            again.append(rows[short & (nn[:, -1] >= 0)] if k < n_index else rows[:0])
        todo, k = np.concatenate(again), min(n_index, 4 * k)
    return out


class DiagnosisEnsemble(RegressorMixin, BaseEstimator):
    """Predicts a sample's loss from its embedding, with member disagreement as uncertainty.

    Parameters
    ----------
    n_members : int, default 4
        Members per fold; member ``i`` is of kind ``kinds[i % len(kinds)]``.
    n_folds : int, default 5
        Folds for out-of-fold scoring (at least 2; capped at the number of samples).
    kinds : tuple of str, default ("knn", "rff", "hgb", "mlp")
        Member kinds to cycle through.
    bootstrap : bool, default True
        Train each member on a bootstrap sample of its folds (so repeated kinds differ, and the spread
        reflects data uncertainty as well as model choice).
    target : {"log1p", "identity"}, default "log1p"
        Transform of the loss the members fit; ``log1p`` tames the heavy tail of per-sample losses.
    n_rff : int, default 1024
        Random Fourier features of the ``rff`` members.
    pca_dim : int, default 64
        PCA projection of the ``mlp`` members (the ``hgb`` members use at most 32 dimensions).
    rff_max_rows : int or None, default 20000
        The ``rff`` members fit a random subset of at most this many of their rows: their ridge
        solve holds ~24 KB per row (1,024 features in float64, three copies), 3.9 GB at 160,000
        rows, and 1,024 features gain little from more rows (BENCHMARKS.md, issue 4 "Scale").
    random_state : int, RandomState or None, default None
    verbose : bool, default False
        Show a progress bar on stderr while fitting.
    n_jobs : int or None, default -1
        Threads that fit members and score rows in parallel (-1: one per CPU; None or 1: one). Fits do
        not depend on it; predictions only in float rounding (BLAS on differently sized row blocks).

    Attributes
    ----------
    estimators_ : list of list of fitted estimators, shape (n_folds_, n_members)
    fold_ : (n,) int8, the fold that held each training sample out
    oof_prediction_, oof_std_ : (n,) float64, loss units; the out-of-fold mean and member spread
    gamma_ : float, the RBF width (1 / median squared distance between samples)
    shift_ : float, subtracted from y before the transform (0 unless y has negatives)
    scale_ : float, maps ``expm1`` of log-space predictions to mean loss (see the module doc)
    n_folds_ : int, folds actually used
    z_range_ : (float, float), the transformed targets' range; member predictions are clipped to it
    """

    def __init__(self, n_members=4, n_folds=5, kinds=KINDS, bootstrap=True, target="log1p", n_rff=1024,
                 pca_dim=64, rff_max_rows=20000, random_state=None, verbose=False, n_jobs=-1):
        self.n_members = n_members
        self.n_folds = n_folds
        self.kinds = kinds
        self.bootstrap = bootstrap
        self.target = target
        self.n_rff = n_rff
        self.pca_dim = pca_dim
        self.rff_max_rows = rff_max_rows
        self.random_state = random_state
        self.verbose = verbose
        self.n_jobs = n_jobs

    # ---- target transform ----------------------------------------------------------------------
    def _forward(self, y):
        return np.log1p(y - self.shift_) if self.target == "log1p" else y

    def _inverse(self, z):
        if self.target == "log1p":
            return self.scale_ * np.expm1(z) + self.shift_
        return z

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, X, y):
        """Fit K x M members on (n, d) float embeddings and (n,) losses; returns self."""
        # float32 embeddings stay float32 (half the memory at 1M rows); anything else becomes float64
        X, y = validate_data(self, X, y, y_numeric=True, dtype=[np.float64, np.float32], order="C")
        n, d = X.shape
        if n < 2:
            raise ValueError(f"DiagnosisEnsemble needs at least 2 samples to fit out-of-fold, got {n} sample.")
        if self.target not in ("log1p", "identity"):
            raise ValueError(f"target must be 'log1p' or 'identity', got {self.target!r}.")
        if int(self.n_members) < 1 or int(self.n_folds) < 2:
            raise ValueError("n_members must be >= 1 and n_folds >= 2.")
        y = y.astype(np.float64)
        rng = check_random_state(self.random_state)
        self.shift_ = float(min(0.0, y.min()))
        self.scale_ = 1.0
        z = self._forward(y)
        # Members may extrapolate wildly (an MLP far from its data, a text embedding off the image
        # manifold); a loss outside the observed range is not evidence of anything, so clip to it.
        self.z_range_ = (float(z.min()), float(z.max()))
        self.gamma_ = _rbf_gamma(X, rng)
        self.n_folds_ = min(int(self.n_folds), n)
        kinds = tuple(self.kinds) or KINDS

        folds = KFold(self.n_folds_, shuffle=True, random_state=rng.randint(2**31 - 1))
        self.fold_ = np.empty(n, dtype=np.int8)
        # Every member's kind, seed and rows are drawn first, in one order, so members can then be
        # fitted in any order (in parallel) with the same result.
        plan = []  # (fold, member, kind, seed, rows)
        for k, (tr, te) in enumerate(folds.split(X)):
            self.fold_[te] = k
            for i in range(int(self.n_members)):
                seed = rng.randint(2**31 - 1)
                kind = kinds[i % len(kinds)]
                idx = rng.choice(tr, size=len(tr), replace=True) if self.bootstrap else tr
                if kind == "knn":
                    idx = np.unique(idx)  # a repeated neighbour adds no evidence, only memory
                elif kind == "rff" and self.rff_max_rows and len(idx) > int(self.rff_max_rows):
                    idx = rng.choice(idx, size=int(self.rff_max_rows), replace=False)
                plan.append((k, i, kind, seed, idx))
        shared = None
        knn = _member("knn", n, d, self.gamma_, int(self.n_rff), int(self.pca_dim), 0)
        if isinstance(knn, NeighboursRegressor) and any(kind == "knn" for _, _, kind, _, _ in plan):
            # one index over all fitted rows for all kNN members (see NeighboursRegressor)
            with threadpool_limits(limits=self._threads(), user_api="openmp"):
                shared = {"index": _neighbour_index(np.ascontiguousarray(X, dtype=np.float32),
                                                    int(knn.exact_max_rows))}
        self._knn = shared
        z_oof = np.empty((int(self.n_members), n))
        members = [[None] * int(self.n_members) for _ in range(self.n_folds_)]
        bar = _progress(len(plan), self.verbose, "fitting ensemble")

        # an rff member's ridge solve holds ~24 KB per row (480 MB at 20,000 rows): one at a time, so
        # that fitting in parallel does not raise the peak memory of a large fit
        one_rff = threading.Lock()

        def fit_one(task):
            k, i, kind, seed, idx = task
            est = clone(_member(kind, len(idx), d, self.gamma_, int(self.n_rff), int(self.pca_dim), seed))
            if shared is not None and isinstance(est, NeighboursRegressor):
                est._fit_shared(shared, idx, z[idx], d)
            else:
                with one_rff if kind == "rff" else contextlib.nullcontext():
                    est.fit(X[idx], z[idx])
            te = self.fold_ == k
            z_oof[i, te] = np.clip(est.predict(X[te]), *self.z_range_)
            members[k][i] = est
            bar.update(1)

        with warnings.catch_warnings(), self._member_threads():
            # small early-stopped MLPs routinely stop before "convergence"; that is intended.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._map(fit_one, plan)
        self.estimators_ = members
        bar.close()
        if self.target == "log1p":
            # least-squares scale (no intercept, so zero stays zero) of expm1 predictions onto loss
            p = np.expm1(z_oof).mean(axis=0)
            denom = float(p @ p)
            self.scale_ = float(np.clip((y - self.shift_) @ p / denom, 0.1, 10.0)) if denom > 0 else 1.0
        member_loss = self._inverse(z_oof)
        self.oof_prediction_ = member_loss.mean(axis=0)
        self.oof_std_ = member_loss.std(axis=0)
        return self

    # ---- threads -------------------------------------------------------------------------------
    def _threads(self) -> int:
        if self.n_jobs is None:
            return 1
        jobs = int(self.n_jobs)
        return max(1, os.cpu_count() or 1) if jobs < 0 else max(1, jobs)

    def _member_threads(self):
        """Each member computes with one BLAS thread (process-wide), whether members run in parallel
        (``n_jobs`` > 1: the threads do not fight for the cores) or not: a multi-threaded BLAS rounds
        differently, which an L-BFGS MLP amplifies into a visibly different fit, so one thread each
        makes the result independent of ``n_jobs``."""
        return threadpool_limits(limits=1, user_api="blas")

    def _map(self, fn, items):
        """``fn`` over ``items`` on ``n_jobs`` threads (the work is in BLAS, FAISS and Cython code,
        which release the GIL), each with one OpenMP thread (see :func:`_one_openmp_thread`: an
        OpenMP limit holds only in the thread that sets it); exceptions propagate."""
        def one(item):
            with _one_openmp_thread():
                fn(item)

        threads = min(self._threads(), len(items))
        if threads <= 1:
            for item in items:
                one(item)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(one, items):
                pass

    def __getstate__(self):
        import faiss

        state = dict(super().__getstate__())
        shared = state.pop("_knn", None)
        if shared is not None:
            state["_knn_index_bytes"] = faiss.serialize_index(shared["index"])
        return state

    def __setstate__(self, state):
        import faiss

        blob = state.pop("_knn_index_bytes", None)
        super().__setstate__(state)
        self._knn = None
        if blob is not None:
            self._knn = {"index": faiss.deserialize_index(blob)}
            for k, i in self._shared_knn():
                self.estimators_[k][i]._cache = self._knn

    def _shared_knn(self) -> list[tuple[int, int]]:
        """(fold, member) of the kNN members that search the ensemble's shared index."""
        return [(k, i) for k, members in enumerate(getattr(self, "estimators_", [])) for i, est in enumerate(members)
                if isinstance(est, NeighboursRegressor) and getattr(est, "rows_", None) is not None]

    # ---- predict -------------------------------------------------------------------------------
    def member_predictions(self, X):
        """(n_folds_, n_members, n) float64: every member's prediction in loss units.

        The kNN members that share an index search it once per row for all of them; the rows are
        split over ``n_jobs`` threads."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32], order="C")
        out = np.empty((len(self.estimators_), len(self.estimators_[0]), X.shape[0]))
        shared = self._shared_knn()
        X32 = np.ascontiguousarray(X, dtype=np.float32) if shared else None

        def part(rows: slice):
            if shared:
                knn = _knn_predictions([self.estimators_[k][i] for k, i in shared], X32[rows])
                for j, (k, i) in enumerate(shared):
                    out[k, i, rows] = knn[j]
            for k, members in enumerate(self.estimators_):
                for i, est in enumerate(members):
                    if (k, i) not in shared:
                        out[k, i, rows] = est.predict(X[rows])

        chunks = max(1, min(self._threads(), len(X) // 1024))
        with self._member_threads():
            bounds = np.linspace(0, len(X), chunks + 1).astype(int)
            self._map(part, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        return self._inverse(np.clip(out, *self.z_range_))

    def predict(self, X, return_std=False):
        """(n, d) embeddings -> (n,) predicted loss; with ``return_std`` also the member spread.

        The spread is the standard deviation across the members of a fold, root-mean-squared over
        folds, so it is on the same scale as ``oof_std_``.
        """
        check_is_fitted(self)
        P = self.member_predictions(X)
        mean = P.mean(axis=(0, 1))
        if not return_std:
            return mean
        std = np.sqrt(P.var(axis=1).mean(axis=0))
        return mean, std


#: The only types a stored ensemble may hold beyond skops' own safe list (numpy arrays and
#: scikit-learn estimators): ours, the trees of gradient boosting and the Adam state a fitted
#: MLP keeps (members fitted on 2,000+ rows; plain arrays and floats, set as attributes). Nothing
#: else is instantiated.
TRUSTED_TYPES = (
    "diagnosis.ensemble.DiagnosisEnsemble",
    "diagnosis.ensemble.NeighboursRegressor",
    "diagnosis.ensemble.GramRidgeCV",
    "diagnosis.ensemble._GlobalScale",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
)


class UnsafeEnsembleFile(Exception):
    """A stored ensemble that cannot be read safely (corrupt, or holding a type not trusted)."""


def save_ensemble(ens: DiagnosisEnsemble, path) -> None:
    """Write a fitted ensemble as a skops file: a zip of JSON (types, parameters) and ``.npy`` arrays
    (no pickles); the FAISS indexes of the kNN members as their serialised bytes."""
    import skops.io as sio

    check_is_fitted(ens)
    sio.dump(ens, path)


def load_ensemble_file(path) -> DiagnosisEnsemble:
    """Read a file written by :func:`save_ensemble` without running code from it: skops rebuilds only
    numpy arrays, scikit-learn estimators and :data:`TRUSTED_TYPES`, and refuses a file naming any
    other type (raises :class:`UnsafeEnsembleFile`, as for a corrupt file)."""
    import skops.io as sio

    try:
        untrusted = sorted(set(sio.get_untrusted_types(file=path)) - set(TRUSTED_TYPES))
        if untrusted:
            raise UnsafeEnsembleFile(f"it names types that are not trusted ({', '.join(untrusted[:3])})")
        ens = sio.load(path, trusted=list(TRUSTED_TYPES))
    except UnsafeEnsembleFile:
        raise
    except Exception as e:  # a corrupt zip, JSON or array: skops raises many kinds
        raise UnsafeEnsembleFile(f"it could not be read: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
    if not isinstance(ens, DiagnosisEnsemble):
        raise UnsafeEnsembleFile(f"it holds a {type(ens).__name__}, not a DiagnosisEnsemble")
    return ens


def _rbf_gamma(X: np.ndarray, rng: np.random.RandomState, pairs: int = 2000) -> float:
    """1 / median squared distance between random pairs (the usual kernel-width heuristic)."""
    n = X.shape[0]
    a, b = rng.randint(0, n, pairs), rng.randint(0, n, pairs)
    d2 = np.sum((X[a].astype(np.float64) - X[b]) ** 2, axis=1)
    med = float(np.median(d2[d2 > 0])) if np.any(d2 > 0) else 1.0
    return 1.0 / med


def _one_openmp_thread():
    """Gradient boosting's OpenMP threads busy-wait; on a few shared cores that made fits 10x
    slower than one thread (measured on the 2-core build machine), so members use one."""
    return threadpool_limits(limits=1, user_api="openmp")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, show: bool, desc: str):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="member", leave=False)
