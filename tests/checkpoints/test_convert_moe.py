"""Import and export of a Fun-Audio-Chat checkpoint whose LLM is a Qwen3-MoE (tiny, random, built
with transformers' Qwen3MoeForCausalLM, experts saved one tensor each as the released files keep
them): config.json's MoE fields and rope_theta read and written back; per-expert tensors stacked
into our (layers, experts, ...) leaves by hand-indexed comparison, a shard reading only its own
experts; import -> export bit-exact in float32 and bfloat16; the imported LLM's logits against
transformers'; bad checkpoints refused in one line naming the file, the tensor and what
config.json expects.

Tolerance: the LLM forward in float32, max relative error 1e-4 (max |ours - theirs| / max |theirs|);
everything else exact.
"""

import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

from fac_jax import config as config_lib
from fac_jax.checkpoints import checkpoint, convert, official_layout
from fac_jax.model import fun_audio_chat
import official_checkpoint
from test_convert import max_rel_err
from test_convert_refusals import convert_command

MOE = official_checkpoint.MOE_TEXT_CONFIG
LAYERS = 2  # the tiny text config's num_hidden_layers
GATE = 'language_model.model.layers.{}.mlp.gate.weight'
EXPERT = 'language_model.model.layers.{}.mlp.experts.{}.{}.weight'


@pytest.fixture(scope='module')
def official(tmp_path_factory):
  root = tmp_path_factory.mktemp('convert_moe')
  hf_dir = root / 'hf'
  return root, hf_dir, official_checkpoint.write_official_checkpoint(hf_dir, seed=7, moe=True)


@pytest.fixture(scope='module')
def imported(official):
  root, hf_dir, reference = official
  ckpt = convert.import_checkpoint(str(hf_dir), str(root / 'ckpt'))
  reader = checkpoint.Reader(ckpt)
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(reader.config))
  return ckpt, reader.config, nnx.merge(graphdef, reader.load())


def read_folder(folder):
  tensors = {}
  for path in glob.glob(os.path.join(folder, '*.safetensors')):
    tensors.update(load_file(path))
  return tensors


def test_config_moe_fields_and_rope_theta_are_read_and_written_back(official):
  _, hf_dir, _ = official
  hf_config, cfg = convert.read_official_config(str(hf_dir))
  expected = dict(num_experts=7, experts_per_token=3, moe_mlp_dim=34, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=(), router_aux_loss_coef=0.001)
  assert {name: cfg.llm.moe[name] for name in expected} == expected
  assert cfg.llm.rope_theta == 3e6
  assert cfg.speech_refined_head.moe.num_experts == 0
  stripped = json.loads(json.dumps(hf_config))
  for field in MOE:
    del stripped['text_config'][field]
  written = official_layout.config_to_official(cfg, stripped)
  del hf_config['text_config']['output_router_logits']  # a transformers switch, not ours to write
  assert written == hf_config


def test_config_as_transformers_5_writes_it_is_read_and_written_back_in_place(official):
  """transformers 5 keeps rope_theta in rope_parameters and names num_experts num_local_experts."""
  _, hf_dir, _ = official
  hf_config = json.loads((hf_dir / 'config.json').read_text())
  text = hf_config['text_config']
  text['rope_parameters'] = {'rope_theta': text.pop('rope_theta'), 'rope_type': 'default'}
  text['num_local_experts'] = text.pop('num_experts')
  cfg = official_layout.config_from_official(hf_config, config_lib.default_config().model)
  assert (cfg.llm.rope_theta, cfg.llm.moe.num_experts) == (3e6, 7)
  assert official_layout.config_to_official(cfg, hf_config) == hf_config


