"""Per-sample losses: from a ``loss`` column, a predictions file, or a model run over the images.

Tasks and their losses (natural log, per sample, float64):

* ``classification``: cross-entropy ``-log p(label)``. Scores are *probabilities* when every value
  lies in [0, 1] and every row sums to 1 (within 1e-3), otherwise *logits* (softmax applied).
* ``multilabel``: binary cross-entropy averaged over the classes. A label lists its positive
  classes separated by ``|`` (``"cat|dog"``); an empty label means no positive class. Scores are
  probabilities when every value lies in [0, 1], otherwise logits (sigmoid applied).
* ``regression``: squared error ``(prediction - label)**2``; one prediction per sample, labels
  numeric.

``task="auto"`` picks ``multilabel`` when a label contains ``|``, ``regression`` when there is a
single score column (predictions file) or output (model) and every label is a number, otherwise
``classification``.

Labels name classes: a predictions file's class columns are its non-``id`` columns, in order; a
model's classes are its ``classes`` attribute when it has one, else integer labels index the
outputs, else the sorted distinct labels do (the ``ImageFolder`` convention). A label that is not
a class is an *unknown label*, a per-row problem; labels that cannot fit the classes at all (more
distinct integer labels than classes, or no label naming any class) are a whole-run error.

Per-row problems are returned as ``rejects``: ``{row: (reason, detail)}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from indexer import schema as S
from indexer.errors import UserError
from indexer.manifest import CSV_SUFFIXES, PARQUET_SUFFIXES, Manifest, short_error

log = logging.getLogger(__name__)

TASKS = ("auto", "classification", "multilabel", "regression")
_EPS = 1e-12

Rejects = dict[int, tuple[str, str]]


@dataclass
class RowLosses:
    """``values`` (n,) float64 aligned with the manifest's rows (NaN where rejected) + why rejected."""

    values: np.ndarray
    rejects: Rejects = field(default_factory=dict)
    task: str = "given"


# ---- validating numbers -----------------------------------------------------------------------
def check_losses(values: np.ndarray, rows: np.ndarray | None = None) -> Rejects:
    """Rows whose loss is NaN, infinite or negative, with the reason (``rows`` maps positions)."""
    values = np.asarray(values, dtype=np.float64)
    rows = np.arange(len(values)) if rows is None else np.asarray(rows)
    out: Rejects = {}
    for i in np.flatnonzero(~np.isfinite(values) | (values < 0)):
        v = values[i]
        if np.isnan(v):
            out[int(rows[i])] = ("loss is NaN", "the loss is NaN")
        elif np.isinf(v):
            out[int(rows[i])] = ("loss is infinite", f"the loss is {v}")
        else:
            out[int(rows[i])] = ("loss is negative", f"the loss {v:g} is negative")
    return out


def losses_from_column(manifest: Manifest) -> RowLosses:
    """The manifest's own ``loss`` column, validated row by row."""
    col = manifest.table.column(S.LOSS)
    values = np.array(col.to_numpy(zero_copy_only=False), dtype=np.float64)  # a writable copy
    rejects: Rejects = {r: ("loss is not a number", why) for r, why in manifest.loss_problems.items()}
    for r in np.flatnonzero(np.asarray(col.is_null().to_numpy(zero_copy_only=False))):
        rejects.setdefault(int(r), ("loss is missing", "the `loss` cell is empty (or NaN/NA in a CSV)"))
    for r, why in check_losses(values).items():
        rejects.setdefault(r, why)
    values[list(rejects)] = np.nan
    return RowLosses(values, rejects, "given")


# ---- the loss functions -----------------------------------------------------------------------
def is_probability(scores: np.ndarray, task: str) -> bool:
    """Whether (n, K) ``scores`` are probabilities (see module doc) rather than logits."""
    s = scores[np.isfinite(scores).all(axis=1)] if scores.ndim == 2 else scores
    if s.size == 0 or s.min() < 0 or s.max() > 1:
        return False
    return task == "multilabel" or bool(np.allclose(s.sum(axis=1), 1.0, atol=1e-3))


