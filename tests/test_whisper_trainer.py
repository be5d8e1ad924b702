"""RLHF on the Whisper policy: token log-probs and KL by hand, the candidate group, cycles that publish, resume
and are refused."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from trainer_support import add_feedback, write_corpus
from voxloop.core.registry import Registry
from voxloop.core.rewards import REJECTION_REWARD
from voxloop.core.store import FeedbackStore
from voxloop.server.app import load_serving_model
from voxloop.server.config import ServerConfig
from voxloop.trainer.config import PPOConfig, TrainerConfig
from voxloop.trainer.cycle import CycleOutcome, run_cycle
from voxloop.trainer.kinds import context_words, corrected_words
from voxloop.trainer.ppo import kl_to_reference
from voxloop.trainer.rewards import feedback_item
from voxloop.trainer.state import TrainerState
from voxloop.trainer.whisper_model import WhisperPolicy
from voxloop.trainer.whisper_update import (
    PROMPT,
    WhisperRolloutContext,
    _cross_entropy,
    candidate_log_probs,
    candidate_states,
    collect_whisper_rollout,
    generate,
    sample_tokens,
    whisper_minibatch_gradients,
    whisper_rehearsal,
    whisper_style,
)
from whisper_support import TINY_WHISPER_VERSION, publish_whisper_version, tiny_whisper_policy, tokenizer_json

pytestmark = pytest.mark.slow
torch.set_num_threads(1)


def flite(text: str, voice: str = "slt") -> np.ndarray:
    """`text` read by a flite voice, float32 16 kHz."""
    import torchaudio.functional as AF

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True, capture_output=True)
        audio, rate = sf.read(wav, dtype="float32")
    return AF.resample(torch.from_numpy(audio), rate, 16000).numpy()


SENTENCES = ("please close the door", "the red car is fast", "we meet at noon", "open the window now")


@pytest.fixture(scope="module")
def flite_corpus(tmp_path_factory) -> Path:
    rows = [(s, flite(s)) for s in SENTENCES]
    return write_corpus(tmp_path_factory.mktemp("flite-corpus"), {"train": rows, "dev": rows})


def test_token_log_probs_and_the_per_token_kl_are_what_a_hand_computation_gives():
    policy = tiny_whisper_policy(seed=0)
    other = tiny_whisper_policy(seed=1)
    audio = torch.from_numpy(flite("hello there")[:16000])
    states = policy.final_encoder_states(audio[None], torch.tensor([len(audio)]))
    candidate = [440, 1234, 50256]  # " Hello", some token, end of text
    with torch.no_grad():
        from voxloop.trainer.whisper_model import cross_key_values

        cross_k, cross_v = cross_key_values(policy.model, states)
        full, chosen, mask = candidate_log_probs(policy, cross_k, cross_v, [candidate])
        logits = policy.model(encoder_outputs=(states,), decoder_input_ids=torch.tensor([[*PROMPT, *candidate[:-1]]])
                              ).logits[0, len(PROMPT) - 1 :]
        expected = torch.log_softmax(logits, -1)  # (3, V): the positions that predict each candidate token
        other_states = other.final_encoder_states(audio[None], torch.tensor([len(audio)]))
        other_k, other_v = cross_key_values(other.model, other_states)
        other_full, _, _ = candidate_log_probs(other, other_k, other_v, [candidate])
    assert mask.tolist() == [[True, True, True]]
    assert torch.allclose(full, expected, atol=1e-4)
    assert torch.allclose(chosen[0], expected[torch.arange(3), torch.tensor(candidate)], atol=1e-4)
    p, q = full.double(), other_full.double()
    by_hand = torch.tensor([sum(float(p[t, v].exp()) * (float(p[t, v]) - float(q[t, v])) for v in range(p.shape[1]))
                            for t in range(3)], dtype=torch.float64)
    assert torch.allclose(kl_to_reference(full, other_full).double(), by_hand, atol=1e-6)
    assert (by_hand > 0).all() and float(kl_to_reference(full, full).abs().max()) < 1e-6


def _listening_policy() -> WhisperPolicy:
    """The tiny random Whisper with its cross-attention amplified: its tokens then depend on the utterance (a
    random tiny model barely listens), so a row decoded on the wrong utterance's keys shows."""
    policy = tiny_whisper_policy(seed=0)
    with torch.no_grad():
        for layer in policy.model.model.decoder.layers:
            layer.encoder_attn.q_proj.weight *= 5
            layer.encoder_attn.out_proj.weight *= 20
    return policy


