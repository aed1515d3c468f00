"""The speech server end to end over loopback WebSockets: spoken turns answered exactly as the
one-session generate path answers them (history kept), eight conversations at once with nothing
dropped, the energy VAD ending a turn, every kind of bad input refused with its message while
the other conversations go on, and no compilation after the warm-up."""

import concurrent.futures
import json
import time

import numpy as np
import pytest
import soundfile
from playwright.sync_api import sync_playwright
from websockets.sync import client as ws_client

from serve_setup import (load, reference, start_server, status, stop_server,  # noqa: F401
                         trained)  # a fixture
from fac_jax.serve import client as client_lib

MAX_MESSAGE_BYTES = 65536
SESSION_SECONDS = 40
COMPILED_ONCE = {'begin': 1, 'chunk': 1, 'finish': 1, 'insert': 1, 'step': 1}


@pytest.fixture(scope='module')
def server(trained):
  ckpt, questions = trained
  process, url = start_server(ckpt, '--max_sessions=8', f'--max_message_bytes={MAX_MESSAGE_BYTES}',
                              f'--session_seconds={SESSION_SECONDS}', '--max_turn_seconds=6')
  yield url.replace('http', 'ws') + 'ws', url, load(ckpt), questions
  assert 'Traceback' not in stop_server(process)


def expected(assets, history, question, seed):
  """The one-session answer to what the server heard of `question`."""
  return reference(assets, history, client_lib.spoken(question), seed)


def converse(ws_url, assets, questions, seed):
  """Asks each question in one conversation, then checks each answer against the reference."""
  with client_lib.Client(ws_url, seed=seed) as client:
    assert client.ready['sample_rate'] == assets.detokenizer.sample_rate
    records = [client.ask(question) for question in questions]
  history = []
  for question, record in zip(questions, records):
    want = expected(assets, history, question, seed)
    assert record.done['text_ids'] == want['text'] and record.done['codes'] == want['codes']
    assert record.text == record.done['text']
    # Audio comes when some spoken code is a real one (not the bos delay or eos).
    speaks = any(0 <= code < assets.cfg.speech.bos_id for code in want['codes'])
    assert (record.audio_chunks > 0) == speaks and record.audio_samples == round(
        record.done['audio_seconds'] * assets.detokenizer.sample_rate)
    history.append({'user': client_lib.spoken(question), 'assistant': record.done['text']})
  return len(history)


def test_turns_keep_history_and_answer_as_one_session(server):
  ws_url, url, assets, questions = server
  assert converse(ws_url, assets, questions[:3], seed=5) == 3
  assert status(url)['compiled'] == COMPILED_ONCE


def test_eight_conversations_at_once_answer_as_alone(server):
  ws_url, url, assets, questions = server
  turns_before = status(url)['turns']
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    jobs = [pool.submit(converse, ws_url, assets,
                        [questions[c % 4], questions[(c + 1) % 4]], 100 + c) for c in range(8)]
    assert [job.result() for job in jobs] == [2] * 8
  after = status(url)
  assert after['turns'] - turns_before == 16  # nothing dropped
  assert after['busy_slots'] == 0 and after['sessions'] == 0
  assert after['compiled'] == COMPILED_ONCE


def test_silence_ends_a_turn(server):
  ws_url, _, assets, questions = server
  with ws_client.connect(ws_url) as ws:
    ws.send(json.dumps({'type': 'hello', 'sample_rate': 16000, 'turn': 'vad', 'seed': 2}))
    assert json.loads(ws.recv(timeout=60))['vad_silence_ms'] == 800
    # Speech, then 1.2 s of quiet: the turn ends 0.8 s after the last voiced 200 ms frame.
    speech = client_lib.spoken(questions[1])
    sent = np.concatenate([speech, np.zeros(6 * 3200, np.float32)])
    for frame in client_lib.frames(sent):
      ws.send(frame)
    messages = [json.loads(ws.recv(timeout=60))]
    while messages[-1]['type'] != 'done':
      message = ws.recv(timeout=60)
      if isinstance(message, str):
        messages.append(json.loads(message))
  assert messages[0]['type'] == 'heard'
  heard = sent[:round(messages[0]['seconds'] * 16000)]
  assert len(speech) - 3200 + 4 * 3200 <= len(heard) <= len(speech) + 4 * 3200
  assert messages[-1]['text_ids'] == reference(assets, [], heard, 2)['text']


def refused(ws_url, *messages, hello=True) -> tuple[str, int]:
  """Sends `messages` on a new connection; the error message and the close code that follow."""
  with ws_client.connect(ws_url, max_size=None) as ws:
    if hello:
      ws.send(json.dumps({'type': 'hello', 'sample_rate': 16000, 'turn': 'push'}))
      assert json.loads(ws.recv(timeout=60))['type'] == 'ready'
    for message in messages:
      ws.send(message)
    error = json.loads(ws.recv(timeout=60))
    with pytest.raises(Exception):
      ws.recv(timeout=60)
    return error['message'], ws.close_code


