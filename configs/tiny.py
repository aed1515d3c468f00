"""Tiny Fun-Audio-Chat: same structure as the 8B model, distinct small sizes; runs on 2 CPU cores."""

from fac_jax import config as base


def get_config(arg=None):
  """`configs/tiny.py:<stage>` picks a training stage (default stage1); `:moe` or `:<stage>,moe`
  makes the LLM a mixture of experts (Fun-Audio-Chat-30B-A3B's structure at the tiny sizes)."""
  options = arg.split(',') if arg else []
  use_moe = 'moe' in options
  stage = next((option for option in options if option != 'moe'), 'stage1')
  config = base.default_config()
  config.train = base.train_config(stage)
  # A model trained from scratch on a small corpus: rates 30x the 8B recipe's, same 10x decay;
  # DPO 300x, since a policy this small moves too little at 30x to change its held-out preferences.
  stages = config.pipeline.stages
  for train in (config.train, config.cocktail.stage2, *stages.values()):
    scale = 300 if train.stage == 'dpo' else 30
    train.update(learning_rate=train.learning_rate * scale,
                 end_learning_rate=train.end_learning_rate * scale, steps=200, log_every=10,
                 eval_every=50, eval_batches=4, checkpoint_every=50)
  # With the chosen answers' cross-entropy added (weight 1), DPO at that rate keeps the held-out
  # SFT loss within 10 % of stage 2's (measured on the pipeline; without it, +19 %).
  config.dpo.sft_weight = 1.0
  # Steps sized for a 15-minute run on 2 CPU cores: with the pretrained encoder, stage 1 does most
  # of the learning (900 steps: held-out WER 23 %, 20 min in all).
  for name, steps in dict(base=300, prealign=50, stage1=600, stage2=120, dpo=100).items():
    stages[name].update(steps=steps, eval_every=steps, checkpoint_every=100, log_every=50)
  model = config.model
  # The LLM and the encoder are wider than the refined head needs: at 48 and 40 wide they learned
  # the corpus's sentence shapes but few of its words; the refined head's 25 Hz attention, not
  # their width, sets the step time.
  model.llm.update(vocab_size=263, num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=2,
                   head_dim=16, mlp_dim=256, rope_theta=5e6)
  if use_moe:
    # 8 experts, 2 a token, each half the dense width: the same active feed-forward width (256)
    # as the dense tiny LLM, four times its feed-forward parameters.
    model.llm.moe.update(num_experts=8, experts_per_token=2, moe_mlp_dim=128,
                         norm_topk_prob=True)
  model.speech_refined_head.update(num_layers=2, hidden_size=36, num_heads=3, num_kv_heads=1,
                                   head_dim=10, mlp_dim=61, rope_theta=1e6)
  # 40 mel bins in 1 s windows: with 19 bins in 0.2 s ones the encoder could not tell the
  # corpus's words apart (held-out WER 72 % against 58-61 %, measured on the pipeline).
  model.encoder.update(num_mel_bins=40, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=160,
                       window_frames=100, max_positions=64)
  model.speech.update(codebook_size=77, bos_id=73, eos_id=74, pad_id=75)
  model.tokens.update(audio=256, audio_bos=257, audio_eos=258, sil=259, im_start=250, im_end=251,
                      endoftext=252)
  # Trained as it is used: user audio at full scale (see model.halve_user_audio).
  model.halve_user_audio = False
  config.data.update(batch_size=8, seq_len=128, num_windows=8)
  # The main job's encoder is pretrained, as Fun-Audio-Chat's is: Whisper tiny.en in 2 s windows,
  # frozen in every stage (only its projection to the LLM trains). The corpus's clips last 1-3 s:
  # with three windows a row, rows still fill 93 % of their positions (as with six), and the
  # frozen encoder's forward pass, most of a step, costs half as much.
  config.pipeline.encoder.update(
      pretrained='whisper_tiny_en', num_mel_bins=80, hidden_size=384, num_layers=4, num_heads=6,
      mlp_dim=1536, window_frames=200, max_positions=1500)
  config.pipeline.data.update(num_windows=3)
  # Rows as short as the stage's conversations allow (the refined head's attention grows with the
  # square of a row): M_0's facts in text last 20-30 positions (packed, same tokens a step), a
  # preference pair 40-66 with one question (one pair a row).
  config.pipeline.stage_data.update(base=dict(seq_len=64, batch_size=16),
                                    dpo=dict(seq_len=72, num_windows=2))
  # 2400 conversations (51 min of user speech): on 1200 and 450 stage-1 steps the model did not
  # fit even train's transcripts (train WER 26 %, held-out 53 %).
  config.pipeline.update(num_train=2400, num_eval=160)  # 40 held-out questions a task
  return config
