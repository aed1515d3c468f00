"""Every config loads, overrides from the command line, and builds its model abstractly; the 8B
parameter count per component equals the count derived from the sizes in DESIGN.md section 1."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fac_jax import config as config_lib, sharding
from fac_jax.checkpoints import checkpoint
from fac_jax.model import fun_audio_chat, lora
from conftest import REPO

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def component_counts(cfg):
  _, state = nnx.split(fun_audio_chat.abstract_model(cfg))
  params = nnx.to_pure_dict(state)
  return {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(subtree))
          for name, subtree in params.items()}, state


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  """A checkpoint of the tiny model: what configs/finetune.py fine-tunes."""
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))
  params = nnx.to_pure_dict(nnx.state(fun_audio_chat.create(cfg.model)))
  return checkpoint.save_params(str(tmp_path_factory.mktemp('ckpt') / 'tiny'), cfg.model, params)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_builds_abstractly_with_logical_axes(path, tiny_checkpoint):
  fine_tune = os.path.basename(path) == 'finetune.py'
  cfg = config_lib.load(f'{path}:{tiny_checkpoint}' if fine_tune else path)
  counts, state = component_counts(cfg.model)
  assert set(counts) == {'continuous_encoder', 'adapters', 'llm', 'speech_refined_head'}
  # Every parameter, and every adapter the config trains, has logical axes the table resolves.
  _, adapted = nnx.split(lora.abstract_model(cfg.model, cfg.train.lora))
  for variable in jax.tree.leaves((state, adapted), is_leaf=lambda x: isinstance(x, nnx.Variable)):
    sharding.logical_to_spec(sharding.variable_logical_axes(variable))
  if fine_tune:  # the checkpoint's own model, the stage starting from it, with adapters
    assert cfg.model.to_json() == checkpoint.load_config(tiny_checkpoint).to_json()
    assert cfg.train.init_checkpoint == tiny_checkpoint and cfg.train.lora.rank > 0


def test_finetune_config_without_a_checkpoint_says_what_it_needs():
  with pytest.raises(ValueError, match=r'configs/finetune.py:CKPT\[,stage\]'):
    config_lib.load(os.path.join(REPO, 'configs', 'finetune.py'))


def test_fac_8b_parameter_count_matches_design():
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'fac_8b.py'))
  counts, _ = component_counts(cfg.model)
  print('\nfac_8b parameters per component:')
  for name, count in counts.items():
    print(f'  {name:22s} {count:>15,}')
  print(f'  {"total":22s} {sum(counts.values()):>15,}')

  # DESIGN.md section 1, written out by hand.
  d_enc, ffn_enc = 1280, 5120
  enc_layer = 4 * d_enc * d_enc + 3 * d_enc + 2 * 2 * d_enc + 2 * d_enc * ffn_enc + ffn_enc + d_enc
  encoder = (128 * d_enc * 3 + d_enc) + (d_enc * d_enc * 3 + d_enc) + 32 * enc_layer \
      + 2 * d_enc + (d_enc * 4096 + 4096)
  adapters = 6565 * 4096 + 2 * 4096 * 4096

  def qwen3_layer(d, q_heads, kv_heads, head_dim, ffn):
    return (2 * d * q_heads * head_dim + 2 * d * kv_heads * head_dim + 2 * head_dim
            + 3 * d * ffn + 2 * d)

  llm = 2 * 151936 * 4096 + 36 * qwen3_layer(4096, 32, 8, 128, 12288) + 4096
  refined_head = (4096 * 5 * 4096 + 5 * 4096) + 4096 * 1024 \
      + 28 * qwen3_layer(1024, 16, 8, 128, 3072) + 1024 + 1024 * 4096  # output tied: no extra
  assert counts == {'continuous_encoder': encoder, 'adapters': adapters, 'llm': llm,
                    'speech_refined_head': refined_head}
  assert 8.0e9 < sum(counts.values()) < 9.5e9


def test_fac_30b_a3b_llm_has_qwen3_30b_a3b_parameters():
  """Qwen3-30B-A3B: 30.5 B parameters, 3.3 B of them used a token (its model card)."""
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'fac_30b_a3b.py'))
  counts, _ = component_counts(cfg.model)
  d, layers, experts, per_token, width = 2048, 48, 128, 8, 768
  attention = 2 * d * 32 * 128 + 2 * d * 4 * 128 + 2 * 128
  expert_weights = 3 * experts * d * width
  layer = attention + 2 * d + d * experts + expert_weights
  llm = 2 * 151936 * d + layers * layer + d
  active = llm - layers * expert_weights * (experts - per_token) // experts
  print(f'\nfac_30b_a3b LLM: {llm:,} parameters, {active:,} a token')
  assert counts['llm'] == llm
  assert 30.4e9 < llm < 30.6e9 and 3.2e9 < active < 3.4e9


def test_command_line_override_reaches_the_model(tmp_path):
  # The absl + config_flags parsing that every entry point uses, in a script of its own.
  script = tmp_path / 'show_config.py'
  script.write_text(
      'from absl import app\n'
      'from ml_collections import config_flags\n'
      f'c = config_flags.DEFINE_config_file("config", "{REPO}/configs/tiny.py")\n'
      'def main(_):\n'
      '  print(c.value.model.llm.num_layers, c.value.model.speech.delay_groups)\n'
      'app.run(main)\n')
  out = subprocess.run([sys.executable, str(script), '--config.model.llm.num_layers=3',
                        '--config.model.speech.delay_groups=1'],
                       capture_output=True, text=True, cwd=REPO, check=True)
  assert out.stdout.split() == ['3', '1']
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'))
  cfg.model.llm.num_layers = 3
  counts_3, _ = component_counts(cfg.model)
  cfg.model.llm.num_layers = 2
  counts_2, _ = component_counts(cfg.model)
  assert counts_3['llm'] > counts_2['llm']
  assert counts_3['speech_refined_head'] == counts_2['speech_refined_head']
