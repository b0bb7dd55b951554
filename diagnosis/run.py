"""``llm2loss diagnose``: fit the ensemble on a database and write ``predicted_loss`` onto every row.

Scale strategy (a 1M x 512 table on a 2-core, 24 GiB machine): the embeddings are read in record
batches into one (n, d) float32 array (2 GiB at 1M x 512), the ensemble is fitted on a stratified
subsample of at most ``max_rows`` rows (default 200,000, stratified on loss quantiles so the heavy
tail is kept), and every row is scored: fitted rows out-of-fold, the others (never seen by any member)
by the full ensemble, in batches. ``scripts/bench_diagnose.py`` measures what the subsample costs.

Files written under ``DIR/diagnosis/``: ``ensemble.skops`` (the fitted estimator as arrays and
parameters, read back without unpickling: see :func:`diagnosis.ensemble.load_ensemble_file`), ``image_mean.npy``
((d,) float32, mean image embedding, for the modality gap) and ``info.json``, stamped with the
``data_version``, row count, CLIP identity and set of ids it was fitted on, so a stale ensemble is
detected, and with both files' size and SHA-256, verified on every load: a damaged one is refused.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from diagnosis.ensemble import DiagnosisEnsemble, UnsafeEnsembleFile, load_ensemble_file, save_ensemble
from diagnosis.metrics import no_skill, quality, undefined_why
from indexer import schema as S
from indexer.errors import Unavailable, UserError
from indexer.integrity import checksum_problem, file_checksum, id_set_digest, write_error
from indexer.store import Database, write_json_atomic, writer_lock

log = logging.getLogger(__name__)

DEFAULT_MEMBERS = 4  # one of each default kind (diagnosis.ensemble.KINDS)
DEFAULT_FOLDS = 5
DEFAULT_MAX_ROWS = 200_000
MIN_ROWS = 20
#: Split values meaning "the model did not train on this row".
HELD_OUT_SPLITS = ("test", "val", "valid", "validation", "holdout", "heldout", "dev")
ENSEMBLE_FILE = "ensemble.skops"
#: Written by llm2loss before the skops format; a pickle, so never loaded.
LEGACY_ENSEMBLE_FILE = "ensemble.joblib"
INFO_FILE = "info.json"
IMAGE_MEAN_FILE = "image_mean.npy"
SCORE_BATCH = 65536


def open_db(db) -> Database:
    return db if isinstance(db, Database) else Database(db)


@dataclass
class DiagnoseReport:
    """What ``diagnose`` did and how good the out-of-fold predictions are.

    ``spearman``, ``r2`` and ``auroc_top10`` compare ``predicted_loss`` with ``loss`` on every row that
    has a loss, each predicted by members that never trained on it; ``test`` repeats them on the rows
    whose split is ``test`` (None without such rows).
    """

    path: str
    rows: int
    fitted_rows: int
    rows_with_loss: int
    members: int
    folds: int
    spearman: float
    r2: float
    auroc_top10: float
    seconds: float
    data_version: int
    test: dict | None = None
    fit_split: str = "all"
    timings: dict = field(default_factory=dict)
    #: why a quality figure is undefined (NaN), for a person; None when all are defined
    quality_note: str | None = None
    #: unlabeled rows (``split = "pool"``): scored by the full ensemble, never fitted
    pool_rows: int = 0
    #: one sentence when the out-of-fold figures are within noise of chance
    #: (:func:`diagnosis.metrics.no_skill`): explain then names no mode; None when the ensemble has skill
    no_skill: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"diagnosed {self.rows} rows in {self.seconds:.1f}s: {self.members} members x {self.folds} folds "
            f"fitted on {self.fitted_rows} {'held-out ' if self.fit_split == 'held-out' else ''}rows"
            + ("" if self.fitted_rows == self.rows_with_loss else " (the rest scored by the full ensemble)"),
            f"out-of-fold quality on {self.rows_with_loss} rows: Spearman {_fig(self.spearman)}, "
            f"R^2 {_fig(self.r2)}, AUROC(top 10% losses) {_fig(self.auroc_top10)}",
        ]
        if self.quality_note:
            lines.append(f"  (undefined figures: {self.quality_note})")
        if self.no_skill:
            lines.append(self.no_skill[0].upper() + self.no_skill[1:])
        if self.pool_rows:
            lines.append(f"unlabeled pool: {self.pool_rows} rows scored (never fitted); `llm2loss curate` plans which to label")
        if self.test:
            lines.append(
                f"test split ({self.test['n']} rows): Spearman {_fig(self.test['spearman'])}, "
                f"R^2 {_fig(self.test['r2'])}, AUROC(top 10% losses) {_fig(self.test['auroc_top10'])}"
            )
        lines.append(f"predicted_loss and predicted_loss_std written; ensemble saved in {self.path}")
        return "\n".join(lines)


def _fig(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "undefined"


def read_training_data(db: Database, batch_rows: int | None = None, progress: bool = True):
    """Stream the table: ids (n,) object, X (n, d) float32, loss (n,) float64 (NaN where null),
    split (n,) object (None where null)."""
    snap = db.snapshot()
    ids, loss, split = read_labels(db, snap, batch_rows)
    return ids, read_embeddings(db, snap, len(ids), batch_rows, progress), loss, split


def read_embeddings(db: Database, snapshot, n: int, batch_rows: int | None = None,
                    progress: bool = False) -> np.ndarray:
    """(n, d) float32: every embedding of a snapshot of ``n`` rows, in table order."""
    X = np.empty((n, db.embed_dim), dtype=np.float32)
    bar = _bar(n, progress, "reading embeddings")
    for rows, emb in embedding_batches(db, snapshot, batch_rows):
        X[rows] = emb
        bar.update(len(rows))
    bar.close()
    return X


def read_labels(db: Database, snapshot, batch_rows: int | None = None):
    """ids (n,) object, loss (n,) float64 (NaN where null), split (n,) object of a table snapshot,
    without its embeddings (tens of bytes per row, where an embedding is kilobytes)."""
    n = snapshot.count_rows()
    ids = np.empty(n, dtype=object)
    loss = np.full(n, np.nan)
    split = np.empty(n, dtype=object)
    i = 0
    for b in db.iter_batches([S.ID, S.LOSS, S.SPLIT], batch_rows or SCORE_BATCH, snapshot=snapshot):
        m = b.num_rows
        ids[i : i + m] = b.column(S.ID).to_numpy(zero_copy_only=False)
        loss[i : i + m] = b.column(S.LOSS).to_numpy(zero_copy_only=False).astype(np.float64)
        split[i : i + m] = b.column(S.SPLIT).to_pylist()
        i += m
    return ids[:i], loss[:i], split[:i]


def embedding_batches(db: Database, snapshot, batch_rows: int | None = None):
    """(row numbers, (m, d) float32 embeddings) of a snapshot, in table order, ``batch_rows`` rows at a
    time (the last batch may be shorter). Lance yields at most one fragment per record batch, and a
    freshly indexed table has thousands of 1,024-row fragments: they are gathered into full batches
    so the ensemble is called once per 65,536 rows, not once per fragment."""
    size, d = batch_rows or SCORE_BATCH, db.embed_dim
    pending, count, start = [], 0, 0
    for b in db.iter_batches([S.EMBEDDING], size, snapshot=snapshot):
        emb = b.column(S.EMBEDDING)
        if emb.null_count:
            raise UserError(f"{emb.null_count} rows of {db.path} have no embedding; re-run `llm2loss index`.")
        pending.append(np.asarray(emb.values.to_numpy()).reshape(b.num_rows, d))
        count += b.num_rows
        if count >= size:
            yield np.arange(start, start + count), np.concatenate(pending)
            pending, start, count = [], start + count, 0
    if pending:
        yield np.arange(start, start + count), np.concatenate(pending)


def stratified_subsample(loss: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly ``k`` of ``loss``'s rows, drawn proportionally from 20 loss-quantile
    strata (so the heavy tail is represented at its true rate, not by luck)."""
    n = len(loss)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    edges = np.quantile(loss, np.linspace(0, 1, 21)[1:-1])
    strata = np.searchsorted(edges, loss, side="right")
    labels, sizes = np.unique(strata, return_counts=True)
    # exactly k rows: proportional shares, the remainder to the largest fractional parts
    share = k * sizes / n
    take = np.floor(share).astype(int)
    take[np.argsort(-(share - take))[: k - take.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(strata == s), size=t, replace=False)
              for s, t in zip(labels, take, strict=True)]
    return np.sort(np.concatenate(picked))


