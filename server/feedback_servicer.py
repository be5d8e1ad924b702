"""The `voxloop.v1.Feedback` servicer: identity, protobuf in and out, errors to statuses; the work is in feedback.py.

Status codes: UNAUTHENTICATED (no usable token), RESOURCE_EXHAUSTED (the user's feedback rate),
INVALID_ARGUMENT (empty / over-long / unspeakable text, an empty or over-long id, tenant or user_id;
ChooseAlternative on an utterance sent without alternatives, or an index outside them), NOT_FOUND
(unknown, dropped or expired utterance), PERMISSION_DENIED (another tenant's utterance; another
tenant's stats without role operator; DeleteUserData without role admin of the user's tenant or
operator), INTERNAL (a bug, logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import grpc
from voxloop.v1 import feedback_pb2 as pb
from voxloop.v1 import feedback_pb2_grpc as pb_grpc

from ..core.limits import InputTooLong
from ..core.store import FeedbackStats, InvalidFeedback, NotFound, PermissionDenied
from .auth import Authenticator, Identity, RateLimited, Unauthenticated
from .feedback import FeedbackIntake
from .status import StatusTable, abort_with

log = logging.getLogger(__name__)

FEEDBACK_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Feedback"].full_name

_STATUS_OF: StatusTable = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidFeedback, grpc.StatusCode.INVALID_ARGUMENT),
    (InputTooLong, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)

T = TypeVar("T")


def feedback_stats_proto(stats: FeedbackStats) -> pb.FeedbackStats:
    return pb.FeedbackStats(
        utterances=stats.utterances, utterances_with_audio=stats.utterances_with_audio, feedback=stats.feedback,
        by_kind=stats.by_kind, by_tenant=stats.by_tenant, by_model_version=stats.by_model_version,
        pending=stats.pending, pending_flagged=stats.pending_flagged, consumed=stats.consumed,
        flagged=stats.flagged, training_cycles=stats.cycles,
    )


class FeedbackServicer(pb_grpc.FeedbackServicer):
    """Runs FeedbackIntake's blocking store work in `executor`, so the event loop keeps streaming."""

    def __init__(self, intake: FeedbackIntake, authenticator: Authenticator, executor: Executor):
        self._intake = intake
        self._auth = authenticator
        self._executor = executor

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[Identity], T]) -> T:
        try:
            caller = self._auth.identify(context)
            return await asyncio.get_running_loop().run_in_executor(self._executor, work, caller)
        except Exception as e:
            await abort_with(context, e, _STATUS_OF, "a feedback call")

    async def SubmitCorrection(self, request: pb.SubmitCorrectionRequest,
                               context: grpc.aio.ServicerContext) -> pb.SubmitCorrectionResponse:
        receipt = await self._call(context, lambda caller: self._intake.submit_correction(
            caller, request.utterance_id, request.corrected_text))
        return pb.SubmitCorrectionResponse(feedback_id=receipt.feedback_id, reward=receipt.reward,
                                           normalized_text=receipt.normalized_text or "", flagged=receipt.flagged)

    async def AcceptTranscript(self, request: pb.AcceptTranscriptRequest,
                               context: grpc.aio.ServicerContext) -> pb.AcceptTranscriptResponse:
        receipt = await self._call(context, lambda caller: self._intake.accept_transcript(caller, request.utterance_id))
        return pb.AcceptTranscriptResponse(feedback_id=receipt.feedback_id, reward=receipt.reward)

    async def RejectTranscript(self, request: pb.RejectTranscriptRequest,
                               context: grpc.aio.ServicerContext) -> pb.RejectTranscriptResponse:
        receipt = await self._call(context, lambda caller: self._intake.reject_transcript(caller, request.utterance_id))
        return pb.RejectTranscriptResponse(feedback_id=receipt.feedback_id, reward=receipt.reward)

    async def ChooseAlternative(self, request: pb.ChooseAlternativeRequest,
                                context: grpc.aio.ServicerContext) -> pb.ChooseAlternativeResponse:
        receipt = await self._call(context, lambda caller: self._intake.choose_alternative(
            caller, request.utterance_id, request.alternative_index))
        return pb.ChooseAlternativeResponse(feedback_id=receipt.feedback_id, reward=receipt.reward,
                                            chosen_text=receipt.normalized_text or "")

    async def GetFeedbackStats(self, request: pb.GetFeedbackStatsRequest,
                               context: grpc.aio.ServicerContext) -> pb.FeedbackStats:
        stats = await self._call(context, lambda caller: self._intake.stats(caller, request.tenant))
        return feedback_stats_proto(stats)

    async def DeleteUserData(self, request: pb.DeleteUserDataRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteUserDataResponse:
        deleted = await self._call(context, lambda caller: self._intake.delete_user_data(
            caller, request.user_id, request.tenant))
        return pb.DeleteUserDataResponse(utterances_deleted=deleted.utterances, feedback_deleted=deleted.feedback)


__all__ = ["FEEDBACK_SERVICE_NAME", "FeedbackServicer", "feedback_stats_proto"]
