"""Bundled open_clip architecture configs (JSON), addressable by path."""

from pathlib import Path

#: The offline world's tiny CLIP: ModifiedResNet [1,1,1,1], width 32, 32 px, embed 128; text 128 x 3.
TINY_CLIP = Path(__file__).with_name("tiny-clip.json")
