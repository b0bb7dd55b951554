"""Building (or reusing) a world: rows -> images on disk -> tiny CLIP -> black-box losses -> manifest.

A world lives in ``<cache>/worlds/<spec hash>/`` and is built in a temporary sibling folder that is
renamed into place only when complete, so an interrupted build is never reused::

    manifest.parquet   an ordinary manifest (image, id, label, split, loss, attributes, slices, caption);
                       the unlabeled pool's rows have only id, image, split "pool" and nuisances
    pool_truth.parquet the pool's true labels, attributes, slice columns and black-box loss: for
                       evaluation only (never indexed)
    images/<split>/    PNG files
    vocab.txt          phrases from the attribute words (``llm2loss explain``'s default for this data)
    tiny-clip.json     the CLIP architecture; tiny-clip.pt its trained weights (with ``"clip":
                       {"shared": true}``, copies of a CLIP trained once in ``<cache>/clips/<hash>/``)
    blackbox.pt        the black-box CNN's weights
    world.json         the spec, the planted slices and the measured quality numbers
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from indexer.configs import TINY_CLIP
from indexer.errors import UserError
from indexer.schema import POOL_SPLIT
from indexer.world import blackbox, tiny_clip
from indexer.world.generate import finish_rows, plant_train, render_all, sample_rows
from indexer.world.spec import ATTRIBUTES, GENERATOR_VERSION, load_spec, slug, spec_hash
from indexer.world.vocab import describe, vocabulary_items, write_vocab

log = logging.getLogger(__name__)

WORLD_FILE = "world.json"
MANIFEST = "manifest.parquet"
POOL_TRUTH = "pool_truth.parquet"
#: Thresholds the issue asks of a world; a world below them is still built, with a warning.
MIN_ZERO_SHOT = 0.9
MIN_LOSS_RATIO = 2.0
#: The seed of every shared CLIP: its pools, initialisation and batches (part of its hash).
SHARED_CLIP_SEED = 0
#: Uniform images on which a shared CLIP's phrases are checked while it trains.
SHARED_PHRASE_IMAGES = 4000
CLIP_FILE = "clip.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$LLM2LOSS_CACHE``, else ``$XDG_CACHE_HOME/llm2loss``, else ``~/.cache/llm2loss``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LLM2LOSS_CACHE"):
        return Path(os.environ["LLM2LOSS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llm2loss"


@dataclass
class World:
    """A built world. Paths are absolute; ``quality`` holds the numbers measured at build time."""

    root: Path
    spec: dict
    hash: str
    slices: list[dict]
    quality: dict = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def vocab(self) -> Path:
        return self.root / "vocab.txt"

    @property
    def clip_config(self) -> Path:
        return self.root / "tiny-clip.json"

    @property
    def clip_checkpoint(self) -> Path:
        return self.root / "tiny-clip.pt"

    @classmethod
    def load(cls, root: str | os.PathLike) -> World:
        root = Path(root).resolve()
        info = json.loads((root / WORLD_FILE).read_text())
        return cls(root=root, spec=info["spec"], hash=info["hash"], slices=info["slices"], quality=info["quality"])

    def rows(self) -> pd.DataFrame:
        """The labelled rows (train and test) of the manifest, with their attributes and slices."""
        rows = pd.read_parquet(self.manifest)
        return rows[rows["split"] != POOL_SPLIT].reset_index(drop=True)

    def manifest_rows(self) -> int:
        """Rows of the manifest, the unlabeled pool included (what ``index`` stores)."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.manifest).metadata.num_rows

    def pool_truth(self) -> pd.DataFrame:
        """The unlabeled pool with what the manifest leaves out: the true ``label``, attributes,
        slice columns and the black box's ``loss`` against the true label (evaluation only)."""
        path = self.root / POOL_TRUTH
        return pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["id", "label", "loss"])

    def to_dict(self) -> dict:
        return {"root": str(self.root), "hash": self.hash, "spec": self.spec, "slices": self.slices,
                "quality": self.quality, "manifest": str(self.manifest)}

    def summary(self) -> str:
        """Human-readable quality report (several lines)."""
        q = self.quality
        c = q["clip"]
        zs, pz = c["zero_shot"], c.get("partial_zero_shot", {})
        lines = [
            f"world {self.hash}: {q['rows']} rows ({self.spec['n_train']} train, {self.spec['n_test']} test), "
            f"task '{self.spec['task']}', seed {self.spec['seed']}",
            "tiny CLIP zero-shot accuracy (held-out, full captions / one-attribute prompts): "
            + ", ".join(f"{a} {zs[a]:.3f}/{pz[a]:.3f}" if a in pz else f"{a} {zs[a]:.3f}" for a in ATTRIBUTES)
            + f"; text->image recall@10 {c['recall_at_10']:.3f}",
        ]
        if "training" in c:
            tr = c["training"]
            goal = f"zero-shot {tr['target']:.2f}"
            if tr.get("phrase_target") is not None:
                where = "uniform images" if "shared" in tr else "the world's images"
                goal += f" and phrase precision@100 {tr['phrase_target']:.2f} on {where}"
            why = (f"reached the targets: {goal}" if tr["stopped"] == "target"
                   else f"stopped at the cap, targets ({goal}) not reached")
            lines.append(f"tiny CLIP training: {tr['steps']} of at most {tr['cap']} steps ({why})")
            if "shared" in tr:
                sh = tr["shared"]
                lines.append(f"tiny CLIP shared with other worlds: {sh['folder']} (trained once on uniform images"
                             f"{', by this build' if sh['trained_by_this_build'] else ''}, {sh['train_seconds']:.0f} s;"
                             f" lowest phrase precision on uniform images {sh['uniform_phrase_precision_min']:.2f})")
        if "phrase_precision" in c:
            pp = c["phrase_precision"]
            worst = ", ".join(f"{p!r} {v:.2f}" for p, v in pp["worst"][:3])
            lines.append(f"phrase precision@{pp['k']} over {len(pp['per_phrase'])} vocabulary phrases: mean "
                         f"{pp['mean']:.3f}, min {pp['min']:.3f} (lowest: {worst})")
        lines.append(
            f"black-box CNN: accuracy train {q['blackbox']['accuracy']['train']:.3f} / "
            f"test {q['blackbox']['accuracy']['test']:.3f}, mean loss {q['blackbox']['mean_loss']['all']:.3f}")
        for s in self.slices:
            r = s["loss_ratio"]
            planted = {k: round(v, 4) for k, v in s["planted"].items() if k in ("rate", "strength", "noise")}
            verdict = "a failure" if is_failure(s) else f"NOT a failure (held-out ratio below {MIN_LOSS_RATIO:.0f}x)"
            lines.append(
                f"  slice '{s['name']}' ({s['kind']} {planted}, column {s['column']}): loss ratio "
                f"{r['all']:.2f}x (train {r['train']:.2f}x, test {r['test']:.2f}x), {s['rows']} rows: {verdict}"
            )
        return "\n".join(lines)


