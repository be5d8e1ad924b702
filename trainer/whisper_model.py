"""The Whisper-based policy: Whisper tiny.en plus a CTC head on its encoder, for two-pass streaming.

Two passes over the same encoder weights (WeNet's U2 idea on Whisper):

- **first pass (interim results, endpointing)**: every `chunk_s` of audio, the encoder runs over a
  short window (`history_s` of past audio + the new chunk, positions sliced from the start of
  Whisper's positional embedding) and a small CTC head turns the chunk's frames into character
  log-probs. This is the `windowed-ctc/1` contract the server already streams, batches and endpoints.
- **second pass (finals)**: at an endpoint the utterance's audio plus `pad_s` of silence is encoded
  once, and the encoder states Whisper would have produced for the rest of its 30 s window (pure
  padding) are spliced in from a constant computed once per version: the decoder sees what it was
  trained on (speech, then padding) at the cost of encoding the utterance only. Without the splice the
  decoder rarely emits end-of-text on short inputs and repeats itself (measured: 190% WER unpadded,
  175% with 2 s of padding, vs 10% spliced on the Debian recordings; docs/benchmarks.md).

Shapes: B batch, S samples (16 kHz), F log-mel frames (10 ms), T encoder frames (20 ms), D d_model,
V vocabulary. Whisper's log-mel: Hann-windowed 400-point STFT, hop 160, 80 Slaney mel bands, log10,
clamped at (max - 8) per input, then (x + 4) / 4 (openai/whisper audio.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import WhisperForConditionalGeneration
from transformers.audio_utils import mel_filter_bank

from ..core.speech_span import BELOW_PEAK_DB, MIN_PAUSE_S, MIN_SPEECH_S, QUIET_DBFS, valid_pause_cut, valid_trim
from ..core.whisper_decoder import valid_no_speech_threshold

log = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
N_FFT = 400
HOP_SAMPLES = 160
N_MELS = 80
ENCODER_STRIDE = 2
"""log-mel frames per encoder frame (conv2 has stride 2)."""
SAMPLES_PER_ENCODER_FRAME = HOP_SAMPLES * ENCODER_STRIDE  # 320: 20 ms
WHISPER_POSITIONS = 1500
"""Encoder frames of Whisper's 30 s window."""
LOG_MEL_FLOOR = 1e-10
LOG_MEL_DYNAMIC_RANGE = 8.0
POLICY_SETTINGS_FILE = "voxloop_whisper.json"
CTC_HEAD_FILE = "ctc_head.safetensors"
CTC_VOCABULARY = ("<blank>", "|", "'", *"abcdefghijklmnopqrstuvwxyz", "<unk>")
"""The first pass's characters, as the shipped CTC model's (trainer/tokenizer.py conventions)."""


