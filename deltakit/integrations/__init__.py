"""Integrations with the tools deltakit lives with.

- :mod:`deltakit.integrations.trainer`: ``DeltaTrainer``, transformers' ``Trainer`` with delta-only checkpoints.
- :mod:`deltakit.integrations.distributed`: delta-only state dicts and checkpoints of models wrapped by DDP,
  FSDP2 (``fully_shard``), accelerate and DeepSpeed (ZeRO-2/3).
- :mod:`deltakit.integrations.checkpointing`: gradients reach the deltas under reentrant activation checkpointing.

Each module imports its third-party dependency lazily, so ``import deltakit`` never needs them.
"""
