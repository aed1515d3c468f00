"""Writes a tiny random checkpoint folder in the official Fun-Audio-Chat-8B Hugging Face layout.

Test helper: the folder has what FunAudioLLM/Fun-Audio-Chat-8B ships (config.json in the
`funaudiochat` schema, sharded safetensors with an index, Qwen tokenizer files, processor and
feature-extractor configs), at sizes where every dimension differs from the others, so a swapped
axis or a misread field cannot pass. The PyTorch modules returned with it hold exactly the saved
weights, so each component of our port can be compared with the Hugging Face one. With
`moe=True` the LLM is a Qwen3-MoE (transformers' Qwen3MoeForCausalLM), its experts saved one
tensor each as the released files keep them (transformers fuses them only in memory).
"""

import copy
import json
import os

import numpy as np
import safetensors.torch
import tokenizers
import torch
import transformers
from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni
from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni

TEXT_VOCAB = 311
TEXT_HIDDEN = 56
CRQ_HIDDEN = 44
CODEBOOK = 71
GROUP_SIZE = 5
NUM_MEL_BINS = 11

# Token text -> id; all below TEXT_VOCAB. Ids 290..304 are the tokenizer's added tokens.
SPECIAL_IDS = {
    '<|endoftext|>': 290, '<|im_start|>': 291, '<|im_end|>': 292, '<|AUDIO|>': 300,
    '<|audio_bos|>': 301, '<|audio_eos|>': 302, '<|sil|>': 304,
}
# Added tokens get consecutive ids after the model vocab, so the gaps hold placeholders.
ADDED_TOKENS = ({i: f'<|reserved_{i}|>' for i in range(290, 305)}
                | {token_id: token for token, token_id in SPECIAL_IDS.items()})

# Byte-level BPE merges: 256 byte symbols + these 34 merges fill ids 0..289.
MERGES = ([('t', 'h'), ('h', 'e'), ('i', 'n'), ('e', 'r'), ('a', 'n'), ('r', 'e'), ('o', 'n'),
           ('a', 't'), ('e', 'n'), ('n', 'd'), ('t', 'i'), ('e', 's'), ('o', 'r'), ('t', 'e'),
           ('o', 'u')]
          + [('Ġ', c) for c in 'tasowicbhfmpdlnegr'] + [('Ġ', 'th')])

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

DTYPE_NAMES = {torch.float32: 'float32', torch.bfloat16: 'bfloat16'}

# The MoE LLM's text config fields (Qwen3-MoE). rope_theta is one no default config holds, so a
# test can tell that it was read.
MOE_TEXT_CONFIG = {
    'model_type': 'qwen3_moe', 'num_experts': 7, 'num_experts_per_tok': 3,
    'moe_intermediate_size': 34, 'norm_topk_prob': True, 'decoder_sparse_step': 1,
    'mlp_only_layers': [], 'router_aux_loss_coef': 0.001, 'output_router_logits': False,
    'rope_theta': 3000000.0,
}


