"""freeze_module, parameters, set_state_dict, merging beside other deltas, names, visualization, CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from deltakit import BitFitModel, DeltaError, DeltaStateError, LoraModel, ModuleMatchError, Visualization
from deltakit.cli import main as cli_main

from tests.tolerances import assert_same_function, assert_same_gradients
from tests.helpers import ARCHS, assert_state_equal, hook_counts, perturb, snapshot, tiny_bert, tiny_gpt2


def test_parameters_are_exactly_this_deltas_own() -> None:
    model = tiny_bert()
    first = LoraModel(model, modified_modules=["query"], lora_r=4)
    second = BitFitModel(model, modified_modules=["query", "key"])
    names = [n for n, _ in first.named_parameters()]
    assert names == [
        f"bert.encoder.layer.{i}.attention.self.query.lora.lora_{ab}" for i in range(2) for ab in "AB"
    ]
    model_params = dict(model.named_parameters())
    for name, param in first.named_parameters():
        assert model_params[name] is param  # names are the backbone's names while attached
    assert {id(p) for p in first.parameters()}.isdisjoint({id(p) for p in second.parameters()})
    assert first.num_delta_parameters() == 2 * (4 * 32 + 32 * 4)
    assert second.num_delta_parameters() == 4 * 32


def test_freeze_module_by_identity_idempotent_and_deltas_means_this_delta() -> None:
    model = tiny_bert()
    first = LoraModel(model, modified_modules=["query"])
    second = LoraModel(model, modified_modules=["value"])
    second.freeze_module(exclude=["deltas", "classifier"])
    trainable = set(second.trainable_parameters_names())
    assert trainable == {n for n, _ in second.named_parameters()} | {"classifier.weight", "classifier.bias"}
    assert not any(p.requires_grad for p in first.parameters())  # "deltas" is the caller's own delta
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    second.freeze_module(exclude=["deltas", "classifier"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert second.unfrozen_parameter_names == ["classifier.weight", "classifier.bias"]
    with pytest.raises(ModuleMatchError, match="freeze_module exclude pattern 'clasifier'"):
        second.freeze_module(exclude=["deltas", "clasifier"])
    first.freeze_module()  # default: the config's unfrozen_modules == ["deltas"]
    assert set(first.trainable_parameters_names()) == {n for n, _ in first.named_parameters()}


def test_set_state_dict_keeps_only_trainable_tensors_until_detach() -> None:
    model = tiny_bert()
    full_keys = list(model.state_dict())
    delta = LoraModel(model)
    attached_keys = list(model.state_dict())
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    assert list(model.state_dict()) == delta.trainable_parameters_names()
    assert "classifier.weight" in model.state_dict()
    delta.detach()
    assert list(model.state_dict()) == full_keys and hook_counts(model) == hook_counts(tiny_bert())
    delta.attach()  # the flag is remembered
    assert list(model.state_dict()) == delta.trainable_parameters_names()
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    assert list(model.state_dict()) == attached_keys

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    delta.freeze_module(set_state_dict=True)
    assert list(Wrapper(model).state_dict()) == [f"inner.{n}" for n in delta.trainable_parameters_names()]


def test_merge_beside_other_deltas_is_well_defined() -> None:
    arch = ARCHS["bert"]
    model = arch.build()
    base_weights = snapshot(model)
    first = LoraModel(model, lora_r=4)
    second = LoraModel(model, lora_r=2)
    perturb(first, seed=1, scale=0.1)
    perturb(second, seed=2, scale=0.1)
    both = arch.run(model)
    with pytest.raises(DeltaStateError, match="applied before it"):
        second.merge()  # first is applied before second on the same hosts
    first.merge()
    assert_same_function(arch.run(model), both, model=model)  # merged vs hooked: two computations
    second.merge()
    assert_same_function(arch.run(model), both, model=model)  # merged vs hooked: two computations
    with pytest.raises(DeltaStateError, match="reverse"):
        first.unmerge()  # exact unmerge must go in reverse order
    second.unmerge()
    first.unmerge()
    assert torch.equal(arch.run(model), both)
    second.detach()
    first.detach()
    assert_state_equal(model, base_weights)


def test_attach_refuses_to_go_under_a_later_delta_merged_on_the_same_host() -> None:
    """An earlier delta re-attached after a later one was merged would act on the merged weight, i.e. after it."""
    from deltakit import AdapterModel

    arch = ARCHS["bert"]
    model = arch.build()
    adapter = AdapterModel(model, modified_modules=["attention.output.dense"])  # created first: applied first
    lora = LoraModel(model, modified_modules=["attention.output.dense"])
    perturb(adapter, seed=1)
    perturb(lora, seed=2)
    with torch.no_grad():
        both = arch.run(model)
        adapter.detach()
        lora.merge()  # legal: nothing is applied before it now
        state, hooks = snapshot(model), hook_counts(model)
        with pytest.raises(DeltaStateError, match="created after it is merged.*unmerge\\(\\) that delta first"):
            adapter.attach()
        assert adapter.state == "detached"
        assert_state_equal(model, state)
        assert hook_counts(model) == hooks
        lora.unmerge()
        adapter.attach()  # the documented order again
        assert torch.equal(arch.run(model), both)
        # merging the later delta while the earlier one is attached stays refused, as before
        with pytest.raises(DeltaStateError, match="applied before it"):
            lora.merge()
        # a delta created after the merged one may be (re-)attached: it applies after the merged weight anyway
        adapter.detach()
        lora.merge()
        later = LoraModel(model, modified_modules=["attention.output.dense"], name="later")
        later.detach()
        later.attach()
        assert later.state == "attached"


def test_user_forward_hooks_keep_their_place_across_detach_and_attach() -> None:
    """deltakit's forward hook is innermost: a user hook sees the output with the delta, before and after a
    detach/attach or a switch, whenever it was registered."""
    from deltakit import AdapterModel, DeltaGroup

    arch = ARCHS["bert"]
    model = arch.build()
    host = model.bert.encoder.layer[0].attention.output.dense
    seen: list[torch.Tensor] = []

    def early(module, args, out):  # registered before the delta exists
        return out * 1.5

    def late(module, args, out):  # registered while the delta is attached
        seen.append(out.detach().clone())
        return out * 2

    host.register_forward_hook(early)
    delta = AdapterModel(model, modified_modules=["attention.output.dense"])
    perturb(delta)
    host.register_forward_hook(late)
    with torch.no_grad():
        before, captured = arch.run(model), seen[-1]
        delta.detach()
        delta.attach()
        assert torch.equal(arch.run(model), before)
        assert torch.equal(seen[-1], captured)
        group = DeltaGroup(model)
        group.add(delta)
        group.switch(None)
        group.switch(delta.name)
        assert torch.equal(arch.run(model), before)
        # and the hooks see the delta: removing the delta changes what they capture
        group.switch(None)
        arch.run(model)
        assert not torch.equal(seen[-1], captured)


def test_inexact_unmerge_subtracts() -> None:
    arch = ARCHS["llama"]
    model = arch.build()
    delta = LoraModel(model)
    perturb(delta, scale=0.1)
    weights = snapshot(model)
    delta.merge(exact_unmerge=False)
    delta.unmerge()
    for key, value in model.state_dict().items():
        # W + s B A - s B A: two roundings of numbers of W's size (a rank-8 product added and taken away)
        assert_same_function(value, weights[key], depth=2, reduction=delta.config.lora_r)


def test_name_collisions_and_explicit_names() -> None:
    model = tiny_bert()
    named = LoraModel(model, modified_modules=["query"], name="sentiment")
    assert named.child_name == "sentiment" and hasattr(model.bert.encoder.layer[0].attention.self.query, "sentiment")
    with pytest.raises(DeltaError, match="already used"):
        LoraModel(model, modified_modules=["query"], name="sentiment")
    with pytest.raises(DeltaError, match="identifier"):
        LoraModel(model, modified_modules=["query"], name="a.b")
    named.detach()
    squatter = LoraModel(model, modified_modules=["query"], name="sentiment")
    with pytest.raises(DeltaStateError, match="already has an attribute"):
        named.attach()
    assert named.state == "detached" and squatter.state == "attached"


def test_lora_matches_peft_given_the_same_factors() -> None:
    peft = pytest.importorskip("peft")
    cases = [
        (tiny_bert, ["query", "value", "word_embeddings"], lambda m: m(torch.randint(2, 100, (2, 6))).logits),
        (tiny_gpt2, ["c_attn", "c_fc", "wte"], lambda m: m(torch.randint(2, 100, (2, 6))).logits),
    ]
    for build, targets, run in cases:
        ours = build()
        delta = LoraModel(ours, modified_modules=targets, lora_r=4, lora_alpha=8)
        perturb(delta, scale=0.3)
        theirs = peft.get_peft_model(
            build(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
        ).eval()
        with torch.no_grad():
            for site in delta.sites:
                layer = theirs.base_model.model.get_submodule(site.name)
                if isinstance(site.host, nn.Embedding):
                    layer.lora_embedding_A["default"].copy_(site.module.lora_A)
                    layer.lora_embedding_B["default"].copy_(site.module.lora_B)
                else:
                    layer.lora_A["default"].weight.copy_(site.module.lora_A)
                    layer.lora_B["default"].weight.copy_(site.module.lora_B)
        torch.manual_seed(0)
        x = run(ours)
        torch.manual_seed(0)
        y = run(theirs)
        assert_same_function(x, y, model=ours)  # deltakit vs PEFT: two computations
        assert not torch.allclose(x, run(build()), atol=1e-3)


def test_visualization_marks_deltas_and_works_on_a_meta_7b(capsys) -> None:
    model = tiny_bert()
    delta = LoraModel(model)
    tree = Visualization(model).structure_graph(printTree=False)
    text = str(tree.children[0].children)  # rich trees render labels lazily; check the content directly
    delta.log()
    out = capsys.readouterr().out
    assert "lora (LoraSite)" in out and "lora_A:[8, 32]" in out
    assert "this delta" in out and "trainable" in out and text
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        big = LlamaForCausalLM(config)
    big_delta = LoraModel(big, lora_r=16)
    assert all(p.is_meta for p in big_delta.parameters())
    assert big_delta.num_delta_parameters() == 32 * 2 * 16 * (4096 + 4096)
    big_delta.log()
    out = capsys.readouterr().out
    assert "0-31" in out and "6.74B" in out


def test_cli_usage_errors_exit_2(capsys) -> None:
    assert cli_main([]) == 2
    with pytest.raises(SystemExit) as info:
        cli_main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0
    assert "deltakit" in capsys.readouterr().out


def test_lora_initialisation_and_dropout_only_in_training() -> None:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4, lora_dropout=0.5)
    for site in delta.sites:
        assert torch.equal(site.module.lora_B, torch.zeros(32, 4))
        bound = 1 / 32**0.5  # Kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert site.module.lora_A.abs().max() <= bound and site.module.lora_A.std() > bound / 4
    perturb(delta)
    x = torch.randint(2, 100, (2, 6))
    assert torch.equal(model(x).logits, model(x).logits)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    first = model.bert(x).last_hidden_state
    torch.manual_seed(1)
    assert not torch.equal(first, model.bert(x).last_hidden_state)


def test_exact_unmerge_refuses_after_the_merged_weight_was_trained() -> None:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"])
    perturb(delta)
    delta.merge()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)  # e.g. an optimizer step
    with pytest.raises(DeltaStateError, match="modified after the merge"):
        delta.unmerge()
    assert delta.state == "merged"


def test_in_place_update_never_changes_an_output_a_user_hook_kept() -> None:
    model = tiny_bert()
    host = model.bert.encoder.layer[0].attention.self.query
    before_ours, after_ours = [], []
    x = torch.randint(2, 100, (2, 6))
    delta = LoraModel(model, modified_modules=["query"])
    perturb(delta)
    delta.detach()
    base = model(x).logits
    host_output = host(model.bert.embeddings(x)).clone()
    delta.attach()
    # a hook put in front of deltakit's (prepend=True) sees the host's own output; deltakit updates outputs in
    # place, so it must give the deltas a copy and leave the user's tensor alone
    host.register_forward_hook(lambda m, a, out: before_ours.append(out), prepend=True)
    host.register_forward_hook(lambda m, a, out: after_ours.append(out))  # an ordinary hook runs after the delta
    attached = model(x).logits
    assert torch.equal(before_ours[-1], host_output)  # the user's tensor is the host's own output, untouched
    assert not torch.equal(after_ours[-1], host_output)  # ... while ordinary hooks see the delta applied
    assert not torch.allclose(attached, base)
    delta.detach()
    assert torch.equal(model(x).logits, base)


def test_lora_under_autocast_matches_the_out_of_place_formula() -> None:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"])
    perturb(delta)
    x = torch.randint(2, 100, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x).logits
    # bf16 has no useful worst-case bound here (it exceeds the values): check only that autocast runs the delta
    # and gives values of the right size (docs/contributing.md, "Exactness")
    torch.testing.assert_close(mixed.float(), model(x).logits, rtol=0.05, atol=0.05)


def test_low_rank_update_gradients_are_exact_in_every_path() -> None:
    from deltakit.deltas.lora import add_low_rank

    torch.manual_seed(0)
    for make_view in (False, True):  # without / with bias: a 3-D Linear output with bias is a view of a 2-D result
        base_x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(4, dtype=torch.float64)
        A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
        B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

        def fn(x, w, a, b):
            out = torch.nn.functional.linear(x, w, bias if make_view else None)
            assert out._is_view() == make_view
            return add_low_rank(out, torch.nn.functional.linear(x, a), b, 0.7)

        assert torch.autograd.gradcheck(fn, (base_x, weight, A, B))
        reference = torch.nn.functional.linear(base_x, weight, bias if make_view else None) + 0.7 * (base_x @ A.T) @ B.T
        torch.testing.assert_close(fn(base_x, weight, A, B), reference)


# ----------------------------------------------------------------------------- sibling sites sharing one input


def _without_sharing(delta: LoraModel) -> dict:
    removed = {}
    for site in delta.sites:
        removed[id(site.module)] = site.module.__dict__.pop("shared_input", None)
    return removed


def _forward_backward(model: nn.Module, delta: LoraModel, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in delta.parameters():
        p.grad = None
    out = run(model)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), [p.grad.clone() for p in delta.parameters()]


@pytest.mark.parametrize("arch_name", ["bert", "llama", "t5"])
def test_sibling_sites_share_one_projection_with_the_same_results(arch_name) -> None:
    """q and v read the same tensor: one GEMM over [A_q; A_v]; results equal separate projections (allclose), also
    where the siblings read different tensors (T5 cross-attention: q the decoder, v the encoder states)."""
    arch = ARCHS[arch_name]
    model = arch.build().double()  # fp64: the comparison is about the computation, not fp32 summation order
    delta = LoraModel(model, modified_modules=["attn.q", "attn.k", "attn.v"], lora_r=2)
    perturb(delta)
    groups = {id(s.module.__dict__["shared_input"]) for s in delta.sites if "shared_input" in s.module.__dict__}
    assert groups and all("shared_input" in s.module.__dict__ for s in delta.sites)
    shared_out, shared_grads = _forward_backward(model, delta, arch.run)
    assert all(s.module.__dict__["shared_input"].pending is None for s in delta.sites)  # nothing kept alive
    # self-attention k and v reuse q's GEMM (2 per block); in T5's cross-attention q reads the decoder, k and v the
    # encoder states: v reuses k's GEMM (1 per block)
    calls = sum(g.shared_calls for g in {id(s.module.__dict__["shared_input"]): s.module.__dict__["shared_input"]
                                         for s in delta.sites}.values())
    blocks = sum(1 for s in delta.sites if s.name.endswith((".q", ".query", ".q_proj")))
    cross = sum(1 for s in delta.sites if "EncDecAttention.q" in s.name)
    assert calls == 2 * (blocks - cross) + cross
    again, _ = _forward_backward(model, delta, arch.run)
    assert torch.equal(again, shared_out)  # the arithmetic of a call does not depend on earlier calls
    _without_sharing(delta)
    plain_out, plain_grads = _forward_backward(model, delta, arch.run)
    # one GEMM over [A_q; A_v] vs one per member: two computations, equal to fp64 rounding
    tokens = sum(v.numel() for v in arch.inputs().values())
    assert_same_function(shared_out, plain_out, model=model, tokens=tokens)
    assert_same_gradients(shared_grads, plain_grads, model=model, tokens=tokens)


class _CallsVFirst(nn.Module):
    """q is defined (module order) after v but called first; the same input tensor object every time."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Linear(8, 8)
        self.q = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) + 2 * self.v(x)