def _two_utterances() -> tuple[torch.Tensor, torch.Tensor]:
    """Cross keys and values (L, 2, heads, 1500, hd) of two strongly different "utterances" for the tiny model."""
    generator = torch.Generator().manual_seed(0)
    return tuple(3 * torch.randn(2, 2, 2, 1500, 32, generator=generator) for _ in range(2))


def test_candidates_sharing_an_utterance_score_as_with_their_own_copy_of_its_keys():
    policy = _listening_policy()
    cross_k, cross_v = _two_utterances()
    candidates = [[440, 1234, 50256], [440, 50256], [220, 318, 257, 1332, 50256], [1002, 50256], [5, 6, 7, 50256]]
    per_row = torch.tensor([0, 0, 0, 1, 1])  # the first three score utterance 0, the other two utterance 1
    with torch.no_grad():
        copied = candidate_log_probs(policy, cross_k[:, per_row], cross_v[:, per_row], candidates)
        shared = candidate_log_probs(policy, cross_k, cross_v, candidates, audio_rows=[3, 2])
    full, chosen, mask = shared
    assert mask.sum(1).tolist() == [len(c) for c in candidates]
    assert full.shape == (sum(len(c) for c in candidates), 51864)  # the candidates' positions only, no padding
    assert torch.allclose(full, copied[0], atol=1e-5) and torch.allclose(chosen, copied[1], atol=1e-5)
    swapped = candidate_log_probs(policy, cross_k[:, [1, 0]], cross_v[:, [1, 0]], candidates, audio_rows=[3, 2])[1]
    assert float((swapped - chosen).abs().max()) > 0.1  # which utterance a row scores matters
    assert float(chosen[~mask].abs().max()) == 0.0
    with pytest.raises(ValueError, match="audio_rows"):
        candidate_log_probs(policy, cross_k, cross_v, candidates, audio_rows=[3, 3])


def test_sampled_tokens_follow_the_softmax_and_never_take_an_excluded_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]])).repeat(20_000, 1)
    tokens = sample_tokens(logits, 1.0, torch.Generator().manual_seed(0))
    first, second = tokens[0::2], tokens[1::2]
    shares = torch.bincount(first, minlength=4).double() / len(first)
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.01)
    assert not bool((first == 3).any()) and bool((second == 3).all())
    hot = sample_tokens(torch.log(torch.tensor([[0.9, 0.1]])).repeat(20_000, 1), 2.0,
                        torch.Generator().manual_seed(1))
    expected = torch.softmax(torch.log(torch.tensor([0.9, 0.1])) / 2.0, -1)[1]  # temperature flattens
    assert abs(float(hot.double().mean()) - float(expected)) < 0.01


def test_feedback_audio_is_encoded_from_its_speech_as_the_served_second_pass_encodes_it():
    from voxloop.trainer.whisper_update import WhisperEncodings

    policy = tiny_whisper_policy()
    speech = flite("we meet at noon")
    audio = np.concatenate([np.zeros(16000, np.float32), speech, np.zeros(19200, np.float32)])
    whole = WhisperEncodings(policy).of(0, audio)
    policy.settings = dataclasses.replace(policy.settings, trim_margin_s=0.2)
    cut = WhisperEncodings(policy).of(0, audio)
    assert whole.seconds == pytest.approx(len(audio) / 16000)
    assert len(speech) / 16000 <= cut.seconds <= len(speech) / 16000 + 0.4 + 0.04  # the speech and the margins
    assert cut.cross_k.shape[3] < whole.cross_k.shape[3]


