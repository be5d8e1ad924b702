"""The serving path without gRPC: the ONNX model contract, cross-stream batching, and the stream state machine.

Real models only: the conftest's tiny random-weight policy (gibberish text, real shapes and timings)
and, where speech and pauses matter, the voice-activity variant from server_support.
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import pytest
from conftest import TINY_VERSION
from server_support import VOICE_VERSION, chunked, noise, pcm16, silence, voiced
from voxloop.core.decoder import CtcGreedyDecoder
from voxloop.core.model import ModelFormatError, OnnxModel
from voxloop.core.pcm import pcm16_to_float
from voxloop.core.registry import Registry, RegistryError
from voxloop.server.app import load_serving_model
from voxloop.server.batcher import InferenceError
from voxloop.server.config import ServerConfig
from voxloop.server.endpoint import EndpointRule
from voxloop.server.stream import (
    EndOfSingleUtterance,
    FinishedUtterance,
    RecognitionOptions,
    RecognitionResult,
    RecognitionStream,
)

NO_ENDPOINTS = dict(trailing_silence_before_speech_s=300, trailing_silence_after_speech_s=300, max_utterance_s=300)
CHUNK_100MS = 3200  # bytes of 16 kHz LINEAR16


def model_path(registry, version):
    return registry / "versions" / version / "model.onnx"


class RecordingModel:
    """A ServingModel stand-in that forwards to the real one and keeps every chunk's log-probs."""

    def __init__(self, serving):
        self._serving = serving
        self.version, self.spec, self.card = serving.version, serving.spec, serving.card
        self.log_probs: list[np.ndarray] = []

    def initial_state(self):
        return self._serving.initial_state()

    def new_decoder(self, previous_token):
        return self._serving.new_decoder(previous_token)

    async def infer(self, audio, state):
        log_probs, state = await self._serving.infer(audio, state)
        self.log_probs.append(log_probs)
        return log_probs, state

    def pause_segments(self, start_s, max_alternatives):
        return self._serving.pause_segments(start_s, max_alternatives)

    async def final_hypotheses(self, decoder, audio, start_s, max_alternatives, segments=None):
        return await self._serving.final_hypotheses(decoder, audio, start_s, max_alternatives, segments)


async def _run_streams(registry, config, streams, wrap=lambda serving: serving, open_streams=1):
    """Run [(options, messages)] concurrently through one model's batcher; returns events, sink, model."""
    serving = load_serving_model(Registry(registry), config, open_streams=lambda: open_streams)
    serving.batcher.start()
    model, finished = wrap(serving), []

    async def sink(utterance: FinishedUtterance) -> None:
        finished.append(utterance)

    async def one(options, messages):
        stream = RecognitionStream(options, config, lambda: model, on_utterance=sink)
        events = []
        for message in messages:
            events += [e async for e in stream.feed(message)]
        events += [e async for e in stream.finish()]
        return events

    try:
        results = await asyncio.gather(*(one(options, messages) for options, messages in streams))
    finally:
        await serving.batcher.close()
    return results, finished, model


def run_stream(registry, messages, config=None, wrap=lambda serving: serving, **options):
    options = RecognitionOptions(**{"sample_rate_hz": 16000, **options})
    config = config or ServerConfig()
    [events], finished, model = asyncio.run(_run_streams(registry, config, [(options, messages)], wrap))
    return events, finished, model


def finals(events):
    return [e for e in events if isinstance(e, RecognitionResult) and e.is_final]


# --- the model contract ---------------------------------------------------------------------------

def _with_metadata(source, target, **changes):
    proto = onnx.load(str(source))
    for entry in proto.metadata_props:
        if entry.key in changes:
            entry.value = changes[entry.key]
    onnx.save(proto, str(target))
    return target


