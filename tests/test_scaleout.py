"""The scaled-out shape on real engines: two `voxloop serve` replicas sharing one PostgreSQL store and one
registry directory, behind HAProxy (deploy/haproxy/haproxy.cfg as shipped), and a standalone trainer.

The module starts the cluster once (PostgreSQL from conftest, replicas and proxy from
tests/scaleout_support.py) and the tests run on it in order: transcribe through the proxy and correct
through the other replica; a standalone `voxloop train --once` publishes and both replicas swap; a
rolling restart of both replicas under 32 real-time streams through the proxy; a replica SIGKILLed
during a burst of corrections. The model is a tiny random-weight policy (gibberish transcripts, real
utterance ids, rows and versions), the audio noise.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from scaleout_support import Proxy, Replica
from server_support import chunked, noise, pcm16
from support import wait_for
from voxloop.clients.client import RecognizerClient, recognition_config
from voxloop.core.registry import Registry
from voxloop.core.store import FeedbackStore, feedback
from voxloop.v1 import recognizer_pb2 as pb
from voxloop.v1 import recognizer_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real processes: PostgreSQL, two servers, HAProxy, a trainer

CHUNK_100MS = 3200
REPLICA_HEADER = "x-voxloop-replica"  # set by the proxy config
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)  # each stream its own TCP connection, like separate apps
TRAINER_ENV = {  # a tiny random model on a toy corpus: gate on parity, not on WER
    "VOXLOOP_TRAINER_HELDOUT_SHARE": "0", "VOXLOOP_TRAINER_MIN_HELDOUT_UTTERANCES": "0",
    "VOXLOOP_TRAINER_MAX_ANCHOR_REGRESSION": "1", "VOXLOOP_TRAINER_MAX_TOTAL_ANCHOR_REGRESSION": "1",
    "VOXLOOP_TRAINER_ANCHOR_SIZE": "3", "VOXLOOP_TRAINER_REPLAY_POOL_SIZE": "6",
}


@dataclass
class Cluster:
    root: Path
    store_url: str
    registry: Registry
    corpus: Path
    replicas: list[Replica]
    proxy: Proxy

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def other(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name != name)


@pytest.fixture(scope="module")
def cluster(postgres_server, tmp_path_factory, tiny_version_dir, toy_corpus):
    root = tmp_path_factory.mktemp("scaleout")
    registry = Registry(root / "registry")
    registry.seed_from(tiny_version_dir)  # trainable: it has policy/
    corpus = toy_corpus
    store_url = postgres_server.create_database("scaleout")
    bursts = {"VOXLOOP_FEEDBACK_RATE_PER_S": "1000", "VOXLOOP_FEEDBACK_BURST": "1000"}  # one anonymous user's bursts
    replicas = [Replica(f"replica{i}", registry.root, root / f"replica{i}", store_url, env=bursts) for i in (1, 2)]
    proxy = None
    try:
        for replica in replicas:
            replica.wait_serving()
        proxy = Proxy(root / "proxy", [r.address for r in replicas])
        for replica in replicas:
            proxy.wait_state(replica.name, "UP")
        yield Cluster(root, store_url, registry, corpus, replicas, proxy)
    finally:
        if proxy is not None:
            proxy.close()
        for replica in replicas:
            replica.close()


def stream(address: str, seconds: float = 1.0, seed: int = 0, timeout_s: float = 30) -> tuple[list, str | None]:
    """One StreamingRecognize of noise at full speed; (final results, the replica the proxy chose)."""
    requests = [pb.StreamingRecognizeRequest(config=recognition_config(16000, interim_results=False))]
    requests += [pb.StreamingRecognizeRequest(audio_content=c) for c in chunked(pcm16(noise(seconds, seed)),
                                                                                 CHUNK_100MS)]
    with grpc.insecure_channel(address, options=OWN_CONNECTION) as channel:
        call = pb_grpc.RecognizerStub(channel).StreamingRecognize(iter(requests), timeout=timeout_s)
        finals = [r for response in call for r in response.results if r.is_final]
        replica = dict(call.initial_metadata()).get(REPLICA_HEADER)
    return finals, replica


def stored_feedback(store_url: str) -> dict[int, str | None]:
    """feedback id -> corrected text of every current (not superseded) row, consumed by a cycle or not."""
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(feedback.c.id, feedback.c.corrected_text)
                                .where(feedback.c.superseded_at.is_(None))).all()
    finally:
        engine.dispose()
    return dict(rows)


def test_an_utterance_transcribed_through_the_proxy_is_corrected_through_the_other_replica(cluster):
    served_by = []
    for seed in range(6):
        finals, replica = stream(cluster.proxy.address, seed=seed)
        assert replica in ("replica1", "replica2") and finals and finals[-1].utterance_id
        served_by.append(replica)
        other = cluster.other(replica)
        # At once: the row may still be in the first replica's writer queue; the other one waits for it.
        with RecognizerClient(other.address, timeout=10) as client:
            receipt = client.submit_correction(finals[-1].utterance_id, f"correction {seed}")
        assert receipt.normalized_text == f"correction {['zero', 'one', 'two', 'three', 'four', 'five'][seed]}"
        assert stored_feedback(cluster.store_url)[receipt.feedback_id] == receipt.normalized_text
    assert set(served_by) == {"replica1", "replica2"}  # the proxy spreads new streams


def test_a_standalone_trainer_publishes_from_the_shared_store_and_every_replica_swaps_to_it(cluster):
    parent = cluster.registry.current_version()
    with RecognizerClient(cluster.proxy.address, timeout=10) as client:
        for seed in range(4):
            finals, _ = stream(cluster.proxy.address, seed=100 + seed)
            # Acceptances: a correction of a random model's gibberish is flagged and never trained on.
            client.accept_transcript(finals[-1].utterance_id)
    command = [sys.executable, "-m", "voxloop.clients.cli", "train", "--once", "--json", "--data-dir",
               str(cluster.root / "trainer"), "--store", cluster.store_url, "--registry", str(cluster.registry.root),
               "--corpus", str(cluster.corpus)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **TRAINER_ENV})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["outcome"] == "published", report.get("gate")
    version = report["version_out"]
    assert version != parent and cluster.registry.current_version() == version
    with FeedbackStore.open(cluster.store_url) as store:
        assert store.pending_count() == 0 and store.get_cycle(report["cycle_id"]).model_version_out == version

    def serving() -> list[str]:
        versions = []
        for replica in cluster.replicas:
            with RecognizerClient(replica.address, timeout=5) as client:
                versions.append(client.get_model_info().version)
        return versions

    wait_for(lambda: serving() == [version, version], 60, f"both replicas to serve {version}", interval_s=0.2)
    finals, _ = stream(cluster.proxy.address, seed=200)
    assert finals[-1].model_version == version


async def _realtime_stream(address: str, audio: list[bytes]) -> tuple[str | None, str | None, int]:
    """One stream at real-time pace on its own connection; (error or None, replica, finals)."""
    async def requests():
        yield pb.StreamingRecognizeRequest(config=recognition_config(16000, interim_results=True))
        started = time.monotonic()
        for i, chunk in enumerate(audio):
            await asyncio.sleep(max(0.0, started + 0.1 * i - time.monotonic()))
            yield pb.StreamingRecognizeRequest(audio_content=chunk)

    async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
        call = pb_grpc.RecognizerStub(channel).StreamingRecognize(requests(), timeout=60)
        finals = 0
        try:
            async for response in call:
                finals += sum(r.is_final for r in response.results)
            replica = dict(await call.initial_metadata()).get(REPLICA_HEADER)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}", None, finals
    return None, replica, finals


def _streams_until(address: str, concurrency: int, stop: threading.Event, seconds: float) -> list:
    audio = chunked(pcm16(noise(seconds, seed=7)), CHUNK_100MS)
    results = []

    async def client(i: int) -> None:
        await asyncio.sleep(0.1 * i / concurrency)  # spread the starts over one chunk
        while not stop.is_set():
            results.append(await _realtime_stream(address, audio))

    async def run() -> None:
        await asyncio.gather(*(client(i) for i in range(concurrency)))

    asyncio.run(run())
    return results


def test_a_rolling_restart_of_every_replica_under_32_realtime_streams_fails_no_stream(cluster):
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(_streams_until, cluster.proxy.address, 32, stop, 2.0)
        try:
            time.sleep(3.0)  # every client mid-stream
            for replica in cluster.replicas:
                assert replica.terminate() == 0, replica.log_tail()  # drains: its open streams finish
                cluster.proxy.wait_state(replica.name, "DOWN")
                replica.start()
                replica.wait_serving()
                cluster.proxy.wait_state(replica.name, "UP")
            time.sleep(3.0)  # streams on the restarted replicas too
        finally:
            stop.set()
        results = load.result(timeout=120)
    failed = [error for error, _, _ in results if error]
    assert failed == [], f"{len(failed)} of {len(results)} streams failed: {sorted(set(failed))[:5]}"
    assert len(results) >= 3 * 32  # every client ran a stream before, during and after the restarts
    assert all(finals >= 1 for _, _, finals in results)
    assert {replica for _, replica, _ in results} == {"replica1", "replica2"}


def test_a_replica_sigkilled_during_a_burst_of_corrections_loses_no_acknowledged_one(cluster):
    utterances = [stream(cluster.proxy.address, seconds=0.5, seed=300 + i)[0][-1].utterance_id for i in range(48)]
    victim = cluster.replicas[0]
    acked: dict[int, str] = {}
    lock = threading.Lock()

    def correct(share: list[tuple[int, str]]) -> None:
        with RecognizerClient(cluster.proxy.address, timeout=30, options=OWN_CONNECTION) as client:
            for i, utterance_id in share:
                receipt = client.submit_correction(utterance_id, f"burst {i}")  # retried on UNAVAILABLE
                with lock:
                    acked[receipt.feedback_id] = receipt.normalized_text

    jobs = list(enumerate(utterances))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(correct, jobs[k::4]) for k in range(4)]
        wait_for(lambda: len(acked) >= 12, 60, "a dozen acknowledged corrections", interval_s=0.005)
        victim.kill()  # mid-burst: no drain, no flush
        for future in futures:
            future.result(timeout=120)  # every correction acknowledged, through the surviving replica
    assert len(acked) == len(utterances)
    stored = stored_feedback(cluster.store_url)
    assert {i: stored.get(i) for i in acked} == acked
    victim.start()  # leave the cluster whole
    victim.wait_serving()
    cluster.proxy.wait_state(victim.name, "UP")
