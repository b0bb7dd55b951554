"""The ``llm2loss`` console script: one subcommand per pipeline stage (see DESIGN.md).

Each handler parses options, calls one library function and prints its result: JSON on stdout with
``--json`` (and nothing else there), human-readable text otherwise. Logs and progress go to stderr.
A :class:`~indexer.errors.UserError` becomes a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from indexer.errors import UserError

log = logging.getLogger("llm2loss")

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
#: --where's help: the filter language of search_ui.filters (not imported here: --help stays fast).
WHERE_HELP = ("filter over the table's columns: = != < <= > >=, AND, OR, NOT, IN (...), LIKE, BETWEEN .. AND .., "
              "IS [NOT] NULL, + - * /; strings in 'single quotes', odd column names in `backquotes`; no "
              "function calls (README, Filters), e.g. \"split = 'test' AND loss > 1\"")


def _print_json(obj) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if hasattr(x, "item") and callable(x.item):  # numpy scalars
            return clean(x.item())
        return x

    json.dump(clean(obj), sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _clip_spec(args):
    from indexer.clip import ClipSpec

    return ClipSpec(model=args.clip, pretrained=args.pretrained, checkpoint=args.clip_checkpoint)


# ---- handlers ---------------------------------------------------------------------------------
def cmd_index(args) -> int:
    from indexer.pipeline import clip_spec_from_args, index_dataset

    # --clip unset: the model recorded in --db, else ViT-B-32 (see clip_spec_from_args)
    common = dict(clip=clip_spec_from_args(args.clip, args.pretrained, args.clip_checkpoint),
                  predictions=args.predictions, model=args.model, task=args.task, batch_size=args.batch_size,
                  device=args.device, strict=args.strict)
    if args.engine == "ray":
        from indexer.ray_engine import index_dataset_ray

        report = index_dataset_ray(args.source, args.db, address=args.address, **common)
    else:
        if args.address is not None:
            raise UserError("--address is for --engine ray; add --engine ray or drop --address.")
        report = index_dataset(args.source, args.db, workers=args.workers, **common)
    print(report.summary())
    return 0


def cmd_diagnose(args) -> int:
    if args.address and args.engine != "ray":
        raise UserError("--address is for --engine ray; add --engine ray or drop --address.")
    if args.score_new:
        if args.engine == "ray":
            from diagnosis.ray_score import score_new_rows_ray

            written = score_new_rows_ray(args.db, address=args.address)
        else:
            from diagnosis.run import score_new_rows

            written = score_new_rows(args.db)
        if args.json:
            _print_json({"scored_rows": written})
        else:
            print(f"scored {written} new rows with the fitted ensemble")
        return 0
    if args.engine == "ray":
        raise UserError("--engine ray scores new rows with a fitted ensemble; add --score-new "
                        "(fitting runs on one machine, on a subsample: see --max-rows).")
    from diagnosis.run import diagnose

    report = diagnose(args.db, members=args.members, folds=args.folds, max_rows=args.max_rows)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
    return 0


def cmd_explain(args) -> int:
    from diagnosis.explain import explain

    modes = explain(args.db, vocab=args.vocab, top=args.top, show_all=args.all)
    if args.json:
        _print_json([m.to_dict() for m in modes])
        if modes.note:  # the answer stays a list; why it holds no shown mode goes beside it
            print(modes.note, file=sys.stderr)
    else:
        if modes.note:
            print(modes.note[:-1] + "; --all lists them." if modes.hidden and not args.all else modes.note)
        for i, m in enumerate(modes, 1):
            print(f"{i:2d}. {m.summary()}")
    return 0


def _print_results(results, as_json: bool, args=None) -> None:
    if as_json:
        _print_json([r.to_dict() for r in results])
        return
    if not results:
        why = f"no row of {args.db} matches --where {args.where!r}" if args is not None and args.where else \
            "the database holds no other rows to rank"
        print(f"no results: {why}.")
    for i, r in enumerate(results, 1):
        print(f"{i:3d}. {r.summary()}")


def cmd_search(args) -> int:
    from search_ui.engine import QueryEngine, parse_weighted

    if not args.text.strip() and args.image is None:
        raise UserError("the search TEXT is empty; say what to look for, like `llm2loss search \"a blue circle\"`, "
                        "or pass --image ID|FILE to search by an image.")
    for opt, phrases in (("--also", args.also), ("--negative", args.negative)):
        for p in phrases:
            if not str(parse_weighted(p)[0]).strip():
                raise UserError(f"{opt} {p!r} has no phrase; give the words, like {opt} \"snow:0.5\", or drop it.")
    engine = QueryEngine(args.db)
    results = engine.search(
        # the main phrase is taken literally ("16:9" is not a weight); --also/--negative take TEXT:W
        [(args.text, 1.0), *args.also],
        k=args.k,
        where=args.where,
        weight=args.weight,
        negatives=args.negative,
        image=args.image,
        candidates=args.candidates,
        pool_only=args.pool,
    )
    _print_results(results, args.json, args)
    return 0


def cmd_similar(args) -> int:
    from search_ui.engine import QueryEngine

    engine = QueryEngine(args.db)
    results = engine.similar(args.query, k=args.k, where=args.where, weight=args.weight,
                             candidates=args.candidates, pool_only=args.pool)
    _print_results(results, args.json, args)
    return 0


def cmd_export(args) -> int:
    from search_ui.export import export

    written = export(
        args.db,
        out=args.out,
        fmt=args.format,
        query=args.query,
        ids=args.ids,
        mode=args.mode,
        selection=args.selection,
        k=args.k,
        link=not args.copy,
        where=args.where,
        force=args.force,
        pool_only=args.pool,
    )
    print(written)
    return 0


def cmd_curate(args) -> int:
    from diagnosis.curate import plan_curation
    from search_ui.export import write_manifest

    made = {}

    def make():
        made["plan"] = plan_curation(args.db, args.budget, modes=args.mode or None, vocab=args.vocab, top=args.top)
        return made["plan"].table()

    written = write_manifest(None, args.out, force=args.force, make=make)
    plan = made["plan"]
    if args.json:
        _print_json({**plan.to_dict(), "out": str(written)})
    else:
        print(plan.summary())
        print(f"wrote {len(plan.items)} items to {written}")
    return 0


def cmd_select(args) -> int:
    from search_ui.selections import Selections, read_ids_file

    sel = Selections(args.db)
    if args.action == "list":
        if args.json:
            _print_json({name: len(ids) for name, ids in sel.all().items()})
        for name, ids in ([] if args.json else sel.all().items()):
            print(f"{name}\t{len(ids)}")
        return 0
    if not args.name:
        raise UserError(f"`select {args.action}` needs a selection NAME, e.g. `llm2loss select {args.action} hard-cases`.")
    if args.action == "show":
        ids = sel.get(args.name)
        if args.json:
            _print_json(ids)
        else:
            print("\n".join(ids))
    elif args.action == "add":
        if (args.ids is None) == (args.query is None):
            raise UserError("`select add` needs exactly one of --ids FILE or --query TEXT.")
        if args.query is not None:
            from search_ui.engine import QueryEngine

            ids = [r.id for r in QueryEngine(args.db).search(args.query, k=args.k, where=args.where)]
        else:
            ids = read_ids_file(args.ids)
        size = sel.add(args.name, ids)
        print(f"{args.name}\t{size}")
    elif args.action == "remove":
        left = sel.remove(args.name, read_ids_file(args.ids) if args.ids else None)
        print(f"{args.name}\t{left}")
    return 0


def cmd_check(args) -> int:
    from diagnosis.check import check_database

    report = check_database(args.db, repair=args.repair)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.summary())
    return 0 if report.ok else 1


def cmd_serve(args) -> int:
    from search_ui.app import serve

    serve(args.db, host=args.host, port=args.port, auth=args.auth, cors_origins=args.cors_origin,
          compile_text=False if args.no_compile else None)
    return 0


def cmd_demo(args) -> int:
    from search_ui.demo import run_demo

    run_demo(db=args.db, spec=args.spec, serve=not args.no_serve, port=args.port, retrain=args.retrain)
    return 0


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm2loss",
        description="Find where and why a model fails: embed its data with CLIP, predict each sample's "
        "loss, search failures in words, name failure modes, export retraining sets.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def db_arg(sp, required=True):
        sp.add_argument("--db", required=required, help="database folder (created by `index`)")

    s = sub.add_parser("index", help="embed a dataset with CLIP and store it with its losses")
    s.add_argument("source", help="manifest (CSV/Parquet with an `image` column) or a root/<class>/<image> folder")
    db_arg(s)
    s.add_argument("--clip", default=None, help="open_clip model name, or a JSON architecture config path "
                   "(default: ViT-B-32, or the model already recorded in --db)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag, or `none` for random weights")
    g.add_argument("--clip-checkpoint", default=None, help="local CLIP weights file")
    lg = s.add_mutually_exclusive_group()
    lg.add_argument("--predictions", default=None,
                    help="CSV/Parquet with `id` and one column per class (probabilities or logits) -> loss")
    lg.add_argument("--model", default=None, help="MODULE:FUNCTION returning a torch model (and optionally its "
                    "preprocessing) run over the images to compute losses")
    s.add_argument("--task", choices=["auto", "classification", "multilabel", "regression"], default="auto",
                   help="how losses are computed from --predictions/--model (default: auto)")
    s.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when present")
    s.add_argument("--workers", type=int, default=None, help="image-decoding processes (default: cores - 1 with a GPU, 0 on the CPU where the model uses every core)")
    s.add_argument("--strict", action="store_true", help="fail on the first bad row instead of rejecting it")
    s.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="`ray`: run on a Ray cluster (needs the `ray` extra; see docs/RAY.md)")
    s.add_argument("--address", default=None, help="with --engine ray: the cluster's address "
                   "(HOST:PORT, ray://HOST:PORT or `auto`; default: a local Ray)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("diagnose", help="fit the diagnosis ensemble and write predicted_loss onto every row")
    db_arg(s)
    s.add_argument("--members", type=int, default=None, help="ensemble members per fold, cycling through knn, rff, hgb, mlp (default 4)")
    s.add_argument("--folds", type=int, default=None, help="out-of-fold splits (default 5)")
    s.add_argument("--max-rows", type=int, default=None,
                   help="fit on at most this many rows (stratified subsample); all rows are still scored")
    s.add_argument("--score-new", action="store_true",
                   help="do not refit: score rows added since the last fit with the saved ensemble")
    s.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="with --score-new, `ray` scores on a Ray cluster (needs the `ray` extra)")
    s.add_argument("--address", default=None, help="with --engine ray: the cluster's address (default: a local Ray)")
    s.add_argument("--json", action="store_true", help="print the quality report as JSON")
    s.set_defaults(func=cmd_diagnose)

    s = sub.add_parser("explain", help="name the model's failure modes in words, costliest first", description=(
        "Name the model's failure modes in words, costliest first. A mode is named by the phrase (or a "
        "composition of phrases, or of the values its failing images show) whose images gather the most "
        "predicted loss, among the names true of the failing images they gather; a failure whose images "
        "other modes took is named too when its other images fail as well; fragments differing in one "
        "kind of word ('a blue triangle', "
        "'a blue circle') fold into what they share ('a blue object') when its images fail. Every name "
        "is checked against the data before it is shown: its images fail (predicted, and true loss on "
        "held-out rows, at least 2x the mean) and it has at least 20 samples; each comes with that "
        "evidence. Modes are ordered by what they cost: the share of the held-out loss their group "
        "carries above the mean loss (with a 95% interval), so a small group failing badly comes "
        "before a large one failing mildly. When diagnose found the embeddings do not explain the "
        "losses (out-of-fold Spearman and AUROC within noise of chance), explain says so and names "
        "nothing; when it shows no mode it says why."))
    db_arg(s)
    s.add_argument("--vocab", default=None, help="file of phrases, one per line (default: the dataset's vocab.txt, else its label names, caption "
                   "column, open_clip's ImageNet class names and generic concepts, composed)")
    s.add_argument("--top", type=int, default=10, help="failure modes to show (default 10)")
    s.add_argument("--all", action="store_true",
                   help="also list the modes whose evidence does not hold (fewer than 20 samples, the images "
                        "their name retrieves do not fail, or the name is untrue of most of them), marked hidden")
    s.add_argument("--json", action="store_true",
                   help="print one JSON list on stdout (why it is empty, when it is, on stderr)")
    s.set_defaults(func=cmd_explain)

    def query_opts(sp):
        sp.add_argument("-k", type=int, default=10, help="results (default 10)")
        sp.add_argument("--where", default=None, help=WHERE_HELP)
        sp.add_argument("--weight", type=float, default=None,
                        help="0 = rank by similarity only, 1 = by predicted failure only (default 0.5)")
        sp.add_argument("--json", action="store_true", help="print one JSON list on stdout")
        sp.add_argument("--candidates", type=int, default=None,
                        help="least pool of most similar rows the ranking picks from; the neighbourhood is 10x (default max(100, 10k))")
        sp.add_argument("--pool", action="store_true",
                        help="only unlabeled rows (split = 'pool'): images worth labelling next")

    s = sub.add_parser("search", help="images matching a sentence, ranked by predicted failure")
    s.add_argument("text", help="what to look for, e.g. \"a blue circle\"")
    db_arg(s)
    query_opts(s)
    s.add_argument("--negative", action="append", default=[], metavar="TEXT",
                   help="phrase to move away from (repeatable); `TEXT:W` sets its weight")
    s.add_argument("--image", default=None, help="an id or image file to combine with the text; `X:W` sets its weight")
    s.add_argument("--also", action="append", default=[], metavar="TEXT",
                   help="another phrase to look for (repeatable); `TEXT:W` sets its weight")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("similar", help="similar hard examples of a stored id or an image file")
    s.add_argument("query", metavar="ID|IMAGE_PATH")
    db_arg(s)
    query_opts(s)
    s.set_defaults(func=cmd_similar)

    s = sub.add_parser("export", help="write a selection as a manifest or a class folder")
    db_arg(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--query", default=None, help="export this search's results")
    g.add_argument("--ids", default=None, help="file of ids, one per line")
    g.add_argument("--mode", default=None, help="a failure mode from `explain` (its description or number)")
    g.add_argument("--selection", default=None, help="a named selection (see `select`)")
    s.add_argument("-k", type=int, default=100, help="results for --query / --mode (default 100)")
    s.add_argument("--out", required=True, help="output file (.csv/.parquet) or folder")
    s.add_argument("--format", choices=["csv", "parquet", "folder"], default=None,
                   help="default: from --out's extension (.csv/.parquet; none: folder)")
    s.add_argument("--copy", action="store_true", help="copy images into a folder export (default: symlink)")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.add_argument("--where", default=None, help="for --query: " + WHERE_HELP)
    s.add_argument("--pool", action="store_true", help="with --query: only unlabeled rows (split = 'pool')")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("curate", help="a labelling plan: which pool images to label and which labels to check, per failure mode",
                       description=(
        "Plan how to spend a labelling budget on the failure modes `explain` shows. Each mode gets one "
        "action, decided from the table and said in one sentence with its figures: `relabel` when the "
        "labels of its training images are contradicted by their nearest neighbours' far more often than "
        "across the training split (the suspect rows, most suspect first, with the label their neighbours "
        "suggest), else `collect` (unlabeled pool images its name retrieves, highest predicted loss first, "
        "spread out so near-duplicates do not use the budget twice). Half the budget is split equally over "
        "the modes, half by their share of the held-out loss, each part capped by the items a mode has. "
        "Writes a manifest (id, image, label, split, loss, mode, action, priority, suggested_label, "
        "plan_predicted_loss, reason) that a labelling tool takes and `llm2loss index` reads."))
    db_arg(s)
    s.add_argument("--budget", type=int, required=True, help="items to label or check, in all")
    s.add_argument("--mode", action="append", default=[], metavar="NAME",
                   help="plan for this failure mode only (its number or description in `explain`; repeatable)")
    s.add_argument("--out", required=True, help="the plan's manifest (.csv or .parquet)")
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.add_argument("--top", type=int, default=10, help="modes of `explain` to plan for (default 10)")
    s.add_argument("--vocab", default=None, help="phrases for naming the modes (as for `explain`)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_curate)

    s = sub.add_parser("select", help="named selections kept in the database (curated retraining sets)")
    db_arg(s)
    s.add_argument("action", choices=["list", "show", "add", "remove"])
    s.add_argument("name", nargs="?", default=None)
    s.add_argument("--ids", default=None, help="file of ids, one per line")
    s.add_argument("--query", default=None, help="add this search's results (with `add`)")
    s.add_argument("-k", type=int, default=100, help="results for --query (default 100)")
    s.add_argument("--where", default=None, help="for --query: " + WHERE_HELP)
    s.add_argument("--json", action="store_true", help="print `list` / `show` as JSON")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("check", help="verify the database: every data file of the table, the FAISS index, the "
                       "ensemble and caches against it (like git fsck)", description=(
        "Verify a database folder: read every data file of the table's latest version, check each derived "
        "file (the FAISS index and its ids, the diagnosis ensemble, cached text means) against the checksum and "
        "the table version it was stamped with when written, and list what is damaged and what to do. Exit "
        "status 0 when all is well, 1 when something is damaged (2 for a folder that is not a database). "
        "--repair goes back to the newest intact table version when the latest is damaged (saying which "
        "versions and rows that loses), rebuilds the FAISS index and the id index, and removes damaged caches "
        "and temporary files left by interrupted writes; it never refits the ensemble."))
    db_arg(s)
    s.add_argument("--repair", action="store_true", help="repair what can be repaired here (see above), then check again")
    s.add_argument("--json", action="store_true", help="print the findings as one JSON document")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("serve", help="the Gradio web UI and its JSON HTTP API (/api/v1), on one port")
    db_arg(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--auth", default=None, metavar="USER:PASS",
                   help="require this login (the page's login form; HTTP Basic for /api/v1)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of this origin (scheme://host[:port]) call the API from a browser (repeatable); "
                        "by default no other origin is approved, and cross-site requests change nothing")
    s.add_argument("--no-compile", action="store_true",
                   help="do not compile the CLIP text encoding (by default it is compiled with torch.compile in the "
                        "background after start, tens of seconds, and then encodes a query ~2x faster "
                        "on a CPU; queries are answered meanwhile; LLM2LOSS_COMPILE_TEXT=0 in the environment does the same)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("demo", help="build the offline world, index, diagnose and serve it")
    s.add_argument("--db", default=None, help="database folder (default: in the world's cache)")
    s.add_argument("--spec", default=None, help="world spec JSON (default: the built-in spec)")
    s.add_argument("--no-serve", action="store_true", help="stop after printing the summary")
    s.add_argument("--retrain", action="store_true",
                   help="also retrain the world's model on the labelling plan and on a random set of the same "
                        "size, and print what each changed per planted slice (two trainings: minutes)")
    s.add_argument("--port", type=int, default=7860)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Third-party libraries (open_clip logs model creation on the root logger) speak at WARNING;
    # our own packages at INFO, or everything at DEBUG with -v.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for name in ("llm2loss", "indexer", "diagnosis", "search_ui"):
            logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"llm2loss {args.command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a damaged table or a full / read-only disk met outside a guarded read or write
        from indexer.integrity import storage_error, write_error

        err = storage_error(e, getattr(args, "db", None)) or write_error(e, "to the disk", args.command, cleaned=False,
                                                                         db_path=getattr(args, "db", None))
        if err is None:
            raise
        log.debug("%s", e, exc_info=e)
        print(f"llm2loss {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"llm2loss {args.command}: interrupted; rerun the same command to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
