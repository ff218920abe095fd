"""DeltaTrainer: transformers.Trainer with delta-only checkpoints, exact resume, load_best_model_at_end."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainingArguments

from deltakit import AutoDeltaModel, BitFitModel, CheckpointError, DeltaError, LoraModel
from deltakit.checkpoint import read_weights
from deltakit.integrations.trainer import DeltaTrainer

from tests.helpers import tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class Pairs(torch.utils.data.Dataset):
    """Random token sequences labelled by whether token 5 occurs (learnable, deterministic)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 100, (n, 8), generator=g)
        self.ids[: n // 2, 3] = 5
        self.labels = (self.ids == 5).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def make(seed: int = 0) -> tuple[torch.nn.Module, LoraModel]:
    model = tiny_bert(seed)  # dropout stays on (0.1): resume must restore the RNG too
    torch.manual_seed(seed + 1)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"])
    return model, delta


def args(out: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=out, per_device_train_batch_size=8, learning_rate=1e-2, max_steps=6, save_steps=3,
        save_strategy="steps", logging_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_hold_only_the_delta_and_resume_is_exact(tmp_path) -> None:
    model, delta = make()
    DeltaTrainer(model=model, delta=delta, args=args(str(tmp_path / "a")), train_dataset=Pairs()).train()
    uninterrupted = trained_tensors(model)

    ckpt = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"delta_config.json", "delta_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "config.json", "pytorch_model.bin", "adapter_model.safetensors"}
    saved = read_weights(str(ckpt))
    assert set(saved) == set(delta.delta_state_dict()) | {"classifier.weight", "classifier.bias"}

    # from_pretrained can never take this directory for a full model.
    with pytest.raises((OSError, ValueError), match="config.json|model_type"):
        AutoModelForSequenceClassification.from_pretrained(str(ckpt))
    # ... while deltakit loads it onto a fresh backbone.
    fresh = tiny_bert(0)
    AutoDeltaModel.from_finetuned(str(ckpt), backbone_model=fresh)

    # Resume from step 3 in a new process-like setting: a fresh model with the same initial delta.
    model2, delta2 = make()
    trainer = DeltaTrainer(model=model2, delta=delta2, args=args(str(tmp_path / "a")), train_dataset=Pairs())
    trainer.train(resume_from_checkpoint=str(ckpt))
    resumed = trained_tensors(model2)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    # Sanity: training did change the delta (otherwise equality would prove nothing).
    _, init = make()
    assert not torch.equal(delta.delta_state_dict()[next(iter(delta.delta_state_dict()))],
                           init.delta_state_dict()[next(iter(init.delta_state_dict()))])


def test_load_best_model_at_end_restores_the_best_delta(tmp_path) -> None:
    model, delta = make()
    scores = iter([1.0, 0.0])  # the first evaluation (step 3) is the best

    def compute_metrics(_):
        return {"score": next(scores)}

    trainer = DeltaTrainer(
        model=model, delta=delta, train_dataset=Pairs(), eval_dataset=Pairs(16, seed=1), compute_metrics=compute_metrics,
        args=args(str(tmp_path / "b"), eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                  metric_for_best_model="score", greater_is_better=True),
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    best = read_weights(trainer.state.best_model_checkpoint)
    last = read_weights(str(tmp_path / "b" / "checkpoint-6"))
    now = {**delta.delta_state_dict(), **{n: p for n, p in model.named_parameters() if n.startswith("classifier")}}
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for key, tensor in best.items():
        assert torch.equal(now[key], tensor), key


def test_two_deltas_save_in_subdirectories_and_resume(tmp_path) -> None:
    def build():
        model, lora = make()
        bitfit = BitFitModel(model, modified_modules=["attention.output.dense"])
        lora.freeze_module(exclude=["deltas", "classifier"])
        for p in bitfit.parameters():
            p.requires_grad_(True)
        return model, lora, bitfit

    model, lora, bitfit = build()
    DeltaTrainer(model=model, delta=[lora, bitfit], args=args(str(tmp_path / "c")), train_dataset=Pairs()).train()
    ckpt = tmp_path / "c" / "checkpoint-3"
    assert os.path.isfile(ckpt / "lora" / "delta_model.safetensors")
    assert os.path.isfile(ckpt / "bitfit" / "delta_model.safetensors")
    model2, lora2, bitfit2 = build()
    DeltaTrainer(model=model2, delta=[lora2, bitfit2], args=args(str(tmp_path / "c")), train_dataset=Pairs()).train(
        resume_from_checkpoint=str(ckpt)
    )
    for (name, a), b in zip(trained_tensors(model).items(), trained_tensors(model2).values()):
        assert torch.equal(a, b), name


def test_bad_inputs_raise_clear_errors(tmp_path) -> None:
    model, delta = make()
    with pytest.raises(DeltaError, match="needs delta="):
        DeltaTrainer(model=model, delta=None, args=args(str(tmp_path / "d")), train_dataset=Pairs())
    other, other_delta = make()
    with pytest.raises(DeltaError, match="not attached to the model"):
        DeltaTrainer(model=model, delta=other_delta, args=args(str(tmp_path / "d")), train_dataset=Pairs())

    # Resuming from a directory that holds no delta checkpoint fails before anything changes.
    empty = tmp_path / "checkpoint-1"
    empty.mkdir()
    before = trained_tensors(model)
    trainer = DeltaTrainer(model=model, delta=delta, args=args(str(tmp_path / "d")), train_dataset=Pairs())
    with pytest.raises(CheckpointError, match="no deltakit checkpoint"):
        trainer._load_from_checkpoint(str(empty))
    # A checkpoint of another delta (other sites) is refused, model unchanged.
    elsewhere = tmp_path / "elsewhere"
    LoraModel(tiny_bert(0), modified_modules=["key"], lora_r=4).save_finetuned(str(elsewhere))
    with pytest.raises(CheckpointError, match="other modules"):
        trainer._load_from_checkpoint(str(elsewhere))
    for name, tensor in before.items():
        assert torch.equal(dict(model.named_parameters())[name], tensor)


def test_trainable_tensors_that_checkpoints_miss_are_refused_before_training(tmp_path) -> None:
    def hand_unfrozen_head():
        model = tiny_bert(0)
        torch.manual_seed(1)
        delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
        delta.freeze_module(exclude=["deltas"])
        model.classifier.requires_grad_(True)  # trainable, but freeze_module did not record it
        return model, delta

    def never_frozen():
        model = tiny_bert(0)
        torch.manual_seed(1)
        return model, LoraModel(model, modified_modules=["query", "value"], lora_r=4)

    not_given: list[BitFitModel] = []

    def second_delta_not_given():
        model, lora = make()
        not_given.append(BitFitModel(model, modified_modules=["attention.output.dense"]))  # trainable, not passed in
        return model, lora

    # A checkpoint of the documented set-up, to resume from below.
    good_model, good_delta = make()
    DeltaTrainer(model=good_model, delta=good_delta, args=args(str(tmp_path / "good"), max_steps=3),
                 train_dataset=Pairs()).train()
    good_ckpt = str(tmp_path / "good" / "checkpoint-3")

    cases = [
        (hand_unfrozen_head, {}, r"\['classifier.weight', 'classifier.bias'\].*exclude=\[\"deltas\", \"classifier\"\]"),
        (never_frozen, {}, r"'bert.embeddings.word_embeddings.weight'.*freeze_module"),
        (hand_unfrozen_head, {"resume_from_checkpoint": good_ckpt}, r"'classifier.weight'"),
        (second_delta_not_given, {}, r"'bert.encoder.layer.0.attention.output.dense.bitfit.bias'.*not given to "
                                     r"DeltaTrainer"),
    ]
    for i, (build, train_kwargs, message) in enumerate(cases):
        model, delta = build()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out = tmp_path / f"bad{i}"
        trainer = DeltaTrainer(model=model, delta=delta, args=args(str(out)), train_dataset=Pairs())
        with pytest.raises(DeltaError, match=message):
            trainer.train(**train_kwargs)
        assert trainer.state.global_step == 0
        assert not out.exists() or not any(p.startswith("checkpoint-") for p in os.listdir(out))
        after = model.state_dict()
        assert after.keys() == before.keys()
        for key, tensor in before.items():
            assert torch.equal(after[key], tensor), (i, key)

    # Frozen by hand after freeze_module, the head is neither trained nor saved: fine.
    model, delta = make()
    model.classifier.requires_grad_(False)
    head = model.classifier.weight.detach().clone()
    frozen_args = args(str(tmp_path / "frozen"), max_steps=2)
    DeltaTrainer(model=model, delta=delta, args=frozen_args, train_dataset=Pairs()).train()
    assert torch.equal(model.classifier.weight, head)

    # An optimizer passed in that holds only the delta trains only the delta, whatever requires_grad says: fine.
    model, delta = never_frozen()
    embeddings = model.bert.embeddings.word_embeddings.weight.detach().clone()
    lora = {k: v.clone() for k, v in delta.delta_state_dict().items()}
    optimizer = torch.optim.AdamW(delta.parameters(), lr=1e-2)
    DeltaTrainer(model=model, delta=delta, args=args(str(tmp_path / "own"), max_steps=2), train_dataset=Pairs(),
                 optimizers=(optimizer, None)).train()
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, embeddings)
    assert any(not torch.equal(v, lora[k]) for k, v in delta.delta_state_dict().items())
