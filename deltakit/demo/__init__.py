"""End-to-end demo: LoRA-tune the real all-MiniLM-L6-v2 on a compositional sentiment task, on CPU, offline.

What it shows, in order:

1. the backbone's module tree (:class:`deltakit.Visualization`);
2. LoRA on the attention ``query``/``value`` projections, everything frozen except the deltas and the classifier
   head, and the parameter table of :meth:`~deltakit.DeltaBase.log`;
3. held-out accuracy before and after a short training run (with a rich progress bar);
4. the checkpoint size (``save_finetuned``) next to the backbone's size;
5. exactness checks: ``detach()`` restores the untrained backbone bit-for-bit, ``attach()`` restores the trained
   model bit-for-bit, and ``AutoDeltaModel.from_finetuned`` on a freshly loaded backbone reproduces the trained
   logits bit-for-bit.

The task (:func:`make_task`) is generated in code from a seed. Sentences such as ``"honestly , the film was not
very good at all"`` are labelled by the polarity of the adjective flipped by a negation; the test split only holds
sentences with a (subject, adjective) or (negation, adjective) pairing that never occurs in training, so the model
has to compose, not memorise. A linear probe on the frozen backbone stays at chance on the held-out split (about
0.50, 0.70 on its own training data), while LoRA and full fine-tuning reach 1.0: the backbone itself has to change.

Run it with ``deltakit demo`` (real model, 15-35 s on two CPU cores) or ``deltakit demo --tiny`` (a random
two-layer BERT with a word-level tokenizer built from the task vocabulary; a few seconds). The tiny mode checks the
mechanics only: its frozen random backbone does not learn the task in 40 steps.

Files: ``task`` (the generated task), ``models`` (backbone and tokenizer), ``training`` (encode, evaluate, train),
``threads`` (the thread count) and ``run`` (the run itself and the ``deltakit demo`` command).
"""

from __future__ import annotations

from .models import (
    DemoSetupError,
    build_tiny_backbone,
    build_tiny_tokenizer,
    load_backbone,
    load_tokenizer,
    quiet_transformers,
    real_model_path,
)
from .run import (
    DEFAULTS,
    build_parser,
    main,
    run_demo,
)
from .task import (
    INTENSIFIERS,
    NEGATED_TAILS,
    NEGATIONS,
    NEGATIVE,
    POSITIVE,
    PREFIXES,
    SUBJECTS,
    TAILS,
    VERBS,
    Example,
    HeldOut,
    held_out_pairs,
    make_examples,
    make_task,
    task_vocabulary,
)
from .threads import (
    pick_num_threads,
    threads_from_environment,
    usable_cores,
)
from .training import (
    accuracy,
    encode,
    logits_of,
    torch_threads,
    train,
)

__all__ = [
    "DEFAULTS",
    "DemoSetupError",
    "Example",
    "HeldOut",
    "INTENSIFIERS",
    "NEGATED_TAILS",
    "NEGATIONS",
    "NEGATIVE",
    "POSITIVE",
    "PREFIXES",
    "SUBJECTS",
    "TAILS",
    "VERBS",
    "accuracy",
    "build_parser",
    "build_tiny_backbone",
    "build_tiny_tokenizer",
    "encode",
    "held_out_pairs",
    "load_backbone",
    "load_tokenizer",
    "logits_of",
    "main",
    "make_examples",
    "make_task",
    "pick_num_threads",
    "quiet_transformers",
    "real_model_path",
    "run_demo",
    "task_vocabulary",
    "threads_from_environment",
    "torch_threads",
    "train",
    "usable_cores",
]
