"""Correction intake: validate, rate-limit, compute the reward, flag, and commit to the store. No gRPC here.

`FeedbackIntake` is what the Feedback servicer calls (in a worker thread: every method blocks on the
store). Errors are the store's (NotFound, PermissionDenied, InvalidFeedback) plus RateLimited; the
servicer maps them to statuses. A method returns only after `submit_feedback` committed, so what
the RPC acknowledges is durable (invariant 1).

Feedback may name an utterance whose row is not in the store yet: still in this server's writer queue
(waited for on the queue), or written by another replica or worker sharing the store, whose final
reached the client before its row was committed. An unknown id is looked up again with a doubling
delay until store_flush_wait_s has passed, then it is NOT_FOUND. Polling, because SQLite (shared by
`voxloop serve --workers N`) has no change notification; each retry is one primary-key lookup.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

from ..core.limits import MAX_ID_CHARS, MAX_UTTERANCE_ID_CHARS, check_length
from ..core.metrics import FEEDBACK_RECEIVED
from ..core.rewards import char_similarity, is_suspicious, word_edit_reward
from ..core.store import (
    DeletedCounts,
    FeedbackKind,
    FeedbackStats,
    FeedbackStore,
    InvalidFeedback,
    NotFound,
    PermissionDenied,
    UnknownUtterance,
)
from ..core.text import ALPHABET, normalize_text
from .auth import Identity, RateLimiter
from .config import ServerConfig
from .utterance_writer import UtteranceWriter

log = logging.getLogger(__name__)

ACCEPTANCE_REWARD = 0.0
"""An accepted transcript is its own reference: zero edits, the best reward the formula gives."""
STORE_RETRY_FIRST_S = 0.02
"""First wait before looking an unknown utterance id up again (then doubling, up to STORE_RETRY_MAX_S)."""
STORE_RETRY_MAX_S = 0.4
SERVER_UTTERANCE_ID = re.compile(r"[0-9a-f]{32}")
"""The ids servers give utterances (uuid4().hex, stream.py): only such an id may be on its way from another
replica; any other unknown id is NOT_FOUND at once."""
MAX_STORE_WAITERS = 2
"""Calls that may wait for an unknown utterance at once; past this, NOT_FOUND at once, so a burst of
made-up ids cannot hold every feedback thread for store_flush_wait_s."""


@dataclass(frozen=True)
class FeedbackReceipt:
    """What the client is told once its feedback is committed."""

    feedback_id: int
    reward: float
    normalized_text: str | None
    flagged: bool


def normalized_correction(text: str, max_chars: int) -> str:
    """The correction as training sees it; raises InvalidFeedback for empty, too long or unspeakable text.

    Bounded before and after normalization, so the edit distances against the hypothesis (and the
    row stored) cost at most what a max_chars-character text costs.
    """
    if not text.strip():
        raise InvalidFeedback("corrected_text is empty; send what was said (to keep the transcript, "
                              "use AcceptTranscript)")
    if len(text) > max_chars:
        raise InvalidFeedback(f"corrected_text has {len(text)} characters, more than max_correction_chars = "
                              f"{max_chars}; correct one utterance at a time")
    normalized = normalize_text(text)
    if len(normalized) > max_chars:  # numbers are spelled out: 1000 digits become 6000 characters
        raise InvalidFeedback(f"corrected_text normalizes to {len(normalized)} characters (numbers and symbols "
                              f"spelled out), more than max_correction_chars = {max_chars}; correct one "
                              "utterance at a time")
    if not normalized:
        raise InvalidFeedback("corrected_text has nothing speakable in it after normalization (letters, "
                              "numbers and apostrophes count; symbols and other scripts are dropped)")
    outside = sorted(set(normalized) - set(ALPHABET))
    if outside:  # normalize_text guarantees the alphabet; kept as the contract's check
        raise InvalidFeedback(f"corrected_text normalizes to characters the model cannot emit: {outside}")
    return normalized


def check_utterance_id(utterance_id: str) -> str:
    """Raises InvalidFeedback (empty) or InputTooLong: checked before any work, and before any message echoes it."""
    if not utterance_id:
        raise InvalidFeedback("utterance_id is empty; pass the utterance_id of a final result")
    return check_length("utterance_id", utterance_id, MAX_UTTERANCE_ID_CHARS)


class FeedbackIntake:
    """SubmitCorrection / AcceptTranscript / RejectTranscript / ChooseAlternative / stats over a FeedbackStore,
    as one tenant's user sees them."""

    def __init__(self, config: ServerConfig, store: FeedbackStore, writer: UtteranceWriter | None,
                 rate_limiter: RateLimiter):
        self._config = config
        self._store = store
        self._writer = writer
        self._rate_limiter = rate_limiter
        self._store_waiters = threading.BoundedSemaphore(MAX_STORE_WAITERS)

    def _utterance(self, caller: Identity, utterance_id: str):
        check_utterance_id(utterance_id)
        deadline = time.monotonic() + self._config.store_flush_wait_s
        # The final may have reached the client before its row reached the store (the writer is off
        # the streaming path): wait for a queued id rather than answer NOT_FOUND.
        if self._writer is not None and not self._writer.wait_written(utterance_id, self._config.store_flush_wait_s):
            log.warning("utterance %s still queued after %.1f s", utterance_id, self._config.store_flush_wait_s)
        try:
            return self._store.get_utterance(utterance_id, tenant=caller.tenant, with_audio=False)
        except UnknownUtterance:
            if not SERVER_UTTERANCE_ID.fullmatch(utterance_id) or not self._store_waiters.acquire(blocking=False):
                raise
        try:  # perhaps another replica's: wait for its writer (module docstring)
            return self._wait_for_utterance(caller, utterance_id, deadline)
        finally:
            self._store_waiters.release()

    def _wait_for_utterance(self, caller: Identity, utterance_id: str, deadline: float):
        delay = STORE_RETRY_FIRST_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UnknownUtterance(f"no utterance {utterance_id!r} (waited {self._config.store_flush_wait_s:g} s "
                                       "for it to be stored)")
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, STORE_RETRY_MAX_S)
            try:
                return self._store.get_utterance(utterance_id, tenant=caller.tenant, with_audio=False)
            except UnknownUtterance:
                continue

    def submit_correction(self, caller: Identity, utterance_id: str, corrected_text: str) -> FeedbackReceipt:
        """Raises RateLimited, InvalidFeedback, InputTooLong, NotFound, PermissionDenied."""
        self._rate_limiter.acquire((caller.tenant, caller.user))
        check_utterance_id(utterance_id)
        normalized = normalized_correction(corrected_text, self._config.max_correction_chars)
        utterance = self._utterance(caller, utterance_id)
        reward = word_edit_reward(utterance.hypothesis, normalized)
        threshold = self._config.flag_similarity_threshold
        flagged = is_suspicious(utterance.hypothesis, normalized, threshold)
        reason = None
        if flagged:
            reason = (f"character similarity {char_similarity(utterance.hypothesis, normalized):.2f} to the "
                      f"hypothesis is below {threshold:g}")
        record = self._store.submit_feedback(
            utterance_id, tenant=caller.tenant, user=caller.user, kind=FeedbackKind.CORRECTION, reward=reward,
            corrected_text=normalized, flagged=flagged, flag_reason=reason,
        )
        FEEDBACK_RECEIVED.labels(kind=record.kind.value).inc()
        return FeedbackReceipt(record.id, record.reward, record.corrected_text, record.flagged)

    def accept_transcript(self, caller: Identity, utterance_id: str) -> FeedbackReceipt:
        """Raises RateLimited, InvalidFeedback, InputTooLong, NotFound, PermissionDenied."""
        self._rate_limiter.acquire((caller.tenant, caller.user))
        self._utterance(caller, utterance_id)
        record = self._store.submit_feedback(utterance_id, tenant=caller.tenant, user=caller.user,
                                             kind=FeedbackKind.ACCEPTANCE, reward=ACCEPTANCE_REWARD)
        FEEDBACK_RECEIVED.labels(kind=record.kind.value).inc()
        return FeedbackReceipt(record.id, record.reward, None, record.flagged)

    def reject_transcript(self, caller: Identity, utterance_id: str) -> FeedbackReceipt:
        """The transcript was wrong and no text was given: config.rejection_reward.

        Raises RateLimited, InvalidFeedback, InputTooLong, NotFound, PermissionDenied.
        """
        self._rate_limiter.acquire((caller.tenant, caller.user))
        self._utterance(caller, utterance_id)
        record = self._store.submit_feedback(utterance_id, tenant=caller.tenant, user=caller.user,
                                             kind=FeedbackKind.REJECTION, reward=self._config.rejection_reward)
        FEEDBACK_RECEIVED.labels(kind=record.kind.value).inc()
        return FeedbackReceipt(record.id, record.reward, None, record.flagged)

    def choose_alternative(self, caller: Identity, utterance_id: str, index: int) -> FeedbackReceipt:
        """The user picked alternative `index` of the final's n-best; its text is the receipt's normalized_text.

        The reward is the shown transcript's (alternative 0, the stored hypothesis) against the chosen
        one, as a correction to that text would give. Raises RateLimited, InputTooLong, InvalidFeedback (no
        alternatives were sent, or index outside them), NotFound, PermissionDenied.
        """
        self._rate_limiter.acquire((caller.tenant, caller.user))
        utterance = self._utterance(caller, utterance_id)
        alternatives = utterance.alternatives or ()
        if not alternatives:
            raise InvalidFeedback(f"utterance {utterance_id!r} was finalized without alternatives; recognize with "
                                  "max_alternatives > 1 in RecognitionConfig to get n-best to choose from")
        if not 0 <= index < len(alternatives):
            raise InvalidFeedback(f"alternative_index {index} is outside the {len(alternatives)} alternatives of "
                                  f"utterance {utterance_id!r} (0..{len(alternatives) - 1})")
        chosen = alternatives[index]
        record = self._store.submit_feedback(utterance_id, tenant=caller.tenant, user=caller.user,
                                             kind=FeedbackKind.CHOICE, chosen_index=index,
                                             reward=word_edit_reward(utterance.hypothesis, chosen))
        FEEDBACK_RECEIVED.labels(kind=record.kind.value).inc()
        return FeedbackReceipt(record.id, record.reward, chosen, record.flagged)

    def stats(self, caller: Identity, tenant: str = "") -> FeedbackStats:
        """The caller's tenant's counts; an operator may ask for any tenant, or all with tenant ""."""
        check_length("tenant", tenant, MAX_ID_CHARS)
        if caller.is_operator:
            return self._store.stats(tenant=tenant or None)
        if tenant and tenant != caller.tenant:
            raise PermissionDenied("reading another tenant's feedback stats needs an operator token "
                                   "(role = \"operator\"); user and admin tokens read their own tenant's")
        return self._store.stats(tenant=caller.tenant)

    def delete_user_data(self, caller: Identity, user_id: str, tenant: str = "") -> DeletedCounts:
        """A user's utterances (with all feedback on them) and the feedback they gave, in `tenant` (default:
        the caller's). Needs an admin token of that tenant, or an operator token.

        Raises PermissionDenied for any other caller, InvalidFeedback for an empty or over-long user_id.
        """
        check_length("tenant", tenant, MAX_ID_CHARS)
        check_length("user_id", user_id, MAX_ID_CHARS)
        tenant = tenant or caller.tenant
        if not caller.administers(tenant):
            raise PermissionDenied("DeleteUserData needs an admin token of the user's tenant (role = \"admin\") "
                                   "or an operator token (role = \"operator\"); a tenant's admin cannot act "
                                   "on another tenant")
        if not user_id:
            raise InvalidFeedback("user_id is empty; name the user whose data to delete")
        if self._writer is not None:  # the user's last utterances may still be on their way to the store
            self._writer.wait_all_written(self._config.store_flush_wait_s)
        deleted = self._store.delete_user_data(tenant, user_id)
        log.info("%s/%s deleted the data of user %r in tenant %r", caller.tenant, caller.user, user_id, tenant)
        return deleted


__all__ = ["ACCEPTANCE_REWARD", "FeedbackIntake", "FeedbackReceipt", "NotFound", "normalized_correction"]