@dataclass(frozen=True)
class WhisperPolicyConfig:
    """How the Whisper-based policy streams; saved beside the checkpoint (voxloop_whisper.json)."""

    history_s: float = 1.2
    """First pass: seconds of past audio re-encoded with each chunk (the CTC head's left context)."""
    chunk_s: float = 0.4
    """First pass: seconds of new audio per streaming call (interim results come this often)."""
    pad_s: float = 1.0
    """Second pass: seconds of silence appended to the utterance before encoding it (then the spliced
    padding states follow); with 0 the decoder misses the last word more often."""
    max_audio_s: float = 28.0
    """Longest utterance (with pad_s) the second pass encodes: Whisper's window is 30 s."""
    ctc_hidden: int = 768
    """Width of the CTC head's hidden layer."""
    int8: bool = True
    """Serve int8 graphs (dynamic quantization of the MatMul weights after the fp32 export passed parity)."""
    beam_size: int = 1
    """Beams of the second pass's search for finals (1: greedy; Whisper's own default is 5)."""
    silence_pool: int = 10
    """Second pass graph: the padding states' keys and values are averaged over groups of this many positions
    (1500 / silence_pool groups, each weighing as the positions it stands for), so a decoder step attends
    150 instead of ~1300 padding positions; 1 attends every position, as Whisper does. Same WER on the real
    and held-out sets at 10 and 30 (docs/benchmarks.md); only the exported graph pools, training does not."""
    trim_margin_s: float | None = None
    """Second pass: seconds kept either side of an utterance's speech when the silence at its edges is cut
    before encoding (core/speech_span.py; the trainer encodes its feedback the same way); None: no cut."""
    trim_below_peak_db: float = BELOW_PEAK_DB
    """Second pass: a 20 ms frame is speech within this many dB of the utterance's loudest."""
    segment_pause_s: float | None = None
    """Second pass: utterances are cut at pauses this long and their segments decoded on their own (a stream
    sends each as its pause ends; core/speech_span.py PauseCutter); None: decoded whole. Serving only: the
    trainer encodes feedback whole."""
    segment_quiet_dbfs: float = QUIET_DBFS
    """Second pass: a 20 ms frame below this level is pause (when segment_pause_s is set)."""
    segment_min_speech_s: float = MIN_SPEECH_S
    """Second pass: least sound (frames above that level) a segment must hold to be decoded on its own."""
    no_speech_threshold: float | None = None
    """Second pass: audio whose no-speech probability passes this decodes to nothing (Whisper's rule, 0.6
    there); None: no check."""
    ctc_vocabulary: tuple[str, ...] = CTC_VOCABULARY

    def __post_init__(self) -> None:
        for name in ("history_s", "chunk_s"):
            frames = getattr(self, name) * SAMPLE_RATE_HZ / SAMPLES_PER_ENCODER_FRAME
            if frames <= 0 or abs(frames - round(frames)) > 1e-6:
                raise ValueError(f"{name} must be a positive multiple of 20 ms (an encoder frame); "
                                 f"got {getattr(self, name)}")
        if self.pad_s < 0 or self.max_audio_s + self.pad_s > 30.0:
            raise ValueError("pad_s must be >= 0 and max_audio_s + pad_s at most 30 s (Whisper's window)")
        if not valid_trim(self.trim_margin_s, self.trim_below_peak_db):
            raise ValueError("trim_margin_s must be >= 0 (or None) and trim_below_peak_db > 0")
        if not valid_pause_cut(self.segment_pause_s, self.segment_quiet_dbfs, self.segment_min_speech_s):
            raise ValueError(f"segment_pause_s must be >= {MIN_PAUSE_S:g} (or None), segment_quiet_dbfs < 0 and "
                             "segment_min_speech_s > 0")
        if not valid_no_speech_threshold(self.no_speech_threshold):
            raise ValueError("no_speech_threshold must be in (0, 1) (or None)")
        if self.silence_pool < 1 or WHISPER_POSITIONS % self.silence_pool:
            raise ValueError(f"silence_pool must divide {WHISPER_POSITIONS}; got {self.silence_pool}")

    @property
    def history_samples(self) -> int:
        return round(self.history_s * SAMPLE_RATE_HZ)

    @property
    def chunk_samples(self) -> int:
        return round(self.chunk_s * SAMPLE_RATE_HZ)

    @property
    def chunk_frames(self) -> int:
        return self.chunk_samples // SAMPLES_PER_ENCODER_FRAME

    @property
    def pad_samples(self) -> int:
        return round(self.pad_s * SAMPLE_RATE_HZ) // SAMPLES_PER_ENCODER_FRAME * SAMPLES_PER_ENCODER_FRAME

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> WhisperPolicyConfig:
        values = json.loads(text)
        values["ctc_vocabulary"] = tuple(values.get("ctc_vocabulary", CTC_VOCABULARY))
        return cls(**values)


