"""The query engine: sentences, images and mixes of both -> rows ranked by predicted failure.

    text / image -> CLIP embedding (the model recorded in the database) -> query vector u
    -> FAISS: its neighbourhood, the 10 N most similar rows (N = candidates, many more than k),
       probing the IVF cells a search 2 N deep needs (module doc, "Probing the neighbourhood")
    -> the pool: the neighbourhood's rows that stand out as about the query (at least N)
    -> ranked by the score documented in :mod:`search_ui.ranking`:
       score = (1 - w) * z(similarity) + w * z(predicted_loss), standardised over the neighbourhood.

Composite queries
-----------------
A query is a list of components ``c_j`` (CLIP embeddings of phrases or images, unit length) with
weights ``w_j > 0`` and a sign (+ for what to find, - for what to avoid: CLIP alone ignores "not").
Its similarity to a row ``x`` is a weighted mean of cosines::

    sim(x) = sum_j sign_j * a_j * cos(x, c_j) / sum_{j positive} a_j,     a_j = w_j / sigma_j

where ``sigma_j`` is the spread (std) of ``cos(x, c_j)`` over a sample of stored rows. Dividing by it
puts every component in the same units, which matters because an image's cosines to other images
are several times larger and wider than a phrase's (CLIP's modality gap): without it an example
image would drown the phrase beside it. ``sim`` is linear in ``x``, so FAISS ranks by it exactly with
the single query vector ``u = sum_j sign_j a_j c_j / sum_{j positive} a_j``. For one positive
component alone ``u = c`` and ``sim`` is the plain cosine similarity.

Filters
-------
``where`` is a filter in the language of :mod:`search_ui.filters` (comparisons, AND / OR / NOT, IN,
LIKE, BETWEEN, IS NULL over the table's columns; no functions), parsed and checked against the
table's columns first; only the canonical SQL re-emitted from the parsed tree reaches LanceDB, and
its evaluation is bounded in time. The neighbourhood is then made of *matching* rows, so k
results come back whenever k rows match: LanceDB evaluates the filter to a set of rows (once per
filter and table version) and FAISS searches among them with an id selector, probing as many IVF
cells as an unfiltered search 2 N / (share of matching rows) deep (below), and every cell when that
finds fewer rows than the neighbourhood (see :mod:`search_ui.rowcache`, which also keeps the small
columns in memory so that fetching a query's rows costs ~0.1 ms). Without the row cache
(``cache_rows=False``, or a GPU index), FAISS is asked for the neighbourhood / (share of matching
rows) * 2 neighbours, growing while too few match, and LanceDB's exact filtered scan takes over
beyond ``max_ann_fetch``.

Probing the neighbourhood
-------------------------
On an IVF index the neighbourhood is searched with the cells a search as deep as twice the least
pool probes (``nprobe_for(2 N)``, :data:`POOL_PROBE_DEPTH`), not with the neighbourhood's own
(``nprobe_for(10 N)``: five times as many, 320 of 1265 cells at 100k rows, where that search took
0.9 ms at 128 dims and 4.8 ms at 512 against 0.4 and 1.5 ms). Results come from the pool, so only
the pool's rows must be found; the rows past it give the z-scores their mean and spread, and the
most similar rows of the cells nearest the query give nearly the same ones. Twice N, because a pool
reaches past N when a group of rows stands out, and because N's own cells find even a pool N deep
incompletely for queries off the data (random directions: recall@100 0.98 at 128 dims, 0.87 at
512). Measured in BENCHMARKS.md (issue 5, 2026-12-03), overlap@10 of the default ranking with the
ranking of the exact neighbourhood for random-direction queries (the worst case): N's cells 0.93 /
0.84 (128 / 512 dims), 2 N's 0.98 / 0.96, 4 N's 1.0 / 1.0, 10 N's 1.0. The probe always covers
cells enough to hold :data:`PROBE_FILL` times the neighbourhood on average; when it still finds
fewer rows than the neighbourhood asks for (unbalanced cells), the search is repeated as deep as
the neighbourhood (filtered: exactly). A filter divides both depths by the share of matching rows.

Unfiltered queries on a large CPU index (its far cells holding :data:`TWO_STEP_MIN_SCAN` row
dimensions or more) probe in two steps (``AnnIndex.search_deepening``): first the
cells of a search N deep; only when any of the 2 N most similar rows found lies in the farther half
of those cells (the neighbourhood may go on past them: queries off the data) are the cells up to
2 N's probed as well, and the two parts merged, which gives what probing 2 N's cells at once gives.
Measured at 1M rows (BENCHMARKS.md, issue 27): for 300 caption queries and 300 random directions,
the same ids in the same order as probing 2 N's cells every time; about one caption query in six,
and every random direction, went on to the far cells; the ANN part of a caption query 4.3 -> 3.0 ms,
of a random direction 4.6 -> 4.9 ms. On a small index the second FAISS call costs more than the
cells it spares (100k x 128, random directions: 0.29 -> 0.55 ms), hence the size bound.

Repeated phrases
----------------
Text embeddings are remembered in a bounded LRU (:data:`TEXT_CACHE`, ``TEXT_CACHE_SIZE`` phrases)
keyed by the CLIP identity recorded in the database and the device, so a phrase asked again (a
popular query, a failure mode's name, a benchmark's repeats) skips the text tower: every engine of a
process (CLI, UI, HTTP API) shares it, and engines of different models never mix entries.

Threads
-------
One engine may serve several threads at once (the UI's queue, the HTTP API's thread pool): loading
CLIP, the FAISS index, the row cache and the sigma sample happen once under locks, the index and the
row cache are swapped as one pair, ``notes`` and ``timings`` are per thread, and FAISS searches on
the CPU release the GIL and run side by side. A GPU index sets search parameters on the shared index,
so its searches are serialised.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexer import schema as S
from indexer.errors import UserError
from indexer.store import Database
from search_ui.filters import Filter, matching_row_ids, parse_filter
from search_ui.ranking import (
    DEFAULT_WEIGHT,
    SearchResult,
    default_candidates,
    loss_spread,
    neighbourhood_size,
    rank,
)
from search_ui.rowcache import RowCache

log = logging.getLogger(__name__)

DEFAULT_NEGATIVE_WEIGHT = 0.5
#: The neighbourhood's IVF probe: the cells of a search this many least pools deep (module doc).
POOL_PROBE_DEPTH = 2
#: ... and cells enough to hold this many times the neighbourhood's rows on average.
PROBE_FILL = 2
SIGMA_SAMPLE_ROWS = 2048
#: Row dimensions the far cells of a neighbourhood probe must hold before it is done in two steps:
#: 1M x 512 (128 cells of 250 rows: 16M) pays, 100k x 128 and 100k x 512 (0.6M and 2.6M) do not.
TWO_STEP_MIN_SCAN = 8_000_000
#: Phrases whose text embeddings are remembered (512-d: 2 KiB each, 8 MiB in all).
TEXT_CACHE_SIZE = 4096


class TextEmbeddingCache:
    """A thread-safe LRU of text embeddings: (model key, phrase) -> (d,) float32 unit vector."""

    def __init__(self, maxsize: int = TEXT_CACHE_SIZE):
        self.maxsize = int(maxsize)
        self._d: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple[str, str], v: np.ndarray) -> None:
        v = np.array(v, dtype=np.float32)  # a private copy, never handed out itself
        v.setflags(write=False)
        with self._lock:
            self._d[key] = v
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


#: Shared by every engine of this process (see module doc, "Repeated phrases").
TEXT_CACHE = TextEmbeddingCache()


@dataclass
class _Pool:
    """A query's neighbourhood, most similar first: similarities and predicted losses, (m,) each
    (NaN: not predicted); ``ids(idx)`` gives the ids (a str array) and ``rows(idx)`` the full rows
    (every column but the embedding, as dicts) at indices ``idx``, looked up only for the rows the
    ranking reads; ``spread`` is the std of predicted loss over the table (the ranking's floor)."""

    ids: Callable[[np.ndarray], np.ndarray]
    sims: np.ndarray
    pred: np.ndarray
    rows: Callable[[np.ndarray], list[dict]]
    spread: float = 0.0

    @staticmethod
    def empty() -> _Pool:
        return _Pool(lambda idx: np.zeros(0, dtype=str), np.zeros(0), np.zeros(0), lambda idx: [])


def parse_weighted(item, default: float = 1.0) -> tuple[object, float]:
    """``"TEXT:W"`` -> (TEXT, W); a plain string or object -> (it, default); a pair passes through."""
    if isinstance(item, tuple | list):
        thing, w = item
        return thing, float(w)
    if isinstance(item, str) and ":" in item:
        head, tail = item.rsplit(":", 1)
        try:
            return head, float(tail)
        except ValueError:
            pass
    return item, default


def with_pool_only(where: Filter | None, pool_only: bool) -> Filter | None:
    """``where`` (already checked: :func:`search_ui.filters.parse_filter`) restricted to the
    unlabeled pool (``split = 'pool'``) when ``pool_only``; the clause is ours, made of the checked
    filter's SQL and a fixed comparison."""
    if not pool_only:
        return where
    pool = f"{S.SPLIT} = '{S.POOL_SPLIT}'"
    if where is None:
        return Filter(text=pool, sql=pool, columns=(S.SPLIT,))
    return Filter(text=f"{where.text} (in the unlabeled pool)", sql=f"({where.sql}) AND {pool}",
                  columns=tuple(dict.fromkeys([*where.columns, S.SPLIT])))


def neighbourhood_nprobe(ann, least: int, rows: int, share: float = 1.0, depth: float = POOL_PROBE_DEPTH) -> int:
    """IVF cells to probe for a neighbourhood of ``rows`` rows whose least pool is ``least`` deep,
    among a ``share`` (0..1] of the index's rows (module doc, "Probing the neighbourhood"): as many
    as a search ``depth * least / share`` deep, and enough to hold ``PROBE_FILL`` x ``rows``
    matching rows on average; 0 for an exact index."""
    if ann.info.get("kind") != "ivf":
        return 0
    nlist, share = int(ann.info["nlist"]), max(float(share), 1e-12)
    hold = math.ceil(PROBE_FILL * rows * nlist / max(share * ann.ntotal, 1.0))
    return min(nlist, max(ann.nprobe_for(int(math.ceil(depth * least / share))), hold))


def _two_steps_pay(ann, far: int) -> bool:
    """Whether probing in two steps (module doc, "Probing the neighbourhood") can pay: only when the
    far cells hold enough to scan (:data:`TWO_STEP_MIN_SCAN` row dimensions) that sparing half of them
    outweighs a second FAISS call when a query goes on to them."""
    dim = int(getattr(ann.index, "d", 0) or 0)
    return far * ann.ntotal / max(int(ann.info["nlist"]), 1) * dim >= TWO_STEP_MIN_SCAN


def _row_columns(schema: pa.Schema) -> list[str]:
    """The columns a query reads: all but the vector and the file identities (not results)."""
    return [f.name for f in schema if f.name != S.EMBEDDING and f.name not in S.IDENTITY_COLUMNS]


def _sql_in(ids: list[str]) -> str:
    return f"{S.ID} IN (" + ",".join("'" + str(i).replace("'", "''") + "'" for i in ids) + ")"


def _blank(phrase) -> bool:
    return isinstance(phrase, str) and not phrase.strip()


class QueryEngine:
    """Search one database. The CLIP model and the FAISS index load on first use.

    ``db``: a database folder or :class:`~indexer.store.Database`. ``device``: for the CLIP model
    (default: cuda when present). ``rebuild_if_stale``: rebuild a stale FAISS index (True) or
    refuse it with a UserError (False); either way a stale one is never served. ``max_ann_fetch``:
    most FAISS neighbours fetched for a filtered query before a filtered scan takes over.
    ``cache_rows``: keep the non-vector columns in memory (:mod:`search_ui.rowcache`).
    After each query, ``notes`` holds warnings worth showing a person and ``timings`` the seconds
    spent in encode / ann / fetch / rank / total (both per thread: see module doc, "Threads").
    """

    def __init__(self, db, device: str | None = None, rebuild_if_stale: bool = True,
                 max_ann_fetch: int = 4096, cache_rows: bool = True):
        self.db = db if isinstance(db, Database) else Database(db)
        self.device = device
        self.rebuild_if_stale = rebuild_if_stale
        self.max_ann_fetch = max_ann_fetch
        self._clip = None
        self._ann = None
        self._sample = None
        self.cache_rows = cache_rows
        self._rows: RowCache | None = None
        self._seen_version = self._seen_signature = None
        self._reload_lock = threading.Lock()
        self._load_lock = threading.Lock()  # CLIP and the sigma sample load once
        self._mask_lock = threading.Lock()  # the row cache's filter masks are a shared dict
        self._gpu_lock = threading.Lock()  # a GPU index's search parameters are set on the index
        self._local = threading.local()
        self._clip_key: str | None = None
        # the table's schema as of the last refresh (filters are checked against it): asking LanceDB
        # for it costs ~1.4 ms, a sixth of a whole query at 1M rows
        self._schema = self.db.table.schema
        self._columns = _row_columns(self._schema)
        # the files whose modification times make the change signature, as strings: stat()ed on every query
        self._signature_files = (str(self.db.path / f"{S.TABLE_NAME}.lance" / "_versions"), str(self.db.meta_path))

    # ---- per-thread query state ---------------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        """The calling thread's last query's warnings."""
        return self._local.__dict__.setdefault("notes", [])

    @notes.setter
    def notes(self, value: list[str]) -> None:
        self._local.notes = value

    @property
    def timings(self) -> dict[str, float]:
        """The calling thread's last query's seconds per part."""
        return self._local.__dict__.setdefault("timings", {})

    @timings.setter
    def timings(self, value: dict[str, float]) -> None:
        self._local.timings = value

    # ---- lazily loaded parts -----------------------------------------------------------------
    @property
    def clip(self):
        if self._clip is None:
            with self._load_lock:
                if self._clip is None:
                    from indexer.clip import clip_for_database

                    meta = self.db.read_meta()
                    clip = clip_for_database(meta, self.device)
                    self._clip_key = json.dumps([meta.get("clip"), str(getattr(clip, "device", ""))],
                                                sort_keys=True, default=str)
                    self._clip = clip
        return self._clip

    @property
    def ann(self):
        """The FAISS index, reloaded (or rebuilt) whenever the table's rows changed since."""
        self._refresh()
        return self._ann

    def _refresh(self) -> None:
        """One Lance version read per query; the index and the row cache are checked and reloaded
        only when the table changed (any commit, ``predicted_loss`` writes included)."""
        from indexer import ann

        sig = self._change_signature()
        if self._ann is not None and sig is not None and sig == self._seen_signature:
            return
        with self._reload_lock:  # the web UI queries from several threads
            version = self.db.version
            if self._ann is not None and version == self._seen_version:
                self._seen_signature = sig
                return
            info = self._ann.info if self._ann is not None else {}
            if info.get("data_version") != self.db.data_version or info.get("num_rows") != self.db.count_rows():
                self._ann = ann.load_index(self.db, rebuild_if_stale=self.rebuild_if_stale)
            self._schema = self.db.table.schema
            self._columns = _row_columns(self._schema)
            self._rows = RowCache.load(self.db, self._ann.ids, self._columns) if self.cache_rows else None
            pred = self._rows.pred if self._rows is not None else \
                self.db.read([S.PREDICTED_LOSS]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)
            # swapped as one, for queries running meanwhile
            self._state = (self._ann, self._rows, loss_spread(pred))
            self._seen_version, self._seen_signature = version, sig

    def _change_signature(self) -> tuple | None:
        """Modification times of the table's version folder and of meta.json: every Lance commit
        adds a manifest to ``_versions``. Equal signatures spare the per-query version read
        (~0.3 ms); ``None`` (another storage layout) means always read the version."""
        versions, meta = self._signature_files
        try:
            sig = os.stat(versions).st_mtime_ns, os.stat(meta).st_mtime_ns
        except OSError:
            return None
        # File systems stamp times in coarse ticks: a commit in the same tick as the last one would
        # leave the signature unchanged, so only a signature older than a second is trusted.
        return sig if time.time_ns() - max(sig) > 1_000_000_000 else None

    def _sigma(self, c: np.ndarray) -> float:
        """Std of cos(x, c) over a sample of stored rows (see module doc); c (d,) unit."""
        if self._sample is None:
            with self._load_lock:
                if self._sample is None:
                    ds = self.db.table.to_lance()
                    n = ds.count_rows()
                    t = ds.sample(min(SIGMA_SAMPLE_ROWS, n), columns=[S.EMBEDDING]) if n > SIGMA_SAMPLE_ROWS \
                        else ds.to_table(columns=[S.EMBEDDING])
                    col = t.column(S.EMBEDDING).combine_chunks()
                    self._sample = np.asarray(col.values.to_numpy()).reshape(len(t), -1).astype(np.float32)
        sd = float((self._sample @ c).std())
        return sd if sd > 1e-6 else 1.0

    # ---- turning a query into a vector -------------------------------------------------------
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Phrases -> (n, d) float32 unit CLIP text embeddings (a new array); phrases seen before
        come from :data:`TEXT_CACHE`, the others are encoded in one batch."""
        texts = [str(t) for t in texts]
        clip = self.clip
        found = [TEXT_CACHE.get((self._clip_key, t)) for t in texts]
        todo = list(dict.fromkeys(t for t, v in zip(texts, found, strict=True) if v is None))
        if todo:
            new = dict(zip(todo, clip.encode_text(todo), strict=True))
            for t, v in new.items():
                TEXT_CACHE.put((self._clip_key, t), v)
            found = [new[t] if v is None else v for t, v in zip(texts, found, strict=True)]
        if not found:
            return np.zeros((0, clip.embed_dim), np.float32)
        return np.array(found, dtype=np.float32)  # a new array (the cached rows are shared)

    def stored_embedding(self, sample_id: str) -> np.ndarray | None:
        """(d,) float32 embedding of a stored row, or None when no row has that id."""
        t = self.db.read([S.EMBEDDING], where=_sql_in([sample_id]))
        if t.num_rows == 0:
            return None
        return np.asarray(t.column(S.EMBEDDING)[0].values.to_numpy(), dtype=np.float32)

    def encode_image(self, path: str | Path) -> np.ndarray:
        """An image file -> (d,) float32 unit CLIP embedding, preprocessed like the indexed images."""
        from indexer.images import ImageRefused, open_image

        try:
            rgb = open_image(path)  # the indexer's own check: pixel budget before decoding, no bombs
        except ImageRefused as e:
            raise e.user_error() from None
        pixels = self.clip.preprocess(rgb).unsqueeze(0)
        return self.clip.encode_images(pixels)[0]

    def resolve_image(self, item, allow_paths: bool = True) -> tuple[np.ndarray, str | None]:
        """A stored id, an image path or a (d,) vector -> (embedding, the stored id or None).

        ``allow_paths=False`` (a server answering remote callers) accepts stored ids only: a string
        that is no stored id is refused without ever being opened as a file."""
        if isinstance(item, np.ndarray):
            v = np.asarray(item, np.float32).reshape(-1)
            return v / max(float(np.linalg.norm(v)), 1e-12), None
        item = str(item)
        v = self.stored_embedding(item)
        if v is not None:
            return v, item
        if not allow_paths:
            raise UserError(f"no sample has the id '{item}' in {self.db.path}; pass an id as returned by a search.")
        if Path(item).expanduser().is_file():
            return self.encode_image(Path(item).expanduser()), None
        raise UserError(
            f"'{item}' is neither a sample id in {self.db.path} nor an existing image file; "
            "pass a stored id (as printed by `llm2loss search`) or the path of an image."
        )

    def query_vector(self, positives: list[tuple[np.ndarray, float]],
                     negatives: list[tuple[np.ndarray, float]] = ()) -> np.ndarray:
        """Combine weighted unit components into u (d,) float32 (module doc, "Composite queries")."""
        if not positives:
            raise UserError("a query needs at least one phrase or image to look for; give TEXT or --image.")
        for _, w in (*positives, *negatives):
            if not (w > 0 and math.isfinite(w)):
                raise UserError(f"query weight {w} is not a positive number; write TEXT:W with W > 0, e.g. 'snow:0.5'.")
        if len(positives) == 1 and not negatives:
            return np.asarray(positives[0][0], np.float32)
        a_pos = [(c, w / self._sigma(c)) for c, w in positives]
        a_neg = [(c, w / self._sigma(c)) for c, w in negatives]
        total = sum(a for _, a in a_pos)
        u = sum(a * c for c, a in a_pos) - sum((a * c for c, a in a_neg), np.zeros_like(positives[0][0]))
        return (u / total).astype(np.float32)

    # ---- candidates and ranking --------------------------------------------------------------
    def _count(self, where: Filter) -> int:
        try:
            return len(matching_row_ids(self.db.table.to_lance(), where))
        except UserError:
            raise
        except Exception as e:  # lance raises various errors at evaluation (an integer divided by 0)
            raise self._bad_where(where, e) from e

    @staticmethod
    def _bad_where(where: Filter, e: Exception) -> UserError:
        msg = re.sub(r",? ?/\S+\.rs:\d+:\d+", "", str(e).splitlines()[0])[:160]  # no Rust source paths
        return UserError(f"--where {where.text!r} could not be evaluated ({msg}); change the filter, like "
                         "\"split = 'test' AND loss > 1\".")

    def _fetch(self, ids: list[str], where: Filter | None = None) -> pa.Table:
        clause = _sql_in(ids) if ids else "false"
        return self.db.read(self._columns, where=f"({clause}) AND ({where.sql})" if where else clause)

    def _pool(self, u: np.ndarray, n: int, least: int, where: Filter | None, exclude: set[str]) -> _Pool:
        """The n rows most similar to u, most similar first (among those matching ``where``, without
        ``exclude``); ``least``: the least pool, which an approximate search must fill."""
        t_check = time.perf_counter()
        self._refresh()  # the freshness check is part of every search's cost
        ann, cache, spread = self._state
        self.timings["check"] = time.perf_counter() - t_check
        if cache is not None and ann.gpu_resources is None:
            pool = self._pool_cached(ann, cache, u, n, least, where, exclude)
        elif ann.gpu_resources is not None:
            with self._gpu_lock:
                pool = self._pool_lancedb(ann, u, n, least, where, exclude)
        else:
            pool = self._pool_lancedb(ann, u, n, least, where, exclude)
        pool.spread = spread
        return pool

    def _pool_cached(self, ann, cache: RowCache, u, n, least, where, exclude) -> _Pool:
        """FAISS over the whole index, or over the rows matching ``where`` (an id selector), probing
        the cells of :func:`neighbourhood_nprobe`, with rows from the in-memory cache."""
        t0 = time.perf_counter()
        drop = cache.positions_of(exclude) if exclude else np.zeros(0, np.int64)
        if where:
            try:
                with self._mask_lock:
                    mask = cache.where_mask(where)
            except UserError:
                raise
            except Exception as e:  # lance raises various errors for bad SQL
                raise self._bad_where(where, e) from e
            if len(drop):
                mask = mask.copy()
                mask[drop] = False
            t0, self.timings["filter"] = time.perf_counter(), time.perf_counter() - t0
            matching = int(mask.sum())
            if not matching:
                return _Pool.empty()
            # The cells an unfiltered search deep enough to hold twice the least pool's matching rows
            # probes (module doc, "Probing the neighbourhood"); all cells (exact) when that finds
            # fewer rows than the neighbourhood.
            nprobe = neighbourhood_nprobe(ann, least, n, matching / len(mask))
            s, pos = ann.search_subset(u[None, :], n, mask, nprobe=nprobe or None)
            if nprobe and np.count_nonzero(pos[0] >= 0) < min(n, matching):
                s, pos = ann.search_subset(u[None, :], n, mask)
        else:
            nprobe = neighbourhood_nprobe(ann, least + len(drop), n + len(drop))
            near = neighbourhood_nprobe(ann, least + len(drop), n + len(drop), depth=1)
            if nprobe and near < nprobe and ann.can_deepen and _two_steps_pay(ann, nprobe):  # module doc
                s, pos = ann.search_deepening(u, n + len(drop), near, nprobe, POOL_PROBE_DEPTH * (least + len(drop)))
            else:
                s, pos = ann.search_positions(u[None, :], n + len(drop), nprobe=nprobe or None)
            if nprobe and np.count_nonzero(pos[0] >= 0) < min(n + len(drop), ann.ntotal):
                s, pos = ann.search_positions(u[None, :], n + len(drop))  # as deep as the neighbourhood
        s, pos = s[0], pos[0]
        keep = pos >= 0  # FAISS marks empty slots -1; the query's own row is dropped
        if len(drop):
            keep &= ~np.isin(pos, drop)
        if not keep.all():  # the common case keeps all: no copies
            s, pos = s[keep], pos[keep]
        s, pos = s[:n], pos[:n]
        t1 = time.perf_counter()
        pool = _Pool(lambda idx: ann.ids[pos[idx]], s.astype(np.float64), cache.predicted_loss(pos),
                     lambda idx: cache.records(pos[idx]))
        self.timings["ann"], self.timings["fetch"] = t1 - t0, time.perf_counter() - t1
        return pool

    def _pool_lancedb(self, ann, u, n, least, where, exclude) -> _Pool:
        """Without the cache: FAISS (probing the cells of :func:`neighbourhood_nprobe` for each
        depth) then ``id IN (...)`` queries, growing while too few rows match ``where``, and
        LanceDB's exact filtered scan beyond ``max_ann_fetch``."""
        t0 = time.perf_counter()
        total = ann.ntotal
        if where:
            matching = self._count(where)
            fetch = int(math.ceil(n * 2 * total / max(matching, 1))) + len(exclude)
        else:
            matching, fetch = total, n + len(exclude)
        rows = sims = None
        while matching and fetch <= max(self.max_ann_fetch, n + len(exclude)):
            # the least pool's share of this fetch, as deep as the fetch is for the neighbourhood
            nprobe = neighbourhood_nprobe(ann, int(math.ceil(least * fetch / n)), min(fetch, total))
            s, ids = ann.search(u[None, :], min(fetch, total), nprobe=nprobe or None)
            keep = [(i, v) for i, v in zip(ids[0], s[0], strict=True) if i is not None and i not in exclude]
            t1 = time.perf_counter()
            rows = self._fetch([i for i, _ in keep], where)
            sim_of = dict(keep)
            sims = np.array([sim_of[i] for i in rows.column(S.ID).to_pylist()], np.float64)
            self.timings["ann"], self.timings["fetch"] = t1 - t0, time.perf_counter() - t1
            if len(sims) >= min(n, matching - len(exclude)) or fetch >= total:
                break
            fetch *= 4
        else:
            rows = None
        if rows is None:  # too selective a filter for FAISS: exact filtered scan in LanceDB
            t1 = time.perf_counter()
            q = self.db.table.search(u, vector_column_name=S.EMBEDDING).distance_type("dot")
            if where:
                q = q.where(where.sql, prefilter=True)
            got = q.limit(n + len(exclude)).select(self._columns).to_arrow()
            got = got.filter(pc.invert(pc.is_in(got.column(S.ID), pa.array(list(exclude), pa.string()))))
            sims = 1.0 - got.column("_distance").to_numpy().astype(np.float64)  # lance: dot distance = 1 - u.x
            rows = got.drop_columns(["_distance"])
            self.timings["ann"], self.timings["fetch"] = 0.0, time.perf_counter() - t1
        top = np.argsort(-sims, kind="stable")[:n]  # most similar first, as FAISS returns them
        rows, sims = rows.take(top), sims[top]
        pred = rows.column(S.PREDICTED_LOSS).to_numpy(zero_copy_only=False).astype(np.float64)
        ids = np.asarray(rows.column(S.ID).to_pylist(), dtype=str)
        return _Pool(ids.__getitem__, sims, pred, lambda idx: rows.take(idx).to_pylist())

    def _rank(self, pool: _Pool, k: int, least: int, weight: float | None) -> list[SearchResult]:
        t0 = time.perf_counter()
        w = DEFAULT_WEIGHT if weight is None else float(weight)
        if not 0.0 <= w <= 1.0:
            raise UserError(f"--weight {w} is outside [0, 1]; use 0 for similarity only, 1 for predicted loss only.")
        sims, pred = pool.sims, pool.pred
        missing = len(pred) - np.count_nonzero(np.isfinite(pred))
        if len(pred) and missing == len(pred) and w > 0:
            self._note("no predicted_loss on these rows: ranked by similarity only; run `llm2loss diagnose` "
                       "to rank by predicted failure.")
        elif missing and w > 0:
            self._note(f"{missing} of {len(pred)} candidate rows have no predicted_loss (counted as "
                       "average); rerun `llm2loss diagnose` to score them.")
        order, score = rank(sims, pred, pool.ids, least, k, w, pool.spread)
        top = pool.rows(order)  # only the k results are turned into Python objects
        meta = [c for c in (top[0] if top else ()) if c not in S.CORE_COLUMNS]
        out = [
            SearchResult(
                id=r[S.ID], image=r[S.IMAGE], label=r[S.LABEL], split=r[S.SPLIT], loss=r[S.LOSS],
                predicted_loss=r[S.PREDICTED_LOSS], predicted_loss_std=r[S.PREDICTED_LOSS_STD],
                similarity=float(sims[i]), score=float(z), metadata={c: r[c] for c in meta},
            )
            for i, z, r in zip(order.tolist(), score.tolist(), top, strict=True)
        ]
        self.timings["rank"] = time.perf_counter() - t0
        return out

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        log.warning(msg)

    def _run(self, t0, positives, negatives, k, where, weight, candidates, exclude=(), pool_only=False
             ) -> list[SearchResult]:
        # checked before LanceDB sees anything; the pool's clause is ours, added after the check
        if isinstance(where, str) and where.strip():
            self._refresh()  # checked against the columns the table has now
        where = with_pool_only(parse_filter(where, self._schema), pool_only)
        if candidates is not None and int(candidates) < 1:
            raise UserError(f"--candidates {candidates} leaves no rows to rank; pass at least -k ({k}), or leave it "
                            "out for the default max(100, 10 k).")
        u = self.query_vector(positives, negatives)
        self.timings["encode"] = time.perf_counter() - t0
        n = max(int(candidates or default_candidates(k)), int(k))
        out = self._rank(self._pool(u, neighbourhood_size(n), n, where, set(exclude)), int(k), n, weight)
        self.timings["total"] = time.perf_counter() - t0
        return out

    def _start(self, k) -> float:
        if int(k) < 1:
            raise UserError(f"-k {k} asks for no results; pass -k 1 or more.")
        self.notes, self.timings = [], {}
        return time.perf_counter()

    # ---- public queries ----------------------------------------------------------------------
    def search(self, text=None, k: int = 10, where: str | None = None, weight: float | None = None,
               negatives=(), image=None, candidates: int | None = None,
               allow_paths: bool = True, pool_only: bool = False) -> list[SearchResult]:
        """Rows about ``text`` (and/or like ``image``), best first by the documented score.

        ``text``: a phrase, or a list of phrases / ``"TEXT:W"`` strings / (text, weight) pairs, all
        to look for. ``negatives``: phrases to move away from (weight 0.5 unless ``TEXT:W``).
        ``image``: a stored id, an image path, or (either, weight). ``weight``: 0..1, see
        :mod:`search_ui.ranking`. ``candidates``: the least pool (default ``max(100, 10 k)``).
        ``allow_paths``: see :meth:`resolve_image`. ``pool_only``: only unlabeled rows
        (``split = 'pool'``), e.g. to find images worth labelling.
        """
        t0 = self._start(k)
        texts = [text] if isinstance(text, str) or (isinstance(text, tuple) and len(text) == 2) else list(text or [])
        pos_t = [p for p in (parse_weighted(t) for t in texts) if not _blank(p[0])]
        neg_t = [p for p in (parse_weighted(t, DEFAULT_NEGATIVE_WEIGHT) for t in (negatives or [])) if not _blank(p[0])]
        phrases = [str(p) for p, _ in pos_t] + [str(p) for p, _ in neg_t]
        emb = self.encode_text(phrases) if phrases else None
        positives = [(emb[i], w) for i, (_, w) in enumerate(pos_t)]
        negs = [(emb[len(pos_t) + i], w) for i, (_, w) in enumerate(neg_t)]
        if image is not None:
            img, w = parse_weighted(image) if not isinstance(image, np.ndarray) else (image, 1.0)
            vec, _ = self.resolve_image(img, allow_paths)
            positives.append((vec, w))
        return self._run(t0, positives, negs, k, where, weight, candidates, pool_only=pool_only)

    def similar(self, query, k: int = 10, where: str | None = None, weight: float | None = None,
                candidates: int | None = None, allow_paths: bool = True, pool_only: bool = False
                ) -> list[SearchResult]:
        """Similar hard examples: the nearest neighbours of a stored id or a new image file
        (embedded on the fly; not with ``allow_paths=False``), ranked by the documented score; a
        stored query row is left out."""
        t0 = self._start(k)
        vec, own_id = self.resolve_image(query, allow_paths)
        return self._run(t0, [(vec, 1.0)], [], k, where, weight, candidates, exclude=[own_id] if own_id else [],
                         pool_only=pool_only)
