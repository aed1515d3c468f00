"""The speech codec: the tokenizer/detokenizer interface with the embedded k-means + Griffin-Lim
default (speech_tokenizer), S3Tokenizer v3, the CosyVoice 3 flow and HiFT vocoder in JAX, their
converters and weight folders. May import: top-level modules, model/, checkpoints/."""
