"""The JSON HTTP API: plain ``/api/v1/...`` routes beside the Gradio page, on the same server and port.

``build_api(ctx)`` makes a FastAPI app over one :class:`~search_ui.ui.context.AppContext` (so the
page and the API share one :class:`~search_ui.engine.QueryEngine`, its loaded CLIP model, FAISS
index, row cache and text-embedding cache); ``start_server(blocks, ...)`` mounts the Gradio Blocks
on it at ``/`` and runs uvicorn. Routes (request and response fields in README, "HTTP API"; the
schema at ``/api/v1/openapi.json``, browsable at ``/api/v1/docs``):

====================================  ==========================================================
``POST /api/v1/search``               rows about a sentence (the fields of ``llm2loss search``)
``POST /api/v1/similar``              similar hard examples of a stored id
``GET /api/v1/samples/{id}``          one sample's stored fields; ``.../image`` its image file
                                      (the id percent-encoded: ``/`` as ``%2F``)
``GET /api/v1/explain?top=N``         failure modes in words (cached until the table changes)
``GET /api/v1/selections``            every selection and its size
``GET /api/v1/selections/{name}``     a selection's ids
``POST .../selections/{name}/add``    add ids (``{"ids": [...]}``); ``.../remove`` removes them
``DELETE /api/v1/selections/{name}``  drop a selection
``POST /api/v1/export``               a manifest (csv / parquet) or a zipped class folder
``GET /api/v1/health``                rows, table version, index and ensemble freshness
====================================  ==========================================================

Errors are HTTP 4xx with ``{"error": SENTENCE}``: the one sentence the CLI prints for the same input
(400 a refused input, 404 an unknown sample or selection, 401 no or wrong login, 413 a body over
``MAX_BODY_BYTES``, 422 a request that is not the documented JSON).

Safety as the UI's: no route opens a path a caller sends (images are stored ids only, exports are
written to a temporary folder of the server's own and streamed back), request bodies, ``k``, text
and lists are bounded, and with ``--auth USER:PASS`` every ``/api/`` route needs HTTP Basic
authentication with that login (the page keeps Gradio's login form).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
import mimetypes
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer import schema as S
from indexer.errors import Unavailable, UserError
from indexer.integrity import storage_error, write_error
from search_ui.filters import FILTER_HELP
from search_ui.ui.context import AppContext, public_mode

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
#: Bounds on one request (a caller asking for more is refused with a sentence saying the limit).
MAX_BODY_BYTES = 4 * 2**20
MAX_K = 1000
MAX_CANDIDATES = 20_000
MAX_TEXT_CHARS = 1000
MAX_PHRASES = 32
MAX_IDS = 100_000
MAX_TOP = 100
MAX_BUDGET = 100_000


class NotFound(UserError):
    """An unknown sample id or selection name (HTTP 404)."""


class Forbidden(UserError):
    """A file that may not be handed out: an indexed image changed since it was indexed (HTTP 403)."""


# ---- request bodies (pydantic: types only; bounds are checked below with the CLI's sentences) --
class _Body(BaseModel):
    # strict: "k": "10" or "k": true is a wrong type (422), not quietly 10 or 1; an integer is still a number.
    model_config = ConfigDict(extra="forbid", strict=True)


class SearchRequest(_Body):
    text: str = Field(description="what to look for, e.g. 'a blue circle' (taken literally)")
    k: int = Field(10, description=f"results, 1..{MAX_K}")
    weight: float | None = Field(None, description="0 = by similarity only, 1 = by predicted failure only (default 0.5)")
    where: str | None = Field(None, description=FILTER_HELP)
    negatives: list[str] = Field([], description="phrases to move away from; 'TEXT:W' sets a weight (default 0.5)")
    also: list[str] = Field([], description="more phrases to look for; 'TEXT:W' sets a weight (default 1)")
    image: str | None = Field(None, description="a stored sample id to combine with the text")
    image_weight: float = Field(1.0, description="the weight of `image`")
    candidates: int | None = Field(None, description="least pool the ranking picks from; its neighbourhood is 10x (default max(100, 10 k))")
    pool: bool = Field(False, description="only unlabeled rows (split = 'pool'): images worth labelling next")


class SimilarRequest(_Body):
    id: str = Field(description="a stored sample id (as returned by a search)")
    k: int = Field(10, description=f"results, 1..{MAX_K}")
    weight: float | None = Field(None, description="0 = by similarity only, 1 = by predicted failure only (default 0.5)")
    where: str | None = Field(None, description=FILTER_HELP)
    candidates: int | None = Field(None, description="least pool the ranking picks from; its neighbourhood is 10x (default max(100, 10 k))")
    pool: bool = Field(False, description="only unlabeled rows (split = 'pool')")


class IdsRequest(_Body):
    ids: list[str] = Field(description=f"sample ids (at most {MAX_IDS:,})")


class ExportRequest(_Body):
    selection: str | None = Field(None, description="a named selection")
    ids: list[str] | None = Field(None, description="these ids, in this order")
    query: str | None = Field(None, description="this search's results")
    mode: str | None = Field(None, description="a failure mode from explain: its number or description")
    format: Literal["csv", "parquet", "folder"] = Field("csv", description="folder: a zip of OUT/<label>/<image> + manifest.csv")
    k: int = Field(100, description="results for `query` / `mode`")
    where: str | None = Field(None, description="a filter for `query`: " + FILTER_HELP)
    pool: bool = Field(False, description="with `query`: only unlabeled rows (split = 'pool')")


class CurateRequest(_Body):
    budget: int = Field(description=f"items to label or check, in all (1..{MAX_BUDGET:,})")
    modes: list[str] = Field([], description="failure modes to plan for (numbers or descriptions from explain); default all shown")
    format: Literal["json", "csv", "parquet"] = Field("json", description="json: the plan; csv / parquet: its manifest as a file")


# ---- answers ---------------------------------------------------------------------------------
def _json(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    # orjson: ~10x faster than FastAPI's jsonable_encoder + json; NaN/inf become null, numpy is native.
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=str), status_code=status,
                    media_type="application/json", headers=headers)


def _answer(eng, results, t0: float) -> Response:
    """A query's answer, with the engine's and the route's milliseconds in ``Server-Timing``."""
    body = orjson.dumps({"results": [r.to_dict() for r in results], "notes": list(eng.notes)},
                        option=orjson.OPT_SERIALIZE_NUMPY, default=str)
    timing = f"engine;dur={1000 * eng.timings.get('total', 0.0):.2f}, route;dur={1000 * (time.perf_counter() - t0):.2f}"
    return Response(body, media_type="application/json", headers={"Server-Timing": timing})


