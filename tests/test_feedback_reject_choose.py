"""RejectTranscript and ChooseAlternative over gRPC, n-best finals end to end, and the CLI commands.

One server on 127.0.0.1 (port 0) serves the conftest's tiny random-weight model with a lexicon + LM
decoder (so its finals carry real n-best alternatives) and needs tokens (tenants "acme" and "globex").
Utterances with hand-made alternatives are also written straight into its store, so the choice
tests know exactly what they choose.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

import numpy as np
import pytest
from server_support import chunked, noise, pcm16
from support import TWO_TENANTS_TOKENS
from voxloop.clients.cli import main
from voxloop.clients.client import RecognizerClient, VoxloopError, recognition_config
from voxloop.core.registry import MODEL_FILE, Registry
from voxloop.core.rewards import word_edit_reward
from voxloop.core.store import FeedbackKind, FeedbackStore, UtteranceRecord
from voxloop.server.app import BackgroundServer
from voxloop.server.config import ServerConfig
from voxloop.trainer.lm import DecoderSettings, decoder_section, sentence_counts, write_decoder_files

pytestmark = pytest.mark.slow  # a real server

CHUNK_100MS = 3200
REJECTION_REWARD = -0.75
TEXTS = ["a cat sat on a mat", "i am a dog", "he is at it", "it is a hat", "so a bat ate a rat"]
TOKENS_TOML = TWO_TENANTS_TOKENS


@pytest.fixture(scope="module")
def running(tiny_registry_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("reject-choose")
    shutil.copytree(tiny_registry_template, root / "registry")
    registry = Registry(root / "registry")
    source = registry.version_dir(registry.current_version())
    files = write_decoder_files(sentence_counts(TEXTS), root / "decoder", order=2)
    # A weak LM weight and a word bonus: the random model's frames then spell many competing words.
    registry.publish("tiny-lm", {MODEL_FILE: source / MODEL_FILE, **files},
                     {"decoder": decoder_section(DecoderSettings(order=2, lm_weight=0.2, word_score=2.0),
                                                 source="test texts")})
    (root / "tokens.toml").write_text(TOKENS_TOML)
    config = ServerConfig(port=0, metrics_port=0, data_dir=root / "data", model_dir=root / "registry",
                          tokens_file=root / "tokens.toml", rejection_reward=REJECTION_REWARD, max_alternatives=5,
                          feedback_burst=100, shutdown_grace_s=5.0)
    with BackgroundServer(config) as server:
        server.store_file = config.data_dir / "feedback.sqlite3"
        yield server


@pytest.fixture
def alice(running):
    with RecognizerClient(running.target, token="tok-alice", timeout=10) as client:
        yield client


@pytest.fixture
def store(running):
    with FeedbackStore.sqlite(running.store_file) as opened:
        yield opened


def stored_utterance(store: FeedbackStore, utterance_id: str, hypothesis: str,
                     alternatives: tuple[str, ...] | None, tenant: str = "acme") -> str:
    store.add_utterances([UtteranceRecord(
        id=utterance_id, tenant=tenant, user_id="alice", session_id=None, model_version="tiny-lm",
        created_at=datetime.now(UTC), duration_s=1.0, sample_rate_hz=16000, audio=b"\0\0" * 16000,
        hypothesis=hypothesis, alternatives=alternatives)])
    return utterance_id


def error_code(call) -> tuple[str, str]:
    with pytest.raises(VoxloopError) as raised:
        call()
    return raised.value.code, raised.value.details


def stream_finals(client: RecognizerClient, max_alternatives: int, seed: int = 0):
    config = recognition_config(16000, interim_results=False, max_alternatives=max_alternatives)
    audio = pcm16(noise(1.5, seed=seed))
    return [r for response in client.streaming_recognize(chunked(audio, CHUNK_100MS), config, timeout=30)
            for r in response.results if r.is_final]


# --- RejectTranscript -------------------------------------------------------------------------------


def test_rejecting_a_transcript_stores_a_rejection_with_the_configured_reward(alice, store):
    utterance_id = stored_utterance(store, "reject-1", "the cat sat", None)

    response = alice.reject_transcript(utterance_id)

    assert response.reward == pytest.approx(REJECTION_REWARD)
    [pending] = [p for p in store.pending_feedback(1000) if p.utterance.id == utterance_id]
    assert pending.feedback.kind is FeedbackKind.REJECTION and pending.feedback.id == response.feedback_id
    assert pending.feedback.corrected_text is None and pending.feedback.submitted_by == "alice"
    assert alice.reject_transcript(utterance_id).feedback_id == response.feedback_id  # an idempotent retry


def test_rejecting_an_unknown_or_foreign_utterance_fails_with_a_status(running, alice, store):
    assert error_code(lambda: alice.reject_transcript("no-such-utterance"))[0] == "NOT_FOUND"
    assert error_code(lambda: alice.reject_transcript(""))[0] == "INVALID_ARGUMENT"
    foreign = stored_utterance(store, "reject-globex", "hello", None, tenant="globex")
    assert error_code(lambda: alice.reject_transcript(foreign))[0] == "PERMISSION_DENIED"
    with RecognizerClient(running.target, timeout=10) as anonymous:
        assert error_code(lambda: anonymous.reject_transcript(foreign))[0] == "UNAUTHENTICATED"


# --- ChooseAlternative ------------------------------------------------------------------------------


def test_choosing_an_alternative_stores_the_choice_and_rewards_the_shown_transcript_against_it(alice, store):
    alternatives = ("the cat sat on the mat", "the cat sat on the hat", "a cat sat")
    utterance_id = stored_utterance(store, "choose-1", alternatives[0], alternatives)

    response = alice.choose_alternative(utterance_id, 1)

    assert response.chosen_text == "the cat sat on the hat"
    assert response.reward == pytest.approx(word_edit_reward(alternatives[0], alternatives[1])) == pytest.approx(-1 / 6)
    [pending] = [p for p in store.pending_feedback(1000) if p.utterance.id == utterance_id]
    assert (pending.feedback.kind, pending.feedback.chosen_index) == (FeedbackKind.CHOICE, 1)
    assert pending.utterance.alternatives[pending.feedback.chosen_index] == response.chosen_text
    assert alice.choose_alternative(utterance_id, 0).reward == 0.0  # the first was right after all: latest wins


def test_choosing_outside_the_alternatives_or_without_any_is_invalid_argument(alice, store):
    utterance_id = stored_utterance(store, "choose-2", "one", ("one", "won"))
    code, details = error_code(lambda: alice.choose_alternative(utterance_id, 2))
    assert code == "INVALID_ARGUMENT" and "outside the 2 alternatives" in details
    assert error_code(lambda: alice.choose_alternative(utterance_id, -1))[0] == "INVALID_ARGUMENT"
    bare = stored_utterance(store, "choose-3", "one", None)
    code, details = error_code(lambda: alice.choose_alternative(bare, 0))
    assert code == "INVALID_ARGUMENT" and "max_alternatives" in details


# --- n-best finals end to end -------------------------------------------------------------------------


def written(running, utterance_id: str) -> str:
    """The final reaches the client before the writer thread stores it: wait for the row."""
    assert running.server.writer.wait_written(utterance_id, 10.0)
    return utterance_id


def test_finals_carry_the_n_best_and_the_store_keeps_what_was_shown(running, alice, store):
    [final] = stream_finals(alice, max_alternatives=4, seed=3)

    transcripts = [a.transcript for a in final.alternatives]
    assert 2 <= len(transcripts) <= 4 and len(set(transcripts)) == len(transcripts)
    lexicon = {w for t in TEXTS for w in t.split()}
    assert all(set(t.split()) <= lexicon for t in transcripts)  # the lexicon decoder spells only its words
    assert all(0.0 <= a.confidence <= 1.0 for a in final.alternatives)
    assert [w.word for w in final.alternatives[1].words] == transcripts[1].split()
    stored = store.get_utterance(written(running, final.utterance_id), tenant="acme")
    assert stored.hypothesis == transcripts[0] and stored.alternatives == tuple(transcripts)
    # And the user can pick one of them.
    assert alice.choose_alternative(final.utterance_id, 1).chosen_text == transcripts[1]


def test_one_alternative_by_default_and_none_stored(running, alice, store):
    [final] = stream_finals(alice, max_alternatives=0, seed=3)
    assert len(final.alternatives) == 1
    assert store.get_utterance(written(running, final.utterance_id), tenant="acme").alternatives is None


def test_asking_for_more_alternatives_than_the_server_allows_is_invalid_argument(alice):
    code, details = error_code(lambda: stream_finals(alice, max_alternatives=6))
    assert code == "INVALID_ARGUMENT" and "at most 5" in details
    assert error_code(lambda: stream_finals(alice, max_alternatives=-1))[0] == "INVALID_ARGUMENT"


# --- the CLI ----------------------------------------------------------------------------------------------


def test_cli_reject_and_choose_print_the_reward(running, store, capsys):
    rejected = stored_utterance(store, "cli-reject", "a b", None)
    chosen = stored_utterance(store, "cli-choose", "a cat", ("a cat", "a hat"))
    common = ["--server", running.target, "--token", "tok-alice"]

    assert main(["reject", rejected, *common]) == 0
    assert capsys.readouterr().out.strip() == f"reward {REJECTION_REWARD:.3f}"
    assert main(["choose", chosen, "1", "--json", *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["chosen_text"] == "a hat" and printed["reward"] == pytest.approx(-0.5)
    assert main(["choose", chosen, "7", *common]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_cli_transcribe_prints_numbered_alternatives(running, tmp_path, capsys):
    import soundfile as sf

    path = tmp_path / "noise.wav"
    sf.write(path, np.asarray(noise(1.5, seed=3), dtype=np.float32), 16000)
    assert main(["transcribe", str(path), "--alternatives", "3", "--server", running.target,
                 "--token", "tok-alice"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: ")
    assert [line.strip().split(":")[0] for line in lines[2:]][:2] == ["0", "1"]
