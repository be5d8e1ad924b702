"""The Whisper default through a real server: finals equal the offline decode, swaps to and from CTC
versions with streams open, `voxloop serve` on an empty registry serves it."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading

import numpy as np
import pytest
from server_support import chunked, pcm16, silence
from support import wait_for
from swap_support import publish_copy
from voxloop.clients.client import RecognizerClient, recognition_config
from voxloop.core.pcm import pcm16_to_float, read_wav
from voxloop.core.registry import Registry
from voxloop.core.whisper_decoder import WhisperSecondPass
from voxloop.server.app import BackgroundServer
from voxloop.server.config import BASE_MODEL_DIR, ServerConfig
from voxloop.trainer.whisper_import import ImportRecipe
from whisper_support import DATA_DIR

pytestmark = pytest.mark.slow

CHUNK_100MS = 3200
WHISPER_VERSION = ImportRecipe.named("whisper-tiny.en").version


def speech(*names: str, pause_s: float = 1.5) -> np.ndarray:
    """The test sentences (espeak-ng, 16 kHz) one after another, each followed by `pause_s` of silence."""
    return np.concatenate([np.concatenate([read_wav(DATA_DIR / n, 16000), silence(pause_s)]) for n in names])


def finals(client: RecognizerClient, audio: np.ndarray, **config) -> list:
    config = recognition_config(16000, interim_results=True, **config)
    return [r for response in client.streaming_recognize(chunked(pcm16(audio), CHUNK_100MS), config, timeout=120)
            for r in response.results if r.is_final]


def test_streaming_finals_are_the_offline_decode_of_each_stored_utterance(whisper_registry, tmp_path):
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry)
    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=120) as client:
        results = finals(client, speech("one.wav", "two.wav"))
        info = client.get_model_info()
    assert info.version == WHISPER_VERSION
    transcripts = [r.alternatives[0].transcript for r in results]
    assert transcripts == ["the meeting starts at nine in the morning", "please turn off the lights in the kitchen"]
    version_dir = Registry(whisper_registry).version_dir(WHISPER_VERSION)
    second_pass = WhisperSecondPass.from_card(json.loads((version_dir / "card.json").read_text()), version_dir)
    with sqlite3.connect(tmp_path / "data" / "feedback.sqlite3") as db:
        for result in results:
            (audio_bytes, hypothesis), = db.execute("SELECT audio, hypothesis FROM utterances WHERE id = ?",
                                                    (result.utterance_id,))
            stored = pcm16_to_float(audio_bytes)
            assert hypothesis == result.alternatives[0].transcript
            assert second_pass.transcribe(stored)[0].transcript == hypothesis
    for result in results:
        words = result.alternatives[0].words
        assert result.model_version == WHISPER_VERSION and 0 < result.alternatives[0].confidence <= 1
        starts = [w.start_offset.ToTimedelta().total_seconds() for w in words]
        assert starts == sorted(starts) and len(words) == len(result.alternatives[0].transcript.split())


def test_the_speech_before_a_long_pause_goes_to_the_second_pass_as_the_pause_ends(whisper_registry, tmp_path):
    """A ~0.9 s pause (shorter than the endpoint's 1.2 s) inside one utterance: the shipped card cuts it there,
    the stream sends each segment as its pause ends, and the final is the offline decode's of the whole."""
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry)
    audio = np.concatenate([read_wav(DATA_DIR / "one.wav", 16000), silence(0.7), speech("two.wav")])
    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=120) as client:
        results = finals(client, audio)
        stats = running.server.model.finals.stats
    (result,) = results
    assert result.alternatives[0].transcript == ("the meeting starts at nine in the morning "
                                                 "please turn off the lights in the kitchen")
    assert stats.finals == 2  # one per segment; the trailing silence after the last cut is not decoded
    version_dir = Registry(whisper_registry).version_dir(WHISPER_VERSION)
    second_pass = WhisperSecondPass.from_card(json.loads((version_dir / "card.json").read_text()), version_dir)
    with sqlite3.connect(tmp_path / "data" / "feedback.sqlite3") as db:
        (audio_bytes,), = db.execute("SELECT audio FROM utterances WHERE id = ?", (result.utterance_id,))
    stored = pcm16_to_float(audio_bytes)
    assert len(second_pass.segments(stored)) == 2
    offline = second_pass.transcribe(stored)[0]
    assert offline.transcript == result.alternatives[0].transcript
    starts = [w.start_offset.ToTimedelta().total_seconds() for w in result.alternatives[0].words]
    assert starts == pytest.approx([w.start_s for w in offline.words], abs=1e-3)
    assert starts[8] > len(read_wav(DATA_DIR / "one.wav", 16000)) / 16000 + 0.5  # "please": after the pause


