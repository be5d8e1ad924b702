"""ONNX export of the Whisper-based policy: three graphs, each checked against torch at two lengths.

- `model.onnx` (`windowed-ctc/1`, docs/model-format.md): the first pass. (audio (B, C), audio_history
  (B, H)) -> (log_probs (B, C / 320, V) of the CTC head, next_audio_history). The server streams,
  batches and endpoints it like any windowed CTC graph.
- `encoder.onnx`: the second pass's encoder. audio (1, S), S a multiple of 320 -> cross_k_<l>, cross_v_<l>
  (1, heads, F, head_dim) for each decoder layer l: the cross-attention keys and values of the utterance plus
  pad_s of silence, F = S / 320 + pad_s / 0.02 (a final costs the encoder over the utterance only;
  whisper_model.py says why the padding).
- `decoder.onnx`: one decoder step with a key/value cache. tokens (B, N), self_k/self_v (L, B, heads, P,
  head_dim) of the P tokens before, frames (B,), cross_k_<l>/cross_v_<l> (B, heads, F, head_dim), row b's first
  frames[b] positions its own (rows of a batch padded to the longest) -> log_probs (B, V) of the next token after
  the last, next_self_k/next_self_v (P + N positions), alignment (B, N, F + G): the mean cross-attention of
  Whisper's alignment heads over the own positions and then the padding groups (word timings read the first).
  Each row attends its own positions, then the constant padding states' keys and values (in the graph) up to
  Whisper's 1500, averaged over groups of `silence_pool` positions (G = 1500 / silence_pool): the attention of a
  spliced 30 s window (exactly so with silence_pool 1), without an 18 MB input per row.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core.decoder import greedy_ctc_text, serving_vocabulary
from ..core.model import WINDOWED_CTC_FORMAT, OnnxModel, metadata_props, onnx_session
from ..core.whisper_decoder import FRAMES, encoded_cross
from .export import ONNX_OPSET, ParityError, ParityReport, write_onnx_metadata
from .whisper_ct2 import END_OF_TEXT, NO_TIMESTAMPS, START_OF_TRANSCRIPT
from .whisper_model import (
    ENCODER_STRIDE,
    SAMPLE_RATE_HZ,
    SAMPLES_PER_ENCODER_FRAME,
    WHISPER_POSITIONS,
    SilenceCross,
    WhisperPolicy,
    cross_key_values,
    decoder_states,
    run_encoder,
)

log = logging.getLogger(__name__)

FIRST_PASS_FILE = "model.onnx"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"


class FirstPassWrapper(nn.Module):
    """(audio (B, C), audio_history (B, H)) -> (log_probs (B, floor(C / 320), V), next_audio_history (B, H))."""

    def __init__(self, policy: WhisperPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, audio: torch.Tensor, audio_history: torch.Tensor):
        window = torch.cat([audio_history, audio], dim=1)  # (B, H + C)
        # (B, L + 1, ceil((H + C) / 320), D): every layer's states, which the head mixes.
        states = run_encoder(self.policy.model, self.policy.log_mel(window), all_layers=True)
        first = audio_history.shape[1] // SAMPLES_PER_ENCODER_FRAME
        new_frames = audio.shape[1] // SAMPLES_PER_ENCODER_FRAME
        log_probs = self.policy.ctc_head(states[:, :, first : first + new_frames])
        return log_probs, window[:, audio.shape[1] :]


class EncoderWrapper(nn.Module):
    """audio (1, S), S a multiple of 320 -> cross_k_0..cross_k_{L-1}, cross_v_0..cross_v_{L-1}, each
    (1, heads, F, head_dim): the keys and values of the utterance and pad_s of silence, F = (S + pad) / 320.
    The padding states' after them are constants of the decoder graph (DecoderStepWrapper)."""

    def __init__(self, policy: WhisperPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, audio: torch.Tensor):
        settings = self.policy.settings
        # pad_s of silence, and one frame more that the encoder masks (whisper_model.final_encoder_states).
        padded = F.pad(audio, (0, settings.pad_samples + SAMPLES_PER_ENCODER_FRAME))
        frames = (audio.shape[1] + settings.pad_samples) // SAMPLES_PER_ENCODER_FRAME
        valid = torch.full((audio.shape[0],), 1, dtype=torch.long) * frames
        log_mel = self.policy.log_mel(padded, valid_frames=valid * ENCODER_STRIDE)
        states = run_encoder(self.policy.model, log_mel, valid_frames=valid)[:, :frames]  # (1, F, D)
        keys, values = cross_key_values(self.policy.model, states)  # (L, 1, heads, F, hd)
        return (*keys.unbind(0), *values.unbind(0))  # one output per layer and kind


