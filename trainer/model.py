"""The voxloop policy: log-mel frontend + chunked streaming Conformer encoder + CTC head.

Everything the server needs is inside the exported graph (docs/model-format.md): raw 16 kHz audio
goes in, per-frame CTC log-probs come out, and the streaming state travels explicitly. The encoder
is built so that decoding chunk by chunk gives *exactly* the whole-utterance result:

- the log-mel frontend is a strided convolution with a windowed DFT basis, so a frame depends only
  on its own 400 samples;
- subsampling stacks 4 frames (no overlap), so an encoder frame depends only on its own 4 frames;
- self-attention is chunked: a frame sees its own chunk and `left_chunks` chunks before it
  (WeNet/U2-style chunk masks), so the cache of a layer is its last `left_chunks * chunk_frames`
  inputs;
- the convolution module is causal, so its cache is its last `conv_kernel - 1` inputs.

Shapes: B batch, S samples, F log-mel frames (10 ms), T encoder frames (40 ms), D d_model,
L layers, P cache frames, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from ..core.decoder import BLANK_TOKEN, UNK_TOKEN, WORD_DELIMITER_TOKEN

# The CTC vocabulary: index 0 is the blank (HF's pad token), "|" separates words (HF's
# word delimiter), "<unk>" is required by Wav2Vec2CTCTokenizer and never a training target.
DEFAULT_VOCABULARY = (BLANK_TOKEN, WORD_DELIMITER_TOKEN, "'", *"abcdefghijklmnopqrstuvwxyz", UNK_TOKEN)

LOG_FLOOR = 1e-10  # power floor before log(): silence must not give -inf
MASK_VALUE = -1e9  # attention score of a masked key (finite, so exported graphs never see NaN)


class VoxloopCTCConfig(PretrainedConfig):
    """Hyper-parameters of the policy; saved as config.json by `save_pretrained`."""

    model_type = "voxloop-ctc"

    def __init__(
        self,
        vocabulary: list[str] | tuple[str, ...] = DEFAULT_VOCABULARY,
        sample_rate_hz: int = 16000,
        window_samples: int = 400,  # 25 ms analysis window
        hop_samples: int = 160,  # 10 ms frame shift
        n_fft: int = 512,
        num_mel_bins: int = 80,
        mel_f_min_hz: float = 20.0,
        mel_f_max_hz: float = 7600.0,
        subsampling: int = 4,  # log-mel frames per encoder frame (40 ms)
        d_model: int = 144,
        num_layers: int = 6,
        num_heads: int = 4,
        ff_multiplier: int = 4,
        conv_kernel: int = 15,
        chunk_frames: int = 5,  # encoder frames per streaming chunk (200 ms)
        left_chunks: int = 8,  # chunks of left context each attention layer sees
        dropout: float = 0.1,
        spec_augment_freq_masks: int = 2,
        spec_augment_freq_width: int = 15,
        spec_augment_time_masks: int = 4,
        spec_augment_time_width: int = 25,
        **kwargs,
    ):
        self.vocabulary = list(vocabulary)
        self.sample_rate_hz = sample_rate_hz
        self.window_samples = window_samples
        self.hop_samples = hop_samples
        self.n_fft = n_fft
        self.num_mel_bins = num_mel_bins
        self.mel_f_min_hz = mel_f_min_hz
        self.mel_f_max_hz = mel_f_max_hz
        self.subsampling = subsampling
        self.d_model = d_model
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ff_multiplier = ff_multiplier
        self.conv_kernel = conv_kernel
        self.chunk_frames = chunk_frames
        self.left_chunks = left_chunks
        self.dropout = dropout
        self.spec_augment_freq_masks = spec_augment_freq_masks
        self.spec_augment_freq_width = spec_augment_freq_width
        self.spec_augment_time_masks = spec_augment_time_masks
        self.spec_augment_time_width = spec_augment_time_width
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if window_samples > n_fft:
            raise ValueError(f"window_samples ({window_samples}) must be <= n_fft ({n_fft})")
        if self.vocabulary[0] != BLANK_TOKEN:
            raise ValueError(f"vocabulary[0] must be the CTC blank {BLANK_TOKEN!r}")

    # Derived values, computed in one place.
    @property
    def cache_frames(self) -> int:
        """Attention cache per layer: the left context a chunk sees."""
        return self.left_chunks * self.chunk_frames

    @property
    def conv_cache_frames(self) -> int:
        return self.conv_kernel - 1

    @property
    def chunk_samples(self) -> int:
        """New samples per streaming chunk."""
        return self.chunk_frames * self.subsampling * self.hop_samples

    @property
    def lookback_samples(self) -> int:
        """Samples of overlap re-fed with each chunk (the last frame's window reaches past its hop)."""
        return self.window_samples - self.hop_samples

    @property
    def frame_shift_s(self) -> float:
        return self.hop_samples * self.subsampling / self.sample_rate_hz


def encoder_frames_for(num_samples: torch.Tensor | int, config: VoxloopCTCConfig) -> torch.Tensor | int:
    """Encoder frames produced from `num_samples` samples (snip-edges framing, then stacking)."""
    if isinstance(num_samples, int):
        if num_samples < config.window_samples:
            return 0
        return ((num_samples - config.window_samples) // config.hop_samples + 1) // config.subsampling
    frames = torch.div(num_samples - config.window_samples, config.hop_samples, rounding_mode="floor") + 1
    return torch.div(frames.clamp(min=0), config.subsampling, rounding_mode="floor")


class LogMelFrontend(nn.Module):
    """Audio (B, S) in [-1, 1] -> normalized log-mel (B, F, num_mel_bins).

    The windowed DFT is a strided conv1d so the frontend exports to ONNX as two matmul-like ops and a
    frame never depends on samples outside its window.
    """

    def __init__(self, config: VoxloopCTCConfig):
        super().__init__()
        self.hop_samples = config.hop_samples
        self.config = config
        n_freqs = config.n_fft // 2 + 1
        self.register_buffer("dft_basis", torch.empty(2 * n_freqs, 1, config.window_samples), persistent=False)
        self.register_buffer("mel_filters", torch.empty(n_freqs, config.num_mel_bins), persistent=False)
        self.reset_constants()
        # Global mean/variance normalization, set from training data (`set_feature_stats`).
        self.register_buffer("feature_mean", torch.zeros(config.num_mel_bins))
        self.register_buffer("feature_std", torch.ones(config.num_mel_bins))

    @torch.no_grad()
    def reset_constants(self) -> None:
        """(Re)compute the DFT basis and mel filters. They are derived from the config, not learned, so
        they are not saved; transformers' from_pretrained leaves such buffers uninitialized and calls
        `_init_weights`, which calls this."""
        c = self.config
        n_freqs = c.n_fft // 2 + 1
        with torch.device("cpu"):  # also when constructed under transformers' meta-device context
            window = torch.hann_window(c.window_samples, periodic=False, dtype=torch.float64)
            n = torch.arange(c.window_samples, dtype=torch.float64)
            k = torch.arange(n_freqs, dtype=torch.float64)
            angle = 2 * math.pi * k[:, None] * n[None, :] / c.n_fft  # (n_freqs, window)
            basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2 * n_freqs, window)
            mel = torchaudio.functional.melscale_fbanks(
                n_freqs, c.mel_f_min_hz, c.mel_f_max_hz, c.num_mel_bins, c.sample_rate_hz
            )  # (n_freqs, num_mel_bins)
        if self.dft_basis.is_meta:
            self.dft_basis = basis.float().unsqueeze(1)
            self.mel_filters = mel.float()
        else:
            self.dft_basis.copy_(basis.float().unsqueeze(1))
            self.mel_filters.copy_(mel.float())

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        spectrum = F.conv1d(audio.unsqueeze(1), self.dft_basis, stride=self.hop_samples)  # (B, 2K, F)
        real, imag = spectrum.chunk(2, dim=1)
        power = (real**2 + imag**2).transpose(1, 2)  # (B, F, K)
        return torch.log(torch.matmul(power, self.mel_filters).clamp(min=LOG_FLOOR))  # (B, F, M)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(audio) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-3))


class FrameStacking(nn.Module):
    """(B, F, M) -> (B, F // s, D): stack s frames without overlap, then project."""

    def __init__(self, config: VoxloopCTCConfig):
        super().__init__()
        self.subsampling = config.subsampling
        self.proj = nn.Linear(config.num_mel_bins * config.subsampling, config.d_model)
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, frames, mels = features.shape
        usable = torch.div(frames, self.subsampling, rounding_mode="floor") * self.subsampling
        stacked = features[:, :usable].reshape(batch, -1, self.subsampling * mels)
        return self.dropout(self.norm(self.proj(stacked)))


def chunk_attention_mask(
    num_frames: int | torch.Tensor,
    cache_frames: int,
    chunk_frames: int,
    left_chunks: int,
    cache_len: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query may attend to, and their relative distance.

    Queries are the T current frames (positions 0..T-1, the call starting on a chunk boundary); keys
    are the P cache slots (positions -P..-1, right-aligned, the last `cache_len` valid) followed by
    the current frames. A query in chunk c sees keys in chunks c - left_chunks .. c.
    Returns allowed (B, T, P + T) bool and relative distance (T, P + T) long (query - key).
    """
    device = cache_len.device
    query_pos = torch.arange(num_frames, device=device)
    key_pos = torch.arange(num_frames + cache_frames, device=device) - cache_frames
    query_chunk = torch.div(query_pos, chunk_frames, rounding_mode="floor")[:, None]
    key_chunk = torch.div(key_pos, chunk_frames, rounding_mode="floor")[None, :]
    allowed = (key_chunk <= query_chunk) & (key_chunk >= query_chunk - left_chunks)  # (T, P + T)
    key_valid = key_pos[None, :] >= -cache_len[:, None]  # (B, P + T)
    if lengths is not None:
        key_valid = key_valid & (key_pos[None, :] < lengths[:, None])
    distance = query_pos[:, None] - key_pos[None, :]
    return allowed[None, :, :] & key_valid[:, None, :], distance


class ChunkedSelfAttention(nn.Module):
    """Multi-head attention over (cache + current frames) with a learned relative-position bias."""

    def __init__(self, config: VoxloopCTCConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_model // config.num_heads
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key_value = nn.Linear(config.d_model, 2 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        # Distances a query can see: -(C - 1) (later frames of its chunk) .. P + C - 1.
        self.min_distance = -(config.chunk_frames - 1)
        self.max_distance = config.cache_frames + config.chunk_frames - 1
        self.relative_bias = nn.Embedding(self.max_distance - self.min_distance + 1, config.num_heads)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor, distance: torch.Tensor
    ) -> torch.Tensor:
        batch, frames, _ = x.shape
        q = self.query(x).view(batch, frames, self.num_heads, self.head_dim).transpose(1, 2)  # (B,H,T,dh)
        k, v = self.key_value(context).chunk(2, dim=-1)
        k = k.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, P+T, dh)
        v = v.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, T, P+T)
        bucket = distance.clamp(self.min_distance, self.max_distance) - self.min_distance
        scores = scores + self.relative_bias(bucket).permute(2, 0, 1).unsqueeze(0)
        scores = scores.masked_fill(~allowed.unsqueeze(1), MASK_VALUE)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        attended = torch.matmul(weights, v).transpose(1, 2).reshape(batch, frames, -1)
        return self.out(attended)


class CausalConvModule(nn.Module):
    """Conformer convolution module with a causal depthwise conv (LayerNorm instead of BatchNorm,
    so a frame's output never depends on other utterances in the batch)."""

    def __init__(self, config: VoxloopCTCConfig):
        super().__init__()
        d = config.d_model
        self.norm = nn.LayerNorm(d)
        self.pointwise_in = nn.Linear(d, 2 * d)
        self.depthwise = nn.Conv1d(d, d, config.conv_kernel, groups=d)
        self.depthwise_norm = nn.LayerNorm(d)
        self.pointwise_out = nn.Linear(d, d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1).transpose(1, 2)  # (B, D, T)
        h = torch.cat([cache, h], dim=2)  # (B, D, K-1 + T)
        next_cache = h[:, :, h.shape[2] - cache.shape[2] :]
        h = self.depthwise(h).transpose(1, 2)  # (B, T, D)
        h = self.pointwise_out(F.silu(self.depthwise_norm(h)))
        return self.dropout(h), next_cache


class FeedForward(nn.Module):
    def __init__(self, config: VoxloopCTCConfig):
        super().__init__()
        hidden = config.d_model * config.ff_multiplier
        self.net = nn.Sequential(
            nn.LayerNorm(config.d_model),
            nn.Linear(config.d_model, hidden),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConformerBlock(nn.Module):
    """Macaron FF / chunked attention / causal conv / FF, each residual (Gulati et al., 2020)."""

    def __init__(self, config: VoxloopCTCConfig):
        super().__init__()
        self.ff_in = FeedForward(config)
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = ChunkedSelfAttention(config)
        self.attention_dropout = nn.Dropout(config.dropout)
        self.conv = CausalConvModule(config)
        self.ff_out = FeedForward(config)
        self.final_norm = nn.LayerNorm(config.d_model)

    def forward(
        self,
        x: torch.Tensor,
        att_cache: torch.Tensor,  # (B, P, D)
        conv_cache: torch.Tensor,  # (B, D, K-1)
        allowed: torch.Tensor,
        distance: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + 0.5 * self.ff_in(x)
        h = self.attention_norm(x)
        context = torch.cat([att_cache, h], dim=1)  # (B, P + T, D)
        next_att_cache = context[:, context.shape[1] - att_cache.shape[1] :]
        x = x + self.attention_dropout(self.attention(h, context, allowed, distance))
        conv_out, next_conv_cache = self.conv(x, conv_cache)
        x = x + conv_out
        x = x + 0.5 * self.ff_out(x)
        return self.final_norm(x), next_att_cache, next_conv_cache


@dataclass
class StreamingState:
    """The encoder's state between two chunks of one batch of streams."""

    att_cache: torch.Tensor  # (B, L, P, D)
    conv_cache: torch.Tensor  # (B, L, D, K-1)
    cache_len: torch.Tensor  # (B,) int64

    def to(self, device: torch.device | str) -> StreamingState:
        return StreamingState(self.att_cache.to(device), self.conv_cache.to(device), self.cache_len.to(device))


class VoxloopPreTrainedModel(PreTrainedModel):
    config_class = VoxloopCTCConfig
    base_model_prefix = "voxloop"
    main_input_name = "input_values"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LogMelFrontend):
            module.reset_constants()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.zeros_(module.weight)


class VoxloopForCTC(VoxloopPreTrainedModel):
    """The policy pi_theta: audio -> per-frame distributions over the CTC vocabulary."""

    def __init__(self, config: VoxloopCTCConfig):
        super().__init__(config)
        self.frontend = LogMelFrontend(config)
        self.subsampling = FrameStacking(config)
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.num_layers))
        self.ctc_head = nn.Linear(config.d_model, len(config.vocabulary))
        self.post_init()

    def frames_for(self, num_samples: torch.Tensor | int) -> torch.Tensor | int:
        """Encoder frames of `num_samples` samples of audio (what the CTC loss and masks count)."""
        return encoder_frames_for(num_samples, self.config)

    def initial_state(self, batch_size: int) -> StreamingState:
        c = self.config
        return StreamingState(
            att_cache=torch.zeros(batch_size, c.num_layers, c.cache_frames, c.d_model),
            conv_cache=torch.zeros(batch_size, c.num_layers, c.d_model, c.conv_cache_frames),
            cache_len=torch.zeros(batch_size, dtype=torch.long),
        )

    def spec_augment(self, features: torch.Tensor) -> torch.Tensor:
        """SpecAugment (Park et al., 2019) on normalized log-mels (B, F, M); masks set to the mean (0)."""
        c = self.config
        x = features.transpose(1, 2)  # (B, M, F)
        for _ in range(c.spec_augment_freq_masks):
            x = torchaudio.functional.mask_along_axis_iid(x, c.spec_augment_freq_width, 0.0, axis=1)
        for _ in range(c.spec_augment_time_masks):
            x = torchaudio.functional.mask_along_axis_iid(x, c.spec_augment_time_width, 0.0, axis=2)
        return x.transpose(1, 2)

    def encode(
        self, audio: torch.Tensor, state: StreamingState, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, StreamingState]:
        """audio (B, S) -> CTC logits (B, T, V) and the state after it.

        `lengths` (B,) in encoder frames masks padded keys in batched training; streaming calls have
        no padding and leave it None.
        """
        features = self.frontend(audio)
        if self.training:
            features = self.spec_augment(features)
        x = self.subsampling(features)  # (B, T, D)
        c = self.config
        allowed, distance = chunk_attention_mask(
            x.shape[1], c.cache_frames, c.chunk_frames, c.left_chunks, state.cache_len, lengths
        )
        next_att, next_conv = [], []
        for i, layer in enumerate(self.layers):
            x, att, conv = layer(x, state.att_cache[:, i], state.conv_cache[:, i], allowed, distance)
            next_att.append(att)
            next_conv.append(conv)
        next_state = StreamingState(
            att_cache=torch.stack(next_att, dim=1),
            conv_cache=torch.stack(next_conv, dim=1),
            cache_len=(state.cache_len + x.shape[1]).clamp(max=c.cache_frames),
        )
        return self.ctc_head(x), next_state

    def forward(
        self,
        input_values: torch.Tensor,
        input_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Whole utterances: input_values (B, S), input_lengths (B,) in samples, labels (B, U) padded
        with -100 (HF convention). Returns logits (B, T, V) and, with labels, the mean CTC loss."""
        batch = input_values.shape[0]
        frame_lengths = None
        if input_lengths is not None:
            frame_lengths = encoder_frames_for(input_lengths, self.config)
        logits, _ = self.encode(input_values, self.initial_state(batch).to(input_values.device), frame_lengths)
        loss = None
        if labels is not None:
            if frame_lengths is None:
                frame_lengths = torch.full((batch,), logits.shape[1], dtype=torch.long)
            loss = ctc_loss(logits, frame_lengths, labels)
        return CausalLMOutput(loss=loss, logits=logits)


def ctc_loss(logits: torch.Tensor, frame_lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over utterances of the CTC loss per target token. labels (B, U) padded with -100."""
    label_mask = labels >= 0
    target_lengths = label_mask.sum(-1)
    targets = labels.masked_select(label_mask)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(
        log_probs, targets, frame_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=True
    )

