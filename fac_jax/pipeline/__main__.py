"""`python -m fac_jax.pipeline`: the main job (fac_jax.pipeline.main_job)."""

from fac_jax.pipeline import main_job

if __name__ == '__main__':
  main_job.run()
