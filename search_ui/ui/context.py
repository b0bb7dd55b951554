"""What one running app holds: the database, a lazily built query engine, and the image guard.

The guard is the app's file-serving policy. Gradio serves a file to the browser only after a handler
returned it; every path a handler returns passes :meth:`ImageGuard.check` first, which admits a file
only when its real path (symlinks resolved) lies under one of the dataset's image roots
(``meta.json`` ``image_roots``) and has an image suffix. ``serving_dirs`` narrows Gradio's own
``allowed_paths`` to the folders that actually hold indexed images, so a manifest or the database
folder sitting beside them is never reachable through Gradio's file route.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from indexer import schema as S
from indexer.errors import UserError
from indexer.store import Database

log = logging.getLogger(__name__)

#: More distinct image folders than this and Gradio is allowed the roots themselves instead.
MAX_SERVING_DIRS = 2000


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    return frozenset(Image.registered_extensions())


def image_roots(db: Database) -> list[Path]:
    """The dataset's own folders: ``meta.json`` ``image_roots``, else the manifests' folders."""
    meta = db.read_meta()
    roots = meta.get("image_roots") or [str(Path(s).parent) for s in meta.get("sources", [])]
    if not roots:
        raise UserError(
            f"the database {db.path} records no image folders (meta.json image_roots); "
            "re-run `llm2loss index` on its manifest so the app knows which files it may serve."
        )
    return [Path(os.path.realpath(r)) for r in roots]


class ImageGuard:
    """Admits a path only if it resolves to an image file under one of ``roots``.

    ``roots`` are real paths. ``../`` segments and symlinks are resolved before the check, so neither
    can lead outside the roots.
    """

    def __init__(self, roots: list[Path]):
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self._suffixes = _image_suffixes()

    def is_under_roots(self, path: str | os.PathLike) -> bool:
        real = Path(os.path.realpath(path))
        return any(real.is_relative_to(r) for r in self.roots)

    def check(self, path: str | os.PathLike | None) -> str | None:
        """The real path as a string when ``path`` may be served, else ``None`` (and a log line)."""
        if not path:
            return None
        real = Path(os.path.realpath(path))
        if real.suffix.lower() not in self._suffixes or not self.is_under_roots(real):
            log.warning("refused to serve %s: not an image under the dataset's folders", path)
            return None
        if not real.is_file():
            log.warning("image %s is missing on disk", path)
            return None
        return str(real)


def serving_dirs(db: Database, guard: ImageGuard) -> list[str]:
    """Folders Gradio may serve files from: the distinct folders of indexed images, under the roots."""
    dirs: set[str] = set()
    for batch in db.iter_batches([S.IMAGE]):
        for p in batch.column(S.IMAGE).to_pylist():
            dirs.add(os.path.dirname(os.path.realpath(p)))
        if len(dirs) > MAX_SERVING_DIRS:
            return [str(r) for r in guard.roots]
    return sorted(d for d in dirs if guard.is_under_roots(d))


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(x: Any, digits: int = 2) -> str:
    f = _num(x)
    return "–" if f is None else f"{f:.{digits}f}"


def caption(rec: dict) -> str:
    """One line under a gallery image: label, true loss, predicted loss ± spread, similarity."""
    parts = [str(rec.get(S.LABEL) or "?"), f"loss {fmt(rec.get(S.LOSS))}",
             f"pred {fmt(rec.get(S.PREDICTED_LOSS))}±{fmt(rec.get(S.PREDICTED_LOSS_STD))}"]
    if _num(rec.get("similarity")) is not None:
        parts.append(f"sim {fmt(rec['similarity'])}")
    return " · ".join(parts)


def jsonable(rec: dict) -> dict:
    """A record with non-finite floats as ``None`` and numpy scalars as Python ones."""
    out = {}
    for k, v in rec.items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def public_mode(m: dict) -> dict:
    """A cached mode (:meth:`AppContext.modes`) as `llm2loss explain --json` gives it: without the
    member and pool id lists."""
    return {k: v for k, v in m.items() if k not in ("ids", "pool_ids")}


class AppContext:
    """Shared by every session of one server: the database, the engine, caches and locks."""

    def __init__(self, db: str | os.PathLike | Database):
        self.db = db if isinstance(db, Database) else Database(db)
        self.db.table  # noqa: B018 -- refuse a database without a table before the page starts
        self.guard = ImageGuard(image_roots(self.db))
        self._engine = None
        self._engine_lock = threading.Lock()
        self._scratch = tempfile.TemporaryDirectory(prefix="llm2loss-ui-")
        self.scratch = self._scratch.name  # downloads are written here before Gradio caches them
        self._modes: dict[tuple, list[dict]] = {}
        self._modes_lock = threading.Lock()
        self._plans: dict[tuple, dict] = {}

    @property
    def engine(self):
        """The query engine, built on first use (it loads CLIP and the FAISS index)."""
        with self._engine_lock:
            if self._engine is None:
                from search_ui.engine import QueryEngine

                self._engine = QueryEngine(self.db)
            return self._engine

    @property
    def metadata_columns(self) -> list[str]:
        return [f.name for f in self.db.table.schema if f.name not in S.CORE_COLUMNS]

    def rows(self, ids: list[str]) -> list[dict]:
        """Records (no embedding) for ``ids``, in the order given; unknown ids are dropped."""
        cols = list(S.RESULT_COLUMNS) + self.metadata_columns
        table = self.db.rows_by_id([str(i) for i in ids], cols)
        by_id = {r[S.ID]: jsonable(r) for r in table.to_pylist()}
        return [by_id[i] for i in map(str, ids) if i in by_id]

    def gallery(self, records: list[dict]) -> tuple[list[tuple[str, str]], list[dict]]:
        """(gallery items ``(path, caption)``, the records shown) — unservable images are left out,
        so a gallery index always points at the record it shows."""
        items, shown = [], []
        for rec in records:
            path = self.guard.check(rec.get(S.IMAGE))
            if path is not None:
                items.append((path, caption(rec)))
                shown.append(rec)
        return items, shown

    def modes(self, top: int, vocab: str | None = None, progress=None) -> list[dict]:
        """``diagnosis.explain`` output as dicts with every member id (``ids``), cached per table
        version: explain takes seconds, and every visitor would otherwise pay for it. The ``top``
        modes whose evidence holds come first, then those whose evidence does not (``shown``
        False), for the tab to list marked; the API returns only the first."""
        key = (self.db.version, int(top), vocab)
        with self._modes_lock:
            if key not in self._modes:
                from diagnosis.explain import explain

                if progress is not None:
                    progress(0.1, desc="naming the failures and checking each name against the data")
                modes = explain(self.db, vocab=vocab, top=top, show_all=True)
                for old in [k for k in self._modes if k[0] != key[0]]:  # an older table's: never asked again
                    del self._modes[old]
                self._modes[key] = [jsonable(m.to_dict(with_ids=True)) for m in modes]
            return self._modes[key]

    def plan(self, budget: int, modes: tuple[str, ...] = ()) -> dict:
        """``diagnosis.curate.plan_curation`` as a dict (modes, items), cached per table version,
        budget and modes: it runs explain, seconds that every visitor would otherwise pay."""
        key = (self.db.version, int(budget), tuple(modes))
        with self._modes_lock:
            if key not in self._plans:
                from diagnosis.curate import plan_curation

                plan = plan_curation(self.db, int(budget), modes=list(modes) or None)
                for old in [k for k in self._plans if k[0] != key[0]]:
                    del self._plans[old]
                self._plans[key] = jsonable(plan.to_dict())
            return self._plans[key]
