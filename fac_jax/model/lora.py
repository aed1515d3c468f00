"""LoRA and QLoRA through qwix: low-rank adapters beside chosen projections (qwix's LoraProvider
intercepts their matmuls and adds (alpha/rank)·x·A·B), and the fold W + (alpha/rank)·A·B.

The adapters live on the adapted nnx.Linear as qwix names them, `kernel_lora_a` (in, rank) and
`kernel_lora_b` (rank, out), with the leading layer axis of a scanned stack. They are created here
rather than by qwix's first call: qwix creates parameters while the model runs, which inside the
layer scan would create them on a transient copy of one layer. For the same reason QLoRA's base
kernels are quantised here, into qwix's own PTQ weight (`kernel/array/{qvalue,scale}`: int8 or int4
values, a scale per output channel of each layer), and stored that way: the frozen base then takes
a quarter (int8) or an eighth (int4) of its float32 bytes.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx
# qwix's PTQ weight types (qwix 0.1.8, pinned): what its LoraProvider takes as a quantised base.
from qwix._src.core import qarray
from qwix._src.providers import ptq

from fac_jax.model import fun_audio_chat, quantization

ADAPTER_NAMES = ('kernel_lora_a', 'kernel_lora_b')
BASE_QUANTIZATION = {'none': None, 'int8': 'int8', 'int4': 'int4'}
# The method every training objective (SFT, DPO, held-out loss) runs the model through.
INTERCEPTED_METHOD = 'target_nll'


def enabled(lora: ml_collections.ConfigDict) -> bool:
  return lora.rank > 0


def check(lora: ml_collections.ConfigDict) -> None:
  """Refuses settings qwix cannot use, naming the field."""
  if lora.rank < 0:
    raise ValueError(f'train.lora.rank={lora.rank}: expected 0 (off) or a positive rank')
  if lora.base_quantization not in BASE_QUANTIZATION:
    raise ValueError(f'train.lora.base_quantization={lora.base_quantization!r}: expected one of '
                     f'{sorted(BASE_QUANTIZATION)}')
  if lora.dropout != 0.0:
    raise ValueError(f'train.lora.dropout={lora.dropout}: only 0 is supported (the train step '
                     'takes no random key for qwix\'s adapter dropout)')
  try:
    re.compile(lora.targets)
  except re.error as e:
    raise ValueError(f'train.lora.targets={lora.targets!r}: not a regex ({e})') from None


def scale(lora: ml_collections.ConfigDict) -> float:
  return lora.alpha / lora.rank


def rule(lora: ml_collections.ConfigDict) -> qwix.LoraRule:
  """The one qwix rule: adapters on the modules whose path fully matches `targets`, the base
  weights of those modules quantised on use for QLoRA."""
  return qwix.LoraRule(module_path=lora.targets, rank=lora.rank, alpha=lora.alpha,
                       weight_qtype=BASE_QUANTIZATION[lora.base_quantization])


def adapted_modules(model: nnx.Module, targets: str) -> list[tuple[str, nnx.Linear]]:
  """(path, module) of the nnx.Linear modules that `targets` adapts, as qwix names paths."""
  found = [('/'.join(map(str, path)), module) for path, module in model.iter_modules()
           if isinstance(module, nnx.Linear)]
  return [(path, module) for path, module in found if re.fullmatch(targets, path)]


def add_adapters(model: fun_audio_chat.FunAudioChat, lora: ml_collections.ConfigDict,
                 seed: int = 0) -> fun_audio_chat.FunAudioChat:
  """`model` with adapters on the projections `lora.targets` names (A from qwix's initializer,
  B zero, so the adapted model starts equal to `model`), run through qwix's LoraProvider."""
  check(lora)
  targets = adapted_modules(model, lora.targets)
  if not targets:
    raise ValueError(f'train.lora.targets={lora.targets!r} matches no projection of the model '
                     '(paths such as llm/decoder/layers/attention/q_proj)')
  lora_rule = rule(lora)
  key = jax.random.key(seed)
  for path, module in targets:
    kernel = module.kernel
    *stack, fan_in, fan_out = kernel.value.shape
    *stack_axes, in_axis, out_axis = kernel.get_metadata()['logical_axes']
    key, a_key, b_key = jax.random.split(key, 3)
    a = lora_rule.lora_a_initializer(a_key, (*stack, fan_in, lora.rank), kernel.value.dtype)
    b = lora_rule.lora_b_initializer(b_key, (*stack, lora.rank, fan_out), kernel.value.dtype)
    module.kernel_lora_a = nnx.LoRAParam(a, logical_axes=(*stack_axes, in_axis, None))
    module.kernel_lora_b = nnx.LoRAParam(b, logical_axes=(*stack_axes, None, out_axis))
    if lora_rule.weight_qtype:
      q = quantization.quantized_kernel(kernel.value, lora_rule.weight_qtype)
      metadata = kernel.get_metadata()
      module.kernel = ptq.WithAux(qarray.QArray(
          qvalue=nnx.Param(q.qvalue, **metadata), scale=nnx.Param(q.scale, **metadata),
          qtype=q.qtype), _layer_how(lora_rule))
  return qwix.quantize_model(model, qwix.LoraProvider([lora_rule]),
                             methods=(INTERCEPTED_METHOD,), skip_nnx_init=True)


