"""Task heads (``modules_to_save``) routed per sample by ``DeltaGroup.route``: each row runs its own delta's head
copy (deltakit.heads.HeadRouter), rows without one keep the backbone's head, and a batch whose rows would use heads
of different shapes is refused before anything runs."""

from __future__ import annotations

import pathlib
import threading

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

from deltakit import DeltaError, DeltaGroup, DeltaStateError, LoraModel
from deltakit.composite import CompositeDelta
from tests.helpers import VOCAB, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert, tiny_gpt2
from tests.tolerances import assert_same_function

IDS = torch.randint(2, VOCAB, (4, 6), generator=torch.Generator().manual_seed(5))


def headed(model: nn.Module, name: str, seed: int, head: str = "classifier", **kwargs) -> LoraModel:
    """A LoRA with its own copy of ``head``, every parameter (factors and copy) perturbed, left detached."""
    delta = LoraModel(model, name=name, lora_r=2, modules_to_save=[head], **kwargs)
    perturb(delta, seed=seed, scale=0.3)
    return delta.detach()


def switched_logits(group: DeltaGroup, model: nn.Module, name: str | None, ids: torch.Tensor = IDS) -> torch.Tensor:
    """What ``name`` computes on its own: switched in, the whole batch."""
    group.switch(name)
    with torch.no_grad():
        logits = model(ids).logits
    group.switch(None)
    return logits


def assert_rows_alone(out: torch.Tensor, names: list[str | None], alone: dict[str | None, torch.Tensor],
                      model: nn.Module) -> None:
    # A routed row runs its delta's modules on a sub-batch: other GEMM shapes, so rounding may differ.
    for row, name in enumerate(names):
        assert_same_function(out[row], alone[name][row], model=model, note=f"row {row} ({name})")


def labelled_bert(num_labels: int) -> nn.Module:
    """``tiny_bert()``'s encoder under a fresh classifier with ``num_labels`` outputs."""
    base = tiny_bert()
    config = base.config.__class__(**{**base.config.to_dict(), "num_labels": num_labels})
    model = BertForSequenceClassification(config)
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")},
                          strict=False)
    return model.eval()


def save_labelled(path: pathlib.Path, num_labels: int, seed: int) -> pathlib.Path:
    """A LoRA with its own ``num_labels``-output classifier (trained on such a backbone), saved to ``path``."""
    delta = LoraModel(labelled_bert(num_labels), lora_r=2, modules_to_save=["classifier"])
    perturb(delta, seed=seed, scale=0.3)
    delta.save_finetuned(path)
    return path


# ---------------------------------------------------------------------------------------------- same shapes
def test_all_rows_on_one_headed_delta_equal_switch() -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    group.add(headed(model, "b", seed=2))
    alone = switched_logits(group, model, "a")
    # The head router calls the copy on the whole batch, as switch() does; the routed LoRA runs its own kernels
    # (two GEMMs per segment, where the attached site fuses the update): two computations, so a tolerance. They
    # agreed to the bit on an AVX-512 machine and not with default kernels (the CI's other-CPU pass).
    for path in ("segment", "gather"):
        with torch.no_grad(), group.route(["a"] * 4, path=path):
            routed = model(IDS).logits
        assert_same_function(routed, alone, model=model, note=path)
    assert not torch.equal(routed, switched_logits(group, model, None))  # the copy (perturbed) did run


def test_a_mixed_batch_runs_each_row_with_its_own_head() -> None:
    model = tiny_bert()
    bare = switched_logits(DeltaGroup(model), model, None)
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    group.add(headed(model, "b", seed=2))
    plain = LoraModel(model, name="plain", lora_r=2)  # no head of its own: its rows keep the backbone's
    perturb(plain, seed=3, scale=0.3)
    group.add(plain.detach())
    alone = {n: switched_logits(group, model, n) for n in ("a", "b", "plain", None)}
    assert torch.equal(alone[None], bare)
    for names in (["a", "b", None, "plain"], ["b", "a", "a", "b"], ["plain", "a", None, None], [None, "b", "b", "a"]):
        for path in ("auto", "gather", "segment"):
            with torch.no_grad(), group.route(names, path=path):
                out = model(IDS).logits
            assert_rows_alone(out, names, alone, model)
    # the rows really differ by head: a head-only difference shows on a row of "a" vs "b"
    assert not torch.allclose(alone["a"], alone["b"])
    with torch.inference_mode(), group.route(["a", "b", None, "plain"]):  # inference tensors are fine too
        assert_rows_alone(model(IDS).logits, ["a", "b", None, "plain"], alone, model)


