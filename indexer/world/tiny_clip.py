"""Training the world's tiny CLIP (open_clip architecture from a JSON config, open_clip's ClipLoss)
and measuring it on held-out images: zero-shot accuracy per attribute and text->image recall@10.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from indexer.world.generate import caption
from indexer.world.spec import ATTRIBUTES

log = logging.getLogger(__name__)


def create(config_path: Path):
    """A randomly initialised open_clip model from ``config_path``: (model, preprocess, tokenizer)."""
    import open_clip

    open_clip.add_model_config(str(config_path))
    name = Path(config_path).stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
    return model, preprocess, open_clip.get_tokenizer(name)


def preprocess_images(images: np.ndarray, preprocess) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, s, s) float32 through open_clip's own transform.

    The same transform ``llm2loss index`` applies to the image files, so training and indexing
    see identical pixels.
    """
    return torch.stack([preprocess(Image.fromarray(im)) for im in images])


def train_clip(
    config_path: Path,
    pixels: torch.Tensor,
    captions: list[str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
):
    """Contrastive training from scratch; returns the model in eval mode.

    ``pixels``: (n, 3, s, s) float32 preprocessed images; ``captions``: n strings. AdamW with a
    linear warm-up and cosine decay; the temperature is learned (open_clip's ``logit_scale``).
    """
    import open_clip

    torch.manual_seed(seed)
    model, _, tokenizer = create(config_path)
    tokens = tokenizer(captions)
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    gen = torch.Generator().manual_seed(seed)
    n = len(pixels)
    perm, pos = torch.randperm(n, generator=gen), 0
    model.train()
    bar = tqdm(range(steps), desc="tiny CLIP", disable=not progress, leave=False)
    for _ in bar:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        img = model.encode_image(pixels[idx], normalize=True)
        txt = model.encode_text(tokens[idx], normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


@torch.inference_mode()
def encode(model, pixels: torch.Tensor | None = None, texts: list[str] | None = None, tokenizer=None,
           batch: int = 512) -> np.ndarray:
    """Images (preprocessed) or texts -> (n, d) float32 L2-normalised embeddings."""
    out = []
    if pixels is not None:
        for i in range(0, len(pixels), batch):
            out.append(model.encode_image(pixels[i : i + batch], normalize=True))
    else:
        for i in range(0, len(texts), batch):
            out.append(model.encode_text(tokenizer(texts[i : i + batch]), normalize=True))
    return torch.cat(out).float().numpy()


def evaluate_clip(model, tokenizer, pixels: torch.Tensor, rows: pd.DataFrame) -> dict:
    """Quality on held-out images.

    ``zero_shot``: per attribute, the accuracy of reading the attribute off the best-matching full
    caption (canonical template, every combination of attribute values). ``recall_at_10``: for each
    attribute combination present, the canonical caption retrieves the images; the share of its
    matching images found in the top 10 (out of min(10, matching)), averaged over combinations.
    ``partial_zero_shot``: per attribute, accuracy of short prompts naming only that attribute.
    """
    attrs = list(ATTRIBUTES)
    combos = list(itertools.product(*ATTRIBUTES.values()))
    texts = [caption(dict(zip(attrs, c, strict=True))) for c in combos]
    img = encode(model, pixels=pixels)
    txt = encode(model, texts=texts, tokenizer=tokenizer)
    sim = img @ txt.T  # (n_images, n_combos)
    best = np.asarray(combos)[sim.argmax(1)]
    truth = rows[attrs].to_numpy()
    zero_shot = {a: float((best[:, j] == truth[:, j]).mean()) for j, a in enumerate(attrs)}
    zero_shot["all"] = float((best == truth).all(1).mean())

    key = ["|".join(r) for r in truth]
    recalls = []
    for j, c in enumerate(combos):
        relevant = np.asarray([k == "|".join(c) for k in key])
        if not relevant.any():
            continue
        top = np.argsort(-sim[:, j])[:10]
        recalls.append(relevant[top].sum() / min(10, relevant.sum()))

    partial = {}
    prompts = {
        "shape": "a {}", "color": "a {} object", "size": "a {} object",
        "background": "an object on a {} background",
    }
    for j, a in enumerate(attrs):
        t = encode(model, texts=[prompts[a].format(v) for v in ATTRIBUTES[a]], tokenizer=tokenizer)
        pred = np.asarray(ATTRIBUTES[a])[(img @ t.T).argmax(1)]
        partial[a] = float((pred == truth[:, j]).mean())
    return {"zero_shot": zero_shot, "recall_at_10": float(np.mean(recalls)), "partial_zero_shot": partial,
            "eval_images": len(rows)}
