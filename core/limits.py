"""Size bounds on what callers send, checked before any work, and a bounded preview for error messages.

Every id, name and version a caller sends is bounded here before it reaches a store lookup, the
registry or a status message. A status message repeats at most MAX_ECHO_CHARS of a caller's string
(`preview`), and status.py cuts any message to MAX_STATUS_DETAILS_CHARS: gRPC carries the message in
trailing metadata, and past its 16 KB limit the caller would get RESOURCE_EXHAUSTED ("received
metadata size exceeds hard limit") instead of the status we meant.
"""

from __future__ import annotations

MAX_ID_CHARS = 128
"""user_id, session_id, tenant, language_code: names, not documents (version ids have the same limit)."""
MAX_UTTERANCE_ID_CHARS = 64
"""utterance_id: the server makes 32-hex-digit ids; the store holds at most 64 characters."""
MAX_ECHO_CHARS = 64
"""Most characters of a caller's string an error message repeats."""
MAX_STATUS_DETAILS_CHARS = 1024
"""Most characters of any status message (a last guard; messages are written far shorter)."""
MAX_BEAM_SIZE = 16
"""Most beams of a second pass's search (a card's `beam_size`, the server's `second_pass_beam_size`): each beam is
a decoder row every step."""


class InputTooLong(ValueError):
    """A caller's id, name or text is longer than its bound (-> INVALID_ARGUMENT)."""


def check_length(name: str, value: str, limit: int = MAX_ID_CHARS) -> str:
    """`value` if it has at most `limit` characters; raises InputTooLong naming the field and the bound."""
    if len(value) > limit:
        raise InputTooLong(f"{name} has {len(value)} characters; at most {limit} are accepted")
    return value


def preview(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """repr() of `value` cut to `limit` characters, for an error message that names what the caller sent."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"… ({len(value)} characters)"


def bounded_details(details: str, limit: int = MAX_STATUS_DETAILS_CHARS) -> str:
    """A status message cut to `limit` characters."""
    return details if len(details) <= limit else details[: limit - 1] + "…"


__all__ = ["MAX_ECHO_CHARS", "MAX_ID_CHARS", "MAX_STATUS_DETAILS_CHARS", "MAX_UTTERANCE_ID_CHARS", "InputTooLong",
           "bounded_details", "check_length", "preview"]