def _by_hand(model: _CallsVFirst, delta: LoraModel, x: torch.Tensor) -> torch.Tensor:
    out = []
    for host in (model.q, model.v):
        site = next(s.module for s in delta.sites if s.host is host)
        out.append(nn.functional.linear(x, host.weight, host.bias) + site.scaling * (x @ site.lora_A.T) @ site.lora_B.T)
    return out[0] + 2 * out[1]


def test_sharing_never_reuses_a_projection_from_an_earlier_pass() -> None:
    """A member called before the module-order first one, with the same input object every pass: its projection
    must come from the current pass (current A, live graph), not from the previous forward."""
    torch.manual_seed(0)
    model = _CallsVFirst()
    delta = LoraModel(model, modified_modules=["q", "v"], lora_r=2)
    perturb(delta)
    x = torch.randn(3, 8)
    with torch.no_grad():
        model(x)
        model(x)
        delta.sites[1].module.lora_A.mul_(0.5)  # sites in model order: v, q
        assert_same_function(model(x), _by_hand(model, delta, x), model=model)
    # full-batch training on one fixed input tensor: every step backpropagates through its own graph
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        expected = _by_hand(model, delta, x).pow(2).mean()
        assert_same_function(loss, expected, model=model, tokens=x.numel())
        optimizer.step()
    group = delta.sites[0].module.__dict__["shared_input"]
    assert group.pending is None and group.shared_calls > 0  # shared within each pass, nothing kept after it


