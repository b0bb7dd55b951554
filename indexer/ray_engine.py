"""``llm2loss index --engine ray``: the same ingestion as :mod:`indexer.pipeline`, run on a Ray cluster.

The driver (this process) does what is cheap and must be done once: it validates the run and
decides its rows with :func:`indexer.pipeline.prepare_index` (the very code of the single-machine
path), and at the end writes ``rejects.csv``, the report and the FAISS index with
:func:`indexer.pipeline.finish_index`. In between, a Ray Data pipeline does the heavy work:

1. the rows to do (manifest columns + their manifest row number + their loss when the loss comes
   from a column or a predictions file) become a Ray dataset of Arrow blocks;
2. ``map_batches`` with :class:`ClipEmbedder`, an actor class holding the CLIP model (and the
   user's ``--model`` for its losses), decodes the images, embeds them and computes losses, on CPU
   actors or one GPU per actor;
3. ``map_batches`` with :func:`write_fragments` writes each batch of embedded rows as Lance data
   files, in parallel, in the table's schema (:func:`indexer.pipeline.rows_table`), and returns the
   fragments' metadata, never the rows;
4. the driver commits the fragments it receives with one ``LanceOperation.Append`` per
   ``commit_rows`` rows and stamps ``data_version`` in ``meta.json`` after each commit, exactly as
   the single-machine path does after each of its appends.

So the table is the same as the single-machine path's (same ids, embeddings, losses, metadata,
``meta.json``, ``rejects.csv``); only the order of its rows differs. Resuming works the same way:
a commit is atomic, a rerun skips ids already stored. Fragments written but not yet committed when
the run stops are invisible to readers: on an interrupt (Ctrl-C) the driver commits them, on an
error it deletes their files; after a hard kill they stay as unreferenced files and the rerun writes
those rows again, once.

The cluster's nodes must see the images, the CLIP weights/config and the database folder at the same
paths as the driver (a shared file system), and have ``llm2loss[ray]`` installed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from indexer import schema as S
from indexer.clip import ClipSpec, load_clip
from indexer.errors import UserError
from indexer.manifest import short_error
from indexer.pipeline import (
    COMMIT_ROWS,
    IndexPlan,
    IndexReport,
    _reject_message,
    _Snapshot,
    begin_writing,
    db_folder,
    finish_index,
    prepare_index,
    rows_table,
)
from indexer.store import Database, writer_lock

log = logging.getLogger(__name__)

#: Internal columns carried beside the manifest's through the Ray pipeline.
ROW, LOSS_IN, OK, REASON, DETAIL, LOSS_OUT, EMB = (
    "__row", "__loss_in", "__ok", "__reason", "__detail", "__loss", "__embedding")
#: ``reason`` marking a batch whose --model preprocessing gave tensors of different shapes.
SHAPE_MISMATCH = "__shape_mismatch__"
#: Rows per Lance commit by default (a kill loses at most this many rows' work; 100M rows make
#: ~1,500 commits).
RAY_COMMIT_ROWS = 64 * COMMIT_ROWS
#: Rows per written fragment (a 35 MiB data file at d = 512): fewer, larger fragments keep scans
#: fast, and a writer holds one fragment's rows in memory.
FRAGMENT_ROWS = 16 * COMMIT_ROWS
#: CPUs reserved by each writer task: the embedding actors take 90% of the cluster's CPUs.
IO_CPUS = 0.05
INSTALL_HINT = "install the Ray extra with `pip install 'llm2loss[ray]'` (or `pip install 'ray[data]>=2.40'`)"


def ray_module():
    """``ray``, imported lazily, or a UserError saying which extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError(f"--engine ray needs Ray, which is not installed; {INSTALL_HINT}.") from e
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``), or start a
    local one when ``address`` is None; a Ray already initialised in this process is used as it is."""
    ray = ray_module()
    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"--address {address}: could not join a Ray cluster there ({short_error(e)}); start one "
                            "with `ray start --head` and pass its address, or leave --address out for a local "
                            "one.") from e
    # Ray Data's console progress bars would flood stderr; this module shows one bar of its own.
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def cluster_device(ray, device: str | None) -> str:
    """Where the actors run: ``cuda`` when asked for or (``auto``) when the cluster has GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device in (None, "auto"):
        return "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda") and gpus == 0:
        raise UserError(f"--device {device} was asked for but the Ray cluster has no GPU; use --device cpu.")
    return device


