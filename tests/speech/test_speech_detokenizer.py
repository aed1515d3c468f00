"""CosyVoice 3 detokenizer (flow + HiFT + the fixed speaker) on the tiny golden fixture weights:
the speaker table converter, Fun-Audio-Chat's segmentation, offline decoding against the HiFT
vocoding of the PyTorch reference's mel, and streaming (through chat's SpeechChunker) as a prefix
of the offline chunk-mask decode.

Tolerances: the flow matches the reference mel to 5e-5 (tests/test_cosyvoice_flow.py), and HiFT's
F0 -> phase integral amplifies any mel difference (test_hift.py: 5e-3 end to end); measured here,
the waveform (amplitude 0.5) is within 3.8e-3 (full attention) and 7.2e-3 (chunk mask) of
HiFT(reference mel), while the other mode's is 0.43 away; the stream is within 1.2e-3 of the
offline decode, whose mel it matches to 1.4e-6 (float32 rounding of the same computation in other
shapes, amplified the same way)."""

import json
import os

import numpy as np
import pytest
import torch

import paths

from fac_jax.inference import streaming
from fac_jax.speech import convert_cosyvoice, detokenizer, hift, speech_tokenizer

FIXTURE = os.path.join(paths.TESTDATA, 'cosyvoice3_tiny')
FLOW_CONFIG = os.path.join(FIXTURE, 'flow', 'config.json')
SEGMENT = 20  # codes per segment here (750 in the released recipe), so that 40 codes make two
WAVEFORM_TOLERANCE = 1.5e-2  # vs HiFT(reference mel): the flow's 5e-5, amplified by the F0 path
STREAM_TOLERANCE = 5e-3  # stream vs offline: float32 rounding, amplified by the F0 path


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(os.path.join(FIXTURE, 'flow', 'reference.npz')))


@pytest.fixture(scope='module')
def folder(tmp_path_factory, ref):
  """flow.pt, hift.pt and a speaker table holding the fixture's x-vector as Fun-Audio-Chat's
  voice, converted into one folder."""
  root = tmp_path_factory.mktemp('cosyvoice')
  table = str(root / 'spk2info.pt')
  torch.save({detokenizer.DEFAULT_SPEAKER: {'embedding': torch.tensor(ref['embedding']),
                                            'speech_token': torch.zeros(1, 7, dtype=torch.int32)},
              'other': {'embedding': torch.ones(1, 100)}}, table)
  out = str(root / 'converted')
  convert_cosyvoice.convert_flow(os.path.join(FIXTURE, 'flow', 'flow.pt'),
                                 os.path.join(out, 'flow'), FLOW_CONFIG)
  convert_cosyvoice.convert_hift(os.path.join(FIXTURE, 'hift', 'hift.pt'),
                                 os.path.join(out, 'hift'),
                                 os.path.join(FIXTURE, 'hift', 'config.json'), FLOW_CONFIG)
  convert_cosyvoice.convert_speaker(table, out, flow_config_path=FLOW_CONFIG)
  return {'out': out, 'table': table}


@pytest.fixture(scope='module')
def detok(folder):
  return detokenizer.CosyVoiceDetokenizer.load(folder['out'], segment_tokens=SEGMENT)


def max_diff(a, b) -> float:
  assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
  return float(np.abs(np.asarray(a) - np.asarray(b)).max(initial=0.0))


def test_speaker_table(folder, ref, tmp_path):
  with open(os.path.join(folder['out'], detokenizer.SPEAKER_FILE), encoding='utf-8') as f:
    written = json.load(f)
  assert written['speaker'] == '中文女'
  np.testing.assert_array_equal(np.asarray(written['embedding'], np.float32), ref['embedding'][0])
  with pytest.raises(convert_cosyvoice.ConversionError, match="no speaker '男'.*'other'"):
    convert_cosyvoice.convert_speaker(folder['table'], str(tmp_path), '男', FLOW_CONFIG)
  with pytest.raises(convert_cosyvoice.ConversionError, match="'other' has no .* of 192 numbers"):
    convert_cosyvoice.convert_speaker(folder['table'], str(tmp_path), 'other', FLOW_CONFIG)
  assert not os.path.exists(tmp_path / detokenizer.SPEAKER_FILE)


