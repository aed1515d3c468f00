"""The MoE LLM (fac_jax.model.moe) against transformers' Qwen3MoeForCausalLM and against a dense
reference that runs every expert on every token; its decode path against its full forward.

Tolerances (float32 throughout): logits within 1e-4 relative error (max |ours - theirs| /
max |theirs|, as tests/model/test_hf_parity.py); the router's chosen experts equal; the
load-balancing loss within 1e-6 relative of transformers' load_balancing_loss_func on the same
router logits, 1e-4 on our own forward's; the block's outputs and every gradient within 1e-5
relative of the dense reference, by ragged_dot and by the megablox kernel (Pallas interpret mode).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from fac_jax import config as config_lib
from fac_jax.data import conversation, synthetic
from fac_jax.inference import generate
from fac_jax.model import fun_audio_chat, moe, qwen3
from fac_jax.train import dpo, steps
from conftest import REPO
from official_tiny import KEY, greedy
from test_hf_parity import relative_error

# Hidden 40, 6 query heads over 2 kv heads of 12, 7 experts of width 28, 3 a token.
SIZES = dict(vocab=97, hidden=40, layers=3, heads=6, kv_heads=2, head_dim=12, experts=7,
             per_token=3, expert_width=28, rope_theta=7919.0)


def randomize(model: torch.nn.Module, seed: int):
  """Re-draws every parameter at unit scale per input (transformers' 0.02 makes a near-uniform
  router, under which any routing mistake would hide); norm scales around 1."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(noise / np.sqrt(p.shape[-1]) if p.ndim >= 2 else 1.0 + 0.3 * noise)


def hf_moe(norm_topk_prob: bool) -> Qwen3MoeForCausalLM:
  s = SIZES
  hf_config = Qwen3MoeConfig(
      vocab_size=s['vocab'], hidden_size=s['hidden'], num_hidden_layers=s['layers'],
      num_attention_heads=s['heads'], num_key_value_heads=s['kv_heads'], head_dim=s['head_dim'],
      num_experts=s['experts'], num_experts_per_tok=s['per_token'],
      moe_intermediate_size=s['expert_width'], intermediate_size=53,
      norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
      rope_parameters={'rope_type': 'default', 'rope_theta': s['rope_theta']},
      max_position_embeddings=128, tie_word_embeddings=False, attention_dropout=0.0)
  hf_config._attn_implementation = 'eager'
  hf_config._experts_implementation = 'eager'
  torch.manual_seed(0)
  model = Qwen3MoeForCausalLM(hf_config).eval()
  randomize(model, seed=1)
  return model


def our_config(norm_topk_prob: bool):
  s = SIZES
  cfg = config_lib.decoder_config(num_layers=s['layers'], hidden_size=s['hidden'],
                                  num_heads=s['heads'], num_kv_heads=s['kv_heads'],
                                  head_dim=s['head_dim'], mlp_dim=53, rope_theta=s['rope_theta'])
  cfg.vocab_size = s['vocab']
  cfg.moe.update(num_experts=s['experts'], experts_per_token=s['per_token'],
                 moe_mlp_dim=s['expert_width'], norm_topk_prob=norm_topk_prob)
  return cfg


