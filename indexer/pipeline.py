"""``llm2loss index``: a manifest's images, losses and CLIP embeddings into the database folder.

The run, in order:

1. Validate everything that can fail the whole run before touching the database: the manifest,
   the loss source (exactly one of a ``loss`` column, a predictions file, a model), the CLIP model
   (a model other than the one recorded in the database is refused), the metadata columns.
2. Decide the rows to do: rows with neither a label nor a loss are the *unlabeled pool*
   (``split = "pool"``, ``loss`` and ``label`` null: stored, embedded and later scored, never
   fitted); rows whose id is already stored are skipped (this is what makes a rerun
   continue where a killed run stopped, a finished rerun a no-op, and a second manifest add only its
   new ids); rows with a missing image or a bad loss/label are rejected (``strict``: the run fails).
3. Decode images in worker processes, embed them (and run the user's model for ``--model``), and
   append rows in commits of ``commit_rows``: each commit is atomic, so a kill loses at most the
   rows not yet committed, and memory holds one commit's rows whatever the dataset's size.
4. Write ``rejects.csv``, stamp ``meta.json`` and build the FAISS index (``indexer.ann``).

A :class:`UserError` raised once writing began (``--strict`` meeting a corrupt image, a model whose
outputs do not fit the labels) restores the table, ``meta.json`` and the folder as they were.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexer import schema as S
from indexer.clip import ClipSpec, clip_spec_from_args, load_clip, resolve_clip, resolve_device
from indexer.errors import UserError
from indexer.identity import identity_columns
from indexer.images import ShapeMismatch, image_batches, max_pixels
from indexer.integrity import atomic_write, write_error
from indexer.losses import ModelLoss, Rejects, RowLosses, losses_from_column, losses_from_predictions
from indexer.manifest import Manifest, read_source, short_error
from indexer.store import META_FILE, Database, FolderSnapshot, describe_clip, write_json_atomic, writer_lock

log = logging.getLogger(__name__)

# The CLI takes clip_spec_from_args from here; indexer.ray_engine takes the snapshot by its old name.
__all__ = ["index_dataset", "prepare_index", "begin_writing", "finish_index", "rows_table", "IndexReport",
           "IndexPlan", "clip_spec_from_args"]
_Snapshot = FolderSnapshot

#: Rows per Lance commit by default: large enough that fragments stay few, small enough that a kill
#: loses little and memory stays flat (1024 x 512 float32 = 2 MiB of embeddings).
COMMIT_ROWS = 1024
_SCAN_ROWS = 65536  # manifest rows turned into Python objects at a time


@dataclass
class IndexReport:
    """What an ``index`` run did. ``rejected`` counts rows refused, by reason."""

    db: Path
    source: Path
    rows_in_source: int
    rows_written: int
    rows_already_stored: int
    pool_rows: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejects_path: Path | None = None
    seconds: float = 0.0
    embed_seconds: float = 0.0
    data_version: int = 0
    clip: str = ""
    ann: dict | None = None

    @property
    def images_per_second(self) -> float:
        """Images decoded and embedded per second of the embedding loop (model loading excluded)."""
        return self.rows_written / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        d["images_per_second"] = round(self.images_per_second, 2)
        return d

    def summary(self) -> str:
        lines = [
            f"indexed {self.source} into {self.db} with CLIP {self.clip}",
            f"  rows written: {self.rows_written} (already stored: {self.rows_already_stored}, "
            f"in source: {self.rows_in_source})",
        ]
        if self.pool_rows:
            lines.append(f"  unlabeled rows (no label, no loss): {self.pool_rows}, stored as split '{S.POOL_SPLIT}' "
                         "(scored by `llm2loss diagnose`, never fitted)")
        n_rej = sum(self.rejected.values())
        lines.append(f"  rows rejected: {n_rej}" + (f" (listed in {self.rejects_path})" if n_rej else ""))
        lines += [f"    {count:6d}  {reason}" for reason, count in sorted(self.rejected.items())]
        lines.append(f"  speed: {self.images_per_second:.1f} images/s ({self.seconds:.1f} s in all)")
        if self.ann is not None:
            if "skipped" in self.ann:
                lines.append(f"  FAISS index: skipped ({self.ann['skipped']})")
            else:
                lines.append(f"  FAISS index: {self.ann.get('kind')} over {self.ann.get('num_rows')} rows, "
                             f"recall@10 {self.ann.get('recall_at_10')}")
        return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------
def _open_existing(path: Path) -> Database | None:
    return Database(path) if (path / META_FILE).exists() else None


def _loss_source(manifest: Manifest, predictions, model, task: str, pool: np.ndarray) -> RowLosses | None:
    """The losses of the labelled rows (``pool``: the unlabeled rows, which get none)."""
    given = [name for name, on in (("the manifest's `loss` column", manifest.has_loss),
                                   ("--predictions", predictions is not None),
                                   ("--model", model is not None)) if on]
    if len(given) > 1:
        raise UserError(f"losses come from exactly one source but {' and '.join(given)} were both given; "
                        "drop one of them.")
    if not given:
        if pool.all():  # a manifest of unlabeled images: nothing to compute
            return RowLosses(np.full(len(manifest), np.nan), {}, "none")
        raise UserError(f"the manifest {manifest.path} has no `loss` column and neither --predictions nor --model "
                        "was given; add a loss column or pass one of them (rows with neither a label nor a loss "
                        "are indexed as the unlabeled pool).")
    if manifest.has_loss:
        return losses_from_column(manifest)
    if predictions is not None:
        return losses_from_predictions(manifest, predictions, task)
    return None


def _check_metadata(manifest: Manifest, table_schema: pa.Schema) -> None:
    """A manifest appended to an existing table must fit its columns."""
    for f in manifest.metadata_schema:
        if f.name not in table_schema.names:
            raise UserError(f"the manifest {manifest.path} has a column `{f.name}` that the database does not; "
                            "drop it from the manifest or index into a new --db folder.")
        want = table_schema.field(f.name).type
        try:
            manifest.table.column(f.name).cast(want)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise UserError(f"column `{f.name}` of {manifest.path} holds {f.type} but the database stores {want}; "
                            "make the types agree or index into a new --db folder.") from e


def _reject_message(manifest: Manifest, row: int, reason: str, detail: str) -> str:
    rid = manifest.table.column(S.ID)[row].as_py()
    return (f"row {row + 1} (id {rid!r}) of {manifest.path} was refused ({reason}: {detail}); fix or remove "
            "the row, or run without --strict to skip it.")


def _batch_table(manifest: Manifest, schema: pa.Schema, rows: np.ndarray, emb: np.ndarray,
                 loss: np.ndarray) -> pa.Table:
    """One commit's rows in the table's schema: (b,) rows, (b, d) float32 embeddings, (b,) losses."""
    return rows_table(manifest.table.take(pa.array(rows)), schema, emb, loss)


def rows_table(part: pa.Table, schema: pa.Schema, emb: np.ndarray, loss: np.ndarray) -> pa.Table:
    """Manifest rows ``part`` (b rows, the manifest's columns) with their (b, d) float32 embeddings
    and (b,) losses, in the table's ``schema``. Shared with the distributed engine's writers.
    The identity of each image file (:mod:`indexer.identity`) is read here, as it is written."""
    n, d = emb.shape
    cols = []
    # never taken from the manifest: what identifies a file is read from the file itself
    ident = identity_columns(part.column(S.IMAGE).to_pylist()) if S.IMAGE_SHA256 in schema.names else {}
    for f in schema:
        if f.name == S.EMBEDDING:
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d))
        elif f.name == S.LOSS:  # NaN: an unlabeled row, stored without a loss
            cols.append(pa.array(np.asarray(loss, dtype=np.float32), pa.float32(), from_pandas=True))
        elif f.name in ident:
            cols.append(ident[f.name])
        elif f.name in part.column_names:
            cols.append(part.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _write_rejects(path: Path, manifest: Manifest, rejects: Rejects) -> Path | None:
    if not rejects:
        path.unlink(missing_ok=True)
        return None
    rows = sorted(rejects)
    part = manifest.table.select([S.ID, S.IMAGE]).take(pa.array(rows, pa.int64()))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row", S.ID, S.IMAGE, "reason", "detail"])
            for row, rid, img in zip(rows, part.column(S.ID).to_pylist(), part.column(S.IMAGE).to_pylist(), strict=True):
                w.writerow([row + 1, rid, img, *rejects[row]])

    atomic_write(path, write)
    return path


@dataclass
class IndexPlan:
    """A validated ``index`` run before anything is written (see :func:`prepare_index`).

    ``todo``: manifest rows to embed, in order; ``rejects``: rows refused up front, by row;
    ``already``: rows whose id is stored; ``pool``: (n,) bool, the unlabeled rows (their ``split``
    in the manifest's table is already ``"pool"``). ``clip_model`` is loaded on ``device``.
    """

    manifest: Manifest
    db_path: Path
    existing: Database | None
    meta: dict
    spec: ClipSpec
    has_rows: bool
    row_losses: RowLosses | None
    model_loss: ModelLoss | None
    device: str
    clip_model: object
    todo: list[int]
    rejects: Rejects
    already: int
    t_start: float
    pool: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def _rows_to_do(manifest: Manifest, existing: Database | None, row_losses: RowLosses | None,
                model_loss: ModelLoss | None, pool: np.ndarray) -> tuple[list[int], Rejects, int]:
    """(rows to embed in order, rows rejected up front, rows already stored).

    Ids and paths stay in Arrow buffers (tens of bytes a row) rather than Python lists of str
    (hundreds), so what the run holds per row stays small next to the models.
    """
    ids = manifest.table.column(S.ID)
    if existing is not None and existing.has_table():
        stored = existing.read([S.ID]).column(S.ID).combine_chunks()
        is_stored = np.asarray(pc.is_in(ids, value_set=stored).to_numpy(zero_copy_only=False), dtype=bool)
    else:
        is_stored = np.zeros(len(manifest), dtype=bool)
    upfront: Rejects = dict(row_losses.rejects) if row_losses else {}
    if model_loss is not None:
        upfront.update(model_loss.upfront_rejects())
    for r in np.flatnonzero(pool):  # an unlabeled row has no loss to miss
        upfront.pop(int(r), None)
    if S.SPLIT in manifest.table.column_names:
        given = np.asarray(pc.equal(manifest.table.column(S.SPLIT), S.POOL_SPLIT).fill_null(False)
                           .to_numpy(zero_copy_only=False), dtype=bool)
        for r in np.flatnonzero(given & ~pool):
            upfront.setdefault(int(r), (f"split '{S.POOL_SPLIT}' on a labelled row",
                                        f"split '{S.POOL_SPLIT}' is kept for rows with neither a label nor a loss"))
    images = manifest.table.column(S.IMAGE)
    todo: list[int] = []
    rejects: Rejects = {}
    for off in range(0, len(manifest), _SCAN_ROWS):
        for j, img in enumerate(images.slice(off, _SCAN_ROWS).to_pylist()):
            r = off + j
            if is_stored[r]:
                continue
            if not img:
                rejects[r] = ("image not found", "the `image` cell is empty")
            elif not os.path.isfile(img):
                rejects[r] = ("image not found", f"{img} does not exist")
            elif r in upfront:
                rejects[r] = upfront[r]
            else:
                todo.append(r)
    return todo, rejects, int(is_stored.sum())


def prepare_index(source, db, clip: ClipSpec | None = None, predictions=None, model: str | None = None,
                  task: str = "auto", batch_size: int = 64, device: str | None = "auto",
                  strict: bool = False) -> IndexPlan:
    """Steps 1 and 2 of the module doc: validate the run and decide its rows; writes nothing."""
    t_start = time.perf_counter()
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be at least 1.")
    db_path = db.path if isinstance(db, Database) else Path(db).expanduser().resolve()
    _check_db_path(db_path)
    max_pixels()  # a bad LLM2LOSS_MAX_PIXELS is refused before any work
    manifest = read_source(source)
    existing = db if isinstance(db, Database) else _open_existing(db_path)
    meta = existing.read_meta() if existing else {}
    spec = resolve_clip(clip, meta)
    has_rows = existing is not None and existing.has_table() and existing.count_rows() > 0
    if has_rows:
        existing.check_clip(spec.identity())
    if existing is not None and existing.has_table():
        _check_metadata(manifest, existing.table.schema)
    pool = manifest.unlabeled()
    row_losses = _loss_source(manifest, predictions, model, task, pool)
    if pool.any():
        manifest.table = _mark_pool(manifest.table, pool)

    device = resolve_device(device)
    clip_model = load_clip(spec, device)
    model_loss = ModelLoss(model, manifest.column(S.LABEL), task, device) if model is not None else None

    # ---- rows to do -------------------------------------------------------------------------------
    todo, rejects, already = _rows_to_do(manifest, existing, row_losses, model_loss, pool)
    if strict and rejects:
        r = min(rejects)
        raise UserError(_reject_message(manifest, r, *rejects[r]))
    if not todo and not has_rows:
        reasons = Counter(reason for reason, _ in rejects.values())
        raise UserError(f"no row of {manifest.path} can be indexed ({', '.join(f'{n} {k}' for k, n in reasons.items())}); "
                        "fix the manifest's paths, losses or labels and run again.")
    log.info("%s: %d rows, %d already stored, %d to index, %d rejected up front; CLIP %s on %s",
             manifest.path, len(manifest), already, len(todo), len(rejects), describe_clip(spec.identity()), device)
    return IndexPlan(manifest, db_path, existing, meta, spec, has_rows, row_losses, model_loss, device, clip_model,
                     todo, rejects, already, t_start, pool)


def _mark_pool(t: pa.Table, pool: np.ndarray) -> pa.Table:
    """``t`` with ``split = "pool"`` on the unlabeled rows (``pool``, (n,) bool); a split the manifest
    gave them is replaced (and said in the log): an unlabeled row is in no training or test split."""
    mask = pa.array(pool)
    if S.SPLIT in t.column_names:
        old = t.column(S.SPLIT)
        other = pc.and_(mask, pc.invert(pc.equal(old, S.POOL_SPLIT).fill_null(True)))
        n_other = pc.sum(other).as_py() or 0
        if n_other:
            log.warning("%d unlabeled rows had another split; they are stored with split '%s'", n_other, S.POOL_SPLIT)
        return t.set_column(t.column_names.index(S.SPLIT), S.SPLIT,
                            pc.if_else(mask, pa.scalar(S.POOL_SPLIT), old.combine_chunks()))
    col = pa.array([S.POOL_SPLIT if p else None for p in pool], pa.string())
    return t.append_column(S.SPLIT, col)


def _check_db_path(p: Path) -> None:
    """Refuse a ``--db`` that is a file, or a new folder that cannot be made, before any work."""
    if p.exists() and not p.is_dir():
        raise UserError(f"--db {p} is an existing file, not a database folder; pass a folder (a new path creates one).")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--db {p} cannot be created because {parent} is a file, not a folder; pass another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--db {p} cannot be {'written' if parent == p else 'created'}: no permission to write in "
                        f"{parent}; pass a folder you can write to.")


def begin_writing(plan: IndexPlan, snap: FolderSnapshot) -> Database:
    """Open (or create) the database, stamp meta.json's model and sources, create the table when
    there are rows to add. Call inside the ``try`` that rolls ``snap`` back on a UserError."""
    meta, manifest, spec = plan.meta, plan.manifest, plan.spec
    try:
        database = plan.existing or Database(plan.db_path, create=True)
    except OSError as e:
        raise UserError(f"--db {plan.db_path} cannot be created ({short_error(e)}); pass a folder you can write to.") from e
    if database.has_table():
        snap.version = database.version
    new_meta = dict(meta)
    new_meta.update(clip=spec.identity(), clip_spec=spec.to_dict(), embed_dim=plan.clip_model.embed_dim)
    new_meta["sources"] = list(dict.fromkeys([*meta.get("sources", []), str(manifest.path)]))
    new_meta["image_roots"] = sorted(set(meta.get("image_roots", [])) | set(manifest.image_roots()))
    if new_meta != meta:
        write_json_atomic(database.meta_path, new_meta)
    if plan.todo and not database.has_table():
        database.create_table(S.table_schema(plan.clip_model.embed_dim, manifest.metadata_schema))
    return database


def finish_index(plan: IndexPlan, database: Database, written: int, embed_seconds: float) -> IndexReport:
    """Step 4: write rejects.csv, report, build the FAISS index."""
    rejects_path = _write_rejects(database.rejects_path, plan.manifest, plan.rejects)
    report = IndexReport(
        db=database.path, source=plan.manifest.path, rows_in_source=len(plan.manifest), rows_written=written,
        pool_rows=int(plan.pool[plan.todo].sum()) if len(plan.pool) and plan.todo else 0,
        rows_already_stored=plan.already, rejected=dict(Counter(reason for reason, _ in plan.rejects.values())),
        rejects_path=rejects_path, embed_seconds=embed_seconds, data_version=database.data_version,
        clip=describe_clip(plan.spec.identity()))
    report.ann = _build_ann(database)
    report.seconds = time.perf_counter() - plan.t_start
    log.info("%s", report.summary().replace("\n", " |"))
    return report


def index_dataset(source, db, clip: ClipSpec | None = None, predictions=None, model: str | None = None,
                  task: str = "auto", batch_size: int = 64, device: str | None = "auto", workers: int | None = None,
                  strict: bool = False, progress: bool = True, commit_rows: int | None = None) -> IndexReport:
    """Index ``source`` (manifest file or class folder) into the database folder ``db``.

    ``clip``: the CLIP model (``None``, or a spec whose ``model`` is ``None``: the one recorded in
    ``db``, else ViT-B-32). ``predictions``: a predictions file; ``model``: ``MODULE:FUNCTION`` (at
    most one, and neither when the manifest has losses). ``task``: see :mod:`indexer.losses`.
    ``batch_size``: images per forward pass. ``workers``: decoding processes (default: cores - 1
    with a GPU, 0 on the CPU: see :func:`indexer.images.default_workers`).
    ``strict``: fail on the first bad row instead of rejecting it. ``commit_rows``: rows per Lance
    commit (default ``max(batch_size, 1024)``). Returns what was done (see :class:`IndexReport`).

    The run holds the database's writer lock from deciding its rows to building the FAISS index
    (:func:`indexer.store.writer_lock`): a second writer of the same folder is refused at once.
    """
    if workers is not None and workers < 0:
        raise UserError(f"--workers {workers} is negative; pass 0 (decode in this process) or a number of processes.")
    with writer_lock(db_folder(db), "index") as existed:
        plan = prepare_index(source, db, clip, predictions, model, task, batch_size, device, strict)
        snap = FolderSnapshot(plan.db_path, dir_existed=existed)
        database: Database | None = plan.existing
        written, embed_seconds = 0, 0.0
        try:
            database = begin_writing(plan, snap)
            if plan.todo:
                written, embed_seconds = _embed_and_write(
                    database, plan.manifest, plan.todo, plan.clip_model, plan.row_losses, plan.model_loss,
                    plan.rejects, strict, batch_size, workers, progress, commit_rows or max(batch_size, COMMIT_ROWS),
                    plan.pool)
        except UserError:
            snap.rollback(database)
            raise
        except Exception as e:  # a full disk or a read-only folder met while writing rows
            err = write_error(e, f"the database {plan.db_path}", "index")
            if err is None:
                raise
            if not existed:  # a new folder is removed; an existing one keeps its committed batches (a rerun continues)
                snap.rollback(database)
            raise err from None
        try:
            return finish_index(plan, database, written, embed_seconds)
        except (OSError, RuntimeError) as e:  # rejects.csv and the FAISS files are written atomically
            err = write_error(e, f"the database {plan.db_path}", "index")
            if err is None:
                raise
            raise err from None


def db_folder(db) -> Path:
    """The folder of ``db`` (a path or a :class:`Database`), absolute."""
    return db.path if isinstance(db, Database) else Path(db).expanduser().resolve()


def _embed_and_write(database: Database, manifest: Manifest, todo: list[int], clip_model, row_losses,
                     model_loss, rejects: Rejects, strict: bool, batch_size: int, workers: int | None,
                     progress: bool, commit_rows: int, pool: np.ndarray | None = None) -> tuple[int, float]:
    """The embedding loop; returns (rows written, seconds). Adds rows refused mid-run to ``rejects``."""
    from tqdm import tqdm

    schema = database.table.schema
    transforms = [clip_model.preprocess] + ([model_loss.preprocess] if model_loss is not None else [])
    buf_rows: list[np.ndarray] = []
    buf_emb: list[np.ndarray] = []
    buf_loss: list[np.ndarray] = []
    written = 0

    def flush() -> None:
        nonlocal written
        if not buf_rows:
            return
        data = _batch_table(manifest, schema, np.concatenate(buf_rows), np.concatenate(buf_emb),
                            np.concatenate(buf_loss))
        version = database.append(data)
        database.update_meta(data_version=version)
        written += data.num_rows
        buf_rows.clear(), buf_emb.clear(), buf_loss.clear()

    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not progress, desc="indexing")
    paths = manifest.table.column(S.IMAGE).take(pa.array(todo, pa.int64())).combine_chunks()
    batches = image_batches(paths, todo, transforms, batch_size, workers, device=clip_model.device)
    pending = 0
    try:
        for batch in batches:
            for row, reason, detail in batch.failed:
                if strict:
                    raise UserError(_reject_message(manifest, row, reason, detail))
                rejects[row] = (reason, detail)
            bar.update(len(batch.failed))
            if len(batch.rows) == 0:
                continue
            n_in = len(batch.rows)
            emb = clip_model.encode_images(batch.inputs[0])
            if model_loss is not None:
                loss, bad = _model_losses(model_loss, batch.inputs[1], batch.rows, pool)
            else:
                loss, bad = row_losses.values[batch.rows], {}
            if bad:
                if strict:
                    r = min(bad)
                    raise UserError(_reject_message(manifest, r, *bad[r]))
                rejects.update(bad)
                keep = np.array([int(r) not in bad for r in batch.rows])
                batch.rows, emb, loss = batch.rows[keep], emb[keep], loss[keep]
            buf_rows.append(batch.rows), buf_emb.append(emb), buf_loss.append(loss)
            pending += len(batch.rows)
            bar.update(n_in)
            if pending >= commit_rows:
                flush()
                pending = 0
        flush()
    except ShapeMismatch as e:
        raise UserError(f"the images of {manifest.path} differ in size ({e}) and --model {model_loss.entry} gave no "
                        "preprocessing; return (model, preprocess) with a preprocess that resizes them.") from e
    except KeyboardInterrupt:
        flush()  # keep the finished batches: the rerun continues after them
        raise
    finally:
        bar.close()
        del batches  # shuts the worker processes down now, not at garbage collection
    return written, time.perf_counter() - t0


def _model_losses(model_loss: ModelLoss, inputs, rows: np.ndarray, pool: np.ndarray | None):
    """The user's model's losses for a batch; unlabeled rows (``pool``) are not run and get NaN."""
    unl = pool[rows] if pool is not None and len(pool) else np.zeros(len(rows), dtype=bool)
    if not unl.any():
        return model_loss(inputs, rows)
    loss = np.full(len(rows), np.nan)
    if unl.all():
        return loss, {}
    import torch

    lab = ~unl
    part, bad = model_loss(inputs[torch.from_numpy(lab)], rows[lab])
    loss[lab] = part
    return loss, bad


def _build_ann(database: Database) -> dict | None:
    if not database.has_table() or database.count_rows() == 0:
        return None
    try:
        from indexer import ann
    except ImportError as e:
        log.warning("FAISS index skipped: indexer.ann is not available (%s)", e)
        return {"skipped": f"indexer.ann unavailable: {e}"}
    return ann.build_index(database)
