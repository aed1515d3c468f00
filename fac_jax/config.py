"""Default experiment config (Fun-Audio-Chat-8B sizes) and the loader used by every entry point."""

import ml_collections


def decoder_config(**sizes) -> ml_collections.ConfigDict:
  """A Qwen3 decoder stack; the shared LLM and the speech refined head both use this shape.

  `moe` makes it a Qwen3-MoE stack (fac_jax.model.moe): layer i is sparse when num_experts > 0,
  i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; its feed-forward block is
  then `experts_per_token` of `num_experts` SwiGLU experts of width moe_mlp_dim (mlp_dim is the
  width of the dense layers). The fields and their meaning are transformers' Qwen3MoeConfig's.
  """
  return ml_collections.ConfigDict(dict(
      num_layers=sizes['num_layers'], hidden_size=sizes['hidden_size'],
      num_heads=sizes['num_heads'], num_kv_heads=sizes['num_kv_heads'],
      head_dim=sizes['head_dim'], mlp_dim=sizes['mlp_dim'],
      rope_theta=sizes['rope_theta'], norm_eps=1e-6,
      moe=ml_collections.ConfigDict(dict(
          num_experts=0,  # 0: every layer dense
          experts_per_token=0, moe_mlp_dim=0,
          # Whether the top-k weights are divided by their sum: transformers' default is no,
          # Qwen3-30B-A3B's config says yes.
          norm_topk_prob=False,
          decoder_sparse_step=1, mlp_only_layers=(),
          # x the load-balancing loss, added to the training loss
          router_aux_loss_coef=0.001))))


# Training stages of DESIGN.md section 2: what each trains and its learning-rate range.
STAGES = {
    'prealign': dict(frozen=('^llm/',), learning_rate=1e-4, end_learning_rate=1e-5),
    'stage1': dict(frozen=(), learning_rate=1e-4, end_learning_rate=1e-5),
    'stage2': dict(frozen=(), learning_rate=1e-5, end_learning_rate=1e-6),
    # DPO moves a converged policy a little away from its reference: 20x below stage 2, the peak
    # rate of the DPO runs of Zephyr-7B and Tulu-2; every parameter trains.
    'dpo': dict(frozen=(), learning_rate=5e-7, end_learning_rate=5e-8),
}


def train_config(stage: str = 'stage1') -> ml_collections.ConfigDict:
  """Trainer settings of one stage (python -m fac_jax.train.trainer)."""
  if stage not in STAGES:
    raise ValueError(f'unknown training stage {stage!r}; expected one of {sorted(STAGES)}')
  train = ml_collections.ConfigDict(dict(
      stage=stage,
      init_checkpoint='',  # fac_jax checkpoint whose parameters start the stage; '' = random
      steps=1000, warmup_fraction=0.02, grad_accum_steps=1,
      run_steps=0,  # stop (with a checkpoint) after this many steps of this invocation; 0: never
      adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
      frozen=(),  # regexes over parameter paths such as 'llm/decoder/layers/mlp/up_proj/kernel'
      log_every=10, eval_every=200, eval_batches=16,
      checkpoint_every=200, keep_checkpoints=3, best_metric='eval/loss', async_checkpointing=True,
      max_skipped_in_row=5,  # non-finite steps in a row before training stops
      # (first step, count): a jax.profiler trace of steps first .. first + count - 1 (numbered
      # as logged, from 1; step 1 compiles) in <workdir>/profile, for TensorBoard's profile tab.
      # A count of 0 traces nothing.
      profile_steps=(0, 0),
      lora=lora_config()))
  train.update(STAGES[stage])
  return train


def lora_config() -> ml_collections.ConfigDict:
  """LoRA / QLoRA adapters through qwix (fac_jax.model.lora); rank 0 trains fully."""
  return ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0,
      dropout=0.0,  # only 0: the train step is deterministic
      # qwix module_path: re.fullmatch on module paths such as llm/decoder/layers/mlp/up_proj;
      # by default the attention and MLP projections of the shared LLM.
      targets=r'llm/decoder/layers/(attention/[qkvo]_proj|mlp/(gate|up|down)_proj)',
      # Regexes (re.search) of parameter paths trained fully beside the adapters, e.g.
      # '^adapters/'; every other base weight is frozen.
      train_fully=(),
      base_quantization='none'))  # QLoRA: 'int8' or 'int4' base weights under the adapters