def our_moe(hf_model, cfg) -> qwen3.CausalLM:
  """Our LM with the torch model's weights, copied here by hand (transformers fuses each layer's
  experts: gate_up_proj (E, 2F, D), down_proj (E, D, F))."""
  tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  layer = lambda name: np.stack([tensors[f'model.layers.{i}.{name}']
                                 for i in range(cfg.num_layers)])
  width = cfg.moe.moe_mlp_dim
  gate_up = layer('mlp.experts.gate_up_proj')
  params = {
      'embed_tokens': {'embedding': tensors['model.embed_tokens.weight']},
      'lm_head': {'kernel': tensors['lm_head.weight'].T},
      'decoder': {'final_norm': {'scale': tensors['model.norm.weight']}, 'layers': {
          'input_norm': {'scale': layer('input_layernorm.weight')},
          'post_attention_norm': {'scale': layer('post_attention_layernorm.weight')},
          'attention': {
              **{f'{p}_proj': {'kernel': layer(f'self_attn.{p}_proj.weight').transpose(0, 2, 1)}
                 for p in 'qkvo'},
              **{f'{p}_norm': {'scale': layer(f'self_attn.{p}_norm.weight')} for p in 'qk'}},
          'moe': {'router': {'kernel': layer('mlp.gate.weight').transpose(0, 2, 1)},
                  'gate_proj': gate_up[:, :, :width].transpose(0, 1, 3, 2),
                  'up_proj': gate_up[:, :, width:].transpose(0, 1, 3, 2),
                  'down_proj': layer('mlp.experts.down_proj').transpose(0, 1, 3, 2)}}}}
  abstract = nnx.eval_shape(lambda: qwen3.CausalLM(cfg, dtype=jnp.float32,
                                                   param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
  assert jax.tree.map(np.shape, params) == expected
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def our_router_logits(model: qwen3.CausalLM, ids, positions, segment_ids) -> np.ndarray:
  _, router_logits = model.decoder.forward(model.embed_tokens(jnp.asarray(ids)),
                                           jnp.asarray(positions), jnp.asarray(segment_ids))
  return np.asarray(router_logits)


@pytest.mark.parametrize('norm_topk_prob', [True, False])
def test_packed_segments_match_hf_alone_with_the_same_experts(norm_topk_prob):
  hf_model = hf_moe(norm_topk_prob)
  cfg = our_config(norm_topk_prob)
  ours = our_moe(hf_model, cfg)
  rng = np.random.default_rng(3)
  lengths = (9, 14)
  seqs = [rng.integers(0, SIZES['vocab'], size=(1, n)) for n in lengths]
  ids = np.concatenate(seqs, axis=1)
  segment_ids = np.concatenate([np.full((1, n), s + 1) for s, n in enumerate(lengths)], axis=1)
  positions = np.concatenate([np.arange(n)[None] for n in lengths], axis=1)
  logits = np.asarray(ours(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segment_ids)))
  router_logits = our_router_logits(ours, ids, positions, segment_ids)  # (L, 1, T, E)
  chosen = np.sort(np.asarray(moe.route(router_logits, SIZES['per_token'], norm_topk_prob)[1]),
                   axis=-1)

  start = 0
  for seq, n in zip(seqs, lengths):
    with torch.no_grad():
      out = hf_model(input_ids=torch.from_numpy(seq), output_router_logits=True)
    err = relative_error(logits[:, start:start + n], out.logits.numpy())
    print(f'segment of {n}: max relative error {err:.3g}')
    assert err <= 1e-4
    hf_chosen = np.stack([torch.topk(torch.softmax(layer_logits, -1), SIZES['per_token'])[1]
                          .numpy() for layer_logits in out.router_logits])  # (L, n, k)
    np.testing.assert_array_equal(chosen[:, 0, start:start + n], np.sort(hf_chosen, axis=-1))
    start += n


def test_load_balancing_loss_matches_hf_with_padding():
  hf_model = hf_moe(True)
  cfg = our_config(True)
  ours = our_moe(hf_model, cfg)
  rng = np.random.default_rng(4)
  ids = rng.integers(0, SIZES['vocab'], size=(2, 13))
  mask = np.ones((2, 13), np.int64)
  mask[1, 8:] = 0  # row 1: 8 tokens, then padding
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   output_router_logits=True)
  theirs = float(out.aux_loss)
  assert theirs == pytest.approx(float(load_balancing_loss_func(
      out.router_logits, SIZES['experts'], SIZES['per_token'], torch.from_numpy(mask))))
  valid = jnp.asarray(mask > 0)
  metrics = lambda logits: moe.router_metrics(jnp.asarray(logits), valid, SIZES['per_token'],
                                              0.001)
  # transformers' own router logits, (L, B * T, E) -> (L, B, T, E): the definition alone.
  hf_logits = np.stack([layer.numpy() for layer in out.router_logits]).reshape(
      SIZES['layers'], 2, 13, SIZES['experts'])
  assert float(metrics(hf_logits)['router_aux_loss']) == pytest.approx(theirs, rel=1e-6)
  # Our forward's (padding as segment 0).
  positions = np.broadcast_to(np.arange(13), (2, 13))
  ours_metrics = metrics(our_router_logits(ours, ids, positions, mask))
  assert float(ours_metrics['router_aux_loss']) == pytest.approx(theirs, rel=1e-4)
  assert float(ours_metrics['router_loss']) == pytest.approx(0.001 * theirs, rel=1e-4)
  share = np.asarray(ours_metrics['router/expert_share'])
  assert share.shape == (SIZES['layers'], SIZES['experts'])
  np.testing.assert_allclose(share.sum(axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ours_metrics['router/load_max_over_mean'],
                             share.max(axis=-1) * SIZES['experts'], rtol=1e-6)
  assert (0 < np.asarray(ours_metrics['router/entropy'])).all()
  assert (np.asarray(ours_metrics['router/entropy']) < np.log(SIZES['experts'])).all()


# ---------------------------------------------------------------------------------------------
# The block against every expert on every token


def dense_reference(params: dict, x, experts_per_token: int, norm_topk_prob: bool):
  """Every expert on every token, each output weighted by the token's routing weight for that
  expert (0 where not chosen)."""
  tokens = x.reshape(-1, x.shape[-1])
  probs = jax.nn.softmax(tokens @ params['router']['kernel'], axis=-1)
  top, chosen = jax.lax.top_k(probs, experts_per_token)
  if norm_topk_prob:
    top = top / top.sum(axis=-1, keepdims=True)
  routing = jnp.zeros_like(probs).at[jnp.arange(len(tokens))[:, None], chosen].set(top)
  gate = jnp.einsum('nd,edf->nef', tokens, params['gate_proj'])
  up = jnp.einsum('nd,edf->nef', tokens, params['up_proj'])
  every = jnp.einsum('nef,efd->ned', jax.nn.silu(gate) * up, params['down_proj'])
  return jnp.einsum('ne,ned->nd', routing, every).reshape(x.shape)


def block_and_inputs(norm_topk_prob=True):
  cfg = our_config(norm_topk_prob)
  block = moe.SparseMoe(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(5))
  graphdef, state = nnx.split(block)
  params = nnx.to_pure_dict(state)
  params['router']['kernel'] = params['router']['kernel'] * 4  # confident, uneven routing
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 11, SIZES['hidden'])), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  return graphdef, params, x, cotangent


