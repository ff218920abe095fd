"""Checkpoint file I/O, one concern per module (no model logic here; :mod:`deltakit.checkpoint` builds on it).

- :mod:`deltakit.io.safe_json`: JSON from untrusted bytes, every hostile construct a :class:`CheckpointError`.
- :mod:`deltakit.io.files`: bounded reads of regular files only, durable single-file writes, fsync helpers.
- :mod:`deltakit.io.tensor_file`: the safetensors layout, read (header validated before any tensor is allocated)
  and written (deterministic bytes).
- :mod:`deltakit.io.transaction`: a checkpoint directory's two files replaced together in one atomic, durable step,
  with a directory lock and crash recovery.
"""
