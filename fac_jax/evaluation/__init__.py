"""Evaluation: the offline ASR judge, Whisper tiny.en in JAX (asr_judge: `python -m
fac_jax.evaluation.asr_judge`), and held-out evaluation by generation (spoken_eval). May import
every stage before it: top-level modules, model/, checkpoints/, speech/, data/, train/, merging/,
inference/."""