def test_per_expert_tensors_fill_our_stacked_leaves(official):
  """The tree load_params builds against the files indexed by hand, and back tensor by tensor."""
  _, hf_dir, reference = official
  _, cfg = convert.read_official_config(str(hf_dir))
  maps = official_layout.causal_lm_maps(cfg.llm, 'language_model.', ('llm',))
  tensors = reference['tensors']
  params = official_layout.load_params(tensors, maps)
  moe = params['llm']['decoder']['layers']['moe']
  experts, width, hidden = MOE['num_experts'], MOE['moe_intermediate_size'], 56
  assert moe['router']['kernel'].shape == (LAYERS, hidden, experts)
  assert moe['gate_proj'].shape == moe['up_proj'].shape == (LAYERS, experts, hidden, width)
  assert moe['down_proj'].shape == (LAYERS, experts, width, hidden)
  assert 'mlp' not in params['llm']['decoder']['layers']
  for layer in range(LAYERS):
    np.testing.assert_array_equal(moe['router']['kernel'][layer], tensors[GATE.format(layer)].T)
    for e in range(experts):
      for name in ('gate_proj', 'up_proj', 'down_proj'):
        np.testing.assert_array_equal(moe[name][layer, e],
                                      tensors[EXPERT.format(layer, e, name)].T)
  for m in maps:
    leaf = official_layout.at_path(params, m.path)
    for i, key in enumerate(m.keys):
      theirs = official_layout.official_tensor(leaf, m, i)
      assert theirs.shape == tensors[key].shape and theirs.tobytes() == tensors[key].tobytes()


def test_a_block_of_an_expert_stack_reads_only_its_experts(official):
  _, hf_dir, reference = official
  _, cfg = convert.read_official_config(str(hf_dir))
  (m,) = [m for m in official_layout.causal_lm_maps(cfg.llm, 'language_model.', ('llm',))
          if m.path[-2:] == ('moe', 'up_proj')]
  tensors, read = reference['tensors'], []

  def reader(key):
    read.append(key)
    return tensors[key]

  index = (slice(1, 2), slice(2, 5), slice(None), slice(10, 20))
  block = official_layout.read_block(reader, m, index)
  assert read == [EXPERT.format(1, e, 'up_proj') for e in (2, 3, 4)]
  full = official_layout.read_block(tensors.__getitem__, m, (slice(None),) * 4)
  np.testing.assert_array_equal(block, full[index])


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_import_then_export_gives_back_every_tensor_and_config(official, imported, tmp_path, dtype):
  if dtype == 'float32':
    _, hf_dir, _ = official
    ckpt = imported[0]
  else:
    hf_dir = tmp_path / 'hf'
    official_checkpoint.write_official_checkpoint(hf_dir, seed=8, moe=True, dtype=torch.bfloat16)
    ckpt = convert.import_checkpoint(str(hf_dir), str(tmp_path / 'ckpt'))
  out = convert.export_checkpoint(ckpt, str(tmp_path / 'exported'), max_shard_bytes=150_000)
  original, exported = read_folder(hf_dir), read_folder(out)
  assert len(glob.glob(os.path.join(out, '*.safetensors'))) > 1
  assert sorted(exported) == sorted(original)
  assert sum('.mlp.experts.' in k for k in original) == LAYERS * MOE['num_experts'] * 3
  for key, value in original.items():
    mine = exported[key]
    assert (mine.dtype, mine.shape) == (value.dtype, value.shape), key
    assert mine.tobytes() == value.tobytes(), key
  for name in ('config.json', 'generation_config.json', 'tokenizer_config.json'):
    with open(os.path.join(hf_dir, name)) as a, open(os.path.join(out, name)) as b:
      assert json.load(a) == json.load(b), name


def test_imported_llm_matches_transformers(official, imported):
  """Every expert of every layer is chosen by some token, so no misplaced expert can pass."""
  *_, reference = official
  _, cfg, model = imported
  ids = np.random.default_rng(0).integers(0, cfg.llm.vocab_size, size=(2, 13))
  with torch.no_grad():
    theirs = reference['language_model'](torch.as_tensor(ids), output_router_logits=True)
  for router_logits in theirs.router_logits:
    chosen = torch.topk(router_logits, MOE['num_experts_per_tok'], dim=-1).indices
    assert set(chosen.flatten().tolist()) == set(range(MOE['num_experts']))
  assert max_rel_err(model.llm(jnp.asarray(ids)), theirs.logits.numpy()) < 1e-4


def rewrite_sharded_folder(folder, edit):
  """Reads every shard, applies `edit` to key -> array, and writes the folder's shards and index
  anew."""
  tensors = read_folder(folder)
  for path in glob.glob(os.path.join(folder, '*.safetensors')):
    os.remove(path)
  edit(tensors)
  official_checkpoint.write_shards(str(folder), {k: torch.from_numpy(v)
                                                 for k, v in tensors.items()}, 200_000)