def _choose_fit_rows(db: Database, loss: np.ndarray, split: np.ndarray, fit_split: str, max_rows: int,
                     random_state: int) -> tuple[np.ndarray, bool]:
    """(sorted row numbers to fit on, whether they are the held-out rows); see :func:`diagnose`."""
    has_loss = np.isfinite(loss)
    held_out = np.isin(split, HELD_OUT_SPLITS)
    if fit_split == "auto":
        # A model's losses on its own training rows measure memorisation, not failure: a planted
        # spurious correlation has LOW training loss and high loss elsewhere. When the table has
        # both training and held-out rows, fit on the held-out ones and score the rest.
        use_held_out = (held_out & has_loss).sum() >= MIN_ROWS and (has_loss & (split == "train")).any()
    elif fit_split in ("held-out", "all"):
        use_held_out = fit_split == "held-out"
    else:
        raise UserError(f"fit split {fit_split!r} is unknown; use 'auto', 'held-out' or 'all'.")
    if use_held_out and (held_out & has_loss).sum() < MIN_ROWS:
        raise UserError(f"{db.path} has fewer than {MIN_ROWS} held-out rows with a loss; fit on 'all' rows.")
    fit_pool = has_loss & held_out if use_held_out else has_loss
    if use_held_out:
        log.info("fitting on the %d held-out rows (split in %s); training rows are scored, not fitted",
                 int(fit_pool.sum()), sorted(HELD_OUT_SPLITS))
    with_loss = np.flatnonzero(fit_pool)
    fit_rows = with_loss[stratified_subsample(loss[with_loss], max_rows, random_state)]
    if len(fit_rows) < len(with_loss):
        log.info("fitting on a stratified subsample of %d of %d rows", len(fit_rows), len(with_loss))
    return fit_rows, bool(use_held_out)


