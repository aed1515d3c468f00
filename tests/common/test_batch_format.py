"""Batch dict validation, packing limits and the official-format reader's refusals."""

import copy

import numpy as np
import pytest

from fac_jax import batch as batch_lib
from fac_jax.data import conversation, official_batch, synthetic
import official_tiny


def test_check_names_the_bad_field(tiny_config):
  cfg = tiny_config.model
  good = synthetic.batch(np.random.default_rng(0), cfg, 2, 96, 16)
  batch_lib.check(good, cfg)
  bad = dict(good, speech_codes=good['speech_codes'][..., :4])
  with pytest.raises(ValueError, match="'speech_codes'.*dim G should be 5"):
    batch_lib.check(bad, cfg)
  missing = {k: v for k, v in good.items() if k != 'mel'}
  with pytest.raises(ValueError, match=r"missing fields \['mel'\]"):
    batch_lib.check(missing, cfg)


def test_pack_refuses_rows_that_do_not_fit(tiny_config):
  cfg = tiny_config.model
  example = conversation.format_conversation(
      synthetic.conversation_pieces(np.random.default_rng(1), cfg), cfg)
  n, w = len(example['input_ids']), len(example['mel_lengths'])
  with pytest.raises(ValueError, match=f'row 0 needs {n} positions'):
    conversation.pack([[example]], n - 1, w, cfg)
  with pytest.raises(ValueError, match=f'row 0 needs {w} mel windows'):
    conversation.pack([[example]], n, w - 1, cfg)


def test_delay_and_eos_group_in_formatted_assistant_turn(tiny_config):
  cfg = tiny_config.model
  tok, sp = cfg.tokens, cfg.speech
  codes = list(range(7))  # 10 delay bos + 7 codes = 17 -> 4 positions, last one 3 codes + 2 pad
  pieces = [conversation.Text([tok.audio_bos], True),
            conversation.assistant_audio(codes, [41, 42], cfg),
            conversation.Text([tok.audio_eos, tok.im_end], True)]
  ex = conversation.format_conversation(pieces, cfg)
  np.testing.assert_array_equal(ex['input_ids'], [tok.audio_bos, 41, 42, tok.sil, tok.sil,
                                                  tok.audio_eos, tok.im_end])
  bos, pad, eos, ig = sp.bos_id, sp.pad_id, sp.eos_id, batch_lib.IGNORE_ID
  np.testing.assert_array_equal(ex['speech_codes'][1:5], [[bos] * 5, [bos] * 5, [0, 1, 2, 3, 4],
                                                          [5, 6, pad, pad, pad]])
  # h_p predicts group p + 1: <|audio_bos|> predicts the first delay group, the last audio
  # position predicts the eos group.
  np.testing.assert_array_equal(ex['speech_targets'], [[bos] * 5, [bos] * 5, [0, 1, 2, 3, 4],
                                                       [5, 6, ig, ig, ig], [eos] * 5, [ig] * 5,
                                                       [ig] * 5])
  np.testing.assert_array_equal(ex['text_targets'], [41, 42, tok.sil, tok.sil, tok.audio_eos,
                                                     tok.im_end, ig])
  assert ex['text_mask'].tolist() == [False, True, True, True, True, False, False]


def test_official_reader_refuses_inconsistent_batches():
  cfg = official_tiny.model_config()
  official = official_tiny.forward_inputs(official_tiny.forward_reference())
  wrong_count = copy.deepcopy(official)
  wrong_count['speech_attention_mask'][0, :] = 1  # 27 codes -> 6 slots, the batch has 3
  with pytest.raises(ValueError, match='audio 0 has 27 codes'):
    official_batch.to_batch(wrong_count, cfg)
  left_padded = copy.deepcopy(official)
  left_padded['attention_mask'][1] = np.roll(left_padded['attention_mask'][1], 2)
  with pytest.raises(ValueError, match='row 1: attention_mask must be right-padded'):
    official_batch.to_batch(left_padded, cfg)