class WhisperLogMel(nn.Module):
    """Audio (B, S) in [-1, 1], S a multiple of 160 -> Whisper's normalized log-mel (B, N_MELS, S / 160).

    The STFT is a strided convolution with a Hann-windowed DFT basis (exports to plain ONNX ops);
    reflect padding of N_FFT / 2 on both sides as torch.stft(center=True), the last frame dropped as
    Whisper does. `valid_frames` (B,) limits the max that sets each row's clamp level to its own audio
    (zero padding never raises it anyway: its log-mel is the floor)."""

    def __init__(self):
        super().__init__()
        window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
        n_freqs = N_FFT // 2 + 1
        t = torch.arange(N_FFT, dtype=torch.float64)
        k = torch.arange(n_freqs, dtype=torch.float64)
        angle = 2 * math.pi * k[:, None] * t[None, :] / N_FFT  # (n_freqs, N_FFT)
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2 n_freqs, N_FFT)
        self.register_buffer("dft_basis", basis.float()[:, None, :], persistent=False)
        mel = mel_filter_bank(num_frequency_bins=n_freqs, num_mel_filters=N_MELS, min_frequency=0.0,
                              max_frequency=SAMPLE_RATE_HZ / 2, sampling_rate=SAMPLE_RATE_HZ, norm="slaney",
                              mel_scale="slaney")  # (n_freqs, N_MELS)
        self.register_buffer("mel_filters", torch.from_numpy(mel).float().T.contiguous(), persistent=False)

    def forward(self, audio: torch.Tensor, valid_frames: torch.Tensor | None = None) -> torch.Tensor:
        padded = F.pad(audio[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")  # (B, 1, S + N_FFT)
        spectrum = F.conv1d(padded, self.dft_basis, stride=HOP_SAMPLES)[..., :-1]  # (B, 2 n_freqs, F)
        real, imag = spectrum.chunk(2, dim=1)
        power = real**2 + imag**2  # (B, n_freqs, F)
        log_mel = torch.log10(torch.matmul(self.mel_filters, power).clamp(min=LOG_MEL_FLOOR))  # (B, N_MELS, F)
        if valid_frames is None:
            peak = log_mel.amax(dim=(1, 2), keepdim=True)
        else:
            valid = torch.arange(log_mel.shape[-1], device=audio.device)[None, :] < valid_frames[:, None]  # (B, F)
            peak = log_mel.masked_fill(~valid[:, None, :], -math.inf).amax(dim=(1, 2), keepdim=True)
        log_mel = torch.maximum(log_mel, peak - LOG_MEL_DYNAMIC_RANGE)
        return (log_mel + 4.0) / 4.0


def run_encoder(model: WhisperForConditionalGeneration, log_mel: torch.Tensor,
                valid_frames: torch.Tensor | None = None, all_layers: bool = False) -> torch.Tensor:
    """Whisper's encoder on (B, N_MELS, F) log-mel of any even length F <= 3000 -> (B, F / 2, D).

    transformers' encoder insists on 3000 frames; this runs the same modules with the positional
    embedding sliced to the input. `valid_frames` (B,) in encoder frames masks each row's keys past
    its own length, so a row padded in a batch is encoded as it would be alone. With `all_layers`:
    (B, L + 1, T, D), the input to every layer and the normalized output (the CTC head mixes them)."""
    encoder = model.model.encoder
    x = F.gelu(encoder.conv1(log_mel))
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)  # (B, T, D)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    mask = None
    if valid_frames is not None:
        keys = torch.arange(x.shape[1], device=x.device)[None, :] < valid_frames[:, None]  # (B, T)
        mask = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill(~keys, torch.finfo(x.dtype).min)
        mask = mask[:, None, None, :]  # (B, 1, 1, T)
    hidden = []
    for layer in encoder.layers:
        hidden.append(x)
        output = layer(x, attention_mask=mask)
        x = output[0] if isinstance(output, tuple) else output
    x = encoder.layer_norm(x)
    return torch.stack([*hidden, x], dim=1) if all_layers else x


def cross_key_values(model: WhisperForConditionalGeneration, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder states (B, T, D) -> every decoder layer's cross-attention keys and values, (L, B, heads, T, hd)."""
    batch, frames, d_model = states.shape
    heads = model.config.decoder_attention_heads
    keys, values = [], []
    for layer in model.model.decoder.layers:
        attention = layer.encoder_attn
        keys.append(attention.k_proj(states).view(batch, frames, heads, d_model // heads).transpose(1, 2))
        values.append(attention.v_proj(states).view(batch, frames, heads, d_model // heads).transpose(1, 2))
    return torch.stack(keys), torch.stack(values)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, d_model = x.shape
    return x.view(batch, length, heads, d_model // heads).transpose(1, 2)  # (B, heads, N, hd)


def _grouped_cross_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, audio_rows: Sequence[int],
                             with_weights: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Cross-attention of rows grouped by audio: q (B, heads, N, hd), keys/values (A, heads, F, hd), audio a
    attended by the next audio_rows[a] rows -> (weights (B, heads, N, F) if with_weights else None,
    attended (B, heads, N, hd))."""
    if len(audio_rows) != keys.shape[0] or sum(audio_rows) != q.shape[0]:
        raise ValueError(f"audio_rows {list(audio_rows)} must give one count per audio ({keys.shape[0]}) "
                         f"summing to the rows ({q.shape[0]})")
    rows, heads, length, head_dim = q.shape
    weights, attended = [], []
    for a, group in enumerate(q.split(list(audio_rows))):
        stacked = group.transpose(0, 1).reshape(heads, -1, head_dim)  # (heads, r N, hd): the group's queries
        w = (stacked @ keys[a].transpose(-1, -2)).softmax(-1)  # (heads, r N, F)
        out = w @ values[a]  # (heads, r N, hd)
        if with_weights:
            weights.append(w.view(heads, len(group), length, -1).transpose(0, 1))
        attended.append(out.view(heads, len(group), length, head_dim).transpose(0, 1))
    return (torch.cat(weights) if with_weights else None), torch.cat(attended)


@dataclass(frozen=True)
class SilenceCross:
    """Cross-attention over an utterance's own keys and values followed by the padding states' (the exported
    decoder step): row b attends its first frames[b] positions, then the padding states from there to 1500,
    which are one constant shared by all rows (not an 18 MB copy per row and call), averaged over groups of
    `pool` positions."""

    keys_t: torch.Tensor
    """(L, heads, hd, 1500 / pool): every layer's keys of the padding states, group means, transposed."""
    values: torch.Tensor
    """(L, heads, 1500 / pool, hd)."""
    frames: torch.Tensor
    """(B,) int64: each row's own positions (its speech and pad_s); the rest of its keys/values are padding."""
    pool: int = 1
    """Padding positions per group."""

    @staticmethod
    def pooled(keys: torch.Tensor, values: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding states' keys, values (L, heads, 1500, hd) -> (keys_t, values) of `pool`-position group means."""
        layers, heads, positions, head_dim = keys.shape
        groups = positions // pool
        return (keys.reshape(layers, heads, groups, pool, head_dim).mean(3).transpose(-1, -2).contiguous(),
                values.reshape(layers, heads, groups, pool, head_dim).mean(3).contiguous())


def _spliced_cross_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, silence_keys_t: torch.Tensor,
                             silence_values: torch.Tensor, frames: torch.Tensor,
                             pool: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, heads, N, hd); keys/values (B, heads, F, hd), row b's first frames[b] its own; the padding states'
    group keys (heads, hd, G) and values (heads, G, hd), G = 1500 / pool -> (weights (B, heads, N, F + G),
    attended (B, heads, N, hd)): attention over the splice of each row's own positions and the padding
    positions after them, without building the splice. A group counts log(pool) more in the softmax (it
    stands for pool positions of nearly equal keys) and counts for a row only when it starts at or after the
    row's first padding position (frames[b]); with pool 1 this is exactly attention over the 1500 spliced
    positions."""
    rows, heads, length, head_dim = q.shape
    own_positions, groups = keys.shape[2], silence_values.shape[1]
    shared_q = q.transpose(0, 1).reshape(heads, rows * length, head_dim)  # all rows' queries, silence read once
    silence_scores = (shared_q @ silence_keys_t).view(heads, rows, length, groups).transpose(0, 1)
    own = (torch.arange(own_positions)[None, :] < frames[:, None])[:, None, None, :]  # (B, 1, 1, F)
    padding = (torch.arange(groups)[None, :] * pool >= frames[:, None])[:, None, None, :]  # (B, 1, 1, G)
    scores = torch.cat([(q @ keys.transpose(-1, -2)).masked_fill(~own, float("-inf")),
                        (silence_scores + math.log(pool)).masked_fill(~padding, float("-inf"))], dim=-1)
    weights = scores.softmax(-1)
    own_weights, silence_weights = weights[..., :own_positions], weights[..., own_positions:]
    silence_weights = silence_weights.transpose(0, 1).reshape(heads, rows * length, groups)
    from_silence = (silence_weights @ silence_values).view(heads, rows, length, head_dim).transpose(0, 1)
    return weights, own_weights @ values + from_silence


def decoder_states(model: WhisperForConditionalGeneration, embedded: torch.Tensor, self_k: torch.Tensor,
                   self_v: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                   alignment_heads: tuple[tuple[int, int], ...] = (), audio_rows: Sequence[int] | None = None,
                   silence: SilenceCross | None = None):
    """Whisper's decoder written out from transformers' modules, over cached keys and values.

    embedded (B, N, D): the new tokens' embeddings; self_k/self_v (L, B, heads, P, hd): the P tokens
    before them; cross_k/cross_v (L, B, heads, F, hd) -> (normalized states (B, N, D), next_self_k,
    next_self_v (P + N positions), alignment (B, N, F): the mean cross-attention of `alignment_heads`,
    or None). One function for the exported decoder step and for training (teacher forcing is a
    call with P = 0 and every token at once), so the two cannot drift apart.

    With `audio_rows` (the trainer's decodes, never the export), cross_k/cross_v hold A audios
    (L, A, heads, F, hd) and the B rows are consecutive groups of audio_rows[a] rows decoding audio a:
    each audio's keys and values are read once for its group (its queries stacked) instead of being
    copied per row (18 MB a row for Whisper tiny's 1500 frames).

    With `silence` (the export), cross_k/cross_v hold each row's own positions only and the padding
    states' keys and values come from `silence` (SilenceCross); alignment then spans the F own positions and
    the padding states' groups after them (consumers read the speech's first frames)."""
    decoder = model.model.decoder
    heads = model.config.decoder_attention_heads
    past, length = self_k.shape[3], embedded.shape[1]
    x = embedded + decoder.embed_positions.weight[torch.arange(length) + past]  # (B, N, D)
    causal = torch.ones(length, past + length, dtype=torch.bool).tril(diagonal=past)  # (N, P + N)
    scale = (model.config.d_model // heads) ** -0.5
    next_k, next_v, maps = [], [], []
    for index, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        h = layer.self_attn_layer_norm(x)
        q = _split_heads(attention.q_proj(h) * scale, heads)
        k = torch.cat([self_k[index], _split_heads(attention.k_proj(h), heads)], dim=2)  # (B, heads, P + N, hd)
        v = torch.cat([self_v[index], _split_heads(attention.v_proj(h), heads)], dim=2)
        next_k.append(k)
        next_v.append(v)
        weights = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + attention.out_proj((weights @ v).transpose(1, 2).reshape(x.shape))

        cross = layer.encoder_attn
        h = layer.encoder_attn_layer_norm(x)
        q = _split_heads(cross.q_proj(h) * scale, heads)
        if silence is not None:
            weights, attended = _spliced_cross_attention(q, cross_k[index], cross_v[index], silence.keys_t[index],
                                                         silence.values[index], silence.frames, silence.pool)
        elif audio_rows is None:
            weights = (q @ cross_k[index].transpose(-1, -2)).softmax(-1)  # (B, heads, N, F)
            attended = weights @ cross_v[index]  # (B, heads, N, hd)
        else:
            with_weights = any(layer_index == index for layer_index, _ in alignment_heads)
            weights, attended = _grouped_cross_attention(q, cross_k[index], cross_v[index], audio_rows, with_weights)
        maps += [weights[:, head] for layer_index, head in alignment_heads if layer_index == index]
        x = x + cross.out_proj(attended.transpose(1, 2).reshape(x.shape))

        h = layer.final_layer_norm(x)
        x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
    alignment = torch.stack(maps).mean(0) if maps else None
    return decoder.layer_norm(x), torch.stack(next_k), torch.stack(next_v), alignment


class CtcHead(nn.Module):
    """Every encoder layer's states (B, L + 1, T, D) -> CTC log-probs (B, T, V) of the first pass's characters.

    A learned softmax-weighted sum of the layers (as SUPERB probes pretrained speech encoders: the
    middle layers are more phonetic than the last, which Whisper shaped for its decoder), then an MLP."""

    def __init__(self, d_model: int, hidden: int, vocabulary_size: int, num_states: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.zeros(num_states))
        self.layers = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), nn.GELU(),
                                    nn.Linear(hidden, vocabulary_size))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        mixed = (states * self.layer_weights.softmax(0)[:, None, None]).sum(dim=-3)  # (B, T, D)
        return torch.log_softmax(self.layers(mixed), dim=-1)


class WhisperPolicy(nn.Module):
    """Whisper (transformers) + the CTC head + streaming settings: what the trainer fine-tunes and exports."""

    def __init__(self, model: WhisperForConditionalGeneration, ctc_head: CtcHead,
                 settings: WhisperPolicyConfig | None = None):
        super().__init__()
        self.model = model
        self.ctc_head = ctc_head
        self.settings = settings or WhisperPolicyConfig()
        self.log_mel = WhisperLogMel()

    @classmethod
    def with_new_head(cls, model: WhisperForConditionalGeneration, settings: WhisperPolicyConfig | None = None,
                      seed: int = 0) -> WhisperPolicy:
        settings = settings or WhisperPolicyConfig()
        torch.manual_seed(seed)
        return cls(model, new_ctc_head(model, settings), settings)

    @property
    def encoder_positions(self) -> int:
        return self.model.config.max_source_positions

    # --- the second pass ---

    def padded_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Samples each utterance is encoded with: its audio plus pad_s, rounded up to an encoder frame."""
        padded = lengths + self.settings.pad_samples
        return (padded + SAMPLES_PER_ENCODER_FRAME - 1) // SAMPLES_PER_ENCODER_FRAME * SAMPLES_PER_ENCODER_FRAME

    def silence_states(self) -> torch.Tensor:
        """(1, 1500, D): the encoder states of 30 s of padding (zeros), Whisper's view of 'no more speech'."""
        silence = torch.zeros(1, self.encoder_positions * SAMPLES_PER_ENCODER_FRAME)
        return run_encoder(self.model, self.log_mel(silence))

    def final_encoder_states(self, audio: torch.Tensor, lengths: torch.Tensor,
                             silence: torch.Tensor | None = None) -> torch.Tensor:
        """audio (B, S) zero-padded, lengths (B,) in samples -> (B, 1500, D) spliced encoder states."""
        padded = self.padded_lengths(lengths)  # (B,)
        # One more encoder frame of zeros than any row needs: the convolutions at each row's last frame
        # then see padding (as in Whisper's 30 s window), whether the row is alone or in a batch.
        width = int(padded.max()) + SAMPLES_PER_ENCODER_FRAME
        if audio.shape[1] < width:
            audio = F.pad(audio, (0, width - audio.shape[1]))
        audio = audio[:, :width] * (torch.arange(width)[None, :] < lengths[:, None])
        frames = padded // SAMPLES_PER_ENCODER_FRAME  # (B,) encoder frames of speech + pad
        states = run_encoder(self.model, self.log_mel(audio, valid_frames=frames * ENCODER_STRIDE),
                             valid_frames=frames)  # (B, T, D)
        silence = self.silence_states() if silence is None else silence  # (1, 1500, D)
        positions = torch.arange(self.encoder_positions)[None, :, None]  # (1, 1500, 1)
        states = F.pad(states, (0, 0, 0, self.encoder_positions - states.shape[1]))
        return torch.where(positions < frames[:, None, None], states, silence)

    # --- the first pass ---

    def window_ctc_log_probs(self, window: torch.Tensor, new_frames: int) -> torch.Tensor:
        """Windows (B, H + C) of history + chunk -> CTC log-probs (B, new_frames, V) of the chunk's frames."""
        states = run_encoder(self.model, self.log_mel(window), all_layers=True)  # (B, L + 1, T, D)
        return self.ctc_head(states[:, :, states.shape[2] - new_frames :])

    def first_pass_windows(self, audio: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One utterance (S,) -> the windows (N, H + C) the streaming graph is fed, one per chunk (zero history
        before the first, the last chunk padded with zeros), and T, the utterance's encoder frames: the first T
        of the chunks' N * chunk_frames frames. The streaming log-probs and the CTC head's training window here."""
        s = self.settings
        frames = math.ceil(len(audio) / SAMPLES_PER_ENCODER_FRAME)
        total = math.ceil(frames / s.chunk_frames) * s.chunk_samples
        padded = F.pad(audio, (s.history_samples, total - len(audio)))
        return padded.unfold(0, s.history_samples + s.chunk_samples, s.chunk_samples), frames

    def streaming_ctc_log_probs(self, audio: torch.Tensor) -> torch.Tensor:
        """One utterance (S,) -> (T, V) log-probs exactly as the streaming graph yields them chunk by chunk
        (zero history at the start; a final partial chunk padded with zeros to a whole encoder frame)."""
        windows, frames = self.first_pass_windows(audio)  # (N, H + C)
        log_probs = self.window_ctc_log_probs(windows, self.settings.chunk_frames)  # (N, chunk_frames, V)
        return log_probs.reshape(-1, log_probs.shape[-1])[:frames]

    # --- persistence ---

    def save_pretrained(self, out_dir: Path) -> None:
        """The Whisper checkpoint as transformers saves it, the CTC head and the streaming settings."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        save_file({k: v.contiguous() for k, v in self.ctc_head.state_dict().items()}, str(out_dir / CTC_HEAD_FILE))
        (out_dir / POLICY_SETTINGS_FILE).write_text(self.settings.to_json())

    @classmethod
    def from_pretrained(cls, checkpoint_dir: Path) -> WhisperPolicy:
        checkpoint_dir = Path(checkpoint_dir)
        model = WhisperForConditionalGeneration.from_pretrained(checkpoint_dir).eval()
        settings = WhisperPolicyConfig.from_json((checkpoint_dir / POLICY_SETTINGS_FILE).read_text())
        head = new_ctc_head(model, settings)
        head.load_state_dict(load_file(str(checkpoint_dir / CTC_HEAD_FILE)))
        return cls(model, head, settings).eval()


def new_ctc_head(model: WhisperForConditionalGeneration, settings: WhisperPolicyConfig) -> CtcHead:
    config = model.config
    return CtcHead(config.d_model, settings.ctc_hidden, len(settings.ctc_vocabulary), config.encoder_layers + 1)


def is_whisper_checkpoint(path: Path) -> bool:
    return (Path(path) / POLICY_SETTINGS_FILE).is_file()
