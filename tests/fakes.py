"""Small databases for tests that need a table but not the ingestion pipeline.

``make_db`` writes real PNG files, embeds them with the random-weight tiny CLIP (so text queries go
through the real encoder), and stores rows with the product's own schema and meta.json, exactly as
``llm2loss index`` would lay them out. Losses are planted: ``blue circle`` samples fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw

from indexer import schema as S
from indexer.clip import ClipSpec, load_clip
from indexer.configs import TINY_CLIP
from indexer.identity import identity_columns
from indexer.store import Database

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: str, size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
    d = ImageDraw.Draw(img)
    m = int(rng.integers(3, 7))
    box = (m, m, size - m, size - m)
    rgb = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    else:
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=rgb)
    return img


def make_images(folder: Path, n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Write ``n`` PNGs under ``folder/images`` and a manifest.csv; return the manifest frame.

    Columns: id, image (relative path), label (the shape), split, color, loss (float, planted:
    blue circles ~2.5, the rest ~0.1).
    """
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shape, color = SHAPES[i % 3], list(COLORS)[(i // 3) % 3]
        rel = f"images/{i:05d}_{color}_{shape}.png"
        draw(shape, color, seed=seed * 100003 + i).save(folder / rel)
        bad = shape == "circle" and color == "blue"
        loss = float(rng.gamma(4.0, 0.6) if bad else rng.gamma(1.0, 0.1))
        rows.append({"id": f"s{i:05d}", "image": rel, "label": shape, "color": color,
                     "split": "test" if i % 4 == 0 else "train", "loss": loss})
    df = pd.DataFrame(rows)
    df.to_csv(folder / "manifest.csv", index=False)
    return df


def make_db(folder: Path, n: int = 120, seed: int = 0, predicted: bool = True,
            clip: ClipSpec | None = None) -> Database:
    """A database at ``folder/db`` over ``make_images(folder, n)``.

    With ``predicted``, ``predicted_loss`` is the true loss plus noise and ``predicted_loss_std`` a
    constant 0.1, standing in for ``llm2loss diagnose``; otherwise both columns are null.
    """
    folder = Path(folder)
    df = make_images(folder, n, seed)
    clip = clip or ClipSpec(model=str(TINY_CLIP), pretrained=None)
    model = load_clip(clip, "cpu")
    import torch

    pixels = torch.stack([model.preprocess(Image.open(folder / p).convert("RGB")) for p in df["image"]])
    emb = model.encode_images(pixels)
    rng = np.random.default_rng(seed + 1)
    pred = (df["loss"].to_numpy() + rng.normal(0, 0.05, n)).clip(0) if predicted else None
    db = Database(folder / "db", create=True)
    meta_schema = pa.schema([pa.field("color", pa.string())])
    table_schema = S.table_schema(model.embed_dim, meta_schema)
    db.create_table(table_schema)
    data = pa.table(
        {
            S.ID: df["id"].tolist(),
            S.IMAGE: [str((folder / p).resolve()) for p in df["image"]],
            S.LABEL: df["label"].tolist(),
            S.SPLIT: df["split"].tolist(),
            S.LOSS: pa.array(df["loss"].to_numpy(np.float32)),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), model.embed_dim),
            S.PREDICTED_LOSS: pa.array(pred.astype(np.float32)) if predicted else pa.nulls(n, pa.float32()),
            S.PREDICTED_LOSS_STD: pa.array(np.full(n, 0.1, np.float32)) if predicted else pa.nulls(n, pa.float32()),
            "color": df["color"].tolist(),
            **identity_columns([str((folder / p).resolve()) for p in df["image"]]),
        },
        schema=table_schema,
    )
    db.table.add(data)
    db.update_meta(
        clip=clip.identity(),
        clip_spec=clip.to_dict(),
        data_version=db.version,
        sources=[str((folder / "manifest.csv").resolve())],
        image_roots=[str(folder.resolve())],
        embed_dim=model.embed_dim,
    )
    return db