def test_rows_of_a_headed_delta_next_to_none_rows_with_grad_enabled() -> None:
    # Routing is for eval mode, not for no_grad only: the rows are put together out of place, autograd sees it.
    model = tiny_bert()
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    alone = {n: switched_logits(group, model, n) for n in ("a", None)}
    copy_weight = group["a"].heads["classifier"].weight
    with group.route(["a", None, "a", None]):
        out = model(IDS).logits
    assert_rows_alone(out, ["a", None, "a", None], alone, model)
    out[0].sum().backward()
    assert copy_weight.grad is not None and copy_weight.grad.abs().sum() > 0


def test_a_delta_outside_the_group_on_the_head_between_group_deltas_is_refused() -> None:
    # Routed, the heads of "a" and "b" run at one place in the classifier's hook order; a LoRA on the classifier
    # created between them would then act on the wrong side of one of them.
    model = tiny_bert()
    group = DeltaGroup(model)
    first = headed(model, "a", seed=1)
    outside = LoraModel(model, name="outside", modified_modules=["classifier"], lora_r=2)
    group.add(first)
    group.add(headed(model, "b", seed=2))
    hooks = hook_counts(model)
    with pytest.raises(DeltaStateError, match="'classifier' a delta outside the group"):
        with group.route(["a", "b"]):
            pytest.fail("the block must not open")
    assert hook_counts(model) == hooks
    outside.detach()
    with torch.no_grad(), group.route(["a", "b"]):
        model(IDS[:2])


def outside_headed(model: nn.Module, name: str = "outside", **kwargs) -> LoraModel:
    """An attached LoRA outside any group with its own perturbed copy of the classifier."""
    return headed(model, name, seed=9, **kwargs).attach()


@pytest.mark.parametrize("outside_first", [False, True], ids=["outside_after", "outside_before"])
def test_an_outside_delta_with_a_copy_of_a_routed_head_is_refused_and_changes_nothing(outside_first: bool) -> None:
    # Both the outside delta's head hook and the group's head router replace the classifier's output; which one
    # decided a row depended on creation order. Before the refusal, with the outside delta created after "a",
    # the rows of "a" silently came out of the outside delta's classifier copy (its logits, not a's head's).
    model = tiny_bert()
    outside = outside_headed(model) if outside_first else None
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    outside = outside or outside_headed(model)
    with torch.no_grad():
        before = model(IDS).logits
    state, hooks = snapshot(model), hook_counts(model)
    refused = r"'outside'.*outside the group.*'classifier'.*Detach it.*add it to the group"
    with pytest.raises(DeltaStateError, match=refused), group.route(["a", None, "a", None]):
        pytest.fail("the block must not open")
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
    outside.detach()  # the fix the message names: then the block routes
    alone = {n: switched_logits(group, model, n) for n in ("a", None)}
    with torch.no_grad(), group.route(["a", None, "a", None]):
        assert_rows_alone(model(IDS).logits, ["a", None, "a", None], alone, model)


def test_an_outside_copy_of_a_module_holding_a_routed_head_is_refused() -> None:
    # The outside copy of "head" runs in place of the whole module, so the routed copies of "head.proj" inside the
    # original would never reach the output.
    model = _Toy().eval()
    group = DeltaGroup(model)
    inner = LoraModel(model, name="a", modified_modules=["body"], lora_r=2, modules_to_save=["head.proj"])
    perturb(inner, seed=1)
    group.add(inner.detach())
    outer = LoraModel(model, name="outer", modified_modules=["body"], lora_r=2, modules_to_save=["head"])
    perturb(outer, seed=2)
    with pytest.raises(DeltaStateError, match=r"'outer'.*'head'.*'head\.proj'"), group.route(["a", None]):
        pytest.fail("the block must not open")


