"""Import of a tiny random checkpoint in the official layout (built from transformers' Qwen3,
Qwen3Model and Qwen2.5-Omni audio encoder), each component against its PyTorch module; export
back bit-exactly; tokenizer ids read from the files.

Tolerance: float32 components, max relative error 1e-4 (max |ours - theirs| / max |theirs|).
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
from safetensors.torch import load_file as load_torch_file

from fac_jax.checkpoints import checkpoint, convert
from fac_jax.model import fun_audio_chat
import official_checkpoint


def max_rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('convert')
  hf_dir = str(root / 'hf')
  reference = official_checkpoint.write_official_checkpoint(hf_dir, seed=3)
  ckpt = convert.import_checkpoint(hf_dir, str(root / 'ckpt'))
  reader = checkpoint.Reader(ckpt)
  graphdef, _ = nnx.split(fun_audio_chat.abstract_model(reader.config))
  model = nnx.merge(graphdef, reader.load())
  return root, hf_dir, ckpt, reader.config, model, reference


def test_tokens_come_from_the_tokenizer_files(imported):
  *_, cfg, _, reference = imported
  ids = reference['special_ids']
  assert dict(cfg.tokens) == {
      'audio': ids['<|AUDIO|>'], 'audio_bos': ids['<|audio_bos|>'],
      'audio_eos': ids['<|audio_eos|>'], 'sil': ids['<|sil|>'],
      'im_start': ids['<|im_start|>'], 'im_end': ids['<|im_end|>'],
      'endoftext': ids['<|endoftext|>']}


def test_language_model_matches_pytorch(imported):
  *_, cfg, model, reference = imported
  ids = np.random.default_rng(0).integers(0, cfg.llm.vocab_size, size=(2, 13))
  with torch.no_grad():
    theirs = reference['language_model'](torch.as_tensor(ids)).logits.numpy()
  assert max_rel_err(model.llm(jnp.asarray(ids)), theirs) < 1e-4


def test_refined_head_stack_matches_pytorch(imported):
  *_, cfg, model, reference = imported
  x = np.random.default_rng(1).normal(size=(2, 17, cfg.speech_refined_head.hidden_size))
  x = x.astype(np.float32)
  with torch.no_grad():
    theirs = reference['refined_head_stack'](inputs_embeds=torch.as_tensor(x)).last_hidden_state
  positions = jnp.broadcast_to(jnp.arange(17), (2, 17))
  ours = model.speech_refined_head.decoder(jnp.asarray(x), positions, jnp.ones((2, 17), int))
  assert max_rel_err(ours, theirs.numpy()) < 1e-4


def test_continuous_encoder_matches_pytorch(imported):
  *_, cfg, model, reference = imported
  window = cfg.encoder.window_frames
  lengths = [31, 9]  # 2 full windows and a partial one; one partial window
  mel = np.random.default_rng(2).normal(size=(cfg.encoder.num_mel_bins, sum(lengths)))
  mel = mel.astype(np.float32)
  with torch.no_grad():
    theirs = reference['encoder'](torch.as_tensor(mel),
                                  feature_lens=torch.as_tensor(lengths)).last_hidden_state.numpy()
  windows = np.zeros((2, 3, window, cfg.encoder.num_mel_bins), np.float32)
  window_lengths = np.zeros((2, 3), np.int32)
  start = 0
  for a, length in enumerate(lengths):
    for w in range(0, length, window):
      chunk = mel[:, start + w:start + min(w + window, length)].T
      windows[a, w // window, :len(chunk)] = chunk
      window_lengths[a, w // window] = len(chunk)
    start += length
  frames = np.asarray(model.continuous_encoder(jnp.asarray(windows), jnp.asarray(window_lengths)))
  per_window = window // 4
  ours = []
  for a in range(2):
    for w in range(3):
      valid = ((window_lengths[a, w] - 1) // 2 + 1) // 2 if window_lengths[a, w] else 0
      ours.append(frames[a, w * per_window:w * per_window + valid])
  ours = np.concatenate(ours)
  assert ours.shape == theirs.shape
  assert max_rel_err(ours, theirs) < 1e-4


def test_export_reproduces_every_tensor_and_config(imported):
  root, hf_dir, ckpt, *_ = imported
  out = convert.export_checkpoint(ckpt, str(root / 'exported'), max_shard_bytes=150_000)
  original, exported = {}, {}
  for f in glob.glob(os.path.join(hf_dir, '*.safetensors')):
    original.update(load_file(f))
  shards = glob.glob(os.path.join(out, '*.safetensors'))
  assert len(shards) > 1
  for f in shards:
    assert os.path.getsize(f) < 150_000 + 20_000  # limit plus one header
    exported.update(load_file(f))
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
  with open(os.path.join(out, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  assert set(index['weight_map']) == set(original)
  for name in ('config.json', 'tokenizer.json', 'tokenizer_config.json',
               'preprocessor_config.json', 'processor_config.json'):
    with open(os.path.join(hf_dir, name)) as a, open(os.path.join(out, name)) as b:
      assert json.load(a) == json.load(b), name


def test_bfloat16_round_trip_keeps_bits_and_tied_head(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  official_checkpoint.write_official_checkpoint(hf_dir, seed=5, dtype=torch.bfloat16,
                                                with_srh_lm_head=True)
  ckpt = convert.import_checkpoint(hf_dir, str(tmp_path / 'ckpt'))
  reader = checkpoint.Reader(ckpt)
  assert reader.config.param_dtype == 'bfloat16'
  leaf = reader.load()['llm']['embed_tokens']['embedding']
  assert leaf.dtype == jnp.bfloat16
  out = convert.export_checkpoint(ckpt, str(tmp_path / 'exported'))
  original, exported = {}, {}
  for f in glob.glob(os.path.join(hf_dir, '*.safetensors')):
    original.update(load_torch_file(f))
  for f in glob.glob(os.path.join(out, '*.safetensors')):
    exported.update(load_torch_file(f))
  assert 'audio_invert_tower.lm_head.weight' in exported
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], value), key


def test_import_to_float32_from_bfloat16(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  reference = official_checkpoint.write_official_checkpoint(hf_dir, seed=6, dtype=torch.bfloat16)
  ckpt = convert.import_checkpoint(hf_dir, str(tmp_path / 'ckpt'), dtype='float32')
  params = checkpoint.Reader(ckpt).load()
  ours = np.asarray(params['adapters']['code_embedding']['embedding'])
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, reference['tensors']['audio_tower.embed_tokens.weight'])


def test_tokenizer_from_vocab_and_merges_and_disagreement_refused(imported, tmp_path):
  _, hf_dir, _, cfg, _, _ = imported
  folder = tmp_path / 'hf'
  shutil.copytree(hf_dir, folder)
  os.remove(folder / 'tokenizer.json')  # vocab.json + merges.txt + tokenizer_config.json remain
  _, from_bpe_files = convert.read_official_config(str(folder))
  assert dict(from_bpe_files.tokens) == dict(cfg.tokens)

  config = json.loads((folder / 'config.json').read_text())
  config['text_config']['sil_index'] = cfg.tokens.sil + 1
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(convert.CheckpointError, match=r'<\|sil\|> is id 304 in the tokenizer but '
                     r'305 in config.json'):
    convert.read_official_config(str(folder))
