"""Logging for `voxloop serve` and `voxloop train`: plain text or one JSON object per line.

    configure_logging(level="info", log_format="json")

Every record carries the request id of the RPC it was logged in (set by the RPC interceptor in a
context variable, so code under the servicer need not pass it around), and whatever structured
fields the call site passed with `extra=` (utterance_id, model_version, method, code, duration_s…).
JSON lines are for log shippers; text lines append the same fields as `key=value`.

Privacy: audio and transcript text are never logged at INFO or above; the server logs a final's
transcript only at DEBUG (`log_level = "debug"`), which an operator turns on deliberately.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("voxloop_request_id", default=None)
"""The id of the RPC being served (from the caller's x-request-id metadata, or made up); None outside RPCs."""

# Attributes every LogRecord has: anything else on a record came from `extra=` and is a structured field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OURS = "_voxloop_handler"  # marks the handler configure_logging installed


def structured_fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's `extra=` fields, request_id first when set."""
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES and not k.startswith("_")}
    if fields.get("request_id") is None:
        fields.pop("request_id", None)
    return fields


class RequestIdFilter(logging.Filter):
    """Puts the current RPC's request id on each record (runs in the logging thread, so the context is the RPC's)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, structured fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(structured_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual one-line format, then the structured fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        fields = structured_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure_logging(level: str = "info", log_format: str = "text",
                      stream: TextIO | None = None) -> logging.Handler | None:
    """Log `log_format` lines at `level` to stream (stderr) from the root logger; returns the handler.

    Like logging.basicConfig, it leaves logging alone (returns None) when someone else already gave
    the root logger a handler (an application embedding the CLI, or pytest running it in-process);
    a second call replaces the handler of the first.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}; got {level!r}")
    root = logging.getLogger()
    if any(not getattr(h, _OURS, False) for h in root.handlers):
        return None
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OURS, True)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["LOG_FORMATS", "LOG_LEVELS", "REQUEST_ID", "JsonFormatter", "TextFormatter", "configure_logging"]
