"""Evaluate diagnosis + explain on offline worlds with planted slices (issue 4, "Measured").

For each world spec (the default and two others below): build the world (cached), index it with its
tiny CLIP, run ``diagnose``, then for every planted slice whose true mean loss is at least 2x the
world's mean, print side by side:

* ``p@10`` -- precision@10 of a search for the slice's description ranked by predicted failure
  (the engine's documented score, ``search_ui.ranking.rank_scores`` over a pool of the 100 most
  similar rows, weight 0.5); a hit is a slice member whose true loss is above the world's 90th
  percentile. Columns: ensemble, single ridge, similarity only (weight 0).
* ``explain rank`` -- rank of the first failure mode whose description names the slice's attribute
  values, in ``explain`` with each way of crossing the modality gap: the neighbourhood mean
  (default), the projection, the mean shift, and none; and the rank of the slice's phrase among all
  vocabulary phrases scored by the ensemble that way, and by a single ridge (neighbourhood mean of
  the ridge's predictions).
* per world: AUROC of out-of-fold ``predicted_loss`` for the top 10% of true losses on the test
  split, with Spearman rho, for the ensemble and a single ridge.

Usage: ``nice -n 10 python scripts/eval_diagnosis.py [--work DIR] [--specs default,b,c] [--small] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from diagnosis.ensemble import DiagnosisEnsemble
from diagnosis.explain import _Table, explain, neighbourhood_size, score_vocabulary
from diagnosis.metrics import quality
from diagnosis.run import diagnose, load_ensemble, read_training_data
from diagnosis.text import Scorer
from diagnosis.vocab import read_vocab_file
from indexer.store import Database
from indexer.world import benchmark_specs

log = logging.getLogger("eval_diagnosis")

#: The same worlds as scripts/eval_world.py, so one cached build serves both scripts.
SPECS = benchmark_specs()


#: ``--small``: the sizes of the demo's quick world (4,500 rows), for a shared 2-core machine.
SMALL = {"n_train": 3000, "n_test": 1500, "image_size": 48, "clip": {"steps": 150, "batch_size": 128, "n_images": 3000},
         "blackbox": {"epochs": 4, "batch_size": 128, "width": 24}}


def names_slice(text: str, where: dict) -> bool:
    """True when ``text`` contains every attribute value of the slice as a word."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return all(str(v).lower() in words for v in where.values())


def first_rank(texts: list[str], where: dict) -> int | None:
    return next((i + 1 for i, t in enumerate(texts) if names_slice(t, where)), None)


def first_mode_rank(modes, where: dict) -> int | None:
    """Rank of the first failure mode with any phrase naming the slice (a merged mode lists every
    phrase whose group it absorbed; its headline is its worst-scoring one)."""
    return next((i + 1 for i, m in enumerate(modes) if any(names_slice(p, where) for p in m.phrases)), None)


def phrase_position(modes, where: dict) -> str | None:
    """Where that phrase stands in its mode's list (the name first, the rest worst first): "3/13"."""
    for m in modes:
        hit = next((j + 1 for j, p in enumerate(m.phrases) if names_slice(p, where)), None)
        if hit is not None:
            return f"{hit}/{len(m.phrases)}"
    return None


def worst_groups(rows, loss: np.ndarray, min_rows: int = 30) -> list[tuple[str, float]]:
    """Every group of one or two attribute values, worst true mean loss first (min ``min_rows`` rows):
    the ground truth explain is measured against, planted slices and emergent failures alike."""
    from itertools import combinations

    from indexer.world.spec import ATTRIBUTES

    out = {}
    attrs = [a for a in ATTRIBUTES if a in rows]
    for r in (1, 2):
        for combo in combinations(attrs, r):
            g = rows[list(combo)].astype(str).agg(" ".join, axis=1).to_numpy()
            for key in np.unique(g):
                m = g == key
                if m.sum() >= min_rows:
                    out[key] = float(loss[m].mean())
    return sorted(out.items(), key=lambda kv: -kv[1])


