"""Endpointing: where one utterance ends and the next begins, from the decoder's trailing blank frames.

The three rules of sherpa-onnx's online recognizer (`endpoint.h`), with its defaults in ServerConfig:
an utterance ends after `trailing_silence_before_speech_s` of silence when nothing was recognized
yet, after `trailing_silence_after_speech_s` of silence following speech, or at `max_utterance_s`.
"Silence" is the model's own: frames whose best token is the CTC blank.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .config import ServerConfig


class EndpointRule(StrEnum):
    SILENCE_BEFORE_SPEECH = "trailing_silence_before_speech"
    SILENCE_AFTER_SPEECH = "trailing_silence_after_speech"
    MAX_UTTERANCE = "max_utterance"


@dataclass(frozen=True)
class EndpointRules:
    trailing_silence_before_speech_s: float = 2.4
    trailing_silence_after_speech_s: float = 1.2
    max_utterance_s: float = 20.0

    @classmethod
    def from_config(cls, config: ServerConfig) -> EndpointRules:
        return cls(config.trailing_silence_before_speech_s, config.trailing_silence_after_speech_s,
                   config.max_utterance_s)

    def detect(self, utterance_s: float, trailing_silence_s: float, has_speech: bool) -> EndpointRule | None:
        """The rule that ends the utterance now, or None. Times are seconds of decoded audio."""
        # A float tolerance: durations are sums of frame shifts and should hit the thresholds exactly.
        epsilon = 1e-6
        if has_speech and trailing_silence_s + epsilon >= self.trailing_silence_after_speech_s:
            return EndpointRule.SILENCE_AFTER_SPEECH
        if trailing_silence_s + epsilon >= self.trailing_silence_before_speech_s:
            return EndpointRule.SILENCE_BEFORE_SPEECH
        if utterance_s + epsilon >= self.max_utterance_s:
            return EndpointRule.MAX_UTTERANCE
        return None
