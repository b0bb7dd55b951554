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

import logging
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
                             RidgeCV(alphas=_ALPHAS))
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

    Parameters
    ----------
    n_neighbors : int, default 10
    exact_max_rows : int, default 20000
        Beyond this many fitted rows an IVF index: scoring a 1M-row table is ~1M queries, and an exact
        scan of 25,000 references per query made the kNN members most of a 50,000-row fit's time.
    nprobe : int, default 8
        IVF lists searched per query (recall of the true neighbours is not critical here: a near
        neighbour's loss is nearly as good evidence as the nearest one's).
    """

    def __init__(self, n_neighbors=10, exact_max_rows=20000, nprobe=8):
        self.n_neighbors = n_neighbors
        self.exact_max_rows = exact_max_rows
        self.nprobe = nprobe

    def fit(self, X, y):
        import faiss

        X, y = validate_data(self, X, y, y_numeric=True, dtype=[np.float32, np.float64])
        X = np.ascontiguousarray(X, dtype=np.float32)
        n, d = X.shape
        self.y_ = np.asarray(y, dtype=np.float64)
        self.n_neighbors_ = max(1, min(int(self.n_neighbors), n))
        if n <= self.exact_max_rows:
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
        self._cache = {"index": index}  # a holder: FAISS indexes do not pickle (see __getstate__)
        return self

    def _faiss_index(self):
        import faiss

        index = self._cache["index"]
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = int(self.nprobe)
        return index

    def __getstate__(self):
        import faiss

        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns __dict__ itself
        cache = state.pop("_cache", None)
        if cache is not None:
            state["_index_bytes"] = faiss.serialize_index(cache["index"])
        return state

    def __setstate__(self, state):
        import faiss

        blob = state.pop("_index_bytes", None)
        super().__setstate__(state)
        if blob is not None:
            self._cache = {"index": faiss.deserialize_index(blob)}

    def predict(self, X):
        check_is_fitted(self)
        X = np.ascontiguousarray(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]),
                                 dtype=np.float32)
        out = np.empty(len(X))
        index = self._faiss_index()
        for s in range(0, len(X), 65536):
            d2, nn = index.search(X[s : s + 65536], self.n_neighbors_)
            found = nn >= 0  # an IVF search can come back short
            d = np.sqrt(np.maximum(d2, 0.0))
            w = np.where(found, 1.0 / np.maximum(d, 1e-6), 0.0)
            exact = found & (d <= 1e-6)  # a query equal to fitted samples takes their mean
            w = np.where(exact.any(axis=1, keepdims=True), exact.astype(float), w)
            vals = self.y_[np.where(found, nn, 0)]
            wsum = w.sum(axis=1)
            out[s : s + 65536] = np.where(wsum > 0, (w * vals).sum(axis=1) / np.maximum(wsum, 1e-300),
                                          self.y_.mean())
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
                 pca_dim=64, rff_max_rows=20000, random_state=None, verbose=False):
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
        z_oof = np.empty((int(self.n_members), n))
        self.estimators_ = []
        bar = _progress(self.n_folds_ * int(self.n_members), self.verbose, "fitting ensemble")
        for k, (tr, te) in enumerate(folds.split(X)):
            self.fold_[te] = k
            fold_members = []
            for i in range(int(self.n_members)):
                seed = rng.randint(2**31 - 1)
                kind = kinds[i % len(kinds)]
                idx = rng.choice(tr, size=len(tr), replace=True) if self.bootstrap else tr
                if kind == "knn":
                    idx = np.unique(idx)  # a repeated neighbour adds no evidence, only memory
                elif kind == "rff" and self.rff_max_rows and len(idx) > int(self.rff_max_rows):
                    idx = rng.choice(idx, size=int(self.rff_max_rows), replace=False)
                est = clone(_member(kind, len(idx), d, self.gamma_, int(self.n_rff),
                                    int(self.pca_dim), seed))
                with warnings.catch_warnings(), _one_openmp_thread():
                    # small early-stopped MLPs routinely stop before "convergence"; that is intended.
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    est.fit(X[idx], z[idx])
                    z_oof[i, te] = np.clip(est.predict(X[te]), *self.z_range_)
                fold_members.append(est)
                bar.update(1)
            self.estimators_.append(fold_members)
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

    # ---- predict -------------------------------------------------------------------------------
    def member_predictions(self, X):
        """(n_folds_, n_members, n) float64: every member's prediction in loss units."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32], order="C")
        out = np.empty((len(self.estimators_), len(self.estimators_[0]), X.shape[0]))
        with _one_openmp_thread():
            for k, members in enumerate(self.estimators_):
                for i, est in enumerate(members):
                    out[k, i] = np.clip(est.predict(X), *self.z_range_)
        return self._inverse(out)

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
