"""The Fun-Audio-Chat model: speech encoders, DRSR grouping adapters, shared LLM, refined head.

Data flow (DESIGN.md section 1): user audio -> continuous encoder -> 25 Hz vectors -> mean of 5 ->
projection; assistant speech codes -> embedding -> mean of 5 -> projection; at assistant audio
positions the LLM input is (E(text) + G) / 2. The LLM's hidden state h_p gives the text logits
for t_{p+1} and, through the speech refined head run at 25 Hz, the 5 codes of group p+1.
"""

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections
import optax

from fac_jax.batch import IGNORE_ID
from fac_jax.model import audio_encoder, layers, moe, qwen3


class GroupingAdapters(nnx.Module):
  """DRSR input side: groups of 5 speech vectors -> one LLM position.

  The speech-code embedding is also the refined head's output matrix (a declared weight tie).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.llm.hidden_size
    self.pad_id = cfg.speech.pad_id
    self.code_embedding = layers.embed(cfg.speech.codebook_size, d, ('speech_vocab', 'embed'), **kw)
    self.code_projection = layers.linear(d, d, ('embed', 'embed'), **kw)
    self.continuous_projection = layers.linear(d, d, ('embed', 'embed'), **kw)

  def embed_codes(self, codes: jax.Array) -> jax.Array:
    """Code embeddings. As through the official nn.Embedding(padding_idx=pad), a pad lookup sends
    no gradient to the pad row; the refined head's tied output still does."""
    embeds = self.code_embedding(codes)
    return jnp.where((codes == self.pad_id)[..., None], jax.lax.stop_gradient(embeds), embeds)

  def group_codes(self, codes: jax.Array) -> jax.Array:
    """(..., 5) codes -> (..., D): mean of the 5 code embeddings, projected."""
    return self.code_projection(self.embed_codes(codes).mean(axis=-2))

  def group_frames(self, frames: jax.Array, frame_index: jax.Array) -> jax.Array:
    """frames (B, N, D), frame_index (B, S, 5) with -1 for a zero frame -> (B, S, D)."""
    gathered = jnp.take_along_axis(frames[:, None], jnp.maximum(frame_index, 0)[..., None],
                                   axis=2)
    gathered = jnp.where(frame_index[..., None] >= 0, gathered, 0)
    return self.continuous_projection(gathered.mean(axis=-2))


class SpeechRefinedHead(nnx.Module):
  """DRSR output side: each LLM state -> 5 sub-slots -> causal Qwen3 stack at 25 Hz -> codes."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, head_cfg, group = cfg.llm.hidden_size, cfg.speech_refined_head, cfg.speech.group_size
    self.group_size = group
    self.split_projection = layers.linear(d, group * d, ('embed', 'group_embed'), use_bias=True,
                                          **kw)
    self.down_projection = layers.linear(d, head_cfg.hidden_size, ('embed', 'embed'), **kw)
    self.decoder = qwen3.DecoderStack(head_cfg, remat_policy=cfg.remat_policy,
                                      attention=cfg.get('attention', 'auto'), **kw)
    self.up_projection = layers.linear(head_cfg.hidden_size, d, ('embed', 'embed'), **kw)

  def split(self, states: jax.Array) -> jax.Array:
    """(B, S, D) -> (B, S * 5, D): sub-slot (p, j) at flat index 5p + j."""
    batch, length, d = states.shape
    return self.split_projection(states).reshape(batch, length * self.group_size, d)

  def __call__(self, inputs, positions, segment_ids, code_embedding: nnx.Embed):
    """inputs (B, 5S, D): split states plus previous-code embeddings -> logits (B, 5S, codes)."""
    return self.logits(self.states(inputs, positions, segment_ids), code_embedding)

  def states(self, inputs, positions, segment_ids) -> jax.Array:
    """__call__ up to the output layers: the decoder's final-normed states (B, 5S, head D)."""
    group = self.group_size
    sub_positions = (positions[..., None] * group + jnp.arange(group)).reshape(inputs.shape[:2])
    return self.decoder(self.down_projection(inputs), sub_positions,
                        jnp.repeat(segment_ids, group, axis=1))

  def logits(self, states: jax.Array, code_embedding: nnx.Embed) -> jax.Array:
    """The output layers: (..., head D) states -> up-projection -> tied code logits (..., codes)."""
    return code_embedding.attend(self.up_projection(states))

  def prefill(self, inputs, positions, segment_ids, cache, code_embedding: nnx.Embed):
    """decode's first call, over an empty cache, by the attention kernel (DecoderStack.prefill):
    segment_ids (B, T) are 0 on padding and 1 on the prompt's sub-slots."""
    hidden, cache = self.decoder.prefill(self.down_projection(inputs), positions, segment_ids,
                                         cache)
    return self.logits(hidden, code_embedding), cache

  def decode(self, inputs, positions, cache, valid_slots, code_embedding: nnx.Embed):
    """Incremental form of __call__ over the head's KV cache: inputs (B, T, D) for the next T
    sub-slots at 25 Hz positions (B, T) -> (logits (B, T, codes), cache)."""
    hidden, cache = self.decoder.decode(self.down_projection(inputs), positions, cache,
                                        valid_slots)
    return self.logits(hidden, code_embedding), cache