def _error(msg: str, status: int, headers: dict | None = None) -> Response:
    r = _json({"error": msg}, status)
    if headers:
        r.headers.update(headers)
    return r


def _validation_sentence(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "the request is not valid; send the JSON documented at /api/v1/openapi.json."
    e = errs[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON; send a JSON object as documented at /api/v1/openapi.json."
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")]
    field = ".".join(loc) or "the body"
    got = e.get("input")
    got = f" (got {str(got)[:60]!r})" if got is not None and e.get("type") != "missing" else ""
    return (f"request field '{field}' is not valid: {e.get('msg', 'wrong value')[:120]}{got}; "
            "fix it as documented at /api/v1/openapi.json.")


def _bound(value: int | None, name: str, most: int) -> None:
    if value is not None and int(value) > most:
        raise UserError(f"{name} {value} is more than this server allows ({most}); ask for at most {most}.")


def _check_text(text: str | None, name: str) -> None:
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise UserError(f"{name} is {len(text)} characters long; send at most {MAX_TEXT_CHARS}.")


def _check_query(k: int, candidates: int | None, where: str | None) -> None:
    _bound(k, "k", MAX_K)
    _bound(candidates, "candidates", MAX_CANDIDATES)
    # `where` is bounded and checked by the filter language (search_ui.filters) inside the engine.


# ---- the middleware: body size and login ------------------------------------------------------
class ApiGuard:
    """ASGI middleware for ``/api/`` paths: refuses bodies over ``max_body`` bytes (413) and, with
    ``auth``, any request without that HTTP Basic login (401). Other paths (the Gradio page, which
    has its own login) pass through untouched."""

    def __init__(self, app, auth: tuple[str, str] | None = None, max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.max_body = max_body
        self._expected = (base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else None)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        if self._expected is None:
            return True
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(token.strip().encode(), self._expected.encode())

    async def __call__(self, scope, receive, send):
        # "//api/..." must not slip past the check: slashes are collapsed before comparing.
        if scope["type"] != "http" or not re.sub("/+", "/", scope["path"]).startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if not self._authorised(headers):
            return await _error("this server needs a login; send HTTP Basic credentials "
                                "(curl -u USER:PASS, requests auth=(USER, PASS)).", 401,
                                {"WWW-Authenticate": 'Basic realm="llm2loss"'})(scope, receive, send)
        too_large = _error(f"the request body is larger than {self.max_body // 2**20} MiB; send a smaller one.", 413)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await too_large(scope, receive, send)
        if length is None:
            # No declared length (a chunked body): read it here, bounded, and hand it on whole.
            chunks, total, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                if total > self.max_body:
                    return await too_large(scope, receive, send)
                more = message.get("more_body", False)
            body, given = b"".join(chunks), False

            async def replay():
                nonlocal given
                if not given:
                    given = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        # A declared length is enforced by the HTTP parser: the body cannot exceed it.
        return await self.app(scope, receive, send)


# ---- the routes -------------------------------------------------------------------------------
class _AnyPath(PathConvertor):
    """``{x:anypath}``: like ``path``, newlines included (a stored id may hold one)."""

    regex = "(?s:.*)"


register_url_convertor("anypath", _AnyPath())


def _sample_path(request: Request) -> tuple[str, bool]:
    """(the sample id, whether its image is asked for) from ``.../samples/ID[/image]``, read from the
    undecoded path: an id's own ``/`` arrives as ``%2F``, so only a literal ``/image`` names the image."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    raw = raw.split(b"?", 1)[0]
    rest = raw[raw.index(b"/samples/") + len(b"/samples/"):]
    image = rest.endswith(b"/image")
    try:
        return unquote((rest[:-len(b"/image")] if image else rest).decode("latin-1"), errors="strict"), image
    except UnicodeDecodeError:
        raise UserError("the sample id in the path is not percent-encoded UTF-8; encode it with "
                        "urllib.parse.quote(id, safe='').") from None


def _router(ctx: AppContext) -> APIRouter:
    from search_ui.app import CONCURRENCY

    r = APIRouter(prefix=PREFIX)
    # Queries beyond twice the cores' worth wait here, off the GIL, instead of all taking turns on it:
    # the same throughput, and the event loop (the page, /health, ...) keeps getting its turn.
    slots = threading.BoundedSemaphore(2 * CONCURRENCY)

    def engine():
        return ctx.engine

    @r.post("/search", summary="Samples about a sentence, most likely failures first")
    def search(req: SearchRequest) -> Response:
        """The fields of `llm2loss search --json`: `results` (best first: id, image, label, split, loss,
        predicted_loss, predicted_loss_std, similarity, score, metadata columns) and `notes`."""
        t0 = time.perf_counter()
        if not req.text.strip():
            raise UserError("the search text is empty; send what to look for, e.g. {\"text\": \"a blue circle\"}.")
        _check_text(req.text, "text")
        _check_query(req.k, req.candidates, req.where)
        if len(req.negatives) + len(req.also) > MAX_PHRASES:
            raise UserError(f"{len(req.negatives) + len(req.also)} extra phrases given; send at most {MAX_PHRASES} "
                            "negatives and also together.")
        for p in (*req.negatives, *req.also):
            _check_text(p, "a phrase of negatives/also")
        eng = engine()
        with slots:
            results = eng.search(
                [(req.text, 1.0), *req.also], k=req.k, where=req.where, weight=req.weight,
                negatives=req.negatives, image=None if req.image is None else (req.image, req.image_weight),
                candidates=req.candidates, allow_paths=False, pool_only=req.pool)
        return _answer(eng, results, t0)

    @r.post("/similar", summary="Similar hard examples of a stored sample")
    def similar(req: SimilarRequest) -> Response:
        """`results` as for /search (the query sample itself left out) and `notes`."""
        t0 = time.perf_counter()
        _check_text(req.id, "id")
        _check_query(req.k, req.candidates, req.where)
        eng = engine()
        with slots:
            results = eng.similar(req.id, k=req.k, where=req.where, weight=req.weight, candidates=req.candidates,
                                  allow_paths=False, pool_only=req.pool)
        return _answer(eng, results, t0)

    def _sample(sample_id: str) -> dict:
        rows = ctx.rows([sample_id])
        if not rows:
            raise NotFound(f"no sample has the id '{sample_id}' in {ctx.db.path}; pass an id as returned by a search.")
        return rows[0]

    def _sample_image(sample_id: str):
        image = _sample(sample_id).get(S.IMAGE)
        under = ctx.guard.check(image) is not None
        got = ctx.files.read(image) if under else None
        if got is None and (not image or not os.path.lexists(image)):
            raise NotFound(f"the image file of sample '{sample_id}' is missing; restore the file or re-index it.")
        if got is None and not ctx.guard.is_under_roots(image):
            raise Forbidden(f"the image file of sample '{sample_id}' lies outside the dataset's image folders, so it "
                            "is not served; keep images under the folders they were indexed from.")
        if got is None:
            raise Forbidden(f"the image file of sample '{sample_id}' is no longer the file that was indexed "
                            "(replaced, modified or re-linked since), so it is not served; restore it or re-index.")
        real, data = got
        media = mimetypes.guess_type(real)[0] or "application/octet-stream"
        return Response(data, media_type=media)

    # Both routes read the id from the undecoded path (_sample_path), so whichever matches, "x%2Fimage"
    # is the sample "x/image" and "x/image" the image of "x".
    @r.get("/samples/{sample_id:anypath}/image", summary="A sample's image file", response_class=FileResponse)
    def sample_image(sample_id: str, request: Request):
        """The indexed image of a stored sample: only a file the table indexes, under its image folders,
        and still the file indexed (size, time and SHA-256 recorded by `index`; else 403). The id is
        percent-encoded (`quote(id, safe='')`: `/` as `%2F`, a newline as `%0A`)."""
        sample_id, image = _sample_path(request)
        return _sample_image(sample_id) if image else _json(_sample(sample_id))

    @r.get("/samples/{sample_id:anypath}", summary="One sample's stored fields")
    def sample(sample_id: str, request: Request) -> Response:
        """id, image, label, split, loss, predicted_loss, predicted_loss_std and the metadata columns. The
        id is percent-encoded (`quote(id, safe='')`): an id holding `/` sends it as `%2F`, a newline as
        `%0A`; every stored id is reachable."""
        sample_id, image = _sample_path(request)
        return _sample_image(sample_id) if image else _json(_sample(sample_id))

    @r.get("/explain", summary="Failure modes named in words, costliest first")
    def explain(top: int = 10) -> Response:
        """As `llm2loss explain --json`: description, predicted_loss, examples (ids), size, mean_loss, cost, ...
        costliest first. Computed once per table version and `top`. When the list is empty, the
        `X-Explain-Note` header says why in one sentence (the embeddings do not explain the losses, or
        every group found failed its check)."""
        if top < 1:
            raise UserError(f"top {top} asks for no failure modes; pass top=1 or more.")
        _bound(top, "top", MAX_TOP)
        out = _json([public_mode(m) for m in ctx.modes(int(top))
                     if m.get("shown", True)])  # as the CLI and /explain: names whose evidence holds
        note = ctx.modes_note(int(top))
        if note:  # a header holds latin-1 only: anything else escaped
            out.headers["X-Explain-Note"] = note.encode("ascii", "backslashreplace").decode("ascii")
        return out

    def _selections():
        from search_ui.selections import Selections

        return Selections(ctx.db)

    def _existing(name: str) -> list[str]:
        sels = _selections().all()
        if name not in sels:
            known = ", ".join(sorted(sels)[:10]) or "none yet"
            raise NotFound(f"no selection is named '{name}' (known: {known}); add ids to create it.")
        return sels[name]

    def _ids(req: IdsRequest) -> list[str]:
        if len(req.ids) > MAX_IDS:
            raise UserError(f"{len(req.ids):,} ids in one request; send at most {MAX_IDS:,} at a time.")
        return req.ids

    @r.get("/selections", summary="Every named selection and its size")
    def selections() -> Response:
        return _json({k: len(v) for k, v in _selections().all().items()})

    @r.get("/selections/{name}", summary="A selection's ids")
    def selection(name: str) -> Response:
        ids = _existing(name)
        return _json({"name": name, "size": len(ids), "ids": ids})

    @r.post("/selections/{name}/add", summary="Add ids to a selection (created if new)")
    def add(name: str, req: IdsRequest) -> Response:
        ids = _ids(req)
        if not ids:
            raise UserError("no ids given; send {\"ids\": [\"ID\", ...]} with ids returned by a search.")
        return _json({"name": name, "size": _selections().add(name, ids)})

    @r.post("/selections/{name}/remove", summary="Remove ids from a selection")
    def remove(name: str, req: IdsRequest) -> Response:
        _existing(name)
        return _json({"name": name, "size": _selections().remove(name, _ids(req))})

    @r.delete("/selections/{name}", summary="Drop a selection")
    def drop(name: str) -> Response:
        _existing(name)
        return _json({"name": name, "size": _selections().remove(name)})

    @r.post("/export", summary="Download a selection as a manifest (csv / parquet) or a zipped folder",
            response_class=FileResponse)
    def export(req: ExportRequest):
        """Exactly one of selection, ids, query, mode; the file comes back as an attachment."""
        from search_ui.export import export as write

        given = [k for k in ("selection", "ids", "query", "mode") if getattr(req, k) is not None]
        if len(given) != 1:
            raise UserError(f"give exactly one of selection, ids, query or mode (got {', '.join(given) or 'none'}).")
        _check_query(req.k, None, req.where)
        ids, mode, selection = req.ids, req.mode, req.selection
        if ids is not None and len(ids) > MAX_IDS:
            raise UserError(f"{len(ids):,} ids in one request; send at most {MAX_IDS:,}.")
        if req.query is not None:  # the shared engine, not a new one per request
            _check_text(req.query, "query")
            if not req.query.strip():
                raise UserError("the export query is empty; send what to look for, e.g. {\"query\": \"a blue circle\"}.")
            ids = [x.id for x in engine().search(req.query, k=req.k, where=req.where, pool_only=req.pool)]
        if selection is not None:
            _existing(selection)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", selection or mode or req.query or "ids").strip("._")[:60] or "export"
        work = Path(tempfile.mkdtemp(prefix="llm2loss-api-export-"))  # ours alone; removed after sending
        try:
            if req.format == "folder":
                folder = write(ctx.db, out=work / stem, fmt="folder", ids=ids, mode=mode, selection=selection,
                               k=req.k, link=False)
                path, media = Path(shutil.make_archive(str(work / stem), "zip", root_dir=folder)), "application/zip"
            else:
                path = write(ctx.db, out=work / f"{stem}.{req.format}", fmt=req.format, ids=ids, mode=mode,
                             selection=selection, k=req.k)
                media = "text/csv" if req.format == "csv" else "application/vnd.apache.parquet"
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return FileResponse(path, media_type=media, filename=path.name,
                            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))

    @r.post("/curate", summary="A labelling plan: pool images to label and training labels to check, per failure mode")
    def curate(req: CurateRequest):
        """`format` json: `{budget, rule, modes: [{number, mode, action, reason, budget, chosen, available,
        figures}], items: [{id, image, label, split, loss, mode, action, priority, suggested_label,
        plan_predicted_loss, reason}]}`; csv / parquet: the items as a manifest, as an attachment."""
        if req.budget < 1:
            raise UserError(f"budget {req.budget} asks for nothing; send a budget of 1 item or more.")
        _bound(req.budget, "budget", MAX_BUDGET)
        _bound(len(req.modes), "modes", MAX_TOP)
        for m in req.modes:
            _check_text(m, "a mode")
        plan = ctx.plan(req.budget, tuple(req.modes))
        if req.format == "json":
            return _json(plan)
        from diagnosis.curate import items_table
        from search_ui.export import _write_table

        work = Path(tempfile.mkdtemp(prefix="llm2loss-api-plan-"))
        path = work / f"labelling_plan.{req.format}"
        _write_table(items_table(plan["items"]), path, req.format)
        media = "text/csv" if req.format == "csv" else "application/vnd.apache.parquet"
        return FileResponse(path, media_type=media, filename=path.name,
                            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))

    @r.get("/health", summary="Rows, table version, index and ensemble freshness")
    def health() -> Response:
        return _json(health_report(ctx))

    @r.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    def unknown(rest: str):
        raise StarletteHTTPException(404)

    return r


def health_report(ctx: AppContext) -> dict:
    """rows, table_version, data_version, clip, and the FAISS index's and the ensemble's freshness."""
    import json

    from diagnosis.run import INFO_FILE, damage, staleness
    from indexer import ann

    db = ctx.db
    idx = ann.index_status(db)
    index = {k: idx.get(k) for k in ("exists", "fresh", "reason", "kind", "num_rows", "data_version",
                                     "recall_at_10")}
    info_path = db.diagnosis_dir / INFO_FILE
    info = None
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            info = None
    reason = "no diagnosis ensemble was fitted (run `llm2loss diagnose`)" if info is None else \
        staleness(db, info) or damage(db, info)
    ensemble = {"exists": info is not None, "fresh": reason is None, "reason": reason,
                "num_rows": (info or {}).get("num_rows"), "data_version": (info or {}).get("data_version"),
                "no_skill": ((info or {}).get("quality") or {}).get("no_skill")}
    return {"rows": db.count_rows(), "table_version": db.version, "data_version": db.data_version,
            "clip": db.clip_identity, "index": index, "ensemble": ensemble}


def build_api(ctx: AppContext, auth: tuple[str, str] | None = None) -> FastAPI:
    """The FastAPI app with the ``/api/v1`` routes over ``ctx`` (mount the page on it at ``/``)."""
    app = FastAPI(title="llm2loss", version="1", openapi_url=f"{PREFIX}/openapi.json", docs_url=f"{PREFIX}/docs",
                  redoc_url=None, description="Search a model's failures in words; see the README, 'HTTP API'.")

    @app.exception_handler(NotFound)
    async def not_found(request: Request, e: NotFound):
        return _error(str(e), 404)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, e: Forbidden):
        return _error(str(e), 403)

    @app.exception_handler(UserError)
    async def refused(request: Request, e: UserError):
        return _error(str(e), 400)

    @app.exception_handler(Unavailable)  # a damaged table, a full disk, a read-only folder: not the request's fault
    async def unavailable(request: Request, e: Unavailable):
        return _error(str(e), 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return _error(_validation_sentence(e), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _error(f"there is no route {request.method} {request.url.path}; the routes are listed at "
                          f"{PREFIX}/openapi.json.", 404)
        return _error(f"{request.method} {request.url.path}: {e.detail}.", e.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        err = storage_error(e, ctx.db.path) or write_error(e, "to the database", None, cleaned=False, db_path=ctx.db.path)
        if err is not None:
            log.warning("%s %s: %s", request.method, request.url.path, e)
            return _error(str(err), 503)
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return _error(f"{request.url.path} failed ({type(e).__name__}: {str(e)[:200]}); the server log has the "
                      "details.", 500)

    app.include_router(_router(ctx))
    app.add_middleware(ApiGuard, auth=auth)
    return app


# ---- one server for the page and the API ------------------------------------------------------
class Server:
    """The running page + API: ``local_url``, ``blocks`` (the Gradio app), ``api`` (FastAPI),
    ``close()``, ``block()`` (wait until interrupted). Other attributes are the Blocks'."""

    def __init__(self, blocks, api: FastAPI, sock: socket.socket, uvicorn_server, thread: threading.Thread):
        self.blocks, self.api, self._sock = blocks, api, sock
        self._server, self._thread = uvicorn_server, thread
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self.local_url = f"http://{host}:{port}/"
        self.server_port = port

    def __getattr__(self, name):
        return getattr(self.__dict__["blocks"], name)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
        ctx = getattr(self.blocks, "llm2loss_context", None)
        if ctx is not None:
            ctx.close()  # its scratch folder in the system temp directory

    def block(self) -> None:
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            log.info("stopping the server")
        finally:
            self.close()


def _bind(host: str, port: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it
    # Nagle holds each response body until the client's delayed ACK (+40 ms per kept-alive request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port or 0)))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port (or --host).") from e
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def start_server(blocks, launch: dict, startup_timeout: float = 60.0) -> Server:
    """Serve ``blocks`` (the page, at ``/``) and its API (``/api/v1``) on one port.

    ``launch``: :func:`search_ui.app.launch_kwargs` (address, login and file policy); every entry
    ``gr.mount_gradio_app`` takes is handed to it, the address to the socket and ``max_threads`` to
    uvicorn's thread pool.
    """
    import gradio as gr
    import uvicorn

    from search_ui.app import parse_auth
    from search_ui.serving import is_loopback

    host = launch.get("server_name") or "127.0.0.1"
    sock = _bind(host, launch.get("server_port"))
    auth = launch.get("auth")
    auth = parse_auth(auth) if isinstance(auth, str) else auth
    api = build_api(blocks.llm2loss_context, auth=auth)
    # Outermost: cross-site requests are refused before any route (the API's or Gradio's) runs, and
    # Gradio's CORS answers (which approve any origin off localhost) never leave the server.
    from search_ui.serving import CrossSiteGuard

    api.add_middleware(CrossSiteGuard, **getattr(blocks, "llm2loss_cross_site", {"loopback": is_loopback(host)}))
    takes = set(inspect.signature(gr.mount_gradio_app).parameters) - {"app", "blocks", "path"}
    mount = {k: v for k, v in launch.items() if k in takes}
    mount.update(server_name=host, server_port=sock.getsockname()[1], auth=auth)
    gr.mount_gradio_app(api, blocks, path="/", **mount)
    # timeout_graceful_shutdown: an open page keeps a heartbeat stream; closing must not wait on it.
    config = uvicorn.Config(api, log_level="warning", lifespan="on", timeout_keep_alive=30, access_log=False,
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    max_threads = int(launch.get("max_threads") or 40)

    def run():
        import anyio.to_thread

        async def main():
            anyio.to_thread.current_default_thread_limiter().total_tokens = max_threads
            await server.serve(sockets=[sock])

        import asyncio

        asyncio.run(main())

    thread = threading.Thread(target=run, name="llm2loss-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise UserError(f"the server on {host}:{sock.getsockname()[1]} did not start; see the log above.")
        time.sleep(0.02)
    return Server(blocks, api, sock, server, thread)