def test_greedy_transcripts_decoded_together_are_those_decoded_one_by_one():
    policy = _listening_policy()
    cross_k, cross_v = _two_utterances()
    budgets = [1, 2, 1, 9, 6]  # utterance 0 (three rows) is done after 2 tokens and leaves the batch
    together = generate(policy, cross_k, cross_v, [True, False, True, True, True], budgets,
                        torch.Generator().manual_seed(0), 1.0, audio_rows=[3, 2])
    alone = [generate(policy, cross_k[:, [a]], cross_v[:, [a]], [True], [budget], None, 1.0)[0]
             for a, budget in ((0, 1), (0, 1), (1, 9), (1, 6))]
    assert alone[0] != alone[2][:1] and len(set(alone[2])) > 3  # the tokens depend on the utterance and the step
    assert [together[0], together[2], together[3], together[4]] == alone
    assert all(0 < len(t) <= b and (len(t) == b or t[-1] == 50256) for t, b in zip(together, budgets, strict=True))


def test_a_group_holds_samples_the_greedy_transcript_and_the_users_texts(tmp_path):
    policy = tiny_whisper_policy(seed=0)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        audio = flite("the red car")
        add_feedback(store, audio, kind="correction", text="the red car", hypothesis="the bed car")
        add_feedback(store, audio, kind="rejection", hypothesis="a wrong transcript")
        add_feedback(store, audio, kind="choice", hypothesis="the red car", chosen_index=1,
                     alternatives=["the bed car", "the red car"])
        items = [feedback_item(p) for p in store.pending_feedback(10)]
    context = WhisperRolloutContext(policy, tokenizer_json())
    config = PPOConfig(samples_per_utterance=3)
    rollout = collect_whisper_rollout(policy, items, config, torch.Generator().manual_seed(0), context)
    correction, rejection, choice = rollout.items
    assert len(correction.candidates) == 3 + 1 + 1  # samples, greedy, the correction
    assert correction.candidates[-1] == context.tokenizer.encode(whisper_style("the red car"))
    assert correction.rewards[-1] == 0.0 and correction.target == correction.candidates[-1]
    assert abs(float(correction.advantages.sum())) < 1e-5  # relative to the group's mean
    assert context.tokenizer.normalized(rejection.candidates[-1]) == "a wrong transcript"
    assert rejection.rewards[-1] == REJECTION_REWARD and rejection.advantages[-1] < 0 and rejection.target is None
    texts = [context.tokenizer.normalized(c) for c in choice.candidates[-2:]]
    assert texts == ["the red car", "the bed car"]  # the chosen alternative (the target), then the other one
    assert choice.rewards[-2] == 0.0 and choice.rewards[-1] < 0
    assert all(c[-1] == 50256 or len(c) >= 8 for r in rollout.items for c in r.candidates[:4])
    # the reference's decoder states, kept for the update's KL, are what the reference computes
    with torch.no_grad():
        policy.model.model.decoder.layer_norm.weight.mul_(2.0)  # a step taken: the policy is no longer the reference
        cross_k, cross_v = context.encodings.full([choice.encoded])
        expected, _ = candidate_states(context.reference, cross_k, cross_v, choice.candidates, [len(choice.candidates)])
        moved, _ = candidate_states(policy, cross_k, cross_v, choice.candidates, [len(choice.candidates)])
    assert torch.allclose(torch.cat(choice.reference_states), expected, atol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-3)
    later = collect_whisper_rollout(policy, items, config, torch.Generator().manual_seed(0), context)
    # a rollout by a moved policy still keeps the reference's states (the users' texts: the same candidates)
    named = sum(len(c) for c in choice.candidates[-2:])
    assert torch.allclose(torch.cat(later.items[2].reference_states[-2:]), expected[-named:], atol=1e-5)