def search_p10(X, q, pred, hit, k=10, weight=0.5):
    from search_ui.ranking import default_candidates, rank_scores

    sims = X @ q
    pool = np.argpartition(-sims, default_candidates(k))[: default_candidates(k)]
    score = rank_scores(sims[pool], pred[pool] if pred is not None else np.full(len(pool), np.nan), weight)
    order = pool[np.lexsort((-sims[pool], -score))][:k]
    return float(hit[order].mean())


def broad_p10(scorer, X, rows, where: dict, failing: np.ndarray, pred, ridge_pred) -> dict:
    """p@10 of searches for each single attribute of the slice ("a blue object", "a circle"), where a
    hit is any failing row with that attribute: "show me the blue objects the model fails on", the
    search in which ranking by predicted failure must beat similarity. Mean over the attributes."""
    from indexer.world.vocab import describe

    out = {"ensemble": [], "ridge": [], "similarity only": []}
    for attr, value in where.items():
        q = scorer.encode_text([describe({attr: value})])[0]
        hit = (rows[attr].to_numpy() == value) & failing
        out["ensemble"].append(search_p10(X, q, pred, hit))
        out["ridge"].append(search_p10(X, q, ridge_pred, hit))
        out["similarity only"].append(search_p10(X, q, None, hit, weight=0.0))
    return {k: float(np.mean(v)) for k, v in out.items()}


def ensure_db(world, work: Path, progress: bool) -> Database:
    from indexer.clip import ClipSpec
    from indexer.pipeline import index_dataset

    path = work / world.hash / "db"
    db = None
    if (path / "meta.json").exists():
        db = Database(path)
        if not db.has_table() or db.count_rows() != len(world.rows()):
            db = None
    if db is None:
        clip = ClipSpec(model=str(world.clip_config), checkpoint=str(world.clip_checkpoint))
        t = time.perf_counter()
        rep = index_dataset(world.manifest, path, clip=clip, device="cpu", progress=progress)
        log.info("indexed %s in %.0fs: %s", world.hash, time.perf_counter() - t, rep.summary())
        db = Database(path)
    try:
        if load_ensemble(db).stale is None:
            return db
    except Exception:  # noqa: BLE001 - none yet or stale: fit
        pass
    t = time.perf_counter()
    log.info("%s", diagnose(db, progress=progress).summary())
    log.info("diagnosed in %.0fs", time.perf_counter() - t)
    return db