def official_config(dtype_name: str = 'float32', moe: bool = False) -> dict:
  """config.json of the tiny checkpoint, field for field as the official `funaudiochat` schema;
  with `moe`, its text config a Qwen3-MoE's."""
  crq = {
      'attention_bias': False, 'head_dim': 10, 'hidden_act': 'silu', 'hidden_size': CRQ_HIDDEN,
      'intermediate_size': 62, 'max_position_embeddings': 2048, 'model_type': 'qwen3',
      'num_attention_heads': 4, 'num_hidden_layers': 2, 'num_key_value_heads': 1,
      'rms_norm_eps': 1e-06, 'rope_theta': 1000000.0, 'sliding_window': None,
      'tie_word_embeddings': True, 'use_cache': True, 'vocab_size': 23,
  }
  audio = {
      'activation_dropout': 0, 'activation_function': 'gelu', 'attention_dropout': 0,
      'bos_token_id': 67, 'codebook_size': CODEBOOK, 'continuous_features_mode': 'replace',
      'crq_transformer_config': crq, 'd_model': 28, 'dropout': 0,
      'enable_audio_invert_tower': True, 'encoder_attention_heads': 4, 'encoder_ffn_dim': 52,
      'encoder_layers': 2, 'eos_token_id': 68, 'group_size': GROUP_SIZE,
      'initializer_range': 0.02, 'max_source_positions': 40,
      'model_type': 'funaudiochat_audio_encoder', 'n_window': 6, 'num_hidden_layers': 2,
      'num_mel_bins': NUM_MEL_BINS, 'output_dim': TEXT_HIDDEN, 'pad_token_id': 69,
      'scale_embedding': False,
  }
  text = {
      'attention_bias': False, 'attention_dropout': 0.0,
      'audio_bos_index': SPECIAL_IDS['<|audio_bos|>'],
      'audio_eos_index': SPECIAL_IDS['<|audio_eos|>'],
      'bos_token_id': SPECIAL_IDS['<|endoftext|>'], 'eos_token_id': SPECIAL_IDS['<|endoftext|>'],
      'head_dim': 18, 'hidden_act': 'silu', 'hidden_size': TEXT_HIDDEN, 'initializer_range': 0.02,
      'intermediate_size': 76, 'max_position_embeddings': 512, 'max_window_layers': 28,
      'model_type': 'qwen3', 'num_attention_heads': 4, 'num_hidden_layers': 2,
      'num_key_value_heads': 2, 'rms_norm_eps': 1e-06, 'rope_scaling': None,
      'rope_theta': 5000000.0, 'sil_index': SPECIAL_IDS['<|sil|>'], 'sliding_window': None,
      'use_cache': False, 'use_sliding_window': False, 'vocab_size': TEXT_VOCAB,
  }
  if moe:
    text.update(MOE_TEXT_CONFIG)
  return {
      'architectures': ['FunAudioChatForConditionalGeneration'], 'audio_config': audio,
      'audio_token_index': SPECIAL_IDS['<|AUDIO|>'], 'hidden_size': TEXT_HIDDEN,
      'ignore_index': -100, 'model_type': 'funaudiochat', 'text_config': text,
      'torch_dtype': dtype_name, 'transformers_version': '4.52.3', 'use_cache': False,
  }


def _qwen3_config(c: dict, **overrides) -> transformers.Qwen3Config:
  """transformers' config of a Qwen3 stack (a Qwen3-MoE one where `c` has experts)."""
  kind, moe = transformers.Qwen3Config, {}
  if c.get('num_experts'):
    kind = transformers.Qwen3MoeConfig
    moe = {name: c[name] for name in ('num_experts', 'num_experts_per_tok',
                                      'moe_intermediate_size', 'norm_topk_prob',
                                      'decoder_sparse_step', 'mlp_only_layers',
                                      'router_aux_loss_coef')}
    # The per-expert loop: the reference plainest to read (and grouped_mm refuses odd widths).
    moe['experts_implementation'] = 'eager'
  return kind(
      vocab_size=c['vocab_size'], hidden_size=c['hidden_size'],
      intermediate_size=c['intermediate_size'], num_hidden_layers=c['num_hidden_layers'],
      num_attention_heads=c['num_attention_heads'], num_key_value_heads=c['num_key_value_heads'],
      head_dim=c['head_dim'], max_position_embeddings=c['max_position_embeddings'],
      rms_norm_eps=c['rms_norm_eps'], rope_theta=c['rope_theta'], attention_bias=False,
      use_sliding_window=False, **moe, **overrides)


def causal_lm(c: dict) -> transformers.PreTrainedModel:
  """transformers' causal LM of a text config: Qwen3ForCausalLM, or Qwen3MoeForCausalLM."""
  kind = (transformers.Qwen3MoeForCausalLM if c.get('num_experts')
          else transformers.Qwen3ForCausalLM)
  return kind(_qwen3_config(c, tie_word_embeddings=False))


# transformers' fused expert parameters of a Qwen3-MoE layer; the files hold one tensor an expert.
FUSED_GATE_UP, FUSED_DOWN = 'mlp.experts.gate_up_proj', 'mlp.experts.down_proj'


