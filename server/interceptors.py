"""The RPC interceptor: counts every finished RPC by method and status code, tracks open recognitions,
and gives each call a request id for the logs. The servicers know nothing of it.

A grpc.aio interceptor sees the call before the servicer and gets the handler back; it wraps the
handler's behavior (a coroutine, or an async generator for response-streaming methods) so the code
is read after the call ends: OK when the behavior returned, the aborted code when the servicer called
`context.abort`, CANCELLED when the client went away, UNKNOWN for an exception grpc would report so.
Unknown methods (UNIMPLEMENTED, answered by grpc itself) are not counted: a scanner sending random
method names must not create label values.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import Iterator

import grpc
from voxloop.v1 import recognizer_pb2

from ..core.logging_setup import REQUEST_ID
from ..core.metrics import ACTIVE_STREAMS, RPCS

log = logging.getLogger(__name__)

_RECOGNIZER = recognizer_pb2.DESCRIPTOR.services_by_name["Recognizer"].full_name
RECOGNITION_METHODS = frozenset(f"/{_RECOGNIZER}/{name}" for name in ("StreamingRecognize", "Recognize"))
"""Calls counted in voxloop_active_streams while they run."""
REQUEST_ID_METADATA = "x-request-id"
_REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(metadata) -> str:
    """The caller's x-request-id when it is a sane token (it goes into logs), else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str) and _REQUEST_ID_PATTERN.match(value):
            return value
    return uuid.uuid4().hex[:16]


def _code_name(code) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions hand back the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


@contextlib.contextmanager
def observe_rpc(method: str, call_id: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Count one call of `method` in the RPC metrics and log it; `context.code()` tells how it ended.

    The interceptor wraps every gRPC call in it; the web bridge (web.py) its calls of the same servicers.
    """
    token = REQUEST_ID.set(call_id)
    recognition = method in RECOGNITION_METHODS
    if recognition:
        ACTIVE_STREAMS.inc()
    started = time.perf_counter()
    code = "OK"
    try:
        yield
        if context.code() is not None:  # set_code without raising
            code = _code_name(context.code())
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except BaseException:
        # context.abort raises after setting the code; anything else grpc reports as UNKNOWN.
        code = _code_name(context.code()) if context.code() is not None else "UNKNOWN"
        raise
    finally:
        if recognition:
            ACTIVE_STREAMS.dec()
        RPCS.labels(method=method, code=code).inc()
        duration_s = time.perf_counter() - started
        # OK calls (health probes every few seconds) only at DEBUG; failures at INFO.
        log.log(logging.DEBUG if code == "OK" else logging.INFO, "%s finished %s in %.3f s", method, code,
                duration_s, extra={"method": method, "code": code, "duration_s": round(duration_s, 6)})
        with contextlib.suppress(ValueError):  # a generator finalized in another context: nothing to undo
            REQUEST_ID.reset(token)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """voxloop_rpcs_total{method, code}, voxloop_active_streams, a request id per call, and a log line per call."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        call_id = request_id(handler_call_details.invocation_metadata)
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior, method, call_id)})
        return handler

    def _wrap(self, behavior, method: str, call_id: str):
        if inspect.isasyncgenfunction(behavior):
            async def streaming(request, context):
                with observe_rpc(method, call_id, context):
                    async for response in behavior(request, context):
                        yield response
            return streaming

        async def call(request, context):
            with observe_rpc(method, call_id, context):
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
        return call


__all__ = ["RECOGNITION_METHODS", "REQUEST_ID_METADATA", "RpcMetricsInterceptor", "observe_rpc", "request_id"]
