"""voxloop.core: what the server and the trainer must agree on, in one place.

    server  ->  core  <-  trainer          (the server never imports the trainer; tests/test_import_rules.py)

- the model contract: `model` (formats, metadata, ModelSpec, the ONNX session and how a stream
  windows its audio), `decoder` (greedy CTC: the streaming decoder and the one-shot text), `lm_decoder`
  and `whisper_decoder` (a version's other decoders), `warmup` (the probe recorded at export and
  checked at load);
- audio and text: `pcm` (int16 <-> float, WAV files), `text` (normalization), `rewards` (edit-distance rewards);
- state both sides read and write: `store` (feedback), `registry` (versions), `limits` (id bounds),
  `data_dir` (where they live);
- observability: `metrics` (every Prometheus metric), `logging_setup`; `attribute_docs` (field docs for
  the CLI and docs/operations.md).

A change here changes serving and training (and the gate) alike; that is the point.
"""