def test_a_follower_whose_input_changed_in_place_computes_its_own_projection() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            x.mul_(2.0)  # the same object, modified: v must not reuse q's projection of the old values
            return q + self.v(x)

    torch.manual_seed(0)
    model = Block()
    delta = LoraModel(model, modified_modules=["q", "v"], lora_r=2)
    perturb(delta)
    assert delta.sites[0].module.__dict__["shared_input"] is delta.sites[1].module.__dict__["shared_input"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = model(x.clone())
        expected = (
            model.q(x) + model.v(2 * x)  # each host alone, hooks included
        )
    assert_same_function(out, expected, model=model)
    _without_sharing(delta)
    with torch.no_grad():
        assert_same_function(model(x.clone()), out, model=model)


def test_lora_on_a_resized_embedding_says_what_happened() -> None:
    model = ARCHS["llama"].build()
    delta = LoraModel(model, modified_modules=["embed_tokens"])
    model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + 20)
    with pytest.raises(DeltaStateError, match="built for an embedding of .* rows, but the module now has"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    delta.detach()  # the backbone itself still works
    model(input_ids=torch.tensor([[5, 6, 7]]))


def test_merge_refuses_a_host_the_model_replaced() -> None:
    """resize_token_embeddings() on an untied output layer replaces the module: merging into the orphan would be
    silently meaningless."""
    model = ARCHS["llama"].build()
    delta = LoraModel(model, modified_modules=["lm_head"])
    perturb(delta)
    old_head = model.lm_head
    model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + 20)
    assert model.lm_head is not old_head
    state = snapshot(model)
    with pytest.raises(DeltaStateError, match="no longer part of the model .*resize_token_embeddings"):
        delta.merge()
    assert delta.state == "attached"
    assert_state_equal(model, state)


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_a_copied_model_with_shared_lora_projections_runs_and_matches(copy_kind: str) -> None:
    import copy
    import io

    arch = ARCHS["t5"]
    model = arch.build()
    delta = LoraModel(model, modified_modules=["attn.q", "attn.k", "attn.v"])
    perturb(delta)
    with torch.no_grad():
        expected = arch.run(model)
    if copy_kind == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(arch.run(clone), expected)
        assert torch.equal(arch.run(model), expected)


