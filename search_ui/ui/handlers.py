"""The functions behind the page's events: each calls one library function (the query engine,
``diagnosis.explain``, the selections, the export) and shapes its answer for the components.

Every handler is wrapped by :func:`friendly`, so a refused input reaches the page as the library's
one-sentence message and anything unexpected as a short message pointing at the server log — never
a stack trace.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np

from indexer import schema as S
from indexer.errors import UserError
from search_ui.ui import health as H
from search_ui.ui.context import AppContext, fmt, jsonable
from search_ui.ui.modes import evidence_markdown, mode_row

log = logging.getLogger(__name__)

DETAIL_SIMILAR_K = 8
MODE_EXAMPLES_SHOWN = 24
SELECTION_SHOWN = 60
PHRASES_SHOWN = 8


def friendly(fn):
    """Turn any exception into a ``gr.Error`` with a readable message (the trace goes to the log)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:
            from indexer.integrity import storage_error, write_error

            err = storage_error(e, None) or write_error(e, "to the database", None, cleaned=False)
            if err is not None:  # a damaged table, a full disk: said as such, pointing at `llm2loss check`
                log.warning("%s: %s", fn.__name__, e)
                raise gr.Error(str(err), print_exception=False) from None
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__} failed ({type(e).__name__}: {e}); the server log has the details.",
                           print_exception=False) from None

    return wrapper


def split_phrases(text: str | None) -> list[str]:
    """Negative phrases typed one per line (or separated by ';')."""
    return [p.strip() for p in re.split(r"[\n;]", text or "") if p.strip()]


def _none_if_blank(s: str | None) -> str | None:
    return s.strip() if s and s.strip() else None


def details_markdown(rec: dict) -> str:
    """A two-column table of a record's fields, core ones first."""
    core = [S.ID, S.LABEL, S.SPLIT, S.LOSS, S.PREDICTED_LOSS, S.PREDICTED_LOSS_STD, "similarity", "score"]
    keys = [k for k in core if k in rec] + [k for k in rec if k not in core and k != S.IMAGE]
    lines = ["| field | value |", "|---|---|"]
    for k in keys:
        v = rec[k]
        v = fmt(v, 3) if isinstance(v, float) or v is None else str(v).replace("|", "\\|")
        lines.append(f"| {k} | {v} |")
    lines.append(f"\n`{Path(str(rec.get(S.IMAGE, ''))).name}`")
    return "\n".join(lines)


def display_image(path: str | None, side: int = 256):
    """The clicked image for the details panel, enlarged (pixels kept sharp) when it is small."""
    if path is None:
        return None
    from PIL import Image

    from indexer.images import ImageRefused, open_image

    try:
        im = open_image(path)
    except ImageRefused as e:
        raise e.user_error("it may have changed on disk since indexing; re-run `llm2loss index`") from None
    if max(im.size) < side:
        f = side / max(im.size)
        im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.NEAREST)
    return im