def test_a_noise_cut_off_at_a_pause_is_not_written_as_words(whisper_version_dir):
    """0.8 s of loud noise, a pause, a sentence (and the reverse): the noise is a segment of its own, which
    Whisper alone writes as words ("there you go"); its no-speech probability drops it, as the whole
    utterance decoded at once ignores it."""
    noise = (0.056 * np.random.default_rng(0).standard_normal(12800)).astype(np.float32)  # -25 dBFS
    sentence = read_wav(DATA_DIR / "one.wav", 16000)
    second_pass = _second_pass(whisper_version_dir)
    assert second_pass.settings.no_speech_threshold is not None
    for audio in (np.concatenate([silence(0.3), noise, silence(0.8), sentence]),
                  np.concatenate([sentence, silence(0.8), noise, silence(0.3)])):
        assert len(second_pass.segments(audio)) == 2
        assert second_pass.transcribe(audio)[0].transcript == "the meeting starts at nine in the morning"
        assert second_pass.transcribe_batch([(audio, 0.0)])[0].transcript == "the meeting starts at nine in the morning"
    without = _second_pass(whisper_version_dir, no_speech_threshold=None)
    noisy = without.transcribe(np.concatenate([silence(0.3), noise, silence(0.8), sentence]))[0].transcript
    assert noisy != "the meeting starts at nine in the morning"  # the check is what keeps the noise out


def test_interim_results_stream_from_the_first_pass_before_the_final(whisper_registry, tmp_path):
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry)
    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=120) as client:
        responses = list(client.streaming_recognize(chunked(pcm16(speech("three.wav")), CHUNK_100MS),
                                                    recognition_config(16000, interim_results=True), timeout=120))
    results = [r for response in responses for r in response.results]
    finals = [i for i, r in enumerate(results) if r.is_final]
    assert len(finals) == 1 and results[finals[0]].alternatives[0].transcript == "the train leaves the station at noon"
    before = results[: finals[0]]  # after the final, the trailing pause's interims carry audio_processed only
    assert len(before) >= 5 and any(r.alternatives[0].transcript for r in before)
    assert all(0.0 <= r.stability <= 1.0 for r in before)
    assert all(not r.alternatives[0].transcript for r in results[finals[0] + 1 :])


def test_max_alternatives_gives_whisper_n_best_with_the_greedy_final_first(whisper_registry, tmp_path):
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry)
    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=120) as client:
        (result,) = finals(client, speech("two.wav"), max_alternatives=3)
    transcripts = [a.transcript for a in result.alternatives]
    assert transcripts[0] == "please turn off the lights in the kitchen"
    assert 1 <= len(transcripts) <= 3 and len(set(transcripts)) == len(transcripts)