def edit_config(folder, **text):
  config = json.loads((folder / 'config.json').read_text())
  config['text_config'].update(text)
  (folder / 'config.json').write_text(json.dumps(config))


@pytest.fixture
def hf_copy(official, tmp_path):
  folder = tmp_path / 'hf'
  shutil.copytree(official[1], folder)
  return folder


def refused(folder, tmp_path):
  out = tmp_path / 'ckpt'
  with pytest.raises(convert.CheckpointError) as error:
    convert.import_checkpoint(str(folder), str(out))
  assert not out.exists() and not (tmp_path / 'ckpt.incomplete').exists()
  assert '\n' not in str(error.value)
  return str(error.value)


def promise(count):
  return (f"config.json's text_config.num_experts is {count} (experts 0 to {count - 1} in every "
          'layer)')


def test_missing_expert_tensor_is_named_with_its_index(hf_copy, tmp_path):
  missing = EXPERT.format(1, 4, 'up_proj')
  rewrite_sharded_folder(hf_copy, lambda tensors: tensors.pop(missing))
  assert refused(hf_copy, tmp_path) == (
      f'{hf_copy}/model.safetensors.index.json: no tensor {missing} (expert 4 of layer 1); '
      f'{promise(7)}')


def test_more_experts_in_config_than_in_the_files(hf_copy, tmp_path):
  edit_config(hf_copy, num_experts=8)
  assert refused(hf_copy, tmp_path) == (
      f'{hf_copy}/model.safetensors.index.json: no tensor {EXPERT.format(0, 7, "gate_proj")} '
      f'(expert 7 of layer 0); {promise(8)}')


def shard_of(folder, key: str) -> str:
  with open(folder / 'model.safetensors.index.json') as f:
    return json.load(f)['weight_map'][key]


def test_fewer_experts_in_config_than_in_the_files(hf_copy, tmp_path):
  edit_config(hf_copy, num_experts=6)
  extra = EXPERT.format(0, 6, 'down_proj')
  shard = shard_of(hf_copy, extra)
  assert refused(hf_copy, tmp_path) == (
      f'{hf_copy}/{shard}: tensor {extra} is expert 6 of layer 0, beyond what the config '
      f'expects: {promise(6)}')


def test_router_of_the_wrong_width(hf_copy, tmp_path):
  router = GATE.format(1)
  rewrite_sharded_folder(hf_copy, lambda tensors: tensors.update({router: tensors[router][:6]}))
  shard = shard_of(hf_copy, router)
  assert refused(hf_copy, tmp_path) == (
      f'{hf_copy}/{shard}: tensor {router} has shape [6, 56]; expected [7, 56] (num_experts, '
      f'hidden_size): {promise(7)}')


def test_command_says_a_missing_expert_in_one_line(hf_copy, tmp_path):
  missing = EXPERT.format(0, 2, 'down_proj')
  rewrite_sharded_folder(hf_copy, lambda tensors: tensors.pop(missing))
  result = convert_command('import', f'--hf_dir={hf_copy}', f'--out={tmp_path / "ckpt"}')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: {hf_copy}/model.safetensors.index.json: no tensor {missing} (expert 2 of layer 0); '
      f'{promise(7)}')


def test_a_moe_field_missing_from_config_is_refused_not_assumed(hf_copy, tmp_path):
  config = json.loads((hf_copy / 'config.json').read_text())
  del config['text_config']['norm_topk_prob']  # the class default (false) is not the released
  (hf_copy / 'config.json').write_text(json.dumps(config))
  assert refused(hf_copy, tmp_path) == f"{hf_copy}/config.json: missing field 'norm_topk_prob'"


def test_dense_and_moe_layers_mixed_are_refused(hf_copy, tmp_path):
  edit_config(hf_copy, decoder_sparse_step=2)
  assert refused(hf_copy, tmp_path).startswith(
      f'{hf_copy}/config.json: moe.decoder_sparse_step=2 with moe.mlp_only_layers=() mixes dense '
      'and MoE layers in one scanned stack')
