"""Inference: KV-cache generation over both channels (generate), sampling (sampling), streaming
speech chunks to a detokenizer (streaming) and the chat CLI (chat: `python -m
fac_jax.inference.chat`). May import: top-level modules, model/, checkpoints/, speech/, data/,
train/, merging/."""
