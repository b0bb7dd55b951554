"""Truncated text encoding (indexer/clip_text.py): equal to open_clip's encode_text, fewer positions.

Tolerance: the truncated pass does the same arithmetic on smaller matrices, so results differ only
by float32 rounding (eps 1.19e-7) in differently blocked sums. The longest sums have K = 4 * width
terms (the MLP's second matmul: 2,048 in ViT-B-32); a random-walk bound for their rounding is
sqrt(K) * eps ~ 5.4e-6 relative, so on L2-normalised embeddings (components <= 1) we allow 1e-5
absolute and a cosine >= 1 - 1e-6. Measured here: 2.3e-7 and 6e-8, the same size as the difference
between open_clip's own encode_text on one phrase alone and in a batch. A wrong position embedding,
mask or pooled token changes embeddings by 1e-2 and more.
"""

import logging
import os

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CustomTextCLIP

from indexer.clip import load_clip
from indexer.clip_text import encode_tokens, text_tower, truncated_tower

ATOL = 1e-5
MIN_COS = 1 - 1e-6
WORDS = ["a", "small", "red", "triangle", "on", "the", "striped", "background", "next", "to", "big", "blue",
         "dog", "in", "photo", "of"]
#: Token counts (without start/end tokens; each word is one token) from none to more than the context holds.
LENGTHS = (0, 1, 2, 3, 5, 8, 13, 21, 40, 75, 90)
TINY_VISION = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}


def phrases(lengths=LENGTHS, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, n)) for n in lengths]