# ---- the actors and tasks -------------------------------------------------------------------------
class ClipEmbedder:
    """Ray actor: Arrow batches of manifest rows -> the same rows with embedding, loss and outcome.

    Output columns added: ``__ok`` (bool), ``__reason``/``__detail`` (str, why a row was refused),
    ``__loss`` (float64) and ``__embedding`` (fixed-size list of d float32, L2-normalised; zeros
    where not ok). Images are decoded by ``decode_threads`` threads (PIL releases the GIL while
    decoding) so that they overlap the forward pass of the previous batch's images.
    """

    def __init__(self, spec: dict, device: str, model_entry: str | None, labels: list | None, task: str,
                 threads: int):
        import torch

        from indexer.losses import ModelLoss

        torch.set_num_threads(max(1, threads))
        self.clip = load_clip(ClipSpec(**spec), device)
        self.model_loss = ModelLoss(model_entry, labels, task, device) if model_entry else None
        self.transforms = [self.clip.preprocess] + ([self.model_loss.preprocess] if self.model_loss else [])
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from indexer.images import ImageDataset, ShapeMismatch, collate

        rows = batch.column(ROW).to_numpy().astype(np.int64)
        pos = {int(r): i for i, r in enumerate(rows)}
        n, d = len(rows), self.clip.embed_dim
        ok = np.zeros(n, dtype=bool)
        reason, detail = [""] * n, [""] * n
        loss = np.full(n, np.nan)
        emb = np.zeros((n, d), dtype=np.float32)
        images = ImageDataset(batch.column(S.IMAGE).to_pylist(), rows, self.transforms)
        items = list(self.pool.map(images.__getitem__, range(n)) if self.pool else map(images.__getitem__, range(n)))
        try:
            decoded = collate(items)
        except ShapeMismatch as e:
            return _with_outcome(batch, ok, [SHAPE_MISMATCH] * n, [str(e)] * n, loss, emb)
        for row, why, more in decoded.failed:
            reason[pos[row]], detail[pos[row]] = why, more
        if len(decoded.rows):
            at = np.array([pos[int(r)] for r in decoded.rows])
            z = self.clip.encode_images(decoded.inputs[0])
            if self.model_loss is not None:
                values, bad = self.model_loss(decoded.inputs[1], decoded.rows)
            else:
                values, bad = batch.column(LOSS_IN).to_numpy()[at], {}
            for row, (why, more) in bad.items():
                reason[pos[int(row)]], detail[pos[int(row)]] = why, more
            emb[at], loss[at] = z, values
            ok[at] = [int(r) not in bad for r in decoded.rows]
        return _with_outcome(batch, ok, reason, detail, loss, emb)


def _with_outcome(batch: pa.Table, ok, reason, detail, loss, emb: np.ndarray) -> pa.Table:
    d = emb.shape[1]
    return (batch.append_column(OK, pa.array(ok)).append_column(REASON, pa.array(reason, pa.string()))
            .append_column(DETAIL, pa.array(detail, pa.string()))
            .append_column(LOSS_OUT, pa.array(loss, pa.float64()))
            .append_column(EMB, pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d)))


def write_fragments(batch: pa.Table, uri: str, schema: pa.Schema) -> pa.Table:
    """Ray task: write a batch's good rows as Lance data files of the table at ``uri``; commit nothing.

    Returns one row: ``fragments`` (JSON list of FragmentMetadata), ``rows`` written, and the
    refused rows as parallel lists ``refused_rows``/``refused_reasons``/``refused_details``.
    """
    import lance.fragment

    ok = batch.column(OK).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~ok)
    good = batch.filter(pa.array(ok))
    frags = []
    if good.num_rows:
        d = schema.field(S.EMBEDDING).type.list_size
        emb = np.asarray(good.column(EMB).combine_chunks().values.to_numpy()).reshape(-1, d)
        data = rows_table(good, schema, emb, good.column(LOSS_OUT).to_numpy())
        frags = lance.fragment.write_fragments(data, uri, schema=schema, mode="append",
                                               max_rows_per_file=max(1, data.num_rows))
    return pa.table({
        "fragments": [json.dumps([f.to_json() for f in frags])],
        "rows": [good.num_rows],
        "refused_rows": [batch.column(ROW).to_numpy()[bad].tolist()],
        "refused_reasons": [[batch.column(REASON)[int(i)].as_py() for i in bad]],
        "refused_details": [[batch.column(DETAIL)[int(i)].as_py() for i in bad]],
    })


