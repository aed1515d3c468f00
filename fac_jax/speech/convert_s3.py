"""Converts the released `speech_tokenizer_v3.onnx` to fac_jax's S3Tokenizer v3 (no torch needed).

The graph's weights carry anonymous names (`onnx::MatMul_2536`), so each is found by the name of
the node that consumes it (`/blocks.3/attn/query/MatMul`), as the s3tokenizer package's own
reader does; the FSMN kernels and the FSQ bias keep their names. Sizes are read from the file
(model width and mel bins from `/conv1/Conv`, depth from the `/blocks.N/` nodes), and the result
must be exactly the model's parameter set at those sizes: a missing, extra, doubly mapped,
misshapen or non-float32 tensor is refused by name.

  python -m fac_jax.speech.convert_s3 --onnx=speech_tokenizer_v3.onnx --out=DIR

DIR gets model.safetensors (with its index) and config.json; load it with
fac_jax.speech.s3tokenizer.S3Tokenizer.from_converted(DIR).
"""

import os
import re

from absl import app, flags
import numpy as np
import onnx
from onnx import numpy_helper

from fac_jax.speech import s3tokenizer, weights

# Node name -> parameter. 'input' names the node input holding the tensor; 'stored' takes the one
# stored input of more than one element (LayerNorm's eps Add has a scalar one; a bias Add may
# hold the bias on either side).
_NODE_RULES = [
    (r'/(conv[12])/Conv', 'Conv', {1: '{0}.kernel', 2: '{0}.bias'}),
    (r'/blocks\.(\d+)/(attn_ln|mlp_ln)/Mul', 'Mul', {1: 'blocks.{0}.{1}.scale'}),
    (r'/blocks\.(\d+)/(attn_ln|mlp_ln)/Add(?:_\d+)?', 'Add', {'stored': 'blocks.{0}.{1}.bias'}),
    (r'/blocks\.(\d+)/attn/(query|key|value|out)/MatMul', 'MatMul',
     {1: 'blocks.{0}.attn.{1}.kernel'}),
    (r'/blocks\.(\d+)/attn/(query|key|value|out)/Add', 'Add', {'stored': 'blocks.{0}.attn.{1}.bias'}),
    (r'/blocks\.(\d+)/mlp/mlp\.0/MatMul', 'MatMul', {1: 'blocks.{0}.mlp_up.kernel'}),
    (r'/blocks\.(\d+)/mlp/mlp\.0/Add', 'Add', {'stored': 'blocks.{0}.mlp_up.bias'}),
    (r'/blocks\.(\d+)/mlp/mlp\.2/MatMul', 'MatMul', {1: 'blocks.{0}.mlp_down.kernel'}),
    (r'/blocks\.(\d+)/mlp/mlp\.2/Add', 'Add', {'stored': 'blocks.{0}.mlp_down.bias'}),
    (r'.*quantizer.*', 'MatMul', {1: 'project_down.kernel'}),
]
_INITIALIZER_RULES = [
    (r'blocks\.(\d+)\.attn\.fsmn_block\.weight', 'blocks.{0}.attn.fsmn.kernel'),
    (r'quantizer\.project_in\.bias', 'project_down.bias'),
]
_BLOCK_NODE = re.compile(r'/blocks\.(\d+)/')
# ONNX Conv kernels are (out, in, taps); flax's are (taps, in, out). MatMul weights are already
# (in, out), a flax kernel's layout.
_CONV_AXES = (2, 1, 0)


class ConversionError(ValueError):
  """An ONNX file that is not exactly the S3Tokenizer v3 graph this converter reads."""


def _stored_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
  """Initializers and Constant-node values by tensor name (some exports keep biases as
  Constants)."""
  stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  for node in graph.node:
    if node.op_type == 'Constant':
      for attribute in node.attribute:
        if attribute.name == 'value':
          stored[node.output[0]] = numpy_helper.to_array(attribute.t)
  return stored


def _found_tensors(graph: onnx.GraphProto, stored: dict) -> dict[str, tuple[str, str]]:
  """Parameter name -> (ONNX tensor name, where it was found), by the rules above."""
  found = {}

  def add(param: str, tensor: str, where: str) -> None:
    if param in found:
      raise ConversionError(f'{param} is found twice: {found[param][1]} and {where}')
    found[param] = (tensor, where)

  for node in graph.node:
    for pattern, op_type, inputs in _NODE_RULES:
      match = re.fullmatch(pattern, node.name)
      if not match or node.op_type != op_type:
        continue
      for position, template in inputs.items():
        if position == 'stored':
          candidates = [name for name in node.input if name in stored and stored[name].size > 1]
          if len(candidates) > 1:
            raise ConversionError(f'node {node.name} has {len(candidates)} stored inputs '
                                  f'{candidates}; expected one ({template.format(*match.groups())})')
          tensor = candidates[0] if candidates else None
        else:
          tensor = node.input[position] if position < len(node.input) else None
        if tensor in stored:
          add(template.format(*match.groups()), tensor, f'input {tensor!r} of node {node.name}')
  for tensor in graph.initializer:
    for pattern, template in _INITIALIZER_RULES:
      match = re.fullmatch(pattern, tensor.name)
      if match:
        add(template.format(*match.groups()), tensor.name, f'initializer {tensor.name!r}')
  return found