def test_model_metadata_gives_the_streaming_geometry(tiny_registry_template):
    model = OnnxModel(model_path(tiny_registry_template, TINY_VERSION))
    spec = model.spec
    assert (spec.format, spec.version, spec.sample_rate_hz) == ("streaming-ctc/1", TINY_VERSION, 16000)
    assert (spec.chunk_samples, spec.lookback_samples, spec.frame_shift_s) == (3200, 240, 0.04)
    assert spec.frames_for(spec.chunk_samples + spec.lookback_samples) == spec.chunk_frames == 5
    assert {s.name for s in model.state_inputs} == {"att_cache", "conv_cache", "cache_len"}
    log_probs, state = model.run(np.zeros((3, 3440), np.float32), model.initial_state(3))
    assert log_probs.shape == (3, 5, len(spec.vocabulary))
    assert all(value.shape[0] == 3 for value in state.values())


def test_model_of_an_unknown_format_is_refused_with_the_supported_ones(tiny_registry_template, tmp_path):
    path = _with_metadata(model_path(tiny_registry_template, TINY_VERSION), tmp_path / "m.onnx",
                          **{"voxloop.format": "streaming-ctc/9"})
    with pytest.raises(ModelFormatError, match=r"'streaming-ctc/9' is not supported.*streaming-ctc/1"):
        OnnxModel(path)


def test_model_for_another_sample_rate_is_refused(tiny_registry_template, tmp_path):
    path = _with_metadata(model_path(tiny_registry_template, TINY_VERSION), tmp_path / "m.onnx",
                          **{"voxloop.sample_rate_hz": "8000"})
    with pytest.raises(ModelFormatError, match="re-export it for 16000 Hz"):
        OnnxModel(path)


@pytest.mark.slow
def test_a_windowed_hf_graph_is_served_by_the_same_stream_code(tmp_path):
    from test_hf_import import make_tiny_wav2vec2
    from voxloop.trainer.hf_import import export_hf_ctc

    onnx_path = export_hf_ctc(make_tiny_wav2vec2(tmp_path / "wav2vec2"), tmp_path / "export" / "model.onnx", "hf-0001")
    Registry(tmp_path / "registry").publish("hf-0001", {"model.onnx": onnx_path}, {"parent_version": None})
    events, finished, recorder = run_stream(tmp_path / "registry", chunked(pcm16(noise(1.3)), CHUNK_100MS),
                                            ServerConfig(**NO_ENDPOINTS), wrap=RecordingModel)
    assert recorder.spec.format == "windowed-ctc/1"
    assert sum(len(p) for p in recorder.log_probs) == 1.3 * 16000 // 320  # one frame per 20 ms, tail included
    assert [f.model_version for f in finished] == ["hf-0001"] and finals(events)[0].model_version == "hf-0001"


# --- batching and streaming equivalence -----------------------------------------------------------

def test_chunked_streaming_decode_equals_whole_utterance_decode(tiny_registry_template):
    audio = noise(3.3, seed=1)[:-77]  # not a whole number of chunks: the tail is decoded at the end
    config = ServerConfig(**NO_ENDPOINTS)
    events, _, recorder = run_stream(tiny_registry_template, chunked(pcm16(audio), 1234), config,
                                     wrap=RecordingModel)

    model = OnnxModel(model_path(tiny_registry_template, TINY_VERSION))
    whole, _ = model.run(decode_audio(audio)[None], model.initial_state(1))  # (1, T, V)
    streamed = np.concatenate(recorder.log_probs)  # (T, V)
    assert streamed.shape == whole[0].shape
    np.testing.assert_allclose(streamed, whole[0], atol=1e-4)
    decoder = CtcGreedyDecoder(model.spec.vocabulary, model.spec.frame_shift_s)
    decoder.feed(whole[0], 0.0)
    [final] = finals(events)
    assert final.hypothesis.transcript == decoder.hypothesis().transcript


def decode_audio(samples):
    """What the server sees of float audio sent as LINEAR16."""
    return pcm16_to_float(pcm16(samples))


