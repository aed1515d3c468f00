"""Where each of our parameters lives in the official PyTorch / Hugging Face checkpoint layout.

The one place that knows official names (DESIGN.md section 4). A PyTorch Linear weight [out, in]
is our kernel [in, out]; a Conv1d weight [out, in, k] is our kernel [k, in, out]; layers that we
stack on a leading axis are separate tensors there, one per layer, and so are the experts of a
mixture-of-experts layer, which we stack on a second axis (Qwen3-MoE: `mlp.gate` the router,
`mlp.experts.{e}.{gate,up,down}_proj` the experts).
"""

from collections.abc import Callable, Mapping
import dataclasses
import itertools
import json
import re

import ml_collections
import numpy as np

from fac_jax.model import moe


@dataclasses.dataclass(frozen=True)
class TensorMap:
  path: tuple[str, ...]  # in our parameter tree
  keys: tuple[str, ...]  # official names: one, or one per entry of `stack` in C order
  layout: str  # 'linear' | 'conv1d' | 'same'
  # Sizes of our leaf's leading axes whose entries are separate official tensors: () for one
  # tensor, (layers,) for stacked layers, (layers, experts) for the experts of MoE layers.
  stack: tuple[int, ...] = ()


# Qwen3-MoE text config.json field -> our `moe` config field.
MOE_FIELDS = {'num_experts': 'num_experts', 'num_experts_per_tok': 'experts_per_token',
              'moe_intermediate_size': 'moe_mlp_dim', 'norm_topk_prob': 'norm_topk_prob',
              'decoder_sparse_step': 'decoder_sparse_step', 'mlp_only_layers': 'mlp_only_layers',
              'router_aux_loss_coef': 'router_aux_loss_coef'}


def _field_place(c: dict, name: str) -> tuple[dict, str]:
  """Where config dict `c` keeps field `name`: under its name, or where transformers 5 writes it
  (rope_theta inside rope_parameters, num_experts as num_local_experts)."""
  if name not in c:
    if name == 'num_experts' and 'num_local_experts' in c:
      return c, 'num_local_experts'
    if name == 'rope_theta' and 'rope_theta' in (c.get('rope_parameters') or {}):
      return c['rope_parameters'], 'rope_theta'
  return c, name


def official_field(c: Mapping, name: str, *default):
  """Field `name` of a transformers config dict wherever its version keeps it; `default` (or a
  KeyError naming the field) if absent."""
  node, key = _field_place(c, name)
  if key in node:
    return node[key]
  if default:
    return default[0]
  raise KeyError(name)


def set_official_field(c: dict, name: str, value) -> None:
  """Writes field `name` where `c` keeps it (under its name if nowhere yet)."""
  node, key = _field_place(c, name)
  node[key] = value


# An official expert tensor's name: its layer and expert.
EXPERT_KEY = re.compile(r'\.layers\.(\d+)\.mlp\.experts\.(\d+)\.')


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
  return [TensorMap(m.path, tuple(f'{layer_prefix}.{i}.{key}' for i in range(num_layers)
                                  for key in m.keys), m.layout, (num_layers,) + m.stack)
          for m in maps]


def _moe_layer_maps(moe_cfg: ml_collections.ConfigDict) -> list[TensorMap]:
  """One MoE layer (Qwen3-MoE `Qwen3MoeSparseMoeBlock`): the router, and each expert's SwiGLU
  projections as separate tensors that we stack on an expert axis."""
  maps = _linear(('moe', 'router'), 'mlp.gate')
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    maps.append(TensorMap(('moe', name), tuple(f'mlp.experts.{e}.{name}.weight'
                                               for e in range(moe_cfg.num_experts)),
                          'linear', (moe_cfg.num_experts,)))
  return maps