def test_the_users_text_among_the_candidates_gives_the_supervised_gradient_of_a_forward_of_its_own(tmp_path):
    policy = tiny_whisper_policy(seed=0)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        add_feedback(store, flite("the red car"), kind="correction", text="the red car", hypothesis="the bed car")
        add_feedback(store, flite("we meet at noon"), kind="correction", text="we meet at noon", hypothesis="we eat")
        items = [feedback_item(p) for p in store.pending_feedback(10)]
    context = WhisperRolloutContext(policy, tokenizer_json())
    # sft alone (no PPO gradient), 3 rows a forward: the users' texts fall in different chunks
    config = PPOConfig(objective="sft", samples_per_utterance=2, head_ctc_coef=0.0, rows_per_forward=3)
    rollout = collect_whisper_rollout(policy, items, config, torch.Generator().manual_seed(0), context)
    batch = rollout.items
    policy.zero_grad()
    figures = whisper_minibatch_gradients(policy, batch, None, 1.0, config, 0.5, context=context)
    folded = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    own = _cross_entropy(policy, context, [r.encoded for r in batch], [r.target for r in batch])
    (config.sft_coef * own * 0.5).backward()
    alone = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    assert figures["sft_loss"] == pytest.approx(float(own.detach()), rel=1e-5)
    assert figures["ptx_loss"] == figures["sft_loss"]  # no replay, no head
    assert folded.keys() == alone.keys() and len(folded) > 10
    for name, grad in folded.items():
        assert torch.allclose(grad, alone[name], atol=1e-6, rtol=1e-4), name


def test_context_words_keep_the_newest_corrected_words_once():
    class Item:
        def __init__(self, shown: str, target: str):
            from voxloop.core.store import FeedbackKind

            self.kind, self.shown, self.target = FeedbackKind.CORRECTION, shown, target

    words = corrected_words([Item("send it to the bob", "send it to zebulon"), Item("call ann", "call zebulon")])
    assert words == ["zebulon", "zebulon"]
    assert context_words(["kowalski", "zebulon"], words) == ["kowalski", "zebulon"]
    assert context_words(["a", "b", "c"], ["d", "a"], limit=3) == ["c", "d", "a"]


def _config(data_dir: Path, corpus: Path, **changes) -> TrainerConfig:
    ppo = PPOConfig(epochs=1, minibatch_size=4, samples_per_utterance=2, replay_per_minibatch=1, learning_rate=1e-4)
    config = TrainerConfig(data_dir=data_dir, corpus_dir=corpus, heldout_share=0.0, min_heldout_utterances=0,
                           anchor_size=2, replay_pool_size=2, max_anchor_regression=1.0,
                           max_total_anchor_regression=1.0, ppo=ppo)
    return dataclasses.replace(config, **changes)


def _tiny_whisper_registry(tmp_path: Path) -> Registry:
    """A registry serving a tiny random Whisper version."""
    registry = Registry(tmp_path / "registry")
    publish_whisper_version(tiny_whisper_policy(seed=0), registry.root, TINY_WHISPER_VERSION)
    registry.activate(TINY_WHISPER_VERSION)
    return registry


