"""Training: the trainer and its CLI (trainer: `python -m fac_jax.train.trainer`), the pure jitted
train and eval steps (steps), the optimizer and frozen-parameter masks (optim), multi-task DPO
(dpo) and held-out losses (held_out). May import: top-level modules, model/, checkpoints/,
speech/, data/."""
