"""Data in: manifests, losses, CLIP embeddings, the LanceDB table and the FAISS index.

Imports nothing from ``diagnosis`` or ``search_ui``.
"""
