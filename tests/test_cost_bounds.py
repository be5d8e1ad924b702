"""Every input's size is bounded before expensive work (issue 14, defects 6 and 8): one test per bound.

The bounds: a correction's text before and after normalization (numbers spelled out), the edit
distances that score it, the number regexes, utterance ids, tenants and user ids, version ids, the
RecognitionConfig's ids, and any status message (the sample rate's resampling cost is bounded in
test_server_audio.py). The last tests send 20 KB ids to a running server: a clear INVALID_ARGUMENT
with a short message, not RESOURCE_EXHAUSTED for trailing metadata too big to carry the echo.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import grpc
import numpy as np
import pytest
from voxloop.clients.client import RecognizerClient, VoxloopError, recognition_config
from voxloop.core.limits import MAX_STATUS_DETAILS_CHARS, InputTooLong
from voxloop.core.rewards import char_similarity, edit_distance, word_edit_reward
from voxloop.core.store import FeedbackStore, InvalidFeedback, UtteranceRecord
from voxloop.core.text import normalize_text
from voxloop.server.app import BackgroundServer
from voxloop.server.auth import Identity, RateLimiter, Role
from voxloop.server.config import ServerConfig
from voxloop.server.feedback import FeedbackIntake, normalized_correction
from voxloop.server.status import status_of
from voxloop.server.stream import RecognitionOptions

MAX_CHARS = 1000
DIGIT_HEAVY = " ".join(["123456789012"] * 77)[:MAX_CHARS]
"""The probe's correction: 1000 characters of 12-digit numbers, thousands of characters once spelled out."""
LONG_HYPOTHESIS = "the quick brown fox jumps over the lazy dog " * 11  # ~500 characters: a 20 s utterance


def naive_edit_distance(a, b) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


# --- corrections: text length, normalization, scoring ---

def test_a_correction_that_normalizes_past_the_limit_is_refused_before_it_is_scored():
    assert len(normalize_text(DIGIT_HEAVY)) > 4 * MAX_CHARS
    with pytest.raises(InvalidFeedback, match=r"normalizes to \d+ characters .* max_correction_chars = 1000"):
        normalized_correction(DIGIT_HEAVY, MAX_CHARS)
    with pytest.raises(InvalidFeedback, match="more than max_correction_chars"):
        normalized_correction("a" * (MAX_CHARS + 1), MAX_CHARS)
    assert normalized_correction("call 555 0100", MAX_CHARS) == "call five hundred and fifty five zero one zero zero"


def test_number_spelling_takes_linear_time_in_a_digit_run():
    began = time.perf_counter()
    normalize_text("7" * 20000 + " and 1." + "9" * 20000 + " and " + "8" * 20000 + "th")  # quadratic regexes:
    assert time.perf_counter() - began < 2.0  # minutes


def test_a_huge_ordinal_is_spelled_digit_by_digit_not_an_internal_error():
    # num2words raised OverflowError past 10^30 (an INTERNAL status for SubmitCorrection).
    assert normalize_text("9" * 40 + "th").startswith(" ".join(["nine"] * 40))
    assert normalize_text("21st") == "twenty first"
    assert normalized_correction("the " + "9" * 100 + "th floor", MAX_CHARS).startswith("the nine nine")


def test_edit_distances_match_the_naive_definition_and_cost_milliseconds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("ab c"), rng.integers(0, 12)))
        b = "".join(rng.choice(list("ab c"), rng.integers(0, 12)))
        assert edit_distance(a, b) == naive_edit_distance(a, b)
        assert edit_distance(a.split(), b.split()) == naive_edit_distance(a.split(), b.split())
    long_reference = normalize_text(DIGIT_HEAVY)  # what scoring cost 1.8 s of CPU on before the bound
    began = time.perf_counter()
    char_similarity(LONG_HYPOTHESIS, long_reference)
    word_edit_reward(LONG_HYPOTHESIS, long_reference)
    assert time.perf_counter() - began < 0.1


def utterance(utterance_id: str) -> UtteranceRecord:
    return UtteranceRecord(id=utterance_id, tenant="acme", user_id="alice", session_id=None, model_version="v1",
                           created_at=datetime.now(UTC), duration_s=1.0, sample_rate_hz=16000,
                           audio=np.zeros(16000, "<i2").tobytes(), hypothesis=LONG_HYPOTHESIS.strip(),
                           confidence=0.5, alternatives=None)


