"""Server vs trainer: the gate only means something if the trainer feeds a graph and reads its text the way the
server does. Both use core/model.py's windows and core/decoder.py's greedy text; these tests hold the
paths that use them to the same answers.

- windowing: the windows a server stream feeds (in whatever pieces the client sends) are `ModelSpec.windows`,
  which warm-up, the export parity check and the trainer's evaluation iterate; evaluation's log-probs of a
  windowed graph are the stream's, frame for frame;
- greedy text: the streaming decoder (chunk by chunk, with timings) prints what `greedy_ctc_text` prints for the
  whole utterance, and what the trainer's rewards read of a path (`path_text`, over the policy's token names).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VERSION
from server_support import noise, pcm16
from test_server_stream import CHUNK_100MS, NO_ENDPOINTS, RecordingModel, finals, model_path, run_stream
from voxloop.core.decoder import CtcGreedyDecoder, greedy_ctc_text, path_text, serving_vocabulary
from voxloop.core.model import OnnxModel
from voxloop.core.pcm import pcm16_to_float
from voxloop.core.warmup import streaming_transcript
from voxloop.server.config import ServerConfig
from voxloop.trainer.evaluate import onnx_log_probs, onnx_transcriber
from voxloop.trainer.model import DEFAULT_VOCABULARY

POLICY_VOCABULARY = (*DEFAULT_VOCABULARY, "<s>", "ch")
"""A policy's token names: the blank, "|" between words, letters, <unk> and another special (print nothing),
and a token that prints two characters."""


class WindowRecorder(RecordingModel):
    """A ServingModel stand-in that also keeps the audio of every call the stream makes."""

    def __init__(self, serving):
        super().__init__(serving)
        self.windows: list[np.ndarray] = []

    async def infer(self, audio, state):
        self.windows.append(np.array(audio))
        return await super().infer(audio, state)


def uneven_pieces(data: bytes, seed: int) -> list[bytes]:
    """`data` cut at random even offsets (whole samples): a client's messages are not chunk-aligned."""
    rng = np.random.default_rng(seed)
    cuts = sorted(set((rng.integers(1, len(data) // 2, 12) * 2).tolist()))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.mark.parametrize("seconds", [0.2, 1.0, 3.3])
def test_a_stream_feeds_the_graph_the_windows_of_the_contract_whatever_pieces_arrive(tiny_registry_template,
                                                                                     seconds):
    audio = pcm16_to_float(pcm16(noise(seconds, seed=3)[:-37]))  # what the server hears; not whole chunks
    _, _, recorder = run_stream(tiny_registry_template, uneven_pieces(pcm16(audio), seed=int(seconds * 10)),
                                ServerConfig(**NO_ENDPOINTS), wrap=WindowRecorder)
    expected = [audio[start:end] for start, end in recorder.spec.windows(len(audio))]
    assert [len(w) for w in recorder.windows] == [len(w) for w in expected]
    for fed, window in zip(recorder.windows, expected, strict=True):
        np.testing.assert_array_equal(fed, window)


def test_warm_up_stream_and_evaluation_print_the_same_transcript(tiny_registry_template):
    path = model_path(tiny_registry_template, TINY_VERSION)
    audio = pcm16_to_float(pcm16(noise(2.1, seed=5)[:-11]))
    events, _, _ = run_stream(tiny_registry_template, [pcm16(audio)[i : i + CHUNK_100MS]
                                                       for i in range(0, 2 * len(audio), CHUNK_100MS)],
                              ServerConfig(**NO_ENDPOINTS))
    [final] = finals(events)
    warm_up_transcript, _ = streaming_transcript(OnnxModel(path), audio)
    assert final.hypothesis.transcript  # the tiny random model prints gibberish, but prints something
    assert warm_up_transcript == final.hypothesis.transcript == onnx_transcriber(path)(audio)


@pytest.mark.slow
def test_evaluation_of_a_windowed_graph_gives_the_streams_log_probs_frame_for_frame(tmp_path):
    from test_hf_import import make_tiny_wav2vec2
    from voxloop.core.registry import Registry
    from voxloop.trainer.hf_import import export_hf_ctc

    onnx_path = export_hf_ctc(make_tiny_wav2vec2(tmp_path / "wav2vec2"), tmp_path / "export" / "model.onnx", "hf-0001")
    Registry(tmp_path / "registry").publish("hf-0001", {"model.onnx": onnx_path}, {"parent_version": None})
    audio = pcm16_to_float(pcm16(noise(1.37, seed=2)))  # a tail shorter than a chunk, longer than a frame
    _, _, recorder = run_stream(tmp_path / "registry", uneven_pieces(pcm16(audio), seed=1),
                                ServerConfig(**NO_ENDPOINTS), wrap=RecordingModel)
    forward, graph = onnx_log_probs(onnx_path)
    np.testing.assert_allclose(forward(audio), np.concatenate(recorder.log_probs), atol=1e-6)
    assert len(forward(audio)) == 1.37 * 16000 // 320


def random_log_probs(frames: int, vocabulary_size: int, seed: int) -> np.ndarray:
    """(T, V) log-probs whose best paths have runs, repeats, blanks and word separators."""
    rng = np.random.default_rng(seed)
    best = rng.integers(0, vocabulary_size, frames)
    best[rng.random(frames) < 0.4] = 0  # blanks
    runs = np.repeat(best, rng.integers(1, 4, frames))[:frames]  # repeats that must collapse
    logits = rng.normal(0, 1, (frames, vocabulary_size))
    logits[np.arange(frames), runs] += 6.0
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("seed", range(8))
def test_the_streaming_decoder_prints_what_the_trainer_reads_of_the_same_log_probs(seed):
    printed = tuple(serving_vocabulary(POLICY_VOCABULARY))  # what the graph's metadata carries
    log_probs = random_log_probs(120, len(printed), seed)
    decoder, start = CtcGreedyDecoder(printed, 0.04), 0
    for cut in sorted(np.random.default_rng(seed).integers(0, 120, 6).tolist()) + [120]:  # uneven chunks
        decoder.feed(log_probs[start:cut], start * 0.04)
        start = cut
    streamed = decoder.hypothesis().finalized().transcript
    greedy_path = torch.from_numpy(log_probs).argmax(-1)  # the trainer's greedy candidate (ppo.greedy_paths)
    assert streamed == greedy_ctc_text(log_probs, printed) == greedy_ctc_text(log_probs, POLICY_VOCABULARY)
    assert streamed == path_text(greedy_path, POLICY_VOCABULARY)  # the text a rollout's reward is computed on
    assert "  " not in streamed and streamed == streamed.strip()


def test_the_printed_vocabulary_is_what_the_server_prints_and_maps_to_itself():
    printed = serving_vocabulary(POLICY_VOCABULARY)
    assert printed[0] == "<blank>" and printed[1] == " " and printed[-3:] == ["", "", "ch"]
    assert serving_vocabulary(printed) == printed
