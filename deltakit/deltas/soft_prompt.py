"""Soft prompts: Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning" (arXiv:2104.08691).

``h_0 = [P; E(x)]``: ``soft_token_num`` trainable embeddings ``P`` are prepended to the token embeddings, and the
attention mask (ones), token type ids (zeros) and position ids are extended to match. Hooks a forward pre-hook on
the module that embeds the tokens and takes the attention mask (the base model, e.g. ``LlamaModel``/``BertModel``,
or the encoder of an encoder-decoder); encoder-decoders also get a pre-hook on the decoder that widens the
cross-attention mask, and decoder-only / encoder-only models one on the root that puts ignored positions in front
of token-level ``labels``. The outputs gain ``soft_token_num`` leading positions (the real tokens' come last).
The caller's tensors are never modified. The transformers-specific rewriting lives in :mod:`deltakit.hf_compat`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import hf_compat
from ..base import DeltaBase, factory_kwargs
from ..config import DeltaConfig, check_positive_int
from ..errors import DeltaConfigError
from ..hooks import DeltaSite, add_hook, remove_hook


@dataclass
class SoftPromptConfig(DeltaConfig):
    """Soft-prompt settings (names as in OpenDelta)."""

    delta_type: ClassVar[str] = "soft_prompt"

    soft_token_num: int = 100
    init_range: float = 0.5
    token_init: bool = True

    def validate(self) -> None:
        check_positive_int(self, "soft_token_num")
        if isinstance(self.init_range, bool) or not isinstance(self.init_range, (int, float)) or self.init_range <= 0:
            raise DeltaConfigError(f"SoftPromptConfig.init_range must be a number > 0, got {self.init_range!r}.")
        if not isinstance(self.token_init, bool):
            raise DeltaConfigError(f"SoftPromptConfig.token_init must be True or False, got {self.token_init!r}.")
        if self.modified_modules is not None:
            raise DeltaConfigError(
                "SoftPromptModel places its prompt itself (in front of the input embeddings); modified_modules must "
                f"be None, got {self.modified_modules!r}."
            )


class SoftPromptSite(DeltaSite):
    """The soft prompt ``soft_embeds`` ``(soft_token_num, hidden)`` and the pre-hook that prepends it."""

    def __init__(self, site: str, params: list[str], embedding: nn.Module, prompt: torch.Tensor) -> None:
        super().__init__()
        self.site = site
        self.params = params
        self._embedding = (embedding,)  # referenced, not registered: it belongs to the backbone
        self.soft_embeds = nn.Parameter(prompt)

    def forward_pre_hook(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return hf_compat.prepend_soft_prompt(self.params, args, kwargs, self.soft_embeds, self._embedding[0], self.site)


class SoftPromptModel(DeltaBase):
    """Prompt tuning with soft prompts (Lester et al. 2021); see the module docstring.

    Not the identity at initialization: the model sees ``soft_token_num`` extra leading positions, and models
    that return per-token outputs (LM logits, token classification) return them for those positions too, first.
    Works with ``generate()`` (the prompt is prepended once, when the KV cache is empty) and any padding side.

    Example:
        >>> delta = SoftPromptModel(backbone_model=model, soft_token_num=20)
        >>> delta.freeze_module(exclude=["deltas"])

    Args:
        backbone_model: A transformers model (encoder, decoder or encoder-decoder).
        soft_token_num: Number of prompt embeddings.
        init_range: Half-width of the uniform init, used when ``token_init`` is False.
        token_init: Initialize the prompt from the embeddings of randomly drawn vocabulary tokens.
        unfrozen_modules: What :meth:`freeze_module` keeps trainable by default (``["deltas"]``).
        name: Child-module name of the per-site module (default ``"soft_prompt"``).
    """

    delta_type: ClassVar[str] = "soft_prompt"
    config_class = SoftPromptConfig

    def __init__(
        self,
        backbone_model: nn.Module,
        soft_token_num: int = 100,
        init_range: float = 0.5,
        token_init: bool = True,
        unfrozen_modules: list[str] | None = None,
        name: str | None = None,
    ) -> None:
        config = SoftPromptConfig(
            soft_token_num=soft_token_num, init_range=init_range, token_init=token_init, unfrozen_modules=unfrozen_modules
        )
        super().__init__(backbone_model, config, name=name)

    def _match_sites(self) -> list[tuple[str, nn.Module]]:
        target, decoder = hf_compat.soft_prompt_targets(self.backbone_model)
        self._decoder = decoder
        return [target]

    def build_site(self, name: str, host: nn.Module) -> DeltaSite:
        cfg: SoftPromptConfig = self.config  # type: ignore[assignment]
        if not hasattr(self, "_decoder"):  # built from a checkpoint: the site was given, find the decoder again
            self._decoder = hf_compat.soft_prompt_targets(self.backbone_model)[1]
        embedding = hf_compat.input_embeddings(self.backbone_model)
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
        return SoftPromptSite(name, hf_compat.forward_parameters(host), embedding, prompt)

    # The extra hooks (decoder cross-attention mask, token-level labels) carry no parameters: they are not sites,
    # but their handles live in the same per-host dispatchers and go with attach/detach.
    def _extra_hooks(self) -> list[tuple[nn.Module, Any]]:
        count = self.config.soft_token_num  # type: ignore[attr-defined]
        hooks: list[tuple[nn.Module, Any]] = []
        if self._decoder is not None:
            name, decoder = self._decoder
            params = hf_compat.forward_parameters(decoder)

            def widen(host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                return hf_compat.extend_encoder_mask(params, args, kwargs, count, name)

            hooks.append((decoder, widen))
        else:
            root = self.backbone_model
            root_params = hf_compat.forward_parameters(root)
            if "labels" in root_params:

                def labels(host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                    return hf_compat.extend_token_labels(root_params, args, kwargs, count)

                hooks.append((root, labels))
        return hooks

    def attach(self) -> SoftPromptModel:
        super().attach()
        self._extra = self._extra_hooks()
        for index, (module, fn) in enumerate(self._extra):
            add_hook(module, (self._order_key, -1 - index), fn, pre=True)
        return self

    def detach(self) -> SoftPromptModel:
        super().detach()
        for index, (module, _) in enumerate(self._extra):
            remove_hook(module, (self._order_key, -1 - index), pre=True)
        self._extra = []
        return self