def _sizes(graph: onnx.GraphProto, stored: dict, found: dict) -> s3tokenizer.S3Config:
  if 'conv1.kernel' not in found:
    raise ConversionError('missing conv1.kernel (input 1 of node /conv1/Conv): cannot read the '
                          'model width')
  shape = stored[found['conv1.kernel'][0]].shape
  if len(shape) != 3:
    raise ConversionError(f'conv1.kernel ({found["conv1.kernel"][1]}) has shape {shape}; '
                          'expected (width, mel bins, 3)')
  blocks = sorted({int(m.group(1)) for node in graph.node if (m := _BLOCK_NODE.match(node.name))})
  if not blocks:
    raise ConversionError('no /blocks.N/ nodes: not an S3Tokenizer graph')
  if blocks != list(range(len(blocks))):
    absent = sorted(set(range(blocks[-1])) - set(blocks))
    raise ConversionError(f'no /blocks.{absent[0]}/ nodes, yet nodes up to /blocks.{blocks[-1]}/')
  try:
    return s3tokenizer.S3Config(num_mel_bins=shape[1], dim=shape[0], num_layers=len(blocks))
  except ValueError as e:
    raise ConversionError(f'conv1.kernel ({found["conv1.kernel"][1]}) has shape {shape}: {e}')


def read_onnx(path: str) -> tuple[s3tokenizer.S3Config, dict[str, np.ndarray]]:
  """The sizes and the parameters (model names and layout, float32) of an S3Tokenizer v3 graph.
  Raises ConversionError, naming the file and the tensor, unless the graph holds exactly the
  expected tensors with the expected shapes."""
  try:
    graph = onnx.load(path).graph
    stored = _stored_tensors(graph)
    found = _found_tensors(graph, stored)
    cfg = _sizes(graph, stored, found)
    expected = s3tokenizer.param_shapes(cfg)
    for name, shape in expected.items():
      if name not in found:
        raise ConversionError(f'missing {name} (a {tuple(_onnx_layout(shape))} float32 tensor) '
                              f'for {cfg}')
    extra = sorted(set(found) - set(expected))
    if extra:
      raise ConversionError(f'unexpected tensor {extra[0]} ({found[extra[0]][1]}) for {cfg}')
    mapped = {tensor for tensor, _ in found.values()}
    unmapped = [t.name for t in graph.initializer if t.name not in mapped]
    if unmapped:
      raise ConversionError(f'unexpected initializer {unmapped[0]!r}: no parameter rule maps it')
    params = {}
    for name, shape in expected.items():
      tensor, where = found[name]
      array = stored[tensor]
      if array.dtype != np.float32:
        raise ConversionError(f'{name} ({where}) is {array.dtype}; expected float32')
      if array.shape != _onnx_layout(shape):
        raise ConversionError(f'{name} ({where}) has shape {array.shape}; expected '
                              f'{_onnx_layout(shape)} for {cfg}')
      params[name] = array.transpose(_CONV_AXES) if array.ndim == 3 else array
  except ConversionError as e:
    raise ConversionError(f'{path}: {e}') from None
  return cfg, params


def _onnx_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[axis] for axis in _CONV_AXES) if len(shape) == 3 else tuple(shape)


def convert(onnx_path: str, out: str) -> s3tokenizer.S3Config:
  """Writes the converted tokenizer to `out` (which must not exist); complete or not at all."""
  if os.path.exists(out):
    raise FileExistsError(f'{out} exists; refusing to overwrite it')
  cfg, params = read_onnx(onnx_path)
  source = {'file': os.path.basename(onnx_path), 'sha256': weights.sha256(onnx_path)}
  weights.write(out, params, s3tokenizer.config_json(cfg, source))
  return cfg


def _define_flags() -> None:
  """Command-line flags, defined only when this module is the program (it is also a library)."""
  flags.DEFINE_string('onnx', None, 'speech_tokenizer_v3.onnx', required=True)
  flags.DEFINE_string('out', None, 'Output folder (must not exist).', required=True)


def main(argv):
  del argv
  cfg = convert(flags.FLAGS.onnx, flags.FLAGS.out)
  print(f'{flags.FLAGS.onnx} -> {flags.FLAGS.out}: {cfg.num_layers} blocks, width {cfg.dim} '
        f'({cfg.num_heads} heads), {cfg.num_mel_bins} mel bins')


def run():
  """Console-script entry point."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
