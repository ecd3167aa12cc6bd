"""A synthetic sentiment task for offline runs. It is NOT GLUE data.

``generate_synthetic_glue`` writes ``<out_dir>/Synthetic/train.tsv`` and ``dev.tsv`` in the SST-2
layout (header ``sentence<TAB>label``, label 0/1), so the ``synthetic`` task loads exactly like
SST-2 from a GLUE-style folder, with no download.

Each sentence is built from small vocabularies: a subject, a verb, an optional intensifier and
exactly one polar adjective, optionally a negation word (``not``, ``never``, ``hardly``; either
right after the verb or in an opening clause such as "i would never say that"), and 0-3 neutral
filler clauses before or after the main clause. Lengths range over 5-30 words (the final ``.``
not counted), so padding matters.

The label is ``adjective is positive XOR sentence is negated`` ("not bad" is positive, "hardly
great" is negative). Labels are exactly balanced, the negation is drawn independently of the label
and the adjective's polarity is then fixed by the rule, so every word (each adjective, each
negation word) occurs equally often in both classes in expectation: unigram counts carry no signal
and a bag-of-words classifier scores near chance, while the rule (``synthetic_label``) is exact.

Output is a pure function of the arguments: all randomness comes from ``random.Random(seed)``
and files are written as UTF-8 with ``\\n`` line endings, so the bytes are identical on every run
and platform. No sentence occurs twice across train and dev.
"""

from __future__ import annotations

import os
import random

from ..errors import BertAccumError

SYNTHETIC_DIRNAME = "Synthetic"
MIN_WORDS = 5
MAX_WORDS = 30

POSITIVE_ADJECTIVES = (
    "good",
    "great",
    "excellent",
    "wonderful",
    "delightful",
    "brilliant",
    "charming",
    "pleasant",
    "superb",
    "lovely",
    "enjoyable",
    "impressive",
)
NEGATIVE_ADJECTIVES = (
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "dreadful",
    "poor",
    "mediocre",
    "annoying",
    "disappointing",
    "tedious",
    "unpleasant",
)
NEGATIONS = ("not", "never", "hardly")

SUBJECTS = (
    "the movie",
    "the film",
    "the plot",
    "the acting",
    "the soundtrack",
    "the ending",
    "the script",
    "the dialogue",
    "this sequel",
    "the main character",
    "the cinematography",
    "the whole experience",
    "the second half",
    "the director 's latest work",
    "the opening scene",
    "the cast",
)
VERBS = ("is", "was", "seems", "seemed", "felt", "looks", "remains", "turned out to be", "proved")
INTENSIFIERS = ("very", "really", "quite", "extremely", "rather", "so", "truly", "pretty")
# Opening clauses that end in "that"; the negated variants take one word from NEGATIONS.
PLAIN_OPENERS = ("i think that", "my friend said that", "the critics agree that", "everyone knows that")
NEGATED_OPENERS = ("i would {neg} say that", "i could {neg} claim that", "we {neg} felt that")
FILLERS = (
    "in the end",
    "to be fair",
    "after the long weekend",
    "according to my sister",
    "as far as i can tell",
    "for what it is worth",
    "on a rainy tuesday evening",
    "with the lights off",
    "from the back row of the theater",
    "at least for me",
    "despite the popcorn",
    "on the whole",
    "if you ask the people next to me",
    "in the small cinema downtown",
    "during the late show",
    "by the time the credits rolled",
)

_POLARITY = {**{w: 1 for w in POSITIVE_ADJECTIVES}, **{w: 0 for w in NEGATIVE_ADJECTIVES}}


def synthetic_label(sentence: str) -> int:
    """The task's exact rule: 1 iff (the adjective is positive) XOR (the sentence contains a negation)."""
    words = sentence.split()
    adjectives = [w for w in words if w in _POLARITY]
    if len(adjectives) != 1:
        raise BertAccumError(f"not a synthetic sentence (needs exactly one polar adjective): {sentence!r}")
    negated = any(w in NEGATIONS for w in words)
    return _POLARITY[adjectives[0]] ^ int(negated)


def _sentence(rng: random.Random, label: int, negation_rate: float = 0.5) -> str:
    """Draw one sentence of ``label``; negation is drawn first, polarity follows from the rule."""
    negated = rng.random() < negation_rate
    positive = bool(label) != negated
    adjective = rng.choice(POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES)
    negation = rng.choice(NEGATIONS) if negated else None

    opener = None
    if negated and rng.random() < 0.3:
        opener = rng.choice(NEGATED_OPENERS).format(neg=negation)
        negation = None  # the opener carries the sentence's only negation
    elif rng.random() < 0.2:
        opener = rng.choice(PLAIN_OPENERS)

    core = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    if negation is not None:
        core.append(negation)
    if rng.random() < 0.5:
        core.append(rng.choice(INTENSIFIERS))
    core.append(adjective)
    main = " ".join(core)
    if opener is not None:
        main = f"{opener} {main}"

    parts = [main]
    for filler in rng.sample(FILLERS, rng.choice((0, 0, 1, 1, 2, 3))):
        if rng.random() < 0.5:
            parts.insert(0, filler)
        else:
            parts.append(filler)
    return " , ".join(parts) + " ."


def _word_count(sentence: str) -> int:
    return sum(1 for w in sentence.split() if w not in {",", "."})


def _split(rng: random.Random, n: int, seen: set[str], negation_rate: float = 0.5) -> list[tuple[str, int]]:
    labels = [i % 2 for i in range(n)]  # exactly balanced (the odd one out is 0)
    rng.shuffle(labels)
    rows = []
    for label in labels:
        for _ in range(10_000):
            sentence = _sentence(rng, label, negation_rate)
            if MIN_WORDS <= _word_count(sentence) <= MAX_WORDS and sentence not in seen:
                break
        else:
            raise BertAccumError(f"cannot draw {n} distinct synthetic sentences; ask for fewer examples")
        seen.add(sentence)
        rows.append((sentence, label))
    return rows


def _write_tsv(path: str, rows: list[tuple[str, int]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in rows:
            f.write(f"{sentence}\t{label}\n")
    os.replace(tmp, path)


def generate_synthetic_glue(out_dir: str, n_train: int = 2000, n_dev: int = 400, seed: int = 0,
                            negation_rate: float = 0.5) -> str:
    """Write the synthetic (not GLUE) task to ``<out_dir>/Synthetic/{train,dev}.tsv``; return ``out_dir``.

    Same arguments give the same bytes on every run and platform; different seeds give different data.
    ``negation_rate`` is the share of negated sentences: at the default 0.5 no word predicts the label; below it
    the adjective's polarity alone is right 1 - negation_rate of the time, so a model learns part of the task in
    a few steps and the negations after (the offline demo uses 0.25 to learn within its 24 steps).
    """
    if not 0.0 <= negation_rate <= 1.0:
        raise BertAccumError(f"negation_rate must be in [0, 1], got {negation_rate!r}")
    for name, n in (("n_train", n_train), ("n_dev", n_dev)):
        if not isinstance(n, int) or n < 2:
            raise BertAccumError(f"{name} must be an integer >= 2, got {n!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    train = _split(rng, n_train, seen, negation_rate)
    dev = _split(rng, n_dev, seen, negation_rate)
    folder = os.path.join(out_dir, SYNTHETIC_DIRNAME)
    os.makedirs(folder, exist_ok=True)
    _write_tsv(os.path.join(folder, "train.tsv"), train)
    _write_tsv(os.path.join(folder, "dev.tsv"), dev)
    return out_dir