def test_a_cycle_publishes_a_changed_servable_whisper_version_and_the_trainer_resumes_it(tmp_path, flite_corpus):
    registry = _tiny_whisper_registry(tmp_path)
    config = _config(tmp_path / "data", flite_corpus)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        for sentence in SENTENCES:
            add_feedback(store, flite(sentence, "rms"), kind="correction", text=f"{sentence} zebulon",
                         hypothesis=sentence)
        report = run_cycle(store, registry, config)
        assert report.outcome == CycleOutcome.PUBLISHED, report.gate
        assert store.pending_feedback(10) == []
    child = report.version_out
    assert registry.current_version() == child and child == f"{TINY_WHISPER_VERSION}-c0001"
    card = registry.verify(child)
    assert card["format"] == "whisper-two-pass/1" and card["parent_version"] == TINY_WHISPER_VERSION
    assert card["training"]["policy_kind"] == "whisper" and card["training"]["steps"] >= 1
    assert "zebulon" in card["second_pass"]["context_words"]  # the corrected word reaches the decoder
    before = WhisperPolicy.from_pretrained(registry.version_dir(TINY_WHISPER_VERSION) / "policy")
    after = WhisperPolicy.from_pretrained(registry.version_dir(child) / "policy")
    changed = {name for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
               if not torch.equal(a, b)}
    assert any(".decoder.layers." in n for n in changed) and any(n.startswith("ctc_head.") for n in changed)
    assert not any(".encoder." in n or "embed_tokens" in n or "encoder_attn.k_proj" in n for n in changed)
    # servable: the server's loader verifies, loads and warms both passes up on the card's probe
    serving = load_serving_model(registry, ServerConfig(data_dir=tmp_path / "srv"), lambda: 1, child, warmup=True)
    assert serving.second_pass is not None and serving.version == child
    # the trainer resumes from its checkpoint: the published weights, as a Whisper policy
    state = TrainerState.load(config.trainer_dir, registry, config.ppo)
    assert isinstance(state.policy, WhisperPolicy) and state.version == child
    for (name, a), (_, b) in zip(state.policy.named_parameters(), after.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_later_cycle_rehearses_the_texts_earlier_cycles_consumed(tmp_path, flite_corpus):
    registry = _tiny_whisper_registry(tmp_path)
    config = _config(tmp_path / "data", flite_corpus)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        first = [add_feedback(store, flite(s, "rms"), kind="correction", text=s, hypothesis="x")
                 for s in SENTENCES[:2]]
        assert run_cycle(store, registry, config).rehearsed_ids != []  # this cycle's own texts, once more
        later = [add_feedback(store, flite(s, "rms"), kind="correction", text=s, hypothesis="x")
                 for s in SENTENCES[2:]]
        add_feedback(store, flite(SENTENCES[0], "rms"), kind="rejection", hypothesis="a wrong transcript")
        report = run_cycle(store, registry, config)
        assert report.outcome == CycleOutcome.PUBLISHED, report.gate
        # one minibatch of 4: the first cycle's two corrections and this cycle's two (a rejection names no text)
        assert sorted(report.rehearsed_ids) == sorted(first + later)
        card = registry.verify(report.version_out)
        assert card["training"]["rehearsal"]["steps"] == 1 and card["training"]["rehearsal"]["items"] == 4
        # the reward-only objective has no supervised term to rehearse with
        add_feedback(store, flite(SENTENCES[1], "rms"), kind="correction", text=SENTENCES[1], hypothesis="x")
        reward_only = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, objective="ppo"))
        assert run_cycle(store, registry, reward_only).rehearsed_ids == []


def test_rehearsal_steps_lower_the_cross_entropy_of_the_texts_they_rehearse(tmp_path):
    policy = tiny_whisper_policy(seed=0)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        for sentence in SENTENCES:
            add_feedback(store, flite(sentence, "rms"), kind="correction", text=f"{sentence} zebulon",
                         hypothesis=sentence)
        items = [feedback_item(p) for p in store.pending_feedback(10)]
    context = WhisperRolloutContext(policy, tokenizer_json())
    config = PPOConfig(minibatch_size=2, rehearsal_steps=8, replay_coef=0.0, rehearsal_learning_rate=1e-3)

    def cross_entropy() -> float:
        encoded = [context.encodings.of(i.feedback_id, i.samples) for i in items]
        with torch.no_grad():
            return float(_cross_entropy(policy, context, encoded,
                                        [context.tokenizer.encode(whisper_style(i.target)) for i in items]))

    before = cross_entropy()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    report = whisper_rehearsal(policy, optimizer, items, config, context, None, random.Random(0))
    assert optimizer.param_groups[0]["lr"] == 1e-5  # the update's own rate again for the next cycle
    assert report.steps == 2 and sorted(report.feedback_ids) == sorted(i.feedback_id for i in items)  # one pass
    assert cross_entropy() < before - 0.1
    capped = whisper_rehearsal(policy, optimizer, items, dataclasses.replace(config, rehearsal_steps=1), context,
                               None, random.Random(0))
    assert capped.steps == 1 and len(capped.feedback_ids) == 2


