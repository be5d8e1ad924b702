"""The web page's WebSocket bridge at the protocol level, without a browser: what a page can and cannot do.

Real servers (the conftest's tiny random-weight model on 127.0.0.1, port 0 for gRPC and for the page)
and a real SQLite store; the client is aiohttp speaking the page's protocol (tests/web_support.py).
The tiny model's transcripts are gibberish, but utterance ids, statuses, stored rows and rewards are real.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
from conftest import TINY_VERSION
from prometheus_client import REGISTRY
from server_support import chunked, noise, pcm16
from support import TWO_TENANTS_TOKENS, free_port
from swap_support import publish_copy
from voxloop.clients.client import RecognizerClient, VoxloopError
from voxloop.core.store import FeedbackKind, FeedbackStore
from voxloop.server.app import BackgroundServer
from voxloop.server.config import ServerConfig
from voxloop.server.web import origin_allowed
from web_support import open_page, run

pytestmark = pytest.mark.slow  # real servers

CHUNK_100MS = 3200  # bytes of 16 kHz LINEAR16
MAX_MESSAGE_BYTES = 8192
FEEDBACK_BURST = 3
TOKENS_TOML = TWO_TENANTS_TOKENS + """
[[tokens]]
token = "tok-carol"
tenant = "acme"
user = "carol"
"""
START_16K = {"encoding": "LINEAR16", "sample_rate_hz": 16000, "interim_results": True, "max_alternatives": 3}


class WebServer:
    """A BackgroundServer with its page served on a free port."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.running = BackgroundServer(config)
        self.port = self.running.call(self.running.server.start_web(0))
        self.origin = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"{self.origin}/ws"
        self.store_file = config.data_dir / "feedback.sqlite3"

    def stop(self) -> None:
        self.running.stop()


def web_server(root, registry_template, **fields) -> WebServer:
    if not (root / "registry").exists():
        shutil.copytree(registry_template, root / "registry")
    return WebServer(ServerConfig(port=0, metrics_port=0, data_dir=root / "data", model_dir=root / "registry",
                                  shutdown_grace_s=2.0, **fields))