def test_chunks_of_concurrent_streams_run_in_one_model_call_and_match_one_by_one(tiny_registry_template):
    config = ServerConfig(batch_max_wait_ms=50)
    windows = [decode_audio(noise(0.215, seed=s)) for s in range(4)]  # (3440,) each: one chunk

    async def batched():
        serving = load_serving_model(Registry(tiny_registry_template), config, open_streams=lambda: 4)
        serving.batcher.start()
        try:
            return await asyncio.gather(*(serving.infer(w, serving.initial_state()) for w in windows)), serving
        finally:
            await serving.batcher.close()

    results, serving = asyncio.run(batched())
    assert (serving.batcher.stats.calls, serving.batcher.stats.rows) == (1, 4)
    for window, (log_probs, state) in zip(windows, results, strict=True):
        alone, alone_state = serving.model.run(window[None], serving.model.initial_state(1))
        np.testing.assert_allclose(log_probs, alone[0], atol=1e-5)
        for name, value in alone_state.items():
            np.testing.assert_allclose(state[name], value, atol=1e-5)


def test_a_failing_model_call_fails_its_streams_as_internal_and_the_batcher_goes_on(tiny_registry_template):
    serving = load_serving_model(Registry(tiny_registry_template), ServerConfig(), open_streams=lambda: 1)
    real_run, calls = serving.model.run, []

    def run_failing_once(audio, state):
        calls.append(len(audio))
        if len(calls) == 1:
            raise ValueError("shapes do not match")  # numpy's error type must not look like bad input
        return real_run(audio, state)

    serving.model.run = run_failing_once
    window = decode_audio(noise(0.215))

    async def twice():
        serving.batcher.start()
        try:
            with pytest.raises(InferenceError, match=f"model {TINY_VERSION} failed"):
                await serving.infer(window, serving.initial_state())
            return await serving.infer(window, serving.initial_state())
        finally:
            await serving.batcher.close()

    log_probs, _ = asyncio.run(twice())
    assert log_probs.shape == (5, len(serving.spec.vocabulary))


def test_concurrent_streams_decode_as_they_would_alone(tiny_registry_template):
    config = ServerConfig(batch_max_wait_ms=50, **NO_ENDPOINTS)
    options = RecognitionOptions(sample_rate_hz=16000)
    audios = [noise(1.0, seed=s) for s in range(4)]
    together, _, _ = asyncio.run(_run_streams(
        tiny_registry_template, config, [(options, chunked(pcm16(a), CHUNK_100MS)) for a in audios], open_streams=4))
    alone = [run_stream(tiny_registry_template, chunked(pcm16(a), CHUNK_100MS), config)[0] for a in audios]
    assert [finals(events)[0].hypothesis for events in together] == [finals(events)[0].hypothesis for events in alone]


# --- the stream state machine ---------------------------------------------------------------------

def test_interim_results_come_every_200_ms_of_audio_even_when_the_text_is_unchanged(tiny_registry_template):
    events, _, _ = run_stream(tiny_registry_template, chunked(pcm16(silence(2.0)), 1600),
                              ServerConfig(**NO_ENDPOINTS), interim_results=True)
    processed = [e.audio_processed_s for e in events]
    interims = [e for e in events if not e.is_final]
    assert len(interims) >= 9
    assert processed == sorted(processed) and processed[-1] == pytest.approx(2.0)
    assert max(np.diff([0.0, *processed])) <= 0.2 + 1e-6
    assert len({e.utterance_id for e in events}) == 1 and events[-1].is_final


def test_no_interim_results_unless_asked(tiny_registry_template):
    events, _, _ = run_stream(tiny_registry_template, chunked(pcm16(noise(1.0)), CHUNK_100MS))
    assert [e.is_final for e in events] == [True]


