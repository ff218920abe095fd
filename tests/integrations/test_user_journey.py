"""Issue 12's scripted user journey on the real MiniLM: tasks each with its own classifier head (sentiment and
question-vs-statement with two labels, topic with more), trained with DeltaTrainer, saved, loaded in a fresh process
with one call each, served with switch() and routed per sample with route() (a mixed batch of the two-label tasks,
heads included), one deployed with merge_and_unload() and reloaded as a plain transformers model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import REPO_ROOT

TASKS = ("sentiment", "topic", "question")

# Runs in a fresh interpreter: nothing of the training process (modules, deltas, caches) is reused.
SERVE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from deltakit import AutoDeltaModelForSequenceClassification, DeltaError, DeltaGroup
    from deltakit.site import DeltaSite

    root, model_path = sys.argv[1], sys.argv[2]
    spec = json.load(open(f"{root}/spec.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    out = {}
    with torch.no_grad():
        for task in spec["tasks"]:
            batch = tokenizer(spec["texts"][task], padding=True, return_tensors="pt")
            delta = AutoDeltaModelForSequenceClassification.from_pretrained(f"{root}/{task}")   # one call each
            out[f"one_call/{task}"] = delta.backbone_model.eval()(**batch).logits.tolist()

        # Serve both on one backbone: the second checkpoint joins the first one's model, then switch.
        first = AutoDeltaModelForSequenceClassification.from_pretrained(f"{root}/{spec['tasks'][0]}", name="first")
        model = first.backbone_model.eval()
        first.detach()
        group = DeltaGroup(model)
        for task in spec["tasks"]:
            group.load(task, f"{root}/{task}")
        for task in [*spec["tasks"], spec["tasks"][0]]:
            group.switch(task)
            batch = tokenizer(spec["texts"][task], padding=True, return_tensors="pt")
            out[f"switch/{task}"] = model(**batch).logits.tolist()

        # Route per sample: each row runs its own delta's head. The backbone was built with the first task's labels,
        # so that task's rows and None rows (the backbone's own head) share one head shape and route together; the
        # second task's head has more labels: its rows route together, next to the first task's they are refused.
        first_task, second_task, third_task = spec["tasks"]
        # A mixed batch of the two two-label tasks and the bare backbone: row i takes text i of its task.
        names = [(first_task, third_task, None)[i % 3] for i in range(len(spec["texts"][first_task]))]
        texts = [spec["texts"][n or first_task][i] for i, n in enumerate(names)]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        group.switch(None)
        out["bare/mixed"] = model(**batch).logits.tolist()
        with group.route(names):
            out["route/mixed"] = model(**batch).logits.tolist()
        out["route/names"] = names
        batch = tokenizer(spec["texts"][second_task], padding=True, return_tensors="pt")
        with group.route([second_task] * len(spec["texts"][second_task])):
            out[f"route/{second_task}"] = model(**batch).logits.tolist()
        try:
            with group.route([first_task, second_task]):
                pass
        except DeltaError as exc:
            out["route/refused"] = str(exc)

        # Deploy one as a plain model (on a backbone built with that task's labels) and reload it.
        task = spec["tasks"][1]
        plain = AutoDeltaModelForSequenceClassification.from_pretrained(f"{root}/{task}").merge_and_unload().eval()
        assert not any(isinstance(m, DeltaSite) for m in plain.modules())
        plain.save_pretrained(f"{root}/deployed")
        reloaded = AutoModelForSequenceClassification.from_pretrained(f"{root}/deployed").eval()
        batch = tokenizer(spec["texts"][task], padding=True, return_tensors="pt")
        out[f"deployed/{task}"] = reloaded(**batch).logits.tolist()
        out["deployed_keys_equal"] = list(reloaded.state_dict()) == list(plain.state_dict())
    json.dump(out, open(f"{root}/served.json", "w"))
    """
)


