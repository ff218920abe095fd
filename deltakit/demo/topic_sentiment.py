"""A six-class compositional task: the topic of a review sentence times its (possibly negated) sentiment.

Sentences such as ``"honestly , the waiter was not very friendly at all"`` are labelled ``2 * topic + polarity``:
the topic (food, service, place) comes from the subject noun, the polarity from the adjective, flipped by a
negation. The test split holds out *vocabulary* and *pairings*:

* two subject nouns per topic and two adjectives per polarity occur only in the test split (the model must carry
  what the pretrained backbone knows about unseen words through the fine-tuning);
* among the training words, some ``(subject, adjective)`` and ``(negation, adjective)`` pairings occur only in the
  test split (the model must compose, not memorise).

Unlike the two-class demo task (:mod:`deltakit.demo.task`), where every delta method reaches 1.0, this one separates
methods at small parameter budgets (measured in ``docs/structure_search.md``). Sentences are short (at most 16
word-piece tokens with ``[CLS]``/``[SEP]`` on MiniLM), so one training run of a few hundred small steps takes
seconds on one core. Everything is generated in code from a seed: offline and deterministic.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from .task import fill_splits

#: The topics, in label order (label = 2 * topic index + polarity).
TOPICS: tuple[str, ...] = ("food", "service", "place")
#: Subject nouns per topic (ten each; :func:`held_out_vocabulary` reserves two per topic for the test split).
SUBJECTS: dict[str, tuple[str, ...]] = {
    "food": ("soup", "pasta", "bread", "dessert", "coffee", "salad", "steak", "pizza", "cake", "sauce"),
    "service": ("waiter", "staff", "manager", "host", "cashier", "waitress", "bartender", "owner", "chef", "server"),
    "place": ("room", "terrace", "hall", "garden", "lobby", "view", "interior", "patio", "entrance", "decor"),
}
#: Adjectives per polarity (index 1: positive, 0: negative), usable with every topic.
ADJECTIVES: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("bad", "awful", "terrible", "poor", "horrible", "dreadful", "disappointing", "unpleasant", "mediocre", "nasty"),
    ("good", "great", "excellent", "wonderful", "lovely", "superb", "fantastic", "pleasant", "amazing", "nice"),
)
#: Negations flip the polarity.
NEGATIONS: tuple[str, ...] = ("not", "never", "hardly")
VERBS: tuple[str, ...] = ("was", "is", "seemed", "felt")
INTENSIFIERS: tuple[str, ...] = ("", "very", "really", "quite")
PREFIXES: tuple[str, ...] = ("", "honestly ,", "i think", "overall ,")
TAILS: tuple[str, ...] = ("", "to me", "at all")
#: Number of classes.
NUM_LABELS = 2 * len(TOPICS)


class TopicExample(NamedTuple):
    """One generated sentence with the parts it was built from.

    Attributes:
        text: The sentence (lower case, words separated by single spaces).
        label: ``2 * topic index + polarity`` (polarity 1: positive after negation).
        subject: The subject noun.
        adjective: The adjective.
        negation: The negation word, or ``""``.
    """

    text: str
    label: int
    subject: str
    adjective: str
    negation: str


class HeldOutParts(NamedTuple):
    """What only the test split may use.

    Attributes:
        subjects: Subject nouns never seen in training.
        adjectives: Adjectives never seen in training.
        subject_adjective: Pairings of training words never seen together in training.
        negation_adjective: ``(negation, adjective)`` pairings never seen in training.
    """

    subjects: frozenset[str]
    adjectives: frozenset[str]
    subject_adjective: frozenset[tuple[str, str]]
    negation_adjective: frozenset[tuple[str, str]]

    def contains(self, example: TopicExample) -> bool:
        """Whether ``example`` uses a held-out word or pairing (then it belongs to the test split)."""
        return (
            example.subject in self.subjects
            or example.adjective in self.adjectives
            or (example.subject, example.adjective) in self.subject_adjective
            or (example.negation, example.adjective) in self.negation_adjective
        )


def held_out_vocabulary(seed: int) -> HeldOutParts:
    """Choose what only the test split uses, for ``seed``.

    Two nouns per topic and two adjectives per polarity are test-only; each remaining noun loses one pairing with
    an adjective of each polarity, and each remaining adjective one negation. Every training word still occurs in
    training, only in other combinations.
    """
    rng = random.Random(f"deltakit-topic-sentiment-heldout-{seed}")
    subjects = {s for topic in TOPICS for s in rng.sample(SUBJECTS[topic], 2)}
    adjectives = {a for polarity in ADJECTIVES for a in rng.sample(polarity, 2)}
    seen_adjectives = [[a for a in polarity if a not in adjectives] for polarity in ADJECTIVES]
    pairs = set()
    for topic in TOPICS:
        for subject in SUBJECTS[topic]:
            if subject not in subjects:
                pairs.update((subject, rng.choice(polarity)) for polarity in seen_adjectives)
    negations = {(rng.choice(NEGATIONS), a) for polarity in seen_adjectives for a in polarity}
    return HeldOutParts(frozenset(subjects), frozenset(adjectives), frozenset(pairs), frozenset(negations))


def _sample(rng: random.Random) -> TopicExample:
    topic = rng.randrange(len(TOPICS))
    polarity = rng.randrange(2)
    subject = rng.choice(SUBJECTS[TOPICS[topic]])
    adjective = rng.choice(ADJECTIVES[polarity])
    negation = rng.choice(NEGATIONS) if rng.random() < 0.5 else ""
    words = [rng.choice(PREFIXES), "the", subject, rng.choice(VERBS), negation, rng.choice(INTENSIFIERS), adjective]
    words.append(rng.choice(TAILS) if negation else rng.choice(TAILS[:2]))  # "at all" only after a negation
    label = 2 * topic + (polarity ^ bool(negation))
    return TopicExample(" ".join(w for w in words if w), label, subject, adjective, negation)


def make_topic_examples(
    seed: int = 0, n_train: int = 2000, n_test: int = 600
) -> tuple[list[TopicExample], list[TopicExample]]:
    """Generate the task with its metadata: distinct sentences, routed to the test split exactly when they use a
    held-out word or pairing (:func:`held_out_vocabulary`). Depends only on the arguments.

    Raises:
        ValueError: The sizes ask for more distinct sentences than the grammar yields.
    """
    held = held_out_vocabulary(seed)
    rng = random.Random(f"deltakit-topic-sentiment-sentences-{seed}")
    return fill_splits(
        lambda: _sample(rng), held.contains, n_train, n_test, 100, "sentences of the topic-sentiment task"
    )


def make_topic_task(
    seed: int = 0, n_train: int = 2000, n_test: int = 600
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The task as ``(text, label)`` pairs: ``(train, test)`` (see :func:`make_topic_examples`)."""
    train, test = make_topic_examples(seed, n_train, n_test)
    return [(e.text, e.label) for e in train], [(e.text, e.label) for e in test]


def topic_vocabulary() -> list[str]:
    """Every word the task can produce, sorted (the vocabulary of a word-level ``--tiny`` tokenizer)."""
    phrases = [*(s for group in SUBJECTS.values() for s in group), *ADJECTIVES[0], *ADJECTIVES[1], *NEGATIONS,
               *VERBS, *INTENSIFIERS, *PREFIXES, *TAILS, "the"]  # fmt: skip
    return sorted({word for phrase in phrases for word in phrase.split()})