@pytest.mark.parametrize('kernel', ['ragged_dot', 'megablox'])
def test_block_values_and_gradients_match_every_expert_reference(kernel):
  """megablox: TPU's grouped matmul run by Pallas's interpreter on CPU."""
  graphdef, params, x, cotangent = block_and_inputs()

  def ours(params, x):
    return nnx.merge(graphdef, params)(x, kernel)[0]

  def reference(params, x):
    return dense_reference(params, x, SIZES['per_token'], True)

  values = {name: f(params, x) for name, f in (('ours', ours), ('reference', reference))}
  grads = {name: jax.grad(lambda p, x: jnp.sum(f(p, x) * cotangent), argnums=(0, 1))(params, x)
           for name, f in (('ours', ours), ('reference', reference))}
  assert relative_error(values['ours'], values['reference']) <= 1e-5
  errors = jax.tree.map(relative_error, grads['ours'], grads['reference'])
  print(f'{kernel}: gradient relative errors {errors}')
  assert max(jax.tree.leaves(errors)) <= 1e-5
  # Every parameter gets a gradient: the router through the routing weights.
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['ours']))


def test_a_stack_mixing_dense_and_moe_layers_is_refused():
  cfg = our_config(True)
  cfg.moe.decoder_sparse_step = 2
  with pytest.raises(ValueError, match='moe.decoder_sparse_step=2'):
    moe.is_sparse_stack(cfg)
  cfg.moe.update(decoder_sparse_step=1, mlp_only_layers=(0,))
  with pytest.raises(ValueError, match=r'moe.mlp_only_layers=\(0,\)'):
    moe.is_sparse_stack(cfg)
  cfg.moe.num_experts = 0
  assert not moe.is_sparse_stack(cfg)


# ---------------------------------------------------------------------------------------------
# The tiny MoE Fun-Audio-Chat's generation (its decoder stack's KV cache: tests/model/test_kv_cache.py)


@pytest.fixture(scope='module')
def tiny_moe():
  """configs/tiny.py:moe's model config, graph definition and random parameters."""
  cfg = config_lib.load(os.path.join(REPO, 'configs', 'tiny.py:moe')).model
  graphdef, state = nnx.split(fun_audio_chat.create(cfg, seed=3))
  return cfg, graphdef, nnx.to_pure_dict(state)