@pytest.fixture(scope="module")
def anonymous(tiny_registry_template, tmp_path_factory):
    server = web_server(tmp_path_factory.mktemp("web-anonymous"), tiny_registry_template,
                        max_message_bytes=MAX_MESSAGE_BYTES, idle_timeout_s=1.0, feedback_burst=100)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured(tiny_registry_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-secured")
    (root / "tokens.toml").write_text(TOKENS_TOML)
    server = web_server(root, tiny_registry_template, tokens_file=root / "tokens.toml", feedback_burst=FEEDBACK_BURST,
                        feedback_rate_per_s=1e-3)
    yield server
    server.stop()


async def recognize_noise(page, seconds: float = 1.0) -> dict:
    """Stream noise through the bridge and stop; the final result."""
    await page.send(type="start", config=START_16K)
    for chunk in chunked(pcm16(noise(seconds)), CHUNK_100MS):
        await page.audio(chunk)
    await page.send(type="stop")
    await page.expect("end")
    finals = page.finals()
    assert len(finals) == 1 and finals[0]["utterance_id"]
    return finals[0]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_page_and_its_assets_are_served_with_a_content_security_policy(anonymous):
    with urllib.request.urlopen(anonymous.origin + "/") as response:
        page = response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    for hook in ("start", "stop", "upload", "interim", "model-version", "token", "final", "edit", "correction-input",
                 "submit-correction", "accept", "reject", "alternatives"):
        assert f'data-testid="{hook}"' in page
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for asset in ("app.js", "capture-worklet.js", "style.css"):
        with urllib.request.urlopen(f"{anonymous.origin}/static/{asset}") as response:
            assert response.status == 200 and len(response.read()) > 500
    # Nothing from elsewhere: no CDN, no absolute URLs in what the page loads.
    assert "http://" not in page and "https://" not in page


@pytest.mark.parametrize(("origin", "host", "listed", "allowed"), [
    ("http://127.0.0.1:8080", "127.0.0.1:8080", (), True),
    ("http://localhost:8080", "localhost:8080", (), True),
    ("http://[::1]:8080", "[::1]:8080", (), True),
    ("http://192.168.1.5:8080", "192.168.1.5:8080", (), True),
    ("http://evil.example", "127.0.0.1:8080", (), False),  # another site
    ("http://127.0.0.1:9999", "127.0.0.1:8080", (), False),  # another port is another origin
    ("http://asr.example.com", "asr.example.com", (), False),  # a DNS name could be rebound: must be listed
    ("https://asr.example.com", "127.0.0.1:8080", ("https://asr.example.com",), True),  # a proxy's, listed
    ("null", "127.0.0.1:8080", (), False),  # a sandboxed frame or a file:// page
    (None, "127.0.0.1:8080", (), False),
])
def test_only_the_pages_own_ip_or_localhost_origin_or_a_listed_one_may_open_the_socket(origin, host, listed,
                                                                                       allowed):
    assert origin_allowed(origin, "http", host, frozenset(listed)) is allowed


def test_a_socket_from_another_origin_or_without_one_is_refused_and_counted(anonymous):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            for origin in ("http://evil.example", None):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await open_page(anonymous.ws_url, origin, session)
                assert refused.value.status == 403
            page = await open_page(anonymous.ws_url, anonymous.origin, session)  # the page's own origin
            assert (await page.receive())["type"] == "welcome"

    before = sample("voxloop_web_connections_refused_total", reason="origin")
    run(scenario())
    assert sample("voxloop_web_connections_refused_total", reason="origin") == before + 2


def test_a_page_streams_audio_gets_the_grpc_results_and_its_correction_is_stored(anonymous):
    streams_ok = sample("voxloop_rpcs_total", method="/voxloop.v1.Recognizer/StreamingRecognize", code="OK")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(anonymous.ws_url, anonymous.origin, session)
            welcome = await page.expect("welcome")
            assert welcome["auth_required"] is False and welcome["max_message_bytes"] == MAX_MESSAGE_BYTES
            await page.send(type="hello")
            assert (await page.expect("ready"))["model"]["version"] == TINY_VERSION
            final = await recognize_noise(page)
            reply = await page.call("SubmitCorrection", utterance_id=final["utterance_id"],
                                    corrected_text="Hello, World 2")
            return final, reply, page.seen

    final, reply, seen = run(scenario())
    # The page gets exactly the gRPC result fields (proto3 JSON names): model-agnostic.
    assert final["model_version"] == TINY_VERSION and final["alternatives"]
    assert set(final["alternatives"][0]) == {"transcript", "confidence", "words"}
    assert any(m["type"] == "response" and not r["is_final"] and "stability" in r
               for m in seen if m["type"] == "response" for r in m["response"]["results"])
    assert reply["type"] == "reply" and reply["method"] == "SubmitCorrection"
    assert reply["response"]["normalized_text"] == "hello world two" and reply["response"]["reward"] <= 0
    with FeedbackStore.open(anonymous.store_file) as store:
        items = {i.feedback.utterance_id: i for i in store.pending_feedback(100, include_flagged=True)}
    item = items[final["utterance_id"]]
    assert item.feedback.kind is FeedbackKind.CORRECTION and item.feedback.corrected_text == "hello world two"
    assert item.utterance.tenant == "default" and item.utterance.model_version == TINY_VERSION
    assert item.utterance.hypothesis == final["alternatives"][0]["transcript"]
    # Counted with the gRPC calls of the same method.
    assert sample("voxloop_rpcs_total", method="/voxloop.v1.Recognizer/StreamingRecognize",
                  code="OK") == streams_ok + 1


def test_bad_messages_get_invalid_argument_and_the_page_stays_connected(anonymous):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(anonymous.ws_url, anonymous.origin, session)
            await page.expect("welcome")
            errors = []
            for bad in ("not json", "[1, 2]", '{"type": "launch"}', '{"type": "hello", "token": 7}',
                        '{"type": "call", "id": 3, "method": "DeleteUserData", "request": {"user_id": "x"}}',
                        '{"type": "call", "id": 4, "method": "SubmitCorrection", "request": {"utterance": "x"}}',
                        '{"type": "start", "config": {"sample_rate_hz": "fast"}}'):
                await page.ws.send_str(bad)
                errors.append(await page.expect("error"))
            await page.audio(b"\x00\x00" * 100)  # audio before start
            errors.append(await page.expect("error"))
            await page.audio(b"\x00\x00" * 100)  # told once, then dropped quietly
            await page.send(type="start", config={**START_16K, "sample_rate_hz": 4000})  # the servicer's own check
            errors.append(await page.expect("error"))
            await page.send(type="hello")
            await page.expect("ready")  # still connected and usable
            return errors

    errors = run(scenario())
    assert [e["code"] for e in errors] == ["INVALID_ARGUMENT"] * 9
    messages = [e["message"] for e in errors]
    assert "JSON object" in messages[0] and "JSON object" in messages[1]
    assert "unknown message type 'launch'" in messages[2]
    assert "token" in messages[3]
    assert "unknown method 'DeleteUserData'" in messages[4] and errors[4]["id"] == 3
    assert "voxloop.v1.SubmitCorrectionRequest" in messages[5] and errors[5]["id"] == 4
    assert "RecognitionConfig" in messages[6]
    assert "no open recognition" in messages[7] and errors[7]["scope"] == "stream"
    assert "sample_rate_hz" in messages[8] and errors[8]["scope"] == "stream"  # the gRPC servicer's message


def test_a_message_over_max_message_bytes_closes_the_socket_with_1009(anonymous):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(anonymous.ws_url, anonymous.origin, session)
            await page.expect("welcome")
            await page.send(type="start", config=START_16K)
            await page.audio(b"\x00" * (MAX_MESSAGE_BYTES + 2))
            while True:
                message = await page.ws.receive(timeout=10)
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return page.ws.close_code

    assert run(scenario()) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


def test_a_recognition_that_receives_nothing_for_idle_timeout_ends_with_deadline_exceeded(anonymous):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(anonymous.ws_url, anonymous.origin, session)
            await page.expect("welcome")
            started = time.monotonic()
            await page.send(type="start", config=START_16K)
            error = await page.expect("error", timeout_s=10)
            return error, time.monotonic() - started

    error, waited_s = run(scenario())
    assert error["code"] == "DEADLINE_EXCEEDED" and error["scope"] == "stream" and "idle_timeout_s" in error["message"]
    assert 0.9 <= waited_s < 5


def test_a_second_start_while_a_recognition_runs_is_refused(anonymous):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(anonymous.ws_url, anonymous.origin, session)
            await page.expect("welcome")
            await page.send(type="start", config=START_16K)
            await page.send(type="start", config=START_16K)
            refused = await page.expect("error")
            await page.send(type="stop")
            await page.expect("end")
            return refused

    refused = run(scenario())
    assert refused["code"] == "INVALID_ARGUMENT" and "already running" in refused["message"]


def test_without_a_token_the_page_is_told_to_give_one_and_can_do_nothing(secured):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(secured.ws_url, secured.origin, session)
            welcome = await page.expect("welcome")
            await page.send(type="hello")
            hello = await page.expect("error")
            await page.send(type="start", config=START_16K)
            stream = await page.expect("error")
            call = await page.call("AcceptTranscript", utterance_id="anything")
            await page.send(type="hello", token="not-a-token")
            unknown = await page.expect("error")
            return welcome, hello, stream, call, unknown

    welcome, hello, stream, call, unknown = run(scenario())
    assert welcome["auth_required"] is True
    for error in (hello, stream, call, unknown):
        assert error["type"] == "error" and error["code"] == "UNAUTHENTICATED"
    assert hello["scope"] == "hello" and "bearer token" in hello["message"]
    assert "unknown bearer token" in unknown["message"]


def test_a_page_cannot_act_on_another_tenants_utterance(secured):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            alice = await open_page(secured.ws_url, secured.origin, session)
            await alice.expect("welcome")
            await alice.send(type="hello", token="tok-alice")
            await alice.expect("ready")
            final = await recognize_noise(alice)
            bob = await open_page(secured.ws_url, secured.origin, session)
            await bob.expect("welcome")
            await bob.send(type="hello", token="tok-bob")
            await bob.expect("ready")
            refused = [await bob.call(method, call_id=i, utterance_id=final["utterance_id"], **extra)
                       for i, (method, extra) in enumerate((("AcceptTranscript", {}), ("RejectTranscript", {}),
                                                            ("SubmitCorrection", {"corrected_text": "mine now"})))]
            return final, refused

    final, refused = run(scenario())
    for error in refused:
        assert error["type"] == "error" and error["code"] == "PERMISSION_DENIED"
        assert "belongs to another tenant" in error["message"]
    with FeedbackStore.open(secured.store_file) as store:
        assert store.get_utterance(final["utterance_id"], tenant="acme", with_audio=False).user_id == "alice"
        assert not [i for i in store.pending_feedback(100, include_flagged=True)
                    if i.feedback.utterance_id == final["utterance_id"]]


def test_the_feedback_rate_limit_is_the_grpc_one_shared_by_page_and_api(secured):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(secured.ws_url, secured.origin, session)
            await page.expect("welcome")
            await page.send(type="hello", token="tok-carol")
            await page.expect("ready")
            return [await page.call("AcceptTranscript", call_id=i, utterance_id=f"no-such-{i}")
                    for i in range(FEEDBACK_BURST + 1)]

    codes = [m["code"] for m in run(scenario())]
    assert codes == ["NOT_FOUND"] * FEEDBACK_BURST + ["RESOURCE_EXHAUSTED"]
    with (RecognizerClient(f"127.0.0.1:{secured.running.port}", token="tok-carol", timeout=10) as client,
          pytest.raises(VoxloopError) as raised):
        client.accept_transcript("no-such-3")
    assert raised.value.code == "RESOURCE_EXHAUSTED"


def test_open_pages_are_told_when_the_serving_model_changes(tiny_registry, tmp_path):
    server = WebServer(ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=tiny_registry,
                                    model_watch_interval_s=0.1))

    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(server.ws_url, server.origin, session)
            await page.expect("welcome")
            await page.send(type="hello")
            ready = await page.expect("ready")
            publish_copy(tiny_registry, TINY_VERSION, "tiny-0002", parent=TINY_VERSION,
                         extra_card={"training": {"kind": "online", "trained_feedback_ids": [4, 5, 6]}})
            return ready, await page.expect("model", timeout_s=20)

    try:
        ready, notice = run(scenario())
    finally:
        server.stop()
    assert ready["model"]["version"] == TINY_VERSION and ready["model"]["trained_on_feedback"] is None
    assert notice["model"] == {"version": "tiny-0002", "parent_version": TINY_VERSION, "trained_on_feedback": 3,
                               "description": notice["model"]["description"]}