def test_the_rehearsal_kl_holds_the_replayed_base_utterances_near_the_reference(tmp_path):
    """The same steps at a rate that moves the decoder far: with rehearsal_kl_coef the replayed base utterances'
    distributions stay nearer the reference's than without it, at about the same cross-entropy on the texts."""
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        for sentence in SENTENCES:
            add_feedback(store, flite(sentence, "rms"), kind="correction", text=f"{sentence} zebulon",
                         hypothesis=sentence)
        items = [feedback_item(p) for p in store.pending_feedback(10)]
    base_audio = [flite(sentence, "slt") for sentence in SENTENCES]

    def rehearse(kl_coef: float) -> tuple[float, float]:
        """(KL to the reference over the base utterances, cross-entropy of the texts) after the rehearsal."""
        policy = tiny_whisper_policy(seed=0)
        context = WhisperRolloutContext(policy, tokenizer_json())
        base = [(context.encodings.of(-(k + 1), audio), context.tokenizer.encode(whisper_style(sentence)))
                for k, (audio, sentence) in enumerate(zip(base_audio, SENTENCES, strict=True))]
        config = PPOConfig(minibatch_size=1, rehearsal_steps=4, replay_coef=0.0, replay_per_minibatch=4,
                           rehearsal_learning_rate=3e-3, rehearsal_kl_coef=kl_coef)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
        whisper_rehearsal(policy, optimizer, items, config, context, lambda count, rng: base[:count],
                          random.Random(0))
        with torch.no_grad():
            cross_k, cross_v = context.encodings.full([encoded for encoded, _ in base])
            targets = [tokens for _, tokens in base]
            moved = candidate_log_probs(policy, cross_k, cross_v, targets)[0]
            held = candidate_log_probs(context.reference, cross_k, cross_v, targets)[0]
            texts = _cross_entropy(policy, context, [context.encodings.of(i.feedback_id, i.samples) for i in items],
                                   [context.tokenizer.encode(whisper_style(i.target)) for i in items])
        return float(kl_to_reference(moved, held).mean()), float(texts)

    free_kl, free_texts = rehearse(0.0)
    held_kl, held_texts = rehearse(50.0)
    assert held_kl < 0.5 * free_kl, (held_kl, free_kl)
    assert held_texts < free_texts + 1.0  # the hold does not undo what the steps teach


def test_a_harmful_update_of_the_real_whisper_is_refused_by_the_gate(whisper_registry, tmp_path, flite_corpus):
    """Learning rate 3e-3 on the decoder wrecks it: the anchor's WER jumps and the gate keeps the serving version."""
    registry = Registry(whisper_registry)
    serving = registry.current_version()
    config = _config(tmp_path / "data", flite_corpus, max_anchor_regression=0.01, anchor_size=4,
                     ppo=PPOConfig(epochs=1, minibatch_size=4, samples_per_utterance=1, two_pass_learning_rate=3e-3,
                                   replay_coef=0.0))
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        for sentence in SENTENCES:
            add_feedback(store, flite(sentence, "rms"), kind="correction", text=sentence, hypothesis=sentence)
        report = run_cycle(store, registry, config)
    assert report.outcome == CycleOutcome.GATED
    assert any("anchor WER rose" in reason for reason in report.gate["reasons"]), report.gate
    assert report.gate["anchor_wer_candidate"] > report.gate["anchor_wer_serving"] + 0.01
    assert registry.current_version() == serving and registry.versions() == [serving]
    assert json.loads((registry.version_dir(serving) / "card.json").read_text())["version"] == serving


def test_a_candidate_whose_graphs_fail_parity_is_gated_without_being_scored(tmp_path, flite_corpus, monkeypatch):
    from voxloop.trainer.export import ParityError

    def broken(*args, **kwargs):
        raise ParityError("the int8 graphs drift from the fp32 ones")

    registry = _tiny_whisper_registry(tmp_path)
    monkeypatch.setattr("voxloop.trainer.whisper_import.write_whisper_version", broken)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        add_feedback(store, flite(SENTENCES[0], "rms"), kind="correction", text=SENTENCES[0], hypothesis="x")
        report = run_cycle(store, registry, _config(tmp_path / "data", flite_corpus))
    assert report.outcome == CycleOutcome.GATED
    assert report.gate["reasons"] and "parity" in report.gate["reasons"][0]
    assert report.gate["anchor_wer_candidate"] is None  # nothing was scored
    assert registry.current_version() == TINY_WHISPER_VERSION