def test_an_outside_delta_with_a_head_applies_to_every_row_when_the_block_routes_no_head_there() -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    plain = LoraModel(model, name="plain", lora_r=2)  # no copy of the classifier
    perturb(plain, seed=3, scale=0.3)
    group.add(plain.detach())
    outside = outside_headed(model)
    # Like any attached delta outside the group, its head runs for every row, switched or routed.
    alone = {n: switched_logits(group, model, n) for n in ("plain", None)}
    outside.detach()
    bare = switched_logits(group, model, None)
    outside.attach()
    assert not torch.equal(alone[None], bare)  # its head (and LoRA) did run
    names = ["plain", None, None, "plain"]
    for path in ("gather", "segment"):
        with torch.no_grad(), group.route(names, path=path):
            assert_rows_alone(model(IDS).logits, names, alone, model)
    # a row of "a" would route a head on the classifier: refused, whatever the other rows
    with pytest.raises(DeltaStateError, match="'outside'"), group.route(["plain", "a", None, None]):
        pytest.fail("the block must not open")


# ---------------------------------------------------------------------------------------------- head sizes
@pytest.fixture
def labelled(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    return {
        "topic": save_labelled(tmp_path / "topic", 6, seed=11),
        "news": save_labelled(tmp_path / "news", 6, seed=12),
        "spam": save_labelled(tmp_path / "spam", 2, seed=13),
    }


def test_six_label_heads_route_together_on_a_two_label_backbone(labelled) -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    for name in ("topic", "news"):
        group.load(name, labelled[name])
    alone = {n: switched_logits(group, model, n) for n in ("topic", "news")}
    assert alone["topic"].shape == (4, 6)
    names = ["news", "topic", "topic", "news"]
    with torch.no_grad(), group.route(names):
        out = model(IDS).logits
    assert out.shape == (4, 6)
    assert_rows_alone(out, names, alone, model)


def test_heads_of_different_shapes_in_one_batch_are_refused_naming_them(labelled) -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    for name in ("topic", "spam"):
        group.load(name, labelled[name])
    group.switch("spam")
    with torch.no_grad():
        before = model(IDS).logits
    state, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(DeltaError, match=r"'classifier'.*'topic' -> .*\[6, 32\].*'spam' -> .*\[2, 32\].*separate"):
        with group.route(["topic", "spam", "topic", "spam"]):
            pytest.fail("the block must not open")
    # a None row runs the backbone's own 2-label head: refused next to a 6-label copy too
    with pytest.raises(DeltaError, match=r"'topic' -> .*\[6\].*None \(the backbone's own head\) -> .*\[2\]"):
        with group.route(["topic", None]):
            pytest.fail("the block must not open")
    # nothing changed: the switched delta is still the attached one, same tensors, same hooks, same outputs
    assert group.active == ["spam"]
    assert_state_equal(model, state)
    assert hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
        with group.route(["spam", None, "spam", None]):  # same shapes: fine
            model(IDS)


def test_a_registered_delta_with_a_head_routes_after_a_miss(labelled, tmp_path) -> None:
    model = tiny_bert()
    group = DeltaGroup(model, max_active=2)
    for name in ("topic", "news", "spam"):
        group.register(name, labelled[name])
    alone = {n: switched_logits(group, model, n) for n in ("topic", "news")}
    for names in (["news", "topic", "news", "topic"], ["topic", "topic", "news", "news"]):
        group.switch("spam")  # "spam" materialised: the next block misses (and drops one)
        group.switch(None)
        with torch.no_grad(), group.route(names):
            out = model(IDS).logits
        assert_rows_alone(out, names, alone, model)
    assert group.store_stats["misses"] >= 4 and group.store_stats["evictions"] >= 2
    # the shape check runs on what a miss loaded: "spam" (2 labels) next to "topic" (6) is refused
    assert "spam" not in group.resident
    state = snapshot(model)
    with pytest.raises(DeltaError, match=r"'spam' -> .*\[2, 32\]"):
        with group.route(["topic", "spam"]):
            pytest.fail("the block must not open")
    assert_state_equal(model, state)


# ---------------------------------------------------------------------------------------------- generation
def test_generate_routes_an_lm_head_copy_per_row() -> None:
    model = tiny_gpt2()  # lm_head is tied to the embeddings: each copy owns its weight
    group = DeltaGroup(model)
    for name, seed in (("a", 1), ("b", 2)):
        group.add(headed(model, name, seed=seed, head="lm_head", modified_modules=["c_attn"]))
    assert group["a"].heads["lm_head"].weight is not model.transformer.wte.weight
    ids = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7))
    names = ["a", "b", None]
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "output_scores": True,
          "return_dict_in_generate": True, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), group.route(names):
        mixed = model.generate(input_ids=ids, **kw)
    sequences = set()
    for row, name in enumerate(names):
        group.switch(name)
        with torch.no_grad():
            alone = model.generate(input_ids=ids[row:row + 1], **{**kw, "attention_mask": kw["attention_mask"][:1]})
        assert torch.equal(mixed.sequences[row], alone.sequences[0]), name
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):
            assert_same_function(step_mixed[row], step_alone[0], model=model, note=f"{name}")
        sequences.add(tuple(alone.sequences[0, 5:].tolist()))
    group.switch(None)
    assert len(sequences) > 1  # the heads lead to different continuations


