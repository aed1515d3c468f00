"""Turning conversations into the batch dict of fac_jax.batch."""
