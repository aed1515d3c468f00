"""Model merging over parameter pytrees: linear (LM-Cocktail), task arithmetic, TIES, DARE, SLERP.

Every method is a function of one leaf (the base's and each fine-tune's values at one path), so
merging a checkpoint leaf by leaf from disk gives the same bits as merging whole trees in memory:
both call `merge_leaf`. Leaves are merged in float32 and cast back to the first fine-tune's dtype.
Leaves outside the `include`/`exclude` selection come unchanged from the first fine-tune.
"""

from collections.abc import Sequence
import functools
import math
import re
import zlib

import jax
import jax.numpy as jnp

from fac_jax.train import optim

COMPUTE_DTYPE = jnp.float32
# Cosine above which two leaves count as colinear and slerp falls back to linear interpolation.
SLERP_COLINEAR_COSINE = 1 - 1e-6


def linear(base: jax.Array, finetuned: Sequence[jax.Array], *,
           alpha: float | Sequence[float]) -> jax.Array:
  """LM-Cocktail: Σ_i α_i·ft_i + (1 − Σ_i α_i)·base, one weight per fine-tune."""
  alphas = tuple(alpha) if isinstance(alpha, (tuple, list)) else (alpha,)
  merged = (1 - sum(alphas)) * base
  for weight, model in zip(alphas, finetuned):
    merged = merged + weight * model
  return merged


def task_arithmetic(base: jax.Array, finetuned: Sequence[jax.Array], *,
                    scale: float = 1.0) -> jax.Array:
  """base + λ·Σ_i (ft_i − base)."""
  return base + scale * sum(model - base for model in finetuned)


def kth_largest_magnitude(x: jax.Array, k: int) -> jax.Array:
  """The k-th largest |x| (1 ≤ k, x.size < 2^31), exactly and without sorting: bisection over the
  bits of the float32 pattern, which orders non-negative floats as their values (31 counting
  passes, no copy of x beyond its bit pattern)."""
  bits = jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)

  def set_bit_if_enough_above(i, found):
    candidate = found | jnp.left_shift(jnp.int32(1), 30 - i)
    return jnp.where(jnp.sum(bits >= candidate) >= k, candidate, found)

  found = jax.lax.fori_loop(0, 31, set_bit_if_enough_above, jnp.int32(0))
  return jax.lax.bitcast_convert_type(found, jnp.float32)


def kept_count(density: float, size: int) -> int:
  """How many entries of a leaf of `size` entries TIES keeps at `density`."""
  return max(1, math.ceil(density * size))


def ties(base: jax.Array, finetuned: Sequence[jax.Array], *, density: float,
         scale: float = 1.0) -> jax.Array:
  """TIES-merging (Yadav et al. 2023): trim each task vector to its top `density` fraction by
  magnitude (ties at the threshold are kept), elect each entry's sign as that of the summed
  trimmed vectors, average the entries that agree with it, add λ times that to base."""
  k = kept_count(density, base.size)
  trimmed = []
  for model in finetuned:
    task = model - base
    trimmed.append(jnp.where(jnp.abs(task) >= kth_largest_magnitude(task, k), task, 0))
  elected = jnp.sign(sum(trimmed))
  agreeing = [(jnp.sign(t) == elected) & (t != 0) for t in trimmed]
  total = sum(jnp.where(a, t, 0) for a, t in zip(agreeing, trimmed))
  count = sum(a.astype(jnp.float32) for a in agreeing)
  return base + scale * total / jnp.maximum(count, 1)


def leaf_key(seed: int, name: str) -> jax.Array:
  """The random key of one leaf: from the seed and a stable hash of its path name, so it does not
  depend on the order or the set of leaves merged."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


def _keep_mask(key: jax.Array, index: int, shape, drop_rate: float) -> jax.Array:
  keep_rate = 1 - jnp.asarray(drop_rate, COMPUTE_DTYPE)  # in float32, traced or not
  return jax.random.bernoulli(jax.random.fold_in(key, index), keep_rate, shape)


def dare_keep_mask(seed: int, name: str, index: int, shape, drop_rate: float) -> jax.Array:
  """True where DARE keeps fine-tune `index`'s task-vector entry of leaf `name`."""
  return _keep_mask(leaf_key(seed, name), index, shape, drop_rate)


def dare(base: jax.Array, finetuned: Sequence[jax.Array], *, drop_rate: float, key: jax.Array,
         scale: float = 1.0) -> jax.Array:
  """DARE (Yu et al. 2023): drop each task-vector entry with probability p, rescale the kept ones
  by 1/(1 − p), then task arithmetic. `key` is the leaf's key (`leaf_key`)."""
  total = 0
  for index, model in enumerate(finetuned):
    keep = _keep_mask(key, index, base.shape, drop_rate)
    total = total + jnp.where(keep, (model - base) / (1 - drop_rate), 0)
  return base + scale * total


def slerp(base: jax.Array, finetuned: Sequence[jax.Array], *, alpha: float) -> jax.Array:
  """Spherical interpolation from base (α = 0) to the one fine-tune (α = 1), the leaf taken as a
  flat vector; linear interpolation where the two are nearly colinear or one is zero. (Sharded
  leaves sum the dot products in another order: results may differ in the last bit.)"""
  (model,) = finetuned
  base_norm, model_norm = jnp.linalg.norm(base), jnp.linalg.norm(model)
  cosine = jnp.vdot(base, model) / (base_norm * model_norm)
  colinear = (base_norm == 0) | (model_norm == 0) | (jnp.abs(cosine) > SLERP_COLINEAR_COSINE)
  theta = jnp.arccos(jnp.clip(jnp.where(colinear, 0, cosine), -1, 1))
  sin_theta = jnp.where(colinear, 1, jnp.sin(theta))
  base_weight = jnp.where(colinear, 1 - alpha, jnp.sin((1 - alpha) * theta) / sin_theta)
  model_weight = jnp.where(colinear, alpha, jnp.sin(alpha * theta) / sin_theta)
  return base_weight * base + model_weight * model