def unfuse_experts(state: dict) -> dict:
  """A Qwen3-MoE state dict with transformers' fused experts (gate_up_proj [E, 2F, D], gate
  then up; down_proj [E, D, F]) as the files keep them: mlp.experts.{e}.{gate,up,down}_proj.weight,
  [F, D], [F, D] and [D, F]."""
  out = {}
  for key, value in state.items():
    if key.endswith(FUSED_GATE_UP):
      stem = key[:-len(FUSED_GATE_UP)]
      for e, fused in enumerate(value):
        gate, up = fused.chunk(2)
        out[f'{stem}mlp.experts.{e}.gate_proj.weight'] = gate
        out[f'{stem}mlp.experts.{e}.up_proj.weight'] = up
    elif key.endswith(FUSED_DOWN):
      stem = key[:-len(FUSED_DOWN)]
      for e, down in enumerate(value):
        out[f'{stem}mlp.experts.{e}.down_proj.weight'] = down
    else:
      out[key] = value
  return out


def fuse_experts(state: dict) -> dict:
  """The inverse of `unfuse_experts` for tensors: per-expert file tensors -> transformers'
  fused parameters."""
  experts, out = {}, {}
  for key, value in state.items():
    stem, found, rest = key.partition('mlp.experts.')
    if not found:
      out[key] = value
      continue
    expert, name, _ = rest.split('.')
    experts.setdefault(stem, {}).setdefault(name, {})[int(expert)] = value
  for stem, names in experts.items():
    order = sorted(names['down_proj'])
    out[stem + FUSED_GATE_UP] = torch.stack(
        [torch.cat([names['gate_proj'][e], names['up_proj'][e]]) for e in order])
    out[stem + FUSED_DOWN] = torch.stack([names['down_proj'][e] for e in order])
  return out


def build_modules(config: dict) -> dict:
  """The three Hugging Face modules of the checkpoint, with their own (to be replaced) weights."""
  audio = config['audio_config']
  language_model = causal_lm(config['text_config'])
  refined_head_stack = transformers.Qwen3Model(_qwen3_config(audio['crq_transformer_config']))
  del refined_head_stack.embed_tokens  # as the official does: it is fed inputs_embeds only
  encoder = modeling_qwen2_5_omni.Qwen2_5OmniAudioEncoder(
      configuration_qwen2_5_omni.Qwen2_5OmniAudioEncoderConfig(
          num_mel_bins=audio['num_mel_bins'], d_model=audio['d_model'],
          encoder_layers=audio['encoder_layers'],
          encoder_attention_heads=audio['encoder_attention_heads'],
          encoder_ffn_dim=audio['encoder_ffn_dim'], n_window=audio['n_window'],
          output_dim=audio['output_dim'], max_source_positions=audio['max_source_positions']))
  return {'language_model': language_model, 'refined_head_stack': refined_head_stack,
          'encoder': encoder}


PREFIXES = {'language_model': 'language_model.',
            'refined_head_stack': 'audio_invert_tower.crq_transformer.',
            'encoder': 'continuous_audio_tower.'}


def official_shapes(config: dict, modules: dict, with_srh_lm_head: bool) -> dict:
  """Official key -> shape, in the order the shards are filled."""
  shapes = {}
  for name in ('encoder', 'language_model', 'refined_head_stack'):
    for key, value in unfuse_experts(modules[name].state_dict()).items():
      if 'positional_embedding' not in key:  # a computed table, not in the official file
        shapes[PREFIXES[name] + key] = tuple(value.shape)
  hidden = config['text_config']['hidden_size']
  crq_hidden = config['audio_config']['crq_transformer_config']['hidden_size']
  codebook = config['audio_config']['codebook_size']
  group = config['audio_config']['group_size']
  shapes.update({
      'audio_tower.embed_tokens.weight': (codebook, hidden),
      'audio_tower.output_matching.weight': (hidden, hidden),
      'audio_tower.continual_output_matching.weight': (hidden, hidden),
      'audio_invert_tower.pre_matching.weight': (group * hidden, hidden),
      'audio_invert_tower.pre_matching.bias': (group * hidden,),
      'audio_invert_tower.input_matching.weight': (crq_hidden, hidden),
      'audio_invert_tower.output_matching.weight': (hidden, crq_hidden),
  })
  if with_srh_lm_head:
    shapes['audio_invert_tower.lm_head.weight'] = (codebook, hidden)
  return shapes


def _is_norm_scale(key: str) -> bool:
  return key.endswith('.weight') and ('norm' in key or 'ln_post' in key)