def cross_entropy(scores: np.ndarray, targets: np.ndarray, probabilities: bool) -> np.ndarray:
    """(n, K) scores, (n,) int64 class indices -> (n,) float64 ``-log p(target)``."""
    scores = np.asarray(scores, dtype=np.float64)
    picked = scores[np.arange(len(targets)), targets]
    if probabilities:
        return -np.log(np.clip(picked, _EPS, 1.0))
    m = scores.max(axis=1)
    lse = m + np.log(np.exp(scores - m[:, None]).sum(axis=1))
    return lse - picked


def binary_cross_entropy(scores: np.ndarray, targets: np.ndarray, probabilities: bool) -> np.ndarray:
    """(n, K) scores, (n, K) 0/1 targets -> (n,) float64 BCE averaged over the K classes."""
    scores = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if probabilities:
        p = np.clip(scores, _EPS, 1 - _EPS)
        return -(t * np.log(p) + (1 - t) * np.log1p(-p)).mean(axis=1)
    # log(1 + exp(-|z|)) form: exact for large |z| where sigmoid would round to 0 or 1.
    return (np.maximum(scores, 0) - scores * t + np.log1p(np.exp(-np.abs(scores)))).mean(axis=1)


def squared_error(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(n,) predictions, (n,) targets -> (n,) float64 squared error."""
    return (np.asarray(pred, dtype=np.float64).reshape(-1) - np.asarray(target, dtype=np.float64)) ** 2


# ---- labels -> targets ------------------------------------------------------------------------
def _int_like(s: str) -> bool:
    try:
        return float(s) == int(float(s))
    except (ValueError, OverflowError):
        return False


def _number(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None


def resolve_task(task: str, labels: list, n_scores: int | None) -> str:
    if task not in TASKS:
        raise UserError(f"--task {task} is not one of {', '.join(TASKS)}; pick one of them.")
    if task != "auto":
        return task
    present = [lab for lab in labels if lab is not None]
    if any("|" in lab for lab in present):
        return "multilabel"
    if n_scores == 1 and present and all(_number(lab) is not None for lab in present):
        return "regression"
    return "classification"


class ClassMap:
    """Maps label strings to class indices (see the module doc for the rules).

    ``index[label]`` is the class index; ``required`` the number of classes the labels need.
    """

    def __init__(self, labels: list, classes: list[str] | None, source: str):
        present = sorted({lab for lab in labels if lab is not None})
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None and any(lab in self.classes for lab in present):
            self.index = {c: i for i, c in enumerate(self.classes)}
            self.required = len(self.classes)
        elif present and all(_int_like(lab) for lab in present):
            self.index = {lab: int(float(lab)) for lab in present}
            self.required = len(present)
        elif self.classes is None:
            self.index = {lab: i for i, lab in enumerate(present)}
            self.required = len(present)
        else:
            raise UserError(
                f"no label of the manifest (e.g. {present[0]!r}) names one of the {len(self.classes)} classes "
                f"of {source} ({', '.join(map(str, self.classes[:5]))}{', ...' if len(self.classes) > 5 else ''}); "
                "make the labels the class names or their 0-based indices."
            )

    def check_count(self, n_classes: int, source: str) -> None:
        if self.required > n_classes:
            raise UserError(
                f"{source} gives {n_classes} classes but the manifest's labels need {self.required}; "
                "give one score per class, in the order of the labels' indices."
            )

    def targets(self, labels: list, rows: np.ndarray, n_classes: int, task: str) -> tuple[np.ndarray, Rejects]:
        """(b,) int64 indices (classification) or (b, K) 0/1 (multilabel), and the unknown labels."""
        rejects: Rejects = {}
        if task == "multilabel":
            t = np.zeros((len(labels), n_classes), dtype=np.float64)
            for i, lab in enumerate(labels):
                for part in (p.strip() for p in (lab or "").split("|")):
                    j = self.index.get(part) if part else None
                    if part and (j is None or not 0 <= j < n_classes):
                        rejects[int(rows[i])] = ("unknown label", f"label part {part!r} is not a class")
                    elif j is not None:
                        t[i, j] = 1.0
            return t, rejects
        t = np.zeros(len(labels), dtype=np.int64)
        for i, lab in enumerate(labels):
            j = self.index.get(lab) if lab is not None else None
            if lab is None:
                rejects[int(rows[i])] = ("label is missing", "the row has no label to compute a loss against")
            elif j is None or not 0 <= j < n_classes:
                rejects[int(rows[i])] = ("unknown label", f"label {lab!r} is not one of the {n_classes} classes")
            else:
                t[i] = j
        return t, rejects


def check_scores(scores: np.ndarray, task: str, source: str, ids=None, rows=None, columns=None) -> None:
    """Refuse scores no loss can honestly be computed from: one column for a classification (the
    softmax over one class is 1, every loss 0) or a NaN / infinite value (an infinite probability
    would clip to a loss of 0). ``ids`` name the rows in the message (else ``rows``, 0-based)."""
    if task == "classification" and scores.shape[1] < 2:
        raise UserError(
            f"{source} gives one score per sample, but a classification needs one per class (a softmax over "
            "one class is always 1, so every loss would be 0); give one column per class (two for a binary "
            "task), or pass --task multilabel for one sigmoid score or --task regression for numeric labels."
        )
    finite = np.isfinite(scores)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        i = int(bad[0])
        j = int(np.flatnonzero(~finite[i])[0])
        where = f"id {ids[i]!r}" if ids is not None else f"manifest row {int(rows[i]) + 1 if rows is not None else i + 1}"
        raise UserError(
            f"{source} gives the score {scores[i, j]} (column {columns[j] if columns else j + 1!r}) for {where}"
            + (f" and non-finite scores for {len(bad) - 1} more rows" if len(bad) > 1 else "")
            + "; every score must be a finite number (a probability or a logit)."
        )


def losses_from_scores(scores: np.ndarray, labels: list, rows: np.ndarray, task: str, cmap: ClassMap | None,
                       probabilities: bool | None = None) -> tuple[np.ndarray, Rejects]:
    """Losses (b,) float64 for (b, K) ``scores`` against label strings; NaN where rejected."""
    rejects: Rejects = {}
    if task == "regression":
        pred = scores.reshape(len(labels), -1)
        if pred.shape[1] != 1:
            raise UserError(f"regression needs one prediction per sample, got {pred.shape[1]}; pass --task classification or give a single column.")
        y = np.array([np.nan if _number(lab) is None else _number(lab) for lab in labels])
        for i, lab in enumerate(labels):
            if _number(lab) is None:
                rejects[int(rows[i])] = ("unknown label", f"label {lab!r} is not a number (regression)")
        values = squared_error(pred[:, 0], y)
    else:
        assert cmap is not None
        k = scores.shape[1]
        targets, rejects = cmap.targets(labels, rows, k, task)
        probs = is_probability(scores, task) if probabilities is None else probabilities
        if task == "multilabel":
            values = binary_cross_entropy(scores, targets, probs)
        else:
            values = cross_entropy(scores, targets, probs)
    pos = {int(r): i for i, r in enumerate(rows)}
    for r, why in check_losses(values, rows).items():
        rejects.setdefault(r, why)
    values[[pos[r] for r in rejects]] = np.nan
    return values, rejects


# ---- predictions file -------------------------------------------------------------------------
def read_predictions(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """A predictions file -> (ids, class names, (n, K) float64 scores); whole-file problems refused."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"the predictions file {p} does not exist; pass a CSV/Parquet file with `id` and one column per class.")
    name = p.name.lower()
    try:
        if name.endswith(CSV_SUFFIXES):
            import pyarrow.csv as pcsv

            t = pcsv.read_csv(p, convert_options=pcsv.ConvertOptions(column_types={S.ID: pa.string()}))
        elif name.endswith(PARQUET_SUFFIXES):
            import pyarrow.parquet as pq

            t = pq.read_table(p)
        else:
            raise UserError(f"the predictions file {p} is neither CSV nor Parquet (by its extension); give a .csv or .parquet file.")
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise UserError(f"the predictions file {p} could not be read ({short_error(e)}); fix or rewrite it.") from e
    if S.ID not in t.column_names:
        raise UserError(f"the predictions file {p} has no `id` column; add one with the manifest's ids.")
    classes = [c for c in t.column_names if c != S.ID]
    if not classes:
        raise UserError(f"the predictions file {p} has no score columns; add one column per class.")
    for c in classes:
        typ = t.schema.field(c).type
        if not (pa.types.is_floating(typ) or pa.types.is_integer(typ)):
            raise UserError(f"column {c!r} of the predictions file {p} is not numeric ({typ}); give one number per class.")
    ids = [str(i) if i is not None else None for i in t.column(S.ID).to_pylist()]
    seen: set[str] = set()
    for row, i in enumerate(ids):
        if i is None or i in seen:
            raise UserError(f"row {row + 1} of the predictions file {p} has {'no' if i is None else 'a repeated'} id "
                            f"{i!r}; give each manifest id exactly one row.")
        seen.add(i)
    scores = np.column_stack([t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in classes])
    return ids, classes, scores


def losses_from_predictions(manifest: Manifest, path: str | Path, task: str = "auto") -> RowLosses:
    """Losses for every manifest row from a predictions file (see the module doc)."""
    ids, classes, scores = read_predictions(path)
    pos = {i: r for r, i in enumerate(ids)}
    mids = manifest.column(S.ID)
    missing = [i for i in mids if i not in pos]
    if missing:
        raise UserError(
            f"{len(missing)} manifest ids (first: {missing[0]!r}) have no row in the predictions file {path}; "
            "give a prediction for every manifest id (ids must match the manifest's `id`, or its image path)."
        )
    if len(ids) > len(mids):
        log.warning("%s: %d prediction rows match no manifest id and are ignored", path, len(ids) - len(mids))
    aligned = scores[[pos[i] for i in mids]]
    labels = manifest.column(S.LABEL)
    if all(lab is None for lab in labels):
        raise UserError(f"the manifest {manifest.path} has no `label` column; losses from --predictions need each sample's label.")
    task = resolve_task(task, labels, len(classes))
    check_scores(aligned, task, f"the predictions file {path}", ids=mids, columns=classes)
    cmap = None if task == "regression" else ClassMap(labels, classes, f"the predictions file {path}")
    if cmap is not None:
        cmap.check_count(len(classes), f"the predictions file {path}")
    rows = np.arange(len(mids))
    values, rejects = losses_from_scores(aligned, labels, rows, task, cmap)
    return RowLosses(values, rejects, task)


# ---- a model run over the images --------------------------------------------------------------
def load_entry_point(entry: str):
    """``module:function`` or ``path/to/file.py:function`` -> the function (not yet called)."""
    import importlib
    import importlib.util
    import sys

    module_name, sep, fn_name = entry.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"--model {entry!r} is not MODULE:FUNCTION; write it like `mypkg.models:load`.")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser().resolve()
            if not file.is_file():
                raise UserError(f"--model file {file} does not exist; pass an existing .py file or an importable module.")
            spec = importlib.util.spec_from_file_location(f"llm2loss_model_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            # A console script does not put the working directory on sys.path; users expect it there.
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--model {entry}: importing {module_name} failed ({short_error(e)}); "
                        "make it importable from this folder or PYTHONPATH.") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"--model {entry}: {module_name} has no function {fn_name!r}; name a function that returns a torch model.")
    return fn