def _finals_across_a_swap(config: ServerConfig, registry: Registry, before: str, after: str,
                          streams: int = 3) -> list[list[tuple[str, str]]]:
    """Open `streams` streams on `before`, swap to `after` while each is mid-utterance, then let each finish
    that utterance and speak one more; returns every stream's (model_version, transcript) finals."""
    sentence = read_wav(DATA_DIR / "one.wav", 16000)
    pcm = pcm16(np.concatenate([sentence, silence(2.0)]))
    swapped, seen, errors = threading.Event(), [], []

    def audio():
        yield from chunked(pcm[: len(pcm) // 3], CHUNK_100MS)  # mid-utterance ...
        swapped.wait(60)  # ... across the swap
        yield from chunked(pcm[len(pcm) // 3 :], CHUNK_100MS)
        yield from chunked(pcm, CHUNK_100MS)  # a second utterance after it

    def stream(target: str) -> None:
        try:
            with RecognizerClient(target, timeout=120) as client:
                seen.append([(r.model_version, r.alternatives[0].transcript) for response in
                             client.streaming_recognize(audio(), recognition_config(16000), timeout=120)
                             for r in response.results if r.is_final])
        except BaseException as e:  # noqa: BLE001 (the test reports it)
            errors.append(e)

    registry.activate(before)
    with BackgroundServer(config) as running:
        wait_for(lambda: running.server.model.version == before, timeout_s=60, what=f"serving {before}")
        threads = [threading.Thread(target=stream, args=(running.target,)) for _ in range(streams)]
        for thread in threads:
            thread.start()
        wait_for(lambda: running.server.active_streams == streams, timeout_s=30, what="open streams")
        registry.activate(after)
        wait_for(lambda: running.server.model.version == after, timeout_s=120, what=f"swap to {after}")
        swapped.set()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    return seen


def test_hot_swap_between_a_ctc_and_a_whisper_version_with_streams_open(whisper_registry, tmp_path):
    """Streams opened on one kind finish their utterance on it; their next utterance gets the other kind."""
    registry = Registry(whisper_registry)
    base_version = json.loads((BASE_MODEL_DIR / "card.json").read_text())["version"]
    publish_copy(whisper_registry, BASE_MODEL_DIR, base_version, activate=False)
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry,
                          model_watch_interval_s=0.05)
    for before, after in ((WHISPER_VERSION, base_version), (base_version, WHISPER_VERSION)):
        seen = _finals_across_a_swap(config, registry, before, after)
        assert len(seen) == 3
        for versions in seen:
            assert [v for v, _ in versions] == [before, after], versions
            assert dict(versions)[WHISPER_VERSION] == "the meeting starts at nine in the morning"


def test_voxloop_serve_on_an_empty_registry_serves_the_whisper_default(whisper_version_dir, tmp_path, monkeypatch):
    """The README's first command: no model flags; the shipped recipe's version (built under <data_dir>/shipped,
    here the session's build copied there) seeds the registry."""
    from voxloop.clients.demo import ServerProcess, user_token

    monkeypatch.delenv("VOXLOOP_SHIPPED_MODEL_DIR")
    data_dir = tmp_path / "home"
    shutil.copytree(whisper_version_dir, data_dir / "shipped" / WHISPER_VERSION)
    with ServerProcess(data_dir, in_process_trainer=False) as server:
        assert server.wait_ready(timeout_s=300) == WHISPER_VERSION
        with RecognizerClient(server.target, token=user_token(0), timeout=120) as client:
            (result,) = finals(client, speech("two.wav"))
    assert result.alternatives[0].transcript == "please turn off the lights in the kitchen"
    assert (data_dir / "registry" / "CURRENT").read_text().strip() == WHISPER_VERSION


def _second_pass(version_dir, **second_pass) -> WhisperSecondPass:
    card = json.loads((version_dir / "card.json").read_text())
    card["second_pass"].update(second_pass)
    return WhisperSecondPass.from_card(card, version_dir)


def test_a_versions_context_words_bias_its_finals_toward_their_spelling(whisper_version_dir):
    audio = read_wav(DATA_DIR / "three.wav", 16000)  # "the train leaves the station at noon"
    plain = _second_pass(whisper_version_dir).transcribe(audio)[0].transcript
    assert plain == "the train leaves the station at noon"
    # At the measured bonuses an unrelated context word changes nothing the audio does not suggest ...
    assert _second_pass(whisper_version_dir, context_words=["zebulon", "kalimbrex"]).transcribe(audio)[0].transcript \
        == plain
    # ... and the bonus reaches the search: at an absurd one the word is written whatever was said.
    forced = _second_pass(whisper_version_dir, context_words=["zebulon"], context_start_bonus=50.0,
                          context_continue_bonus=100.0).transcribe(audio)[0].transcript
    assert "zebulon" in forced.split()


def test_a_final_is_decoded_from_its_speech_and_timed_in_the_whole_utterance(whisper_version_dir):
    """The shipped card cuts the silence at an utterance's edges before the second pass: the same words at the
    same times (in the stream's clock) as decoding the whole utterance, the first word after the pause."""
    audio = np.concatenate([silence(1.5), read_wav(DATA_DIR / "three.wav", 16000), silence(1.2)])
    cut, whole = _second_pass(whisper_version_dir), _second_pass(whisper_version_dir, trim_margin_s=None)
    decoded, decoded_start_s = cut.speech(audio, start_s=2.0)
    assert len(decoded) < len(audio) - 2 * 16000 and decoded_start_s > 2.0 + 1.0  # most of both silences cut
    (from_speech,), (from_whole,) = cut.transcribe(audio, start_s=2.0), whole.transcribe(audio, start_s=2.0)
    assert from_speech.transcript == from_whole.transcript == "the train leaves the station at noon"
    starts = [[w.start_s for w in h.words] for h in (from_speech, from_whole)]
    assert starts[0] == pytest.approx(starts[1], abs=0.05) and starts[0][0] > 2.0 + 1.5


def test_a_hurried_beam_search_finishes_its_best_beam_greedily_and_an_n_best_is_never_hurried(whisper_version_dir):
    second_pass = _second_pass(whisper_version_dir)
    assert second_pass.settings.beam_size > 1
    cross, _ = second_pass.encode(read_wav(DATA_DIR / "two.wav", 16000))
    beam = second_pass.beam_search(cross, 60, 5)
    assert second_pass.beam_search(cross, 60, 5, hurry=lambda: False) == beam
    # Hurried from its second step: the best first token, then greedy on one row: the greedy transcript.
    hurried = second_pass.beam_search(cross, 60, 5, hurry=lambda: True)
    assert len(hurried) == 1 and hurried[0].tokens == second_pass.greedy(cross, 60).tokens
    asked = iter(range(100))
    assert second_pass.beam_search(cross, 60, 5, hurry=lambda: next(asked) >= 3)[0].tokens  # hurried later
    audio = read_wav(DATA_DIR / "three.wav", 16000)
    assert second_pass.transcribe(audio, max_alternatives=3, hurry=lambda: True) == \
        second_pass.transcribe(audio, max_alternatives=3)


def test_a_card_with_bad_trim_pause_cut_or_no_speech_settings_is_refused(whisper_version_dir):
    from voxloop.core.model import ModelFormatError

    for settings in ({"trim_margin_s": -0.1}, {"trim_margin_s": 0.3, "trim_below_peak_db": 0}):
        with pytest.raises(ModelFormatError, match="trim_margin_s"):
            _second_pass(whisper_version_dir, **settings)
    for settings in ({"segment_pause_s": 0.01}, {"segment_pause_s": 0.6, "segment_quiet_dbfs": 0},
                     {"segment_min_speech_s": 0}):
        with pytest.raises(ModelFormatError, match="segment_pause_s"):
            _second_pass(whisper_version_dir, **settings)
    with pytest.raises(ModelFormatError, match="no_speech_threshold"):
        _second_pass(whisper_version_dir, no_speech_threshold=1.5)


def test_a_card_with_too_many_or_malformed_context_words_is_refused(whisper_version_dir):
    from voxloop.core.model import ModelFormatError

    for words in (["w"] * 257, [""], ["x" * 65]):
        with pytest.raises(ModelFormatError, match="context_words"):
            _second_pass(whisper_version_dir, context_words=words)


def test_finals_of_streams_that_end_together_share_decoder_calls_and_equal_each_decoded_alone(
        whisper_registry, tmp_path):
    """One second-pass thread: while it decodes the first final, the others queue and go in one call."""
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry,
                          second_pass_threads=1, second_pass_max_batch=8)
    names = ["one.wav", "two.wav", "three.wav", "two.wav"]
    transcripts: dict[int, list[str]] = {}
    with BackgroundServer(config) as running:
        def stream(index: int) -> None:
            with RecognizerClient(running.target, timeout=120) as client:
                transcripts[index] = [r.alternatives[0].transcript for r in finals(client, speech(names[index]))]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(names))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        stats = running.server.model.finals.stats
    expected = {"one.wav": "the meeting starts at nine in the morning",
                "two.wav": "please turn off the lights in the kitchen",
                "three.wav": "the train leaves the station at noon"}
    assert [transcripts[i] for i in range(len(names))] == [[expected[name]] for name in names]
    assert stats.finals == len(names) and stats.largest >= 2 and stats.calls < len(names)


def test_a_batch_of_utterances_decodes_to_what_each_decodes_to_alone(whisper_registry):
    version_dir = Registry(whisper_registry).version_dir(WHISPER_VERSION)
    card = json.loads((version_dir / "card.json").read_text())
    card["second_pass"]["beam_size"] = 1  # a batch is decoded greedily: compare with the greedy search alone
    second_pass = WhisperSecondPass.from_card(card, version_dir)
    clips = [read_wav(DATA_DIR / name, 16000) for name in ("one.wav", "two.wav", "three.wav")]
    clips.append(clips[1][: len(clips[1]) // 2])  # a cut-off utterance: fewer tokens, it leaves the batch first
    clips.append(np.concatenate([clips[0], silence(0.8), clips[2]]))  # two segments, joined after the batch
    alone = [second_pass.transcribe(clip, start_s=1.0)[0] for clip in clips]
    together = second_pass.transcribe_batch([(clip, 1.0) for clip in clips])
    # The same words; timings and confidences move a little: the int8 graph scales its activations per
    # call, so a row shares its scale with the others (measured: confidences up to 0.07; the first word
    # after a pause, whose alignment peak lies in a flat stretch, 0.16 s once).
    assert [h.transcript for h in together] == [h.transcript for h in alone]
    for batched, single in zip(together, alone, strict=True):
        timings = [[t for w in h.words for t in (w.start_s, w.end_s)] for h in (batched, single)]
        assert timings[0] == pytest.approx(timings[1], abs=0.2)
        assert sum(a != b for a, b in zip(*timings, strict=True)) <= 2
        assert [w.confidence for w in batched.words] == pytest.approx([w.confidence for w in single.words], abs=0.1)
    assert len({len(h.words) for h in together}) > 1  # rows really ended at different steps


def test_an_operator_can_serve_a_version_with_another_search(whisper_registry, tmp_path):
    """second_pass_beam_size overrides the card's search (a beam version served greedily, or the reverse): the
    version's probe still passes warm-up with its own search; finals are the overriding search's."""
    version_dir = Registry(whisper_registry).version_dir(WHISPER_VERSION)
    card = json.loads((version_dir / "card.json").read_text())
    served_beam = 1 if card["second_pass"]["beam_size"] > 1 else 5
    audio = speech("three.wav")
    config = ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=whisper_registry,
                          second_pass_beam_size=served_beam)
    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=120) as client:
        served = [r.alternatives[0].transcript for r in finals(client, audio)]
        assert running.server.models.current.second_pass.settings.beam_size == served_beam
        (stored,), = sqlite3.connect(tmp_path / "data" / "feedback.sqlite3").execute("SELECT audio FROM utterances")
    card["second_pass"]["beam_size"] = served_beam
    search = WhisperSecondPass.from_card(card, version_dir)
    assert served == [search.transcribe(pcm16_to_float(stored))[0].transcript] and served[0]
