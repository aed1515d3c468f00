"""Model definitions: Qwen3 decoder, continuous speech encoder, the composite Fun-Audio-Chat."""
