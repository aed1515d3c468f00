"""fac_jax: Fun-Audio-Chat (speech in, text and speech out) in JAX / Flax NNX."""