def is_failure(s: dict) -> bool:
    """Whether a planted slice became a failure: its held-out (test) rows have at least
    :data:`MIN_LOSS_RATIO` times the mean held-out loss."""
    return bool(s["loss_ratio"]["test"] >= MIN_LOSS_RATIO)


def build_world(spec: dict | str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                progress: bool = True) -> World:
    """Build the world of ``spec`` (default spec when None; a dict or a JSON path), or reuse its cache.

    Returns the :class:`World`. The build takes minutes for the default spec; a cached world loads
    in milliseconds.
    """
    spec = load_spec(spec)
    config_bytes = TINY_CLIP.read_bytes()
    h = spec_hash(spec, config_bytes)
    cache = cache_root(cache_dir)
    worlds = cache / "worlds"
    root = worlds / h
    if (root / WORLD_FILE).is_file():
        log.info("reusing world %s", root)
        return World.load(root)
    try:
        worlds.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the world cache {worlds} ({e.strerror}); set LLM2LOSS_CACHE to a writable folder.") from e
    _atomic(worlds, h, WORLD_FILE, lambda tmp: _build(tmp, spec, h, config_bytes, progress, cache))
    return World.load(root)


def _atomic(parent: Path, h: str, done_file: str, build) -> Path:
    """``build(tmp)`` into a temp folder of ``parent`` renamed to ``parent/h`` once complete (whose
    ``done_file`` says so); a concurrent builder that finished first wins, and nothing half-built stays."""
    _remove_abandoned(parent)
    tmp = parent / f".tmp-{h}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, parent / h)
        except OSError:  # another process finished the same build first; theirs is as good
            if not (parent / h / done_file).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return parent / h


