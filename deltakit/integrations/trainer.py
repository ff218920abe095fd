"""``DeltaTrainer``: transformers' ``Trainer`` that checkpoints only the delta, under deltakit's own file names.

Usage (the only change to a Trainer script is the class name and the ``delta=`` argument)::

    delta = LoraModel(model, modified_modules=["query", "value"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    trainer = DeltaTrainer(model=model, delta=delta, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

What Trainer sees, and why a subclass:

- The model is the user's own model with the delta attached by hooks; Trainer trains it unchanged (the optimizer
  gets exactly the parameters with ``requires_grad``: the delta and what ``freeze_module`` kept trainable).
  ``train()`` first checks that a checkpoint will hold every tensor the optimizer trains: one set trainable by hand
  (``model.classifier.requires_grad_(True)`` after ``freeze_module(exclude=["deltas"])``) or a backbone never
  frozen would be trained but not saved, and a resume would silently continue from another model. It raises a
  ``DeltaError`` naming them instead, before anything is loaded or trained.
- Trainer recognises only PEFT's classes as adapters and otherwise writes the *full* model as
  ``model.safetensors`` (+ ``config.json``), which ``from_pretrained`` would load. A delta-only file under that
  name would load "successfully" with a random backbone. So checkpoints must use other names, and then Trainer's
  own resume and best-model code cannot find them: three methods are overridden, nothing else.

  * ``_save`` writes :meth:`~deltakit.DeltaBase.save_finetuned`'s ``delta_config.json`` +
    ``delta_model.safetensors`` (only the delta and explicitly unfrozen tensors), plus Trainer's usual
    ``training_args.bin`` and processor files. Optimizer, scheduler, RNG and trainer state are Trainer's own.
  * ``_load_from_checkpoint`` (resume) and ``_load_best_model`` (``load_best_model_at_end``) copy the saved
    tensors into the live delta parameters in place, after validating names and shapes, so the optimizer state
    that Trainer restores next still refers to the same parameters and a resumed run continues exactly.

A checkpoint directory therefore has no ``config.json`` and no ``model.safetensors``: ``from_pretrained`` on it
fails loudly, and ``AutoDeltaModel.from_finetuned(ckpt_dir, backbone_model=...)`` loads it.

Several deltas on one model: pass a list; each is saved in a subdirectory named after the delta (``delta.child_name``).
LoRA+ (:mod:`deltakit.optim`): ``DeltaTrainer(..., loraplus_lr_ratio=16)`` builds Trainer's optimizer (the class
``args.optim`` names, ``args.learning_rate`` for the A matrices, ``args.weight_decay``) over the LoRA+ groups.
Under DeepSpeed or FSDP inside Trainer, use the engine helpers of :mod:`deltakit.integrations.distributed` in your
own loop instead (see ``docs/ecosystem.md``); ``DeltaTrainer`` refuses those set-ups with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..base import DeltaBase
from ..checkpoint import WEIGHTS_NAME
from ..config import CONFIG_NAME
from ..errors import CheckpointError, DeltaError
from ..optim import check_loraplus_arguments, create_loraplus_optimizer
from ..site import delta_site_names, is_inside
from .distributed import load_delta_state_dict, read_delta_checkpoint

__all__ = ["DeltaTrainer"]


class DeltaTrainer(Trainer):
    """A :class:`transformers.Trainer` whose checkpoints hold only the delta (see the module docstring).

    Args:
        *args: Passed to :class:`transformers.Trainer`.
        delta: The delta object(s) attached to ``model`` (e.g. a ``LoraModel``); with several, each is saved in a
            subdirectory named after ``delta.child_name``.
        loraplus_lr_ratio: Train with LoRA+ (:mod:`deltakit.optim`): LoRA's B matrices get ``args.learning_rate``
            times this ratio (the paper recommends 16); ``None`` (default) keeps Trainer's own optimizer set-up.
        loraplus_lr_embedding: With LoRA+, the learning rate of LoRA factors on embeddings.
        **kwargs: Passed to :class:`transformers.Trainer` (``model=`` must be the model the deltas are attached to).

    Raises:
        DeltaError: No delta given, a delta not attached to ``model``, DeepSpeed / FSDP enabled in Trainer, or LoRA+
            asked for together with a ready-made optimizer (``optimizers=``).
        DeltaConfigError: A LoRA+ setting is not a finite number in range.
    """

    def __init__(
        self,
        *args: Any,
        delta: DeltaBase | Sequence[DeltaBase],
        loraplus_lr_ratio: float | None = None,
        loraplus_lr_embedding: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        deltas = [delta] if isinstance(delta, DeltaBase) else list(delta) if delta is not None else []
        if not deltas or not all(isinstance(d, DeltaBase) for d in deltas):
            raise DeltaError(
                f"DeltaTrainer needs delta=<a deltakit delta object or a list of them>, got {delta!r}. Create it "
                f"with e.g. LoraModel(model, ...) and pass it as DeltaTrainer(model=model, delta=delta, ...)."
            )
        names = [d.child_name for d in deltas]
        if len(set(names)) != len(names):
            raise DeltaError(f"DeltaTrainer got deltas with the same name {names}; give each a distinct name=.")
        if loraplus_lr_ratio is not None:
            check_loraplus_arguments(loraplus_lr_ratio, loraplus_lr_embedding)
            if (kwargs.get("optimizers") or (None, None))[0] is not None:
                raise DeltaError(
                    "DeltaTrainer got both loraplus_lr_ratio and a ready-made optimizer (optimizers=(...)): LoRA+ "
                    "builds the optimizer's parameter groups itself. Drop one, or build yours with "
                    "deltakit.optim.create_loraplus_optimizer."
                )
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding
        super().__init__(*args, **kwargs)
        for d in deltas:
            if not any(m is d.backbone_model for m in self.model.modules()):
                raise DeltaError(
                    f"{d!r} is not attached to the model given to DeltaTrainer ({type(self.model).__name__}); pass "
                    f"model=<the model the delta was created on>."
                )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise DeltaError(
                "DeltaTrainer supports single-process and DDP training. With DeepSpeed or FSDP, train with the engine "
                "directly or through accelerate and save with deltakit.integrations.distributed."
                "save_delta_checkpoint (see docs/ecosystem.md)."
            )
        self.deltas: list[DeltaBase] = deltas

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer; with ``loraplus_lr_ratio``, over the LoRA+ parameter groups (:mod:`deltakit.optim`).

        The class and its settings come from Trainer as usual (``args.optim``, ``optimizer_cls_and_kwargs``); only
        the parameter groups differ.

        Raises:
            DeltaError: The optimizer Trainer would build does not take parameter groups (GaLore, LOMO, an optimizer
                factory), or the model trains no LoRA factor.
        """
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        special = [k for k in ("params", "model", "optimizer_dict") if k in optimizer_kwargs]
        if special or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise DeltaError(
                f"DeltaTrainer(loraplus_lr_ratio=...) needs an optimizer built from parameter groups, but "
                f"optim={self.args.optim!r} gives {getattr(optimizer_cls, '__name__', optimizer_cls)!r}"
                f"{f' with its own {special}' if special else ''}. Use a torch optimizer such as optim='adamw_torch'."
            )
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model, optimizer_cls, lr=lr, loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_lr_embedding=self.loraplus_lr_embedding, weight_decay=self.args.weight_decay, **optimizer_kwargs,
        )
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`transformers.Trainer.train`, after checking that every tensor it would train is checkpointed.

        Raises:
            DeltaError: A trainable tensor is neither a delta parameter nor recorded by ``freeze_module`` (so a
                checkpoint would not hold it); raised before anything is loaded, trained or saved.
        """
        self._check_trained_tensors_are_saved()
        return super().train(*args, **kwargs)

    def _check_trained_tensors_are_saved(self) -> None:
        """Refuse to train a tensor that checkpoints leave out (resume / best model would restore another model).

        A checkpoint holds each delta's parameters and the backbone tensors listed in its
        ``unfrozen_parameter_names`` (what ``freeze_module`` kept trainable). Trainer optimises every parameter with
        ``requires_grad`` (or, with an optimizer passed in or kept from an earlier ``train()``, those of its
        parameters that have ``requires_grad``).
        """
        saved: set[int] = set()
        for delta in self.deltas:
            saved.update(id(p) for p in delta.parameters())
            params = dict(delta.backbone_model.named_parameters())
            saved.update(id(params[n]) for n in delta.unfrozen_parameter_names if n in params)
        in_optimizer = (
            None if self.optimizer is None
            else {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        )
        unsaved = [
            (name, param)
            for name, param in self.model.named_parameters()
            if param.requires_grad and id(param) not in saved and (in_optimizer is None or id(param) in in_optimizer)
        ]
        if not unsaved:
            return
        # Name the offending modules as freeze_module sees them (relative to a delta's backbone).
        backbone_names: dict[int, str] = {}
        for delta in self.deltas:
            for n, p in delta.backbone_model.named_parameters():
                backbone_names.setdefault(id(p), n)
        sites = delta_site_names(self.model)
        inside: list[str] = []
        outside: list[str] = []
        other_deltas: list[str] = []
        for name, param in unsaved:
            owner = backbone_names[id(param)].rpartition(".")[0] if id(param) in backbone_names else None
            if is_inside(name.rpartition(".")[0], sites):
                other_deltas.append(name)
            elif not owner:  # outside every delta's backbone, or a parameter of the backbone's root module
                outside.append(name)
            elif owner not in inside:
                inside.append(owner)
        names = [name for name, _ in unsaved]
        how = []
        if 0 < len(inside) <= 3:
            example = ", ".join(f'"{m}"' for m in inside)
            how.append(
                f"keep them trainable through freeze_module, which records them for saving "
                f'(delta.freeze_module(exclude=["deltas", {example}])), or freeze them with requires_grad_(False)'
            )
        elif inside:
            how.append(
                f"freeze the backbone with delta.freeze_module(exclude=[\"deltas\", <the modules you mean to train, "
                f"e.g. \"{inside[-1]}\">]), which freezes the rest and records those for saving ({len(inside)} modules "
                f"hold such tensors now, starting with {inside[:3]})"
            )
        if outside:
            shown = outside if len(outside) <= 3 else str(outside[:3])[:-1] + ", ...]"
            how.append(
                f"{shown} belong to no module of the backbone the deltas were created on, so freeze_module cannot "
                f"record them: freeze them, or create the delta on the whole model"
            )
        if other_deltas:
            shown = other_deltas if len(other_deltas) <= 3 else str(other_deltas[:3])[:-1] + ", ...]"
            how.append(
                f"{shown} belong to a delta not given to DeltaTrainer: pass every delta you train "
                f"(DeltaTrainer(..., delta=[delta, other_delta])), or freeze that one"
            )
        listed = names if len(names) <= 5 else str(names[:5])[:-1] + ", ...]"
        raise DeltaError(
            f"DeltaTrainer would train {len(names)} tensor(s) that its checkpoints do not save: {listed}. A checkpoint "
            f"holds only the deltas' parameters and the backbone tensors freeze_module() kept trainable, so "
            f"resume_from_checkpoint and load_best_model_at_end would restore a different model. To fix: "
            f"{'; '.join(how)}. Nothing was loaded, trained or saved."
        )

    def _delta_dir(self, root: str, delta: DeltaBase) -> str:
        return root if len(self.deltas) == 1 else os.path.join(root, delta.child_name)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the deltas' checkpoints (instead of the full model) and Trainer's side files."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        for delta in self.deltas:
            delta.save_finetuned(self._delta_dir(output_dir, delta))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_deltas(self, checkpoint: str) -> None:
        """Validate every delta's saved tensors first, then copy them into the live parameters."""
        states = []
        for delta in self.deltas:
            path = self._delta_dir(checkpoint, delta)
            if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
                full = os.path.isfile(os.path.join(checkpoint, "model.safetensors"))
                raise CheckpointError(
                    f"{checkpoint!r} holds no deltakit checkpoint for {delta!r} (no {CONFIG_NAME} / {WEIGHTS_NAME} "
                    f"in {path!r})"
                    + (": it is a full-model checkpoint written by a plain Trainer; resume it with Trainer." if full else ".")
                )
            states.append(read_delta_checkpoint(path, delta))
        for delta, state in zip(self.deltas, states):
            load_delta_state_dict(self.model, delta, state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Resume: load the delta tensors saved in ``resume_from_checkpoint`` into the live deltas."""
        self._load_deltas(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: load the delta tensors of the best checkpoint into the live deltas."""
        self._load_deltas(self.state.best_model_checkpoint)
