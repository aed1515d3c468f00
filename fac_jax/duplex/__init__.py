"""Fun-Audio-Chat-Duplex: the model listens while it speaks (DESIGN.md section 2, step 6).

Every 5 Hz step sums three input streams: the user's speech (the continuous encoder on that
step's 200 ms of user audio, or a learned silence vector when the user is silent), the
assistant's own speech (its code group through the grouping adapter) and the assistant's text
(<|sil|> when it has nothing to say); the outputs are the half-duplex model's, the next text token
and the next code group.

  features.py   the 5 Hz clock, a causal log-mel, chunk voice activity, encoder windows
  model.py      the duplex model (every half-duplex module plus the silence vector), checkpoints
  timeline.py   OmniFlatten-style full-duplex timelines synthesised from half-duplex conversations
  stream.py     the streaming loop: prefill, one jitted step per 200 ms chunk, bounded caches
  metrics.py    turn-taking, interruption, backchannel, pause and spoken-QA metrics
  finetune.py   `python -m fac_jax.duplex.finetune`: the duplex fine-tune and its evaluation
  __main__.py   `python -m fac_jax.duplex`: a simulated live call, stereo wav and timeline out

May import every stage but pipeline/.
"""
