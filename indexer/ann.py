"""The FAISS index over the sample embeddings: exact for small tables, IVF beyond, GPU when present.

Files in ``DIR/faiss/``::

    index.faiss   the FAISS index (inner product on L2-normalised vectors = cosine similarity)
    ids.npy       (n,) unicode array: FAISS position i holds the row whose ``id`` is ids[i]
    info.json     the stamp and the index's quality: data_version, num_rows, embed_dim, clip,
                  files ({name: {bytes, sha256}} of the two files above), ids_sha256 (the ids in
                  FAISS order, :func:`indexer.integrity.ids_digest`),
                  kind ("flat" | "ivf"), nlist, nprobe, recall_at_10, recall_curve (nprobe -> recall),
                  nprobe_at_100, recall_at_100, recall_curve_at_100, build_seconds, index_bytes, gpu

Positions are mapped to ids through ``ids.npy`` because compaction and deletes can reorder the Lance
table's rows; nothing here relies on row positions.

An index is *fresh* when its stamped ``data_version``, row count, embedding size and CLIP model equal
the database's and its files are the ones written (size on every status check, SHA-256 on load). A stale index is rebuilt (``load_index(db)``) or refused with a
:class:`~indexer.errors.UserError` (``load_index(db, rebuild_if_stale=False)``), never served.

IVF: ``nlist = 4 * sqrt(n)`` cells (k-means trained on a random sample of at most ``64 * nlist`` rows).
``nprobe`` is the smallest power of two whose recall@10 against exact search reaches ``target_recall``
(0.95) in every family of held queries; ``nprobe_at_100`` likewise for recall@100, the depth of the
query engine's candidate pool (``AnnIndex.nprobe_for(k)`` picks the probe count for any depth). The
families, drawn from the training sample: stored embeddings (their own row excluded from both
rankings, so a vector finding itself does not inflate recall), normalised midpoints of two random
stored embeddings, and stored embeddings minus the (sample's) mean, which sit off the data manifold
the way text queries do.

The IVF build streams; see :mod:`indexer.ann_build`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from indexer.ann_build import build_flat, build_ivf, faiss_module, gpu_available
from indexer.errors import Unavailable, UserError
from indexer.integrity import checksum_problem, file_checksum, ids_digest, size_problem, write_error
from indexer.store import Database, write_json_atomic

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
INFO_FILE = "info.json"
#: flock(2)ed by builders (exclusive) and loaders (shared), see _folder_lock
LOCK_FILE = ".lock"
#: Rebuild-and-load rounds before a query gives up on a table that keeps changing under it.
LOAD_ATTEMPTS = 5

#: Tables up to this many rows get an exact (flat) index: fast enough and recall 1.
EXACT_MAX_ROWS = 20_000
TARGET_RECALL = 0.95


def _as_db(db) -> Database:
    return db if isinstance(db, Database) else Database(db)


# ---- status ---------------------------------------------------------------------------------------
def _read_info(db: Database) -> dict | None:
    import json

    path = db.faiss_dir / INFO_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a torn write never happens (atomic), but a hand-edited file may be junk


def _stamp(db: Database) -> dict:
    return {
        "data_version": db.data_version,
        "num_rows": db.count_rows(),
        "embed_dim": db.embed_dim,
        "clip": db.clip_identity,
    }


def _stale_reason(info: dict | None, stamp: dict) -> str | None:
    if info is None:
        return "no FAISS index was built"
    for key, what in (("data_version", "data version"), ("num_rows", "row count"),
                      ("embed_dim", "embedding size"), ("clip", "CLIP model")):
        if info.get(key) != stamp[key]:
            return f"the index covers {what} {info.get(key)!r} but the table has {stamp[key]!r}"
    return None


def index_status(db) -> dict:
    """The stored index's info.json plus ``exists``, ``fresh`` and ``reason`` (why it is stale).

    Cheap: the stamp against the table, and each file's size against the size recorded when it was
    written (a truncated file reads as stale); :func:`load_index` also verifies their SHA-256."""
    db = _as_db(db)
    info = _read_info(db)
    reason = _stale_reason(info, _stamp(db))
    files_ok = all((db.faiss_dir / f).exists() for f in (INDEX_FILE, IDS_FILE))
    if reason is None and not files_ok:
        reason = "the index files are missing"
    if reason is None and not isinstance(info.get("files"), dict):
        reason = "the index was written without checksums (by an older llm2loss)"
    if reason is None:
        reason = next(filter(None, (size_problem(db.faiss_dir / f, info["files"].get(f))
                                    for f in (INDEX_FILE, IDS_FILE))), None)
        if reason is not None:
            reason = f"the index files are damaged: {reason}"
    return {**(info or {}), "exists": info is not None and files_ok, "fresh": reason is None,
            "reason": reason}


def _read_files(db: Database, status: dict):
    """(index, ids) read from the folder when both files are the ones stamped in ``status`` (size,
    SHA-256) and agree with each other; otherwise a sentence saying what is damaged."""
    faiss = faiss_module()
    files = status.get("files") or {}
    for name in (INDEX_FILE, IDS_FILE):
        problem = checksum_problem(db.faiss_dir / name, files.get(name))
        if problem is not None:
            return f"the index files are damaged: {problem}"
    try:
        index = faiss.read_index(str(db.faiss_dir / INDEX_FILE))
        ids = np.load(db.faiss_dir / IDS_FILE, allow_pickle=False)
    except (RuntimeError, OSError, ValueError) as e:
        return f"the index files cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if index.ntotal != len(ids) or len(ids) != status["num_rows"]:
        return f"the index files disagree ({index.ntotal} vectors, {len(ids)} ids, {status['num_rows']} stamped)"
    return index, ids


@contextmanager
def _folder_lock(db: Database, exclusive: bool):
    """Hold ``DIR/faiss/.lock``: exclusive while building, shared while reading the stamp and files.

    The three files are replaced one by one, so without it a reader racing a builder (a second query
    engine, an ``index`` run) paired one build's index with another's ids (measured: 8 engines
    searching during a re-index got "FAISS files disagree" and KeyError errors), and every stale
    engine rebuilt the index itself. flock works across processes and across threads (each call
    opens its own file description). A folder that cannot be written is read without the lock.
    """
    import fcntl

    try:
        db.faiss_dir.mkdir(parents=True, exist_ok=True)
        f = open(db.faiss_dir / LOCK_FILE, "a+")  # noqa: SIM115 -- closed below
    except OSError as e:
        log.debug("no FAISS folder lock in %s: %s", db.faiss_dir, e)
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        f.close()  # releases the lock


def build_index(db, force: bool = False, exact_max_rows: int = EXACT_MAX_ROWS,
                target_recall: float = TARGET_RECALL, seed: int = 0) -> dict:
    """Build (or keep, when fresh and not ``force``) the FAISS index of ``db``; returns its info.

    ``exact_max_rows``: tables up to this many rows get an exact ``IndexFlatIP``; larger ones an
    ``IndexIVFFlat`` whose ``nprobe`` reaches ``target_recall`` recall@10 (see module doc). Built on
    the GPU when faiss sees one, stored as a CPU index. Writes are atomic per file and info.json
    (the stamp) is removed first and written last, so a crash leaves an index that reads as stale.
    """
    db = _as_db(db)
    with _folder_lock(db, exclusive=True):  # one builder at a time; the freshness check is inside
        return _build_index(db, force, exact_max_rows, target_recall, seed)


def _build_index(db: Database, force: bool, exact_max_rows: int, target_recall: float, seed: int) -> dict:
    status = index_status(db)
    if status["fresh"] and not force:
        log.info("FAISS index is fresh (%d rows); not rebuilding", status["num_rows"])
        return {k: v for k, v in status.items() if k not in ("exists", "fresh", "reason")}
    t0 = time.perf_counter()
    stamp = _stamp(db)
    from indexer import ann_large  # IVF-PQ, streamed, for tables whose vectors do not fit in memory

    if ann_large.wants_compressed(stamp["num_rows"], stamp["embed_dim"]):
        return ann_large.build_compressed(db, target_recall=target_recall, seed=seed)
    ds = db.table.to_lance()  # one version of the table for the whole build
    n = ds.count_rows()
    if n == 0:
        raise UserError(f"the database {db.path} has no rows to index; run `llm2loss index` with a manifest first.")
    if n <= exact_max_rows:
        ids, x = db.embeddings()
        x = np.ascontiguousarray(x, dtype=np.float32)
        index, info = build_flat(x)
        ids_arr = np.asarray(ids.tolist(), dtype=str)  # fixed-width unicode: np.load needs no pickle
    else:  # streamed: the vectors are never held outside FAISS (peak ~1x raw plus one batch)
        index, info, ids_arr = build_ivf(ds, n, stamp["embed_dim"], target_recall, seed)
    # rows appended since _stamp are in the index; a newer data_version marks it stale
    stamp["num_rows"] = len(ids_arr)

    def write_ids(path: str) -> None:
        with open(path, "wb") as f:
            np.save(f, ids_arr, allow_pickle=False)

    info.update(stamp)
    info["ids_sha256"] = ids_digest(ids_arr)
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    write_index_files(db, index, write_ids, info)
    _ensure_id_index(db)
    log.info("FAISS %s index over %d rows built in %.1f s (recall@10 %.3f)", info["kind"],
             info["num_rows"], info["build_seconds"], info["recall_at_10"])
    return info


def write_index_files(db: Database, index, write_ids, info: dict) -> None:
    """Write ``index.faiss`` and ``ids.npy`` (``write_ids(path)`` writes the latter) each through a
    temporary file and a rename, then ``info.json`` with both files' checksums, last: a crash leaves
    an index that reads as stale, and a failed write (a full disk) leaves no temporary file behind and
    becomes one sentence. Sets ``info["files"]``, ``index_bytes``, ``ids_bytes``."""
    faiss = faiss_module()
    out = db.faiss_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)  # the stamp goes last: a crash reads as stale
    tmps: list[str] = []
    try:
        for suffix in (".npy.tmp", ".faiss.tmp"):
            fd, tmp = tempfile.mkstemp(dir=out, suffix=suffix)
            os.close(fd)
            tmps.append(tmp)
        tmp_ids, tmp_index = tmps
        write_ids(tmp_ids)
        faiss.write_index(index, tmp_index)
        files = {INDEX_FILE: file_checksum(tmp_index), IDS_FILE: file_checksum(tmp_ids)}
        os.replace(tmp_index, out / INDEX_FILE)
        os.replace(tmp_ids, out / IDS_FILE)
        info["files"] = files
        info["index_bytes"], info["ids_bytes"] = files[INDEX_FILE]["bytes"], files[IDS_FILE]["bytes"]
        write_json_atomic(out / INFO_FILE, info)
    except (OSError, RuntimeError) as e:  # faiss reports a failed write as a RuntimeError
        err = write_error(e, f"the FAISS index in {out}", None)
        if err is None:
            raise
        raise err from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _ensure_id_index(db: Database) -> None:
    """A BTREE index on ``id`` so the query engine's fetch of candidate rows by id stays fast.

    It changes the Lance version but not the rows (so not ``data_version``). Fragments added later
    are still found (scanned) until ``Database.cleanup`` (optimize) folds them into the index.
    """
    from indexer import schema as S

    try:
        if any(S.ID in ix.columns for ix in db.table.list_indices()):
            return
        from lancedb.index import BTree

        db.table.create_index(S.ID, config=BTree())
    except Exception as e:  # an optimisation only: a failure must not fail the build
        log.warning("could not create the scalar index on %s: %s", S.ID, e)


# ---- loading and searching ------------------------------------------------------------------------
@dataclass
class AnnIndex:
    """A loaded FAISS index and the ids of its positions.

    ``search(queries, k)`` -> (sims (m, k) float32 inner products, ids (m, k) object str), best
    first; slots with no neighbour (an IVF probe that found too few) hold sim ``-inf`` and id
    ``None``; k is capped at the number of rows. IVF probes ``nprobe_for(k)`` cells unless
    ``nprobe`` is given.
    """

    index: object
    ids: np.ndarray
    info: dict = field(default_factory=dict)
    #: faiss.StandardGpuResources kept alive as long as a GPU index uses it
    gpu_resources: object = None
    #: (ntotal,) int32: the IVF cell of each position, built on the first deepening search
    _cells: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def nprobe_for(self, k: int) -> int:
        """Cells to probe for a search of depth k: the values tuned for recall@10 and recall@100
        (log-interpolated between them), and beyond 100 the recall@100 value scaled by k / 100."""
        if self.info.get("kind") != "ivf":
            return 0  # exact index: nothing to probe
        p10 = int(self.info["nprobe"])
        p100 = int(self.info.get("nprobe_at_100") or p10)
        if k <= 10:
            p = p10
        elif k <= 100:
            t = math.log(k / 10) / math.log(10)
            p = math.exp((1 - t) * math.log(p10) + t * math.log(p100))
        else:
            p = p100 * k / 100
        return int(min(self.info["nlist"], math.ceil(p)))

    @property
    def can_deepen(self) -> bool:
        """Whether :meth:`search_deepening` applies: an IVF index searched on the CPU."""
        return self.info.get("kind") == "ivf" and self.gpu_resources is None and hasattr(self.index, "quantizer")

    def cells(self) -> np.ndarray:
        """(ntotal,) int32: the IVF cell (inverted list) holding each position."""
        if self._cells is None:
            faiss = faiss_module()
            lists, cells = self.index.invlists, np.full(self.ntotal, -1, np.int32)
            for c in range(self.index.nlist):
                size = lists.list_size(c)
                if size:
                    cells[faiss.rev_swig_ptr(lists.get_ids(c), size)] = c
            self._cells = cells  # idempotent: two threads building it at once build the same array
        return self._cells

    def search_deepening(self, query: np.ndarray, k: int, near: int, far: int, look: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        """One query's ``k`` most similar rows as ``search_positions`` gives them, probing its ``near``
        nearest cells, then also its cells ``near`` to ``far`` when any of the ``look`` most similar
        rows found lies in the farther half of the near cells (the neighbourhood may go on past
        them). A deepened search returns what a search probing ``far`` cells returns: the same
        cells, searched in two parts whose results are merged (equal similarities aside)."""
        faiss = faiss_module()
        q = np.ascontiguousarray(np.atleast_2d(query)[:1], dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        near, far = int(min(near, far)), int(min(far, self.info["nlist"]))
        dq, iq = self.index.quantizer.search(q, far)

        def probe(a: int, b: int):
            # FAISS reads nprobe cells per query from the lists given, so nprobe goes with them as a
            # per-call parameter (the python wrapper would take the index's own, shared by threads)
            cells, dist = np.ascontiguousarray(iq[:, a:b]), np.ascontiguousarray(dq[:, a:b])
            sims, pos = np.empty((1, k), np.float32), np.empty((1, k), np.int64)
            self.index.search_preassigned_c(1, faiss.swig_ptr(q), k, faiss.swig_ptr(cells), faiss.swig_ptr(dist),
                                            faiss.swig_ptr(sims), faiss.swig_ptr(pos), False,
                                            faiss.SearchParametersIVF(nprobe=b - a))
            return sims, pos

        sims, pos = probe(0, near)
        found = pos[0, :look]
        found = found[found >= 0]
        if near < far and np.isin(self.cells()[found], iq[0, near // 2 : near]).any():
            s2, p2 = probe(near, far)
            s_all, p_all = np.concatenate([sims[0], s2[0]]), np.concatenate([pos[0], p2[0]])
            s_all = np.where(p_all >= 0, s_all, -np.inf)
            order = np.argsort(-s_all, kind="stable")[:k]
            sims, pos = s_all[order][None, :], p_all[order][None, :]
        sims = sims.astype(np.float32, copy=False)
        sims[pos < 0] = -np.inf
        return sims, pos

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        sims, pos = self.search_positions(queries, k, nprobe)
        missing = pos < 0
        out_ids = self.ids[np.where(missing, 0, pos)].astype(object)
        out_ids[missing] = None
        return sims, out_ids

    def search_subset(self, queries: np.ndarray, k: int, mask: np.ndarray,
                      nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Search among the positions where ``mask`` ((ntotal,) bool) is True: (sims, positions) as
        in ``search_positions``. IVF probes ``nprobe`` cells (default: all of them, which is exact)."""
        if self.gpu_resources is not None:
            raise NotImplementedError("GPU indexes take no id selector")
        faiss = faiss_module()
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), int(mask.sum())))
        bitmap = np.packbits(mask.astype(bool), bitorder="little")  # faiss reads bit i at byte i >> 3
        sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        if self.info.get("kind") == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(min(nprobe or self.info["nlist"], self.info["nlist"])))
        else:
            params = faiss.SearchParameters(sel=sel)
        sims, pos = self.index.search(q, k, params=params)
        sims = sims.astype(np.float32, copy=False)
        sims[pos < 0] = -np.inf
        return sims, pos

    def search_positions(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like ``search`` but (sims (m, k) float32, FAISS positions (m, k) int64, -1 where none)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        if self.info.get("kind") == "ivf" and (nprobe is not None or k > 10):
            faiss = faiss_module()
            nprobe = int(min(nprobe or self.nprobe_for(k), self.info["nlist"]))
            if self.gpu_resources is not None:  # GPU indexes take no per-call parameters
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", nprobe)
                sims, pos = self.index.search(q, k)
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", self.info["nprobe"])
            else:
                sims, pos = self.index.search(q, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        else:
            sims, pos = self.index.search(q, k)
        sims = sims.astype(np.float32, copy=False)
        sims[pos < 0] = -np.inf
        return sims, pos


def load_index(db, rebuild_if_stale: bool = True) -> AnnIndex:
    """The fresh FAISS index of ``db``; a missing, stale or damaged one (a file whose size or SHA-256
    is not the one stamped at build, ids in another order included) is rebuilt, or refused when
    ``rebuild_if_stale`` is False. Never served. Moved to the GPU when faiss sees one."""
    db = _as_db(db)
    faiss = faiss_module()
    for _ in range(LOAD_ATTEMPTS):
        # the stamp and both files are read as one set, never half from a concurrent build
        with _folder_lock(db, exclusive=False):
            status = index_status(db)
            damaged = status["fresh"] and isinstance(loaded := _read_files(db, status), str)
            if status["fresh"] and not damaged:
                index, ids = loaded
                break
            if damaged:
                status = {**status, "fresh": False, "reason": loaded}
        damaged = damaged or "damaged" in (status["reason"] or "")
        if not rebuild_if_stale:
            if damaged:
                raise Unavailable(f"the FAISS index in {db.faiss_dir} is not used ({status['reason']}); run "
                                  f"`llm2loss check --db {db.path} --repair` to rebuild it.")
            raise UserError(
                f"the FAISS index in {db.faiss_dir} is stale ({status['reason']}); rebuild it with "
                "indexer.ann.build_index(db) (the query engine and `llm2loss index` do so by default)."
            )
        (log.warning if damaged else log.info)("rebuilding the FAISS index: %s", status["reason"])
        # not forced when stale: whoever held the lock before us may have rebuilt it already; forced
        # when damaged (the stamp is right, the files are not)
        build_index(db, force=damaged)
    else:
        # An `index` run is still appending: each rebuild was outdated by the next commit. Serve the
        # newest complete build (it covers one earlier version of the table, and says so in the log)
        # rather than fail every query until the run ends (measured: 1 of 1,600 searches failed).
        with _folder_lock(db, exclusive=False):
            status = index_status(db)
            if not status["exists"]:
                raise UserError(
                    f"the table in {db.path} kept changing while its FAISS index was built (an `llm2loss "
                    "index` run is writing it); query again when that run has finished."
                )
            loaded = _read_files(db, status)
        if isinstance(loaded, str):
            raise Unavailable(f"the FAISS index in {db.faiss_dir} is not used ({loaded}); run "
                              f"`llm2loss check --db {db.path} --repair` to rebuild it.")
        index, ids = loaded
        log.warning("the table is being written (%s); searching the FAISS index of %d rows built meanwhile",
                    status["reason"], len(ids))
    if status.get("kind") == "ivf":
        index.nprobe = int(status["nprobe"])
    res = None
    if gpu_available():
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
    info = {k: v for k, v in status.items() if k not in ("exists", "fresh", "reason")}
    return AnnIndex(index=index, ids=ids, info=info, gpu_resources=res)