def _question_task():
    """examples/multitask_serving.py's question-vs-statement task (two labels, by word order)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multitask_serving", REPO_ROOT / "examples" / "multitask_serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.question_task


def _train(task: str, model_path: str, root: str) -> tuple[list[str], torch.Tensor]:
    """Train LoRA + its own head on one task with DeltaTrainer, save it; return eval texts and their logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    from deltakit import LoraModel
    from deltakit.demo.task import make_task
    from deltakit.demo.topic_sentiment import make_topic_task
    from deltakit.integrations.trainer import DeltaTrainer

    makers = {"sentiment": make_task, "topic": make_topic_task, "question": _question_task()}
    train, test = makers[task](seed=0, n_train=96, n_test=9)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(0)
    labels = 1 + max(label for _, label in train)  # two for sentiment and question; the topic task has more
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=labels)
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=8, lora_alpha=16,
                      modules_to_save=["classifier"], name=task)
    delta.freeze_module(exclude=["deltas"])
    rows = [{**tokenizer(text, truncation=True, max_length=32), "labels": label} for text, label in train]
    args = TrainingArguments(
        output_dir=os.path.join(root, f"run-{task}"), max_steps=12, per_device_train_batch_size=16,
        learning_rate=2e-3, report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
        disable_tqdm=True, seed=0,
    )
    from transformers import DataCollatorWithPadding

    trainer = DeltaTrainer(model=model, delta=delta, args=args, train_dataset=rows,
                           data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    trainer.save_model(os.path.join(root, task))  # DeltaTrainer: the delta checkpoint, not the full model
    texts = [text for text, _ in test]
    model.eval()
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    return texts, logits


@pytest.mark.slow  # the real all-MiniLM-L6-v2, three trainings and a second process
def test_two_tasks_with_heads_train_save_load_serve_and_deploy(tmp_path) -> None:
    from deltakit.demo import real_model_path
    from tests.tolerances import assert_same_function

    model_path = real_model_path()
    root = str(tmp_path)
    texts, trained = {}, {}
    for task in TASKS:
        texts[task], trained[task] = _train(task, model_path, root)
        assert sorted(os.listdir(os.path.join(root, task)))[:2] == ["delta_config.json", "delta_model.safetensors"]
    assert trained["sentiment"].shape[-1] != trained["topic"].shape[-1]  # heads of their own sizes...
    assert trained["sentiment"].shape[-1] == trained["question"].shape[-1]  # ...and two of one shape, routed together
    with open(os.path.join(root, "spec.json"), "w") as handle:
        json.dump({"tasks": list(TASKS), "texts": texts}, handle)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", SERVE, root, model_path], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads((tmp_path / "served.json").read_text())

    # Loading in another process runs the same operations, but its thread count (and so its GEMM reduction order)
    # may differ: compare with the tolerance of the computation, not bit for bit.
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    for task in TASKS:
        for how in ("one_call", "switch"):
            assert_same_function(torch.tensor(served[f"{how}/{task}"]), trained[task], model=reference,
                                 note=f"{how}/{task}")
    # routed per sample: every row as its own delta (or the bare backbone) computes it alone, to rounding (a routed
    # row runs its delta's modules on a sub-batch)
    mixed = torch.tensor(served["route/mixed"])
    assert {"sentiment", "question", None} <= set(served["route/names"])
    for row, name in enumerate(served["route/names"]):
        alone = trained[name][row] if name else torch.tensor(served["bare/mixed"][row])
        assert_same_function(mixed[row], alone, model=reference, note=f"route row {row} ({name})")
    assert_same_function(torch.tensor(served["route/topic"]), trained["topic"], model=reference, note="route/topic")
    refused = served.get("route/refused", "")
    assert "'sentiment'" in refused and "'topic'" in refused and "'classifier'" in refused, refused
    # merged into the weights, saved, reloaded as a plain model: folding changes the rounding, hence the tolerance
    assert_same_function(torch.tensor(served["deployed/topic"]), trained["topic"], model=reference, note="deployed")
    assert served["deployed_keys_equal"]
