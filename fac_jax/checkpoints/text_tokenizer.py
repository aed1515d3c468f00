"""The text tokenizer of a checkpoint folder (Qwen layout), loaded offline with `tokenizers`;
special-token ids are read from its files, never assumed."""

import json
import os

import tokenizers

# Our config field -> the special token's text.
SPECIAL_TOKENS = {
    'audio': '<|AUDIO|>', 'audio_bos': '<|audio_bos|>', 'audio_eos': '<|audio_eos|>',
    'sil': '<|sil|>', 'im_start': '<|im_start|>', 'im_end': '<|im_end|>',
    'endoftext': '<|endoftext|>',
}
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                   'special_tokens_map.json', 'added_tokens.json')


def load(folder: str) -> tokenizers.Tokenizer:
  """tokenizer.json if present, else a byte-level BPE from vocab.json + merges.txt with the added
  tokens of tokenizer_config.json."""
  path = os.path.join(folder, 'tokenizer.json')
  if os.path.exists(path):
    return tokenizers.Tokenizer.from_file(path)
  vocab, merges = os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt')
  if not (os.path.exists(vocab) and os.path.exists(merges)):
    raise FileNotFoundError(f'{folder}: no tokenizer.json, nor vocab.json with merges.txt')
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  config_path = os.path.join(folder, 'tokenizer_config.json')
  if os.path.exists(config_path):
    with open(config_path) as f:
      added = json.load(f).get('added_tokens_decoder', {})
    for token_id, token in sorted(added.items(), key=lambda kv: int(kv[0])):
      tokenizer.add_special_tokens([tokenizers.AddedToken(token['content'], special=True)])
      if tokenizer.token_to_id(token['content']) != int(token_id):
        raise ValueError(f'{config_path}: {token["content"]!r} is id {token_id} there but '
                         f'{tokenizer.token_to_id(token["content"])} in vocab.json')
  return tokenizer


def special_ids(tokenizer: tokenizers.Tokenizer, folder: str = '') -> dict[str, int]:
  """Our `model.tokens` fields from the tokenizer; a missing special token is an error."""
  ids = {field: tokenizer.token_to_id(text) for field, text in SPECIAL_TOKENS.items()}
  missing = sorted(SPECIAL_TOKENS[f] for f, i in ids.items() if i is None)
  if missing:
    raise ValueError(f'tokenizer in {folder or "?"} lacks special tokens {missing}')
  return ids


def train_bpe(texts, special: dict[str, int], folder: str) -> tokenizers.Tokenizer:
  """Trains a small BPE on `texts` for a model whose special tokens sit at the ids in `special`
  (our `model.tokens` fields): ordinary tokens fill the ids below the first special id, ids
  between and after special ones are reserved. Saves tokenizer.json in `folder`."""
  first_special = min(special.values())
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
  tokenizer.normalizer = tokenizers.normalizers.NFKC()
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tokenizer.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=first_special, special_tokens=['<unk>'],
                                           show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  text_of = {token_id: SPECIAL_TOKENS[field] for field, token_id in special.items()}
  added = [text_of.get(i, f'<|reserved_{i}|>')
           for i in range(tokenizer.get_vocab_size(), max(special.values()) + 1)]
  tokenizer.add_special_tokens(added)
  wrong = {field: tokenizer.token_to_id(SPECIAL_TOKENS[field])
           for field, token_id in special.items()
           if tokenizer.token_to_id(SPECIAL_TOKENS[field]) != token_id}
  if wrong:
    raise ValueError(f'trained tokenizer put special tokens at {wrong}; expected {special}')
  os.makedirs(folder, exist_ok=True)
  tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  return tokenizer