def _read_rows(db: Database, snap, rows: np.ndarray, n: int, progress: bool) -> np.ndarray:
    """(len(rows), d) float32: the embeddings of the sorted row numbers ``rows`` of a snapshot of
    ``n`` rows, streamed (only these rows are kept)."""
    X = np.empty((len(rows), db.embed_dim), dtype=np.float32)
    wanted = np.zeros(n, dtype=bool)
    wanted[rows] = True
    bar = _bar(n, progress, "reading embeddings")
    seen = 0
    for batch_rows, emb in embedding_batches(db, snap):
        keep = wanted[batch_rows]
        X[np.searchsorted(rows, batch_rows[keep])] = emb[keep]
        seen += len(batch_rows)
        bar.update(len(batch_rows))
    bar.close()
    if seen != n:  # one pinned snapshot: the passes cannot disagree unless Lance does
        raise RuntimeError(f"read {seen} embeddings but {n} labels from one snapshot of {db.path}")
    return X


def _score_the_rest(db: Database, snap, ens: DiagnosisEnsemble, fit_rows: np.ndarray, pred: np.ndarray,
                    std: np.ndarray, progress: bool) -> np.ndarray:
    """Fill ``pred``/``std`` for every row not in ``fit_rows`` with the full ensemble, streaming the
    snapshot's embeddings; returns their mean (d,) float32 over all rows."""
    fitted = np.zeros(len(pred), dtype=bool)
    fitted[fit_rows] = True
    image_sum = np.zeros(db.embed_dim)
    rest = len(pred) - len(fit_rows)
    bar = _bar(rest, progress and rest > 0, "scoring unfitted rows")
    for rows, emb in embedding_batches(db, snap):
        image_sum += emb.sum(axis=0, dtype=np.float64)
        score = ~fitted[rows]
        if score.any():
            pred[rows[score]], std[rows[score]] = ens.predict(emb[score], return_std=True)
            bar.update(int(score.sum()))
    bar.close()
    return (image_sum / len(pred)).astype(np.float32)


