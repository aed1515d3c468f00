"""int8 weights for serving, through qwix: the LLM's and the refined head's linear kernels stored
as int8 with a float scale per layer and output channel (qwix.quantize, absmax), turned back to
floats inside the jitted program (`merge`), so a model holds a quarter of float32's bytes there.
'w8a8' also quantises each linear layer's input per token at run time and multiplies int8 by int8
(qwix.dot_general). Embeddings, norms, the audio encoder and the adapters stay as stored.
"""

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

MODES = ('none', 'int8', 'w8a8')
QUANTIZED = ('llm', 'speech_refined_head')  # top-level parts whose linear kernels are int8


def _int8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                      **kwargs):
  """jax.lax.dot_general of int8 operands: each quantised with a scale per non-contracted
  index (the input per token, the kernel per output channel)."""
  del precision, kwargs
  (lhs_contracting, rhs_contracting), _ = dimension_numbers
  quantize = lambda x, contracting: qwix.quantize(
      x, jnp.int8, channelwise_axes=[a for a in range(x.ndim) if a not in contracting])
  out = qwix.dot_general(quantize(lhs, lhs_contracting), quantize(rhs, rhs_contracting),
                         dimension_numbers, preferred_element_type=preferred_element_type)
  return out.astype(preferred_element_type or lhs.dtype)


def quantized_kernel(kernel: jax.Array, qtype='int8') -> qwix.QArray:
  """A (stacked) kernel quantised as qwix quantises a matmul's weight: absmax, a scale per output
  channel and layer (QLoRA's base, fac_jax.model.lora, is stored the same way)."""
  return qwix.quantize(kernel, qtype, channelwise_axes=(*range(kernel.ndim - 2), kernel.ndim - 1))


def _is_quantized(path: tuple) -> bool:
  return path[0] in QUANTIZED and path[-1] == 'kernel'


def quantize_params(params: dict, mode: str) -> dict:
  """params with the LLM's and refined head's kernels as qwix QArrays (int8; scales per stacked
  layer and output channel); unchanged for 'none'."""
  if mode not in MODES:
    raise ValueError(f'quantize={mode!r}: expected one of {", ".join(MODES)}')
  if mode == 'none':
    return params

  def one(path, x):
    keys = tuple(k.key for k in path)
    return quantized_kernel(x) if _is_quantized(keys) else x
  return jax.tree_util.tree_map_with_path(one, params)


def quantize(model: nnx.Module, params: dict, mode: str) -> tuple[nnx.GraphDef, dict]:
  """The graphdef and params that serve `model` (an abstract one will do) with `params` in
  `mode`; run them with `merge`."""
  params = quantize_params(params, mode)
  if mode == 'w8a8':
    for path, module in nnx.iter_graph(model):
      if path and path[0] in QUANTIZED and isinstance(module, nnx.Linear):
        module.dot_general = _int8_dot_general
  graphdef, _ = nnx.split(model)
  return graphdef, params


def dequantize(params: dict) -> dict:
  return jax.tree.map(lambda x: qwix.dequantize(x) if isinstance(x, qwix.QArray) else x, params,
                      is_leaf=lambda x: isinstance(x, qwix.QArray))


def merge(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
  """nnx.merge of params that may hold int8 kernels (call it inside jit)."""
  return nnx.merge(graphdef, dequantize(params))


def nbytes(params: dict) -> dict:
  """Bytes of the quantised parts (int8 values and scales) and of everything else."""
  sizes = {'quantized_parts': 0, 'rest': 0}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    sizes['quantized_parts' if path[0].key in QUANTIZED else 'rest'] += \
        int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
  return sizes
