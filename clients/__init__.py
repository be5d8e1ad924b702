"""voxloop.clients: the Python client library (sync and asyncio) and the `voxloop` command line.

Needs only grpcio, numpy and soundfile: `pip install voxloop` without the server or trainer extras.
"""

from .audio_files import AudioFile, read_audio_file
from .client import (
    AsyncRecognizerClient,
    FileTranscript,
    RecognizerClient,
    Utterance,
    VoxloopError,
    Word,
    recognition_config,
)

__all__ = [
    "AsyncRecognizerClient",
    "AudioFile",
    "FileTranscript",
    "RecognizerClient",
    "Utterance",
    "VoxloopError",
    "Word",
    "read_audio_file",
    "recognition_config",
]