def test_generation_matches_the_full_forward(tiny_moe):
  """The cached loop's text logits at its first two decode steps equal the full (uncached)
  forward over the prompt and the inputs generated so far, within 1e-4 relative."""
  cfg, graphdef, params = tiny_moe
  pieces = synthetic.conversation_pieces(np.random.default_rng(8), cfg)[:3]
  pieces.append(conversation.Text([cfg.tokens.audio_bos], trained=False))
  prompt = conversation.prompt_batch([conversation.format_conversation(pieces, cfg)], cfg)
  model = nnx.merge(graphdef, params)
  gen = dataclasses.replace(greedy(3), return_logits=True)
  out = jax.device_get(generate.make_generate_fn(graphdef, cfg, gen)(params, prompt, KEY))
  text, codes = out['text'][0], out['speech'][0]
  inputs = model.embed_inputs(jax.tree.map(jnp.asarray, prompt), training=False)[0][0]
  for t in (1, 2):
    previous = model.llm.embed_tokens(jnp.asarray(text[t - 1]))
    x = previous if t == 1 else (previous + model.adapters.group_codes(jnp.asarray(codes[t - 2]))) / 2
    inputs = jnp.concatenate([inputs, x[None]])
    n = inputs.shape[0]
    hidden = model.llm.decoder(inputs[None], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
    full = np.asarray(model.llm.lm_head(hidden[0, -1]))
    assert relative_error(out['text_logits'][0, t], full) <= 1e-4


# ---------------------------------------------------------------------------------------------
# The load-balancing loss in the training objectives


def test_sliced_train_step_adds_each_slices_router_loss(tiny_moe):
  """With grad_accum_steps=2 the text and speech losses equal the whole batch's (rel 1e-5) and
  router_aux_loss is the slices' own, weighted by their non-padding positions (rel 1e-5); in
  both, loss = text_loss + speech_loss + router_loss and router_loss = 0.001 x router_aux_loss."""
  cfg, graphdef, params = tiny_moe
  batch = synthetic.batch(np.random.default_rng(9), cfg, batch_size=4, seq_len=48, num_windows=8)
  optimizer = optax.sgd(0.1)
  results = {}
  for slices in (1, 2):
    step = jax.jit(steps.make_train_step(graphdef, optimizer, grad_accum_steps=slices))
    results[slices] = jax.device_get(step(params, optimizer.init(params), batch)[2])
  halves = [jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch) for i in (0, 1)]
  loss_fn = jax.jit(lambda p, b: steps.loss_fn(graphdef, p, b)[1])
  positions = np.array([(half['segment_ids'] > 0).sum() for half in halves], np.float64)
  expected = sum(float(loss_fn(params, half)['router_aux_loss']) * n
                 for half, n in zip(halves, positions)) / positions.sum()
  whole, sliced = results[1], results[2]
  assert sliced['router_aux_loss'] == pytest.approx(expected, rel=1e-5)
  for name in ('text_loss', 'speech_loss'):
    assert sliced[name] == pytest.approx(whole[name], rel=1e-5)
  for metrics in (whole, sliced):
    assert metrics['router_loss'] == pytest.approx(0.001 * metrics['router_aux_loss'], rel=1e-6)
    assert metrics['loss'] == pytest.approx(
        metrics['text_loss'] + metrics['speech_loss'] + metrics['router_loss'], rel=1e-6)
    assert metrics['router/expert_share'].shape == (cfg.llm.num_layers, cfg.llm.moe.num_experts)


def test_dpo_step_adds_the_policys_router_loss(tiny_moe):
  """DPO over row slices: loss = dpo_loss + sft_weight x sft_loss + router_loss (rel 1e-6)."""
  cfg, graphdef, params = tiny_moe
  rng = np.random.default_rng(10)
  answers = {name: synthetic.batch(rng, cfg, batch_size=2, seq_len=48, num_windows=8)
             for name in ('chosen', 'rejected')}
  batch = {**answers, 'task_ids': np.array([0, 4], np.int32)}
  dpo_cfg = config_lib.default_config().dpo
  dpo_cfg.sft_weight = 0.5
  step = jax.jit(dpo.make_dpo_step(graphdef, optax.sgd(0.1), dpo_cfg, grad_accum_steps=2))
  metrics = jax.device_get(step(params, optax.sgd(0.1).init(params), params, batch)[2])
  assert metrics['router_aux_loss'] > 0
  assert metrics['loss'] == pytest.approx(
      metrics['dpo_loss'] + 0.5 * metrics['sft_loss'] + metrics['router_loss'], rel=1e-6)
