"""Prefix tuning of a small causal LM: a frozen random Llama learns to continue a pattern it could not before.

The backbone is a randomly initialised Llama (grouped-query attention: 4 query heads, 2 key/value heads) that is
never trained: only the prefix is (Li & Liang 2021, with the MLP reparameterization). The pattern is a fixed cycle
of tokens, e.g. ``3 7 1 12 3 7 1 12 ...``; the model is prompted with two consecutive tokens of the cycle (any
phase) and must continue it with ``generate()`` (greedy, KV cache). Before training it continues at chance level;
after training the prefix alone makes it follow the cycle. The prefix works as a small key-value memory: each query
(which depends on the current token) picks the prefix positions whose values push the next token.

Finally the reparameterization MLP is folded into plain prefixes for deployment
(:meth:`deltakit.PrefixModel.fold_reparameterization`): generation is unchanged, token for token, and the saved
delta holds only ``n`` key/value vectors per layer.

Run:  python examples/prefix_generation.py          (200 steps, about a minute on two CPU cores)
      python examples/prefix_generation.py --tiny   (40 steps; what the tests run)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch import nn

from deltakit import AutoDeltaModel, PrefixModel

CYCLE = [3, 7, 1, 12, 9]
VOCAB = 16


def build_backbone(seed: int = 0) -> nn.Module:
    """A random Llama with grouped-query attention (never trained here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=15, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def cycle_batch(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` stretches of the cycle of ``length`` tokens, each starting at a random phase."""
    phases = torch.randint(0, len(CYCLE), (batch,), generator=generator)
    cycle = torch.tensor(CYCLE)
    return cycle[(phases[:, None] + torch.arange(length)[None, :]) % len(CYCLE)]


def continuation_accuracy(model: nn.Module, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy continuation of every 2-token prompt of the cycle; the share of generated tokens that are right."""
    cycle = torch.tensor(CYCLE)
    prompts = torch.stack([cycle[[p, (p + 1) % len(CYCLE)]] for p in range(len(CYCLE))])
    out = model.generate(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip
    expected = cycle[(torch.arange(len(CYCLE))[:, None] + 2 + torch.arange(new_tokens)[None, :]) % len(CYCLE)]
    generated = out[:, 2:]
    return (generated == expected).float().mean().item(), out


def main(argv: list[str] | None = None) -> int:
    """Train the prefix and report accuracy before / after; returns 0 when the prefix learned the pattern."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fewer steps (seconds)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = args.steps or (40 if args.tiny else 200)
    new_tokens = 8

    model = build_backbone(args.seed)
    before, _ = continuation_accuracy(model, new_tokens)
    torch.manual_seed(args.seed + 1)
    delta = PrefixModel(model, prefix_token_num=8, embed_dim=64, mid_dim=128)
    delta.freeze_module(exclude=["deltas"])
    print(f"backbone: random Llama, {sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen "
          f"parameters; prefix: {delta.num_delta_parameters():,} trainable (8 tokens, MLP 64->128->K/V)")  # fmt: skip
    print(f"cycle {CYCLE}: greedy continuation accuracy before training {before:.2f} (chance ~{1 / VOCAB:.2f})")

    optimizer = torch.optim.AdamW(delta.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        batch = cycle_batch(32, 12, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    after, generated = continuation_accuracy(model, new_tokens)
    print(f"after {steps} steps ({time.perf_counter() - t0:.1f}s): continuation accuracy {after:.2f}")
    for row in generated[:2]:
        print("  prompt", row[:2].tolist(), "->", row[2:].tolist())

    # Deployment: keep the computed prefixes, drop the MLP; generation is unchanged token for token.
    mlp_parameters = delta.num_delta_parameters()
    delta.fold_reparameterization()
    folded, folded_out = continuation_accuracy(model, new_tokens)
    same = torch.equal(folded_out, generated)
    with tempfile.TemporaryDirectory() as tmp:
        delta.save_finetuned(tmp)
        fresh = build_backbone(args.seed)
        AutoDeltaModel.from_finetuned(tmp, backbone_model=fresh)
        reloaded_same = torch.equal(continuation_accuracy(fresh, new_tokens)[1], generated)
    print(f"folded for deployment: {mlp_parameters:,} -> {delta.num_delta_parameters():,} parameters; same tokens: "
          f"{same}; reloaded into a fresh backbone, same tokens: {reloaded_same}")  # fmt: skip
    learned = after >= 0.9 and before <= 0.5
    print("learned the pattern" if learned else "did NOT learn the pattern")
    return 0 if learned and same and reloaded_same else 1


if __name__ == "__main__":
    sys.exit(main())
