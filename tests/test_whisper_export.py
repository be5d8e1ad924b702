"""The Whisper kind's three graphs against torch, its second pass against transformers, its card."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from voxloop.core.decoder import greedy_ctc_text, serving_vocabulary
from voxloop.core.model import OnnxModel
from voxloop.core.registry import Registry, sha256_file
from voxloop.core.warmup import WarmupFailed, streaming_transcript, warm_up
from voxloop.core.whisper_decoder import SecondPassSettings, WhisperSecondPass
from voxloop.trainer.export import ParityError
from voxloop.trainer.whisper_export import (
    DECODER_FILE,
    ENCODER_FILE,
    DecoderStepWrapper,
    EncoderWrapper,
    check_whisper_parity,
    cross_names,
    export_whisper_graphs,
)
from voxloop.trainer.whisper_model import SilenceCross, WhisperPolicy, _spliced_cross_attention
from whisper_support import DATA_DIR, TINY_WHISPER_VERSION, publish_whisper_version, tiny_whisper_policy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_policy():
    return tiny_whisper_policy(seed=0)


@pytest.fixture(scope="module")
def tiny_registry_with_whisper(tiny_policy, tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper-registry") / "registry"
    publish_whisper_version(tiny_policy, root, TINY_WHISPER_VERSION)
    return Registry(root)


def test_the_three_graphs_match_torch_at_two_lengths(tiny_policy, tmp_path):
    export_whisper_graphs(tiny_policy, tmp_path, "v")
    report = check_whisper_parity(tiny_policy, tmp_path)
    assert report.max_abs_logprob_diff < 1e-3 and report.greedy_transcripts_equal
    assert len(report.lengths_s) == 2 and report.lengths_s[0] != report.lengths_s[1]


def test_a_graph_from_other_weights_is_caught_by_the_parity_check(tiny_policy, tmp_path):
    export_whisper_graphs(tiny_policy, tmp_path / "good", "v")
    export_whisper_graphs(tiny_whisper_policy(seed=1), tmp_path / "other", "v")
    for graph in (ENCODER_FILE, DECODER_FILE):
        broken = tmp_path / f"broken-{graph}"
        shutil.copytree(tmp_path / "good", broken)
        shutil.copyfile(tmp_path / "other" / graph, broken / graph)
        with pytest.raises(ParityError, match="differs from torch"):
            check_whisper_parity(tiny_policy, broken)


def _with_silence_pool(policy: WhisperPolicy, pool: int) -> WhisperPolicy:
    return WhisperPolicy(policy.model, policy.ctc_head, dataclasses.replace(policy.settings, silence_pool=pool)).eval()


def test_graphs_pooling_the_padding_states_match_the_torch_step_they_are_exported_from(tiny_policy, tmp_path):
    pooled = _with_silence_pool(tiny_policy, 10)
    export_whisper_graphs(pooled, tmp_path / "pooled", "v")
    report = check_whisper_parity(pooled, tmp_path / "pooled")
    assert report.max_abs_logprob_diff < 1e-3 and report.greedy_transcripts_equal
    # A decoder attending every padding position is not the pooled policy's.
    export_whisper_graphs(tiny_policy, tmp_path / "exact", "v")
    shutil.copyfile(tmp_path / "exact" / DECODER_FILE, tmp_path / "pooled" / DECODER_FILE)
    with pytest.raises(ParityError, match="alignment"):
        check_whisper_parity(pooled, tmp_path / "pooled")


def test_pooled_padding_states_weigh_as_the_positions_they_stand_for():
    """Groups of equal padding states, each scored log(pool) higher, attend exactly as their positions would;
    with pool 1 the attention is exactly the splice of each row's own positions and the padding after them."""
    generator = torch.Generator().manual_seed(0)
    heads, head_dim, pool, positions = 2, 8, 10, 1500

    def random(*shape):
        return torch.randn(*shape, generator=generator)

    q, keys, values = random(3, heads, 2, head_dim), random(3, heads, 40, head_dim), random(3, heads, 40, head_dim)
    frames = torch.tensor([40, 20, 30])  # each row's own positions; the batch is padded to 40 (garbage after)
    grouped_k, grouped_v = random(1, heads, positions // pool, head_dim), random(1, heads, positions // pool, head_dim)
    constant_groups = (grouped_k.repeat_interleave(pool, dim=2), grouped_v.repeat_interleave(pool, dim=2), pool)
    every_position = (random(1, heads, positions, head_dim), random(1, heads, positions, head_dim), 1)
    for silence_k, silence_v, group in (constant_groups, every_position):
        keys_t, group_values = SilenceCross.pooled(silence_k, silence_v, group)
        weights, attended = _spliced_cross_attention(q, keys, values, keys_t[0], group_values[0], frames, group)
        assert weights.shape == (3, heads, 2, 40 + positions // group)
        for row, own in enumerate(frames.tolist()):
            spliced_k = torch.cat([keys[row, :, :own], silence_k[0, :, own:]], dim=1)  # (heads, 1500, hd)
            spliced_v = torch.cat([values[row, :, :own], silence_v[0, :, own:]], dim=1)
            expected = (q[row] @ spliced_k.transpose(-1, -2)).softmax(-1) @ spliced_v
            assert torch.allclose(attended[row], expected, atol=1e-5)


def test_the_first_pass_streams_chunk_by_chunk_what_torch_computes(tiny_registry_with_whisper, tiny_policy):
    audio, _ = sf.read(DATA_DIR / "two.wav", dtype="float32")
    chunk = tiny_policy.settings.chunk_samples
    audio = audio[: len(audio) // chunk * chunk]  # whole chunks: torch's windows are then exactly the graph's
    model = OnnxModel(tiny_registry_with_whisper.version_dir(TINY_WHISPER_VERSION) / "model.onnx")
    state, pieces = model.initial_state(1), []
    for start in range(0, len(audio), chunk):
        log_probs, state = model.run(audio[None, start : start + chunk], state)
        pieces.append(log_probs[0])
    with torch.no_grad():
        expected = tiny_policy.streaming_ctc_log_probs(torch.from_numpy(audio)).numpy()
    assert np.concatenate(pieces).shape == expected.shape == (len(audio) // 320, 30)
    assert np.abs(np.concatenate(pieces) - expected).max() < 1e-3
    transcript, frames = streaming_transcript(model, audio)
    assert frames == len(expected)
    assert transcript == greedy_ctc_text(expected, serving_vocabulary(list(tiny_policy.settings.ctc_vocabulary)))


def test_the_ctc_head_is_trained_on_the_encoder_states_the_first_pass_streams(tiny_policy):
    """whisper_head caches each chunk's encoder states (float16) and trains the head on them: the head applied
    to that cache gives the streaming log-probs, frame for frame (a partial last chunk included)."""
    from voxloop.trainer.whisper_head import streamed_states

    audio, _ = sf.read(DATA_DIR / "two.wav", dtype="float32")
    assert len(audio) % tiny_policy.settings.chunk_samples  # the last chunk is partial
    states = streamed_states(tiny_policy, audio, batch_windows=4)  # (T, L + 1, D)
    with torch.no_grad():
        expected = tiny_policy.streaming_ctc_log_probs(torch.from_numpy(audio))  # (T, V)
        trained_on = tiny_policy.ctc_head(states.float()[None].transpose(1, 2))[0]  # (T, V), as in training
    assert trained_on.shape == expected.shape == (-(-len(audio) // 320), 30)
    assert (trained_on - expected).abs().max() < 1e-2  # float16 states (measured: 1.3e-4)


def _transformers_greedy(policy, audio: np.ndarray, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own forward pass (no cache) on the spliced encoder states."""
    states = policy.final_encoder_states(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    tokens = list(prompt)
    suppress = set(policy.model.generation_config.begin_suppress_tokens)
    with torch.no_grad():
        for step in range(max_tokens):
            logits = policy.model(encoder_outputs=(states,), decoder_input_ids=torch.tensor([tokens])).logits[0, -1]
            logits[50363:] = -torch.inf
            if step == 0:
                logits[list(suppress)] = -torch.inf
            token = int(logits.argmax())
            if token == 50256:
                break
            tokens.append(token)
    return tokens[len(prompt) :]


def test_the_second_pass_decodes_as_transformers_does(tiny_registry_with_whisper, tiny_policy):
    version_dir = tiny_registry_with_whisper.version_dir(TINY_WHISPER_VERSION)
    card = json.loads((version_dir / "card.json").read_text())
    second_pass = WhisperSecondPass.from_card(card, version_dir)
    audio, _ = sf.read(DATA_DIR / "one.wav", dtype="float32")
    audio = audio[:16000]
    cross, _ = second_pass.encode(audio)
    decoded = second_pass.greedy(cross, max_tokens=12)
    assert list(decoded.tokens) == _transformers_greedy(tiny_policy, audio, [50257, 50362], 12)
    alignment = second_pass.align(cross, decoded.tokens)
    assert alignment.shape == (len(decoded.tokens) + 1, cross["frames"][0] + 1500)  # own positions, then padding
    assert np.allclose(alignment.sum(-1), 1.0, atol=1e-4)  # attention rows are distributions
    # The greedy search keeps the same rows step by step, so a final needs no teacher-forced call for them.
    assert np.allclose(decoded.alignment, alignment[:-1], atol=1e-5)


def test_finals_decoded_together_equal_each_decoded_alone(tiny_registry_with_whisper):
    """Rows of other lengths share the decoder's calls: each attends its own positions, then the padding states."""
    version_dir = tiny_registry_with_whisper.version_dir(TINY_WHISPER_VERSION)
    second_pass = WhisperSecondPass.from_card(json.loads((version_dir / "card.json").read_text()), version_dir)
    one, _ = sf.read(DATA_DIR / "one.wav", dtype="float32")
    three, _ = sf.read(DATA_DIR / "three.wav", dtype="float32")
    utterances = [(one[:16000], 0.0), (three[:6400], 1.0), (three[:20000], 2.0)]
    together = second_pass.transcribe_batch(utterances)
    alone = [second_pass.transcribe(audio, start_s)[0] for audio, start_s in utterances]
    assert [h.transcript for h in together] == [h.transcript for h in alone]
    for batched, single in zip(together, alone, strict=True):  # the same steps, up to float rounding
        assert [(w.start_s, w.end_s) for w in batched.words] == [(w.start_s, w.end_s) for w in single.words]
        assert np.allclose([w.confidence for w in batched.words], [w.confidence for w in single.words], rtol=1e-4)
    assert len({len(audio) for audio, _ in utterances}) == 3 and any(h.words for h in alone)


def test_n_best_finals_are_distinct_with_the_versions_own_transcript_first(tiny_registry_with_whisper):
    version_dir = tiny_registry_with_whisper.version_dir(TINY_WHISPER_VERSION)
    second_pass = WhisperSecondPass.from_card(json.loads((version_dir / "card.json").read_text()), version_dir)
    audio, _ = sf.read(DATA_DIR / "three.wav", dtype="float32")
    one = second_pass.transcribe(audio[:12000], start_s=3.0)
    three = second_pass.transcribe(audio[:12000], start_s=3.0, max_alternatives=3)
    assert three[0].transcript == one[0].transcript
    assert len({h.transcript for h in three}) == len(three) >= 2
    for word in one[0].words:  # timings are in the stream's time, inside the utterance
        assert 3.0 <= word.start_s < word.end_s <= 3.0 + 12000 / 16000 + 0.5
        assert 0.0 < word.confidence <= 1.0


def test_a_whisper_version_has_a_complete_card_and_every_file_verifies(tiny_registry_with_whisper):
    registry = tiny_registry_with_whisper
    card = registry.verify(TINY_WHISPER_VERSION)
    assert card["format"] == "whisper-two-pass/1"
    assert {"model.onnx", ENCODER_FILE, DECODER_FILE, "tokenizer.json", "probe.wav", "policy/config.json",
            "policy/model.safetensors", "policy/ctc_head.safetensors",
            "policy/voxloop_whisper.json"} <= set(card["files"])
    assert card["second_pass"]["type"] == "whisper" and card["second_pass"]["prompt"] == [50257, 50362]
    assert set(card["probe"]) == {"file", "transcript", "final_transcript"}
    assert card["parity"]["greedy_transcripts_equal"] is True
    assert card["model"]["streaming"]["chunk_s"] == 0.4
    for name, digest in card["files"].items():
        assert sha256_file(registry.version_dir(TINY_WHISPER_VERSION) / name) == digest


def test_a_version_whose_decoder_is_another_models_fails_warm_up_on_its_probe(tiny_registry_with_whisper, tmp_path):
    other = Registry(tmp_path / "other")
    publish_whisper_version(tiny_whisper_policy(seed=1), other.root, "other-0001")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_registry_with_whisper.version_dir(TINY_WHISPER_VERSION), broken)
    shutil.copyfile(other.version_dir("other-0001") / DECODER_FILE, broken / DECODER_FILE)
    card = json.loads((broken / "card.json").read_text())
    second_pass = WhisperSecondPass.from_card(card, broken)
    with pytest.raises(WarmupFailed) as failure:
        warm_up(OnnxModel(broken / "model.onnx"), card, broken, second_pass)
    assert failure.value.reason == "probe_mismatch" and "second pass" in str(failure.value)


class _SplicedEncoder(torch.nn.Module):
    """encoder.onnx as exported before 2026-12-03: the padding states' keys and values spliced in, 1500 positions."""

    def __init__(self, policy, decoder_step: DecoderStepWrapper):
        super().__init__()
        self.encoder, self.step = EncoderWrapper(policy), decoder_step

    def forward(self, audio):
        outputs = self.encoder(audio)
        layers, frames = len(outputs) // 2, outputs[0].shape[2]
        silence = [*self.step.silence_keys_t.transpose(-1, -2), *self.step.silence_values]
        return tuple(torch.cat([own, padding[None, :, frames:]], dim=2)
                     for own, padding in zip(outputs, silence[:layers] + silence[layers:], strict=True))


class _SplicedDecoder(torch.nn.Module):
    """decoder.onnx as exported before 2026-12-03: no `frames` input, 1500 positions a row."""

    def __init__(self, decoder_step: DecoderStepWrapper):
        super().__init__()
        self.step = decoder_step

    def forward(self, tokens, self_k, self_v, *cross):
        return self.step(tokens, self_k, self_v, torch.full((tokens.shape[0],), 1500), *cross)


def test_a_version_exported_with_spliced_padding_states_still_decodes(tiny_registry_with_whisper, tiny_policy,
                                                                      tmp_path):
    version_dir = tiny_registry_with_whisper.version_dir(TINY_WHISPER_VERSION)
    card = json.loads((version_dir / "card.json").read_text())
    step = DecoderStepWrapper(tiny_policy, [list(h) for h in tiny_policy.model.generation_config.alignment_heads])
    config = tiny_policy.model.config
    names, heads = cross_names(config.decoder_layers), config.decoder_attention_heads
    hd, layers = config.d_model // heads, config.decoder_layers
    with torch.no_grad():
        torch.onnx.export(_SplicedEncoder(tiny_policy, step).eval(), (torch.zeros(1, 16000),),
                          tmp_path / "encoder.onnx", input_names=["audio"], output_names=names,
                          dynamic_axes={"audio": {1: "samples"}}, dynamo=False)
        torch.onnx.export(_SplicedDecoder(step).eval(), (torch.zeros(1, 2, dtype=torch.long),
                          torch.zeros(layers, 1, heads, 3, hd), torch.zeros(layers, 1, heads, 3, hd),
                          *(torch.zeros(1, heads, 1500, hd) for _ in names)), tmp_path / "decoder.onnx",
                          input_names=["tokens", "self_k", "self_v", *names],
                          output_names=["log_probs", "next_self_k", "next_self_v", "alignment"],
                          dynamic_axes={"tokens": {0: "batch", 1: "length"}, "self_k": {1: "batch", 3: "past"},
                                        "self_v": {1: "batch", 3: "past"}, **{n: {0: "batch"} for n in names}},
                          dynamo=False)
    settings = SecondPassSettings.from_card(card)
    spliced = WhisperSecondPass(tmp_path / "encoder.onnx", tmp_path / "decoder.onnx", version_dir / settings.tokenizer,
                                settings)
    current = WhisperSecondPass.from_card(card, version_dir)
    one, _ = sf.read(DATA_DIR / "one.wav", dtype="float32")
    three, _ = sf.read(DATA_DIR / "three.wav", dtype="float32")
    utterances = [(one[:16000], 0.0), (three[:9600], 1.0)]
    assert [h.transcript for h in spliced.transcribe_batch(utterances)] == \
        [current.transcribe(audio, start_s)[0].transcript for audio, start_s in utterances]
    # A beam's rows: one copy of the keys and values per row there, one shared by the rows here.
    n_best = [[h.transcript for h in second_pass.transcribe(three[:9600], 1.0, max_alternatives=3)]
              for second_pass in (spliced, current)]
    assert n_best[0] == n_best[1] and len(n_best[0]) >= 2


def test_int8_leaves_the_padding_states_keys_and_values_in_fp32(tiny_policy, tmp_path):
    """The decoder's padding-state constants are attention inputs, not weights: int8 would round every row's
    scores over the 1500 - F positions it does not own."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from voxloop.trainer.whisper_export import _silence_matmuls, export_decoder

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    pooled = _with_silence_pool(tiny_policy, 10)
    export_decoder(pooled, fp32, [list(h) for h in tiny_policy.model.generation_config.alignment_heads])
    excluded = _silence_matmuls(fp32)
    assert len(excluded) == 2 * tiny_policy.model.config.decoder_layers  # keys and values, every layer
    quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded)
    initializers = onnx.load(str(int8)).graph.initializer
    silence = [i for i in initializers if 1500 // 10 in i.dims and len(i.dims) == 3]  # (heads, hd, G), (heads, G, hd)
    assert len(silence) == len(excluded) and all(i.data_type == onnx.TensorProto.FLOAT for i in silence)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in initializers)  # the weights were quantized