def evaluate(name: str, spec, work: Path, progress: bool) -> dict:
    from indexer.world import build_world
    from indexer.world.vocab import describe

    t0 = time.perf_counter()
    world = build_world(spec, progress=progress)
    db = ensure_db(world, work, progress)
    rows = world.rows().set_index("id")
    ids, X, loss, split = read_training_data(db, progress=False)
    is_test = split == "test"
    rows = rows.loc[ids]
    stored = db.read(["id", "predicted_loss", "predicted_loss_std"]).to_pandas().set_index("id").loc[ids]
    pred = stored["predicted_loss"].to_numpy(np.float64)
    table = _Table(ids, X, loss, pred, stored["predicted_loss_std"].to_numpy(np.float64))
    # single ridge, fitted on the same rows as diagnose (held-out ones) and scored out-of-fold there
    fit = is_test if load_ensemble(db).info.get("fit_split") == "held-out" else np.isfinite(loss)
    ridge = DiagnosisEnsemble(n_members=1, n_folds=5, kinds=("ridge",), bootstrap=False, random_state=0)
    ridge.fit(X[fit], loss[fit])
    ridge_pred = ridge.predict(X)
    ridge_pred[fit] = ridge.oof_prediction_
    q_ens, q_ridge = quality(loss[is_test], pred[is_test]), quality(loss[is_test], ridge_pred[is_test])

    scorer = Scorer(db)
    vocab = read_vocab_file(world.vocab)
    T = scorer.encode_text(vocab)
    gap = scorer.gap(T)

    def words(correction: str, tbl: _Table = table, correct_gap: bool = True) -> np.ndarray:
        """The vocabulary's scores exactly as explain computes them (same neighbourhood size)."""
        return score_vocabulary(scorer, vocab, False, correct_gap, correction=correction, table=tbl,
                                k=neighbourhood_size(len(ids)))[2]

    word_scores = {
        "ensemble neighbourhood": words("neighbourhood"),
        "ensemble projection": words("projection"),
        "ensemble shift": words("shift"),
        "ensemble raw": words("shift", correct_gap=False),
        "ridge neighbourhood": words("neighbourhood", dataclasses.replace(table, pred=ridge_pred)),
    }
    ranked = {k: [vocab[i] for i in np.argsort(-v, kind="stable")] for k, v in word_scores.items()}
    modes = {c: explain(db, top=30, **kw) for c, kw in
             {"neighbourhood": {}, "projection": {"correction": "projection"}, "shift": {"correction": "shift"},
              "no gap": {"correct_gap": False}}.items()}

    mean_loss, p90 = float(loss.mean()), float(np.quantile(loss, 0.9))
    slices = []
    for s in world.slices:
        member = rows[s["column"]].to_numpy(bool)
        ratio = float(loss[member].mean() / mean_loss) if member.any() else 0.0
        if ratio < 2.0:
            slices.append({"slice": s["name"], "loss_ratio": round(ratio, 2), "eligible": False})
            continue
        desc = describe(s["where"])
        q = scorer.encode_text([desc])[0]
        hit = member & (loss > p90)
        slices.append({
            "slice": s["name"], "kind": s["kind"], "description": desc, "loss_ratio": round(ratio, 2),
            "eligible": True, "members": int(member.sum()), "failing_members": int(hit.sum()),
            "p@10": {"ensemble": search_p10(X, q, pred, hit), "ridge": search_p10(X, q, ridge_pred, hit),
                     "similarity only": search_p10(X, q, None, hit, weight=0.0)},
            "p@10 broad": broad_p10(scorer, X, rows, s["where"], loss > p90, pred, ridge_pred),
            "explain rank": {**{f"explain ({c})": first_rank([m.description for m in v], s["where"])
                                for c, v in modes.items()},
                             **{f"explain any phrase ({c})": first_mode_rank(v, s["where"]) for c, v in modes.items()},
                             **{f"phrase position ({c})": phrase_position(v, s["where"]) for c, v in modes.items()},
                             **{f"words {k}": first_rank(v, s["where"]) for k, v in ranked.items()}},
        })
    return {"world": name, "hash": world.hash, "rows": len(ids), "test_rows": int(is_test.sum()),
            "mean_loss": mean_loss, "test": {"ensemble": q_ens, "ridge": q_ridge},
            "gap": {"norm": float(np.linalg.norm(gap)),
                    "cos_text_to_image_mean": {
                        "raw": float((T @ _unit(scorer.image_mean)).mean()),
                        "corrected": float((scorer.to_image_space(T, True, gap) @ _unit(scorer.image_mean)).mean())}},
            "diagnosis": load_ensemble(db).info.get("quality"), "slices": slices,
            "worst_groups_true_loss": [(k, round(v / mean_loss, 2)) for k, v in worst_groups(rows, loss)[:8]],
            "explain_top5": [(m.description, round(m.predicted_loss, 3), m.mean_loss and round(m.mean_loss / mean_loss, 2))
                             for m in modes["neighbourhood"][:5]],
            "seconds": round(time.perf_counter() - t0, 1)}


CORRECTIONS = ("neighbourhood", "projection", "shift", "no gap")