def _layer_how(lora_rule: qwix.LoraRule) -> qarray.HowToQuantize:
  """How qwix's PTQ quantises one layer's (in, out) kernel for x @ W: a scale per output."""
  return qarray.HowToQuantize(qtype=lora_rule.weight_qtype, channelwise_axes=[1],
                              calibration_method=lora_rule.weight_calibration_method)


def quantize_base(params: dict, lora: ml_collections.ConfigDict) -> dict:
  """An adapted model's parameter tree with QLoRA's base kernels in their stored form
  (`kernel` -> {'array': {'qvalue', 'scale'}}); unchanged without base_quantization."""
  qtype = BASE_QUANTIZATION[lora.base_quantization]
  if qtype is None:
    return params
  out = {}
  for name, node in params.items():
    if isinstance(node, dict):
      node = quantize_base(node, lora)
      if ADAPTER_NAMES[0] in node and not isinstance(node['kernel'], dict):
        q = quantization.quantized_kernel(node['kernel'], qtype)
        node['kernel'] = {'array': {'qvalue': q.qvalue, 'scale': q.scale}}
    out[name] = node
  return out


def create(cfg: ml_collections.ConfigDict, lora: ml_collections.ConfigDict,
           seed: int = 0) -> fun_audio_chat.FunAudioChat:
  return add_adapters(fun_audio_chat.create(cfg, seed), lora, seed)


def abstract_model(cfg: ml_collections.ConfigDict, lora: ml_collections.ConfigDict
                   ) -> fun_audio_chat.FunAudioChat:
  """The model a stage trains: with adapters when `lora` is enabled, shapes only."""
  if not enabled(lora):
    return fun_audio_chat.abstract_model(cfg)
  return nnx.eval_shape(lambda: create(cfg, lora))


def is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1] in ADAPTER_NAMES


def adapter_leaves(params: dict) -> dict:
  """The adapter leaves of a parameter tree, nested as in it."""
  out = {}
  for name, node in params.items():
    if isinstance(node, dict):
      inner = adapter_leaves(node)
      if inner:
        out[name] = inner
    elif name in ADAPTER_NAMES:
      out[name] = node
  return out


def fold_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale_: float) -> jax.Array:
  """W + scale·A·B in float32, cast back to W's dtype (a stack's leading axes batch)."""
  delta = jnp.einsum('...ir,...ro->...io', a.astype(jnp.float32), b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) + scale_ * delta).astype(kernel.dtype)


def fold(params: dict, lora: ml_collections.ConfigDict) -> dict:
  """A tree of adapted parameters with each adapter folded into its kernel and removed: the plain
  model's parameters, computing what the adapted model computes."""
  out = {}
  for name, node in params.items():
    if name in ADAPTER_NAMES:
      continue
    if isinstance(node, dict):
      node = fold(node, lora)
      if ADAPTER_NAMES[0] in params[name]:
        node['kernel'] = fold_kernel(node['kernel'], params[name][ADAPTER_NAMES[0]],
                                     params[name][ADAPTER_NAMES[1]], scale(lora))
    out[name] = node
  return out


def insert(params: dict, leaves: dict) -> dict:
  """`params` with the leaves of `leaves` (a nested subtree, e.g. adapters) added or replaced."""
  out = dict(params)
  for name, node in leaves.items():
    out[name] = insert(out.get(name, {}), node) if isinstance(node, dict) else node
  return out
