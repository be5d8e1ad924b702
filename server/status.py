"""Errors to gRPC statuses at the RPC boundary: each servicer names its table, one function maps.

    code, details = status_of(error, STATUS_OF, "a feedback call")
    await abort_with(context, error, STATUS_OF, "a feedback call")   # unary servicers

An error whose type is in the table keeps its message (written for the caller: what to fix); anything
else is a bug: logged with its traceback, and the caller gets INTERNAL without internals.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from ..core.limits import bounded_details

log = logging.getLogger(__name__)

StatusTable = tuple[tuple[type[BaseException], grpc.StatusCode], ...]
"""(error type, status code) pairs, first match wins (list subclasses before their bases)."""


def status_of(error: BaseException, table: StatusTable, call: str) -> tuple[grpc.StatusCode, str]:
    """The status and details the caller gets for `error` raised in `call` (e.g. "a feedback call")."""
    for error_type, code in table:
        if isinstance(error, error_type):
            return code, bounded_details(str(error))
    log.error("internal error in %s", call, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); the server logged the details"


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException, table: StatusTable,
                     call: str) -> NoReturn:
    """End the RPC with `error`'s status (context.abort raises, so this never returns)."""
    await context.abort(*status_of(error, table, call))
    raise AssertionError("unreachable: grpc.aio context.abort raises")
