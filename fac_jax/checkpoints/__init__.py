"""Checkpoints: our orbax checkpoint folder (checkpoint), the official Fun-Audio-Chat layout and its
import/export (official_layout, convert: `python -m fac_jax.checkpoints.convert`), safetensors
folders (safetensors_io), the text tokenizer a checkpoint carries (text_tokenizer), and Whisper's
CTranslate2 model.bin (whisper). May import: the top-level shared modules and model/."""
