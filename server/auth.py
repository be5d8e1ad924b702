"""Who is calling: bearer tokens -> (tenant, user, role), anonymous mode, and per-user rate limits.

A call carries `authorization: Bearer <token>` metadata. Tokens are listed in a file (config
`tokens_file`, also `$VOXLOOP_TOKENS_FILE`), JSON or TOML, with the same shape:

    [[tokens]]                       # {"tokens": [{"token": ..., "tenant": ..., "user": ..., "role": ...}]}
    token = "s3cret-alice"
    tenant = "acme"
    user = "alice"
    role = "user"                    # "user" (default), "admin" or "operator"

Roles (who may do what across tenants; README "Tenants and roles"):
- user: streams audio and gives feedback on its own tenant's utterances; reads its tenant's stats;
- admin: a tenant's administrator: also deletes the data of a user of its own tenant (DeleteUserData);
  it can do nothing to another tenant (PERMISSION_DENIED);
- operator: runs the fleet: every tenant's stats and DeleteUserData in any tenant, and model
  administration (ModelAdmin), since the registry's models serve every tenant.

With a tokens file, every RPC of ours needs a known token (UNAUTHENTICATED otherwise). Without one
and with `anonymous = true` (the default, for local development), calls without a token act as
tenant "default", user "anonymous" (a stream may name its user in RecognitionConfig.user_id); a
token is then still rejected, since nothing can vouch for it. Health and reflection never ask.

Called at the top of each RPC (`Authenticator.identify(context)`) rather than from an interceptor:
the RPC needs the identity (tenant of the utterance it writes or reads), and the open services
(health, reflection) stay open without a list of exceptions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .config import ServerConfig

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER = "bearer"
DEFAULT_TENANT = "default"
ANONYMOUS_USER = "anonymous"


class Unauthenticated(Exception):
    """No usable credential (-> UNAUTHENTICATED)."""


class RateLimited(Exception):
    """The caller used up their rate (-> RESOURCE_EXHAUSTED)."""


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"
    """Administers its own tenant (its users' data); nothing of another tenant, nor the models."""
    OPERATOR = "operator"
    """Runs the fleet: every tenant's data and stats, and the models, which serve every tenant."""


@dataclass(frozen=True)
class Identity:
    tenant: str
    user: str
    role: Role = Role.USER
    anonymous: bool = False
    """No token: the user name comes from the caller's say-so (RecognitionConfig.user_id) or is "anonymous"."""

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR

    def administers(self, tenant: str) -> bool:
        """Whether this caller may act as administrator of `tenant` (an admin of it, or an operator)."""
        return self.is_operator or (self.role is Role.ADMIN and tenant == self.tenant)


ANONYMOUS = Identity(DEFAULT_TENANT, ANONYMOUS_USER, Role.USER, anonymous=True)


def _digest(token: str) -> bytes:
    # Looked up by hash: the dict never holds the secrets, and a lookup reveals nothing by its timing.
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: Path) -> dict[bytes, Identity]:
    """Read a tokens file (JSON if it ends in .json, TOML otherwise); raises ValueError naming the fix."""
    text = path.read_text()
    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"tokens file {path} does not parse: {e}") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"tokens file {path} needs a list `tokens` of {{token, tenant, user, role}} entries")
    tokens: dict[bytes, Identity] = {}
    for i, entry in enumerate(entries):
        where = f"tokens file {path}, entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a table with token, tenant, user (and role)")
        missing = [k for k in ("token", "tenant", "user") if not str(entry.get(k) or "").strip()]
        if missing:
            raise ValueError(f"{where}: missing or empty {', '.join(missing)}")
        try:
            role = Role(entry.get("role", Role.USER.value))
        except ValueError:
            raise ValueError(f"{where}: role must be one of {[r.value for r in Role]}") from None
        digest = _digest(str(entry["token"]))
        if digest in tokens:
            raise ValueError(f"{where}: the same token is listed twice; give each user their own")
        tokens[digest] = Identity(str(entry["tenant"]), str(entry["user"]), role)
    return tokens


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of `authorization: Bearer <token>`; None without that header; raises on another scheme."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_KEY:
            continue
        value = value.decode() if isinstance(value, bytes) else value
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != BEARER or not token.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        return token.strip()
    return None


class Authenticator:
    """Maps a call's metadata to an Identity, as the config says (tokens file, anonymous mode)."""

    def __init__(self, tokens: dict[bytes, Identity] | None, allow_anonymous: bool):
        self._tokens = tokens or {}
        self.allow_anonymous = allow_anonymous

    @classmethod
    def from_config(cls, config: ServerConfig) -> Authenticator:
        tokens = load_tokens(config.tokens_file) if config.tokens_file is not None else None
        if tokens is not None:
            log.info("auth: %d tokens from %s; calls without a known token are refused", len(tokens),
                     config.tokens_file)
        elif config.anonymous_allowed:
            log.warning("auth: anonymous mode (no tokens_file): every caller is tenant %r", DEFAULT_TENANT)
        return cls(tokens, config.anonymous_allowed)

    def identify_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
        token = bearer_token(metadata)
        if token is None:
            if self.allow_anonymous:
                return ANONYMOUS
            raise Unauthenticated("this server needs a bearer token: send `authorization: Bearer <token>` "
                                  "metadata (voxloop --token, or $VOXLOOP_TOKEN)")
        identity = self._tokens.get(_digest(token))
        if identity is None:
            raise Unauthenticated("unknown bearer token; ask the server's operator for a valid one")
        return identity

    def identify(self, context) -> Identity:
        """The caller of a grpc(.aio) call; raises Unauthenticated."""
        return self.identify_metadata(context.invocation_metadata())


class RateLimiter:
    """A token bucket per key: `burst` calls at once, refilled at `rate_per_s`. Thread-safe."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"rate_per_s must be > 0 and burst >= 1 (got {rate_per_s}, {burst})")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def acquire(self, key: object) -> None:
        """Take one call's token for `key`; raises RateLimited (with the wait) when the bucket is empty."""
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate_per_s)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait_s = (1.0 - tokens) / self.rate_per_s
                raise RateLimited(f"feedback rate limit reached ({self.rate_per_s:g}/s, bursts of {self.burst}); "
                                  f"retry in {wait_s:.1f} s")
            self._buckets[key] = (tokens - 1.0, now)


__all__ = ["ANONYMOUS", "Authenticator", "Identity", "RateLimited", "RateLimiter", "Role", "Unauthenticated",
           "bearer_token", "load_tokens"]
