"""Data: manifests, the offline demo corpus (synth), preparation into ArrayRecord (prepare),
conversations and preference pairs into the batch dict of fac_jax.batch, and the grain input
pipeline (input_pipeline). May import: top-level modules, model/, checkpoints/, speech/."""
