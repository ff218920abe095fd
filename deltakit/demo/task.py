"""The demo's task: compositional sentiment sentences generated in code from a seed (see the package docstring)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")

SUBJECTS: tuple[str, ...] = (
    "the film", "the movie", "the food", "the service", "the hotel", "the book",
    "the show", "the concert", "the game", "the staff", "the music", "the room",
)  # fmt: skip
POSITIVE: tuple[str, ...] = ("good", "great", "excellent", "wonderful", "pleasant", "superb", "delightful", "brilliant")
NEGATIVE: tuple[str, ...] = ("bad", "terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing")
#: Negations flip the label. Only "not" and "never" combine with an intensifier ("not very good").
NEGATIONS: tuple[str, ...] = ("not", "never", "hardly", "far from")
VERBS: tuple[str, ...] = ("was", "is", "seemed", "felt")
INTENSIFIERS: tuple[str, ...] = ("", "very", "really", "truly", "quite", "so")
PREFIXES: tuple[str, ...] = ("", "i think", "honestly ,", "in my opinion", "overall ,")
TAILS: tuple[str, ...] = ("", "to me", "for sure")
NEGATED_TAILS: tuple[str, ...] = ("", "at all")


class Example(NamedTuple):
    """One generated sentence with the parts it was built from.

    Attributes:
        text: The sentence (lower case, words separated by single spaces).
        label: 1 for positive, 0 for negative.
        subject: The subject phrase, e.g. ``"the film"``.
        adjective: The sentiment adjective.
        negation: The negation phrase, or ``""`` when the sentence is not negated.
    """

    text: str
    label: int
    subject: str
    adjective: str
    negation: str


class HeldOut(NamedTuple):
    """The word pairings reserved for the test split.

    Attributes:
        subject_adjective: ``(subject, adjective)`` pairs never seen in training.
        negation_adjective: ``(negation, adjective)`` pairs never seen in training.
    """

    subject_adjective: frozenset[tuple[str, str]]
    negation_adjective: frozenset[tuple[str, str]]

    def contains(self, example: Example) -> bool:
        """Whether ``example`` uses at least one held-out pairing."""
        return (example.subject, example.adjective) in self.subject_adjective or (
            example.negation,
            example.adjective,
        ) in self.negation_adjective


def held_out_pairs(seed: int) -> HeldOut:
    """Choose the held-out pairings for ``seed``.

    Each subject loses one positive and one negative adjective, and each adjective loses one negation, so every
    word still occurs in training, only in other combinations.

    Args:
        seed: Random seed.

    Returns:
        The held-out pairings.
    """
    rng = random.Random(f"deltakit-demo-heldout-{seed}")
    subject_adjective = set()
    for subject in SUBJECTS:
        subject_adjective.add((subject, rng.choice(POSITIVE)))
        subject_adjective.add((subject, rng.choice(NEGATIVE)))
    negation_adjective = {(rng.choice(NEGATIONS), adjective) for adjective in POSITIVE + NEGATIVE}
    return HeldOut(frozenset(subject_adjective), frozenset(negation_adjective))


def _sample_example(rng: random.Random) -> Example:
    subject = rng.choice(SUBJECTS)
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    negation = rng.choice(NEGATIONS) if rng.random() < 0.5 else ""
    words = [rng.choice(PREFIXES), subject, rng.choice(VERBS), negation]
    words.append(rng.choice(INTENSIFIERS) if negation in ("", "not", "never") else "")
    words.append(adjective)
    words.append(rng.choice(NEGATED_TAILS if negation else TAILS))
    text = " ".join(w for w in words if w)
    return Example(text, int(positive != bool(negation)), subject, adjective, negation)


def make_examples(seed: int = 0, n_train: int = 2000, n_test: int = 600) -> tuple[list[Example], list[Example]]:
    """Generate the compositional sentiment task with its metadata.

    Sentences are drawn with balanced polarity and negation (so labels are balanced), deduplicated, and routed to
    the test split exactly when they use a held-out pairing (:func:`held_out_pairs`). The result depends only on
    the arguments.

    Args:
        seed: Random seed.
        n_train: Number of training sentences.
        n_test: Number of held-out test sentences.

    Returns:
        ``(train, test)`` lists of :class:`Example`.
    """
    held = held_out_pairs(seed)
    rng = random.Random(f"deltakit-demo-sentences-{seed}")
    return fill_splits(lambda: _sample_example(rng), held.contains, n_train, n_test, 200, "sentences")


def fill_splits(
    draw: Callable[[], T], held_out: Callable[[T], bool], n_train: int, n_test: int, tries_per_item: int, what: str
) -> tuple[list[T], list[T]]:
    """Draw distinct examples (by ``.text``) until both splits are full: an example goes to the test split exactly
    when ``held_out(example)``; a full split's examples are skipped.

    Raises:
        ValueError: ``tries_per_item * (n_train + n_test) + 1000`` draws did not fill both splits.
    """
    train: list[T] = []
    test: list[T] = []
    seen: set[str] = set()
    for _ in range(tries_per_item * (n_train + n_test) + 1000):
        if len(train) >= n_train and len(test) >= n_test:
            break
        example = draw()
        if example.text in seen:  # type: ignore[attr-defined]
            continue
        split = test if held_out(example) else train
        if len(split) < (n_test if split is test else n_train):
            seen.add(example.text)  # type: ignore[attr-defined]
            split.append(example)
    else:  # pragma: no cover - only with absurd sizes
        raise ValueError(f"Cannot generate {n_train} + {n_test} distinct {what}.")
    return train, test


def make_task(seed: int = 0, n_train: int = 2000, n_test: int = 600) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Generate the compositional sentiment task as ``(text, label)`` pairs.

    Args:
        seed: Random seed (the same seed gives the same task).
        n_train: Number of training sentences.
        n_test: Number of held-out test sentences.

    Returns:
        ``(train, test)``: lists of ``(text, label)`` with label 1 = positive, 0 = negative.
    """
    train, test = make_examples(seed, n_train, n_test)
    return [(e.text, e.label) for e in train], [(e.text, e.label) for e in test]


def task_vocabulary() -> list[str]:
    """All words the task can produce, sorted (the vocabulary of the ``--tiny`` tokenizer)."""
    phrases = SUBJECTS + POSITIVE + NEGATIVE + NEGATIONS + VERBS + INTENSIFIERS + PREFIXES + TAILS + NEGATED_TAILS
    return sorted({word for phrase in phrases for word in phrase.split()})