def explain_summary(results: list[dict]) -> list[str]:
    """Per way of crossing the gap: scored slices in explain's top 3 (headline, any phrase) and the
    sum of the any-phrase ranks (a slice not in the top 30 counts 31)."""
    out = ["| correction | slices in top 3: by headline / by any phrase | sum of ranks, any phrase |", "|---|---|---|"]
    for c in CORRECTIONS:
        ranks = [(s["explain rank"][f"explain ({c})"], s["explain rank"][f"explain any phrase ({c})"])
                 for r in results for s in r["slices"] if s["eligible"]]
        top3 = [sum(1 for x in col if x is not None and x <= 3) for col in zip(*ranks, strict=True)]
        total = sum(a if a is not None else 31 for _, a in ranks)
        out.append(f"| {c} | {top3[0]} / {top3[1]} of {len(ranks)} | {total} |")
    return out


def _unit(v):
    return v / np.linalg.norm(v)


def markdown(results: list[dict]) -> str:
    out = ["| world | slice (kind, loss ratio) | p@10 ensemble / ridge / sim-only (single-attribute queries) | explain rank "
           "by headline (by any phrase of the mode: phrase's place in its list) neighbourhood / projection / shift / no gap "
           "| word rank ensemble neighbourhood / projection / shift / raw; ridge neighbourhood |", "|---|---|---|---|---|"]
    for r in results:
        for s in r["slices"]:
            if not s["eligible"]:
                out.append(f"| {r['world']} | {s['slice']} (loss ratio {s['loss_ratio']}x: below 2x, not scored) | | | |")
                continue
            p, e = s["p@10"], s["explain rank"]
            b = s["p@10 broad"]
            out.append(
                f"| {r['world']} | {s['slice']} ({s['kind']}, {s['loss_ratio']}x) | {p['ensemble']:.1f} / "
                f"{p['ridge']:.1f} / {p['similarity only']:.1f} ({b['ensemble']:.2f} / {b['ridge']:.2f} / "
                f"{b['similarity only']:.2f}) | "
                + " / ".join(f"{e[f'explain ({c})'] or '-'} ({e[f'explain any phrase ({c})'] or '-'}: "
                             f"{e.get(f'phrase position ({c})') or '-'})" for c in CORRECTIONS) + " | "
                f"{e['words ensemble neighbourhood']} / {e['words ensemble projection']} / "
                f"{e['words ensemble shift']} / {e['words ensemble raw']}; {e['words ridge neighbourhood']} |")
    out += ["", "| world | rows (test) | test AUROC top-10% ensemble / ridge | test Spearman ensemble / ridge "
            "| gap norm | cos(text, mean image) raw -> corrected |", "|---|---|---|---|---|---|"]
    for r in results:
        te, tr = r["test"]["ensemble"], r["test"]["ridge"]
        g = r["gap"]
        out.append(f"| {r['world']} | {r['rows']} ({r['test_rows']}) | {te['auroc_top10']:.3f} / {tr['auroc_top10']:.3f} "
                   f"| {te['spearman']:.3f} / {tr['spearman']:.3f} | {g['norm']:.2f} | "
                   f"{g['cos_text_to_image_mean']['raw']:.2f} -> {g['cos_text_to_image_mean']['corrected']:.2f} |")
    out += ["", "| world | explain's top 5 (true mean loss / world mean) | worst attribute groups by true loss "
            "(x world mean) |", "|---|---|---|"]
    for r in results:
        top = "; ".join(f"{d} ({ratio}x)" for d, _, ratio in r["explain_top5"])
        worst = "; ".join(f"{k} ({v}x)" for k, v in r["worst_groups_true_loss"][:5])
        out.append(f"| {r['world']} | {top} | {worst} |")
    out += [""] + explain_summary(results)
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS),
                    help=f"comma list of: {', '.join(SPECS)}, or JSON spec paths (default: all three)")
    ap.add_argument("--work", default="/tmp/eval_diagnosis", help="folder for the indexed databases")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--small", action="store_true", help="build the named worlds at the demo's quick size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(2)
    work = Path(args.work)
    results = []
    for name in args.specs.split(","):
        spec = SPECS.get(name, name)
        if args.small and isinstance(spec, dict):
            spec = {**spec, **SMALL}
        r = evaluate(name, spec, work, not args.quiet)
        results.append(r)
        print(json.dumps(r, indent=1, default=float), file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