class Handlers:
    """Event and API functions over one :class:`AppContext`."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self._health: tuple | None = None  # (table version, HealthData, MapGeometry, images)
        self._health_lock = threading.Lock()
        self._local = threading.local()  # the last query's engine notes, per worker thread

    # ---- search and similar --------------------------------------------------------------------
    def search_records(self, text: str, k: int = 24, weight: float = 0.5, where: str | None = None,
                       negatives: list[str] | None = None, pool_only: bool = False) -> list[dict]:
        if not text or not text.strip():
            raise UserError("the search box is empty; type what to look for, e.g. 'a blue circle'.")
        return self._query("search", text.strip(), k=int(k), where=_none_if_blank(where),
                           weight=float(weight), negatives=negatives or [], pool_only=bool(pool_only))

    def similar_records(self, query: str, k: int = 24, weight: float = 0.5, where: str | None = None,
                        uploaded: bool = False) -> list[dict]:
        """Similar hard examples of a stored id, or of a file Gradio received as an upload.

        A typed value must be a stored id: a path typed by a visitor is never opened, so the page
        cannot be used to probe the server's files.
        """
        query = str(query or "").strip()
        if not query:
            raise UserError("no image given; drop an image file or type a sample id.")
        if not uploaded and not self.ctx.rows([query]):
            raise UserError(f"no sample has the id '{query}'; type an id shown under a result, or drop an image.")
        return self._query("similar", query, k=int(k), where=_none_if_blank(where), weight=float(weight))

    def _query(self, method: str, *args, **kwargs) -> list[dict]:
        # Queries run side by side: the engine loads its parts once under locks and keeps each
        # thread's notes apart (search_ui.engine, "Threads").
        engine = self.ctx.engine
        results = getattr(engine, method)(*args, **kwargs)
        self._local.notes = list(getattr(engine, "notes", []) or [])
        return [jsonable(r.to_dict()) for r in results]

    def _gallery_answer(self, records: list[dict], what: str):
        items, shown = self.ctx.gallery(records)
        if not records:
            msg = f"No results for {what}."
        else:
            msg = f"{len(shown)} results for {what}, most likely failures first."
            notes = getattr(self._local, "notes", [])
            if notes:
                msg += " " + " ".join(notes)
            if len(shown) < len(records):
                msg += f" {len(records) - len(shown)} images could not be shown (missing or outside the dataset's folders)."
        return items, msg, shown

    @friendly
    def search(self, text, k, weight, where, negatives, pool_only=False, progress=gr.Progress()):
        progress(0.2, desc="searching")
        recs = self.search_records(text, k, weight, where, split_phrases(negatives), pool_only)
        what = f"“{text.strip()}”" + (" in the unlabeled pool" if pool_only else "")
        return self._gallery_answer(recs, what)

    @friendly
    def similar(self, upload, sample_id, k, weight, progress=gr.Progress()):
        # The upload arrives as a file path, unopened (a gr.File, not a gr.Image, whose own decoding
        # answers a bad file with Gradio's multi-line message): the engine opens it with the
        # indexer's image check and refuses a bad one in one sentence.
        upload = getattr(upload, "path", upload)  # a FileData when called in-process
        if upload is not None:
            from indexer.images import ImageRefused, open_image

            try:
                open_image(upload).close()
            except ImageRefused as e:  # named by its file name: the server's upload folder is no one's business
                e.detail = e.detail.replace(str(upload), f"the dropped file {Path(str(upload)).name!r}")
                raise e.user_error("drop a PNG or JPEG image, or type a sample id") from None
        query = upload or _none_if_blank(sample_id)
        progress(0.2, desc="searching")
        recs = self.similar_records(query, k, weight, uploaded=bool(upload))
        what = "the dropped image" if upload else f"sample {query}"
        return self._gallery_answer(recs, what)

    @friendly
    def details(self, shown: list[dict], evt: gr.SelectData):
        """A gallery click: the image large, its fields, and its similar hard examples."""
        if not shown or evt.index is None or evt.index >= len(shown):
            raise gr.Error("That image is no longer in the results; run the search again.")
        rec = shown[evt.index]
        sims = [r for r in self.similar_records(rec[S.ID], DETAIL_SIMILAR_K + 1) if r[S.ID] != rec[S.ID]]
        items, sims_shown = self.ctx.gallery(sims[:DETAIL_SIMILAR_K])
        image = display_image(self.ctx.servable(rec.get(S.IMAGE)))
        return image, details_markdown(rec), items, rec, sims_shown, gr.Column(visible=True)

    # ---- failure modes -------------------------------------------------------------------------
    @friendly
    def explain(self, top, progress=gr.Progress()):
        modes = self.ctx.modes(int(top), progress=progress)
        rows = [mode_row(i, m) for i, m in enumerate(modes, 1)]
        choices = [f"{i}. {m['description']}" for i, m in enumerate(modes, 1)]
        shown = sum(bool(m.get("shown", True)) for m in modes)
        msg = (f"{shown} failure modes whose evidence holds, costliest first (the share of the held-out loss their "
               f"group carries above the mean): each name's own images fail (true loss "
               f"on held-out rows, predicted loss with 95% intervals)."
               + (f" {len(modes) - shown} more whose evidence does not hold (under 20 samples, or the name's images "
                  f"do not fail) follow, marked hidden." if len(modes) > shown else "")
               if shown else (self.ctx.modes_note(int(top)) or "No failure modes found.")
               + (" They are listed below, marked hidden." if modes else ""))
        return rows, gr.Dropdown(choices=choices, value=choices[0] if choices else None), msg, modes

    @staticmethod
    def _mode_at(modes: list[dict], choice: str | None) -> dict:
        m = re.match(r"\s*(\d+)\.", choice or "")
        if not modes or not m or not 1 <= int(m.group(1)) <= len(modes):
            raise gr.Error("Pick a failure mode first (press 'Find failure modes').")
        return modes[int(m.group(1)) - 1]

    @friendly
    def mode_row_clicked(self, modes: list[dict], evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        return f"{row + 1}. {modes[row]['description']}" if modes and row < len(modes) else None

    @friendly
    def show_mode(self, modes: list[dict], choice: str | None):
        if not choice:
            return [], ""
        mode = self._mode_at(modes, choice)
        rows = self.ctx.rows(mode.get("examples", [])[:MODE_EXAMPLES_SHOWN])
        items, _ = self.ctx.gallery(rows)
        md = evidence_markdown(mode)
        also = [p for p in mode.get("phrases") or [] if p != mode["description"]][:PHRASES_SHOWN]
        if also:
            md += "\n\nNext best names: " + "; ".join(also)
        if len(items) < len(rows):
            md += f"\n\n{len(rows) - len(items)} example images could not be shown (missing or outside the dataset's folders)."
        return items, md

    @friendly
    def mode_to_search(self, modes: list[dict], choice: str | None):
        return self._mode_at(modes, choice)["description"], gr.Tabs(selected="search")

    # ---- selections ----------------------------------------------------------------------------
    def _selections(self):
        from search_ui.selections import Selections

        return Selections(self.ctx.db)

    def add_ids(self, name: str, ids: list[str]) -> int:
        """Add ``ids`` to the selection ``name``; its new size."""
        if not (name or "").strip():
            raise UserError("the selection has no name; type one in 'Selection name'.")
        if not ids:
            raise UserError("nothing to add; run a search or pick a failure mode first.")
        return self._selections().add(name, [str(i) for i in ids])

    def _added(self, name: str, ids: list[str]):
        size = self.add_ids(name, ids)
        gr.Info(f"Selection '{name}' now holds {size} samples.")
        return gr.Dropdown(choices=sorted(self._selections().all()), value=name)

    @friendly
    def add_results(self, name, shown):
        return self._added(name, [r[S.ID] for r in shown or []])

    @friendly
    def add_clicked(self, name, clicked):
        if not clicked:
            raise gr.Error("Click an image first.")
        return self._added(name, [clicked[S.ID]])

    @friendly
    def add_mode(self, name, modes, choice):
        mode = self._mode_at(modes, choice)
        return self._added(name, list(mode.get("ids") or mode.get("examples", [])))

    def selection_summary(self, name: str) -> dict:
        """Size, label mix (label, count, share, mean loss; largest first) of a selection."""
        ids = self._selections().get(name)
        rows = self.ctx.rows(ids)
        labels: dict[str, list] = {}
        for r in rows:
            labels.setdefault(str(r.get(S.LABEL)), []).append(r.get(S.LOSS))
        mix = [{"label": lab, "count": len(v), "share": len(v) / max(len(rows), 1),
                "mean_loss": H._nanmean(np.array([np.nan if x is None else x for x in v], float))}
               for lab, v in labels.items()]
        mix.sort(key=lambda m: -m["count"])
        return {"name": name, "size": len(ids), "found": len(rows), "labels": mix, "rows": rows}

    @friendly
    def refresh_selections(self, current):
        names = sorted(self._selections().all())
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    @friendly
    def show_selection(self, name):
        if not name:
            return "No selection yet: add search results or a failure mode to one.", [], [], []
        s = self.selection_summary(name)
        table = [[m["label"], m["count"], f"{100 * m['share']:.0f}%", fmt(m["mean_loss"])] for m in s["labels"]]
        items, shown = self.ctx.gallery(s["rows"][:SELECTION_SHOWN])
        md = f"**{name}**: {s['size']} samples, {len(s['labels'])} labels."
        if s["found"] < s["size"]:
            md += f" {s['size'] - s['found']} ids are no longer in the database."
        if len(items) < min(len(s["rows"]), SELECTION_SHOWN):
            md += " Some images could not be shown (missing or outside the dataset's folders)."
        return md, table, items, shown

    @friendly
    def remove_clicked(self, name, shown, evt: gr.SelectData):
        if not name or not shown or evt.index >= len(shown):
            raise gr.Error("Pick a selection and click one of its images.")
        self._selections().remove(name, [shown[evt.index][S.ID]])
        gr.Info(f"Removed {shown[evt.index][S.ID]} from '{name}'.")
        return self.show_selection(name)

    @friendly
    def download(self, name: str, fmt_: str, progress=gr.Progress()) -> str:
        """Write the selection as a manifest (csv/parquet) or a zipped class folder; the file's path."""
        from search_ui.export import export

        if not name:
            raise gr.Error("Pick a selection to download.")
        fmt_ = (fmt_ or "csv").split()[0]
        if fmt_ not in ("csv", "parquet", "folder"):
            raise gr.Error(f"Unknown format '{fmt_}'; choose csv, parquet or folder.")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "selection"
        # Gradio copies the returned file into its cache, so the export lives in the app's scratch
        # folder, removed when the app ends.
        out_dir = Path(tempfile.mkdtemp(dir=self.ctx.scratch))
        progress(0.2, desc=f"exporting {name}")
        if fmt_ == "folder":
            folder = export(self.ctx.db, out=out_dir / safe, fmt="folder", selection=name, link=False)
            progress(0.7, desc="zipping")
            return shutil.make_archive(str(out_dir / safe), "zip", root_dir=folder)
        return str(export(self.ctx.db, out=out_dir / f"{safe}.{fmt_}", fmt=fmt_, selection=name))

    # ---- labelling plan --------------------------------------------------------------------------
    @friendly
    def plan(self, budget, progress=gr.Progress()):
        """Make the labelling plan for ``budget`` items: (markdown, table of modes, gallery of the
        items, the plan's manifest as a CSV file)."""
        try:
            budget = int(budget)
        except (TypeError, ValueError):
            raise UserError(f"the budget {budget!r} is not a whole number; give the items to label, e.g. 200.") from None
        progress(0.1, desc="naming the failures and deciding what each needs")
        plan = self.ctx.plan(budget)
        rows = [[m["number"], m["mode"], m["action"], m["chosen"], m["available"], m["reason"]] for m in plan["modes"]]
        used = sum(m["chosen"] for m in plan["modes"])
        md = (f"**Labelling plan**: {used} of {budget} items over {len(plan['modes'])} failure modes "
              f"({plan['rule']}). *collect*: unlabeled pool images to label; *relabel*: training labels to check.")
        recs = self.ctx.rows([it["id"] for it in plan["items"]][:SELECTION_SHOWN])
        items, _ = self.ctx.gallery(recs)
        out_dir = Path(tempfile.mkdtemp(dir=self.ctx.scratch))
        from diagnosis.curate import items_table
        from search_ui.export import _write_table

        path = out_dir / "labelling_plan.csv"
        _write_table(items_table(plan["items"]), path, "csv")
        return md, rows, items, str(path)

    # ---- model health --------------------------------------------------------------------------
    def health_data(self, progress=None):
        """(HealthData, MapGeometry, [4 images]) for the current table version, cached."""
        version = self.ctx.db.version
        with self._health_lock:
            if self._health is None or self._health[0] != version:
                if progress is not None:
                    progress(0.1, desc="reading losses and embeddings")
                h = H.load_health(self.ctx.db)
                if progress is not None:
                    progress(0.6, desc="drawing")
                map_img, geom = H.plot_map(h)
                imgs = [H.plot_loss_distribution(h), H.plot_predicted_vs_true(h), H.plot_label_means(h), map_img]
                self._health = (version, h, geom, imgs)
            return self._health[1:]

    @friendly
    def health(self, progress=gr.Progress()):
        h, _, imgs = self.health_data(progress)
        s = h.summary()
        md = (f"{s['rows']} samples (plotted: {s['plotted_rows']}); mean true loss {fmt(s['mean_loss'], 3)}, "
              f"mean predicted loss {fmt(s['mean_predicted_loss'], 3)}; Spearman rho {fmt(s['spearman'], 3)}.")
        if not h.has_predictions:
            md += " No predicted loss yet: run `llm2loss diagnose --db DIR`."
        return (*imgs, md)

    @friendly
    def map_clicked(self, evt: gr.SelectData):
        h, geom, _ = self.health_data()
        px, py = evt.index
        ids = H.ids_near(h, geom, float(px), float(py))
        items, shown = self.ctx.gallery(self.ctx.rows(ids))
        msg = (f"{len(shown)} samples near the click, most likely failures first."
               if ids else "No samples there; click closer to the points.")
        return items, msg, shown
