"""Scale: ahead-of-time compilation of the real train, prefill and decode programs for TPU slices
that are not here (aot: `python -m fac_jax.scale.aot`), with per-chip memory, collectives and a
roofline estimate. May import: top-level modules, model/, checkpoints/, speech/, data/, train/,
merging/, inference/."""