class FunAudioChat(nnx.Module):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.speech_pad_id = cfg.speech.pad_id
    # Checkpoints written before the field have no loss_chunk_positions in their config.
    self.loss_chunk_positions = cfg.get('loss_chunk_positions', 0)
    self.user_audio_scale = 0.5 if cfg.halve_user_audio else 1.0
    # Checkpoints written before model.attention have none in their config.
    attention = cfg.get('attention', 'auto')
    if moe.is_sparse_stack(cfg.speech_refined_head):
      raise ValueError('model.speech_refined_head.moe.num_experts: the refined head is dense; '
                       'only model.llm may be MoE')
    if moe.is_sparse_stack(cfg.llm):
      self.experts_per_token = cfg.llm.moe.experts_per_token
      self.router_aux_loss_coef = cfg.llm.moe.router_aux_loss_coef
    self.continuous_encoder = audio_encoder.ContinuousSpeechEncoder(
        cfg.encoder, cfg.llm.hidden_size, remat_policy=cfg.remat_policy, attention=attention,
        **kw)
    self.adapters = GroupingAdapters(cfg, **kw)
    self.llm = qwen3.CausalLM(cfg.llm, remat_policy=cfg.remat_policy, attention=attention, **kw)
    self.speech_refined_head = SpeechRefinedHead(cfg, **kw)

  def embed_inputs(self, batch: dict, training: bool = True) -> tuple[jax.Array, jax.Array]:
    """LLM input embeddings (B, S, D), and the text embeddings the refined head sees.

    At inference (training=False) user audio is never halved and the refined head sees the
    embedding of every input token, <|AUDIO|> included, as the official generation does.
    """
    text = self.llm.embed_tokens(batch['input_ids'])
    groups = self.adapters.group_codes(batch['speech_codes'])
    if batch['mel'].shape[1]:
      frames = self.continuous_encoder(batch['mel'], batch['mel_lengths'])
      continuous = self.adapters.group_frames(frames.astype(groups.dtype),
                                              batch['continuous_frames'])
      groups = jnp.where(batch['continuous_mask'][..., None], continuous, groups)
    text_mask = batch['text_mask'][..., None]
    user_audio_scale = self.user_audio_scale if training else 1.0
    audio = jnp.where(text_mask, (text + groups) / 2, groups * user_audio_scale)
    audio_mask = batch['audio_mask'][..., None]
    inputs = jnp.where(audio_mask, audio, text)
    head_text = jnp.where(audio_mask & ~text_mask, 0, text) if training else text
    return inputs, head_text

  def speech_head_inputs(self, hidden, head_text, speech_targets) -> jax.Array:
    """Teacher-forced refined-head input (B, 5S, D): split(h_p + E(t_p)) + E(previous code).

    The previous code of flat sub-slot i is the target of sub-slot i - 1 (pad where ignored).
    """
    split = self.speech_refined_head.split(hidden + jax.lax.stop_gradient(head_text))
    flat_targets = speech_targets.reshape(speech_targets.shape[0], -1)
    previous = jnp.pad(flat_targets[:, :-1], ((0, 0), (1, 0)), constant_values=IGNORE_ID)
    previous = jnp.where(previous == IGNORE_ID, self.speech_pad_id, previous)
    return split + self.adapters.embed_codes(previous)

  def final_states(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Teacher-forced forward up to the output layers: LLM states (B, S, D), refined-head
    states (B, 5S, head D), and an MoE LLM's router logits (L, B, S, E) (None when dense)."""
    inputs, head_text = self.embed_inputs(batch)
    hidden, router_logits = self.llm.decoder.forward(inputs, batch['positions'],
                                                     batch['segment_ids'])
    head_inputs = self.speech_head_inputs(hidden, head_text, batch['speech_targets'])
    return hidden, self.speech_refined_head.states(head_inputs, batch['positions'],
                                                   batch['segment_ids']), router_logits

  def router_metrics(self, router_logits: jax.Array, batch: dict) -> dict:
    """moe.router_metrics of the LLM's router logits over the batch's non-padding positions."""
    return moe.router_metrics(router_logits, batch['segment_ids'] > 0, self.experts_per_token,
                              self.router_aux_loss_coef)

  def speech_logits(self, states: jax.Array) -> jax.Array:
    return self.speech_refined_head.logits(states, self.adapters.code_embedding)

  def __call__(self, batch: dict) -> dict:
    """Teacher-forced forward: text logits (B, S, V) and speech logits (B, 5S, codes); with an
    MoE LLM also 'router', its router metrics (router_metrics)."""
    hidden, speech_states, router_logits = self.final_states(batch)
    outputs = {'text_logits': self.llm.lm_head(hidden),
               'speech_logits': self.speech_logits(speech_states)}
    if router_logits is not None:
      outputs['router'] = self.router_metrics(router_logits, batch)
    return outputs

  def target_nll(self, batch: dict) -> dict:
    """Teacher-forced per-target (nll, hits) of both channels (as logits_target_nll of
    __call__'s logits), the logits made loss_chunk_positions LLM positions at a time (the
    speech channel: their 5 sub-slots each), or whole rows at 0; with an MoE LLM also 'router',
    its router metrics."""
    hidden, speech_states, router_logits = self.final_states(batch)
    targets = channel_targets(batch)
    chunk = self.loss_chunk_positions
    per_target = {
        'text': chunked_target_nll(self.llm.lm_head, hidden, targets['text'], chunk),
        'speech': chunked_target_nll(self.speech_logits, speech_states, targets['speech'],
                                     chunk * self.speech_refined_head.group_size)}
    if router_logits is not None:
      per_target['router'] = self.router_metrics(router_logits, batch)
    return per_target


def target_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per target: float32 cross-entropy, and whether the argmax is the target; both 0 (False)
  where the target is IGNORE_ID."""
  valid = targets != IGNORE_ID
  safe_targets = jnp.where(valid, targets, 0)
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe_targets)
  return jnp.where(valid, nll, 0), valid & (logits.argmax(-1) == safe_targets)


def chunked_target_nll(head, states: jax.Array, targets: jax.Array,
                       chunk: int) -> tuple[jax.Array, jax.Array]:
  """target_nll(head(states), targets) for states (B, T, D) and targets (B, T), made `chunk`
  positions at a time (0: all at once). The backward pass makes each chunk's logits again, so
  at most one chunk's (B, chunk, V) logits are ever held, not the (B, T, V) of all."""
  if not chunk:
    return target_nll(head(states), targets)
  rows, length = targets.shape
  pad = -length % chunk
  states = jnp.pad(states, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_ID)
  to_chunks = lambda x: jnp.swapaxes(x.reshape((rows, -1, chunk) + x.shape[2:]), 0, 1)
  of_chunk = jax.checkpoint(lambda xs: target_nll(head(xs[0]), xs[1]), prevent_cse=False)
  per_chunk = jax.lax.map(of_chunk, (to_chunks(states), to_chunks(targets)))
  return tuple(jnp.swapaxes(x, 0, 1).reshape(rows, -1)[:, :length] for x in per_chunk)


def channel_targets(batch: dict) -> dict:
  """{'text': (B, S), 'speech': (B, 5S)}: each channel's targets, speech flat by sub-slot."""
  rows = batch['text_targets'].shape[0]
  return {'text': batch['text_targets'], 'speech': batch['speech_targets'].reshape(rows, -1)}


def logits_target_nll(outputs: dict, batch: dict) -> dict:
  """{'text': (nll, hits), 'speech': (nll, hits)} (target_nll's) from __call__'s logits, and
  its router metrics where it has them."""
  targets = channel_targets(batch)
  per_target = {channel: target_nll(outputs[f'{channel}_logits'], targets[channel])
                for channel in targets}
  if 'router' in outputs:
    per_target['router'] = outputs['router']
  return per_target


def losses(per_target: dict, batch: dict) -> dict:
  """Text CE + speech CE, weight 1:1, each a mean over its valid targets, and each channel's
  accuracy, from per-target (nll, hits) of both channels. With an MoE LLM, its router metrics
  too, and the loss adds their `router_loss` (router_aux_loss_coef x the load-balancing loss)."""
  metrics = {}
  for channel, targets in channel_targets(batch).items():
    nll, hits = per_target[channel]
    count = jnp.maximum((targets != IGNORE_ID).sum(), 1)
    metrics[f'{channel}_loss'] = nll.sum() / count
    metrics[f'{channel}_accuracy'] = hits.sum() / count
  metrics['loss'] = metrics['text_loss'] + metrics['speech_loss']
  if 'router' in per_target:
    metrics.update(per_target['router'])
    metrics['loss'] += metrics['router_loss']
  return metrics


def compute_losses(outputs: dict, batch: dict) -> dict:
  """losses() from __call__'s full logits."""
  return losses(logits_target_nll(outputs, batch), batch)


def create(cfg: ml_collections.ConfigDict, seed: int = 0) -> FunAudioChat:
  """A randomly initialised model (initialisation compiled as one program: faster than eager)."""
  return nnx.jit(lambda: FunAudioChat(cfg, rngs=nnx.Rngs(seed)))()


def abstract_model(cfg: ml_collections.ConfigDict) -> FunAudioChat:
  """The model with ShapeDtypeStructs for parameters: no memory, no compute."""
  return nnx.eval_shape(lambda: FunAudioChat(cfg, rngs=nnx.Rngs(0)))
