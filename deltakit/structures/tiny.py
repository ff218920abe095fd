"""Tiny random models of every mapped architecture, built from configs (no download): the CLI's previews and
demos use them, and so can tests."""

from __future__ import annotations

from torch import nn

from ..errors import ModuleMatchError

_TINY_TEXT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=128)
_TINY_VISION = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)

#: Architecture name -> (config class, model class, config kwargs with ``{L}`` layers, input kind). The input kind
#: is ``"text"`` (``input_ids``), ``"seq2seq"`` (plus ``decoder_input_ids``), ``"image"`` (``pixel_values``
#: 16x16) or ``"text+image"``.
TINY_ARCHITECTURES: dict[str, tuple[str, str, dict[str, object], str]] = {
    "bert": ("BertConfig", "BertModel", {**_TINY_TEXT, "num_hidden_layers": "L"}, "text"),
    "roberta": ("RobertaConfig", "RobertaModel", {**_TINY_TEXT, "num_hidden_layers": "L", "pad_token_id": 1}, "text"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", {**_TINY_TEXT, "num_hidden_layers": "L"}, "text"),
    "distilbert": (
        "DistilBertConfig", "DistilBertModel",
        {"dim": 32, "n_layers": "L", "n_heads": 2, "hidden_dim": 64, "vocab_size": 128}, "text",
    ),
    "albert": ("AlbertConfig", "AlbertModel", {**_TINY_TEXT, "num_hidden_layers": "L", "embedding_size": 16}, "text"),
    "electra": ("ElectraConfig", "ElectraModel", {**_TINY_TEXT, "num_hidden_layers": "L", "embedding_size": 16}, "text"),
    "gpt2": ("GPT2Config", "GPT2Model", {"n_embd": 32, "n_layer": "L", "n_head": 2, "vocab_size": 128}, "text"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXModel", {**_TINY_TEXT, "num_hidden_layers": "L"}, "text"),
    "opt": (
        "OPTConfig", "OPTModel",
        {"hidden_size": 32, "num_hidden_layers": "L", "num_attention_heads": 2, "ffn_dim": 64, "vocab_size": 128,
         "word_embed_proj_dim": 32}, "text",
    ),
    "llama": ("LlamaConfig", "LlamaModel", {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1}, "text"),
    "mistral": ("MistralConfig", "MistralModel", {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1}, "text"),
    "qwen2": ("Qwen2Config", "Qwen2Model", {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1}, "text"),
    "gemma": (
        "GemmaConfig", "GemmaModel",
        {**_TINY_TEXT, "num_hidden_layers": "L", "num_key_value_heads": 1, "head_dim": 16}, "text",
    ),
    "phi3": ("Phi3Config", "Phi3Model", {**_TINY_TEXT, "num_hidden_layers": "L", "pad_token_id": 0}, "text"),
    "t5": (
        "T5Config", "T5Model",
        {"d_model": 32, "d_ff": 64, "num_layers": "L", "num_heads": 2, "d_kv": 16, "vocab_size": 128,
         "decoder_start_token_id": 0}, "seq2seq",
    ),
    "bart": (
        "BartConfig", "BartModel",
        {"d_model": 32, "encoder_layers": "L", "decoder_layers": "L", "encoder_attention_heads": 2,
         "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "vocab_size": 128}, "seq2seq",
    ),
    "vit": ("ViTConfig", "ViTModel", {**_TINY_VISION, "num_hidden_layers": "L"}, "image"),
    "clip": (
        "CLIPConfig", "CLIPModel",
        {"text_config": {**_TINY_TEXT, "num_hidden_layers": "L"},
         "vision_config": {**_TINY_VISION, "num_hidden_layers": "L"}, "projection_dim": 16}, "text+image",
    ),
}


#: Most layers a tiny random model may have (checked before anything is built).
MAX_TINY_LAYERS = 256


def _fill_layers(value: object, layers: int) -> object:
    if value == "L":
        return layers
    if isinstance(value, dict):
        return {k: _fill_layers(v, layers) for k, v in value.items()}
    return value


def tiny_config(arch: str, num_layers: int = 2) -> object:
    """The transformers config of a tiny random instance of ``arch`` (a key of :data:`TINY_ARCHITECTURES`)."""
    import transformers

    if arch not in TINY_ARCHITECTURES:
        raise ModuleMatchError(
            f"Unknown architecture name {arch!r}; tiny random models exist for: {', '.join(sorted(TINY_ARCHITECTURES))}."
        )
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MAX_TINY_LAYERS:
        raise ModuleMatchError(
            f"A tiny {arch} model has 1 to {MAX_TINY_LAYERS} layers (deeper than any released model); got "
            f"num_layers={num_layers!r}."
        )
    config_cls, _, kwargs, _ = TINY_ARCHITECTURES[arch]
    return getattr(transformers, config_cls)(**_fill_layers(kwargs, num_layers))  # type: ignore[arg-type]


def tiny_model(arch: str, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A tiny randomly initialised transformers model of architecture ``arch`` (no download), in eval mode.

    Example:
        >>> model = tiny_model("llama")  # LlamaModel, hidden size 32, 2 layers
    """
    import torch
    import transformers

    config = tiny_config(arch, num_layers)
    torch.manual_seed(seed)
    return getattr(transformers, TINY_ARCHITECTURES[arch][1])(config).eval()