# ---- the driver -----------------------------------------------------------------------------------
class _Committer:
    """Collects fragments from the writers and commits them in Appends of at least ``every`` rows."""

    def __init__(self, database: Database, every: int):
        self.database, self.every = database, every
        self.uri = database.table.to_lance().uri
        self.pending: list = []
        self.pending_rows = 0
        self.written = 0

    def add(self, frags: list, rows: int) -> None:
        self.pending += frags
        self.pending_rows += rows
        if self.pending_rows >= self.every:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        version = _commit(self.uri, self.pending)
        self.database.table.checkout_latest()
        self.database.update_meta(data_version=version)
        self.written += self.pending_rows
        self.pending, self.pending_rows = [], 0

    def discard(self) -> None:
        """Delete the data files of fragments that will never be committed."""
        for frag in self.pending:
            for f in frag.files:
                Path(self.uri, "data", f.path).unlink(missing_ok=True)
        self.pending, self.pending_rows = [], 0


def _commit(uri: str, frags: list) -> int:
    """One atomic Append of ``frags`` to the Lance dataset at ``uri``; returns the new version."""
    import lance

    current = lance.dataset(uri)
    done = lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=current.version)
    return int(done.version)


def _input_blocks(plan: IndexPlan, block_rows: int) -> list[pa.Table]:
    """The rows to do as Arrow tables of ``block_rows`` rows: manifest columns + ``__row`` (+ loss)."""
    todo = np.asarray(plan.todo, dtype=np.int64)
    part = plan.manifest.table.take(pa.array(todo)).append_column(ROW, pa.array(todo))
    if plan.row_losses is not None:
        part = part.append_column(LOSS_IN, pa.array(plan.row_losses.values[todo], pa.float64()))
    part = part.combine_chunks()
    return [part.slice(s, block_rows) for s in range(0, part.num_rows, block_rows)]


def index_dataset_ray(source, db, clip: ClipSpec | None = None, predictions=None, model: str | None = None,
                      task: str = "auto", batch_size: int = 64, device: str | None = "auto", strict: bool = False,
                      progress: bool = True, commit_rows: int | None = None, address: str | None = None,
                      actors: int | None = None, cpus_per_actor: float | None = None,
                      fragment_rows: int | None = None) -> IndexReport:
    """:func:`indexer.pipeline.index_dataset` on a Ray cluster (see the module doc); same arguments,
    plus: ``address`` of the cluster (None: a local Ray), ``actors``: embedding actors (default: one
    per GPU on CUDA, else one per CPU), ``cpus_per_actor`` (default: the cluster's CPUs shared among
    them, slightly under so the writer tasks find room), ``commit_rows``: rows per Lance commit
    (default 65536), ``fragment_rows``: rows per written fragment (default 16384)."""
    with writer_lock(db_folder(db), "index --engine ray") as existed:
        return _index_locked(source, db, clip, predictions, model, task, batch_size, device, strict, progress,
                             commit_rows, address, actors, cpus_per_actor, fragment_rows, existed)