@pytest.fixture
def intake(tmp_path):
    store = FeedbackStore.sqlite(tmp_path / "feedback.sqlite3")
    store.add_utterances([utterance("u1")])
    yield FeedbackIntake(ServerConfig(max_correction_chars=MAX_CHARS), store, None, RateLimiter(1000.0, 1000))
    store.close()


ALICE = Identity("acme", "alice")


def test_the_costliest_correction_within_the_bound_is_scored_and_stored_quickly(intake):
    with pytest.raises(InvalidFeedback, match="normalizes to"):
        intake.submit_correction(ALICE, "u1", DIGIT_HEAVY)
    costliest = ("twelve " * 143).strip()  # 1000 characters, no expansion, against a ~500-character hypothesis
    began = time.perf_counter()
    receipt = intake.submit_correction(ALICE, "u1", costliest)
    assert time.perf_counter() - began < 0.5
    assert receipt.normalized_text == costliest and receipt.flagged


# --- ids, tenants, users ---

@pytest.mark.parametrize("call", ["submit_correction", "accept_transcript", "reject_transcript", "choose_alternative"])
def test_an_over_long_utterance_id_is_refused_before_the_store_is_asked(intake, call):
    too_long = "u" * 65
    arguments = {"submit_correction": ("fine text",), "choose_alternative": (0,)}.get(call, ())
    with pytest.raises(InputTooLong, match="utterance_id has 65 characters; at most 64"):
        getattr(intake, call)(ALICE, too_long, *arguments)


def test_over_long_tenants_and_user_ids_are_refused():
    operator = Identity("ops", "olga", Role.OPERATOR)
    store = None
    intake = FeedbackIntake(ServerConfig(), store, None, RateLimiter(1.0, 1))  # never reaches the store
    with pytest.raises(InputTooLong, match="tenant has 129 characters"):
        intake.stats(operator, "t" * 129)
    with pytest.raises(InputTooLong, match="user_id has 129 characters"):
        intake.delete_user_data(operator, "u" * 129, "acme")
    with pytest.raises(InputTooLong, match="tenant"):
        intake.delete_user_data(operator, "bob", "t" * 129)


@pytest.mark.parametrize("name", ["user_id", "session_id", "language_code"])
def test_over_long_recognition_config_ids_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} has 129 characters; at most 128"):
        RecognitionOptions(sample_rate_hz=16000, **{name: "x" * 129})


def test_any_status_message_is_cut_to_its_bound():
    code, details = status_of(ValueError("x" * 100_000), ((ValueError, grpc.StatusCode.INVALID_ARGUMENT),), "test")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) == MAX_STATUS_DETAILS_CHARS


# --- over a real server: huge ids get INVALID_ARGUMENT, not a metadata overflow ---

@pytest.fixture(scope="module")
def running(tiny_registry_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    config = ServerConfig(port=0, metrics_port=0, data_dir=root / "data", model_dir=tiny_registry_template,
                          model_watch_interval_s=3600.0)
    with BackgroundServer(config) as server:
        yield server


def status(call) -> tuple[str, str]:
    with pytest.raises(VoxloopError) as raised:
        call()
    return raised.value.code, raised.value.details


def test_twenty_kilobyte_ids_get_a_short_invalid_argument(running):
    huge = "u" * 20_000
    with RecognizerClient(running.target, timeout=10) as client:
        for call in (lambda: client.submit_correction(huge, "text"), lambda: client.accept_transcript(huge),
                     lambda: client.reject_transcript(huge), lambda: client.choose_alternative(huge, 0)):
            code, details = status(call)
            assert code == "INVALID_ARGUMENT" and len(details) < 200, (code, details[:100])
        code, details = status(lambda: client.recognize(b"\0\0" * 1600, recognition_config(16000, user_id=huge)))
        assert code == "INVALID_ARGUMENT" and len(details) < 200
        code, details = status(lambda: client.recognize(
            b"\0\0" * 1600, recognition_config(16000, language_code="x" * 100 + "-" * 20_000)))
        assert code == "INVALID_ARGUMENT" and len(details) < 200