def lora(base, finetuned):
  """An adapter checkpoint folded onto its base (its leaves arrive folded: W + (alpha/rank)·A·B;
  fac_jax.merging.merge.AdapterLeaves)."""
  del base
  return finetuned[0]


METHODS = {'linear': linear, 'task_arithmetic': task_arithmetic, 'ties': ties, 'dare': dare,
           'slerp': slerp, 'lora': lora}
# The arguments each method takes (dare's `seed` becomes each leaf's key), with their defaults.
# Those in STATIC_ARGS are compiled in; the others are traced, so new values do not recompile.
STATIC_ARGS = ('density',)
METHOD_ARGS = {'linear': {'alpha': None}, 'task_arithmetic': {'scale': 1.0},
               'ties': {'density': None, 'scale': 1.0},
               'dare': {'drop_rate': None, 'scale': 1.0, 'seed': 0}, 'slerp': {'alpha': None},
               'lora': {}}


def _weights(alpha, count: int) -> tuple[float, ...]:
  alphas = tuple(map(float, alpha)) if isinstance(alpha, (tuple, list)) else (float(alpha),)
  if len(alphas) != count:
    raise ValueError(f'{len(alphas)} alpha weights for {count} fine-tuned models')
  return alphas


def method_args(method: str, num_finetuned: int, **args) -> dict:
  """The method's arguments with defaults filled in; refuses unknown methods, unknown, missing or
  out-of-range arguments, and fine-tune counts the method cannot take."""
  if method not in METHODS:
    raise ValueError(f'unknown merge method {method!r}; one of {sorted(METHODS)}')
  if num_finetuned < 1:
    raise ValueError('merging needs at least one fine-tuned model')
  if method == 'lora' and num_finetuned != 1:
    raise ValueError(f'lora folds one adapter checkpoint, not {num_finetuned}')
  unknown = sorted(set(args) - set(METHOD_ARGS[method]))
  if unknown:
    raise ValueError(f'{method} takes {sorted(METHOD_ARGS[method])}, not {unknown}')
  args = {**METHOD_ARGS[method], **args}
  missing = sorted(name for name, value in args.items() if value is None)
  if missing:
    raise ValueError(f'{method} needs {missing}')
  if method == 'linear':
    args['alpha'] = _weights(args['alpha'], num_finetuned)
  if method == 'slerp':
    if num_finetuned != 1:
      raise ValueError(f'slerp interpolates between base and one fine-tuned model, got '
                       f'{num_finetuned}')
    (args['alpha'],) = _weights(args['alpha'], 1)
  if method == 'ties' and not 0 < args['density'] <= 1:
    raise ValueError(f'ties: density must be in (0, 1], got {args["density"]}')
  if method == 'dare' and not 0 <= args['drop_rate'] < 1:
    raise ValueError(f'dare: drop_rate must be in [0, 1), got {args["drop_rate"]}')
  return args


def is_selected(name: str, include: str | None = None, exclude: str | None = None) -> bool:
  """Whether the leaf at path `name` is merged: `include` (default: all) and not `exclude`, each a
  regular expression searched in the name."""
  return ((include is None or re.search(include, name) is not None)
          and (exclude is None or re.search(exclude, name) is None))


@functools.partial(jax.jit, static_argnames=('method', 'static_args'))
def _merge_leaf(base, finetuned, traced_args, *, method, static_args):
  merged = METHODS[method](base.astype(COMPUTE_DTYPE),
                           [model.astype(COMPUTE_DTYPE) for model in finetuned],
                           **traced_args, **dict(static_args))
  return merged.astype(finetuned[0].dtype)


def merge_leaf(method: str, name: str, base: jax.Array, finetuned: Sequence[jax.Array],
               **args) -> jax.Array:
  """One leaf merged; `args` as checked by `method_args`. Jitted: one compilation per method,
  shapes and STATIC_ARGS."""
  args = method_args(method, len(finetuned), **args)
  if method == 'dare':
    args['key'] = leaf_key(args.pop('seed'), name)
  static_args = tuple((arg, args.pop(arg)) for arg in STATIC_ARGS if arg in args)
  return _merge_leaf(base, list(finetuned), args, method=method, static_args=static_args)


def merge_trees(method: str, base: dict, finetuned: Sequence[dict], *, include: str | None = None,
                exclude: str | None = None, **args) -> dict:
  """Merged parameter tree (nested dicts) of fine-tuned trees of one structure over `base`, which
  needs only the selected leaves."""
  args = method_args(method, len(finetuned), **args)
  structure = jax.tree.structure(finetuned[0])
  for i, tree in enumerate(finetuned[1:], start=1):
    if jax.tree.structure(tree) != structure:
      raise ValueError(f'fine-tuned tree {i} differs in structure from tree 0')

  def merge(path, *leaves):
    name = optim.path_name(path)
    if not is_selected(name, include, exclude):
      return leaves[0]
    base_leaf = base
    for key in path:
      if not isinstance(base_leaf, dict) or key.key not in base_leaf:
        raise KeyError(f'base has no leaf {name}, which the selection merges')
      base_leaf = base_leaf[key.key]
    return merge_leaf(method, name, base_leaf, leaves, **args)

  return jax.tree_util.tree_map_with_path(merge, *finetuned)
