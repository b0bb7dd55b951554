"""The diagnosis ensemble (CLIP embedding -> loss), scoring words, and naming failure modes.

May import ``indexer``; never ``search_ui``.
"""