def diagnose(db, members: int | None = None, folds: int | None = None, max_rows: int | None = None,
             progress: bool = True, random_state: int = 0, fit_split: str = "auto") -> DiagnoseReport:
    """Fit the diagnosis ensemble on ``db`` and write ``predicted_loss``/``predicted_loss_std``.

    ``members`` per fold (default 4), ``folds`` (default 5), ``max_rows``: fit on at most this many
    rows (default 200,000; every row is still scored). ``fit_split``: ``"auto"`` fits on the
    held-out rows (split test/val/...) when the table also has training rows, ``"held-out"`` always,
    ``"all"`` on every row with a loss. Refuses a table with fewer than 20 losses.
    """
    db = open_db(db)
    # the whole run under the writer lock: a second diagnose (or an index) meanwhile is refused
    with writer_lock(db.path, "diagnose"):
        return _diagnose(db, members, folds, max_rows, progress, random_state, fit_split)


def _diagnose(db: Database, members, folds, max_rows, progress, random_state, fit_split) -> DiagnoseReport:
    t0 = time.perf_counter()
    members = DEFAULT_MEMBERS if members is None else int(members)
    folds = DEFAULT_FOLDS if folds is None else int(folds)
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else int(max_rows)
    if members < 1:
        raise UserError(f"--members {members} must be at least 1.")
    if folds < 2:
        raise UserError(f"--folds {folds} must be at least 2 (out-of-fold scoring needs a held-out fold).")
    if max_rows < MIN_ROWS:
        raise UserError(f"--max-rows {max_rows} is too small; fit on at least {MIN_ROWS} rows.")
    data_version, clip = db.data_version, db.clip_identity
    timings = {}

    # Three passes over one snapshot, so memory follows the fitted rows, not the table: labels
    # (no embeddings), the embeddings of the rows to fit, then every embedding again in batches for
    # scoring. Holding all of X made diagnose peak at 2.1x the raw vectors on a 1M x 512 table.
    snap = db.snapshot()
    ids, loss, split = read_labels(db, snap)
    is_test = split == "test"
    has_loss = np.isfinite(loss)
    n_loss = int(has_loss.sum())
    if n_loss < MIN_ROWS:
        raise UserError(
            f"{db.path} has {n_loss} rows with a loss; the ensemble needs at least {MIN_ROWS}: "
            "index the data with a `loss` column, --predictions or --model."
        )
    if (loss[has_loss] < 0).any():
        log.warning("some losses are negative; the log1p target is shifted to cover them")
    fit_rows, use_held_out = _choose_fit_rows(db, loss, split, fit_split, max_rows, random_state)
    X_fit = _read_rows(db, snap, fit_rows, len(ids), progress)
    timings["read_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    ens = DiagnosisEnsemble(n_members=members, n_folds=folds, random_state=random_state, verbose=progress)
    ens.fit(X_fit, loss[fit_rows])
    del X_fit
    timings["fit_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pred = np.empty(len(ids))
    std = np.empty(len(ids))
    pred[fit_rows], std[fit_rows] = ens.oof_prediction_, ens.oof_std_
    image_mean = _score_the_rest(db, snap, ens, fit_rows, pred, std, progress)
    timings["score_s"] = time.perf_counter() - t

    q = quality(loss[has_loss], pred[has_loss])
    test_mask = is_test & has_loss
    q_test = quality(loss[test_mask], pred[test_mask]) if test_mask.sum() >= MIN_ROWS else None

    t = time.perf_counter()
    _check_unchanged(db, data_version, len(ids))
    # The ensemble's files are written (to temporary names) before the table changes: a full disk
    # then fails the run with the table, the old ensemble and its stamp as they were.
    staged: dict[str, str] = {}
    try:
        staged = _stage(db, ens, image_mean)
        db.update_columns(pa.table({
            S.ID: pa.array(ids, type=pa.string()),
            S.PREDICTED_LOSS: pa.array(pred.astype(np.float32)),
            S.PREDICTED_LOSS_STD: pa.array(std.astype(np.float32)),
        }))
        db.cleanup()
        timings["write_s"] = time.perf_counter() - t

        seconds = time.perf_counter() - t0
        report = DiagnoseReport(
            path=str(db.diagnosis_dir), rows=len(ids), fitted_rows=len(fit_rows), rows_with_loss=n_loss,
            members=members, folds=ens.n_folds_, spearman=q["spearman"], r2=q["r2"],
            auroc_top10=q["auroc_top10"], seconds=seconds, data_version=data_version, test=q_test,
            timings={k: round(v, 2) for k, v in timings.items()}, fit_split="held-out" if use_held_out else "all",
            quality_note=undefined_why(loss[has_loss], pred[has_loss]),
            pool_rows=int((split == S.POOL_SPLIT).sum()),
        )
        report.no_skill = no_skill(q, report.quality_note)
        _save(db, staged, report, clip, ids)
    except (OSError, RuntimeError, ValueError) as e:
        err = write_error(e, f"the diagnosis of {db.path}", f"diagnose --db {db.path}")
        if err is None:
            raise
        raise err from None
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return report


def _check_unchanged(db: Database, data_version: int, n: int) -> None:
    """Refuse to write predictions computed from rows that changed while we were fitting."""
    if db.data_version != data_version or db.count_rows() != n:
        raise UserError(
            f"the table in {db.path} changed while diagnosing (another `llm2loss index` ran); "
            "run `llm2loss diagnose` again once it has finished."
        )


def _stage(db: Database, ens: DiagnosisEnsemble, image_mean: np.ndarray) -> dict[str, str]:
    """Write the ensemble and the image mean to temporary files beside their final names; returns
    {final name: temporary path}. On failure none is left behind."""
    out = db.diagnosis_dir
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[str, str] = {}
    try:
        for name, write in ((ENSEMBLE_FILE, lambda p: save_ensemble(ens, p)),
                            (IMAGE_MEAN_FILE, lambda p: _save_npy(p, image_mean))):
            fd, staged[name] = tempfile.mkstemp(dir=out, prefix=name, suffix=".tmp")
            os.close(fd)
            write(staged[name])
    except BaseException:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return staged


def _save(db: Database, staged: dict[str, str], report: DiagnoseReport, clip: dict | None, ids: np.ndarray) -> None:
    """Put the staged files in place, info.json last, stamped with what the ensemble was fitted on
    (data version, rows, CLIP, the set of ids) and each file's checksum: a reader never pairs a new
    ensemble with an old stamp (info.json is removed first), and a file damaged later is refused."""
    out = db.diagnosis_dir
    checksums = {name: file_checksum(tmp) for name, tmp in staged.items()}
    (out / INFO_FILE).unlink(missing_ok=True)
    for name, tmp in staged.items():
        os.replace(tmp, out / name)
    (out / LEGACY_ENSEMBLE_FILE).unlink(missing_ok=True)  # a pickle from an older version: never read
    for stale in out.glob("text_mean*"):  # cached text means (and their stamps) of the previous fit
        stale.unlink()
    write_json_atomic(out / INFO_FILE, {
        "data_version": report.data_version,
        "num_rows": report.rows,
        "clip": clip,
        "ids_sha256": id_set_digest(ids),
        "table_version": db.version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": report.members,
        "folds": report.folds,
        "fitted_rows": report.fitted_rows,
        "fit_split": report.fit_split,
        "quality": {"spearman": report.spearman, "r2": report.r2, "auroc_top10": report.auroc_top10,
                    "test": report.test, "no_skill": report.no_skill},
        "files": {"ensemble": ENSEMBLE_FILE, "image_mean": IMAGE_MEAN_FILE},
        "checksums": checksums,
    })


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a bare temp name
        np.save(f, arr)


def damage(db: Database, info: dict) -> str | None:
    """Why the ensemble files stamped ``info`` are not the ones written (size, SHA-256); None when
    they are, or when ``info`` predates checksums (nothing to verify: said in the log)."""
    checksums = info.get("checksums")
    if not isinstance(checksums, dict):
        log.warning("the diagnosis ensemble in %s has no checksums (fitted by an older llm2loss); "
                    "run `llm2loss diagnose` again to stamp it", db.diagnosis_dir)
        return None
    for name in (ENSEMBLE_FILE, IMAGE_MEAN_FILE):
        problem = checksum_problem(db.diagnosis_dir / name, checksums.get(name))
        if problem is not None:
            return problem
    return None


@dataclass
class LoadedEnsemble:
    """A fitted ensemble read back from ``DIR/diagnosis/``.

    ``stale`` is None when the ensemble matches the table, else a sentence saying what changed.
    ``image_mean`` is (d,) float32, the mean stored image embedding at fitting time.
    """

    ensemble: DiagnosisEnsemble
    info: dict
    image_mean: np.ndarray
    stale: str | None


def staleness(db: Database, info: dict) -> str | None:
    """Why an ensemble stamped ``info`` no longer matches ``db`` (None when it does)."""
    if info.get("clip") != db.clip_identity:
        return "the table's embeddings now come from another CLIP model"
    if int(info.get("data_version", -1)) != db.data_version:
        return f"rows were added or removed since it was fitted (data version {info.get('data_version')} -> {db.data_version})"
    n = db.count_rows()
    if int(info.get("num_rows", -1)) != n:
        return f"the table has {n} rows, the ensemble was fitted on a table of {info.get('num_rows')}"
    return None


def load_ensemble(db, allow_stale: bool = False) -> LoadedEnsemble:
    """Read the fitted ensemble of ``db``; refuse a missing one, and a stale one unless ``allow_stale``.

    A stale ensemble from another CLIP model is always refused: its inputs mean something else.
    """
    import json

    db = open_db(db)
    info_path = db.diagnosis_dir / INFO_FILE
    ens_path = db.diagnosis_dir / ENSEMBLE_FILE
    if not ens_path.exists() and (db.diagnosis_dir / LEGACY_ENSEMBLE_FILE).exists():
        raise UserError(
            f"the diagnosis ensemble in {db.diagnosis_dir} is an {LEGACY_ENSEMBLE_FILE} from an older llm2loss, "
            f"a pickle that could run code and is never loaded; re-run `llm2loss diagnose --db {db.path}`."
        )
    if not info_path.exists() or not ens_path.exists():
        raise UserError(f"{db.path} has no diagnosis ensemble yet; run `llm2loss diagnose --db {db.path}` first.")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise UserError(f"{info_path} is corrupt (not a JSON object); re-run `llm2loss diagnose --db {db.path}`.")
    stale = staleness(db, info)
    if stale and (not allow_stale or info.get("clip") != db.clip_identity):
        raise UserError(
            f"the diagnosis ensemble in {db.diagnosis_dir} is stale ({stale}); "
            f"run `llm2loss diagnose --db {db.path}` again."
        )
    problem = damage(db, info)
    if problem is not None:
        raise Unavailable(f"the diagnosis ensemble in {db.diagnosis_dir} is damaged ({problem}) and is not used; "
                          f"run `llm2loss check --db {db.path}`, then `llm2loss diagnose --db {db.path}` to fit it again.")
    try:
        ens = load_ensemble_file(ens_path)
    except UnsafeEnsembleFile as e:
        raise UserError(f"the diagnosis ensemble {ens_path} was not loaded ({e}); "
                        f"re-run `llm2loss diagnose --db {db.path}`.") from None
    try:
        image_mean = np.load(db.diagnosis_dir / IMAGE_MEAN_FILE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{db.diagnosis_dir / IMAGE_MEAN_FILE} could not be read ({type(e).__name__}); "
                        f"re-run `llm2loss diagnose --db {db.path}`.") from None
    return LoadedEnsemble(ensemble=ens, info=info, image_mean=image_mean, stale=stale)


def score_new_rows(db, progress: bool = True) -> int:
    """Score rows whose ``predicted_loss`` is null (appended after the last fit) with the full
    ensemble; returns how many were written. The ensemble stays stamped stale (it never saw them)."""
    db = open_db(db)
    with writer_lock(db.path, "diagnose --score-new"):
        return _score_new_rows(db)


def _score_new_rows(db: Database) -> int:
    loaded = load_ensemble(db, allow_stale=True)
    d = db.embed_dim
    # the rows to score, read before anything is written; then one commit for all of them
    version, n_rows = db.data_version, db.count_rows()
    new = db.read([S.ID, S.EMBEDDING, S.LOSS], where=f"{S.PREDICTED_LOSS} IS NULL")
    if new.num_rows == 0:
        return 0
    pred = np.empty(new.num_rows, dtype=np.float32)
    std = np.empty(new.num_rows, dtype=np.float32)
    for s in range(0, new.num_rows, SCORE_BATCH):
        b = new.slice(s, SCORE_BATCH)
        m = b.num_rows
        X = np.asarray(b.column(S.EMBEDDING).combine_chunks().values.to_numpy()).reshape(m, d)
        pred[s : s + m], std[s : s + m] = loaded.ensemble.predict(X, return_std=True)
    db.update_columns(pa.table({S.ID: new.column(S.ID), S.PREDICTED_LOSS: pred, S.PREDICTED_LOSS_STD: std}))
    db.cleanup()
    _restamp_if_only_pool_added(db, loaded, new, version, n_rows)
    return new.num_rows


def _restamp_if_only_pool_added(db: Database, loaded: LoadedEnsemble, scored: pa.Table, version: int,
                                n_rows: int) -> None:
    """An ensemble is fitted on rows with a loss. When every row added since the fit was an
    unlabeled one (no loss: nothing it could have learned from) and all are now scored, the fit is
    as current as before they came: stamp it with the table as it is, so explain and curate use it
    without a refit. Rows added with a loss leave it stale (it never saw their losses)."""
    info = loaded.info
    if loaded.stale is None or info.get("clip") != db.clip_identity:
        return
    added = n_rows - int(info.get("num_rows", -1))
    if added <= 0 or scored.num_rows != added or scored.column(S.LOSS).null_count != scored.num_rows:
        return
    if db.data_version != version or db.count_rows() != n_rows:
        return  # another writer came between: leave the stamp to the next diagnose
    write_json_atomic(db.diagnosis_dir / INFO_FILE, {**info, "data_version": version, "num_rows": n_rows,
                                                     "table_version": db.version, "ids_sha256": id_set_digest(db.ids()),
                                                     "pool_rows_scored_since_fit": added})


def _bar(total: int, show: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not show, leave=False)
