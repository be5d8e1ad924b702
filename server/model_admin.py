"""The `voxloop.v1.ModelAdmin` servicer: operator identity, protobuf in and out; the work is in watcher.py.

Every call needs an operator token (role "operator"): the registry's models serve every tenant, so
activating, rolling back, pinning or unpinning one is a fleet-wide act, and the listing's figures
come from every tenant's feedback. A tenant's admin token (role "admin") is refused like a user's.

Status codes: UNAUTHENTICATED (no usable token), PERMISSION_DENIED (a token without role operator, or
anonymous mode), INVALID_ARGUMENT (a malformed or over-long version id), NOT_FOUND (no such version),
FAILED_PRECONDITION (pinned, refused, nothing to roll back, or the version failed to load: the old
model keeps serving), INTERNAL (a bug, logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import grpc
from voxloop.v1 import model_admin_pb2 as pb
from voxloop.v1 import model_admin_pb2_grpc as pb_grpc

from ..core.registry import Registry, RegistryError, validate_version
from .auth import Authenticator, Identity, Unauthenticated
from .servicer import headline_metrics
from .status import StatusTable, abort_with
from .watcher import ModelWatcher, NotPossible, UnknownVersion

log = logging.getLogger(__name__)

MODEL_ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelAdmin"].full_name

T = TypeVar("T")


class PermissionDenied(Exception):
    """The caller is not an operator (-> PERMISSION_DENIED)."""


_STATUS_OF: StatusTable = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (UnknownVersion, grpc.StatusCode.NOT_FOUND),
    (NotPossible, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (RegistryError, grpc.StatusCode.FAILED_PRECONDITION),  # an inconsistent registry: the message says what
)


def _version_argument(version: str) -> str:
    try:
        return validate_version(version)
    except RegistryError as e:
        raise ValueError(str(e)) from None


def _flatten(figures: object, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a card section, nested keys joined with "_" ({"heldout": {"wer": 0.3}} -> heldout_wer)."""
    if isinstance(figures, bool):
        return {}
    if isinstance(figures, int | float):
        return {prefix: float(figures)} if prefix else {}
    if isinstance(figures, dict):
        flat: dict[str, float] = {}
        for key, value in figures.items():
            flat.update(_flatten(value, f"{prefix}_{key}" if prefix else str(key)))
        return flat
    return {}


def list_models(registry: Registry, serving: str) -> pb.ListModelsResponse:
    """Every published version with its state as `serving`'s replica sees it (blocking: reads the registry).

    A directory of versions/ that cannot be read as a version (no or a broken card) is listed as REFUSED
    with reason "card", so it is seen, and blocks nothing.
    """
    refusals = registry.standing_refusals()
    pin = registry.pinned()
    current = registry.current_version()
    response = pb.ListModelsResponse(serving_version=serving, current_version=current or "",
                                     pinned_version=pin.version if pin else "")
    for version, card in registry.version_cards():
        refusal = refusals.get(version)
        state = pb.SERVING if version == serving else pb.REFUSED if refusal is not None else pb.AVAILABLE
        entry = pb.ModelVersion(version=version, parent_version=card.get("parent_version") or "", state=state,
                                gate=_flatten(card.get("gate")), metrics=headline_metrics(card),
                                current=version == current, pinned=pin is not None and pin.version == version)
        if refusal is not None:
            entry.refused_reason, entry.refused_detail = refusal.reason, refusal.detail
        created_at = card.get("created_at")
        if isinstance(created_at, str):
            try:
                entry.created_at.FromDatetime(datetime.fromisoformat(created_at))
            except ValueError:
                log.warning("card of %s has an unreadable created_at %r", version, created_at)
        response.models.append(entry)
    for name, why in sorted(registry.broken_versions().items()):
        response.models.append(pb.ModelVersion(version=name, state=pb.REFUSED, refused_reason="card",
                                               refused_detail=why, current=name == current))
    return response


def _change(previous_and_serving: tuple[str, str]) -> pb.ModelChange:
    previous, serving = previous_and_serving
    return pb.ModelChange(previous_version=previous, serving_version=serving)


class ModelAdminServicer(pb_grpc.ModelAdminServicer):
    """ListModels, ActivateModel, Rollback, PinModel, UnpinModel for operator tokens."""

    def __init__(self, watcher: ModelWatcher, authenticator: Authenticator):
        self._watcher = watcher
        self._auth = authenticator

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[Identity], Awaitable[T]]) -> T:
        try:
            caller = self._auth.identify(context)
            if not caller.is_operator:
                raise PermissionDenied("model administration changes what every tenant is served: it needs an "
                                       "operator token (role = \"operator\" in the tokens file; a tenant's "
                                       "\"admin\" administers only its own tenant's data); pass it with --token "
                                       "or $VOXLOOP_TOKEN")
            return await work(caller)
        except Exception as e:
            await abort_with(context, e, _STATUS_OF, "a model admin call")

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        async def work(caller: Identity) -> pb.ListModelsResponse:
            serving = self._watcher.holder.current.version
            return await asyncio.to_thread(list_models, self._watcher.registry, serving)

        return await self._call(context, work)

    async def ActivateModel(self, request: pb.ActivateModelRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelChange:
        async def work(caller: Identity) -> pb.ModelChange:
            if not request.version:
                raise ValueError("ActivateModel needs a version; `voxloop models list` shows them")
            _version_argument(request.version)
            log.info("operator %s/%s activates %s%s", caller.tenant, caller.user, request.version,
                     " (force)" if request.force else "")
            return _change(await self._watcher.activate(request.version, force=request.force, by=_who(caller)))

        return await self._call(context, work)

    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext) -> pb.ModelChange:
        async def work(caller: Identity) -> pb.ModelChange:
            log.info("operator %s/%s rolls back", caller.tenant, caller.user)
            return _change(await self._watcher.rollback(by=_who(caller)))

        return await self._call(context, work)

    async def PinModel(self, request: pb.PinModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelChange:
        async def work(caller: Identity) -> pb.ModelChange:
            if request.version:
                _version_argument(request.version)
            log.info("operator %s/%s pins %s", caller.tenant, caller.user, request.version or "the serving version")
            return _change(await self._watcher.pin(request.version, by=_who(caller)))

        return await self._call(context, work)

    async def UnpinModel(self, request: pb.UnpinModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelChange:
        async def work(caller: Identity) -> pb.ModelChange:
            log.info("operator %s/%s unpins", caller.tenant, caller.user)
            return _change(await self._watcher.unpin())

        return await self._call(context, work)


def _who(caller: Identity) -> str:
    return f"operator {caller.tenant}/{caller.user}"


__all__ = ["MODEL_ADMIN_SERVICE_NAME", "ModelAdminServicer", "list_models"]
