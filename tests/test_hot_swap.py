"""Hot-swap against a real server: open streams keep their version, broken versions are refused, memory is flat.

The watcher's own interval is set long where a test needs to control when it looks (it then calls
`watcher.check()` itself, exactly what the loop runs) and short where the test is that it notices.
"""

from __future__ import annotations

import gc
import shutil
import threading
import weakref

import numpy as np
import pytest
import soundfile as sf
from conftest import TINY_VERSION, build_tiny_version
from prometheus_client import REGISTRY
from server_support import VOICE_VERSION, chunked, noise, pcm16, silence, voiced
from support import wait_for
from swap_support import publish_copy
from voxloop.clients.client import RecognizerClient, recognition_config
from voxloop.core.registry import CURRENT_FILE, MODEL_FILE, Registry, atomic_write_text
from voxloop.core.warmup import PROBE_FILE, probe_card_entry
from voxloop.server.app import BackgroundServer
from voxloop.server.config import BASE_MODEL_DIR, ServerConfig

CHUNK_100MS = 3200  # bytes of 16 kHz LINEAR16
NO_ENDPOINTS = dict(trailing_silence_before_speech_s=300, trailing_silence_after_speech_s=300, max_utterance_s=300)
OTHER_VERSION = "tiny-0002"


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A genuinely different tiny model (other random weights), as a version directory to publish from."""
    root = build_tiny_version(tmp_path_factory.mktemp("other-model"), OTHER_VERSION, seed=1)
    return root / "versions" / OTHER_VERSION


def config_for(tmp_path, registry, *, interval_s: float = 3600.0, **fields) -> ServerConfig:
    return ServerConfig(port=0, metrics_port=0, data_dir=tmp_path / "data", model_dir=registry,
                        model_watch_interval_s=interval_s, shutdown_grace_s=5.0, **fields)


def check(running: BackgroundServer) -> str:
    """One round of the watch loop, now; returns the serving version."""
    return running.call(running.server.watcher.check(), timeout_s=60)


def refused_count(reason: str) -> float:
    return REGISTRY.get_sample_value("voxloop_model_swaps_refused_total", {"reason": reason}) or 0.0


def final_versions(client: RecognizerClient, pcm: bytes) -> list[tuple[str, str]]:
    """(model_version, transcript) of every final of one stream."""
    config = recognition_config(16000, interim_results=False)
    return [(r.model_version, r.alternatives[0].transcript)
            for response in client.streaming_recognize(chunked(pcm, CHUNK_100MS), config, timeout=60)
            for r in response.results if r.is_final]


# --- swapping under load ---------------------------------------------------------------------------

def test_swap_with_8_open_streams_keeps_each_on_its_version_and_new_streams_get_the_new_one(
        tiny_registry, tmp_path, other_model_dir):
    config = config_for(tmp_path, tiny_registry, interval_s=0.05, **NO_ENDPOINTS)
    n_streams = 8
    started = [threading.Event() for _ in range(n_streams)]
    go_on = threading.Event()
    results: list[list[tuple[bool, str, str]]] = [[] for _ in range(n_streams)]
    errors: list[BaseException] = []

    def audio(i: int):
        pcm = pcm16(noise(2.0, seed=i))
        yield from chunked(pcm[: len(pcm) // 2], CHUNK_100MS)
        go_on.wait(60)  # the stream stays open, mid-utterance, across the swap
        yield from chunked(pcm[len(pcm) // 2:], CHUNK_100MS)

    def run(i: int, target: str) -> None:
        try:
            with RecognizerClient(target, timeout=60) as client:
                for response in client.streaming_recognize(audio(i), recognition_config(16000), timeout=90):
                    for r in response.results:
                        results[i].append((r.is_final, r.model_version, r.alternatives[0].transcript))
                        started[i].set()
        except BaseException as e:  # collected and asserted below
            errors.append(e)
            started[i].set()

    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=30) as client:
        threads = [threading.Thread(target=run, args=(i, running.target)) for i in range(n_streams)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(60)
        assert client.get_model_info().version == TINY_VERSION

        publish_copy(tiny_registry, other_model_dir, OTHER_VERSION)  # what the trainer does: publish + CURRENT
        wait_for(lambda: client.get_model_info().version == OTHER_VERSION, what="the watcher to swap")
        assert [retired.version for retired in running.server.models.retired] == [TINY_VERSION]
        # A stream opened now, beside the 8 still open on the old version, gets the new one.
        replay = pcm16(noise(2.0, seed=0))
        new_finals = final_versions(client, replay)
        go_on.set()
        for thread in threads:
            thread.join(90)
        old_finals = final_versions(client, replay)  # after the swap: same audio, new model

        assert errors == []
        for i, stream in enumerate(results):
            assert stream, f"stream {i} got no results"
            assert {version for _, version, _ in stream} == {TINY_VERSION}, f"stream {i} changed version"
            assert [final for final, _, _ in stream].count(True) == 1
        assert [v for v, _ in new_finals] == [v for v, _ in old_finals] == [OTHER_VERSION]
        # Genuinely another model: the same audio decodes differently than on the old version.
        stream0_final = next(t for final, _, t in results[0] if final)
        assert new_finals[0][1] != stream0_final
        # The old version's last utterance ended: its batcher and session are released.
        running.call(running.server.models.settle())
        assert running.server.models.retired == []


@pytest.fixture
def fresh_voice_registry(voice_registry, tmp_path):
    """A copy of the voice-activity registry that a test may publish into."""
    return shutil.copytree(voice_registry, tmp_path / "voice-registry")


def test_a_stream_finishes_its_utterance_on_the_old_version_and_its_next_utterance_gets_the_new(
        fresh_voice_registry, tmp_path):
    config = config_for(tmp_path, fresh_voice_registry, interval_s=0.05)
    heard_a = threading.Event()
    go_on = threading.Event()

    def audio():
        yield from chunked(pcm16(np.concatenate([silence(0.4), voiced(0.8), silence(0.4)])), CHUNK_100MS)
        go_on.wait(60)
        yield from chunked(pcm16(np.concatenate([silence(1.6), voiced(0.8), silence(1.6)])), CHUNK_100MS)

    with BackgroundServer(config) as running, RecognizerClient(running.target, timeout=30) as client:
        finals = []
        for response in client.streaming_recognize(audio(), recognition_config(16000), timeout=60):
            for r in response.results:
                if r.alternatives[0].transcript == "a" and not heard_a.is_set():
                    heard_a.set()
                    publish_copy(fresh_voice_registry, VOICE_VERSION, "voice-0002")
                    wait_for(lambda: client.get_model_info().version == "voice-0002", what="the swap")
                    go_on.set()
                if r.is_final:
                    finals.append((r.alternatives[0].transcript, r.model_version))
    assert finals == [("a", VOICE_VERSION), ("a", "voice-0002")]


# --- refusals --------------------------------------------------------------------------------------

def recognize_version(client: RecognizerClient) -> str:
    response = client.recognize(pcm16(noise(1.0)), recognition_config(16000, interim_results=False))
    return response.results[0].model_version


def test_a_corrupt_onnx_file_is_refused_and_the_old_model_keeps_serving(tiny_registry, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a protobuf graph" * 100)
    before = refused_count("load")
    with BackgroundServer(config_for(tmp_path, tiny_registry)) as running, \
            RecognizerClient(running.target, timeout=30) as client:
        publish_copy(tiny_registry, TINY_VERSION, "tiny-broken", replace={MODEL_FILE: garbage})
        assert check(running) == TINY_VERSION
        assert recognize_version(client) == TINY_VERSION
        refusal = Registry(tiny_registry).refusal("tiny-broken")
        assert refusal is not None and refusal.reason == "load" and "onnxruntime cannot load" in refusal.detail
        assert refused_count("load") == before + 1
        # Marked bad: the next rounds of the loop do not try it again.
        assert check(running) == TINY_VERSION and check(running) == TINY_VERSION
        assert running.server.watcher.refusals == 1 and refused_count("load") == before + 1


@pytest.mark.parametrize("damage, reason", [("flip_byte", "sha256"), ("delete", "missing_file")])
def test_a_model_file_that_does_not_match_its_card_is_refused(tiny_registry, tmp_path, damage, reason):
    registry = Registry(tiny_registry)
    with BackgroundServer(config_for(tmp_path, tiny_registry)) as running, \
            RecognizerClient(running.target, timeout=30) as client:
        target = publish_copy(tiny_registry, TINY_VERSION, "tiny-damaged", activate=False)
        if damage == "delete":
            (target / MODEL_FILE).unlink()
        else:
            data = bytearray((target / MODEL_FILE).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (target / MODEL_FILE).write_bytes(bytes(data))
        atomic_write_text(tiny_registry / CURRENT_FILE, "tiny-damaged\n")  # a writer that skipped verify()
        assert check(running) == TINY_VERSION
        assert client.get_model_info().version == recognize_version(client) == TINY_VERSION
        assert registry.refusal("tiny-damaged").reason == reason
        # The fleet's target skips the refused version; a replica started now serves the last good one.
        assert registry.target_version() == TINY_VERSION
    with BackgroundServer(config_for(tmp_path / "second", tiny_registry)) as second, \
            RecognizerClient(second.target, timeout=30) as client:
        assert client.get_model_info().version == TINY_VERSION


def test_warm_up_must_reproduce_the_probe_transcript_the_card_recorded(tiny_registry, tmp_path, other_model_dir):
    probe = tmp_path / PROBE_FILE
    sf.write(probe, noise(1.5, seed=7), 16000, subtype="PCM_16")
    other_model = other_model_dir / MODEL_FILE
    right = probe_card_entry(other_model, probe)
    wrong = {**right, "transcript": right["transcript"] + " x"}
    before = refused_count("probe_mismatch")
    with BackgroundServer(config_for(tmp_path, tiny_registry)) as running:
        publish_copy(tiny_registry, other_model_dir, "tiny-wrong-probe", replace={PROBE_FILE: probe},
                     extra_card={"probe": wrong})
        assert check(running) == TINY_VERSION
        assert Registry(tiny_registry).refusal("tiny-wrong-probe").reason == "probe_mismatch"
        assert refused_count("probe_mismatch") == before + 1
        publish_copy(tiny_registry, other_model_dir, "tiny-right-probe", replace={PROBE_FILE: probe},
                     extra_card={"probe": right})
        assert check(running) == "tiny-right-probe"


def test_swap_metrics_report_the_serving_version(tiny_registry, tmp_path):
    swaps_before = REGISTRY.get_sample_value("voxloop_model_swaps_total") or 0.0
    with BackgroundServer(config_for(tmp_path, tiny_registry)) as running:
        publish_copy(tiny_registry, TINY_VERSION, "tiny-0001-b")
        assert check(running) == "tiny-0001-b"
        assert REGISTRY.get_sample_value("voxloop_model_swaps_total") == swaps_before + 1
        assert REGISTRY.get_sample_value("voxloop_model_info", {"version": "tiny-0001-b",
                                                                "parent_version": TINY_VERSION}) == 1.0
        assert REGISTRY.get_sample_value("voxloop_model_last_swap_timestamp_seconds") > 0


# --- memory ----------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_50_swaps_of_the_shipped_model_leave_rss_within_10_percent(tmp_path):
    """Each swap loads a 13 MB graph: a session leaked per swap would add >0.5 GB over 50 swaps."""
    registry_root = tmp_path / "registry"
    registry = Registry(registry_root)
    registry.seed_from(BASE_MODEL_DIR)
    base = registry.current_version()
    only_graph = {MODEL_FILE: BASE_MODEL_DIR / MODEL_FILE}
    sessions: list[weakref.ref] = []
    with BackgroundServer(config_for(tmp_path, registry_root)) as running, \
            RecognizerClient(running.target, timeout=30) as client:
        def swap_to(i: int) -> None:
            version = f"swap-{i:03d}"
            previous = running.server.model
            registry.publish(version, only_graph, {"parent_version": base})
            assert check(running) == version
            assert recognize_version(client) == version
            sessions.append(weakref.ref(previous.model))
            if previous.version != base:  # keep the disk small; versions are immutable, not eternal, in a test
                shutil.rmtree(registry.version_dir(previous.version))

        for i in range(5):  # warm-up: allocator arenas, gRPC, first-call costs
            swap_to(i)
        running.call(running.server.models.settle())
        gc.collect()
        start = rss_bytes()
        for i in range(5, 55):
            swap_to(i)
        running.call(running.server.models.settle())
        gc.collect()
        end = rss_bytes()
        assert running.server.models.retired == []
        assert [ref() for ref in sessions] == [None] * len(sessions), "retired models' sessions were not freed"
    assert end <= start * 1.10, f"RSS grew from {start / 2**20:.0f} MiB to {end / 2**20:.0f} MiB over 50 swaps"
