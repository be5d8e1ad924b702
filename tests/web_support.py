"""Helpers of the web page tests: a protocol-level page client (no browser), and Debian's chromium driven by selenium.

`PageSocket` speaks server/web.py's protocol the way server/static/app.js does, so the bridge's rules
can be tested without a browser. `chromium(...)` starts the real browser headless, with a fake
microphone that plays a WAV file in a loop; a missing chromium or chromium-driver fails the test
(scripts/setup.sh installs both).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile as sf
from support import espeak_speech

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW_SIZE = "1100,1500"  # tall enough for a few finals in the screenshot
SPEECH_RATE_HZ = 16000


class PageSocket:
    """One page's WebSocket: send JSON and audio, wait for messages of a type."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def send(self, **message: Any) -> None:
        await self.ws.send_str(json.dumps(message))

    async def audio(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def receive(self, timeout_s: float = 20.0) -> dict[str, Any]:
        message = await self.ws.receive(timeout=timeout_s)
        if message.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"the socket sent {message.type.name} ({message.data!r}, {message.extra!r})")
        decoded = json.loads(message.data)
        self.seen.append(decoded)
        return decoded

    async def expect(self, kind: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """The next message of type `kind`, skipping recognition responses (collected in .seen)."""
        while True:
            message = await self.receive(timeout_s)
            if message["type"] == kind:
                return message
            if message["type"] != "response":
                raise AssertionError(f"expected a {kind!r} message, got {message}")

    async def call(self, method: str, call_id: int = 1, **request: Any) -> dict[str, Any]:
        """One unary call; its reply or error message."""
        await self.send(type="call", id=call_id, method=method, request=request)
        while True:
            message = await self.receive()
            if message.get("id") == call_id:
                return message

    def finals(self) -> list[dict[str, Any]]:
        return [r for m in self.seen if m["type"] == "response" for r in m["response"]["results"] if r["is_final"]]


async def open_page(url: str, origin: str | None, session: aiohttp.ClientSession, **kwargs: Any) -> PageSocket:
    headers = {"Origin": origin} if origin is not None else {}
    ws = await session.ws_connect(url, headers=headers, **kwargs)
    return PageSocket(ws)


def run(coroutine):
    """Run a test's client side on its own event loop (the server runs on BackgroundServer's)."""
    return asyncio.run(coroutine)


def espeak_wav(path: Path, text: str, *, lead_s: float = 1.0, trail_s: float = 2.5, rate_hz: int = SPEECH_RATE_HZ,
               subtype: str = "PCM_16") -> Path:
    """`text` spoken by espeak-ng with silence around it (the endpointer needs trailing silence), at rate_hz.

    The format follows the suffix (.wav, .flac). A looped fake microphone replays it: one final per loop.
    """
    audio = espeak_speech(text, rate_hz=rate_hz)
    padded = np.concatenate([np.zeros(int(lead_s * rate_hz), np.float32), audio,
                             np.zeros(int(trail_s * rate_hz), np.float32)])
    sf.write(path, padded, rate_hz, subtype=subtype)
    return path


def chromium(profile_dir: Path, fake_microphone_wav: Path | None = None):
    """Headless chromium under chromedriver (selenium), with a fresh profile and, optionally, a fake microphone."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(binary) is None:
            raise FileNotFoundError(f"{binary} is missing: install Debian's chromium and chromium-driver "
                                    "(bash scripts/setup.sh does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    arguments = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--user-data-dir={profile_dir}", f"--window-size={WINDOW_SIZE}"]
    if fake_microphone_wav is not None:
        arguments.append(f"--use-file-for-fake-audio-capture={fake_microphone_wav}")
    for argument in arguments:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
