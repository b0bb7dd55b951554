"""The diagnosis part of ``llm2loss check`` (:mod:`indexer.check` does the table and the FAISS index):
the fitted ensemble and the cached text means under ``DIR/diagnosis/``.

Ensemble: ``info.json`` is a JSON object; its stamp against the table (a stale ensemble is a note:
``diagnose`` refits it); ``ensemble.skops`` and ``image_mean.npy`` against the size and SHA-256
recorded when they were written; the ensemble reads back through skops' trusted types, and the
image mean is a (d,) vector; the set of ids it was fitted on equals the table's. Caches: each
``text_mean_*.npy`` has its stamp and checksum (``--repair`` removes one that does not: it is
recomputed on the next use).
"""

from __future__ import annotations

import json

import numpy as np

from diagnosis.run import ENSEMBLE_FILE, IMAGE_MEAN_FILE, INFO_FILE, damage, staleness
from indexer import schema as S
from indexer.check import DAMAGED, NOTE, OK, CheckReport
from indexer.check import check_database as _check_database
from indexer.integrity import checksum_problem, id_set_digest
from indexer.store import Database


def check_ensemble(db: Database, report: CheckReport, repair: bool) -> None:
    """Verify the fitted ensemble of ``db`` (see the module doc) into ``report``."""
    from diagnosis.ensemble import UnsafeEnsembleFile, load_ensemble_file

    info_path = db.diagnosis_dir / INFO_FILE
    rerun = f"run `llm2loss diagnose --db {db.path}` to fit it again"
    if not info_path.exists():
        if (db.diagnosis_dir / ENSEMBLE_FILE).exists():
            report.add("ensemble", DAMAGED, f"{ENSEMBLE_FILE} has no {INFO_FILE} stamp (a fit was interrupted)", rerun)
        else:
            report.add("ensemble", NOTE, "no diagnosis ensemble yet", f"run `llm2loss diagnose --db {db.path}`")
        return
    try:
        info = json.loads(info_path.read_text())
    except (ValueError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        report.add("ensemble", DAMAGED, f"{INFO_FILE} is not a JSON object", rerun)
        return
    problem = damage(db, info) if isinstance(info.get("checksums"), dict) else None
    if problem is None:
        try:
            load_ensemble_file(db.diagnosis_dir / ENSEMBLE_FILE)
        except UnsafeEnsembleFile as e:
            problem = f"{ENSEMBLE_FILE} does not read back ({e})"
    if problem is None:
        try:
            mean = np.load(db.diagnosis_dir / IMAGE_MEAN_FILE, allow_pickle=False)
            if mean.shape != (db.embed_dim,):
                problem = f"{IMAGE_MEAN_FILE} has shape {mean.shape}, not ({db.embed_dim},)"
        except (OSError, ValueError) as e:
            problem = f"{IMAGE_MEAN_FILE} cannot be read ({type(e).__name__})"
    if problem is not None:
        report.add("ensemble", DAMAGED, f"the diagnosis ensemble is damaged ({problem}); it is never used", rerun)
        return
    stale = staleness(db, info)
    if stale is None and info.get("ids_sha256") is not None and info["ids_sha256"] != id_set_digest(db.ids()):
        stale = "the table holds other ids than it was fitted on"
    if stale is not None:
        report.add("ensemble", NOTE, f"the diagnosis ensemble is stale ({stale})", rerun)
    elif not isinstance(info.get("checksums"), dict):
        report.add("ensemble", NOTE, "the ensemble reads back, but it has no checksums (fitted by an older llm2loss)",
                   f"run `llm2loss diagnose --db {db.path}` to stamp it")
    else:
        report.add("ensemble", OK, f"fitted on {info.get('num_rows'):,} rows, the table's ids; checksums match, "
                                   "reads back through skops' trusted types")
    unscored = db.count_rows(f"{S.PREDICTED_LOSS} IS NULL")
    if unscored:
        report.add("predictions", NOTE, f"{unscored:,} rows have no predicted_loss",
                   f"run `llm2loss diagnose --db {db.path} --score-new` (or `diagnose` to refit)")


def check_caches(db: Database, report: CheckReport, repair: bool) -> None:
    """Verify each cached text mean's stamp and checksum; ``repair`` removes a bad one."""
    bad = []
    caches = sorted(db.diagnosis_dir.glob("text_mean_*.npy")) if db.diagnosis_dir.is_dir() else []
    for path in caches:
        try:
            stamp = json.loads(path.with_name(path.name + ".json").read_text())
        except (OSError, ValueError):
            stamp = None
        problem = "it has no stamp" if not isinstance(stamp, dict) else checksum_problem(path, stamp.get("file"))
        if problem is not None:
            bad.append((path, problem))
    if not caches:
        return
    if not bad:
        report.add("caches", OK, f"{len(caches)} cached text mean{'s' if len(caches) > 1 else ''}: checksums match")
        return
    f = report.add("caches", DAMAGED, "; ".join(f"{p.name}: {why}" for p, why in bad) + " (never used: recomputed)",
                   f"`llm2loss check --db {db.path} --repair` removes {'them' if len(bad) > 1 else 'it'}")
    if repair:
        for p, _ in bad:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".json").unlink(missing_ok=True)
        f.repaired = f"removed {len(bad)} damaged cache file{'s' if len(bad) > 1 else ''}"
        report.repaired.append(f.repaired)


def check_database(db, repair: bool = False) -> CheckReport:
    """``llm2loss check``: the table, the FAISS index, the ensemble and the caches of ``db``."""
    return _check_database(db, repair, extra=[check_ensemble, check_caches])
