"""Where each of our parameters lives in the official PyTorch / Hugging Face checkpoint layout.

The one place that knows official names (DESIGN.md section 4). A PyTorch Linear weight [out, in]
is our kernel [in, out]; a Conv1d weight [out, in, k] is our kernel [k, in, out]; layers that we
stack on a leading axis are separate tensors there, one per layer.
"""

from collections.abc import Callable, Mapping
import dataclasses
import json

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorMap:
  path: tuple[str, ...]  # in our parameter tree
  keys: tuple[str, ...]  # official names: one, or one per stacked layer
  layout: str  # 'linear' | 'conv1d' | 'same'
  stacked: bool = False


def at_path(tree: Mapping, path: tuple[str, ...]):
  """The node of a nested dict at `path`."""
  for name in path:
    tree = tree[name]
  return tree


def relayout(array: np.ndarray, layout: str) -> np.ndarray:
  """Official layout -> ours, and ours -> official: both reversals are their own inverse."""
  return np.transpose(array) if layout in ('linear', 'conv1d') else array


def _linear(path, key, bias=False):
  maps = [TensorMap(path + ('kernel',), (f'{key}.weight',), 'linear')]
  if bias:
    maps.append(TensorMap(path + ('bias',), (f'{key}.bias',), 'same'))
  return maps


def _stacked(maps, num_layers, layer_prefix):
  """Per-layer maps (keys relative to a layer) -> stacked maps over num_layers layers."""
  return [TensorMap(m.path, tuple(f'{layer_prefix}.{i}.{m.keys[0]}' for i in range(num_layers)),
                    m.layout, stacked=True) for m in maps]


def decoder_stack_maps(cfg: ml_collections.ConfigDict, layer_prefix: str, norm_key: str,
                       path=()) -> list[TensorMap]:
  """A Qwen3 decoder stack: Hugging Face `Qwen3Model` names under `layer_prefix`."""
  layer = []
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    layer += _linear(('attention', name), f'self_attn.{name}')
  layer += [TensorMap(('attention', 'q_norm', 'scale'), ('self_attn.q_norm.weight',), 'same'),
            TensorMap(('attention', 'k_norm', 'scale'), ('self_attn.k_norm.weight',), 'same')]
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    layer += _linear(('mlp', name), f'mlp.{name}')
  layer += [TensorMap(('input_norm', 'scale'), ('input_layernorm.weight',), 'same'),
            TensorMap(('post_attention_norm', 'scale'), ('post_attention_layernorm.weight',),
                      'same')]
  maps = _stacked(layer, cfg.num_layers, layer_prefix)
  maps = [dataclasses.replace(m, path=path + ('layers',) + m.path) for m in maps]
  return maps + [TensorMap(path + ('final_norm', 'scale'), (norm_key,), 'same')]


def causal_lm_maps(cfg: ml_collections.ConfigDict, prefix: str = '', path=()) -> list[TensorMap]:
  """`Qwen3ForCausalLM` names: {prefix}model.embed_tokens, model.layers.N, model.norm, lm_head."""
  return ([TensorMap(path + ('embed_tokens', 'embedding'), (f'{prefix}model.embed_tokens.weight',),
                     'same')]
          + decoder_stack_maps(cfg, f'{prefix}model.layers', f'{prefix}model.norm.weight',
                               path + ('decoder',))
          + _linear(path + ('lm_head',), f'{prefix}lm_head'))


