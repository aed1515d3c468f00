"""The data pipeline with the released kind of speech tokenizer: `prepare --speech_tokenizer=DIR`
with a folder written by fac_jax.speech.convert_s3 (the tiny golden ONNX graph) stores the codes
S3Tokenizer.encode gives for the same audio, records the folder instead of copying it, reuses it
on a rerun, and switching tokenizers changes the fingerprint so that nothing made with the old
one (cached chunks, the finished dataset) is reused."""

import json
import os

import jax
import numpy as np
import pytest
import soundfile
from flax import nnx

import paths

from fac_jax import audio, config as config_lib
from fac_jax.data import prepare, synthetic
from fac_jax.speech import convert_s3, s3tokenizer, speech_tokenizer

ONNX_PATH = os.path.join(paths.TESTDATA, 'cosyvoice3_tiny', 'tokenizer',
                         'speech_tokenizer_v3_tiny.onnx')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Two conversations with spoken answers (one stored at 24 kHz), the converted tokenizer, and
  the tiny config with the released speech vocabulary (6561 codes before bos)."""
  root = tmp_path_factory.mktemp('s3_corpus')
  converted = str(root / 's3')
  convert_s3.convert(ONNX_PATH, converted)
  rng = np.random.default_rng(0)
  lines = []
  for i, (seconds, rate) in enumerate([(1.3, 16000), (2.1, 24000)]):
    path = str(root / f'a{i}.wav')
    soundfile.write(path, synthetic.tone_speech(rng, seconds), rate)
    lines.append(json.dumps({'id': f'c{i}', 'turns': [
        {'role': 'user', 'text': f'Question {i}?'},
        {'role': 'assistant', 'text': f'Answer {i}.', 'audio': path}]}))
  manifest = root / 'train.jsonl'
  manifest.write_text('\n'.join(lines) + '\n')
  cfg = config_lib.load(paths.TINY_CONFIG)
  cfg.model.speech.update(codebook_size=6565, bos_id=6561, eos_id=6562, pad_id=6563)
  return {'root': root, 's3': converted, 'splits': {'train': str(manifest)}, 'model': cfg.model}


def stored_codes(out: str) -> dict[str, np.ndarray]:
  source = prepare.open_split(out, 'train')
  return {json.loads(r['conversation'])['id']: r['codes'] for r in (source[i] for i in
                                                                  range(len(source)))}


def answer_audio(corpus) -> dict[str, np.ndarray]:
  with open(corpus['splits']['train']) as f:
    return {item['id']: audio.load(item['turns'][1]['audio']) for item in map(json.loads, f)}


def test_s3_codes_recorded_tokenizer_and_switching(corpus, monkeypatch):
  out = str(corpus['root'] / 'prepared')
  report = prepare.prepare(out, corpus['splits'], corpus['model'],
                           speech_tokenizer_file=corpus['s3'])
  tokenizer = s3tokenizer.S3Tokenizer.from_converted(corpus['s3'])
  stored, answers = stored_codes(out), answer_audio(corpus)
  assert stored.keys() == {'c0', 'c1'}
  for key, waveform in answers.items():
    np.testing.assert_array_equal(stored[key], tokenizer.encode(waveform))
    assert len(set(stored[key].tolist())) > 5
    # ceil((n // 160) / 4) codes: not the k-means tokenizer's int(n / 16000 * 25)
    assert len(stored[key]) == -(-(len(waveform) // 160) // 4)
  assert len(stored['c0']) != speech_tokenizer.num_codes(len(answers['c0']))

  # Recorded, not copied: the folder's path and the ONNX graph's sha256 from its config.json.
  assert not os.path.exists(os.path.join(out, prepare.SPEECH_TOKENIZER_FILE))
  with open(os.path.join(out, prepare.SPEECH_TOKENIZER_RECORD)) as f:
    record = json.load(f)
  with open(os.path.join(corpus['s3'], 'config.json')) as f:
    sha256 = json.load(f)['source']['sha256']
  assert record['folder'] == os.path.abspath(corpus['s3'])
  assert sha256 in record['fingerprint'] and sha256 in report['extract_fingerprint']
  assert report['speech_tokenizer']['vocab_size'] == 6561

  # A rerun without the flag uses the recorded folder, and reuses the finished dataset.
  extracted = []
  original = prepare.Extractor.conversation
  monkeypatch.setattr(prepare.Extractor, 'conversation',
                      lambda self, conv: extracted.append(conv.id) or original(self, conv))
  again = prepare.prepare(out, corpus['splits'], corpus['model'])
  assert extracted == [] and again['extract_fingerprint'] == report['extract_fingerprint']

  # Another tokenizer: new fingerprint, every conversation extracted again, its codes stored.
  rng = np.random.default_rng(1)
  kmeans = speech_tokenizer.KMeansSpeechTokenizer(rng.normal(size=(16, 320)), np.zeros(320),
                                                  np.ones(320))
  kmeans_file = str(corpus['root'] / 'kmeans.npz')
  kmeans.save(kmeans_file)
  switched = prepare.prepare(out, corpus['splits'], corpus['model'],
                             speech_tokenizer_file=kmeans_file)
  assert switched['extract_fingerprint'] != report['extract_fingerprint']
  assert extracted == ['c0', 'c1']
  assert not os.path.exists(os.path.join(out, prepare.SPEECH_TOKENIZER_RECORD))
  stored = stored_codes(out)
  for key, waveform in answers.items():
    np.testing.assert_array_equal(stored[key], kmeans.encode(waveform))


def test_fingerprint_without_a_recorded_source_hashes_the_weights(corpus):
  recorded = s3tokenizer.S3Tokenizer.from_converted(corpus['s3'])
  assert recorded.fingerprint() == f"{s3tokenizer.FORMAT}-onnx-{recorded.source['sha256']}"
  graphdef, _ = nnx.split(s3tokenizer.abstract_model(recorded.cfg))
  unrecorded = [s3tokenizer.S3Tokenizer(recorded.cfg, nnx.merge(graphdef, params)) for params in
                (recorded.params, jax.tree.map(lambda x: x + 1e-6, recorded.params))]
  assert unrecorded[0].fingerprint() != unrecorded[1].fingerprint()
  assert unrecorded[0].fingerprint().startswith(f'{s3tokenizer.FORMAT}-weights-')
