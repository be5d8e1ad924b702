"""Every Prometheus metric the server and the trainer export, defined in one place.

Names follow the Prometheus conventions: the `voxloop_` prefix, base units (seconds, bytes),
`_total` on counters, low-cardinality labels only (never a user, utterance or request id). The
objects live in prometheus_client's default registry, so the in-process trainer's metrics appear on
the server's endpoint without extra wiring; `start_metrics_server(port)` serves that registry.
The trainer's metrics are defined here too (server and trainer both import core), so
`docs/operations.md`'s metrics reference is generated from this one module.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

# Latency buckets from 10 ms to 10 s: the streaming SLOs are 300 ms (partials) and 500 ms (finals).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CYCLE_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# --- server: recognition ---

ACTIVE_STREAMS = Gauge("voxloop_active_streams", "Open recognitions (StreamingRecognize and Recognize calls).")
RPCS = Counter("voxloop_rpcs_total", "Finished RPCs by full method name and gRPC status code.", ["method", "code"])
AUDIO_SECONDS = Counter("voxloop_audio_processed_seconds_total", "Seconds of audio run through the model.")
INFERENCE_SECONDS = Histogram("voxloop_inference_seconds", "Wall time of one batched onnxruntime call.",
                              buckets=INFERENCE_BUCKETS)
INFERENCE_BATCH_SIZE = Histogram("voxloop_inference_batch_size", "Stream chunks per batched onnxruntime call.",
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
PARTIAL_LAG_SECONDS = Histogram("voxloop_partial_lag_seconds",
                                "From the arrival of a chunk's last audio to the interim result covering it.",
                                buckets=LATENCY_BUCKETS)
FINAL_LATENCY_SECONDS = Histogram("voxloop_final_latency_seconds",
                                  "From the endpoint (or the end of the audio) to the final result.",
                                  buckets=LATENCY_BUCKETS)
SECOND_PASS_SECONDS = Histogram("voxloop_second_pass_seconds",
                                "Wall time of a two-pass (Whisper) version's final decode of one utterance.",
                                buckets=LATENCY_BUCKETS)
SECOND_PASS_AUDIO_SECONDS = Counter("voxloop_second_pass_audio_seconds_total",
                                    "Seconds of utterance audio decoded by a second pass.")
SECOND_PASS_BACKLOG_FINALS = Counter("voxloop_second_pass_backlog_finals_total",
                                     "Finals not decoded by the version's own search because finals were "
                                     "backing up: greedily in a batch, or a beam search finished greedily "
                                     "(server/finals.py).")
REAL_TIME_FACTOR = Gauge("voxloop_real_time_factor",
                         "Inference seconds per audio second over the recent calls (below 1 keeps up).")
UTTERANCES_DROPPED = Counter("voxloop_store_writes_dropped_total",
                             "Final utterances not written to the feedback store (queue full or insert failed).")
STORE_WRITE_LAG_SECONDS = Histogram("voxloop_store_write_lag_seconds",
                                    "From a final's utterance being queued (just before the final is sent) to its "
                                    "commit in the feedback store: the window in which a crash loses it.",
                                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                             5.0, 10.0))
FEEDBACK_RECEIVED = Counter("voxloop_feedback_received_total",
                            "Feedback committed to the store and acknowledged (a retried RPC counts again), by kind "
                            "(correction, acceptance, rejection, choice).",
                            ["kind"])

# --- server: the web page's WebSocket bridge (its calls also count in voxloop_rpcs_total) ---

WEB_CONNECTIONS = Gauge("voxloop_web_connections", "Open WebSockets of the end-user web page.")
WEB_CONNECTIONS_REFUSED = Counter("voxloop_web_connections_refused_total",
                                  "WebSocket upgrades refused before any call, by reason (origin).", ["reason"])
WEB_MESSAGES_REFUSED = Counter("voxloop_web_messages_refused_total",
                               "Page messages answered INVALID_ARGUMENT or RESOURCE_EXHAUSTED by the bridge itself "
                               "(bad JSON, unknown type or method, audio with no open recognition, too many calls).",
                               ["reason"])

# --- server: models and hot-swap ---

MODEL_INFO = Info("voxloop_model", "The model version serving new streams.")
"""Labels version and parent_version; the value is always 1 (a timeline: count by (version))."""
MODEL_SWAPS = Counter("voxloop_model_swaps_total", "Models activated in the running server.")
MODEL_SWAPS_REFUSED = Counter("voxloop_model_swaps_refused_total",
                              "Versions the server refused to activate (bad sha256, unloadable, failed warm-up).",
                              ["reason"])
LAST_SWAP_TIMESTAMP = Gauge("voxloop_model_last_swap_timestamp_seconds", "Unix time of the last model activation.")

# --- trainer ---

TRAINER_CYCLES = Counter("voxloop_trainer_cycles_total", "Training cycles by outcome (published, gated, failed).",
                         ["outcome"])
TRAINER_CYCLE_SECONDS = Histogram("voxloop_trainer_cycle_seconds", "Wall time of one training cycle.",
                                  buckets=CYCLE_BUCKETS)
TRAINER_FEEDBACK_CONSUMED = Counter("voxloop_trainer_feedback_consumed_total",
                                    "Feedback items marked consumed by a recorded cycle.")
TRAINER_LAST_CYCLE_TIMESTAMP = Gauge("voxloop_trainer_last_cycle_timestamp_seconds",
                                     "Unix time the last training cycle finished (any outcome).")
TRAINER_PPO = Gauge("voxloop_trainer_ppo", "PPO statistics of the last cycle's final update.", ["statistic"])
"""statistic: reward_mean, reward_std, kl (mean per-frame KL to the reference policy, nats; alerted above 0.1),
approx_kl (old vs new policy), clip_fraction, entropy, kl_coef, policy_loss, ptx_loss, grad_norm."""
TRAINER_GATE_WER = Gauge("voxloop_trainer_gate_wer", "Gate WER (0..1) of the last cycle, by evaluation set and model.",
                         ["set", "model"])
"""set: heldout (held-out feedback) or anchor (base corpus); model: candidate or serving."""
TRAINER_EXPORT_PARITY_ERROR = Gauge("voxloop_trainer_export_parity_max_abs_diff",
                                    "Largest |torch - onnxruntime| log-probability difference of the last export.")


# --- helpers for the instrumented code ---

RTF_WINDOW_CALLS = 200
"""The real-time factor gauge covers this many recent model calls (a few seconds under load)."""


class _RecentRealTimeFactor:
    """Inference seconds / audio seconds over the last `window` calls, kept in REAL_TIME_FACTOR."""

    def __init__(self, window: int):
        self._calls: deque[tuple[float, float]] = deque(maxlen=window)  # (inference_s, audio_s)
        self._lock = threading.Lock()

    def observe(self, inference_s: float, audio_s: float) -> None:
        with self._lock:
            self._calls.append((inference_s, audio_s))
            audio_total_s = sum(a for _, a in self._calls)
            if audio_total_s > 0:
                REAL_TIME_FACTOR.set(sum(i for i, _ in self._calls) / audio_total_s)


_RECENT_RTF = _RecentRealTimeFactor(RTF_WINDOW_CALLS)


def observe_inference(seconds: float, rows: int, audio_s: float) -> None:
    """One batched model call of `rows` stream chunks holding `audio_s` seconds of new audio (any thread)."""
    INFERENCE_SECONDS.observe(seconds)
    INFERENCE_BATCH_SIZE.observe(rows)
    _RECENT_RTF.observe(seconds, audio_s)


def observe_second_pass(seconds: float, audio_s: float) -> None:
    """One utterance's final from a second pass (any thread)."""
    SECOND_PASS_SECONDS.observe(seconds)
    SECOND_PASS_AUDIO_SECONDS.inc(audio_s)


# --- the endpoint ---


@dataclass
class MetricsServer:
    """A running /metrics endpoint (prometheus_client's WSGI server in a daemon thread); `stop()` frees the port."""

    host: str
    port: int
    """The bound port (the one asked for, or the free one picked for port 0)."""
    _httpd: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_metrics_server(port: int, host: str = "127.0.0.1",
                         registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve `registry` (by default every metric of this process) on http://host:port/metrics.

    One endpoint per process: the server's and the in-process trainer's metrics share the default
    registry. Port 0 picks a free port (`.port` tells which). Raises OSError naming the fix when the
    address cannot be bound.
    """
    try:
        httpd, thread = start_http_server(port, host, registry)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}); pick another port with "
                      "--metrics-port (metrics_port), or 0 to turn metrics off") from e
    thread.name = "metrics-http"
    server = MetricsServer(host, httpd.server_port, httpd, thread)
    log.info("metrics on %s", server.url)
    return server
