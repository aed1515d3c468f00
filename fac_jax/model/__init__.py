"""Model definitions: the Qwen3 decoder, the continuous speech encoder, the composite
Fun-Audio-Chat, and their shared layers. May import: the top-level shared modules only."""
