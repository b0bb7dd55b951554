"""Loading an open_clip model and turning images and text into L2-normalised embeddings.

A model is named the way open_clip names it (``ViT-B-32`` + ``laion2b_s34b_b79k``), or by the path
of a JSON architecture config (the offline world's tiny CLIP uses this), with weights from a
pretrained tag, a local checkpoint, or none at all (random weights, for plumbing tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from indexer.clip_text import compile_tower, encode_tokens, truncated_tower
from indexer.errors import UserError

log = logging.getLogger(__name__)

#: The default model for real data (the README's non-demo examples use it).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``cuda`` when torch sees a GPU, else ``cpu``; refuses an absent GPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but torch sees no CUDA GPU; use --device cpu.")
    return device


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load: ``model`` is an open_clip name or a JSON config path.

    ``pretrained`` is an open_clip pretrained tag, ``checkpoint`` a local weights file; at most one
    of them. Neither means random weights.
    """

    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        if self.pretrained and self.checkpoint:
            raise UserError("give either --pretrained or --clip-checkpoint, not both.")
        if self.pretrained and self.pretrained.lower() == "none":
            object.__setattr__(self, "pretrained", None)

    @property
    def config_path(self) -> Path | None:
        return Path(self.model) if self.model.endswith(".json") else None

    @property
    def name(self) -> str:
        """The open_clip model name (a config file's stem for a custom architecture)."""
        return self.config_path.stem if self.config_path else self.model

    def identity(self) -> dict:
        """What is recorded in the database: equal identities give identical embeddings."""
        ident = {"model": self.name, "pretrained": self.pretrained, "checkpoint": None, "config": None}
        if self.config_path:
            if not self.config_path.is_file():
                raise UserError(f"CLIP config {self.config_path} does not exist; pass an existing JSON file.")
            ident["config"] = hashlib.sha256(self.config_path.read_bytes()).hexdigest()[:16]
        if self.checkpoint:
            ckpt = Path(self.checkpoint)
            if not ckpt.is_file():
                raise UserError(f"--clip-checkpoint {ckpt} does not exist; pass a local weights file.")
            ident["checkpoint"] = _sha256(ckpt)[:16]
        return ident

    @classmethod
    def from_identity(cls, ident: dict, checkpoint: str | None = None, config: str | None = None) -> ClipSpec:
        return cls(model=config or ident["model"], pretrained=ident.get("pretrained"), checkpoint=checkpoint)

    def to_dict(self) -> dict:
        return asdict(self)


class ClipModel:
    """A loaded open_clip model in eval mode.

    ``encode_images`` takes a preprocessed batch, ``encode_text`` a list of strings; both return
    (n, d) float32 numpy arrays, L2-normalised. On CUDA the forward pass runs under autocast.
    """

    def __init__(self, spec: ClipSpec, device: str | None = None):
        import open_clip

        self.spec = spec
        self.device = resolve_device(device)
        if spec.config_path is not None:
            # Checked before open_clip sees it: open_clip keeps every added path and re-reads them all
            # on each add, so one malformed file would break every later model load in the process.
            check_config(spec.config_path)
            open_clip.add_model_config(str(spec.config_path))
        elif spec.model not in open_clip.list_models():
            raise UserError(
                f"'{spec.model}' is not an open_clip model; pick one of open_clip.list_models() "
                "or pass the path of a JSON model config."
            )
        weights = spec.checkpoint or spec.pretrained
        if spec.pretrained:
            self._check_pretrained_available(spec)
        try:
            # Random weights come from a fixed seed, so the same spec gives the same embeddings in
            # every process (a resumed index, a later query); the caller's RNG is left untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=weights, device=self.device
                )
        except UserError:
            raise
        except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for missing weights
            raise UserError(_load_failure(spec, e)) from e
        model.eval()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.name)
        self.text_tower = truncated_tower(model, spec.name)
        self._compiled = None  # compile_text(): the compiled text encoder, called under _compiled_lock
        self._compiled_lock = threading.Lock()

    @staticmethod
    def _check_pretrained_available(spec: ClipSpec) -> None:
        """Fail at once (no network retries) when the tag's weights are neither cached nor reachable."""
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if spec.pretrained not in tags:
            raise UserError(
                f"'{spec.pretrained}' is not a pretrained tag of {spec.name}; known tags: "
                f"{', '.join(tags) or 'none'} (or pass --clip-checkpoint PATH)."
            )
        cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        if _pretrained_cached(cfg):
            return
        # Without a cached copy open_clip downloads, and huggingface_hub retries an unreachable host
        # for ~50 s; one short connection attempt tells us at once whether that can work.
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        host = _download_host(cfg)
        if offline or (host is not None and not _reachable(host)):
            raise UserError(_weights_message(spec, None))

    @cached_property
    def embed_dim(self) -> int:
        return int(self.encode_text(["a photo"]).shape[1])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    def _autocast(self):
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) preprocessed float batch -> (n, d) float32, L2-normalised."""
        with self._autocast():
            z = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalise(z)

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> (n, d) float32, L2-normalised.

        Runs only the token positions each phrase needs where the text tower allows it
        (:mod:`indexer.clip_text`; equal to open_clip's ``encode_text`` up to float rounding).
        """
        if not len(texts):
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        tokens = self.tokenizer(list(texts))
        compiled = self._compiled
        with self._autocast(), self._compiled_lock if compiled is not None else contextlib.nullcontext():
            z = encode_tokens(self.model, self.text_tower, tokens, batch_size, self.device, compiled)
        return _normalise(z)

    def compile_text(self) -> bool:
        """Compile the text encoding (:func:`indexer.clip_text.compile_tower`) for a long-lived
        process: on a CPU, for a truncatable tower; tens of seconds in every process, so
        servers call it in a background thread and encode uncompiled meanwhile. Returns whether
        encoding is compiled now; compiled and uncompiled embeddings agree to float rounding."""
        if self._compiled is not None:
            return True
        if self.text_tower is None or self.device != "cpu":
            return False  # the GPU path is not measured compiled; a tower it cannot truncate stays eager
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_inductor_cache()))
        with self._autocast():  # compiled in the context it is called in (else it compiles again)
            compiled = compile_tower(self.text_tower, self.spec.name)
        if compiled is not None:
            self._compiled = compiled
        return compiled is not None