def _index_locked(source, db, clip, predictions, model, task, batch_size, device, strict, progress, commit_rows,
                  address, actors, cpus_per_actor, fragment_rows, existed: bool) -> IndexReport:
    ray = connect(address)
    device = cluster_device(ray, device)
    # The driver loads the model on its CPU only to validate it and learn its embedding size.
    plan = prepare_index(source, db, clip, predictions, model, task, batch_size, "cpu", strict)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = device.startswith("cuda")
    actors = actors or (max(1, gpus) if on_gpu else max(1, int(cpus)))
    cpus_per_actor = cpus_per_actor or max(0.1, round(0.9 * cpus / actors, 2))
    commit_rows = commit_rows or RAY_COMMIT_ROWS
    fragment_rows = fragment_rows or min(FRAGMENT_ROWS, commit_rows)

    snap = _Snapshot(plan.db_path, dir_existed=existed)
    database: Database | None = plan.existing
    committer = None
    t0 = time.perf_counter()
    try:
        database = begin_writing(plan, snap)
        if plan.todo:
            committer = _Committer(database, commit_rows)
            log.info("Ray: %d rows on %d %s actor(s) (%.2f CPUs each), commits of %d rows", len(plan.todo), actors,
                     device, cpus_per_actor, commit_rows)
            _run(ray, plan, database, committer, device, batch_size, actors, cpus_per_actor, fragment_rows,
                 strict, progress)
    except KeyboardInterrupt:
        if committer is not None:
            try:
                committer.commit()  # written fragments are complete: keep them for the rerun
            except BaseException:
                committer.discard()
                raise
        raise
    except UserError:
        if committer is not None:
            committer.discard()
        snap.rollback(database)
        raise
    except BaseException:
        if committer is not None:
            committer.discard()
        raise
    written = committer.written if committer else 0
    return finish_index(plan, database, written, time.perf_counter() - t0 if written else 0.0)


def _run(ray, plan: IndexPlan, database: Database, committer: _Committer, device: str, batch_size: int,
         actors: int, cpus_per_actor: float, fragment_rows: int, strict: bool, progress: bool) -> None:
    from tqdm import tqdm

    manifest = plan.manifest
    # A block goes to one actor whole: at least 4 blocks per actor, so none idles on a small run.
    per_block = min(fragment_rows // max(1, actors), -(-len(plan.todo) // (4 * actors)))
    blocks = _input_blocks(plan, max(batch_size, per_block))
    labels = manifest.column(S.LABEL) if plan.model_loss is not None else None
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        ClipEmbedder, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor, num_gpus=1 if device.startswith("cuda") else 0,
        fn_constructor_kwargs={"spec": plan.spec.to_dict(), "device": device,
                               "model_entry": plan.model_loss.entry if plan.model_loss else None,
                               "labels": labels, "task": plan.model_loss.task_arg if plan.model_loss else "auto",
                               "threads": max(1, int(cpus_per_actor))})
    ds = ds.map_batches(write_fragments, batch_size=fragment_rows, batch_format="pyarrow", num_cpus=IO_CPUS,
                        fn_kwargs={"uri": committer.uri, "schema": database.table.schema})
    from lance.fragment import FragmentMetadata

    bar = tqdm(total=len(plan.todo), unit="img", file=sys.stderr, disable=not progress, desc="indexing (ray)")
    outputs = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    try:
        for out in outputs:
            for rec in out.to_pylist():
                refused = list(zip(rec["refused_rows"], rec["refused_reasons"], rec["refused_details"], strict=True))
                for row, why, more in refused:
                    if why == SHAPE_MISMATCH:
                        raise UserError(f"the images of {manifest.path} differ in size ({more}) and --model "
                                        f"{plan.model_loss.entry} gave no preprocessing; return (model, preprocess) "
                                        "with a preprocess that resizes them.")
                    if strict:
                        raise UserError(_reject_message(manifest, int(row), why, more))
                    plan.rejects[int(row)] = (why, more)
                frags = [FragmentMetadata.from_json(json.dumps(f)) for f in json.loads(rec["fragments"])]
                committer.add(frags, int(rec["rows"]))
                bar.update(int(rec["rows"]) + len(refused))
        committer.commit()
    except ray.exceptions.RayTaskError as e:
        # a UserError raised inside an actor (a --model whose outputs do not fit the labels) reaches
        # the user as its own one sentence, not wrapped in a remote traceback
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
    finally:
        # stop the pipeline now: an abandoned iterator would keep its actors (and their CPUs) until
        # garbage collection, and the rerun's actors would wait for them
        close = getattr(outputs, "close", None)
        if close is not None:
            close()
        bar.close()
