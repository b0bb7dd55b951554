"""The offline world: generated images with known attributes, planted failure slices, a tiny CLIP
trained on their captions, and a black-box CNN whose per-sample losses make an ordinary manifest.

``build_world(spec)`` builds (or reuses from the cache) the world of a spec; ``default_spec()`` is
the built-in one. See :mod:`indexer.world.spec` for the spec's keys and slice kinds.
"""

from indexer.world.build import World, build_world, cache_root
from indexer.world.spec import ATTRIBUTES, benchmark_specs, default_spec, load_spec, slug

__all__ = ["ATTRIBUTES", "World", "benchmark_specs", "build_world", "cache_root", "default_spec", "load_spec",
           "slug"]
