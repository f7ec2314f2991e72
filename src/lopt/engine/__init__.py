"""The engine: LoPT's gradient boundary around any Hugging Face causal LM and what it is built from.

``boundary`` (the wrapper, ``LoPTModel``, and its hooks), ``anatomy`` (where a model keeps its
layers, embeddings and head), ``heads`` (local objectives), ``loss`` (chunked cross-entropy),
``checkpointing`` (activation checkpointing scopes), ``memory`` (saved-tensor and RSS accounting),
``config`` (``LoPTConfig``).
"""