def encoder_maps(cfg: ml_collections.ConfigDict, prefix: str = '', path=()) -> list[TensorMap]:
  """Whisper-style encoder names (`Qwen2_5OmniAudioEncoder`, `continuous_audio_tower`)."""
  layer = []
  for name in ('q_proj', 'v_proj', 'out_proj'):
    layer += _linear((name,), f'self_attn.{name}', bias=True)
  for name in ('fc1', 'fc2'):
    layer += _linear((name,), name, bias=True)
  layer += _linear(('k_proj',), 'self_attn.k_proj')
  for ours, theirs in [('self_attn_norm', 'self_attn_layer_norm'),
                       ('mlp_norm', 'final_layer_norm')]:
    layer += [TensorMap((ours, 'scale'), (f'{theirs}.weight',), 'same'),
              TensorMap((ours, 'bias'), (f'{theirs}.bias',), 'same')]
  maps = [dataclasses.replace(m, path=path + ('layers',) + m.path)
          for m in _stacked(layer, cfg.num_layers, f'{prefix}layers')]
  for conv in ('conv1', 'conv2'):
    maps += [TensorMap(path + (conv, 'kernel'), (f'{prefix}{conv}.weight',), 'conv1d'),
             TensorMap(path + (conv, 'bias'), (f'{prefix}{conv}.bias',), 'same')]
  maps += [TensorMap(path + ('final_norm', 'scale'), (f'{prefix}ln_post.weight',), 'same'),
           TensorMap(path + ('final_norm', 'bias'), (f'{prefix}ln_post.bias',), 'same')]
  return maps + _linear(path + ('proj',), f'{prefix}proj', bias=True)


# Official tensors we read past: the encoder's audio_bos_eos_token is stored but never used, and
# the refined head's lm_head is tied to audio_tower.embed_tokens (and may be absent).
UNUSED_OFFICIAL_KEYS = ('continuous_audio_tower.audio_bos_eos_token.weight',
                        'audio_invert_tower.lm_head.weight')


