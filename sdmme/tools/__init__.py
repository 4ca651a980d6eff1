"""Offline tools: weights, your own models, compile caches, the generated docs. Nothing here runs inside
a model."""
