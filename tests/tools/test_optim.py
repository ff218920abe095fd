"""LoRA+ (deltakit.optim): parameter groups read from the delta's sites, the same groups as PEFT's
create_loraplus_optimizer, any torch optimizer, DeltaTrainer(loraplus_lr_ratio=...), clear errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from deltakit import BitFitModel, DeltaError, LoraModel, create_loraplus_optimizer, loraplus_parameter_groups
from deltakit.errors import DeltaConfigError
from deltakit.integrations.peft import export_to_peft
from deltakit.integrations.trainer import DeltaTrainer
from deltakit.optim import LORAPLUS_GROUPS
from tests.helpers import perturb, tiny_bert, tiny_gpt2, tiny_llama
from tests.tolerances import assert_same_function

peft = pytest.importorskip("peft")
peft_optimizers = pytest.importorskip("peft.optimizers")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# architecture -> (builder, LoRA positions with the embedding, a backbone module kept trainable)
SETUPS = {
    "bert": (tiny_bert, ["attn.q", "attn.v", "embed"], "classifier"),
    "gpt2": (tiny_gpt2, ["attn.q", "ff.w1", "embed"], "transformer.ln_f"),
    "llama": (tiny_llama, ["attn.q", "attn.v", "ff.w2", "embed"], "model.norm"),
}


def lora(arch: str, *, head: bool = True) -> tuple[nn.Module, LoraModel]:
    build, roles, extra = SETUPS[arch]
    model = build()
    delta = LoraModel(model, modified_modules=roles, lora_r=4, lora_alpha=8)
    delta.freeze_module(exclude=["deltas", extra] if head else ["deltas"])
    return model, delta


def names_by_group(groups: list[dict], names: dict[int, str]) -> dict[str, tuple[float, float, list[str]]]:
    return {g["name"]: (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups}


@pytest.mark.parametrize("arch", list(SETUPS))
def test_groups_come_from_the_sites(arch: str) -> None:
    model, delta = lora(arch)
    groups = loraplus_parameter_groups(delta, lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5, weight_decay=0.1)
    assert [g["name"] for g in groups] == list(LORAPLUS_GROUPS)
    by_id = {id(p): g["name"] for g in groups for p in g["params"]}
    expected: dict[int, str] = {}
    for site in delta.sites:
        embedding = isinstance(site.host, nn.Embedding)
        expected[id(site.module.lora_A)] = "loraplus_embed" if embedding else "loraplus_A"
        expected[id(site.module.lora_B)] = "loraplus_embed" if embedding else "loraplus_B"
    extra = model.get_submodule(SETUPS[arch][2])
    for pname, param in extra.named_parameters():
        # a head's matrix takes A's rate; biases and normalisation weights (LayerNorm, Llama's RMSNorm) B's, undecayed
        expected[id(param)] = "loraplus_A" if param.ndim == 2 else "loraplus_B_nd"
    assert by_id == expected  # exactly what the delta trains, each parameter once
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings == {
        "loraplus_A": (1e-3, 0.1), "loraplus_embed": (1e-5, 0.1), "loraplus_B": (8e-3, 0.1), "loraplus_B_nd": (8e-3, 0.0),
    }
    # The same groups whether the delta, the model it is attached to, or the detached delta is given.
    names = {id(p): n for n, p in model.named_parameters()}
    ours = names_by_group(groups, names)
    assert names_by_group(loraplus_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5,
                                                    weight_decay=0.1), names) == ours
    delta.detach()
    assert names_by_group(loraplus_parameter_groups(delta, lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5,
                                                    weight_decay=0.1), names) == ours


def test_a_site_module_named_like_lora_elsewhere_does_not_fool_it() -> None:
    """Roles come from the site classes, not names: a backbone parameter called lora_B is an ordinary matrix."""
    model, _ = lora("bert", head=False)
    model.classifier.lora_B = nn.Parameter(torch.zeros(2, 3))
    groups = loraplus_parameter_groups(model, lr=1e-3)
    a_group = next(g for g in groups if g["name"] == "loraplus_A")
    assert any(p is model.classifier.lora_B for p in a_group["params"])


def test_several_deltas_and_frozen_ones() -> None:
    model = tiny_bert()
    first = LoraModel(model, modified_modules=["attn.q"], lora_r=2, name="first")
    second = LoraModel(model, modified_modules=["attn.v"], lora_r=2, name="second")
    first.freeze_module(exclude=["deltas", second])
    groups = loraplus_parameter_groups([first, second], lr=1e-3)
    b = next(g for g in groups if g["name"] == "loraplus_B")["params"]
    assert {id(p) for p in b} == {id(s.module.lora_B) for d in (first, second) for s in d.sites}
    second.sites[0].module.lora_B.requires_grad_(False)  # frozen parameters are left out
    b = next(g for g in loraplus_parameter_groups([first, second], lr=1e-3) if g["name"] == "loraplus_B")["params"]
    assert len(b) == len(first.sites) + len(second.sites) - 1


def peft_name_to_ours(name: str, child: str) -> str:
    """PEFT's name of a LoRA factor or of a modules_to_save copy -> deltakit's (relative to the backbone)."""
    name = name.removeprefix("base_model.model.")
    for pattern, repl in [
        (r"\.lora_(?:embedding_)?([AB])\.default(?:\.weight)?$", rf".{child}.lora_\1"),
        (r"\.modules_to_save\.default\.", "."),
    ]:
        name = re.sub(pattern, repl, name)
    return name


@pytest.mark.parametrize("arch", list(SETUPS))
def test_same_groups_as_peft(arch: str, tmp_path) -> None:
    """Same parameters (by name and shape), learning rates and weight decay in each group as PEFT's LoRA+ for the same
    adapter (exported to PEFT, so the trainable sets match too); empty PEFT groups are the ones deltakit omits."""
    model, delta = lora(arch, head=arch == "bert")  # PEFT decays a trainable RMSNorm: heads of LMs left out here
    export_to_peft(delta, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(SETUPS[arch][0](), tmp_path / "adapter", is_trainable=True)
    kw = {"lr": 1e-3, "loraplus_lr_ratio": 8.0, "loraplus_lr_embedding": 1e-5}
    peft_opt = peft_optimizers.create_loraplus_optimizer(
        theirs, torch.optim.AdamW, loraplus_weight_decay=0.05, **kw
    )
    our_opt = create_loraplus_optimizer(delta, torch.optim.AdamW, weight_decay=0.05, **kw)
    peft_names = {id(p): peft_name_to_ours(n, delta.child_name) for n, p in theirs.named_parameters()}
    our_names = {id(p): n for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    def describe(groups: list[dict], names: dict[int, str]) -> list[tuple]:
        return [(g["lr"], g["weight_decay"], sorted((names[id(p)], tuple(p.shape)) for p in g["params"]))
                for g in groups if g["params"]]

    expected = describe(peft_opt.param_groups, peft_names)
    assert describe(our_opt.param_groups, our_names) == expected
    assert all(shapes[n] == s for *_, members in expected for n, s in members)
    assert sum(len(m) for *_, m in expected) == sum(1 for p in model.parameters() if p.requires_grad)


def test_dora_direction_and_magnitude_get_b_rates_as_in_peft() -> None:
    """DoRA's sites hold the same lora_A / lora_B; its magnitude is a vector (B's rate, decayed), as in PEFT's LoRA+
    on a PEFT DoRA adapter over the same modules (group membership does not depend on the values)."""
    dora = pytest.importorskip("deltakit.deltas.dora")
    model = tiny_bert()
    delta = dora.DoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"])
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True, modules_to_save=["classifier"])
    theirs = peft.get_peft_model(tiny_bert(), config)
    kw = {"lr": 1e-3, "loraplus_lr_ratio": 4.0}
    peft_opt = peft_optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, loraplus_weight_decay=0.05, **kw)
    our_opt = create_loraplus_optimizer(delta, torch.optim.AdamW, weight_decay=0.05, **kw)

    def peft_name(name: str) -> str:
        return re.sub(r"\.lora_magnitude_vector\.default\.weight$", f".{delta.child_name}.magnitude",
                      peft_name_to_ours(name, delta.child_name))

    peft_names = {id(p): peft_name(n) for n, p in theirs.named_parameters()}
    our_names = {id(p): n for n, p in model.named_parameters()}

    def describe(groups: list[dict], names: dict[int, str]) -> list[tuple]:
        return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups if g["params"]]

    assert describe(our_opt.param_groups, our_names) == describe(peft_opt.param_groups, peft_names)
    b_group = next(g for g in our_opt.param_groups if g["name"] == "loraplus_B")
    assert {id(s.module.magnitude) for s in delta.sites} <= {id(p) for p in b_group["params"]}


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop])
def test_any_torch_optimizer_steps_b_at_the_ratio(optimizer_cls: type) -> None:
    model, delta = lora("bert", head=False)
    perturb(delta, scale=0.2)
    opt = create_loraplus_optimizer(delta, optimizer_cls, lr=1e-2, loraplus_lr_ratio=4)
    before = {id(p): p.detach().clone() for p in delta.parameters()}
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    grads = {id(p): p.grad.clone() for p in delta.parameters()}
    opt.step()
    if optimizer_cls is torch.optim.SGD:  # plain SGD: the step is exactly -rate * gradient, rate per group
        for site in delta.sites:
            if isinstance(site.host, nn.Embedding):
                continue
            for param, rate in ((site.module.lora_A, 1e-2), (site.module.lora_B, 4e-2)):
                expected = before[id(param)] - rate * grads[id(param)]
                assert_same_function(param.detach(), expected, depth=1, reduction=1)
    assert all(not torch.equal(before[id(p)], p.detach()) for p in delta.parameters() if p.grad.abs().sum() > 0)


def test_extra_optimizer_arguments_pass_through() -> None:
    _, delta = lora("bert", head=False)
    opt = create_loraplus_optimizer(delta, torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    assert opt.defaults["lr"] == 0.1


class Pairs(torch.utils.data.Dataset):
    """Token sequences labelled by whether token 5 occurs (learnable by a tiny BERT)."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 100, (n, 8), generator=g)
        self.ids[: n // 2, 3] = 5
        self.labels = (self.ids == 5).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def mean_loss(model: nn.Module, data: Pairs) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.ids, attention_mask=torch.ones_like(data.ids), labels=data.labels).loss.item()


