"""One training cycle end to end: feedback in a store -> update -> gate -> registry version -> store records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from support import espeak_speech
from trainer_support import add_feedback, tone, write_corpus
from voxloop.core.decoder import path_text
from voxloop.core.registry import Registry
from voxloop.core.rewards import REJECTION_REWARD
from voxloop.core.store import FeedbackKind, FeedbackStore
from voxloop.trainer import gate
from voxloop.trainer.config import PPOConfig, TrainerConfig
from voxloop.trainer.cycle import child_version_name, is_heldout, lineage_base, run_cycle
from voxloop.trainer.evaluate import EvalSummary
from voxloop.trainer.gate import GateConfig, GateInputs, VersionScores, decide, evaluate_candidate
from voxloop.trainer.model import VoxloopCTCConfig, VoxloopForCTC
from voxloop.trainer.rewards import edit_reward, feedback_item
from voxloop.trainer.update import StepStats, collect_rollout

torch.set_num_threads(1)
BASE_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "base"


def toy_config(data_dir: Path, corpus: Path, **ppo) -> TrainerConfig:
    ppo_config = PPOConfig(**{"epochs": 8, "minibatch_size": 8, "learning_rate": 3e-3, "replay_per_minibatch": 2,
                              "samples_per_utterance": 4, **ppo})
    return TrainerConfig(data_dir=data_dir, corpus_dir=corpus, heldout_share=0.0,
                         min_heldout_utterances=0, anchor_size=3,
                         replay_pool_size=6, max_anchor_regression=1.0, max_total_anchor_regression=1.0,
                         ppo=ppo_config)


def seeded_registry(root: Path, version_dir: Path) -> Registry:
    registry = Registry(root)
    registry.seed_from(version_dir)
    return registry


# --- rewards ---------------------------------------------------------------------------------------


def test_edit_rewards_on_known_pairs():
    assert edit_reward("the cat sat", "the cat sat") == 0.0
    assert edit_reward("the bat sat", "the cat sat", "word") == pytest.approx(-1 / 3)
    assert edit_reward("the bat sat", "the cat sat", "char") == pytest.approx(-1 / 11)
    assert edit_reward("", "abc", "char") == -1.0


def test_each_feedback_kind_maps_to_its_reward_and_target(tmp_path):
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        samples = tone("a")
        add_feedback(store, samples, kind="correction", text="Hello World", hypothesis="hello word")
        add_feedback(store, samples, kind="acceptance", hypothesis="good morning")
        add_feedback(store, samples, kind="rejection", hypothesis="wrong words")
        add_feedback(store, samples, kind="choice", hypothesis="recognise speech",
                     alternatives=["recognise speech", "wreck a nice beach"], chosen_index=1)
        items = {i.kind: i for i in map(feedback_item, store.pending_feedback(10))}
    correction = items[FeedbackKind.CORRECTION]
    assert correction.target == "hello world" and correction.reward("hello word") == pytest.approx(-1 / 11)
    assert items[FeedbackKind.ACCEPTANCE].target == "good morning"
    assert items[FeedbackKind.ACCEPTANCE].reward("good morning") == 0.0
    rejection = items[FeedbackKind.REJECTION]
    assert rejection.target is None and rejection.reference is None
    assert rejection.reward("wrong words") == REJECTION_REWARD and rejection.reward("other words") == 0.0
    assert rejection.alternatives == ("wrong words",)
    choice = items[FeedbackKind.CHOICE]
    assert choice.target == "wreck a nice beach"
    assert choice.reward("wreck a nice beach") == 0.0 and choice.reward("recognise speech") < -0.3
    assert choice.alternatives == ("recognise speech", "wreck a nice beach")


def test_a_rejected_transcript_joins_its_group_and_is_pushed_below_the_others(tmp_path):
    # The shown text is the server's beam search output, which sampled CTC paths rarely spell exactly:
    # without its alignment in the group every candidate scores 0 and the rejection teaches nothing.
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        add_feedback(store, tone("a", seconds=2.0), kind="rejection", hypothesis="the wrong words")
        item = feedback_item(store.pending_feedback(1)[0])
    torch.manual_seed(0)
    policy = VoxloopForCTC(VoxloopCTCConfig(num_layers=2, d_model=64, num_heads=2, ff_multiplier=2, dropout=0.0))
    rollout = collect_rollout(policy, [item], PPOConfig(samples_per_utterance=4), torch.Generator().manual_seed(0))
    group = rollout.items[0]
    texts = [path_text(p, policy.config.vocabulary) for p in group.paths]
    rejected = texts.index("the wrong words")
    assert group.rewards[rejected] == REJECTION_REWARD
    assert group.advantages[rejected] < 0 < group.advantages[0]


# --- gate ------------------------------------------------------------------------------------------


def test_gate_rules_on_figures():
    def s(wer: float, n: int = 10) -> EvalSummary:
        return EvalSummary(n, wer, wer)

    ok = decide(heldout_candidate=s(0.30), heldout_serving=s(0.40), anchor_candidate=s(0.505),
                anchor_serving=s(0.50), config=GateConfig(0.01), parity_max_abs_diff=1e-6, parity_ok=True)
    assert ok.passed and ok.reasons == ()
    worse_heldout = decide(heldout_candidate=s(0.41), heldout_serving=s(0.40), anchor_candidate=s(0.5),
                           anchor_serving=s(0.5), config=GateConfig(0.01), parity_max_abs_diff=0.0, parity_ok=True)
    assert not worse_heldout.passed and "held-out WER rose" in worse_heldout.reasons[0]
    worse_anchor = decide(heldout_candidate=None, heldout_serving=None, anchor_candidate=s(0.52),
                          anchor_serving=s(0.50), config=GateConfig(0.01), parity_max_abs_diff=0.0, parity_ok=True)
    assert not worse_anchor.passed and "anchor WER rose" in worse_anchor.reasons[0]
    assert worse_anchor.heldout_wer_candidate is None
    drifted = decide(heldout_candidate=None, heldout_serving=None, anchor_candidate=s(0.525), anchor_serving=s(0.52),
                     config=GateConfig(0.01, 0.02), parity_max_abs_diff=0.0, parity_ok=True, anchor_base=s(0.50))
    assert not drifted.passed and "above the base version" in drifted.reasons[0]  # small steps may not add up
    assert drifted.anchor_wer_base == 0.50
    no_parity = decide(heldout_candidate=None, heldout_serving=None, anchor_candidate=None, anchor_serving=None,
                       config=GateConfig(0.01), parity_max_abs_diff=0.5, parity_ok=False)
    assert not no_parity.passed and "parity" in no_parity.reasons[0]
    assert worse_anchor.anchor_only and drifted.anchor_only  # a smaller step of the update may pass
    assert not (ok.anchor_only or worse_heldout.anchor_only or no_parity.anchor_only)
    both = decide(heldout_candidate=s(0.41), heldout_serving=s(0.40), anchor_candidate=s(0.52),
                  anchor_serving=s(0.50), config=GateConfig(0.01), parity_max_abs_diff=0.0, parity_ok=True)
    assert len(both.reasons) == 2 and not both.anchor_only  # worse where users spoke: the direction is wrong
    unmeasured = decide(heldout_candidate=None, heldout_serving=None, anchor_candidate=s(0.49), anchor_serving=s(0.5),
                        config=GateConfig(0.01, min_heldout_utterances=1), parity_max_abs_diff=0.0, parity_ok=True)
    assert not unmeasured.passed and "fewer than min_heldout_utterances = 1" in unmeasured.reasons[0]


@pytest.mark.slow  # a training cycle (update, export, gate)
def test_a_batch_of_rejections_alone_is_gated_by_default_for_want_of_a_held_out_reference(
        tmp_path, tiny_version_dir, toy_corpus):
    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    config = dataclasses.replace(toy_config(tmp_path / "data", toy_corpus, epochs=1), heldout_share=0.5,
                                 min_heldout_utterances=TrainerConfig.min_heldout_utterances)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        ids = [add_feedback(store, tone(w, seed=i), kind="rejection", hypothesis="b c") for i, w in enumerate("abca")]
        report = run_cycle(store, registry, config)
        assert report.outcome == "gated" and registry.current_version() == "tiny-0001"
        assert any("rejections alone have no reference" in reason for reason in report.gate["reasons"])
        assert sorted(store.get_cycle(report.cycle_id).feedback_ids) == sorted(ids)  # consumed, not retried


def test_a_backed_off_candidate_is_gated_without_scoring_the_serving_version_again(tmp_path, monkeypatch):
    scored = []

    def fake_score(version_dir, utterances):
        scored.append((Path(version_dir).name, len(utterances)))
        return EvalSummary(utterances=len(utterances), wer=0.5 if Path(version_dir).name == "serving" else 0.4,
                           cer=0.2)

    monkeypatch.setattr(gate, "score_version", fake_score)
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (candidate / "card.json").write_text("{}")
    sets = ([(torch.zeros(8).numpy(), "a b")] * 2, [(torch.zeros(8).numpy(), "c")] * 3)
    inputs = GateInputs(candidate, ("v1", tmp_path / "serving"), ("v1", tmp_path / "serving"), *sets)
    anchor_scores, heldout_scores = VersionScores(), VersionScores()
    for _ in range(2):  # a candidate and its backoff, one cycle
        decision, _ = evaluate_candidate(inputs, GateConfig(), parity_ok=True, parity_max_abs_diff=0.0,
                                         anchor_scores=anchor_scores, heldout_scores=heldout_scores)
        assert decision.passed and decision.heldout_wer_serving == 0.5

    assert scored.count(("serving", 2)) == 1 and scored.count(("serving", 3)) == 1  # held-out, anchor: once each
    assert scored.count(("candidate", 2)) == 2  # each candidate is scored afresh


@pytest.mark.slow  # a training cycle (update, export, gate)
def test_gate_refuses_a_candidate_made_deliberately_worse(tmp_path):
    """The shipped model, a real-speech anchor set, and an update with a destructive learning rate."""
    sentences = ["the weather is nice today", "please open the door", "i would like a cup of tea",
                 "the train leaves at noon", "she reads a book every night", "we walked along the river"]
    corpus = write_corpus(tmp_path / "corpus", {"train": [(s, espeak_speech(s)) for s in sentences[:2]],
                                                "dev": [(s, espeak_speech(s)) for s in sentences]})
    registry = seeded_registry(tmp_path / "registry", BASE_MODEL_DIR)
    parent = registry.current_version()
    config = TrainerConfig(data_dir=tmp_path / "data", corpus_dir=corpus, heldout_share=0.0,
                           min_heldout_utterances=0, anchor_size=6,
                           replay_pool_size=2, ppo=PPOConfig(learning_rate=0.05, epochs=3, minibatch_size=2,
                                                             objective="sft", replay_coef=0.0))
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        ids = [add_feedback(store, espeak_speech(text), text="zzz qqq xxx") for text in ("hello there", "good night")]
        report = run_cycle(store, registry, config)
        assert report.outcome == "gated"
        assert report.gate["anchor_wer_candidate"] > report.gate["anchor_wer_serving"] + 0.01
        assert any("anchor WER rose" in reason for reason in report.gate["reasons"])
        assert registry.current_version() == parent and registry.versions() == [parent]
        cycle = store.get_cycle(report.cycle_id)
        assert cycle.outcome == "gated" and cycle.model_version_out is None
        assert sorted(cycle.feedback_ids) == sorted(ids)  # a refused batch is consumed, not retried forever
        assert cycle.stats["gate"]["passed"] is False
    # The trainer's weights went back to the serving model's.
    from voxloop.trainer.state import TrainerState

    state = TrainerState.load(config.trainer_dir, registry, config.ppo)
    served = TrainerState.load(tmp_path / "fresh", registry, config.ppo)
    assert all(torch.equal(a, b) for a, b in zip(state.policy.state_dict().values(),
                                                 served.policy.state_dict().values(), strict=True))


@pytest.mark.slow  # a training cycle, two candidates
def test_a_candidate_refused_for_the_anchor_alone_is_rebuilt_with_its_update_halved(
        tmp_path, tiny_version_dir, toy_corpus, monkeypatch):
    from voxloop.trainer import cycle as cycle_module
    from voxloop.trainer.release import load_policy
    from voxloop.trainer.state import TrainerState

    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    config = toy_config(tmp_path / "data", toy_corpus, epochs=2)
    state = TrainerState.load(config.trainer_dir, registry, config.ppo)
    served = {name: p.detach().clone() for name, p in state.policy.named_parameters()}
    gated_weights, real_gate = [], cycle_module._gate

    def first_candidate_refused_for_the_anchor(*args, **kwargs):
        gated_weights.append({name: p.detach().clone() for name, p in state.policy.named_parameters()})
        decision, anchor = real_gate(*args, **kwargs)
        if len(gated_weights) == 1:
            decision = dataclasses.replace(decision, passed=False, reasons=("anchor WER rose (test)",),
                                           anchor_only=True)
        return decision, anchor

    monkeypatch.setattr(cycle_module, "_gate", first_candidate_refused_for_the_anchor)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        [add_feedback(store, tone(w, seed=10 + i), text=w) for i, w in enumerate("abcabcab")]
        report = run_cycle(store, registry, config, state=state)
    assert report.outcome == "published" and report.backoffs == 1 and len(gated_weights) == 2
    full, halved = gated_weights
    assert any(not torch.equal(full[name], before) for name, before in served.items())
    for name, before in served.items():
        torch.testing.assert_close(halved[name], before + 0.5 * (full[name] - before))
    published = dict(load_policy(registry.version_dir(report.version_out)).named_parameters())
    assert all(torch.equal(published[name], halved[name]) for name in served)  # what ships is the shorter step
    card = registry.verify(report.version_out)
    assert card["training"]["backoffs"] == 1
    assert card["training"]["refused_before_backoff"][0]["reasons"] == ["anchor WER rose (test)"]
    assert {"backoff1.export", "backoff1.gate"} <= set(report.seconds)


# --- a cycle -----------------------------------------------------------------------------------------


@pytest.mark.slow  # a training cycle (update, export, gate)
def test_a_cycle_raises_the_mean_reward_and_publishes_a_version(tmp_path, tiny_version_dir, toy_corpus):
    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    config = toy_config(tmp_path / "data", toy_corpus)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        ids = [add_feedback(store, tone(w, seed=10 + i), text=w) for i, w in enumerate("abcabcab")]
        report = run_cycle(store, registry, config)
        assert report.outcome == "published", report.gate
        assert report.reward_after["sampled"] > report.reward_before["sampled"] + 0.2
        assert report.reward_after["greedy"] > report.reward_before["greedy"]
        assert registry.current_version() == report.version_out == "tiny-0001-c0001"
        assert lineage_base(registry, report.version_out) == "tiny-0001"
        card = registry.verify(report.version_out)
        assert card["parent_version"] == "tiny-0001"
        assert sorted(card["training"]["trained_feedback_ids"]) == sorted(ids)
        assert card["gate"]["passed"] is True and "policy/model.safetensors" in card["files"]
        cycle = store.get_cycle(report.cycle_id)
        assert cycle.outcome == "published" and cycle.model_version_out == report.version_out
        assert sorted(cycle.feedback_ids) == sorted(ids) and store.pending_count() == 0
        assert {"approx_kl", "clip_fraction", "entropy", "kl_coef", "grad_norm", "policy_loss", "ptx_loss",
                "reward_mean", "reward_std"} <= set(report.last_step.as_dict())
        # One StepStats for the report, the card and the record (None statistics left out, e.g. no head_ctc_loss)
        assert card["training"]["last_step"] == cycle.stats["last_step"] == report.last_step.as_dict()
        assert report.last_step.head_ctc_loss is None and "head_ctc_loss" not in card["training"]["last_step"]
        assert set(report.last_step.gauges()) == set(StepStats.GAUGED)
        # the update's parts are timed within it (what a bench reads to see where a cycle's time goes)
        parts = [f"update.{part}" for part in ("rollout", "replay_pool", "steps", "reward_after")]
        assert {"read", "update", "export", "gate", "total", *parts} <= set(report.seconds)
        assert sum(report.seconds[part] for part in parts) == pytest.approx(report.seconds["update"], abs=0.05)
        assert cycle.stats["seconds"] == report.seconds


@pytest.mark.slow  # a training cycle (update, export, gate)
def test_held_out_items_are_picked_by_id_and_never_trained_on(tmp_path, tiny_version_dir, toy_corpus):
    assert [is_heldout(i, 0.5) for i in range(200)] == [is_heldout(i, 0.5) for i in range(200)]
    assert 60 < sum(is_heldout(i, 0.5) for i in range(200)) < 140
    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    config = dataclasses.replace(toy_config(tmp_path / "data", toy_corpus, epochs=1), heldout_share=0.5,
                                 max_anchor_regression=0.0)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        ids = [add_feedback(store, tone(w, seed=i), text=w) for i, w in enumerate("abcabcab")]
        rejection = add_feedback(store, tone("a"), kind="rejection", hypothesis="b")
        report = run_cycle(store, registry, config)
    assert set(report.heldout_ids) == {i for i in ids if is_heldout(i, 0.5)}
    assert not set(report.heldout_ids) & set(report.trained_ids)
    assert rejection in report.trained_ids  # no reference text: never held out
    assert sorted(report.feedback_ids) == sorted([*ids, rejection])
    assert report.gate["heldout_utterances"] == len(report.heldout_ids)


@pytest.mark.slow  # two training cycles (update, export, gate)
def test_earlier_cycles_held_out_items_gate_later_cycles_too(tmp_path, tiny_version_dir, toy_corpus):
    """A batch holds out a handful of items; the gate also scores the earlier batches' (heldout_pool), never
    training on any of them."""
    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    config = dataclasses.replace(toy_config(tmp_path / "data", toy_corpus, epochs=1), heldout_share=0.5)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        [add_feedback(store, tone(w, seed=i), text=w) for i, w in enumerate("abcabcab")]
        first = run_cycle(store, registry, config)
        [add_feedback(store, tone(w, seed=10 + i), text=w) for i, w in enumerate("cabcabca")]
        second = run_cycle(store, registry, config)
        without_pool = dataclasses.replace(config, heldout_pool=0)
        [add_feedback(store, tone(w, seed=20 + i), text=w) for i, w in enumerate("bcabcabc")]
        third = run_cycle(store, registry, without_pool)
    assert first.heldout_ids and first.earlier_heldout_ids == []
    assert sorted(second.earlier_heldout_ids) == sorted(first.heldout_ids)
    assert second.gate["heldout_utterances"] == len(second.heldout_ids) + len(first.heldout_ids)
    assert not set(second.earlier_heldout_ids) & set(second.trained_ids + second.rehearsed_ids)
    assert third.earlier_heldout_ids == [] and third.gate["heldout_utterances"] == len(third.heldout_ids)


def test_version_names_follow_the_parent_stem_and_never_collide(tmp_path, tiny_version_dir):
    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    assert child_version_name(registry, "tiny-0001", 3) == "tiny-0001-c0003"
    assert child_version_name(registry, "tiny-0001-c0003", 4) == "tiny-0001-c0004"
    (registry.versions_root / "tiny-0001-c0005").mkdir()
    assert child_version_name(registry, "tiny-0001-c0004", 5) == "tiny-0001-c0005.1"


@pytest.mark.slow  # a training cycle (update, export, gate)
def test_published_versions_carry_the_parents_decoder_forward_and_adapt_it(tmp_path, tiny_version_dir, toy_corpus):
    import shutil

    from voxloop.trainer.lm import DecoderSettings, add_decoder_to_version

    with_decoder = tmp_path / "tiny-lm"
    shutil.copytree(tiny_version_dir, with_decoder)
    add_decoder_to_version(with_decoder, ["a b c", "b c a"], DecoderSettings(), source="test")
    for adapt in (True, False):
        registry = seeded_registry(tmp_path / f"registry-{adapt}", with_decoder)
        config = dataclasses.replace(toy_config(tmp_path / f"data-{adapt}", toy_corpus, epochs=1),
                                     adapt_lexicon=adapt)
        with FeedbackStore.sqlite(tmp_path / f"f-{adapt}.sqlite3") as store:
            add_feedback(store, tone("a"), text="a zebra")
            report = run_cycle(store, registry, config)
        assert report.outcome == "published", report.gate
        assert report.gate["decoding"] == "lexicon-lm"  # the gate decodes as the server will
        child = registry.version_dir(report.version_out)
        card = registry.verify(report.version_out)
        parent_card = registry.load_card("tiny-0001")
        decoder_files = {n for n in parent_card["files"] if n != "model.onnx" and not n.startswith("policy/")}
        assert decoder_files and decoder_files <= set(card["files"])
        assert card["decoder"]["type"] == parent_card["decoder"]["type"]
        lexicon = (child / "lexicon.txt").read_text()
        assert ("zebra" in lexicon) is adapt


@pytest.mark.slow  # a training cycle (update, export, gate)
def test_published_version_carries_a_probe_the_servers_warm_up_reproduces(tmp_path, tiny_version_dir, toy_corpus):
    from voxloop.core.model import OnnxModel
    from voxloop.core.warmup import WarmupFailed, warm_up

    registry = seeded_registry(tmp_path / "registry", tiny_version_dir)
    config = toy_config(tmp_path / "data", toy_corpus)
    with FeedbackStore.sqlite(tmp_path / "f.sqlite3") as store:
        for i, w in enumerate("abcabcab"):
            add_feedback(store, tone(w, seed=10 + i), text=w)
        report = run_cycle(store, registry, config)
    assert report.outcome == "published", report.gate
    card = registry.verify(report.version_out)  # the probe WAV is hashed like every other file
    assert card["probe"]["file"] in card["files"]
    version_dir = registry.version_dir(report.version_out)
    model = OnnxModel(version_dir / "model.onnx")
    assert warm_up(model, card, version_dir).expected == card["probe"]["transcript"]
    tampered = {**card, "probe": {**card["probe"], "transcript": card["probe"]["transcript"] + " zzz"}}
    with pytest.raises(WarmupFailed) as refused:
        warm_up(model, tampered, version_dir)
    assert refused.value.reason == "probe_mismatch"
