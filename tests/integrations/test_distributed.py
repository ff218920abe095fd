"""Distributed engines on CPU: 2 processes (gloo, one thread each) train the examples/distributed scripts from the
same initialization on different data per rank; the saved delta must equal a single-process reference run on the
combined data (max abs diff <= 1e-6). Plus single-process checks of the helpers' bad inputs.

The torchrun runs are marked slow (about 20-30 s each; DeepSpeed's first run builds a small C++ op, about 1-3
minutes, once per machine) and still run in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltakit import AutoDeltaModel, BitFitModel, CheckpointError, DeltaError, LoraModel
from deltakit.checkpoint import backbone_fingerprint, read_weights
from deltakit.integrations.distributed import (
    delta_state_dict,
    load_delta_checkpoint,
    load_delta_state_dict,
    save_delta_checkpoint,
    unwrap_model,
)

from tests.helpers import REPO_ROOT, perturb, tiny_bert

EXAMPLES = REPO_ROOT / "examples" / "distributed"
sys.path.insert(0, str(EXAMPLES))
import dist_common as common  # noqa: E402  (examples/distributed/dist_common.py: model, data and the reference run)

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return common.reference()


def torchrun(script: str, out: Path, *extra: str, timeout: int = 240) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / script), "--out", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads((out / "report.json").read_text())


def assert_matches_reference(out: Path, reference: dict[str, torch.Tensor]) -> None:
    saved = read_weights(str(out / "delta"))
    assert sorted(saved) == sorted(reference)  # the delta and the trainable head, nothing of the backbone
    for key, tensor in reference.items():
        assert saved[key].shape == tensor.shape, key  # complete, never torch.Size([0])
        assert (saved[key] - tensor).abs().max().item() <= 1e-6, key
    # ... and it is a regular deltakit checkpoint: it loads onto a fresh backbone, fingerprint checked.
    backbone, delta = common.build()
    delta.detach()
    loaded = AutoDeltaModel.from_finetuned(str(out / "delta"), backbone_model=backbone)
    for key, tensor in loaded.delta_state_dict().items():
        assert torch.equal(tensor, saved[key]), key


def test_reference_moves_every_tensor(reference) -> None:
    """Guard against a vacuous comparison: 3 steps change every delta tensor far beyond the 1e-6 tolerance."""
    model, delta = common.build()
    start = {**delta.delta_state_dict(), **{n: p for n, p in model.named_parameters() if n.startswith("classifier")}}
    assert sorted(start) == sorted(reference)
    for key, tensor in start.items():
        assert (reference[key] - tensor).abs().max().item() > 1e-3, key


@pytest.mark.slow
def test_ddp(tmp_path, reference) -> None:
    report = torchrun("ddp.py", tmp_path)
    assert report["world"] == 2
    assert report["buckets_hold_exactly_the_trainable_parameters"]
    assert report["buckets_hold_only_delta_and_head"]
    assert_matches_reference(tmp_path, reference)


@pytest.mark.slow
def test_fsdp2(tmp_path, reference) -> None:
    report = torchrun("fsdp2.py", tmp_path)
    assert report["world"] == 2
    assert report["delta_and_frozen_in_one_group"] and report["all_parameters_sharded"]
    assert report["save_gathered_only_delta_and_head"] and report["tensors_gathered_by_save"] == len(reference)
    assert report["reload_exact"]
    assert_matches_reference(tmp_path, reference)


@pytest.mark.slow
def test_accelerate(tmp_path, reference) -> None:
    report = torchrun("accelerate_example.py", tmp_path)
    assert report["world"] == 2
    assert report["state_holds_no_full_model"] and report["state_holds_the_delta"]
    assert report["load_state_then_same_step_is_exact"]
    state = read_weights(str(tmp_path / "state"))
    assert sorted(state) == sorted(reference)
    assert_matches_reference(tmp_path, reference)


@pytest.mark.slow
def test_delta_trainer_under_ddp(tmp_path) -> None:
    report = torchrun("trainer_ddp.py", tmp_path)
    assert report["world"] == 2 and report["trainer_used_ddp"]
    assert report["checkpoint_is_delta_only"]
    assert report["every_tensor_trained"] and report["resume_exact"] and report["ranks_agree"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed(tmp_path, reference, stage: int) -> None:
    report = torchrun("deepspeed_example.py", tmp_path, "--stage", str(stage), timeout=480)
    assert report["world"] == 2 and report["stage"] == stage
    assert report["load_into_training_engine_refused"]  # ZeRO's fp32 master copies would undo a load
    if stage == 3:
        assert report["delta_partitioned_in_the_model"]  # really sharded, and still saved complete
        assert report["load_into_zero3_inference_engine_exact"]
    assert_matches_reference(tmp_path, reference)


# ---------------------------------------------------------------- single-process checks of the helpers


def test_single_process_save_equals_save_finetuned(tmp_path) -> None:
    model = tiny_bert()
    delta = LoraModel(model)
    perturb(delta)
    delta.freeze_module(exclude=["deltas", "classifier"])
    save_delta_checkpoint(model, delta, tmp_path / "a")
    delta.save_finetuned(str(tmp_path / "b"))
    a, b = read_weights(str(tmp_path / "a")), read_weights(str(tmp_path / "b"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "a" / "delta_config.json").read_text())
    assert meta["fingerprint"] == backbone_fingerprint(model, delta.modified_modules)
    # torch.compile's wrapper is looked through.
    assert unwrap_model(torch.compile(model)) is model
    assert sorted(delta_state_dict(torch.compile(model), delta)) == sorted(a)


def test_load_validates_before_changing_anything(tmp_path) -> None:
    model = tiny_bert()
    delta = LoraModel(model)
    perturb(delta)
    delta.freeze_module()
    save_delta_checkpoint(model, delta, tmp_path / "ok")
    state = delta_state_dict(model, delta)
    perturb(delta, seed=7)
    before = {k: v.clone() for k, v in delta.delta_state_dict().items()}

    broken = dict(state)
    broken.pop(next(iter(broken)))
    with pytest.raises(CheckpointError, match="missing"):
        load_delta_state_dict(model, delta, broken)
    wrong = {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(state.items())}
    with pytest.raises(CheckpointError, match="Shape mismatch"):
        load_delta_state_dict(model, delta, wrong)
    with pytest.raises(CheckpointError, match="bitfit"):
        other = tiny_bert()
        BitFitModel(other).save_finetuned(str(tmp_path / "bitfit"))
        load_delta_checkpoint(model, delta, tmp_path / "bitfit")
    assert all(torch.equal(before[k], v) for k, v in delta.delta_state_dict().items())

    load_delta_checkpoint(model, delta, tmp_path / "ok")
    assert all(torch.equal(state[k], v) for k, v in delta.delta_state_dict().items())


def test_wrong_model_or_state_raises() -> None:
    model, other = tiny_bert(), tiny_bert()
    delta = LoraModel(model)
    with pytest.raises(DeltaError, match="not created on this model"):
        delta_state_dict(other, delta)
    with pytest.raises(DeltaError, match="deltakit delta object"):
        delta_state_dict(model, "lora")
    delta.detach()
    with pytest.raises(DeltaError, match="attach"):
        delta_state_dict(model, delta)


@pytest.mark.parametrize("state", [None, {"x": "not a tensor"}, [("x", torch.zeros(1))]])
def test_load_delta_state_dict_refuses_what_is_not_a_tensor_mapping(state) -> None:
    model = tiny_bert()
    delta = LoraModel(model)
    before = {k: v.clone() for k, v in delta.delta_state_dict().items()}
    with pytest.raises(CheckpointError, match="needs a \\{name: tensor\\} mapping"):
        load_delta_state_dict(model, delta, state)
    assert all(torch.equal(before[k], v) for k, v in delta.delta_state_dict().items())
