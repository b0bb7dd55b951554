"""The sample table's column names and Arrow schema, declared once.

Every module refers to columns through these constants, never by retyping the strings.
"""

from __future__ import annotations

import pyarrow as pa

TABLE_NAME = "samples"

ID = "id"
IMAGE = "image"
LABEL = "label"
SPLIT = "split"
LOSS = "loss"
EMBEDDING = "embedding"
PREDICTED_LOSS = "predicted_loss"
PREDICTED_LOSS_STD = "predicted_loss_std"
#: What identifies the indexed image file (indexer.identity): its real path (symlinks resolved),
#: size in bytes, modification time (ns) and SHA-256 of its bytes, recorded when it was indexed.
IMAGE_REAL = "image_real"
IMAGE_BYTES = "image_bytes"
IMAGE_MTIME_NS = "image_mtime_ns"
IMAGE_SHA256 = "image_sha256"
IDENTITY_COLUMNS = (IMAGE_REAL, IMAGE_BYTES, IMAGE_MTIME_NS, IMAGE_SHA256)

#: The ``split`` of an unlabeled row (no label, no loss): the *pool* a team can send for labelling.
#: ``index`` sets it for every such row; ``diagnose`` never fits on these rows and scores them.
POOL_SPLIT = "pool"

#: Columns the product owns; every other manifest column is kept as metadata.
CORE_COLUMNS = (ID, IMAGE, LABEL, SPLIT, LOSS, EMBEDDING, PREDICTED_LOSS, PREDICTED_LOSS_STD, *IDENTITY_COLUMNS)
#: Columns a search result may return (everything but the vector).
RESULT_COLUMNS = (ID, IMAGE, LABEL, SPLIT, LOSS, PREDICTED_LOSS, PREDICTED_LOSS_STD)


def table_schema(embed_dim: int, metadata: pa.Schema | None = None) -> pa.Schema:
    """Arrow schema of the sample table.

    ``embedding`` is a fixed-size list of ``embed_dim`` float32 (L2-normalised); ``loss`` and the
    predicted columns are float32 (the predicted ones are null until ``llm2loss diagnose``);
    ``image`` is an absolute path; the identity columns say which file it was when indexed (null
    when it could not be read then; tables made before they existed lack them: see
    :mod:`indexer.identity`). ``metadata`` fields are appended in their given order.
    """
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.string(), nullable=False),
        pa.field(LABEL, pa.string()),
        pa.field(SPLIT, pa.string()),
        pa.field(LOSS, pa.float32()),
        pa.field(EMBEDDING, pa.list_(pa.float32(), embed_dim)),
        pa.field(PREDICTED_LOSS, pa.float32()),
        pa.field(PREDICTED_LOSS_STD, pa.float32()),
        pa.field(IMAGE_REAL, pa.string()),
        pa.field(IMAGE_BYTES, pa.int64()),
        pa.field(IMAGE_MTIME_NS, pa.int64()),
        pa.field(IMAGE_SHA256, pa.string()),
    ]
    if metadata is not None:
        fields.extend(f for f in metadata if f.name not in CORE_COLUMNS)
    return pa.schema(fields)


def no_identity(n: int) -> dict[str, pa.Array]:
    """Null identity columns for ``n`` rows whose images are not files (synthetic tables)."""
    return {IMAGE_REAL: pa.nulls(n, pa.string()), IMAGE_BYTES: pa.nulls(n, pa.int64()),
            IMAGE_MTIME_NS: pa.nulls(n, pa.int64()), IMAGE_SHA256: pa.nulls(n, pa.string())}
