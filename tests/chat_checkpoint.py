"""A tiny trained checkpoint holding all the chat command and the server read (tokenizers, the
system prompts of its training tasks, its data's speech tokenizer), and a spoken question."""

import os

import paths
import speech_corpus

from fac_jax import config as config_lib
from fac_jax.data import prepare
from fac_jax.train import trainer


def write(root: str) -> tuple[str, str]:
  """The final checkpoint of 2 trainer steps of the tiny config on the small speech corpus
  (spoken_qa: 'Answer briefly.', spoken; text_qa: no system prompt, typed), and a question."""
  splits = speech_corpus.write(root, num_train=16, num_validation=4, bad_lines=False)
  cfg = config_lib.load(f'{paths.TINY_CONFIG}:stage1')
  prepare.prepare(os.path.join(root, 'prepared'), splits, cfg.model)
  cfg.data.update(dir=os.path.join(root, 'prepared'), batch_size=4, seq_len=96, num_windows=16)
  cfg.train.update(steps=2, eval_every=2, checkpoint_every=2, log_every=1, eval_batches=1)
  trainer.Trainer(cfg, os.path.join(root, 'run')).run()
  return os.path.join(root, 'run', 'final'), os.path.join(root, 'audio', 'q0.wav')
