"""The Gradio web UI: ``build_app(db)`` lays out the page, ``serve(db, ...)`` runs it safely.

Tabs: Search, Similar, Failure modes, Curate, Model health. The page's events call
:class:`search_ui.ui.handlers.Handlers`, which call the same library functions as the CLI. The same
operations are named API endpoints (``/search``, ``/similar``, ``/explain``, ``/details``,
``/selections``, ``/add_to_selection``, ``/selection``, ``/health``, ``/download``) for
``gradio_client``; see docs/UI.md.

Safe by default: it listens on 127.0.0.1, can require a login, hands out exactly the indexed image
files through Gradio's file route (:class:`ServedFiles`, an allow-list of the real paths recorded at
index time, each file checked to still be the one indexed, enforced by :class:`FileRouteGuard` in
front of Gradio's route; every path a handler returns is checked as well, see
:mod:`search_ui.ui.context`), never the database folder, refuses cross-site requests that would
change state (:mod:`search_ui.serving`), and queues events so a slow query does not block other
users or the page.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import gradio as gr

from indexer import schema as S
from indexer.errors import UserError
from indexer.store import Database
from search_ui.serving import CrossSiteGuard, is_loopback, parse_cors_origins
from search_ui.ui.context import AppContext, ServedFiles, public_mode, serving_dirs
from search_ui.ui.handlers import Handlers, friendly
from search_ui.ui.modes import MODE_COLUMNS

log = logging.getLogger(__name__)

TITLE = "llm2loss — where and why the model fails"
CSS = ".caption-label { white-space: normal !important; }"
#: Events of one kind that may run at once; FAISS and LanceDB reads are thread-safe.
CONCURRENCY = max(2, min(8, os.cpu_count() or 2))


def _header(ctx: AppContext) -> str:
    meta = ctx.db.read_meta()
    clip = (meta.get("clip") or {}).get("model", "?")
    n = ctx.db.count_rows()
    diag = ctx.db.count_rows(f"{S.PREDICTED_LOSS} IS NOT NULL") > 0
    return (f"## {TITLE}\n`{ctx.db.path}` · {n} samples · CLIP `{clip}` · "
            + ("predicted losses present" if diag else "**no diagnosis yet** (run `llm2loss diagnose`)"))


def _detail_panel(label: str):
    """Components showing one clicked image, hidden until a click: (image, fields, similar gallery,
    clicked record, similar records shown, the hidden column)."""
    with gr.Column(visible=False) as box:
        with gr.Row():
            image = gr.Image(label=label, type="pil", format="png", interactive=False, height=280, scale=1)
            fields = gr.Markdown(elem_classes=["details"])
        similar = gr.Gallery(label="Similar hard examples", columns=8, height=200, allow_preview=False,
                             fit_columns=False, elem_classes=["similar-gallery"])
    return image, fields, similar, gr.State(None), gr.State([]), box


def _wire_details(ui: Handlers, gallery, shown, panel) -> None:
    image, fields, similar, clicked, sim_shown, box = panel
    outputs = [image, fields, similar, clicked, sim_shown, box]
    gallery.select(ui.details, inputs=shown, outputs=outputs, api_visibility="private")
    # A click on a similar example shows that one, so a person can walk from one failure to the next.
    similar.select(ui.details, inputs=sim_shown, outputs=outputs, api_visibility="private")


def _results_gallery(elem_id: str):
    return gr.Gallery(label="Results (most likely failures first)", columns=6, height=520,
                      allow_preview=False, object_fit="contain", fit_columns=False, elem_id=elem_id)


def _search_tab(ui: Handlers, sel_dropdown_holder: list):
    with gr.Row():
        q = gr.Textbox(label="Describe what to look for", placeholder="a blue circle", scale=5,
                       elem_id="search-text")
        go = gr.Button("Search", variant="primary", scale=1, elem_id="search-button")
    with gr.Accordion("Options", open=False):
        with gr.Row():
            k = gr.Slider(1, 200, value=24, step=1, label="Results (k)")
            weight = gr.Slider(0, 1, value=0.5, step=0.05,
                               label="Weight: 0 = most similar, 1 = most likely to fail")
        cols = [S.LABEL, S.SPLIT, S.LOSS, S.PREDICTED_LOSS] + ui.ctx.metadata_columns
        where = gr.Textbox(label="Filter", placeholder="split = 'test' AND loss > 1",
                           info="= != < <= > >=, AND, OR, NOT, IN (...), LIKE, BETWEEN, IS NULL; strings in 'quotes'; "
                                "no functions. Columns: " + ", ".join(cols))
        negatives = gr.Textbox(label="Negative phrases (one per line): move away from these", lines=2)
        pool_only = gr.Checkbox(False, label="Unlabeled pool only (split = 'pool': images worth labelling next)",
                                elem_id="search-pool-only")
    status = gr.Markdown(elem_id="search-status")
    gallery = _results_gallery("search-gallery")
    shown = gr.State([])
    with gr.Row():
        name = gr.Textbox(label="Selection name", value="retrain", scale=2)
        add_all = gr.Button("Add all results to selection", scale=1)
        add_one = gr.Button("Add clicked image to selection", scale=1)
    panel = _detail_panel("Clicked image")
    for trigger in (go.click, q.submit):
        trigger(ui.search, inputs=[q, k, weight, where, negatives, pool_only], outputs=[gallery, status, shown],
                api_visibility="private", concurrency_id="query")
    _wire_details(ui, gallery, shown, panel)
    sel_dropdown_holder.append((add_all, add_one, name, shown, panel[3]))
    return q, go, k, weight, where, negatives, pool_only, gallery, status, shown


def _similar_tab(ui: Handlers):
    with gr.Row():
        upload = gr.File(label="Drop an image", file_types=["image"], type="filepath", height=220)  # opened by us
        with gr.Column():
            sample_id = gr.Textbox(label="…or a sample id", elem_id="similar-id")
            k = gr.Slider(1, 200, value=24, step=1, label="Results (k)")
            weight = gr.Slider(0, 1, value=0.5, step=0.05,
                               label="Weight: 0 = most similar, 1 = most likely to fail")
            go = gr.Button("Find similar hard examples", variant="primary", elem_id="similar-button")
    status = gr.Markdown()
    gallery = _results_gallery("similar-gallery")
    shown = gr.State([])
    go.click(ui.similar, inputs=[upload, sample_id, k, weight], outputs=[gallery, status, shown],
             api_name="similar_image", concurrency_id="query")
    _wire_details(ui, gallery, shown, _detail_panel("Clicked image"))


def _modes_tab(ui: Handlers, tabs, search_q, run_search):
    with gr.Row():
        top = gr.Slider(1, 50, value=10, step=1, label="Failure modes to find")
        go = gr.Button("Find failure modes", variant="primary", elem_id="explain-button")
    status = gr.Markdown(elem_id="modes-status")
    table = gr.Dataframe(headers=MODE_COLUMNS, interactive=False, elem_id="modes-table")
    modes = gr.State([])
    with gr.Row():
        choice = gr.Dropdown(label="Failure mode", choices=[], scale=3, elem_id="mode-choice",
                             allow_custom_value=True)  # filled per session; the handler checks it
        to_search = gr.Button("Search for it", scale=1, elem_id="mode-search")
    with gr.Row():
        name = gr.Textbox(label="Selection name", value="retrain", scale=2, elem_id="mode-selection-name")
        to_sel = gr.Button("Add its samples to selection", scale=1, elem_id="mode-add")
    md = gr.Markdown()
    examples = gr.Gallery(label="Example images", columns=8, height=300, allow_preview=False, fit_columns=False,
                          elem_id="mode-gallery")
    go.click(ui.explain, inputs=top, outputs=[table, choice, status, modes], api_visibility="private",
             concurrency_id="heavy", concurrency_limit=1)
    table.select(ui.mode_row_clicked, inputs=modes, outputs=choice, api_visibility="private")
    choice.change(ui.show_mode, inputs=[modes, choice], outputs=[examples, md], api_visibility="private")
    to_search.click(ui.mode_to_search, inputs=[modes, choice], outputs=[search_q, tabs],
                    api_visibility="private").success(**run_search)
    return name, to_sel, modes, choice


PLAN_COLUMNS = ["#", "failure mode", "action", "items", "available", "why"]


def _curate_tab(ui: Handlers):
    with gr.Row():
        # Choices are filled per session (and the API passes any name); the library refuses unknown ones.
        sel = gr.Dropdown(label="Selection", choices=[], scale=3, elem_id="curate-selection",
                          allow_custom_value=True)
        refresh = gr.Button("Refresh", scale=1)
    summary = gr.Markdown(elem_id="curate-summary")
    mix = gr.Dataframe(headers=["label", "count", "share", "mean true loss"], interactive=False,
                       label="Label mix")
    gallery = gr.Gallery(label="Samples (click one to remove it)", columns=8, height=300,
                         allow_preview=False, fit_columns=False, elem_id="curate-gallery")
    shown = gr.State([])
    with gr.Row():
        fmt_ = gr.Radio(["csv", "parquet", "folder (zip)"], value="csv", label="Download as")
        dl = gr.Button("Download", variant="primary", elem_id="download-button")
    file = gr.File(label="Manifest", elem_id="download-file")
    refresh.click(ui.refresh_selections, inputs=sel, outputs=sel, api_visibility="private")
    sel.change(ui.show_selection, inputs=sel, outputs=[summary, mix, gallery, shown], api_visibility="private")
    gallery.select(ui.remove_clicked, inputs=[sel, shown], outputs=[summary, mix, gallery, shown],
                   api_visibility="private")
    dl.click(ui.download, inputs=[sel, fmt_], outputs=file, api_name="download", concurrency_id="heavy")
    with gr.Accordion("Labelling plan: what to label next, and which labels to check", open=True):
        with gr.Row():
            budget = gr.Number(value=200, precision=0, minimum=1, label="Labelling budget (items)", scale=2,
                               elem_id="plan-budget")
            make = gr.Button("Make plan", variant="primary", scale=1, elem_id="plan-button")
        plan_md = gr.Markdown(elem_id="plan-summary")
        plan_table = gr.Dataframe(headers=PLAN_COLUMNS, interactive=False, wrap=True, elem_id="plan-table")
        plan_gallery = gr.Gallery(label="Items, in the order to label them", columns=8, height=300,
                                  allow_preview=False, fit_columns=False, elem_id="plan-gallery")
        plan_file = gr.File(label="The plan as a manifest (for a labelling tool; `llm2loss index` reads it)",
                            elem_id="plan-file")
    make.click(ui.plan, inputs=budget, outputs=[plan_md, plan_table, plan_gallery, plan_file],
               api_visibility="private", concurrency_id="heavy", concurrency_limit=1)
    return sel, refresh


def _health_tab(ui: Handlers):
    status = gr.Markdown("Press **Draw** to read the table and draw the model's health.")
    draw = gr.Button("Draw", variant="primary", elem_id="health-button")
    with gr.Row():
        hist = gr.Image(label="Loss distribution", show_label=False, interactive=False, buttons=["download"])
        scatter = gr.Image(label="Predicted vs true loss", show_label=False, interactive=False, buttons=["download"])
    with gr.Row():
        labels = gr.Image(label="Mean loss per label", show_label=False, interactive=False, buttons=["download"])
        pca = gr.Image(label="Embedding map (click a region)", show_label=False, interactive=False, elem_id="health-map",
                       buttons=["download"])
    region_status = gr.Markdown()
    region = _results_gallery("health-region")
    shown = gr.State([])
    draw.click(ui.health, outputs=[hist, scatter, labels, pca, status], api_visibility="private",
               concurrency_id="heavy")
    pca.select(ui.map_clicked, outputs=[region, region_status, shown], api_visibility="private")
    _wire_details(ui, region, shown, _detail_panel("Clicked image"))
    return draw


def _api(ui: Handlers) -> None:
    """Typed JSON endpoints for gradio_client (the page's own events are private)."""

    @friendly
    def search(text: str, k: int = 24, weight: float = 0.5, where: str = "",
               negatives: list[str] | None = None) -> list[dict]:
        """Samples matching a sentence, best (most likely failure) first."""
        return ui.search_records(text, k, weight, where, negatives)

    @friendly
    def similar(query: str, k: int = 24, weight: float = 0.5) -> list[dict]:
        """Similar hard examples of a stored sample id."""
        return ui.similar_records(query, k, weight)

    @friendly
    def explain(top: int = 10) -> list[dict]:
        """Failure modes named in words, costliest first (as `llm2loss explain --json`)."""
        return [public_mode(m) for m in ui.ctx.modes(int(top)) if m.get("shown", True)]

    @friendly
    def details(ids: list[str]) -> list[dict]:
        """The stored fields (no embedding) of these sample ids."""
        return ui.ctx.rows(ids)

    @friendly
    def selections() -> dict:
        """Every named selection and its size."""
        return {k: len(v) for k, v in ui._selections().all().items()}

    @friendly
    def add_to_selection(name: str, ids: list[str]) -> int:
        """Add ids to a named selection (created if new); returns its size."""
        return ui.add_ids(name, ids)

    @friendly
    def selection(name: str) -> dict:
        """A selection's size, label mix and ids."""
        s = ui.selection_summary(name)
        return {"name": s["name"], "size": s["size"], "labels": s["labels"], "ids": [r["id"] for r in s["rows"]]}

    @friendly
    def health() -> dict:
        """Rows, mean true and predicted loss, Spearman rho, mean loss per label."""
        return ui.health_data()[0].summary()

    for fn in (search, similar, explain, details, selections, add_to_selection, selection, health):
        gr.api(fn, api_name=fn.__name__, concurrency_id="query" if fn in (search, similar) else None)


def served_file(app: gr.Blocks, requested: str) -> str | None:
    """The real path of ``requested`` if the app ``app`` (from :func:`build_app`) may hand it out
    (an indexed image, or Gradio's own copy of a handler's output), else None; for any route."""
    return app.llm2loss_files.check(requested)


#: Gradio's file routes (``/gradio_api/file=PATH``, and the deprecated ``/gradio_api/file/PATH``).
_FILE_ROUTE = re.compile(r"^(?:.*/)?gradio_api/file(?:=|/)(?P<path>.*)$", re.DOTALL)


class FileRouteGuard:
    """ASGI middleware in front of Gradio's file route: 403 unless :class:`ServedFiles` admits the
    path. (Gradio's own check, by folder, still runs after it.)"""

    def __init__(self, app, files: ServedFiles):
        self.app = app
        self.files = files

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            m = _FILE_ROUTE.match(scope.get("path", ""))
            if m is not None:
                import anyio

                allowed = await anyio.to_thread.run_sync(self.files.check, m.group("path"))
                if allowed is None:
                    from starlette.responses import PlainTextResponse

                    log.warning("refused to serve %s: not an indexed image", m.group("path"))
                    await PlainTextResponse("File not allowed.", status_code=403)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def build_app(db: str | os.PathLike | Database) -> gr.Blocks:
    """The page for database ``db`` (a path or an open :class:`Database`); not yet launched."""
    ctx = AppContext(db)
    ui = Handlers(ctx)
    # delete_cache: Gradio's copies of served images and downloads older than a day go, hourly.
    # analytics off: the app must not phone home (and machines without network must not wait on it).
    with gr.Blocks(title="llm2loss", delete_cache=(3600, 86400), analytics_enabled=False) as app:
        app.llm2loss_context = ctx  # serve() reads the image folders from it
        app.llm2loss_files = ctx.files  # what the file route may hand out
        app.llm2loss_handlers = ui
        # API endpoints first, so they own the plain names (/search, ...) and the page's private events
        # of the same function names get suffixed ones.
        _api(ui)
        gr.Markdown(_header(ctx))
        holder: list = []
        with gr.Tabs() as tabs:
            with gr.Tab("Search", id="search"):
                q, go, k, weight, where, negatives, pool_only, gallery, status, shown = _search_tab(ui, holder)
            with gr.Tab("Similar", id="similar"):
                _similar_tab(ui)
            run_search = dict(fn=ui.search, inputs=[q, k, weight, where, negatives, pool_only],
                              outputs=[gallery, status, shown], api_visibility="private")
            with gr.Tab("Failure modes", id="modes"):
                mode_name, mode_add, modes, choice = _modes_tab(ui, tabs, q, run_search)
            with gr.Tab("Curate", id="curate") as curate_tab:
                sel, _ = _curate_tab(ui)
            with gr.Tab("Model health", id="health"):
                _health_tab(ui)
        add_all, add_one, name, shown_s, clicked = holder[0]
        add_all.click(ui.add_results, inputs=[name, shown_s], outputs=sel, api_visibility="private")
        add_one.click(ui.add_clicked, inputs=[name, clicked], outputs=sel, api_visibility="private")
        mode_add.click(ui.add_mode, inputs=[mode_name, modes, choice], outputs=sel, api_visibility="private")
        curate_tab.select(ui.refresh_selections, inputs=sel, outputs=sel, api_visibility="private")
        app.load(ui.refresh_selections, inputs=sel, outputs=sel, api_visibility="private")
    app.queue(default_concurrency_limit=CONCURRENCY)
    return app


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` -> (user, password); refuses anything else."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must look like USER:PASS (both non-empty); pass e.g. --auth ana:s3cret.")
    return user, password


def launch_kwargs(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860,
                  auth: str | None = None, cors_origins=()) -> dict:
    """Arguments for ``app.launch``: the listening address, the login, the file policy and the
    cross-site rules (:mod:`search_ui.serving`; ``cors_origins``: ``--cors-origin`` values)."""
    ctx: AppContext = app.llm2loss_context
    allowed = serving_dirs(ctx.db, ctx.guard)
    # The database folder holds losses and model files; it may sit inside an image root (the
    # offline world keeps both in one cache folder), so it is blocked explicitly.
    blocked = [str(ctx.db.path)]
    # Gradio needs the image folders in allowed_paths to copy handlers' images into its cache; its
    # file route would then serve anything in those folders, so FileRouteGuard narrows it to the
    # indexed images themselves.
    from starlette.middleware import Middleware

    cross_site = dict(origins=parse_cors_origins(cors_origins), loopback=is_loopback(host))
    app.llm2loss_cross_site = cross_site  # start_server puts the guard outermost, in front of Gradio's CORS
    middleware = [Middleware(FileRouteGuard, files=app.llm2loss_files), Middleware(CrossSiteGuard, **cross_site)]
    return dict(server_name=host, server_port=port, auth=parse_auth(auth), allowed_paths=allowed,
                blocked_paths=blocked, show_error=True, max_threads=40, css=CSS, ssr_mode=False,
                footer_links=["api"], quiet=True, app_kwargs={"middleware": middleware})


def serve(db: str | os.PathLike | Database, host: str = "127.0.0.1", port: int | None = 7860,
          auth: str | None = None, block: bool = True, cors_origins=(), compile_text: bool | None = None):
    """Build and launch the app with its JSON API (``/api/v1``, :mod:`search_ui.api`) on the same
    port; with ``block`` (the CLI) it runs until interrupted. ``cors_origins``: web origins allowed
    to call it from their pages (``--cors-origin``; none by default, :mod:`search_ui.serving`).
    Returns the running :class:`search_ui.api.Server` (``local_url``, ``close()``, and the Blocks'
    attributes). ``compile_text``: compile the CLIP text encoding in the background once serving
    (:meth:`AppContext.compile_text_in_background`); by default yes, unless ``--no-compile`` or the
    environment's ``LLM2LOSS_COMPILE_TEXT=0`` (the tests' default: quick servers)."""
    parse_auth(auth)  # refuse a malformed --auth before the slow part
    parse_cors_origins(cors_origins)
    if block:
        _stop_on_sigterm()  # before anything is made that must be removed on the way out
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes, not news
    app = build_app(db)
    kwargs = launch_kwargs(app, host, port, auth, cors_origins)
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        log.warning("listening on %s without --auth: anyone who can reach this port can use the app", host)
    from search_ui.api import start_server

    server = start_server(app, kwargs)  # the page at /, the JSON API at /api/v1, one port
    print(f"llm2loss UI for {Path(app.llm2loss_context.db.path)} at {server.local_url} "
          f"(JSON API: {server.local_url}api/v1/docs)", flush=True)
    if compile_text is None:
        compile_text = os.environ.get("LLM2LOSS_COMPILE_TEXT", "1").strip() != "0"
    if compile_text:
        app.llm2loss_context.compile_text_in_background()
    if block:
        server.block()
    return server


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, systemd, docker stop) stops the server as Ctrl-C does, so that its temporary
    folders are removed on the way out (Python's default for SIGTERM is to die on the spot)."""
    import signal

    if threading.current_thread() is threading.main_thread():
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