def fun_audio_chat_maps(cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  """Every parameter of FunAudioChat and its official `FunAudioChatForConditionalGeneration` key."""
  return (
      encoder_maps(cfg.encoder, 'continuous_audio_tower.', ('continuous_encoder',))
      + [TensorMap(('adapters', 'code_embedding', 'embedding'),
                   ('audio_tower.embed_tokens.weight',), 'same')]
      + _linear(('adapters', 'code_projection'), 'audio_tower.output_matching')
      + _linear(('adapters', 'continuous_projection'), 'audio_tower.continual_output_matching')
      + causal_lm_maps(cfg.llm, 'language_model.', ('llm',))
      + _linear(('speech_refined_head', 'split_projection'), 'audio_invert_tower.pre_matching',
                bias=True)
      + _linear(('speech_refined_head', 'down_projection'), 'audio_invert_tower.input_matching')
      + decoder_stack_maps(cfg.speech_refined_head, 'audio_invert_tower.crq_transformer.layers',
                           'audio_invert_tower.crq_transformer.norm.weight',
                           ('speech_refined_head', 'decoder'))
      + _linear(('speech_refined_head', 'up_projection'), 'audio_invert_tower.output_matching'))


def load_params(tensors: Mapping[str, np.ndarray], maps: list[TensorMap]) -> dict:
  """Our nested parameter dict from official tensors held in memory (name -> array)."""
  missing = [k for m in maps for k in m.keys if k not in tensors]
  if missing:
    raise KeyError(f'official tensors missing {len(missing)} keys, first: {missing[:5]}')
  params: dict = {}
  for m in maps:
    node = params
    for name in m.path[:-1]:
      node = node.setdefault(name, {})
    full = (slice(None),) * (np.ndim(tensors[m.keys[0]]) + m.stacked)
    node[m.path[-1]] = read_block(tensors.__getitem__, m, full)
  return params


def config_from_official(hf_config: Mapping,
                         base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Our model config from an official config.json (`model_type: funaudiochat`)."""
  if hf_config.get('model_type') != 'funaudiochat':
    raise ValueError(f"config.json: model_type is {hf_config.get('model_type')!r}; expected "
                     "'funaudiochat'")
  cfg = ml_collections.ConfigDict(base.to_dict())
  text, audio = hf_config['text_config'], hf_config['audio_config']
  head = audio['crq_transformer_config']

  def decoder(c):
    return dict(num_layers=c['num_hidden_layers'], hidden_size=c['hidden_size'],
                num_heads=c['num_attention_heads'], num_kv_heads=c['num_key_value_heads'],
                head_dim=c.get('head_dim') or c['hidden_size'] // c['num_attention_heads'],
                mlp_dim=c['intermediate_size'], rope_theta=float(c['rope_theta']),
                norm_eps=c['rms_norm_eps'])

  cfg.llm.update(vocab_size=text['vocab_size'], **decoder(text))
  cfg.speech_refined_head.update(decoder(head))
  cfg.encoder.update(num_mel_bins=audio['num_mel_bins'], hidden_size=audio['d_model'],
                     num_layers=audio['encoder_layers'],
                     num_heads=audio['encoder_attention_heads'], mlp_dim=audio['encoder_ffn_dim'],
                     window_frames=2 * audio['n_window'],
                     max_positions=audio['max_source_positions'])
  cfg.speech.update(codebook_size=audio['codebook_size'], bos_id=audio['bos_token_id'],
                    eos_id=audio['eos_token_id'], pad_id=audio['pad_token_id'],
                    group_size=audio['group_size'])
  cfg.tokens.update(audio=hf_config['audio_token_index'], audio_bos=text['audio_bos_index'],
                    audio_eos=text['audio_eos_index'], sil=text['sil_index'],
                    endoftext=text.get('pad_token_id') or text['eos_token_id'])
  if audio.get('output_dim', text['hidden_size']) != text['hidden_size']:
    raise ValueError('config.json: audio_config.output_dim must equal text_config.hidden_size')
  return cfg


def official_shape(our_shape: tuple[int, ...], m: TensorMap) -> tuple[int, ...]:
  """Shape of one official tensor of map `m`, given our leaf's shape."""
  shape = tuple(our_shape[1:] if m.stacked else our_shape)
  return tuple(reversed(shape)) if m.layout in ('linear', 'conv1d') else shape


def read_block(read: Callable[[str], np.ndarray], m: TensorMap, index: tuple,
               dtype=None) -> np.ndarray:
  """The block `index` (slices in our layout) of our leaf for map `m`, as one contiguous array.

  Only that part of each official tensor is read. Stacked layers are copied one at a time into
  the result, so with memory-mapped tensors at most one layer's pages are mapped at once.
  """
  keys, index = (m.keys[index[0]], tuple(index[1:])) if m.stacked else (m.keys, tuple(index))
  their_index = tuple(reversed(index)) if m.layout in ('linear', 'conv1d') else index
  block = lambda key: relayout(read(key)[their_index], m.layout)
  if not m.stacked:
    return np.ascontiguousarray(block(keys[0]), dtype=dtype)
  first = block(keys[0])
  out = np.empty((len(keys),) + first.shape, dtype or first.dtype)
  out[0] = first
  del first
  for i, key in enumerate(keys[1:], start=1):
    out[i] = block(key)
  return out


def config_to_official(cfg: ml_collections.ConfigDict, template: Mapping) -> dict:
  """An official config.json: `template` (the imported original) with every field our config
  determines written from `cfg`."""
  out = json.loads(json.dumps(template))
  text, audio = out.setdefault('text_config', {}), out.setdefault('audio_config', {})
  head = audio.setdefault('crq_transformer_config', {})

  def decoder(c):
    return dict(num_hidden_layers=c.num_layers, hidden_size=c.hidden_size,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                head_dim=c.head_dim, intermediate_size=c.mlp_dim, rope_theta=c.rope_theta,
                rms_norm_eps=c.norm_eps)

  out['model_type'] = 'funaudiochat'
  out['hidden_size'] = cfg.llm.hidden_size
  out['audio_token_index'] = cfg.tokens.audio
  text.update(decoder(cfg.llm), vocab_size=cfg.llm.vocab_size,
              audio_bos_index=cfg.tokens.audio_bos, audio_eos_index=cfg.tokens.audio_eos,
              sil_index=cfg.tokens.sil)
  head.update(decoder(cfg.speech_refined_head))
  enc = cfg.encoder
  audio.update(num_mel_bins=enc.num_mel_bins, d_model=enc.hidden_size,
               encoder_layers=enc.num_layers, num_hidden_layers=enc.num_layers,
               encoder_attention_heads=enc.num_heads, encoder_ffn_dim=enc.mlp_dim,
               n_window=enc.window_frames // 2, max_source_positions=enc.max_positions,
               output_dim=cfg.llm.hidden_size, codebook_size=cfg.speech.codebook_size,
               bos_token_id=cfg.speech.bos_id, eos_token_id=cfg.speech.eos_id,
               pad_token_id=cfg.speech.pad_id, group_size=cfg.speech.group_size)
  return out