def test_freeze_module_can_keep_another_delta_trainable() -> None:
    from deltakit import AdapterModel

    model = tiny_bert()
    lora = LoraModel(model)
    adapter = AdapterModel(model)
    lora.freeze_module(exclude=["deltas", adapter, "classifier"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*lora.parameters(), *adapter.parameters(), *model.classifier.parameters()]}
    adapter.freeze_module(exclude=lora)  # a single delta object works too; "deltas" not given: adapter frozen
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora.parameters()}


@pytest.mark.parametrize("alpha", [0, -8, 0.0])
def test_lora_alpha_must_be_positive(alpha) -> None:
    from deltakit.errors import DeltaConfigError

    model = tiny_bert()
    state = snapshot(model)
    with pytest.raises(DeltaConfigError, match="lora_alpha must be > 0"):
        LoraModel(model, lora_alpha=alpha)
    assert_state_equal(model, state)


def test_inexact_unmerge_refuses_when_the_delta_changed_while_merged() -> None:
    model = tiny_bert()
    delta = LoraModel(model)
    perturb(delta)
    original = snapshot(model)
    delta.merge(exact_unmerge=False)
    merged = snapshot(model)
    with torch.no_grad():
        delta.sites[0].module.lora_B.mul_(2.0)  # e.g. an optimizer step with momentum while merged
    with pytest.raises(DeltaStateError, match="exact_unmerge=False.*parameters changed since the merge"):
        delta.unmerge()
    assert delta.state == "merged"
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in merged.items() if ".lora." not in k)  # backbone untouched
    with torch.no_grad():
        delta.sites[0].module.lora_B.div_(2.0)  # restored values: a new version, same numbers
    with pytest.raises(DeltaStateError, match="parameters changed"):
        delta.unmerge()  # versions, not values, are compared: still refused, nothing changed
    delta2 = LoraModel(tiny_bert())
    delta2.merge(exact_unmerge=False)
    delta2.unmerge()  # unchanged parameters: allowed
    assert len(original) == len(merged)