# ---------------------------------------------------------------------------------------------- threads, dtype
def test_two_threads_route_different_head_deltas_at_once() -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        group.add(headed(model, name, seed=seed))
    alone = {n: switched_logits(group, model, n) for n in ("a", "b", "c", None)}
    batches = {0: ["a", "b", None, "a"], 1: ["c", "c", "b", None]}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def body(i: int) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(15):
                with torch.no_grad(), group.route(batches[i]):
                    out = model(IDS).logits
                assert_rows_alone(out, batches[i], alone, model)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors[:2]


def test_head_copies_follow_a_model_moved_to_float64_while_detached() -> None:
    model = tiny_bert()
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    group.add(headed(model, "b", seed=2))
    model.to(torch.float64)  # the detached copies stay float32 until used
    assert group["a"].heads["classifier"].weight.dtype == torch.float32
    names = ["b", None, "a", "b"]
    with torch.no_grad(), group.route(names):
        out = model(IDS).logits
    assert out.dtype == torch.float64
    assert group["a"].heads["classifier"].weight.dtype == torch.float64
    alone = {n: switched_logits(group, model, n) for n in ("a", "b", None)}
    assert_rows_alone(out, names, alone, model)


# ---------------------------------------------------------------------------------------------- odd heads
class _PairHead(nn.Module):
    """A head returning two tensors (rows cannot be put back together)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.proj(x)
        return y, -y


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 8)
        self.head = _PairHead()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x))


def test_a_head_returning_several_tensors_is_refused_when_rows_must_be_merged() -> None:
    model = _Toy().eval()
    group = DeltaGroup(model)
    delta = LoraModel(model, name="a", modified_modules=["body"], lora_r=2, modules_to_save=["head"])
    perturb(delta, seed=1)
    group.add(delta.detach())
    x = torch.randn(4, 8)
    with torch.no_grad(), group.route(["a"] * 4, path="segment"):  # one delta on every row: the copy's own call
        whole = model(x)
    group.switch("a")
    with torch.no_grad():
        assert all(torch.equal(w, s) for w, s in zip(whole, model(x)))
    group.switch(None)
    with pytest.raises(DeltaError, match=r"'head' returned tuple for 2 rows, not one tensor"):
        with torch.no_grad(), group.route(["a", None, "a", None]):
            model(x)
    with torch.no_grad():  # the block closed cleanly: the bare model runs
        model(x)


def test_a_switched_composite_with_a_head_copy_is_the_group_s_own_not_an_outside_delta() -> None:
    # The composite is in the group; the block takes it off like any switched delta. Its member's head copy was
    # taken for an outside delta's (only the composite itself was looked at) and the block was refused, naming
    # the member as "outside the group".
    model = tiny_bert()
    group = DeltaGroup(model)
    group.add(headed(model, "a", seed=1))
    member = LoraModel(model, name="member", lora_r=2, modules_to_save=["classifier"])
    perturb(member, seed=4, scale=0.3)
    group.add(CompositeDelta([member.detach()], name="comp"))
    names = ["a", None, "a", None]
    alone = {n: switched_logits(group, model, n) for n in ("a", None)}
    group.switch("comp")
    with torch.no_grad(), group.route(names):
        assert_rows_alone(model(IDS).logits, names, alone, model)
    assert member.state == "attached"  # put back when the block closed
