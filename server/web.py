"""The end-user web page and its WebSocket bridge to the Recognizer and Feedback servicers, in-process.

    bridge = WebBridge(config, recognizer, feedback, holder)
    port = await bridge.start(host, port)   # GET / (the page, server/static/), GET /ws (the bridge)
    ...
    await bridge.stop()

The bridge is a transport, not a second server: every page message becomes a call of the very
servicer methods that gRPC calls, with a `BridgeContext` standing in for grpc.aio's ServicerContext.
So the page gets gRPC's auth (its bearer token travels as `authorization` metadata), stream slots,
idle and duration limits, audio validation, feedback rate limits, tenancy checks, status codes and
RPC metrics by construction, and sees exactly the gRPC results (proto3 JSON, field names as in the
.proto): whatever model serves, the page only knows transcripts, words with confidence, stability,
alternatives, utterance ids and model versions. The bridge's own parts: the Origin check, the
WebSocket message size (max_message_bytes, as gRPC's), JSON <-> protobuf, and a notice to the open
pages when the serving model changes.

Protocol (JSON text frames; audio as binary frames of LINEAR16):

    server -> page on connect  {"type": "welcome", "auth_required": bool, "max_alternatives": int, ...}
    page -> server             {"type": "hello", "token": "..."}     (token optional; again to change it)
    server -> page             {"type": "ready", "model": {version, parent_version, trained_on_feedback, ...}}
    page -> server             {"type": "start", "config": {RecognitionConfig}}, binary audio..., {"type": "stop"}
    server -> page             {"type": "response", "response": {StreamingRecognizeResponse}} ...,
                               then {"type": "end"} (the stream finished) or an error with "scope": "stream"
    page -> server             {"type": "call", "id": 7, "method": "SubmitCorrection", "request": {...}}
    server -> page             {"type": "reply", "id": 7, "method": ..., "response": {...}}
    server -> page             {"type": "model", "model": {...}} when the serving model changes
    errors                     {"type": "error", "code": "PERMISSION_DENIED", "message": "...", "scope": ..., "id": ...}

`code` is the gRPC status name the same request over gRPC gets (INVALID_ARGUMENT for a message the
bridge cannot read). The connection stays open after an error; a message over max_message_bytes
closes it with WebSocket code 1009, like gRPC ends the call with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from google.protobuf import json_format
from google.protobuf.message import Message
from voxloop.v1 import feedback_pb2, recognizer_pb2

from ..core.metrics import WEB_CONNECTIONS, WEB_CONNECTIONS_REFUSED, WEB_MESSAGES_REFUSED
from .batcher import ServingModel
from .config import ServerConfig
from .feedback_servicer import FEEDBACK_SERVICE_NAME, FeedbackServicer
from .interceptors import observe_rpc
from .model_holder import ModelHolder
from .servicer import SERVICE_NAME, RecognizerServicer, model_info

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The page: plain HTML, JS and CSS, committed (no build step, nothing from a CDN)."""
WEBSOCKET_PATH = "/ws"
AUDIO_QUEUE_MESSAGES = 8
"""Audio frames read ahead of the recognizer per page; when full the bridge stops reading the socket, so a
page sending faster than recognition (a file upload) is held back by TCP, as gRPC's flow control does."""
SHUTDOWN_TIMEOUT_S = 1.0
"""How long stopping waits for HTTP requests in flight (the WebSockets are closed first, the page is static)."""
MAX_CALLS_IN_FLIGHT = 16
"""Unary calls (corrections, acceptances, ...) one page may have running at once; more get RESOURCE_EXHAUSTED."""
PAGE_CALLS: dict[str, tuple[str, type[Message]]] = {
    "GetModelInfo": ("recognizer", recognizer_pb2.GetModelInfoRequest),
    "SubmitCorrection": ("feedback", feedback_pb2.SubmitCorrectionRequest),
    "AcceptTranscript": ("feedback", feedback_pb2.AcceptTranscriptRequest),
    "RejectTranscript": ("feedback", feedback_pb2.RejectTranscriptRequest),
    "ChooseAlternative": ("feedback", feedback_pb2.ChooseAlternativeRequest),
    "GetFeedbackStats": ("feedback", feedback_pb2.GetFeedbackStatsRequest),
}
"""The unary methods a page may call (service, request type); admin methods are not among them."""
STREAMING_METHOD = f"/{SERVICE_NAME}/StreamingRecognize"
SECURITY_HEADERS = {
    # Everything the page loads is its own; the WebSocket is same-origin ('self' covers ws: and wss:).
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self)",
}