def test_long_pauses_split_a_stream_into_utterances_with_their_own_ids(voice_registry):
    audio = np.concatenate([voiced(0.8), silence(1.6), voiced(0.8), silence(1.6), voiced(0.6), silence(0.3)])
    events, finished, _ = run_stream(voice_registry, chunked(pcm16(audio), CHUNK_100MS),
                                     interim_results=True, user_id="u1", session_id="s1")
    results = finals(events)

    assert [r.hypothesis.transcript for r in results] == ["a", "a", "a"]
    assert [r.endpoint for r in results] == [EndpointRule.SILENCE_AFTER_SPEECH] * 2 + [None]
    assert len({r.utterance_id for r in results}) == 3
    # Utterances tile the stream: each starts where the previous one ended.
    assert results[0].start_s == 0.0
    assert [r.start_s for r in results[1:]] == pytest.approx([r.end_s for r in results[:-1]])
    assert results[-1].end_s == pytest.approx(len(audio) / 16000)
    # Words sit on the voiced stretches (0-0.8 s, 2.4-3.2 s, 4.8-5.4 s), within a frame or two.
    starts = [r.hypothesis.words[0].start_s for r in results]
    assert starts == pytest.approx([0.0, 2.4, 4.8], abs=0.12)
    # Every result before a final belongs to its utterance; the sink got each final utterance.
    assert [f.utterance_id for f in finished] == [r.utterance_id for r in results]
    assert all(f.model_version == VOICE_VERSION and f.user_id == "u1" and f.session_id == "s1" for f in finished)
    assert sum(f.duration_s for f in finished) == pytest.approx(len(audio) / 16000)
    assert finished[0].audio.dtype == np.int16 and len(finished[0].audio) == round(finished[0].duration_s * 16000)


def test_an_utterance_is_cut_at_max_utterance_s(voice_registry):
    syllables = np.concatenate([np.concatenate([voiced(0.2), silence(0.2)]) for _ in range(6)])  # 2.4 s
    config = ServerConfig(max_utterance_s=1.0)
    events, _, _ = run_stream(voice_registry, chunked(pcm16(syllables), CHUNK_100MS), config)
    results = finals(events)
    assert [r.endpoint for r in results] == [EndpointRule.MAX_UTTERANCE] * 2 + [None]
    assert [round(r.end_s - r.start_s, 3) for r in results] == [1.0, 1.0, 0.4]


def test_silence_alone_makes_no_utterance_until_the_stream_ends(voice_registry):
    events, finished, _ = run_stream(voice_registry, chunked(pcm16(silence(6.0)), CHUNK_100MS))
    # 2.4 s endpoints of pure silence are dropped; the client still gets one (empty) final at the end.
    [result] = finals(events)
    assert result.hypothesis.transcript == "" and result.endpoint is None
    assert [f.transcript for f in finished] == [""]


def test_single_utterance_ends_the_stream_at_the_first_endpoint(voice_registry):
    audio = np.concatenate([voiced(0.8), silence(1.6), voiced(0.8), silence(0.4)])
    events, finished, _ = run_stream(voice_registry, chunked(pcm16(audio), CHUNK_100MS),
                                     interim_results=True, single_utterance=True)
    assert isinstance(events[-2], EndOfSingleUtterance)
    final = events[-1]
    assert final.is_final and final.hypothesis.transcript == "a" and final.end_s < 2.4
    assert len(finished) == 1


def test_resampled_stereo_44k_audio_decodes_like_16k_mono(voice_registry):
    import torch
    import torchaudio

    mono_16k = np.concatenate([voiced(0.8), silence(1.6), voiced(0.8)])
    mono_44k = torchaudio.functional.resample(torch.from_numpy(mono_16k), 16000, 44100).numpy()
    stereo = np.stack([mono_44k, mono_44k], axis=1)
    events_44k, _, _ = run_stream(voice_registry, chunked(pcm16(stereo), 17640),
                                  sample_rate_hz=44100, channels=2)
    events_16k, _, _ = run_stream(voice_registry, chunked(pcm16(mono_16k), CHUNK_100MS))
    assert [f.hypothesis.transcript for f in finals(events_44k)] == [f.hypothesis.transcript
                                                                    for f in finals(events_16k)] == ["a", "a"]


def test_tampered_model_fails_verification(tiny_registry):
    (tiny_registry / "versions" / TINY_VERSION / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RegistryError, match="sha256"):
        load_serving_model(Registry(tiny_registry), ServerConfig(), open_streams=lambda: 1)


def test_options_name_what_is_wrong():
    with pytest.raises(ValueError, match="encoding must be LINEAR16"):
        RecognitionOptions(sample_rate_hz=16000, encoding="ENCODING_UNSPECIFIED")
    with pytest.raises(ValueError, match="audio_channel_count must be 1..8"):
        RecognitionOptions(sample_rate_hz=16000, channels=9)