def test_stopping_the_server_ends_open_recognitions_with_their_final_then_closes_the_pages(tiny_registry, tmp_path):
    server = WebServer(ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=tiny_registry,
                                    shutdown_grace_s=30.0))

    async def scenario():
        async with aiohttp.ClientSession() as session:
            page = await open_page(server.ws_url, server.origin, session)
            await page.expect("welcome")
            await page.send(type="start", config=START_16K)
            for chunk in chunked(pcm16(noise(1.0)), CHUNK_100MS):
                await page.audio(chunk)
            await page.expect("response")  # the audio is being recognized; the microphone would go on
            started = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            await page.expect("end")
            closed = await page.ws.receive(timeout=10)
            await stopping
            return page.finals(), closed.type, page.ws.close_code, time.monotonic() - started

    finals, kind, code, stop_s = run(scenario())
    assert len(finals) == 1 and finals[0]["utterance_id"]  # the last final was not lost
    assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and code == aiohttp.WSCloseCode.GOING_AWAY
    assert stop_s < 10  # not the 30 s grace: the page's recognition ended at once


@pytest.mark.parametrize(("fields", "message"), [
    ({"web_port": 70000}, "web_port must be 0..65535"),
    ({"web_origins": "asr.example.com"}, "web_origins has 'asr.example.com'"),
    ({"web_origins": "https://asr.example.com/page"}, "without paths"),
])
def test_bad_web_settings_are_refused_with_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**fields)