def _inductor_cache() -> Path:
    """Where torch.compile keeps the compiled text encoders: llm2loss's own cache folder (the user's,
    like the worlds), not a folder shared under /tmp."""
    from indexer.world.build import cache_root

    return cache_root() / "inductor"


def _pretrained_cached(cfg: dict) -> bool:
    """Whether open_clip will find this pretrained config's weights without the network."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, fn), str) for fn in names)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _download_host(cfg: dict) -> tuple[str, int] | None:
    """(host, port) open_clip would download this pretrained config from."""
    from urllib.parse import urlparse

    if cfg.get("hf_hub"):
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        url = cfg.get("url", "")
    u = urlparse(url)
    if not u.hostname:
        return None
    return u.hostname, u.port or (80 if u.scheme == "http" else 443)


def _reachable(host: tuple[str, int], timeout: float = 3.0) -> bool:
    """One TCP connection attempt, bounded by ``timeout`` seconds including name resolution.

    ``getaddrinfo`` has no timeout of its own, so the attempt runs in a daemon thread.
    """
    import socket
    import threading

    ok: list[bool] = []

    def attempt():
        try:
            socket.create_connection(host, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _normalise(z: torch.Tensor) -> np.ndarray:
    z = z.float()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return z.cpu().numpy().astype(np.float32, copy=False)


#: Keys open_clip needs in an architecture config (it silently ignores a file without them).
CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def check_config(path: Path) -> dict:
    """A CLIP architecture config file, read and checked: a JSON object with ``embed_dim`` (a
    positive integer), ``vision_cfg`` and ``text_cfg`` (objects); anything else is a UserError."""
    if not path.is_file():
        raise UserError(f"CLIP config {path} does not exist; pass an existing JSON file.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"CLIP config {path} is not valid JSON ({type(e).__name__}: {str(e)[:100]}); "
                        "fix the file or pass another config.") from e
    if not isinstance(cfg, dict):
        raise UserError(f"CLIP config {path} holds a JSON {type(cfg).__name__}, not an object; write the "
                        f"architecture as an object with {', '.join(CONFIG_KEYS)}.")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise UserError(f"CLIP config {path} is incomplete: it lacks {', '.join(f'`{k}`' for k in missing)}; "
                        "copy a complete open_clip model config and edit it.")
    if not (isinstance(cfg["embed_dim"], int) and not isinstance(cfg["embed_dim"], bool) and cfg["embed_dim"] > 0):
        raise UserError(f"CLIP config {path} has `embed_dim` {cfg['embed_dim']!r}; give a positive integer.")
    for k in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[k], dict):
            raise UserError(f"CLIP config {path} has a `{k}` that is not an object; give its settings as a JSON object.")
    return cfg


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def _load_failure(spec: ClipSpec, err: Exception) -> str:
    """Why building ``spec`` failed, in one sentence: a bad config, a bad checkpoint file, corrupt
    cached weights, or weights that are neither here nor reachable."""
    text = str(err)
    if spec.checkpoint:
        if "unsupported global" in text.lower():  # torch's weights_only unpickler met a class or function
            why = "it holds pickled Python objects besides tensors (code could run), which torch refuses to load"
        elif "loading state_dict" in text or "size mismatch" in text:
            why = f"it is not a state dict of {spec.name} ({_short(err)})"
        else:  # anything else failed while reading the file itself
            why = "it is not a readable torch or safetensors file (corrupt, truncated or of another format)"
        return (f"the CLIP checkpoint {spec.checkpoint} could not be loaded: {why}; pass a .safetensors file or a "
                f"torch state dict of plain tensors saved for {spec.name}.")
    if not spec.pretrained:
        where = f"its config {spec.config_path}" if spec.config_path else "open_clip's config"
        return (f"CLIP model {spec.name} could not be built from {where} ({_short(err)}); fix the config's "
                "settings or pass another model.")
    try:
        import open_clip

        cached = _pretrained_cached(open_clip.get_pretrained_cfg(spec.name, spec.pretrained))
    except Exception:
        cached = False
    if cached:
        return (f"the cached weights '{spec.pretrained}' of CLIP model {spec.name} could not be loaded ({_short(err)}); "
                "delete them from the Hugging Face cache (HF_HOME) and download them again, or pass "
                "--clip-checkpoint PATH.")
    return _weights_message(spec, err)


def _weights_message(spec: ClipSpec, err: Exception | None) -> str:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:160]})" if err else ""
    return (
        f"could not load weights '{spec.checkpoint or spec.pretrained}' for CLIP model {spec.name}{why}: "
        "no local copy and no network; download them on a connected machine into the Hugging Face "
        "cache (HF_HOME) or pass a local file with --clip-checkpoint PATH "
        "(the offline demo needs neither: `llm2loss demo`)."
    )


def clip_spec_from_args(model: str | None, pretrained: str | None, checkpoint: str | None) -> ClipSpec | None:
    """The CLI's ``--clip/--pretrained/--clip-checkpoint`` -> a spec for ``index_dataset``.

    Nothing given -> ``None`` (the database's recorded model, else ViT-B-32 with its default
    weights). A named open_clip model without weights gets its default pretrained tag (use
    ``--pretrained none`` for random weights); a JSON config without weights is random.
    """
    if model is None and pretrained is None and checkpoint is None:
        return None
    if model and not model.endswith(".json") and pretrained is None and checkpoint is None:
        if model == DEFAULT_MODEL:
            pretrained = DEFAULT_PRETRAINED
        else:
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(model) if model in open_clip.list_models() else []
            pretrained = tags[0] if tags else None
    return ClipSpec(model=model, pretrained=pretrained, checkpoint=checkpoint)  # type: ignore[arg-type]


def resolve_clip(clip: ClipSpec | None, meta: dict) -> ClipSpec:
    """Fill in the model (recorded in ``meta``, else the default) and make file paths absolute."""
    recorded = meta.get("clip_spec")
    if clip is None:
        clip = ClipSpec(**recorded) if recorded else ClipSpec(DEFAULT_MODEL, DEFAULT_PRETRAINED)
    elif clip.model is None:
        clip = ClipSpec(recorded["model"] if recorded else DEFAULT_MODEL, clip.pretrained, clip.checkpoint)
    model = str(Path(clip.model).expanduser().resolve()) if clip.model.endswith(".json") else clip.model
    ckpt = str(Path(clip.checkpoint).expanduser().resolve()) if clip.checkpoint else None
    return ClipSpec(model=model, pretrained=clip.pretrained, checkpoint=ckpt)


def load_clip(spec: ClipSpec, device: str | None = None) -> ClipModel:
    """Load ``spec`` on ``device`` (auto-detected when None)."""
    return ClipModel(spec, device)


def clip_for_database(meta: dict, device: str | None = None) -> ClipModel:
    """Reload the exact model recorded in a database's meta.json (``meta["clip_spec"]``)."""
    spec_d = meta.get("clip_spec")
    if not spec_d:
        raise UserError("the database records no CLIP model; re-run `llm2loss index` into it.")
    spec = ClipSpec(**spec_d)
    if spec.identity() != meta.get("clip"):
        raise UserError(
            f"the CLIP weights or config recorded for this database ({spec.checkpoint or spec.model}) "
            "changed on disk since indexing; restore them or re-index into a new --db folder."
        )
    return ClipModel(spec, device)


def dump_spec(spec: ClipSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)
