"""The real-time speech server (`python -m fac_jax.serve`): a web page and one WebSocket per
conversation, answered by a slot engine that batches every conversation's decode steps."""