class ModelLoss:
    """A user's torch model computing per-sample losses on batches of its own preprocessed images.

    The entry point is called with no arguments and returns a ``torch.nn.Module`` (or any callable
    taking a float batch), or ``(model, preprocess)`` where ``preprocess`` maps a PIL RGB image to a
    tensor. Without a preprocess, images become ``ToTensor()`` tensors (C, H, W) in [0, 1] at their
    stored size. The model's outputs are (b, K) scores (or (b,) / (b, 1) for regression); whether
    they are probabilities or logits is decided on the first batch and kept for the run.
    """

    def __init__(self, entry: str, labels: list, task: str = "auto", device: str = "cpu"):
        import torch

        self.entry, self.labels, self.device = entry, labels, device
        loader = load_entry_point(entry)
        try:
            out = loader()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"--model {entry}: calling {entry.rpartition(':')[2]}() raised {short_error(e)}; "
                            "fix the function so that it returns a torch model.") from e
        model, preprocess = (out if isinstance(out, tuple) else (out, None))[:2]
        if not callable(model):
            raise UserError(f"--model {entry} returned {type(model).__name__}, not a torch model; return a torch.nn.Module.")
        if isinstance(model, torch.nn.Module):
            model = model.to(device).eval()
        self.model = model
        self.preprocess = preprocess or _to_tensor
        if all(lab is None for lab in labels):
            raise UserError("the manifest has no `label` column; losses from --model need each sample's label.")
        self.task_arg = task
        self.task: str | None = None
        self.cmap: ClassMap | None = None
        self.probabilities: bool | None = None
        self._classes = getattr(model, "classes", None)

    def upfront_rejects(self) -> Rejects:
        """Rows whose label cannot be scored whatever the model outputs (missing, or not a class)."""
        if self._classes is None or self.task_arg == "regression":
            return {}
        cmap = ClassMap(self.labels, list(self._classes), f"--model {self.entry}")
        _, rejects = cmap.targets(self.labels, np.arange(len(self.labels)), len(self._classes),
                                  "multilabel" if resolve_task(self.task_arg, self.labels, None) == "multilabel"
                                  else "classification")
        return rejects

    def __call__(self, inputs, rows: np.ndarray) -> tuple[np.ndarray, Rejects]:
        """(b, ...) preprocessed batch for manifest ``rows`` -> (b,) float64 losses and rejects."""
        import torch

        first = f"manifest row{'s' if len(rows) > 1 else ''} {int(rows[0]) + 1}" + (
            f" to {int(rows[-1]) + 1}" if len(rows) > 1 else "")
        try:
            with torch.inference_mode():
                scores = self.model(inputs.to(self.device))
        except Exception as e:  # the user's code: any error, reported with the rows it was given
            raise UserError(f"--model {self.entry} failed on the images of {first} ({short_error(e)}); "
                            "fix the model's forward or its preprocessing.") from e
        if isinstance(scores, tuple | list) and scores:
            scores = scores[0]
        if isinstance(scores, np.ndarray) and np.issubdtype(scores.dtype, np.number):
            scores = torch.from_numpy(scores)
        if not isinstance(scores, torch.Tensor) or scores.is_complex() or scores.numel() == 0:
            what = type(scores).__name__ if not isinstance(scores, torch.Tensor) else f"a {scores.dtype} tensor"
            raise UserError(f"--model {self.entry} returned {what} for the images of {first}, not scores; "
                            "make its forward return a (batch, classes) float tensor.")
        if scores.ndim == 0 or scores.shape[0] != len(rows):
            raise UserError(f"--model {self.entry} returned scores of shape {tuple(scores.shape)} for a batch of "
                            f"{len(rows)} images ({first}); return one row of scores per image, (batch, classes).")
        scores = scores.detach().float().cpu().numpy().astype(np.float64)
        scores = scores.reshape(len(rows), -1)
        labels = [self.labels[int(r)] for r in rows]
        source = f"--model {self.entry}"
        if self.task is None:  # first batch: fix the task, the class map and the score kind
            self.task = resolve_task(self.task_arg, self.labels, scores.shape[1])
            if self._classes is not None and self.task != "regression" and len(self._classes) != scores.shape[1]:
                raise UserError(f"{source} lists {len(self._classes)} `classes` but outputs {scores.shape[1]} "
                                "scores per image; make `classes` name one class per output, in order.")
            check_scores(scores, self.task, source, rows=rows)
            if self.task != "regression":
                self.cmap = ClassMap(self.labels, list(self._classes) if self._classes is not None else None, source)
                self.cmap.check_count(scores.shape[1], source)
                self.probabilities = is_probability(scores, self.task)
        else:
            check_scores(scores, self.task, source, rows=rows)
        return losses_from_scores(scores, labels, rows, self.task, self.cmap, self.probabilities)


def _to_tensor(img):
    from torchvision.transforms.functional import to_tensor

    return to_tensor(img)
