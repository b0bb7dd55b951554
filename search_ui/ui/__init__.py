"""Pieces of the Gradio app (``search_ui.app``): the per-server context with its path guard, the
handlers bound to events and API endpoints, and the model-health pictures.

Nothing here decides what a search or a failure mode is: the handlers call the query engine,
``diagnosis.explain``, the selections and the export, exactly as the CLI does.
"""
