"""``AutoDeltaConfig`` and ``AutoDeltaModel``: build or load any registered delta method by its ``delta_type``."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .base import DeltaBase
from .checkpoint import CONFIG_NAME, config_from_meta, load_delta, read_checkpoint_meta
from .composite import is_composite_checkpoint, load_composite
from .config import DeltaConfig, config_from_dict
from .errors import CheckpointError, DeltaConfigError
from .registry import DELTA_REGISTRY

# ------------------------------------------------------------------------------ one-directory loading
# Kept apart from the factories below: building the backbone from the reference a checkpoint records
# (deltakit.checkpoint.base_model), then loading the delta onto it.

#: Keyword options of the one-call loaders that are deltakit's; every other keyword goes to ``from_pretrained``.
_DELTA_OPTIONS = ("check_backbone", "allow_nonfinite", "name")


def _transformers_class(class_name: str, where: str) -> type:
    """A model class transformers exports, by name (a checkpoint never makes deltakit import anything else)."""
    import transformers

    try:
        cls = getattr(transformers, class_name, None)
    except ImportError:  # transformers' lazy module imports the class's file, which may need a missing package
        cls = None
    # A model, nothing else: AutoTokenizer / AutoConfig / a processor also have from_pretrained, and loading one would
    # read files the checkpoint names and then fail far from the cause.
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{where!r} records the base model class {class_name!r}, which is not a model class of transformers "
            f"{transformers.__version__} (or needs a package that is not installed). Pass model_class=<the class> "
            f"(or build the backbone yourself and use AutoDeltaModel.from_finetuned(path, backbone_model=...))."
        )
    return cls


def _head_kwargs(record: dict[str, Any]) -> dict[str, Any]:
    """The config entries a task head is rebuilt with (``num_labels`` through ``id2label``, ``problem_type``)."""
    head = record.get("config") or {}
    out: dict[str, Any] = {}
    if head.get("id2label"):
        out["id2label"] = {int(k): v for k, v in head["id2label"].items()}
        out["label2id"] = dict(head.get("label2id") or {v: int(k) for k, v in head["id2label"].items()})
    elif head.get("num_labels") is not None:
        out["num_labels"] = head["num_labels"]
    if head.get("problem_type") is not None:
        out["problem_type"] = head["problem_type"]
    return out


def load_base_model(
    path: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | os.PathLike[str] | None = None,
    model_class: type | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Build the backbone a delta checkpoint records: ``model_class.from_pretrained(name_or_path, ...)``.

    Args:
        path: A checkpoint directory written by ``save_finetuned`` (``"base_model"`` in its ``delta_config.json``).
        base_model_name_or_path: Load the backbone from here instead of the recorded reference (a local copy of
            a hub model, a moved directory).
        model_class: The class to call ``from_pretrained`` on (default: the recorded class, looked up in
            transformers).
        **from_pretrained_kwargs: Passed to ``from_pretrained`` (``torch_dtype``, ``revision``, ...); the recorded
            head entries (``num_labels`` / ``id2label`` / ``label2id``, ``problem_type``) are added unless given.

    Raises:
        CheckpointError: The checkpoint records no base model (an older deltakit, a model that is not a
            transformers model, or one built from a config), or ``from_pretrained`` fails (e.g. a hub id while
            offline); the message says what to pass instead.
    """
    if isinstance(path, (str, os.PathLike)) and is_composite_checkpoint(path):
        raise CheckpointError(
            f"{os.fspath(path)!r} is a composite delta (several members); build the backbone and load it with "
            f"AutoDeltaModel.from_finetuned(path, backbone_model=...)."
        )
    where = os.path.join(os.fspath(path), CONFIG_NAME)
    meta = read_checkpoint_meta(path)
    record = meta.get("base_model")
    if record is None and (base_model_name_or_path is None or model_class is None):
        raise CheckpointError(
            f"{where!r} records no base model (saved by a deltakit before 0.2, or from a model that is not a "
            f"transformers model). Pass base_model_name_or_path= and model_class=, or build the backbone and use "
            f"AutoDeltaModel.from_finetuned(path, backbone_model=...)."
        )
    record = record or {"name_or_path": None, "class": model_class.__name__, "config": {}}  # type: ignore[union-attr]
    name = os.fspath(base_model_name_or_path) if base_model_name_or_path is not None else record["name_or_path"]
    if name is None:
        raise CheckpointError(
            f"{where!r} was saved from a {record['class']} built from a config, not loaded with from_pretrained, so "
            f"it records nowhere to load the backbone from. Pass base_model_name_or_path=<a directory or hub id>, or "
            f"build it and use AutoDeltaModel.from_finetuned(path, backbone_model=...)."
        )
    cls = model_class if model_class is not None else _transformers_class(record["class"], where)
    kwargs = {**_head_kwargs(record), **from_pretrained_kwargs}
    if "num_labels" in from_pretrained_kwargs or "id2label" in from_pretrained_kwargs:
        for key in ("id2label", "label2id", "num_labels"):
            if key not in from_pretrained_kwargs:
                kwargs.pop(key, None)  # the caller's own choice of labels wins as a whole
    try:
        return cls.from_pretrained(name, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # chained, not swallowed: transformers raises many types (RuntimeError, ImportError, ...)
        raise _base_model_error(exc, name, cls, where) from exc


def _base_model_error(exc: Exception, name: str, cls: type, where: str) -> CheckpointError:
    """Why ``cls.from_pretrained(name)`` failed for the checkpoint at ``where``, and what to pass instead."""
    text = str(exc).strip()
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)[:300]
    if "ignore_mismatched_sizes" in text:
        # The backbone was built with other head sizes than the saved base (from_pretrained(..., num_labels=3,
        # ignore_mismatched_sizes=True)), which the record cannot tell.
        return CheckpointError(
            f"Cannot load the base model {name!r} that {where!r} records as a {cls.__name__} with the recorded head "
            f"sizes: its saved weights have other sizes ({first}). If the backbone was built with "
            f"ignore_mismatched_sizes=True, pass it again: from_pretrained(path, ignore_mismatched_sizes=True)."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE")
    hint = (" The hub is off (HF_HUB_OFFLINE): a hub id loads only from the local cache." if offline else "")
    return CheckpointError(
        f"Cannot load the base model {name!r} that {where!r} records ({cls.__name__}.from_pretrained: "
        f"{type(exc).__name__}: {first}).{hint} A relative path is taken from the working directory "
        f"({os.getcwd()!r}). Pass base_model_name_or_path=<a local copy> to load it from elsewhere, or "
        f"model_class=<the class> if the recorded class is wrong."
    )


def _from_pretrained(
    path: str | os.PathLike[str], model_class: type | None, base_model_name_or_path: Any, kwargs: dict[str, Any]
) -> DeltaBase:
    """Backbone (from the recorded reference) + delta (validated, attached), in one call."""
    options = {k: kwargs.pop(k) for k in _DELTA_OPTIONS if k in kwargs}
    backbone = load_base_model(
        path, base_model_name_or_path=base_model_name_or_path, model_class=model_class, **kwargs
    )
    return AutoDeltaModel.from_finetuned(path, backbone, **options)


def _auto_class(name: str) -> type:
    import transformers

    return getattr(transformers, name)


def _one_call_loader(auto_class_name: str | None, doc_task: str) -> Any:
    """``from_pretrained`` of an ``AutoDeltaModel...`` class: the backbone built with ``auto_class_name``
    (``None``: the recorded class)."""

    def from_pretrained(
        path: str | os.PathLike[str], *, base_model_name_or_path: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> DeltaBase:
        model_class = _auto_class(auto_class_name) if auto_class_name is not None else kwargs.pop("model_class", None)
        return _from_pretrained(path, model_class, base_model_name_or_path, kwargs)

    from_pretrained.__doc__ = f"""Build the {doc_task} a delta checkpoint was saved from and load the delta onto it,
        in one call (PEFT's ``AutoPeftModel...from_pretrained``).

        Args:
            path: A directory written by ``save_finetuned`` (or ``DeltaTrainer``); its ``delta_config.json``
                records the base model (``name_or_path`` as given to ``from_pretrained``, class, labels).
            base_model_name_or_path: Load the backbone from here instead (a local copy, a moved directory).
            **kwargs: ``check_backbone``, ``allow_nonfinite`` and ``name`` go to the delta loader (see
                :meth:`AutoDeltaModel.from_finetuned`); everything else to ``from_pretrained`` of the backbone
                (``torch_dtype``, ``revision``, ...).

        Returns:
            The attached delta; the model is ``delta.backbone_model``.

        Raises:
            CheckpointError: No base model recorded, the backbone cannot be loaded (a hub id while offline), or the
                checkpoint does not fit it (see :meth:`AutoDeltaModel.from_finetuned`).
        """
    return staticmethod(from_pretrained)



class AutoDeltaConfig:
    """Builds the right :class:`DeltaConfig` subclass from a dict or a saved checkpoint directory."""

    def __init__(self) -> None:
        raise TypeError("AutoDeltaConfig is a factory: use AutoDeltaConfig.from_dict() or .from_finetuned().")

    @staticmethod
    def from_dict(values: dict[str, Any]) -> DeltaConfig:
        """Build a config from a dict holding ``"delta_type"`` (e.g. ``"lora"``) and the method's settings."""
        return config_from_dict(values)

    @staticmethod
    def from_finetuned(path: str | os.PathLike[str]) -> DeltaConfig:
        """Read the config of a checkpoint written by :meth:`DeltaBase.save_finetuned`.

        Raises:
            CheckpointError: The directory holds no valid ``delta_config.json`` (naming the file and the field).
        """
        meta = read_checkpoint_meta(path)
        return config_from_meta(meta, os.path.join(os.fspath(path), CONFIG_NAME))


class AutoDeltaModel:
    """Factory for delta objects; mirrors OpenDelta's ``AutoDeltaModel``.

    Example:
        >>> config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4, "modified_modules": ["query"]})
        >>> delta = AutoDeltaModel.from_config(config, backbone_model=model)
        >>> delta = AutoDeltaModel.from_finetuned("out/sst2-lora", backbone_model=fresh_model)
    """

    def __init__(self) -> None:
        raise TypeError("AutoDeltaModel is a factory: use AutoDeltaModel.from_config() or .from_finetuned().")

    @staticmethod
    def from_config(config: DeltaConfig | dict[str, Any], backbone_model: nn.Module, **kwargs: Any) -> DeltaBase:
        """Create and attach the delta described by ``config`` (a config object or a dict with ``delta_type``)."""
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        if not isinstance(config, DeltaConfig) or config.delta_type not in DELTA_REGISTRY:
            raise DeltaConfigError(
                f"AutoDeltaModel.from_config needs a delta config (one of {sorted(DELTA_REGISTRY)}), got {config!r}."
            )
        return DELTA_REGISTRY[config.delta_type].from_config(config, backbone_model, **kwargs)

    @staticmethod
    def from_finetuned(
        path: str | os.PathLike[str], backbone_model: nn.Module, *, check_backbone: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Load any delta checkpoint written by ``save_finetuned`` onto ``backbone_model`` (validated first); a
        composite checkpoint (:mod:`deltakit.composite`) loads all its members as one ``CompositeDelta``."""
        if isinstance(path, (str, os.PathLike)) and is_composite_checkpoint(path):
            return load_composite(path, backbone_model, check_backbone=check_backbone, **kwargs)
        return load_delta(path, backbone_model, check_backbone=check_backbone, **kwargs)

    #: ``AutoDeltaModel.from_pretrained(dir, **from_pretrained_kwargs)``: the recorded backbone class + the delta.
    from_pretrained = _one_call_loader(None, "backbone (the recorded transformers class)")


class AutoDeltaModelForSequenceClassification:
    """``from_pretrained(dir)``: an ``AutoModelForSequenceClassification`` backbone + its delta, in one call."""

    from_pretrained = _one_call_loader("AutoModelForSequenceClassification", "sequence classification model")


class AutoDeltaModelForTokenClassification:
    """``from_pretrained(dir)``: an ``AutoModelForTokenClassification`` backbone + its delta, in one call."""

    from_pretrained = _one_call_loader("AutoModelForTokenClassification", "token classification model")


class AutoDeltaModelForCausalLM:
    """``from_pretrained(dir)``: an ``AutoModelForCausalLM`` backbone + its delta, in one call."""

    from_pretrained = _one_call_loader("AutoModelForCausalLM", "causal language model")


class AutoDeltaModelForSeq2SeqLM:
    """``from_pretrained(dir)``: an ``AutoModelForSeq2SeqLM`` backbone + its delta, in one call."""

    from_pretrained = _one_call_loader("AutoModelForSeq2SeqLM", "sequence-to-sequence language model")
