"""Speech tokenizer and detokenizer: S3Tokenizer v3, CosyVoice 3 flow and HiFT vocoder in JAX."""
