"""Soft prompts: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv:2104.08691).

``h_0 = [P; E(x)]``: ``soft_token_num`` trainable embeddings ``P`` are prepended to the token embeddings, and the
attention mask (ones), token type ids (zeros) and position ids are extended to match. Hooks a forward pre-hook on
the module that embeds the tokens and takes the attention mask (the base model, e.g. ``LlamaModel``/``BertModel``,
or the encoder of an encoder-decoder); encoder-decoders also get a pre-hook on the decoder that widens the
cross-attention mask, and decoder-only / encoder-only models one on the root that puts ignored positions in front
of token-level ``labels``. The outputs gain ``soft_token_num`` leading positions (the real tokens' come last),
except in ``*ForSequenceClassification`` models that pool the last non-padding token (GPT-2, Llama, ...): there the
head's per-position output keeps only the real tokens' positions during the model's forward, so the index
transformers computes from ``input_ids`` picks the last real token (see :class:`_ClassifierPooling`). A bare base
model (``AutoModel``) is its own target; the prompt parameter then lives on its input embedding module.
The caller's tensors are never modified. The transformers-specific rewriting lives in :mod:`deltakit.hf_compat`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import hf_compat
from ..base import DeltaBase
from ..config import MAX_PROMPT_LENGTH, DeltaConfig, check_bool, check_finite_number, check_positive_int
from ..errors import DeltaConfigError
from ..site import Composition, DeltaSite, factory_kwargs

#: What a forward pre-hook with kwargs returns: the call's new ``(args, kwargs)``.
Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class SoftPromptConfig(DeltaConfig):
    """Soft-prompt settings (names as in OpenDelta).

    Args:
        soft_token_num: Number of prompt embeddings.
        init_range: Half-width of the uniform init, used when ``token_init`` is False.
        token_init: Initialize the prompt from the embeddings of randomly drawn vocabulary tokens.
    """

    delta_type: ClassVar[str] = "soft_prompt"

    soft_token_num: int = 100
    init_range: float = 0.5
    token_init: bool = True

    def validate(self) -> None:
        check_positive_int(self, "soft_token_num", high=MAX_PROMPT_LENGTH)
        # a uniform init's half-width: embeddings live around |x| < 1, so beyond 100 it is a mistake
        check_finite_number(self, "init_range", positive=True, high=100.0)
        check_bool(self, "token_init")
        if self.modified_modules is not None:
            raise DeltaConfigError(
                "SoftPromptModel places its prompt itself (in front of the input embeddings); modified_modules must "
                f"be None, got {self.modified_modules!r}."
            )


class SoftPromptSite(DeltaSite):
    """The soft prompt ``soft_embeds`` ``(soft_token_num, hidden)`` and the pre-hook that prepends it.

    The pre-hook runs on ``target``, the module that embeds the tokens and takes the attention mask. That is the
    site's host, except for a bare base model (``BertModel``, ``LlamaModel``): there the target is the root, and the
    site is hosted by the input embedding module (a child of the root, so the prompt has a name in the backbone).
    """

    composition = Composition.REWRITES_CALL

    def __init__(
        self, site: str, params: list[str], embedding: nn.Module, prompt: torch.Tensor, target: nn.Module
    ) -> None:
        super().__init__()
        self.site = site
        self.params = params
        self._embedding = (embedding,)  # referenced, not registered: it belongs to the backbone
        self._target = (target,)  # likewise
        self.position_limit = hf_compat.position_limit(target)  # absolute positions of the model, if it has them
        self.soft_embeds = nn.Parameter(prompt)

    @property
    def target(self) -> nn.Module:
        """The module whose calls get the prompt in front of their token embeddings."""
        return self._target[0]

    @property
    def hook_module(self) -> nn.Module:  # type: ignore[override]
        """The pre-hook goes on :attr:`target` (the host, or the root of a bare base model)."""
        return self._target[0]

    def forward_pre_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return hf_compat.prepend_soft_prompt(
            self.params, args, kwargs, self.soft_embeds, self._embedding[0], self.site, self.position_limit
        )


# The hooks below carry no parameters. They are module-level classes (not closures) so that a model with a soft
# prompt attached can be pickled whole (``torch.save(model)``, ``copy.deepcopy``).
class _EncoderMaskHook:
    """Pre-hook on an encoder-decoder's decoder: widen the cross-attention mask over the encoder's prompt positions."""

    def __init__(self, params: list[str], count: int, where: str) -> None:
        self.params = params
        self.count = count
        self.where = where

    def __call__(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return hf_compat.extend_encoder_mask(self.params, args, kwargs, self.count, self.where)


class _TokenLabelsHook:
    """Pre-hook on the root: token-level ``labels`` get ignored positions in front of them, for the prompt's."""

    def __init__(self, params: list[str], count: int) -> None:
        self.params = params
        self.count = count

    def __call__(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        return hf_compat.extend_token_labels(self.params, args, kwargs, self.count)


class _ClassifierPooling:
    """Keeps a decoder-only sequence classifier pooling the last *real* token.

    Such a model applies its head (``score``) at every position of the base model's output and picks the logits at
    an index computed from the caller's ``input_ids`` (length ``T``); with soft prompts in front the output has more
    positions. ``enter`` (pre-hook on the classifier) notes ``T`` for the running call, ``cut`` (forward hook on the
    head) keeps the last ``T`` positions of the head's per-position output, ``leave`` (forward hook on the
    classifier) forgets ``T``. So the head is only changed inside a call of its classifier, only when its output is
    longer than the caller's input, and stacked prompts are cut by the first delta's hook. ``T`` is kept per thread.
    """

    def __init__(self, params: list[str]) -> None:
        self.params = params
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params}  # the per-thread call state is not part of the model

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.params = state["params"]
        self._local = threading.local()

    def enter(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        self._local.length = hf_compat.input_length(self.params, args, kwargs)
        return args, kwargs

    def cut(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return hf_compat.keep_real_positions(output, getattr(self._local, "length", None))

    def leave(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        self._local.length = None
        return output


class SoftPromptModel(DeltaBase):
    """Prompt tuning with soft prompts (Lester et al. 2021); see the module docstring.

    Not the identity at initialization: the model sees ``soft_token_num`` extra leading positions, and models
    that return per-token outputs (LM logits, token classification) return them for those positions too, first.
    Works with ``generate()`` (the prompt is prepended once, when the KV cache is empty) and any padding side.

    Example:
        >>> delta = SoftPromptModel(backbone_model=model, soft_token_num=20)
        >>> delta.freeze_module(exclude=["deltas"])

    ``backbone_model`` is a transformers model (encoder, decoder or encoder-decoder); the prompt's place is found
    from it (``modified_modules`` is not taken).
    """

    delta_type: ClassVar[str] = "soft_prompt"
    config_class = SoftPromptConfig
    constructor_fields = ("soft_token_num", "init_range", "token_init", "unfrozen_modules")

    def match_sites(self) -> list[tuple[str, nn.Module]]:
        """The module that embeds the tokens (see :class:`SoftPromptSite`)."""
        target, _ = hf_compat.soft_prompt_targets(self.backbone_model)
        if target[0] == "":
            # A bare base model: the root takes the tokens. Sites are named modules, so the prompt is kept on the
            # input embedding module (see SoftPromptSite) and the pre-hook still goes on the root.
            embedding = hf_compat.input_embeddings(self.backbone_model)
            return [(hf_compat.module_name(self.backbone_model, embedding, "input embedding"), embedding)]
        return [target]

    def plan(self, matches: list[tuple[str, nn.Module]]) -> None:
        """Find the decoder of an encoder-decoder (its cross-attention mask must cover the prompt)."""
        self._decoder = hf_compat.soft_prompt_targets(self.backbone_model)[1]

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: SoftPromptConfig = self.config  # type: ignore[assignment]
        embedding = hf_compat.input_embeddings(self.backbone_model)
        target, where = host, name
        if host is embedding:  # the prompt lives on the embedding module (saved from a bare base model)
            where, target = hf_compat.soft_prompt_targets(self.backbone_model)[0]
            where = where or type(target).__name__
        weight = getattr(embedding, "weight", None)
        factory = factory_kwargs(embedding)
        if cfg.token_init and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            ids = torch.randint(0, weight.shape[0], (cfg.soft_token_num,), device=weight.device)
            with torch.no_grad():
                prompt = embedding(ids).detach().clone()
        else:
            hidden = weight.shape[1] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
            if hidden is None:
                raise DeltaConfigError(
                    f"Soft prompts cannot tell the embedding width of {type(embedding).__name__}; it has no 2-D weight."
                )
            prompt = torch.empty(cfg.soft_token_num, hidden, **factory).uniform_(-cfg.init_range, cfg.init_range)
        return SoftPromptSite(where, hf_compat.forward_parameters(target), embedding, prompt, target)

    # The extra hooks (decoder cross-attention mask, token-level labels, classifier pooling) carry no parameters:
    # they are not sites, but their handles live in the same per-host dispatchers and go with attach/detach.
    def extra_hooks(self) -> list[tuple[nn.Module, Any, bool]]:
        """``(module, hook, is_pre_hook)`` for every hook besides the sites'."""
        count = self.config.soft_token_num  # type: ignore[attr-defined]
        hooks: list[tuple[nn.Module, Any, bool]] = []
        if self._decoder is not None:
            name, decoder = self._decoder
            hooks.append((decoder, _EncoderMaskHook(hf_compat.forward_parameters(decoder), count, name), True))
            return hooks
        classifier = hf_compat.sequence_classification_head(self.backbone_model)
        if classifier is not None:
            # Sequence classification has no token-level labels: only the pooled position needs care.
            model, head = classifier
            pooling = _ClassifierPooling(hf_compat.forward_parameters(model))
            hooks += [(model, pooling.enter, True), (head, pooling.cut, False), (model, pooling.leave, False)]
            return hooks
        root = self.backbone_model
        root_params = hf_compat.forward_parameters(root)
        if "labels" in root_params:
            hooks.append((root, _TokenLabelsHook(root_params, count), True))
        return hooks