class DecoderStepWrapper(nn.Module):
    """One decoder call with a self-attention cache (whisper_model.decoder_states): (tokens (B, N), self_k,
    self_v (L, B, heads, P, hd), frames (B,), cross_k_0.., cross_v_0.. (B, heads, F, hd) per layer, row b's
    first frames[b] positions its own) -> (log_probs (B, V) after the last token, next_self_k, next_self_v
    (L, B, heads, P + N, hd), alignment (B, N, F + 1500 / pool)). Each row attends its own positions, then the
    padding states' keys and values (constants here, kept fp32 by int8) up to 1500, as Whisper attends its 30 s
    window, in groups of `silence_pool` positions (the policy's setting unless given)."""

    def __init__(self, policy: WhisperPolicy, alignment_heads: list[list[int]], silence_pool: int | None = None):
        super().__init__()
        self.whisper = policy.model
        self.alignment_heads = tuple(tuple(h) for h in alignment_heads)
        self.silence_pool = policy.settings.silence_pool if silence_pool is None else silence_pool
        with torch.no_grad():
            silence_k, silence_v = cross_key_values(policy.model, policy.silence_states())  # (L, 1, heads, 1500, hd)
            keys_t, values = SilenceCross.pooled(silence_k[:, 0], silence_v[:, 0], self.silence_pool)
        self.register_buffer("silence_keys_t", keys_t)
        self.register_buffer("silence_values", values)
        # The token embedding is also the output projection (tied). Held once, as (D, V), and used both
        # ways without a transpose, so the exporter's constant folding cannot make a second 80 MB copy.
        self.register_buffer("embedding_t", policy.model.model.decoder.embed_tokens.weight.detach().t().contiguous())

    def forward(self, tokens, self_k, self_v, frames, *cross):
        layers = len(cross) // 2
        cross_k, cross_v = cross[:layers], cross[layers:]  # per layer (B, heads, F, hd): no Split in the graph
        batch, length = tokens.shape
        embedded = torch.index_select(self.embedding_t, 1, tokens.reshape(-1)).t().reshape(batch, length, -1)
        silence = SilenceCross(self.silence_keys_t, self.silence_values, frames, self.silence_pool)
        states, next_k, next_v, alignment = decoder_states(self.whisper, embedded, self_k, self_v, cross_k, cross_v,
                                                           self.alignment_heads, silence=silence)
        log_probs = torch.log_softmax(states[:, -1] @ self.embedding_t, dim=-1)  # (B, V)
        return log_probs, next_k, next_v, alignment


def first_pass_metadata(policy: WhisperPolicy, version: str) -> dict[str, str]:
    settings = policy.settings
    return metadata_props({
        "format": WINDOWED_CTC_FORMAT, "version": version,
        "vocabulary": serving_vocabulary(list(settings.ctc_vocabulary)), "sample_rate_hz": SAMPLE_RATE_HZ,
        "hop_samples": SAMPLES_PER_ENCODER_FRAME, "subsampling": 1, "chunk_frames": settings.chunk_frames,
        "chunk_samples": settings.chunk_samples, "lookback_samples": 0, "history_samples": settings.history_samples,
    })


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False)