def random_tensors(shapes: dict, seed: int, dtype: torch.dtype) -> dict:
  """Key -> tensor in `dtype`: matrices normal / sqrt(fan_in); no bias zero, no norm scale one."""
  generator = torch.Generator().manual_seed(seed)
  tensors = {}
  for key in sorted(shapes):
    if key == 'audio_invert_tower.lm_head.weight':
      continue  # tied, copied below
    shape = shapes[key]
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) > 1:
      value = noise / float(np.prod(shape[1:])) ** 0.5
    else:
      offset = (0.3 if _is_norm_scale(key) else 0.2) * noise
      # At least 0.02 away, so that bfloat16 rounding cannot give a scale of one.
      offset = torch.where(offset < 0, -1.0, 1.0) * offset.abs().clamp(min=0.02)
      value = 1.0 + offset if _is_norm_scale(key) else offset
    tensors[key] = value.to(dtype)
  if 'audio_invert_tower.lm_head.weight' in shapes:
    tensors['audio_invert_tower.lm_head.weight'] = (
        tensors['audio_tower.embed_tokens.weight'].clone())
  return {key: tensors[key] for key in shapes}


def _header_allowance(key: str, shape: tuple) -> int:
  # Generous bound on one tensor's entry in the JSON header of a shard.
  return len(key) + 80 + 12 * len(shape)


def write_shards(out_dir: str, tensors: dict, max_shard_bytes: int) -> dict:
  """Greedy, in order, so each shard file is at most max_shard_bytes; returns the index."""
  shards, current, current_bytes = [], [], 64
  for key, tensor in tensors.items():
    size = tensor.numel() * tensor.element_size() + _header_allowance(key, tuple(tensor.shape))
    if current and current_bytes + size > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 64
    if current_bytes + size > max_shard_bytes:
      raise ValueError(f'{key} alone needs {size} bytes, over max_shard_bytes={max_shard_bytes}')
    current.append(key)
    current_bytes += size
  shards.append(current)
  weight_map = {}
  for i, keys in enumerate(shards, start=1):
    filename = f'model-{i:05d}-of-{len(shards):05d}.safetensors'
    path = os.path.join(out_dir, filename)
    safetensors.torch.save_file({k: tensors[k].contiguous() for k in keys}, path,
                                metadata={'format': 'pt'})
    if os.path.getsize(path) > max_shard_bytes:
      raise AssertionError(f'{filename}: {os.path.getsize(path)} bytes > {max_shard_bytes}')
    weight_map.update({k: filename for k in keys})
  total_size = sum(t.numel() * t.element_size() for t in tensors.values())
  index = {'metadata': {'total_size': total_size},
           'weight_map': dict(sorted(weight_map.items()))}
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump(index, f, indent=2)
  return index


def _byte_symbols() -> list[str]:
  """The byte-level BPE alphabet, indexed by byte value (printable bytes stand for themselves,
  the others are shifted past 255 so that every byte is a visible character)."""
  printable = (set(range(ord('!'), ord('~') + 1)) | set(range(ord('¡'), ord('¬') + 1))
               | set(range(ord('®'), ord('ÿ') + 1)))
  symbols, shifted = [], 0
  for byte in range(256):
    if byte in printable:
      symbols.append(chr(byte))
    else:
      symbols.append(chr(256 + shifted))
      shifted += 1
  return symbols


def build_tokenizer() -> tuple[tokenizers.Tokenizer, dict, list]:
  """A Qwen-style byte-level BPE over ids 0..289 with the added tokens of ADDED_TOKENS."""
  vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
  for left, right in MERGES:
    vocab[left + right] = len(vocab)
  if len(vocab) != min(ADDED_TOKENS):
    raise AssertionError(f'model vocab has {len(vocab)} entries; added tokens start at '
                         f'{min(ADDED_TOKENS)}')
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=list(MERGES)))
  tokenizer.normalizer = tokenizers.normalizers.NFC()
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
  for token_id in sorted(ADDED_TOKENS):
    tokenizer.add_special_tokens([tokenizers.AddedToken(
        ADDED_TOKENS[token_id], special=True, normalized=False)])
    if tokenizer.token_to_id(ADDED_TOKENS[token_id]) != token_id:
      raise AssertionError(f'{ADDED_TOKENS[token_id]} got id '
                           f'{tokenizer.token_to_id(ADDED_TOKENS[token_id])}, not {token_id}')
  return tokenizer, vocab, list(MERGES)


