"""Query engine, curation, CLI and the Gradio app. Uses ``indexer`` and ``diagnosis`` as libraries."""