def test_interface_and_loading(folder, detok, tmp_path):
  assert isinstance(detok, speech_tokenizer.StreamingSpeechDetokenizer)
  assert (detok.sample_rate, detok.vocab_size, detok.lookahead) == (24000, 512, 3)
  assert isinstance(detokenizer.load(folder['out']), detokenizer.CosyVoiceDetokenizer)
  kmeans = speech_tokenizer.KMeansSpeechTokenizer(np.eye(4, 320), np.zeros(320), np.ones(320))
  kmeans.save(str(tmp_path / 'kmeans.npz'))
  assert isinstance(detokenizer.load(str(tmp_path / 'kmeans.npz')),
                    speech_tokenizer.GriffinLimDetokenizer)
  with pytest.raises(ValueError, match=r'code 512 is outside \[0, 512\)'):
    detok.decode([1, 512])


def fun_audio_chat_segments(num_tokens: int, segment: int, min_last: int) -> list[list[int]]:
  """utils/cosyvoice_detokenizer.py's token2wav loop, on token indices."""
  tokens, segments, step = list(range(num_tokens)), [], 0
  while step * 25 < len(tokens):
    segments.append(tokens[step * 25:min((step + segment // 25) * 25, len(tokens))])
    step += segment // 25
  if len(segments) > 1 and len(segments[-1]) < min_last:
    merged = segments[-2] + segments[-1]
    segments[-2:] = [merged[:len(merged) // 2], merged[len(merged) // 2:]]
  return segments


@pytest.mark.parametrize('num_tokens', [1, 749, 750, 751, 799, 800, 1549, 2300, 3000])
def test_segments_follow_fun_audio_chat(detok, num_tokens):
  released = detokenizer.CosyVoiceDetokenizer(detok.flow, detok.hift, np.ones(192))
  assert [list(range(a, b)) for a, b in released.segments(num_tokens)] == \
      fun_audio_chat_segments(num_tokens, 750, 50)


@pytest.mark.parametrize('chunk_mask,mode,other', [(False, 'offline', 'chunk'),
                                                   (True, 'chunk', 'offline')])
def test_decode_vocodes_the_reference_mel(detok, ref, chunk_mask, mode, other):
  """The fixture's 20 codes (one segment): the waveform is HiFT of the reference flow's mel in the
  same attention mode, and far from the other mode's."""
  waveform = detok.decode(ref['token'][0], chunk_mask=chunk_mask)
  assert waveform.shape == (20 * 960,) and waveform.dtype == np.float32
  vocoded = {m: np.asarray(hift.inference(detok.hift, ref[f'{m}.mel']))[0] for m in (mode, other)}
  assert max_diff(waveform, vocoded[mode]) < WAVEFORM_TOLERANCE
  assert max_diff(waveform, vocoded[other]) > 0.1


def test_stream_through_the_chunker_is_a_prefix_of_the_chunk_mask_decode(detok, ref):
  """40 codes (two segments) in chat's 5-code groups, with bos/eos codes it must drop: after
  every push the audio so far is a prefix of decode(chunk_mask=True); at the end, all of it. A
  block of 8 frames (4 codes) is vocoded once its codes and 3 more have arrived, less the 4
  frames of the vocoder's look-ahead and its 4-sample overlap."""
  rng = np.random.default_rng(0)
  codes = np.concatenate([ref['token'][0], rng.integers(0, 512, 20)])
  offline = detok.decode(codes, chunk_mask=True)
  assert offline.shape == (40 * 960,)
  chunker = streaming.SpeechChunker(detok, detok.vocab_size)
  pieces = chunker.push([512, 600]) + chunker.push([-1] * 5)
  for start in range(0, 40, 5):
    pieces += chunker.push(codes[start:start + 5])
    so_far = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    received = start + 5
    in_segment = received - SEGMENT * (received // SEGMENT)
    if in_segment == 0:  # a full segment is finalized at once
      expected = received * 960
    else:
      blocks = (in_segment - detok.lookahead) // 4
      frames = max(8 * blocks - 4, 0)
      expected = SEGMENT * 960 * (received // SEGMENT) + (max(480 * frames - 4, 0))
    assert len(so_far) == expected, (received, len(so_far), expected)
    assert max_diff(so_far, offline[:len(so_far)]) < STREAM_TOLERANCE
  pieces += chunker.finish()
  assert max_diff(np.concatenate(pieces), offline) < STREAM_TOLERANCE
