"""Text embeddings from an open_clip text tower that run only the token positions a phrase uses.

open_clip's ``encode_text`` runs all ``context_length`` (77) positions, although "a red square" is 5
tokens with its start and end-of-text tokens. In a tower whose attention is causal and whose
embedding is read at the end-of-text token, position ``i`` only sees positions ``<= i``, so the
positions after a batch's last end-of-text token cannot change the result: running the first ``L``
positions (``L`` = that token's position + 1) gives the same embedding up to float rounding, for a
cost that grows with ``L`` instead of 77. :func:`text_tower` checks that a model is such a tower
(open_clip's ``CLIP`` and a ``CustomTextCLIP`` with a ``TextTransformer``; what it copies is the
``encode_text`` of open_clip 3.x, read from its ``model.py`` and ``transformer.py``) and otherwise
says why not; :func:`encode_tokens` then encodes a batch in groups of equal length, or falls back to
the model's own ``encode_text`` for a tower it cannot truncate (non-causal SigLIP/CLIPA/MobileCLIP2
towers, CoCa's appended class token, Hugging Face text models). :func:`compile_tower` compiles the
same computation with ``torch.compile`` and frozen weights for long-lived processes (``serve``):
~2.3x faster per phrase on a CPU, equal to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Pooling where the embedding is one token's state: the highest token id (CLIP's end-of-text) or
#: the tokenizer's end-of-sequence id. Other pools read the last position or every position.
TRUNCATABLE_POOLS = ("argmax", "eos")


@dataclass(frozen=True)
class TextTower:
    """The parts of a causal open_clip text tower that reads its embedding at one token.

    ``positional_embedding``: (context, width); ``attn_mask``: (context, context) additive causal
    mask (0 on and below the diagonal, -inf above); ``text_projection``: a (width, d) parameter, an
    ``nn.Linear`` or None.
    """

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    attn_mask: torch.Tensor
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    pool_type: str
    eos_id: int | None

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, context) int64 token ids -> (n,) int64: the position each row's embedding is read at,
        as open_clip's ``text_global_pool`` picks it."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, context) int64 token ids -> (n, d) unnormalised features, as ``encode_text`` gives them,
        running only positions ``[0, L)`` with ``L`` the largest pooled position + 1."""
        pos = self.pooled_positions(tokens)
        length = int(pos.max()) + 1
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens[:, :length]).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        # The causal mask's top-left L x L block is the causal mask of L positions.
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pos]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def _is_causal(mask: torch.Tensor | None, context: int) -> bool:
    """Whether ``mask`` is the additive causal mask of ``context`` positions (open_clip's
    ``build_causal_mask``): position i attends to exactly the positions j <= i."""
    if mask is None or mask.shape != (context, context) or not mask.is_floating_point():
        return False
    upper = torch.ones(context, context, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def text_tower(model: nn.Module) -> TextTower | str:
    """The truncatable text tower of an open_clip model, or a sentence saying why it has none.

    Only the classes whose ``encode_text`` :class:`TextTower` reproduces qualify: open_clip's
    ``CLIP`` (the text parts are attributes of the model) and ``CustomTextCLIP`` whose ``text`` is a
    ``TextTransformer`` without a class token or padding mask; subclasses that override
    ``encode_text`` or ``forward`` (CoCa) do not. The transformer must be open_clip's, built of its
    two residual block types (their only position dependence is the attention mask), the mask must
    be causal and the pool one of :data:`TRUNCATABLE_POOLS`.
    """
    try:
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import (
            CustomResidualAttentionBlock,
            ResidualAttentionBlock,
            TextTransformer,
            Transformer,
        )
    except ImportError as e:  # another open_clip layout: nothing here is known to be equivalent
        return f"this open_clip does not have the classes the truncated encoding copies ({e})"

    name = type(model).__name__
    if isinstance(model, CLIP) and type(model).encode_text is CLIP.encode_text:
        src, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(model, CustomTextCLIP) and type(model).encode_text is CustomTextCLIP.encode_text:
        src = model.text
        if not (isinstance(src, TextTransformer) and type(src).forward is TextTransformer.forward):
            return f"its text tower is a {type(src).__name__}, not open_clip's TextTransformer"
        if src.cls_emb is not None:
            return "its text tower appends a class token after the padding (CoCa)"
        if src.use_pad_mask:
            return "its text tower masks padding tokens"
        pool, eos = src.pool_type, src.eos_id
    else:
        return f"it is a {name}, whose encode_text is not open_clip's CLIP or CustomTextCLIP one"
    if pool not in TRUNCATABLE_POOLS:
        return f"its text embedding is pooled by '{pool}', not read at the end-of-text token"
    transformer = src.transformer
    if not (isinstance(transformer, Transformer) and type(transformer).forward is Transformer.forward):
        return f"its text transformer is a {type(transformer).__name__}, not open_clip's Transformer"
    blocks = {type(b) for b in transformer.resblocks}
    if not blocks <= {ResidualAttentionBlock, CustomResidualAttentionBlock}:
        return f"its text transformer has {', '.join(sorted(b.__name__ for b in blocks))} blocks"
    context = src.positional_embedding.shape[0]
    if not _is_causal(src.attn_mask, context):
        return "its text attention is not causal (every position sees the padding)"
    return TextTower(token_embedding=src.token_embedding, positional_embedding=src.positional_embedding,
                     transformer=transformer, attn_mask=src.attn_mask, ln_final=src.ln_final,
                     text_projection=src.text_projection, pool_type=pool, eos_id=eos)


class GroupEncoder(nn.Module):
    """:meth:`TextTower.encode` for a batch whose rows all end at their last position (one length
    group of :func:`encode_tokens`), as a module of fixed structure that ``torch.compile`` traces."""

    def __init__(self, tower: TextTower):
        super().__init__()
        self.token_embedding, self.transformer, self.ln_final = tower.token_embedding, tower.transformer, tower.ln_final
        self.register_buffer("positional_embedding", tower.positional_embedding.detach().clone())
        self.register_buffer("attn_mask", tower.attn_mask.detach().clone())
        self.text_projection = tower.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))[:, -1]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def compile_tower(tower: TextTower, label: str, compiler: Callable | None = None
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The tower's encoder compiled by ``torch.compile`` (inductor, dynamic shapes, weights frozen so
    that the linear layers run prepacked: ViT-B-32's text encoding 2.3x faster on a 2-core CPU,
    BENCHMARKS.md issue 27), after compiling it for one phrase and for a batch; None, logged, when
    compiling fails (no C++ compiler, an unsupported platform). Takes tens of seconds in every
    process (40-50 s for ViT-B-32 on 2 cores; a warm inductor cache did not shorten it), so it is for
    long-lived processes (``serve``), not one-shot commands. Callers serialise calls (:class:`indexer.clip.ClipModel`).
    ``compiler``: ``torch.compile`` unless given (tests)."""
    try:
        from torch._inductor import config as inductor_config

        encoder = (compiler or torch.compile)(GroupEncoder(tower).eval(), dynamic=True)
        # compiled on its first calls: freezing must hold while they run
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            for n, length in ((1, 5), (3, 7)):  # one phrase and a batch: the shapes it specialises on
                ids = torch.full((n, length), 1, dtype=torch.long, device=tower.positional_embedding.device)
                encoder(ids)
    except Exception as e:  # inductor raises many kinds (no compiler, unsupported op); eager still works
        log.warning("text encoding of %s stays uncompiled: torch.compile failed (%s: %s)", label,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    log.info("text encoding of %s compiled (torch.compile, frozen weights)", label)

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=True):  # a shape compiled later is frozen too
            return encoder(tokens)

    return encode


def truncated_tower(model: nn.Module, label: str) -> TextTower | None:
    """:func:`text_tower`, logging (``label`` names the model) when encoding falls back to all positions."""
    tower = text_tower(model)
    if isinstance(tower, str):
        log.info("text encoding of %s runs all token positions through open_clip's encode_text: %s", label, tower)
        return None
    return tower


def encode_tokens(model: nn.Module, tower: TextTower | None, tokens: torch.Tensor, batch_size: int = 256,
                  device: str | torch.device = "cpu",
                  compiled: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(n, context) int64 token ids -> (n, d) unnormalised text features on ``device``, row i for token row i.

    With a ``tower`` the rows are grouped by length (their pooled position + 1), and each group is
    encoded in batches of at most ``batch_size`` over exactly its own positions: no row runs padding
    it does not need, and a phrase gets the same computation whichever phrases share its call.
    Without one, ``model.encode_text`` runs on batches in the given order. ``compiled``
    (:func:`compile_tower`) encodes the groups instead of the tower's eager code.
    """
    n = tokens.shape[0]
    if tower is None:
        chunks = [(slice(i, i + batch_size), tokens[i : i + batch_size]) for i in range(0, n, batch_size)]
    else:
        lengths = tower.pooled_positions(tokens)
        order = torch.argsort(lengths, stable=True)
        pooled, counts = torch.unique_consecutive(lengths[order], return_counts=True)
        chunks, start = [], 0
        for position, count in zip(pooled.tolist(), counts.tolist(), strict=True):
            for i in range(start, start + count, batch_size):
                rows = order[i : min(i + batch_size, start + count)]
                # the group's own positions, as a fresh (rows, L) array (indexing copies): the
                # compiled encoder is guarded on a row stride of L, which a slice would not have
                chunks.append((rows, tokens[rows, : position + 1]))
            start += count
    out = None
    for rows, batch in chunks:
        batch = batch.to(device)
        if tower is None:
            z = model.encode_text(batch)
        elif compiled is not None:  # every row of a group ends at its last position
            z = compiled(batch)
        else:
            z = tower.encode(batch)
        if out is None:
            out = z.new_empty((n, z.shape[1]))
        out[rows.to(device) if isinstance(rows, torch.Tensor) else rows] = z
    return out if out is not None else torch.empty((0, 0), device=device)