def test_listed_web_origins_are_normalized():
    config = ServerConfig(web_origins=" https://ASR.example.com/ , http://10.0.0.2:8080")
    assert config.allowed_web_origins == frozenset({"https://asr.example.com", "http://10.0.0.2:8080"})


def test_serve_with_web_port_serves_the_page(tiny_registry, tmp_path):
    grpc_port, web_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "voxloop.clients.cli", "serve", "--no-trainer", "--host", "127.0.0.1", "--port",
         str(grpc_port), "--metrics-port", "0", "--web-port", str(web_port), "--model-dir", str(tiny_registry),
         "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=2) as response:
                    assert 'data-testid="start"' in response.read().decode()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert f"web page on http://127.0.0.1:{web_port}/" in output


def test_serve_open_without_a_web_port_is_a_usage_error(capsys):
    from voxloop.clients.cli import main

    assert main(["serve", "--open", "--no-trainer"]) == 2
    assert "--open needs the web page: add --web-port" in capsys.readouterr().err


def test_serve_open_opens_the_page_once_serving(monkeypatch, tiny_registry, tmp_path):
    import webbrowser
    from types import SimpleNamespace

    import voxloop.server.app as app
    from voxloop.clients.cli import main

    opened, served = [], []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)

    def fake_serve(config, on_serving=None, **_):  # stands in for the blocking server: it is serving, then stops
        served.append(config)
        on_serving(SimpleNamespace(web_url=f"http://127.0.0.1:{config.web_port}/"))

    monkeypatch.setattr(app, "serve", fake_serve)
    assert main(["serve", "--no-trainer", "--web-port", "8765", "--open", "--model-dir", str(tiny_registry),
                 "--data-dir", str(tmp_path / "data"), "--metrics-port", "0"]) == 0
    assert served[0].web_port == 8765 and opened == ["http://127.0.0.1:8765/"]