def export_first_pass(policy: WhisperPolicy, path: Path, version: str) -> Path:
    s = policy.settings
    _export(FirstPassWrapper(policy), (torch.zeros(1, s.chunk_samples), torch.zeros(1, s.history_samples)), path,
            ["audio", "audio_history"], ["log_probs", "next_audio_history"],
            {"audio": {0: "batch", 1: "samples"}, "audio_history": {0: "batch"},
             "log_probs": {0: "batch", 1: "frames"}, "next_audio_history": {0: "batch"}})
    write_onnx_metadata(path, first_pass_metadata(policy, version))
    return path


def cross_names(layers: int) -> list[str]:
    """The encoder's outputs and the decoder's inputs: one per layer and kind."""
    return [f"cross_k_{i}" for i in range(layers)] + [f"cross_v_{i}" for i in range(layers)]


def export_encoder(policy: WhisperPolicy, path: Path) -> Path:
    names = cross_names(policy.model.config.decoder_layers)
    _export(EncoderWrapper(policy), (torch.zeros(1, 2 * SAMPLE_RATE_HZ),), path, ["audio"], names,
            {"audio": {1: "samples"}, **{name: {2: "positions"} for name in names}})
    return path


def export_decoder(policy: WhisperPolicy, path: Path, alignment_heads: list[list[int]]) -> Path:
    config = policy.model.config
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    head_dim = config.d_model // heads
    names = cross_names(layers)
    args = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(layers, 1, heads, 3, head_dim),
            torch.zeros(layers, 1, heads, 3, head_dim), torch.tensor([90]),
            *(torch.zeros(1, heads, 100, head_dim) for _ in names))
    cache_axes = {1: "batch", 3: "past"}
    _export(DecoderStepWrapper(policy, alignment_heads), args, path,
            ["tokens", "self_k", "self_v", "frames", *names], ["log_probs", "next_self_k", "next_self_v", "alignment"],
            {"tokens": {0: "batch", 1: "length"}, "self_k": cache_axes, "self_v": cache_axes, "frames": {0: "batch"},
             **{name: {0: "batch", 2: "positions"} for name in names}, "log_probs": {0: "batch"},
             "next_self_k": {1: "batch", 3: "total"}, "next_self_v": {1: "batch", 3: "total"},
             "alignment": {0: "batch", 1: "length"}})
    return path


def export_whisper_graphs(policy: WhisperPolicy, out_dir: Path, version: str) -> dict[str, Path]:
    """Write the three graphs of a version into `out_dir`; returns {file name: path}."""
    policy = policy.eval()
    alignment_heads = [list(h) for h in policy.model.generation_config.alignment_heads]
    paths = {
        FIRST_PASS_FILE: export_first_pass(policy, out_dir / FIRST_PASS_FILE, version),
        ENCODER_FILE: export_encoder(policy, out_dir / ENCODER_FILE),
        DECODER_FILE: export_decoder(policy, out_dir / DECODER_FILE, alignment_heads),
    }
    log.info("exported %s to %s", ", ".join(paths), out_dir)
    return paths


# --- int8 ---


@dataclass(frozen=True)
class QuantizationReport:
    """How the served int8 graphs compare with the fp32 export that passed parity."""

    first_pass_argmax_agreement: float
    """Share of first-pass frames whose best token is the same (random speech-like windows)."""
    cross_kv_cosine: float
    """Cosine similarity of the encoder's cross keys/values (all positions, two audio lengths)."""
    decoder_argmax_agreement: float
    """Share of decoder steps (teacher-forced on the fp32 graphs' greedy transcript of the probe) whose next
    token is the same."""

    def as_dict(self) -> dict:
        return {"type": "dynamic int8 (onnxruntime quantize_dynamic: MatMul weights, per channel)",
                "first_pass_argmax_agreement": self.first_pass_argmax_agreement,
                "cross_kv_cosine": self.cross_kv_cosine, "decoder_argmax_agreement": self.decoder_argmax_agreement}


MIN_INT8_COSINE = 0.98
MIN_INT8_ARGMAX_AGREEMENT = 0.75
"""The first pass's frames are random audio, where near-ties flip; the decoder's steps are the probe's speech."""