def decoder_stack_maps(cfg: ml_collections.ConfigDict, layer_prefix: str, norm_key: str,
                       path=()) -> list[TensorMap]:
  """A Qwen3 decoder stack: Hugging Face `Qwen3Model` names under `layer_prefix`."""
  layer = []
  for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    layer += _linear(('attention', name), f'self_attn.{name}')
  layer += [TensorMap(('attention', 'q_norm', 'scale'), ('self_attn.q_norm.weight',), 'same'),
            TensorMap(('attention', 'k_norm', 'scale'), ('self_attn.k_norm.weight',), 'same')]
  if moe.is_sparse_stack(cfg):  # a ValueError if it would mix dense and MoE layers
    layer += _moe_layer_maps(cfg.moe)
  else:
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
    full = (slice(None),) * (np.ndim(tensors[m.keys[0]]) + len(m.stack))
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
                mlp_dim=c['intermediate_size'],
                rope_theta=float(official_field(c, 'rope_theta')), norm_eps=c['rms_norm_eps'])

  cfg.llm.update(vocab_size=text['vocab_size'], **decoder(text))
  if official_field(text, 'num_experts', 0):  # Qwen3-MoE: every field read, none assumed
    cfg.llm.moe.update({ours: official_field(text, theirs) for theirs, ours in MOE_FIELDS.items()
                        if ours != 'mlp_only_layers'},
                       mlp_only_layers=tuple(official_field(text, 'mlp_only_layers')))
  else:
    cfg.llm.moe.num_experts = 0
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
  shape = tuple(our_shape[len(m.stack):])
  return tuple(reversed(shape)) if m.layout in ('linear', 'conv1d') else shape


def official_tensor(leaf: np.ndarray, m: TensorMap, i: int) -> np.ndarray:
  """The official tensor `m.keys[i]` out of our whole leaf (a view where the layout allows)."""
  return relayout(leaf[np.unravel_index(i, m.stack)] if m.stack else leaf, m.layout)


def read_block(read: Callable[[str], np.ndarray], m: TensorMap, index: tuple,
               dtype=None) -> np.ndarray:
  """The block `index` (slices in our layout) of our leaf for map `m`, as one contiguous array.

  Only that part of each official tensor is read. Stacked layers (and experts) are copied one
  tensor at a time into the result, so with memory-mapped tensors at most one tensor's pages are
  mapped at once beyond the result.
  """
  depth = len(m.stack)
  inner = tuple(index[depth:])
  their_index = tuple(reversed(inner)) if m.layout in ('linear', 'conv1d') else inner
  block = lambda key: relayout(read(key)[their_index], m.layout)
  if not depth:
    return np.ascontiguousarray(block(m.keys[0]), dtype=dtype)
  chosen = [range(*s.indices(n)) for s, n in zip(index[:depth], m.stack)]
  out = None
  for position in itertools.product(*(range(len(r)) for r in chosen)):
    value = block(m.keys[np.ravel_multi_index([r[p] for r, p in zip(chosen, position)],
                                              m.stack)])
    if out is None:
      out = np.empty(tuple(map(len, chosen)) + value.shape, dtype or value.dtype)
    out[position] = value
    del value
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
  fields = dict(decoder(cfg.llm), vocab_size=cfg.llm.vocab_size,
                audio_bos_index=cfg.tokens.audio_bos, audio_eos_index=cfg.tokens.audio_eos,
                sil_index=cfg.tokens.sil)
  moe_cfg = cfg.llm.get('moe')  # None in configs written before MoE
  if moe_cfg is not None and moe_cfg.num_experts:
    fields.update({theirs: moe_cfg[ours] for theirs, ours in MOE_FIELDS.items()},
                  model_type='qwen3_moe', mlp_only_layers=list(moe_cfg.mlp_only_layers))
  for name, value in fields.items():
    set_official_field(text, name, value)
  for name, value in decoder(cfg.speech_refined_head).items():
    set_official_field(head, name, value)
  enc = cfg.encoder
  audio.update(num_mel_bins=enc.num_mel_bins, d_model=enc.hidden_size,
               encoder_layers=enc.num_layers, num_hidden_layers=enc.num_layers,
               encoder_attention_heads=enc.num_heads, encoder_ffn_dim=enc.mlp_dim,
               n_window=enc.window_frames // 2, max_source_positions=enc.max_positions,
               output_dim=cfg.llm.hidden_size, codebook_size=cfg.speech.codebook_size,
               bos_token_id=cfg.speech.bos_id, eos_token_id=cfg.speech.eos_id,
               pad_token_id=cfg.speech.pad_id, group_size=cfg.speech.group_size)
  return out