def use_released_sft_settings(config: ml_collections.ConfigDict) -> None:
  """The released SFT settings (DESIGN.md section 2) of the full-size configs: 2048-position rows,
  global batch 256, packing, bf16 compute, full remat, fsdp over every device, and the losses in
  512-position chunks (a row's float32 text logits 311 MB at a time, not 1.2 GB)."""
  config.model.dtype = 'bfloat16'
  config.model.remat_policy = 'full'
  config.model.loss_chunk_positions = 512
  config.data.update(seq_len=2048, batch_size=256)
  config.mesh.update(data=1, fsdp=-1, tensor=1)


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  model = config.model = ml_collections.ConfigDict()
  # Shared LLM: Qwen3 decoder (Qwen3-VL-8B language model), untied lm_head.
  model.llm = decoder_config(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8,
                             head_dim=128, mlp_dim=12288, rope_theta=5e6)
  model.llm.vocab_size = 151936
  # Speech refined head: Qwen3-0.6B-shaped stack between a down- and an up-projection.
  model.speech_refined_head = decoder_config(num_layers=28, hidden_size=1024, num_heads=16,
                                             num_kv_heads=8, head_dim=128, mlp_dim=3072,
                                             rope_theta=1e6)
  # Continuous speech encoder: Whisper-large-v3 layout, attention inside 2 s mel windows.
  # `pretrained`: '' starts a model made from scratch with random encoder weights;
  # 'whisper_tiny_en' with Whisper tiny.en's (fac_jax.checkpoints.whisper; sizes must fit).
  model.encoder = ml_collections.ConfigDict(dict(
      num_mel_bins=128, hidden_size=1280, num_layers=32, num_heads=20, mlp_dim=5120,
      window_frames=200, max_positions=1500, norm_eps=1e-5, pretrained=''))
  # 25 Hz speech codes: S3Tokenizer-v3 codes 0..6560, then bos (also the delay filler), eos, pad.
  model.speech = ml_collections.ConfigDict(dict(
      codebook_size=6565, bos_id=6561, eos_id=6562, pad_id=6564, group_size=5, delay_groups=2))
  # pad_id is 6563 or 6564 in third-party ports: the checkpoint importer reads the real value.
  model.tokens = ml_collections.ConfigDict(dict(
      audio=151669, audio_bos=151670, audio_eos=151671, sil=151673, im_start=151644,
      im_end=151645, endoftext=151643))
  # Official training halves user-audio embeddings whenever the batch carries response text
  # (DESIGN.md section 1); False keeps user audio unscaled, as at inference.
  model.halve_user_audio = True
  model.dtype = 'float32'
  model.param_dtype = 'float32'
  model.remat_policy = 'none'  # none | full | dots | dots_no_batch
  # Attention kernel (fac_jax.model.attention): auto | xla | splash | cudnn. auto: Pallas splash
  # on TPU, cuDNN flash on GPU (16-bit), XLA's with a dense mask otherwise; decoding is XLA's.
  model.attention = 'auto'
  # Training and DPO losses: the output layers and cross-entropy run this many LLM positions at
  # a time (the speech head: their 5 sub-slots each), made again in the backward pass, so no
  # (batch, positions, vocab) float32 logits are held; 0 makes the full logits at once.
  model.loss_chunk_positions = 0

  # Prepared data (python -m fac_jax.data.prepare) and how the grain pipeline batches it.
  config.data = ml_collections.ConfigDict(dict(
      dir='', train_split='train', eval_split='validation',
      batch_size=64,  # global rows per step
      seq_len=4096,  # LLM positions (5 Hz) per row
      num_windows=64,  # mel windows per row (of encoder.window_frames frames)
      max_audio_seconds=30.0, worker_count=0, prefetch_buffer=4))

  config.train = train_config()

  # Multi-task DPO (DESIGN.md section 2, step 5; fac_jax.train.dpo documents every definition). The
  # report gives no beta: 0.1 is the DPO paper's default. An answer's reward in a channel is
  # beta * (policy - reference) log-probability of its targets there; each channel has its own
  # sigmoid loss, so the speech channel (5 codes per text position) cannot drown the text one.
  config.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,
      label_smoothing=0.0,  # epsilon of conservative DPO: the share of pairs assumed flipped
      text_weight=1.0, speech_weight=1.0,  # per-pair loss: weighted mean of the channel losses
      sft_weight=0.0,  # adds this x the chosen answers' cross-entropy (text + speech)
      # Task names of the preference manifests, in task-id order, and their weight in the mean
      # over pairs. correct_answer is the demo corpus's task (fac_jax.data.synth).
      tasks=('robustness', 'instruction_following', 'audio_understanding', 'voice_empathy',
             'correct_answer'),
      task_weights=(1.0, 1.0, 1.0, 1.0, 1.0),
      reference_checkpoint=''))  # frozen reference model; '' = train.init_checkpoint

  # Core-Cocktail (python -m fac_jax.merging.cocktail): stage 1 (config.train) -> merge with the base
  # M_0 -> stage 2. Only paths matching `include` have a base counterpart; the rest is M_1's.
  config.cocktail = ml_collections.ConfigDict(dict(
      base_checkpoint='', method='linear', alpha=0.5, include='^llm/', exclude='',
      stage2=train_config('stage2')))

  # The main job (python -m fac_jax.pipeline): a synthesised corpus, a text base model M_0 trained
  # on its facts, then the training recipe from M_0, then evaluation. Each stage's trainer settings
  # (base uses stage 1's recipe; cocktail.stage2 is replaced by stages.stage2).
  config.pipeline = ml_collections.ConfigDict(dict(
      num_train=600, num_eval=120, num_pref_train=200, num_pref_eval=60, piper='auto',
      stages={'base': train_config('stage1'), 'prealign': train_config('prealign'),
              'stage1': train_config('stage1'), 'stage2': train_config('stage2'),
              'dpo': train_config('dpo')},
      eval_questions=40,  # per task and model, from the held-out split
      max_new_tokens=24,  # text tokens per generated answer (5 a second)
      merge_alphas=(0.0, 0.25, 0.5, 0.75, 1.0), samples=4,  # sweep; sample wavs in the report
      # model.encoder and data fields the pipeline overrides; with `pretrained` set, every stage
      # keeps the pretrained part frozen (fac_jax.checkpoints.whisper.TRUNK_PATTERN).
      encoder=ml_collections.ConfigDict(), data=ml_collections.ConfigDict(),
      stage_data=ml_collections.ConfigDict()))  # stage name -> data fields of that stage alone

  # Device mesh: -1 fills with the remaining devices. `expert` splits the experts of MoE layers
  # (tokens go to their experts' devices by all-to-all) and, like data and fsdp, the batch.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))

  config.seed = 0
  return config


def load(path_and_arg: str) -> ml_collections.ConfigDict:
  """Loads `configs/<name>.py[:arg]` the way config_flags does, for code outside absl apps."""
  from ml_collections import config_flags
  return config_flags.config_flags._ConfigFileParser(name='config').parse(path_and_arg)
