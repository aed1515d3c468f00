"""fac_jax: Fun-Audio-Chat in JAX / Flax NNX, grouped by stage of the data flow.

Each folder is a stage; a module imports only from its own stage or a stage listed before it
(tests/common/test_layout.py enforces it):

  (top)         config, sharding, batch, files, audio, cli (what the CLIs share), fingerprint
                (what made a result, for reruns): used by several stages
  model/        the towers and layers: Qwen3, the continuous encoder, Fun-Audio-Chat, int8
                serving weights
  checkpoints/  our checkpoint folder, the official layout, import/export, safetensors, the text
                tokenizer, Whisper's model.bin
  speech/       the speech codec: k-means and S3Tokenizer v3 codes, Griffin-Lim and CosyVoice 3
  data/         manifests, the demo corpus, preparation, conversations into batches
  train/        the trainer, jitted steps, optimizer, DPO, held-out losses
  merging/      merge methods, the streaming merge, Core-Cocktail, merge studies
  inference/    generation, sampling, streaming speech, chat
  scale/        ahead-of-time compilation for TPU slices: memory, collectives, roofline
  evaluation/   the ASR judge and the spoken evaluation
  duplex/       Fun-Audio-Chat-Duplex: full-duplex timelines, streaming loop, fine-tune
  pipeline/     the main job: from nothing to a talking model
  serve/        the real-time speech server: slot engine, WebSockets, the web page
"""