def test_delta_trainer_with_loraplus_lowers_the_loss(tmp_path) -> None:
    model, delta = lora("bert")
    data = Pairs()
    start = mean_loss(model, data)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=2e-2, max_steps=30, save_strategy="no",
        logging_strategy="no", report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        weight_decay=0.01,
    )
    trainer = DeltaTrainer(model=model, delta=delta, args=args, train_dataset=data, loraplus_lr_ratio=16)
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == set(LORAPLUS_GROUPS)
    assert groups["loraplus_B"]["initial_lr"] == pytest.approx(16 * groups["loraplus_A"]["initial_lr"])
    assert groups["loraplus_A"]["initial_lr"] == 2e-2 and groups["loraplus_A"]["weight_decay"] == 0.01
    assert groups["loraplus_B_nd"]["weight_decay"] == 0.0
    # the scheduler scales every group alike: the ratio holds through training
    assert groups["loraplus_B"]["lr"] == pytest.approx(16 * groups["loraplus_A"]["lr"])
    assert mean_loss(model, data) < 0.8 * start  # 0.69 -> 0.41 here


def test_delta_trainer_refuses_bad_loraplus_settings(tmp_path) -> None:
    model, delta = lora("bert")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(DeltaConfigError, match="loraplus_lr_ratio"):
        DeltaTrainer(model=model, delta=delta, args=args, train_dataset=Pairs(), loraplus_lr_ratio=0)
    opt = torch.optim.SGD(delta.parameters(), lr=0.1)
    with pytest.raises(DeltaError, match="ready-made optimizer"):
        DeltaTrainer(model=model, delta=delta, args=args, train_dataset=Pairs(), loraplus_lr_ratio=16,
                     optimizers=(opt, None))
    # An optimizer Trainer builds without parameter groups cannot take LoRA+'s.
    trainer = DeltaTrainer(model=model, delta=delta, args=args, train_dataset=Pairs(), loraplus_lr_ratio=16,
                           optimizer_cls_and_kwargs=(lambda params, lr: None, {"lr": 0.1}))
    with pytest.raises(DeltaError, match="needs an optimizer built from parameter groups"):
        trainer.create_optimizer()
    # Any torch optimizer class Trainer is given takes them, with its own settings.
    trainer = DeltaTrainer(model=model, delta=delta, args=args, train_dataset=Pairs(), loraplus_lr_ratio=16,
                           optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}))
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    assert isinstance(trainer.optimizer, torch.optim.SGD) and groups["loraplus_A"]["momentum"] == 0.9
    assert (groups["loraplus_A"]["lr"], groups["loraplus_B"]["lr"]) == (0.1, pytest.approx(1.6))
    # Without loraplus_lr_ratio, Trainer's optimizer is unchanged: two plain groups, one rate.
    trainer = DeltaTrainer(model=model, delta=delta, args=args, train_dataset=Pairs())
    assert {g["lr"] for g in trainer.create_optimizer().param_groups} == {args.learning_rate}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be a finite number > 0"),
        ({"loraplus_lr_ratio": -16}, "loraplus_lr_ratio must be a finite number > 0"),
        ({"loraplus_lr_ratio": math.nan}, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": math.inf}, "loraplus_lr_ratio"),
        ({"loraplus_lr_ratio": True}, "loraplus_lr_ratio"),
        ({"lr": math.nan}, r"\.lr must be a finite number"),
        ({"lr": -1e-3}, r"\.lr must be"),
        ({"lr": 1e308, "loraplus_lr_ratio": 1e10}, "overflows"),
        ({"loraplus_lr_embedding": math.nan}, "loraplus_lr_embedding"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_rates_are_refused(kwargs: dict, match: str) -> None:
    _, delta = lora("bert", head=False)
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(DeltaConfigError if "overflows" not in match else DeltaError, match=match):
        create_loraplus_optimizer(delta, torch.optim.AdamW, **args)


def test_other_bad_inputs_are_clear_errors() -> None:
    model, delta = lora("bert", head=False)
    with pytest.raises(DeltaError, match="optimizer_cls"):
        create_loraplus_optimizer(delta, lambda params, lr: None, lr=1e-3)  # type: ignore[arg-type]
    with pytest.raises(DeltaError, match="optimizer_cls"):
        create_loraplus_optimizer(delta, torch.optim.SGD(delta.parameters(), lr=0.1), lr=1e-3)  # type: ignore[arg-type]
    with pytest.raises(DeltaError, match=r"sets \['params'\] itself"):
        create_loraplus_optimizer(delta, torch.optim.AdamW, lr=1e-3, params=list(delta.parameters()))
    with pytest.raises(DeltaError, match="needs a delta"):
        loraplus_parameter_groups("model", lr=1e-3)  # type: ignore[arg-type]
    # No LoRA factor trained: another method, or a frozen LoRA.
    bitfit_model = tiny_bert()
    bitfit = BitFitModel(bitfit_model)
    bitfit.freeze_module()
    with pytest.raises(DeltaError, match="no trainable LoRA factor.*bias"):
        create_loraplus_optimizer(bitfit, torch.optim.AdamW, lr=1e-3)
    delta.freeze_module(exclude=["classifier"])
    with pytest.raises(DeltaError, match="no trainable LoRA factor"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3)