def _decoder_agreement(encoder32, decoder32, decoder8, speech: np.ndarray, max_steps: int = 40) -> float:
    """Share of the fp32 decoder's greedy steps on `speech` (teacher-forced, both decoders on the fp32 encoder's
    keys/values) where the int8 decoder picks the same next token. Speech, not noise: on noise every next-token
    distribution is flat and a near-tie flips with any rounding (an adapted decoder is flatter still there)."""
    names = [o.name for o in encoder32.get_outputs()]
    padded = np.pad(speech, (0, -len(speech) % SAMPLES_PER_ENCODER_FRAME)).astype(np.float32)[None]
    cross = encoded_cross(encoder32, padded)
    first = cross[names[0]]
    empty = np.zeros((len(names) // 2, 1, first.shape[1], 0, first.shape[3]), dtype=np.float32)
    tokens, agreements = [START_OF_TRANSCRIPT, NO_TIMESTAMPS], []
    for _ in range(max_steps):
        feeds = {"tokens": np.array([tokens], dtype=np.int64), "self_k": empty, "self_v": empty, **cross}
        (p32, *_), (p8, *_) = (d.run(None, feeds) for d in (decoder32, decoder8))
        agreements.append(float(p32[0, -1].argmax() == p8[0, -1].argmax()))
        tokens.append(int(p32[0, -1].argmax()))
        if tokens[-1] == END_OF_TEXT:
            break
    return float(np.mean(agreements))


def _silence_matmuls(path: Path) -> list[str]:
    """The MatMul nodes reading the padding states' keys or values, the graph's only per-head (3-D) constants:
    attention stays fp32 (it always was: the other cross-attention MatMuls multiply two activations, which
    dynamic quantization leaves alone)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    silence = {init.name for init in graph.initializer if len(init.dims) == 3}
    return [node.name for node in graph.node if node.op_type == "MatMul" and silence & set(node.input)]


def quantize_graphs(out_dir: Path, probe: np.ndarray, seed: int = 0) -> QuantizationReport:
    """Replace the three fp32 graphs in `out_dir` by int8 ones (dynamic quantization of the MatMul weights, per
    output channel: 2.5-4x faster on CPU, the same WER on the real and synthetic checks; docs/benchmarks.md) and
    compare them with the fp32 ones (the decoder on `probe`, the version's probe utterance); raises ParityError
    when they drift beyond MIN_INT8_*."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    generator = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp)
        for name in (FIRST_PASS_FILE, ENCODER_FILE, DECODER_FILE):
            shutil.move(out_dir / name, fp32 / name)
            quantize_dynamic(str(fp32 / name), str(out_dir / name), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"], nodes_to_exclude=_silence_matmuls(fp32 / name))
        sessions = {graph: (onnx_session(fp32 / graph), onnx_session(out_dir / graph))
                    for graph in (FIRST_PASS_FILE, ENCODER_FILE, DECODER_FILE)}
        history = int(sessions[FIRST_PASS_FILE][0].get_modelmeta().custom_metadata_map["voxloop.history_samples"])
        audio = (0.1 * generator.standard_normal((4, 6400))).astype(np.float32)
        feeds = {"audio": audio, "audio_history": (0.1 * generator.standard_normal((4, history))).astype(np.float32)}
        a, b = (s.run(["log_probs"], feeds)[0] for s in sessions[FIRST_PASS_FILE])
        first_pass = float((a.argmax(-1) == b.argmax(-1)).mean())
        cosines = []
        for seconds in (1.3, 4.7):
            noise = (0.1 * generator.standard_normal((1, round(seconds * 50) * 320))).astype(np.float32)
            names = [o.name for o in sessions[ENCODER_FILE][0].get_outputs()]
            cross32, cross8 = ({n: x for n, x in zip(names, s.run(names, {"audio": noise}), strict=True)}
                               for s in sessions[ENCODER_FILE])
            x, y = (np.concatenate([c[n].ravel() for n in names]) for c in (cross32, cross8))
            cosines.append(float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())))
        agreement = _decoder_agreement(sessions[ENCODER_FILE][0], *sessions[DECODER_FILE], probe)
    report = QuantizationReport(first_pass, min(cosines), agreement)
    if (report.cross_kv_cosine < MIN_INT8_COSINE or min(report.first_pass_argmax_agreement,
                                                          report.decoder_argmax_agreement) < MIN_INT8_ARGMAX_AGREEMENT):
        raise ParityError(f"the int8 graphs drift from the fp32 ones: {report}")
    log.info("int8 graphs: %s", report)
    return report


# --- parity ---


@dataclass(frozen=True)
class WhisperParityConfig:
    """What "the graphs match torch" means for the Whisper kind."""

    max_abs_logprob_diff: float = 2e-3
    """Largest |log p_torch - log p_onnx| of the CTC head and of the decoder's next-token distribution."""
    max_abs_kv_diff: float = 2e-3
    """Largest |k_torch - k_onnx| of the cross-attention keys and values (values reach ~10)."""
    lengths_s: tuple[float, ...] = (1.3, 4.7)
    """Audio lengths checked (two, so a length baked into a graph is caught)."""
    seed: int = 0


def _reference_log_probs(policy: WhisperPolicy, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' own decoder on spliced encoder states: (B, V) log-probs after `tokens` (B, N)."""
    output = policy.model(encoder_outputs=(states,), decoder_input_ids=tokens)
    return torch.log_softmax(output.logits[:, -1], dim=-1)


def _torch_step_log_probs(step: DecoderStepWrapper, prompt: torch.Tensor, more: torch.Tensor,
                          cross: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A torch decoder step's log-probs after `prompt`, then after `more` from its cache, on one row's cross."""
    frames = torch.from_numpy(cross[FRAMES])
    layers_cross = [torch.from_numpy(cross[name]) for name in cross_names(len(step.whisper.model.decoder.layers))]
    heads, head_dim = layers_cross[0].shape[1], layers_cross[0].shape[3]
    empty = torch.zeros(len(layers_cross) // 2, 1, heads, 0, head_dim)
    first, self_k, self_v, _ = step(prompt, empty, empty, frames, *layers_cross)
    second, _, _, _ = step(more, self_k, self_v, frames, *layers_cross)
    return first, second


def check_whisper_parity(policy: WhisperPolicy, out_dir: Path,
                         config: WhisperParityConfig | None = None) -> ParityReport:
    """torch vs the three graphs on speech-like noise at two lengths; raises ParityError.

    First pass: the CTC log-probs of a chunk and a shorter tail with random history. Second pass: the
    encoder's cross keys/values against the torch splice, then the decoder step against transformers'
    own WhisperForConditionalGeneration (prompt of two tokens, then a cached step of three more)."""
    config = config or WhisperParityConfig()
    policy = policy.eval()
    generator = torch.Generator().manual_seed(config.seed)
    first_pass = OnnxModel(out_dir / FIRST_PASS_FILE)  # as the server streams it
    encoder = onnx_session(out_dir / ENCODER_FILE)
    decoder = onnx_session(out_dir / DECODER_FILE)
    wrapper = FirstPassWrapper(policy)
    vocabulary = list(policy.settings.ctc_vocabulary)
    worst_ctc = worst_kv = worst_decoder = 0.0
    equal = True
    s = policy.settings
    alignment_heads = [list(h) for h in policy.model.generation_config.alignment_heads]
    with torch.no_grad():
        served = DecoderStepWrapper(policy, alignment_heads)
        exact = served if served.silence_pool == 1 else DecoderStepWrapper(policy, alignment_heads, silence_pool=1)
        for chunk in (s.chunk_samples, s.chunk_samples // 2 + SAMPLES_PER_ENCODER_FRAME):
            audio = 0.1 * torch.randn(2, chunk, generator=generator)
            history = 0.1 * torch.randn(2, s.history_samples, generator=generator)
            expected, _ = wrapper(audio, history)
            actual, _ = first_pass.run(audio.numpy(), {"audio_history": history.numpy()})
            if expected.shape != actual.shape:
                raise ParityError(f"first pass, {chunk} samples: torch {tuple(expected.shape)}, ONNX {actual.shape}")
            worst_ctc = max(worst_ctc, float(np.abs(expected.numpy() - actual).max()))
            equal &= all(greedy_ctc_text(t, vocabulary) == greedy_ctc_text(o, vocabulary)
                         for t, o in zip(expected.numpy(), actual, strict=True))

        silence = policy.silence_states()
        for seconds in config.lengths_s:
            samples = round(seconds * SAMPLE_RATE_HZ) // SAMPLES_PER_ENCODER_FRAME * SAMPLES_PER_ENCODER_FRAME
            audio = 0.1 * torch.randn(1, samples, generator=generator)
            states = policy.final_encoder_states(audio, torch.tensor([samples]), silence)  # (1, 1500, D)
            expected_k, expected_v = cross_key_values(policy.model, states)
            names = cross_names(len(expected_k))
            cross = encoded_cross(encoder, audio.numpy())
            expected = dict(zip(names, [*expected_k[:, 0], *expected_v[:, 0]], strict=True))
            own = int(cross["frames"][0])
            if own != cross[names[0]].shape[2] or own >= WHISPER_POSITIONS:
                raise ParityError(f"encoder gives {cross[names[0]].shape[2]} positions for {own} frames")
            worst_kv = max(worst_kv, *(float(np.abs(expected[n][:, :own].numpy() - cross[n][0]).max()) for n in names))
            prompt = torch.tensor([[50257, 50362]])
            more = torch.randint(0, 50000, (1, 3), generator=generator)
            first = cross[names[0]]  # (1, heads, F, hd)
            empty = np.zeros((len(expected_k), 1, first.shape[1], 0, first.shape[3]), dtype=np.float32)
            log_probs, self_k, self_v, _ = decoder.run(None, {"tokens": prompt.numpy(), "self_k": empty,
                                                              "self_v": empty, **cross})
            log_probs_2, _, _, alignment = decoder.run(None, {"tokens": more.numpy(), "self_k": self_k,
                                                               "self_v": self_v, **cross})
            groups = WHISPER_POSITIONS // served.silence_pool
            if alignment.shape != (1, 3, own + groups):
                raise ParityError(f"decoder alignment has shape {alignment.shape}, expected (1, 3, {own + groups})")
            # The graph against the torch step it was exported from; that step, unpooled, against transformers.
            served_log_probs = _torch_step_log_probs(served, prompt, more, cross)
            exact_log_probs = served_log_probs if exact is served else _torch_step_log_probs(exact, prompt, more, cross)
            references = (_reference_log_probs(policy, states, prompt),
                          _reference_log_probs(policy, states, torch.cat([prompt, more], dim=1)))
            worst_decoder = max(worst_decoder, *(float(np.abs(t.numpy() - o).max()) for t, o in
                                                 zip(served_log_probs, (log_probs, log_probs_2), strict=True)),
                                *(float((t - r).abs().max()) for t, r in zip(exact_log_probs, references, strict=True)))
            equal &= int(served_log_probs[1].argmax()) == int(log_probs_2.argmax())
    report = ParityReport(max(worst_ctc, worst_decoder), equal, config.lengths_s)
    if (worst_ctc > config.max_abs_logprob_diff or worst_decoder > config.max_abs_logprob_diff
            or worst_kv > config.max_abs_kv_diff or not equal):
        raise ParityError(f"Whisper export differs from torch: first pass max |dlogp| {worst_ctc:.2e}, cross k/v "
                          f"{worst_kv:.2e}, decoder max |dlogp| {worst_decoder:.2e} (limits "
                          f"{config.max_abs_logprob_diff:g} / {config.max_abs_kv_diff:g}); greedy equal: {equal}")
    log.info("Whisper parity: CTC %.2e, cross k/v %.2e, decoder %.2e", worst_ctc, worst_kv, worst_decoder)
    return report
