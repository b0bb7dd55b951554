"""Shared test setup: offline by default, GPU tests skip cleanly, tiny models only."""

import os

# Without this open_clip/huggingface_hub retry a download for ~46 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers started by the tests (in process and as subprocesses) answer uncompiled: compiling the
# text encoding takes tens of seconds; tests/test_clip_text.py tests the compiled path itself.
os.environ.setdefault("LLM2LOSS_COMPILE_TEXT", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_clip_spec():
    """A random-weight tiny open_clip (the world's architecture): fast on one CPU core."""
    from indexer.clip import ClipSpec
    from indexer.configs import TINY_CLIP

    return ClipSpec(model=str(TINY_CLIP), pretrained=None)