def write_tokenizer(out_dir: str) -> None:
  """tokenizer.json, tokenizer_config.json, vocab.json and merges.txt, as Qwen ships them."""
  tokenizer, vocab, merges = build_tokenizer()
  tokenizer.save(os.path.join(out_dir, 'tokenizer.json'))
  with open(os.path.join(out_dir, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(out_dir, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{left} {right}\n' for left, right in merges))
  added_tokens_decoder = {
      str(token_id): {'content': content, 'lstrip': False, 'normalized': False, 'rstrip': False,
                      'single_word': False, 'special': True}
      for token_id, content in sorted(ADDED_TOKENS.items())}
  tokenizer_config = {
      'add_bos_token': False, 'add_prefix_space': False,
      'added_tokens_decoder': added_tokens_decoder,
      'additional_special_tokens': [t for t in SPECIAL_IDS if t != '<|endoftext|>'],
      'bos_token': None, 'chat_template': CHAT_TEMPLATE, 'clean_up_tokenization_spaces': False,
      'eos_token': '<|im_end|>', 'errors': 'replace', 'model_max_length': 32768,
      'pad_token': '<|endoftext|>', 'split_special_tokens': False,
      'tokenizer_class': 'Qwen2Tokenizer', 'unk_token': None,
  }
  _write_json(out_dir, 'tokenizer_config.json', tokenizer_config)


def _write_json(out_dir: str, name: str, value: dict) -> None:
  with open(os.path.join(out_dir, name), 'w') as f:
    json.dump(value, f, indent=2)
    f.write('\n')


def write_processor_files(out_dir: str, config: dict) -> None:
  """processor_config.json, preprocessor_config.json (Whisper log-mel), generation_config.json."""
  _write_json(out_dir, 'processor_config.json',
              {'audio_group_size': config['audio_config']['group_size'],
               'processor_class': 'FunAudioChatProcessor'})
  _write_json(out_dir, 'preprocessor_config.json', {
      'chunk_length': 30, 'feature_extractor_type': 'WhisperFeatureExtractor',
      'feature_size': config['audio_config']['num_mel_bins'], 'hop_length': 160, 'n_fft': 400,
      'n_samples': 480000, 'nb_max_frames': 3000, 'padding_side': 'right', 'padding_value': 0.0,
      'processor_class': 'FunAudioChatProcessor', 'return_attention_mask': True,
      'sampling_rate': 16000})
  endoftext = config['text_config']['eos_token_id']
  _write_json(out_dir, 'generation_config.json', {
      '_from_model_config': True, 'bos_token_id': endoftext, 'eos_token_id': endoftext,
      'transformers_version': config['transformers_version'], 'use_cache': False})


def write_official_checkpoint(out_dir, *, seed=0, max_shard_bytes=200_000, with_srh_lm_head=False,
                              dtype=torch.float32, moe=False) -> dict:
  """Writes the tiny random official-layout checkpoint into out_dir (with `moe`, its LLM a
  Qwen3-MoE).

  Returns {'config', 'language_model', 'refined_head_stack', 'encoder' (float32 torch modules in
  eval mode holding the saved weights), 'tensors' (key -> float32 numpy of every saved tensor),
  'special_ids' (token text -> id)}.
  """
  if dtype not in DTYPE_NAMES:
    raise ValueError(f'dtype must be torch.float32 or torch.bfloat16, got {dtype}')
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  config = official_config(DTYPE_NAMES[dtype], moe)
  _write_json(out_dir, 'config.json', config)

  modules = build_modules(config)
  tensors = random_tensors(official_shapes(config, modules, with_srh_lm_head), seed, dtype)
  write_shards(out_dir, tensors, max_shard_bytes)
  as_float32 = {key: tensor.float() for key, tensor in tensors.items()}
  for name, prefix in PREFIXES.items():
    module = modules[name]
    module.load_state_dict(fuse_experts({key[len(prefix):]: value
                                         for key, value in as_float32.items()
                                         if key.startswith(prefix)}), strict=True)
    module.float().eval()

  write_tokenizer(out_dir)
  write_processor_files(out_dir, config)
  return {'config': copy.deepcopy(config), **modules,
          'tensors': {key: value.numpy() for key, value in as_float32.items()},
          'special_ids': dict(SPECIAL_IDS)}