def unit(z: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(z.float(), dim=-1).numpy()


def assert_same_embeddings(a: torch.Tensor, b: torch.Tensor):
    a, b = unit(a), unit(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)
    assert (a * b).sum(1).min() >= MIN_COS


def positions_seen(model_part: torch.nn.Module) -> list[int]:
    """Sequence lengths the text transformer runs, recorded by a forward hook."""
    seen: list[int] = []
    model_part.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    return seen


@pytest.fixture(scope="module")
def vit_b32():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")


@torch.inference_mode()
def test_vit_b32_truncated_equals_encode_text_alone_and_mixed(vit_b32):
    model, tokenizer = vit_b32
    tower = text_tower(model)
    assert not isinstance(tower, str), tower
    texts = phrases()
    tokens = tokenizer(texts)
    full = model.encode_text(tokens)
    seen = positions_seen(model.transformer)
    for i in range(len(texts)):  # one phrase at a time: the query path
        assert_same_embeddings(encode_tokens(model, tower, tokens[i : i + 1]), full[i : i + 1])
    want = [min(n + 2, 77) for n in LENGTHS]  # start + words + end-of-text, cut at the context
    assert seen == want
    seen.clear()
    # A mixed batch, in batches of 3: rows come back in the caller's order, each group run at its own length.
    shuffled = np.random.default_rng(1).permutation(len(texts))
    mixed = encode_tokens(model, tower, tokens[shuffled], batch_size=3)
    assert_same_embeddings(mixed, full[shuffled])
    assert sorted(seen) == sorted(set(want))  # the two phrases cut at 77 tokens share one batch


@torch.inference_mode()
def test_tiny_clip_model_encodes_truncated(tiny_clip_spec):
    clip = load_clip(tiny_clip_spec, "cpu")
    assert clip.text_tower is not None
    texts = phrases(lengths=(0, 1, 4, 9, 22, 30))  # the tiny CLIP's context is 24 tokens
    full = clip.model.encode_text(clip.tokenizer(texts))
    dim = clip.embed_dim  # (encodes a phrase itself)
    seen = positions_seen(clip.model.transformer)
    got = clip.encode_text(texts, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (len(texts), dim)
    np.testing.assert_allclose(got, unit(full), rtol=0, atol=ATOL)
    assert sorted(seen) == [2, 3, 6, 11, 24]  # 22 words fill the context: one batch with the cut phrase
    alone = np.concatenate([clip.encode_text([t]) for t in texts])
    np.testing.assert_allclose(alone, got, rtol=0, atol=ATOL)
    assert clip.encode_text([]).shape == (0, clip.embed_dim)


def test_compiled_text_encoding_equals_the_eager_one(tiny_clip_spec, tmp_path, monkeypatch):
    """``ClipModel.compile_text`` (torch.compile, frozen weights): the same embeddings as the eager
    truncated encoding, one phrase at a time and in mixed batches, to float rounding (ATOL on unit
    vectors, as above); its compiled code goes to llm2loss's cache folder."""
    monkeypatch.setenv("LLM2LOSS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    clip = load_clip(tiny_clip_spec, "cpu")
    texts = phrases(lengths=(0, 1, 2, 4, 9, 22, 30))
    eager = clip.encode_text(texts, batch_size=3)
    alone = np.concatenate([clip.encode_text([t]) for t in texts])
    assert clip.compile_text() is True and clip.compile_text() is True  # once
    np.testing.assert_allclose(clip.encode_text(texts, batch_size=3), eager, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.concatenate([clip.encode_text([t]) for t in texts]), alone, rtol=0, atol=ATOL)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")


def test_a_tower_that_does_not_compile_stays_eager_and_says_so(tiny_clip_spec, caplog):
    from indexer.clip_text import compile_tower

    clip = load_clip(tiny_clip_spec, "cpu")

    def no_compiler(module, **kw):
        raise RuntimeError("no C++ compiler found")

    with caplog.at_level(logging.WARNING, logger="indexer.clip_text"):
        assert compile_tower(clip.text_tower, "tiny", compiler=no_compiler) is None
    assert "stays uncompiled" in caplog.text and "no C++ compiler" in caplog.text
    assert clip.encode_text(["a red circle"]).shape == (1, clip.embed_dim)  # eager, as before


def small_text_cfg(**kw) -> dict:
    return {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, **kw}


def build(cls, **text_kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(embed_dim=32, vision_cfg=TINY_VISION, text_cfg=small_text_cfg(**text_kw)).eval()


class OwnEncodeText(CLIP):
    def encode_text(self, text, normalize: bool = False):
        return super().encode_text(text, normalize)


TRUNCATABLE = {
    "CLIP, end-of-sequence pool (the 'worldwide' models)": (CLIP, {"pool_type": "eos", "eos_id": 49407}),
    "CustomTextCLIP, causal TextTransformer (EVA)": (CustomTextCLIP, {}),
    "CustomTextCLIP, custom blocks, linear projection": (
        CustomTextCLIP, {"qk_norm": True, "proj_type": "linear", "proj_bias": True}),
}

FALLBACK = {
    "CLIP, bidirectional, last-token pool (CLIPA)": (CLIP, {"no_causal_mask": True, "pool_type": "last"},
                                                     "pooled by 'last'"),
    "CustomTextCLIP, bidirectional, argmax (MobileCLIP2)": (CustomTextCLIP, {"no_causal_mask": True},
                                                            "not causal"),
    "CustomTextCLIP, bidirectional, last-token pool (SigLIP)": (
        CustomTextCLIP, {"no_causal_mask": True, "pool_type": "last"}, "pooled by 'last'"),
    "CustomTextCLIP, appended class token (CoCa)": (CustomTextCLIP, {"embed_cls": True}, "class token"),
    "a CLIP subclass with its own encode_text": (OwnEncodeText, {}, "OwnEncodeText"),
}


@pytest.mark.parametrize("case", list(TRUNCATABLE))
@torch.inference_mode()
def test_other_truncatable_towers(case):
    cls, kw = TRUNCATABLE[case]
    model = build(cls, **kw)
    tower = text_tower(model)
    assert not isinstance(tower, str), tower
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=16)(phrases(lengths=(0, 3, 7, 14, 20)))
    assert_same_embeddings(encode_tokens(model, tower, tokens, batch_size=2), model.encode_text(tokens))


@pytest.mark.parametrize("case", list(FALLBACK))
@torch.inference_mode()
def test_untruncatable_towers_fall_back_and_say_so(case, caplog):
    cls, kw, why = FALLBACK[case]
    model = build(cls, **kw)
    with caplog.at_level(logging.INFO, logger="indexer.clip_text"):
        tower = truncated_tower(model, "the test model")
    assert tower is None
    (record,) = [r for r in caplog.records if r.name == "indexer.clip_text"]
    assert "the test model" in record.getMessage() and why in record.getMessage()
    assert "all token positions" in record.getMessage()
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=16)(phrases(lengths=(0, 3, 7, 14)))
    seen = positions_seen(model.text.transformer if hasattr(model, "text") else model.transformer)
    got = encode_tokens(model, None, tokens, batch_size=3)
    np.testing.assert_array_equal(got[:3].numpy(), model.encode_text(tokens[:3]).numpy())
    seen.pop()
    assert len(seen) == 2 and seen[0] == seen[1] >= 16  # every position (and CoCa's class token)
