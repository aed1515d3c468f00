"""The main job (main_job: `python -m fac_jax.pipeline`): synthesise, prepare, M_0, pre-alignment,
Core-Cocktail, DPO, evaluation and the report. The last stage: may import every other."""