class CallAborted(Exception):
    """A servicer ended the call with a status (what `context.abort` raises in grpc.aio)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class BadMessage(ValueError):
    """A page message the bridge cannot turn into a call (-> an INVALID_ARGUMENT error message)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class BridgeContext:
    """The part of grpc.aio.ServicerContext the servicers use, for one call from a page.

    `read` serves a recognition's requests from a queue (None is the half-close); `write` sends a
    response to the page; `abort` raises CallAborted like grpc.aio's raises its AbortError.
    """

    def __init__(self, metadata: tuple[tuple[str, str], ...],
                 requests: asyncio.Queue[recognizer_pb2.StreamingRecognizeRequest | None] | None = None,
                 send: Callable[[Message], Awaitable[None]] | None = None):
        self._metadata = metadata
        self._requests = requests
        self._send = send
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def read(self):
        request = await self._requests.get()
        return grpc.aio.EOF if request is None else request

    async def write(self, response: Message) -> None:
        await self._send(response)

    def time_remaining(self) -> float | None:
        return None  # a page sets no deadline; the server's idle and duration limits apply

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code = code
        raise CallAborted(code, details)


def to_json(message: Message) -> dict[str, Any]:
    """A response as the page gets it: proto3 JSON with the .proto's field names, defaults included."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _parse(value: Any, message_type: type[Message], what: str) -> Message:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadMessage(f"{what} must be a JSON object with the fields of {message_type.DESCRIPTOR.full_name}",
                         "bad_field")
    try:
        return json_format.ParseDict(value, message_type())
    except json_format.ParseError as e:
        raise BadMessage(f"{what} is not a valid {message_type.DESCRIPTOR.full_name}: {e}", "bad_field") from None


def model_summary(info: recognizer_pb2.ModelInfo) -> dict[str, Any]:
    """What the page shows of the serving model: its version, parent, and how much feedback trained it."""
    card = json.loads(info.card_json or "{}")
    trained = (card.get("training") or {}).get("trained_feedback_ids")
    return {"version": info.version, "parent_version": info.parent_version,
            "description": str(card.get("description") or ""),
            "trained_on_feedback": len(trained) if isinstance(trained, list) else None}


def origin_allowed(origin: str | None, scheme: str, host: str, listed: frozenset[str]) -> bool:
    """May a page from `origin` open the WebSocket served at scheme://host?

    A listed origin (config web_origins) may. Otherwise only the page's own origin, and only when its
    host is localhost or an IP address: with a DNS name, a hostile site could rebind its own name to
    this server's address and pass as same-origin.
    """
    if not origin:
        return False
    origin = origin.strip().lower().rstrip("/")
    if origin in listed:
        return True
    if origin != f"{scheme}://{host}".lower():
        return False
    hostname = urlsplit(origin).hostname or ""
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


class WebSession:
    """One page's WebSocket: at most one recognition at a time, unary calls beside it."""

    def __init__(self, bridge: WebBridge, ws: web.WebSocketResponse):
        self._bridge = bridge
        self._ws = ws
        self._metadata: tuple[tuple[str, str], ...] = ()
        self.ready = False
        """hello succeeded: the page may be told about model changes (GetModelInfo needs the same auth)."""
        self._requests: asyncio.Queue[recognizer_pb2.StreamingRecognizeRequest | None] | None = None
        self._stream: asyncio.Task | None = None
        self._started_any = False
        """A recognition was started here: audio with none open is a straggler of the last one, dropped quietly."""
        self._told_no_stream = False
        self._calls: set[asyncio.Task] = set()
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:  # the stream's results and the calls' replies share the socket
            await self._ws.send_str(json.dumps(message))

    async def run(self) -> None:
        config = self._bridge.config
        await self.send({"type": "welcome", "auth_required": not self._bridge.anonymous_allowed,
                         "max_alternatives": config.max_alternatives, "max_message_bytes": config.max_message_bytes,
                         "idle_timeout_s": config.idle_timeout_s})
        try:
            async for message in self._ws:
                if message.type == WSMsgType.TEXT:
                    await self._on_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._on_audio(message.data)
                elif message.type == WSMsgType.ERROR:  # e.g. over max_msg_size: aiohttp closes with 1009
                    log.info("web page connection closed: %s", self._ws.exception())
                    break
        finally:
            await self.close()

    async def close(self) -> None:
        """The page went away (or the server stops): cancel its recognition and calls, like a cancelled RPC."""
        tasks = [t for t in (self._stream, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown(self) -> None:
        """The server stops: cancel what runs and close the socket, telling the page why."""
        await self.close()
        await self._ws.close(code=WSCloseCode.GOING_AWAY, message=b"the server is shutting down")

    async def _error(self, code: grpc.StatusCode, message: str, **fields: Any) -> None:
        await self.send({"type": "error", "code": code.name, "message": message, **fields})

    async def _on_text(self, data: str) -> None:
        call_id = None
        try:
            try:
                message = json.loads(data)
            except ValueError:
                raise BadMessage("a text message must be a JSON object with a \"type\"", "not_json") from None
            if not isinstance(message, dict):
                raise BadMessage("a text message must be a JSON object with a \"type\"", "not_json")
            call_id = message.get("id")
            if call_id is not None and not isinstance(call_id, int | str):
                call_id = None
                raise BadMessage("\"id\" must be a number or a string", "bad_field")
            handler = {"hello": self._hello, "start": self._start, "stop": self._stop,
                       "call": self._call}.get(message.get("type"))
            if handler is None:
                raise BadMessage(f"unknown message type {message.get('type')!r}; one of hello, start, stop, call "
                                 "(audio goes in binary messages)", "unknown_type")
            await handler(message)
        except BadMessage as e:
            WEB_MESSAGES_REFUSED.labels(reason=e.reason).inc()
            await self._error(grpc.StatusCode.INVALID_ARGUMENT, str(e),
                              **({"id": call_id} if call_id is not None else {}))

    async def _hello(self, message: dict[str, Any]) -> None:
        token = message.get("token")
        if token is not None and not isinstance(token, str):
            raise BadMessage("\"token\" must be a string (the bearer token), or left out", "bad_field")
        token = (token or "").strip()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.ready = False
        try:
            info = await self._unary("GetModelInfo", recognizer_pb2.GetModelInfoRequest())
        except CallAborted as e:
            await self._error(e.code, e.details, scope="hello")
            return
        self.ready = True
        await self.send({"type": "ready", "model": model_summary(info)})

    async def _start(self, message: dict[str, Any]) -> None:
        if self._stream is not None:
            raise BadMessage("a recognition is already running on this connection; send stop and wait for its "
                             "end before starting another", "stream_open")
        config = _parse(message.get("config"), recognizer_pb2.RecognitionConfig, "\"config\"")
        self._requests = asyncio.Queue(maxsize=AUDIO_QUEUE_MESSAGES)
        self._requests.put_nowait(recognizer_pb2.StreamingRecognizeRequest(config=config))
        self._started_any = True
        self._stream = asyncio.create_task(self._recognize(self._requests), name="web-recognition")

    async def _stop(self, message: dict[str, Any]) -> None:
        # Idempotent: a page may press Stop after its recognition already ended (an error, an endpoint).
        await self.finish_recognition()

    async def finish_recognition(self) -> None:
        """Half-close the open recognition, if any: the servicer flushes the last final, then the page gets "end"."""
        if self._requests is not None:
            requests, self._requests = self._requests, None
            await requests.put(None)

    async def _on_audio(self, data: bytes) -> None:
        if self._requests is None:
            # Frames still in flight when a recognition ended (stop, an error the page was sent) are dropped;
            # audio before any start is a page bug, told once (a page streams ~10 frames a second).
            if not self._started_any and not self._told_no_stream:
                self._told_no_stream = True
                WEB_MESSAGES_REFUSED.labels(reason="audio_without_stream").inc()
                await self._error(grpc.StatusCode.INVALID_ARGUMENT,
                                  "audio arrived with no open recognition; send {\"type\": \"start\"} first "
                                  "(a recognition also ends after an error or stop)", scope="stream")
            return
        await self._requests.put(recognizer_pb2.StreamingRecognizeRequest(audio_content=data))

    async def _recognize(self, requests: asyncio.Queue) -> None:
        context = BridgeContext(self._metadata, requests, self._send_response)
        try:
            with observe_rpc(STREAMING_METHOD, _call_id(), context):
                # The servicer reads its requests through the context, as it does from grpc.aio.
                await self._bridge.recognizer.StreamingRecognize(None, context)
            await self.send({"type": "end"})
        except CallAborted as e:
            await self._error(e.code, e.details, scope="stream")
        except ConnectionError:
            log.debug("web page went away before its recognition's end")
        finally:
            if self._requests is requests:
                self._requests = None
            while not requests.empty():  # wakes a reader blocked on a full queue (its frames have no reader)
                requests.get_nowait()
            self._stream = None

    async def _send_response(self, response: Message) -> None:
        await self.send({"type": "response", "response": to_json(response)})

    async def _call(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method not in PAGE_CALLS:
            raise BadMessage(f"unknown method {method!r}; a page may call {', '.join(PAGE_CALLS)}", "unknown_method")
        request = _parse(message.get("request"), PAGE_CALLS[method][1], "\"request\"")
        call_id = message.get("id")
        if len(self._calls) >= MAX_CALLS_IN_FLIGHT:
            WEB_MESSAGES_REFUSED.labels(reason="too_many_calls").inc()
            await self._error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{MAX_CALLS_IN_FLIGHT} calls are already running on this connection; wait for "
                              "their replies", id=call_id, method=method)
            return
        task = asyncio.create_task(self._reply(call_id, method, request), name=f"web-{method}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _reply(self, call_id: Any, method: str, request: Message) -> None:
        with contextlib.suppress(ConnectionError):  # the page left: the call is done (and durable) anyway
            try:
                response = await self._unary(method, request)
            except CallAborted as e:
                await self._error(e.code, e.details, id=call_id, method=method)
                return
            await self.send({"type": "reply", "id": call_id, "method": method, "response": to_json(response)})

    async def _unary(self, method: str, request: Message) -> Message:
        """Call a servicer's method as gRPC would (same auth, errors and metrics); raises CallAborted."""
        service = PAGE_CALLS[method][0]
        servicer = self._bridge.recognizer if service == "recognizer" else self._bridge.feedback
        context = BridgeContext(self._metadata)
        full_name = SERVICE_NAME if service == "recognizer" else FEEDBACK_SERVICE_NAME
        with observe_rpc(f"/{full_name}/{method}", _call_id(), context):
            return await getattr(servicer, method)(request, context)


def _call_id() -> str:
    return "web-" + uuid.uuid4().hex[:12]


@web.middleware
async def _security_headers(request: web.Request, handler):
    response = await handler(request)
    response.headers.update(SECURITY_HEADERS)
    return response


class WebBridge:
    """The page's HTTP server (aiohttp, on the gRPC server's event loop) and its open sessions."""

    def __init__(self, config: ServerConfig, recognizer: RecognizerServicer, feedback: FeedbackServicer,
                 holder: ModelHolder, anonymous_allowed: bool):
        self.config = config
        self.recognizer = recognizer
        self.feedback = feedback
        self.anonymous_allowed = anonymous_allowed
        self._sessions: set[WebSession] = set()
        self._notices: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        holder.on_swap(self._model_swapped)
        app = web.Application(middlewares=[_security_headers])
        app.router.add_get("/", self._index)
        app.router.add_get(WEBSOCKET_PATH, self._websocket)
        app.router.add_static("/static/", STATIC_DIR)
        self._app = app

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0 picks a free port); returns the bound port. Raises OSError naming the fix."""
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        ssl_context = None
        if self.config.tls:  # the page needs a secure context for the microphone anywhere but localhost
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise OSError(f"cannot serve the web page on {host}:{port} ({e.strerror or e}); pick another port "
                          "with --web-port (web_port), or 0 in the config to turn the page off") from e
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def finish_recognitions(self) -> None:
        """Shutdown begins: end every page's recognition as its Stop button would (the last final is still sent)."""
        for session in list(self._sessions):
            await session.finish_recognition()

    async def stop(self) -> None:
        """Close every page's socket (recognitions still open are cancelled) and stop listening."""
        for session in list(self._sessions):
            await session.shutdown()
        for task in list(self._notices):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the open WebSockets (GOING_AWAY) and the listener
            self._runner = None

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if not origin_allowed(origin, request.scheme, request.host, self.config.allowed_web_origins):
            WEB_CONNECTIONS_REFUSED.labels(reason="origin").inc()
            log.info("web socket refused: origin %r is not this page's (host %r)", origin, request.host)
            raise web.HTTPForbidden(text=f"origin {origin!r} may not open this WebSocket: it is for the page served "
                                         "here (list other origins in web_origins; programs use the gRPC API)")
        # heartbeat: a page that stops answering pings for idle_timeout_s is closed; compress off: audio
        # does not deflate, and the CPU is the recognizer's.
        ws = web.WebSocketResponse(max_msg_size=self.config.max_message_bytes, heartbeat=self.config.idle_timeout_s,
                                   compress=False)
        await ws.prepare(request)
        session = WebSession(self, ws)
        self._sessions.add(session)
        WEB_CONNECTIONS.inc()
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            WEB_CONNECTIONS.dec()
            if not ws.closed:
                await ws.close(code=WSCloseCode.GOING_AWAY)
        return ws

    def _model_swapped(self, model: ServingModel) -> None:
        notice = {"type": "model", "model": model_summary(model_info(model))}
        for session in self._sessions:
            if session.ready:
                task = asyncio.get_running_loop().create_task(self._notify(session, notice))
                self._notices.add(task)
                task.add_done_callback(self._notices.discard)

    @staticmethod
    async def _notify(session: WebSession, notice: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):
            await session.send(notice)


__all__ = ["BridgeContext", "CallAborted", "WebBridge", "model_summary", "origin_allowed", "to_json"]
