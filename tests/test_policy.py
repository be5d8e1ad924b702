"""The policy, its tokenizer, its ONNX export and the parity check."""

from __future__ import annotations

import pytest
import torch
from voxloop.trainer.data import IGNORE_INDEX
from voxloop.trainer.export import ParityError, StreamingExportWrapper, check_parity, export_onnx
from voxloop.trainer.model import StreamingState, VoxloopCTCConfig, VoxloopForCTC, encoder_frames_for
from voxloop.trainer.tokenizer import encode_targets, make_tokenizer

TINY = dict(num_layers=2, d_model=64, num_heads=2, ff_multiplier=2)


def tiny_model(seed: int = 0) -> VoxloopForCTC:
    torch.manual_seed(seed)
    return VoxloopForCTC(VoxloopCTCConfig(**TINY)).eval()


def test_tokenizer_round_trips_normalized_text():
    tokenizer = make_tokenizer(VoxloopCTCConfig().vocabulary)
    text = "it's a quiet morning in the harbor"
    ids = encode_targets(tokenizer, text)
    assert 0 not in ids  # the blank is never a target
    assert tokenizer.decode(ids, group_tokens=False) == text


def test_tokenizer_rejects_characters_outside_the_vocabulary():
    tokenizer = make_tokenizer(VoxloopCTCConfig().vocabulary)
    with pytest.raises(ValueError, match="normalize"):
        encode_targets(tokenizer, "price: 5$")


def test_chunked_decode_equals_whole_utterance_decode():
    model = tiny_model()
    c = model.config
    audio = 0.1 * torch.randn(1, 9 * c.chunk_samples + c.lookback_samples + 777)
    with torch.no_grad():
        whole, _ = model.encode(audio, model.initial_state(1))
        state, pieces, start = model.initial_state(1), [], 0
        window = c.chunk_samples + c.lookback_samples
        while start + window <= audio.shape[1]:
            piece, state = model.encode(audio[:, start : start + window], state)
            pieces.append(piece)
            start += c.chunk_samples
        tail, _ = model.encode(audio[:, start:], state)
        chunked = torch.cat([*pieces, tail], dim=1)
    assert chunked.shape == whole.shape == (1, encoder_frames_for(audio.shape[1], c), len(c.vocabulary))
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=0)


def test_a_few_training_steps_reduce_the_loss():
    model = tiny_model().train()
    tokenizer = make_tokenizer(model.config.vocabulary)
    targets = [encode_targets(tokenizer, t) for t in ("hello there", "good morning")]
    labels = torch.full((2, max(map(len, targets))), IGNORE_INDEX)
    for i, t in enumerate(targets):
        labels[i, : len(t)] = torch.tensor(t)
    audio = 0.1 * torch.randn(2, 16000)
    lengths = torch.tensor([16000, 12000])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(audio, lengths, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_padding_does_not_change_an_utterances_logits():
    model = tiny_model()
    audio = 0.1 * torch.randn(1, 20000)
    padded = torch.cat([audio, torch.zeros(1, 9000)], dim=1)
    batch = torch.cat([padded, 0.1 * torch.randn(1, 29000)])
    with torch.no_grad():
        alone = model(audio).logits
        in_batch = model(batch, torch.tensor([20000, 29000])).logits
    torch.testing.assert_close(in_batch[:1, : alone.shape[1]], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_export_matches_torch_at_two_lengths_and_chunk_by_chunk(tmp_path, seed):
    model = tiny_model(seed)
    report = check_parity(model, export_onnx(model, tmp_path / "model.onnx", "v1"))
    assert report.max_abs_logprob_diff <= 1e-4
    assert report.greedy_transcripts_equal
    assert len(report.lengths_s) >= 2


def test_export_of_a_trained_model_matches_torch(tmp_path):
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = torch.randint(3, 29, (2, 8))
    for _ in range(5):  # move the weights away from their init so parity is checked on real values
        loss = model(0.1 * torch.randn(2, 16000), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    check_parity(model, export_onnx(model, tmp_path / "model.onnx", "v1"))


class LengthBakingWrapper(StreamingExportWrapper):
    """Turns the traced frame count into a Python int: the legacy exporter then bakes it in."""

    def forward(self, audio, att_cache, conv_cache, cache_len):
        frames = int(encoder_frames_for(audio.shape[1], self.model.config))
        log_probs, *state = super().forward(audio, att_cache, conv_cache, cache_len)
        return log_probs[:, :frames], *state


def test_parity_check_catches_a_length_baked_export(tmp_path, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr("voxloop.trainer.export.StreamingExportWrapper", LengthBakingWrapper)
    with pytest.warns(torch.jit.TracerWarning):
        path = export_onnx(model, tmp_path / "model.onnx", "v1")
    with pytest.raises(ParityError):
        check_parity(model, path)


def test_streaming_state_moves_between_devices():
    state = tiny_model().initial_state(3)
    moved = state.to("cpu")
    assert isinstance(moved, StreamingState) and moved.att_cache.shape == state.att_cache.shape