def test_bad_input_is_refused_and_others_go_on(server):
  ws_url, url, assets, questions = server
  # A well-behaved conversation runs alongside all of it.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    good = pool.submit(converse, ws_url, assets, questions[:2], 9)
    assert refused(ws_url, 'hello there') == (
        "text frame 'hello there' is not a control message: expected JSON {\"type\": \"hello\" "
        'or "end_turn", ...}', 1003)
    assert refused(ws_url, b'\x01\x02\x03') == (
        'a binary frame of 3 bytes is not audio: binary frames carry 16-bit PCM, an even number '
        'of bytes', 1003)
    assert refused(ws_url, b'\x00\x00', hello=False) == (
        'the first message must be {"type": "hello", "sample_rate": 16000, "turn": "vad" or '
        '"push"}', 1008)
    hello = json.dumps({'type': 'hello', 'sample_rate': 44100, 'turn': 'push'})
    assert refused(ws_url, hello, hello=False) == (
        'sample_rate 44100: this server takes 16000 Hz mono 16-bit PCM', 1003)
    assert refused(ws_url, bytes(MAX_MESSAGE_BYTES + 2)) == (
        f'a message of {MAX_MESSAGE_BYTES + 2} bytes: at most {MAX_MESSAGE_BYTES} bytes a '
        'message (--max_message_bytes)', 1009)
    # A turn over --max_turn_seconds is dropped with a message; the conversation goes on.
    with client_lib.Client(ws_url) as client:
      for frame in client_lib.frames(np.tile(questions[0], 6)[:7 * 16000]):
        client.ws.send(frame)
      assert client.receive() == {'type': 'error', 'message': 'a turn of more than 6 s '
                                  '(--max_turn_seconds): it is dropped'}
    # A client that leaves in the middle of an answer frees its slot.
    with client_lib.Client(ws_url, seed=1) as client:
      for frame in client_lib.frames(questions[2]):
        client.ws.send(frame)
      client.ws.send(json.dumps({'type': 'end_turn'}))
      assert client.receive()['type'] == 'heard'
    assert good.result() == 2
  for _ in range(100):
    if status(url)['busy_slots'] == 0 and status(url)['sessions'] == 0:
      break
    time.sleep(0.1)
  assert status(url)['busy_slots'] == 0 and status(url)['sessions'] == 0
  assert converse(ws_url, assets, questions[3:], 4) == 1


def test_session_and_connection_caps(server):
  ws_url, url, assets, questions = server
  clients = [client_lib.Client(ws_url) for _ in range(8)]
  try:
    assert refused(ws_url, hello=False) == (
        'the server is full: 8 conversations at once (--max_sessions); try again later', 1013)
    started = time.time()
    message = clients[0].receive()  # the first one's session time runs out
    assert message == {'type': 'error', 'message': f'the session time limit of {SESSION_SECONDS} '
                       's (--session_seconds) is over'}
    assert time.time() - started < SESSION_SECONDS
  finally:
    for client in clients:
      client.ws.close()
  assert converse(ws_url, assets, questions[:1], 0) == 1


def test_the_page_in_a_real_browser(server, tmp_path):
  """Debian's chromium, its fake microphone playing a question then silence: the page sends the
  turn by voice activity, shows the answer's text and plays its audio chunks as they come."""
  ws_url, url, assets, questions = server
  question = tmp_path / 'question.wav'
  soundfile.write(question, np.concatenate([questions[0], np.zeros(24000)]), 16000,
                  subtype='PCM_16')
  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path='/usr/bin/chromium', args=[
        '--no-sandbox', '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
        f'--use-file-for-fake-audio-capture={question}',
        '--autoplay-policy=no-user-gesture-required'])
    try:
      page = browser.new_page()
      page.goto(url)
      page.click('#mic')
      # The fake microphone loops its file: turns follow until one has been spoken and played.
      page.wait_for_function('window.stats.chunksPlayed > 0', timeout=1000 * SESSION_SECONDS)
      stats = page.evaluate('window.stats')
      transcript = page.inner_text('#transcript')
      screenshot = tmp_path / 'page.png'
      page.screenshot(path=str(screenshot))
      print(f'screenshot of the page: {screenshot}')
    finally:
      browser.close()
  assert stats['turns'] >= 1 and stats['chunksReceived'] >= stats['chunksPlayed'] > 0
  assert 'you: (' in transcript and f"model: {stats['lastAnswer']}" in transcript
  assert 'first text' in transcript and 'first audio' in transcript
  assert screenshot.stat().st_size > 0
