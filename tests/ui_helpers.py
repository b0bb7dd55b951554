"""Helpers shared by tests/test_app.py and tests/test_browser.py (no tests here)."""

from __future__ import annotations

import importlib.util

import pyarrow as pa

from indexer import schema as S


def fit_ensemble_keep_planted(db) -> None:
    """Fit the diagnosis ensemble (what `explain` scores phrases with), then put back make_db's
    planted ``predicted_loss``: with a random-weight CLIP the ensemble's own predictions on 120 rows
    are noise, and the tests assert rankings by the planted failures."""
    if importlib.util.find_spec("diagnosis.run") is None:
        return
    from diagnosis.run import diagnose

    planted = db.read([S.ID, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD])
    diagnose(db, members=2, folds=3, progress=False)  # small: only explain needs it
    db.update_columns(pa.table({c: planted.column(c) for c in planted.column_names}))