def shared_clip_key(spec: dict, config_bytes: bytes) -> tuple[str, dict]:
    """(hash, what it hashes) of the CLIP a ``"clip": {"shared": true}`` spec uses: its CLIP settings,
    image size, the generator version, :data:`SHARED_CLIP_SEED` and the architecture (``config_bytes``).
    Nothing of the world's own (seed, task, slices, sizes) is in it."""
    key = {"clip": {k: v for k, v in spec["clip"].items() if k != "shared"}, "image_size": spec["image_size"],
           "v": GENERATOR_VERSION, "seed": SHARED_CLIP_SEED, "phrase_images": SHARED_PHRASE_IMAGES}
    payload = json.dumps(key, sort_keys=True).encode() + config_bytes
    return hashlib.sha256(payload).hexdigest()[:16], key


def shared_clip(spec: dict, config_bytes: bytes, cache: Path, progress: bool = False) -> tuple[Path, bool]:
    """The folder of the shared CLIP ``spec`` uses, ``<cache>/clips/<hash>/`` (tiny-clip.json,
    tiny-clip.pt, clip.json), trained now if absent. Returns (folder, whether this call trained it).

    Trained like a world's CLIP (:func:`~indexer.world.tiny_clip.train_clip`) from a uniform pool of
    ``clip.n_images`` captioned images, but its stopping rule's phrase check runs on
    :data:`SHARED_PHRASE_IMAGES` other uniform images, for every phrase of one to three attributes
    (any slice a world can plant is described by one of them). Built in a temp folder renamed into
    place, like a world: concurrent builders each train, the first to finish is kept.
    """
    h, key = shared_clip_key(spec, config_bytes)
    clips = cache / "clips"
    if (clips / h / CLIP_FILE).is_file():
        return clips / h, False
    try:
        clips.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the CLIP cache {clips} ({e.strerror}); set LLM2LOSS_CACHE to a writable folder.") from e

    def train(out: Path) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        (out / "tiny-clip.json").write_bytes(config_bytes)
        cfg, size, seed = key["clip"], key["image_size"], SHARED_CLIP_SEED
        uniform = {"task": "shape", "slices": []}  # captions and attributes only; no label is used
        pool = finish_rows(sample_rows(cfg["n_images"], seed, "clip"), uniform, "clip")
        watch = finish_rows(sample_rows(cfg["n_eval"], seed, "clip_eval"), uniform, "clip_eval")
        check = finish_rows(sample_rows(SHARED_PHRASE_IMAGES, seed, "clip_phrases"), uniform, "clip_phrases")
        log.info("shared CLIP %s: training (at most %d steps of %d captions, until zero-shot >= %.2f and every "
                 "phrase of up to three attributes has precision >= %.2f on %d uniform images)", h, cfg["steps"],
                 cfg["batch_size"], cfg["target"], cfg["phrase_target"], len(check))
        _, preprocess, tokenizer = tiny_clip.create(out / "tiny-clip.json")
        px = {n: tiny_clip.preprocess_images(render_all(r, size), preprocess)
              for n, r in (("pool", pool), ("watch", watch), ("check", check))}
        phrases = vocabulary_items(3)
        model, training = tiny_clip.train_clip(out / "tiny-clip.json", px["pool"], pool, cfg, seed,
                                               (px["watch"], watch), progress,
                                               phrase_check=(px["check"], check, phrases))
        torch.save(model.state_dict(), out / "tiny-clip.pt")
        pp = tiny_clip.phrase_precision(tiny_clip.encode(model, pixels=px["check"]), check, phrases,
                                        tiny_clip.encode(model, texts=[p for p, _ in phrases], tokenizer=tokenizer))
        info = {"hash": h, "key": key, "training": training, "uniform_phrase_precision": pp,
                "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
        (out / CLIP_FILE).write_text(json.dumps(info, indent=2))

    return _atomic(clips, h, CLIP_FILE, train), True


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links
        shutil.copy2(src, dst)


def _remove_abandoned(worlds: Path) -> None:
    """Delete temp folders of builds whose process is gone (killed mid-build)."""
    for d in worlds.glob(".tmp-*"):
        try:
            pid = int(d.name.split("-")[2])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _build(out: Path, spec: dict, h: str, config_bytes: bytes, progress: bool, cache: Path) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    timings, cpu = {}, {}
    seed, task = spec["seed"], spec["task"]
    train, planted = plant_train(sample_rows(spec["n_train"], seed, "train"), spec, seed)
    rows = pd.concat([finish_rows(train, spec, "train"), finish_rows(sample_rows(spec["n_test"], seed, "test"),
                                                                      spec, "test")], ignore_index=True)
    size = spec["image_size"]
    log.info("world %s: rendering %d images of %d px", h, len(rows), size)
    images = render_all(rows, size)
    rows["id"] = [f"{s}-{i:06d}" for s, i in zip(rows["split"], rows.groupby("split").cumcount(), strict=True)]
    rows["image"] = [f"images/{s}/{i}.png" for s, i in zip(rows["split"], rows["id"], strict=True)]
    _write_images(out, rows["image"].tolist(), images, progress)
    # The unlabeled pool is drawn like the test split; it stays out of the CLIP's training and
    # checks (those see the labelled world only, as before the pool existed).
    unl = finish_rows(sample_rows(spec["n_pool"], seed, POOL_SPLIT), spec, POOL_SPLIT)
    unl["id"] = [f"{POOL_SPLIT}-{i:06d}" for i in range(len(unl))]
    unl["image"] = [f"images/{POOL_SPLIT}/{i}.png" for i in unl["id"]]
    unl_images = render_all(unl, size)
    _write_images(out, unl["image"].tolist(), unl_images, progress)
    timings["generate"], cpu["generate"] = time.perf_counter() - t0, time.process_time() - c0

    # Shared or its own, the CLIP is measured on the test split's images (zero-shot, recall@10) and on
    # every image of the world (phrase precision@100).
    t, c = time.perf_counter(), time.process_time()
    cfg = spec["clip"]
    phrases = _phrases(spec)
    if cfg.get("shared"):
        src, trained = shared_clip(spec, config_bytes, cache, progress)
        for f in ("tiny-clip.json", "tiny-clip.pt"):
            _link_or_copy(src / f, out / f)
        model, preprocess, tokenizer = tiny_clip.create(out / "tiny-clip.json")
        model.load_state_dict(torch.load(out / "tiny-clip.pt", map_location="cpu", weights_only=True))
        model.eval()
        info = json.loads((src / CLIP_FILE).read_text())
        training = {**info["training"], "shared": {"hash": info["hash"], "folder": str(src),
                                                   "trained_by_this_build": trained,
                                                   "train_seconds": info["seconds"],
                                                   "uniform_phrase_precision_min": info["uniform_phrase_precision"]["min"]}}
        world_px = tiny_clip.preprocess_images(images, preprocess)
    else:
        # The tiny CLIP learns from its own uniform pool (like a web-trained CLIP, it has not seen the
        # biased training split); its stopping rule watches another uniform pool.
        (out / "tiny-clip.json").write_bytes(config_bytes)
        log.info("world %s: training the tiny CLIP (at most %d steps of %d captions, until zero-shot >= %.2f "
                 "and phrase precision >= %.2f)", h, cfg["steps"], cfg["batch_size"], cfg["target"],
                 cfg["phrase_target"])
        pool = finish_rows(sample_rows(cfg["n_images"], seed, "clip"), spec, "clip")
        watch = finish_rows(sample_rows(cfg["n_eval"], seed, "clip_eval"), spec, "clip_eval")
        _, preprocess, tokenizer = tiny_clip.create(out / "tiny-clip.json")
        pool_px = tiny_clip.preprocess_images(render_all(pool, size), preprocess)
        watch_px = tiny_clip.preprocess_images(render_all(watch, size), preprocess)
        world_px = tiny_clip.preprocess_images(images, preprocess)
        # The phrases are checked on the world's own images: the goal is how they retrieve here, where
        # planted slices make some pairs rare (a uniform pool said 0.95 where the world had 0.79).
        model, training = tiny_clip.train_clip(out / "tiny-clip.json", pool_px, pool, cfg, seed, (watch_px, watch),
                                               progress, phrase_check=(world_px, rows, phrases))
        del pool_px, watch_px
        torch.save(model.state_dict(), out / "tiny-clip.pt")
    img = tiny_clip.encode(model, pixels=world_px)
    del world_px
    test = (rows["split"] == "test").to_numpy()
    clip_q = tiny_clip.evaluate_clip(model, tokenizer, img[test], rows[test].reset_index(drop=True))
    clip_q["phrase_precision"] = tiny_clip.phrase_precision(
        img, rows, phrases, tiny_clip.encode(model, texts=[p for p, _ in phrases], tokenizer=tokenizer))
    clip_q["training"] = training
    del img
    timings["clip"], cpu["clip"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    labels = list(ATTRIBUTES[task])
    y = np.asarray([labels.index(v) for v in rows["label"]])
    is_train = (rows["split"] == "train").to_numpy()
    bb = spec["blackbox"]
    log.info("world %s: training the black-box CNN for '%s' (%d epochs)", h, task, bb["epochs"])
    cnn = blackbox.train_blackbox(images[is_train], y[is_train], len(labels), bb["epochs"], bb["batch_size"],
                                  bb["lr"], seed, bb["width"], progress)
    torch.save(cnn.state_dict(), out / "blackbox.pt")
    loss, pred = blackbox.per_sample_loss(cnn, images, y)
    rows["loss"] = loss
    rows["prediction"] = np.asarray(labels)[pred]
    unl_pred = np.zeros(0, dtype=np.int64)
    unl["loss"] = np.zeros(len(unl), dtype=np.float32)
    if len(unl):
        unl["loss"], unl_pred = blackbox.per_sample_loss(
            cnn, unl_images, np.asarray([labels.index(v) for v in unl["label"]], dtype=np.int64))
    unl["prediction"] = np.asarray(labels)[unl_pred]
    timings["blackbox"], cpu["blackbox"] = time.perf_counter() - t, time.process_time() - c

    slices, bb_q = _measure(rows, spec, planted, y, pred)
    cols = ["id", "image", "label", "split", "loss", *ATTRIBUTES, *[s["column"] for s in slices],
            "caption", "prediction", "label_corrupted", "x", "y", "rotation"]
    # The pool's manifest rows say only what an unlabeled image has: its file (and where the object
    # sits, a nuisance); everything the model or an evaluation could learn the truth from is kept aside.
    unlabeled = unl[["id", "image", "split", "x", "y", "rotation"]]
    pd.concat([rows[cols], unlabeled], ignore_index=True).to_parquet(out / MANIFEST, index=False)
    unl[["id", "label", "loss", "prediction", *ATTRIBUTES, *[s["column"] for s in slices]]].to_parquet(
        out / POOL_TRUTH, index=False)
    write_vocab(out / "vocab.txt", [s["description"] for s in slices])
    timings["total"], cpu["total"] = time.perf_counter() - t0, time.process_time() - c0
    quality = {"rows": len(rows), "pool_rows": len(unl), "clip": clip_q, "blackbox": bb_q,
               "seconds": {k: round(v, 1) for k, v in timings.items()},
               "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()}}  # summed over threads: less swayed by other jobs than wall time
    _warn_quality(clip_q, slices)
    info = {"hash": h, "spec": spec, "slices": slices, "quality": quality}
    (out / WORLD_FILE).write_text(json.dumps(info, indent=2))


def _phrases(spec: dict) -> list[tuple[str, dict]]:
    """The world's vocabulary as (phrase, attributes) pairs: singles, pairs and the slices' own."""
    items = vocabulary_items()
    known = {p for p, _ in items}
    for s in spec["slices"]:
        if describe(s["where"]) not in known:
            items.append((describe(s["where"]), s["where"]))
            known.add(describe(s["where"]))
    return items


def _write_images(out: Path, paths: list[str], images: np.ndarray, progress: bool) -> None:
    for split in {p.split("/")[1] for p in paths}:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for p, im in zip(tqdm(paths, desc="images", disable=not progress, leave=False), images, strict=True):
        Image.fromarray(im).save(out / p, compress_level=1)


def _measure(rows: pd.DataFrame, spec: dict, planted: list[dict], y: np.ndarray, pred: np.ndarray):
    """Per-slice loss ratios (slice mean loss / world mean, overall and per split) and CNN quality."""
    loss = rows["loss"].to_numpy()
    split = rows["split"].to_numpy()
    masks = {"all": np.ones(len(rows), bool), "train": split == "train", "test": split == "test"}
    bb = {"mean_loss": {k: float(loss[m].mean()) for k, m in masks.items()},
          "accuracy": {k: float((pred[m] == y[m]).mean()) for k, m in masks.items()}}
    slices = []
    for s, p in zip(spec["slices"], planted, strict=True):
        col = slug(s["name"])
        member = rows[col].to_numpy()
        ratio = {k: float(loss[m & member].mean() / loss[m].mean()) if (m & member).any() else float("nan")
                 for k, m in masks.items()}
        slices.append({
            "name": s["name"], "kind": s["kind"], "where": s["where"], "column": col, "columns": list(s["where"]),
            "description": describe(s["where"]), "rows": int(member.sum()),
            "rows_by_split": {k: int((m & member).sum()) for k, m in masks.items() if k != "all"},
            "planted": p, "spec": s, "loss_ratio": ratio,
            "mean_loss": float(loss[member].mean()) if member.any() else float("nan"),
            "failure": bool(ratio["test"] >= MIN_LOSS_RATIO),
        })
    return slices, bb


def _warn_quality(clip_q: dict, slices: list[dict]) -> None:
    for a in ATTRIBUTES:
        if clip_q["zero_shot"][a] < MIN_ZERO_SHOT:
            log.warning("tiny CLIP zero-shot accuracy on %s is %.3f (< %.1f); raise the cap (spec clip.steps).",
                        a, clip_q["zero_shot"][a], MIN_ZERO_SHOT)
    for s in slices:
        if not is_failure(s):
            log.warning("slice '%s' has held-out loss ratio %.2f (< %.1f): the model does not fail on it.",
                        s["name"], s["loss_ratio"]["test"], MIN_LOSS_RATIO)
