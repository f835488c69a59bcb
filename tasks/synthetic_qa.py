"""A synthetic closed-book question-answering suite (`make_suite`) for a CPU-sized Imagination-Augmented
Generation demonstration: invented entities whose facts are stated in gold documents (pretraining corpus and
Fusion-in-Decoder passages), template questions split into train and held-out test facts, and noisy
"imagined" documents standing in for what an LLM would write from the question. Pure Python, stdlib only.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re

ATTRIBUTES: tuple[str, ...] = ("city", "profession", "color", "pet", "year", "instrument")

# Pools are disjoint across attributes and no value is a substring of another (tests check it), so finding a
# value in a text tells which attribute it states, and an answer found in a text is really stated there.
_VALUE_POOLS: dict[str, tuple[str, ...]] = {
    "city": ("Marobel", "Quintara", "Velmorra", "Ostrevin", "Kaldune", "Brisca", "Thornmere", "Ulvania",
             "Sarneth", "Pellidor", "Drumvale", "Nerisso", "Calvenna", "Yorlith", "Faskirk", "Hollowmar",
             "Zennetra", "Wistral", "Orbecca", "Lunsford"),
    "profession": ("baker", "carpenter", "tailor", "fisherman", "potter", "weaver", "mason", "farmer",
                   "sailor", "miner", "painter", "doctor", "teacher", "lawyer", "nurse", "chef", "pilot",
                   "jeweler", "gardener", "librarian", "butcher", "architect"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray", "brown",
              "pink", "violet", "crimson", "teal", "amber", "silver", "indigo", "maroon"),
    "pet": ("cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goat", "horse", "ferret", "owl",
            "lizard", "snake", "goldfish", "pony", "canary", "hedgehog", "mouse", "iguana"),
    "year": tuple(str(year) for year in range(1803, 2000, 8)),
    "instrument": ("piano", "violin", "cello", "flute", "harp", "trumpet", "drums", "guitar", "clarinet",
                   "oboe", "banjo", "accordion", "saxophone", "tuba", "mandolin", "harmonica", "bagpipes",
                   "trombone"),
}

# One way to state each fact in a document; "{article}" is "a" or "an" for the value.
_STATEMENTS: dict[str, str] = {
    "city": "{name} lives in {value}.",
    "profession": "{name} works as {article} {value}.",
    "color": "The favorite color of {name} is {value}.",
    "pet": "{name} keeps {article} {value} as a pet.",
    "year": "{name} was born in {value}.",
    "instrument": "{name} plays the {value}.",
}

_QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": ("In which city does {name} live?", "Where does {name} live?",
             "What is the home city of {name}?"),
    "profession": ("What does {name} do for a living?", "What is the profession of {name}?",
                   "What job does {name} have?"),
    "color": ("What is the favorite color of {name}?", "Which color does {name} like best?"),
    "pet": ("What pet does {name} keep?", "Which animal does {name} keep as a pet?"),
    "year": ("In which year was {name} born?", "When was {name} born?"),
    "instrument": ("Which instrument does {name} play?", "What instrument does {name} play?"),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "k", "s", "th")


@dataclasses.dataclass(frozen=True)
class Entity:
    """An invented person and one value for every attribute, in ATTRIBUTES order."""

    name: str
    facts: tuple[tuple[str, str], ...]

    def fact(self, attribute: str) -> str:
        for key, value in self.facts:
            if key == attribute:
                return value
        raise ValueError(f"synthetic_qa: unknown attribute {attribute!r} (expected one of {ATTRIBUTES})")


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question about one fact of one entity."""

    entity: str
    attribute: str
    question: str
    answer: str


def _statement(name: str, attribute: str, value: str) -> str:
    article = "an" if value[0].lower() in "aeiou" else "a"
    return _STATEMENTS[attribute].format(name=name, value=value, article=article)


@dataclasses.dataclass(frozen=True)
class QASuite:
    """Entities, train QA pairs and held-out test QA pairs (whose facts only documents state)."""

    seed: int
    entities: tuple[Entity, ...]
    train: tuple[QAItem, ...]
    test: tuple[QAItem, ...]
    imagined_accuracy: float
    _by_name: dict = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Frozen, so the lookup table is set through object.__setattr__.
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entities})

    def _rng(self, *parts: object) -> random.Random:
        return random.Random("/".join(["synthetic_qa", str(self.seed), *map(str, parts)]))

    def entity(self, name: str) -> Entity:
        if name not in self._by_name:
            raise ValueError(f"synthetic_qa: no entity named {name!r} in this suite")
        return self._by_name[name]

    def _sentences(self, entity_name: str) -> list[str]:
        entity = self.entity(entity_name)
        return [_statement(entity.name, attribute, value) for attribute, value in entity.facts]

    def document(self, entity_name: str) -> str:
        """The gold document: every fact of the entity, one sentence each, in a seeded per-entity order."""
        sentences = self._sentences(entity_name)
        self._rng("document", entity_name).shuffle(sentences)
        return " ".join(sentences)

    def imagined_document(self, item: QAItem) -> str:
        """A noisy guess at the entity's document: the queried fact (right with probability
        `imagined_accuracy`, else another value of its attribute) and 1-2 other facts, each as noisy."""
        entity = self.entity(item.entity)
        rng = self._rng("imagined", item.entity, item.attribute)
        others = [a for a in ATTRIBUTES if a != item.attribute]
        attributes = [item.attribute] + rng.sample(others, rng.randint(1, 2))
        sentences = []
        for attribute in attributes:
            value = entity.fact(attribute)
            if rng.random() >= self.imagined_accuracy:
                value = rng.choice([v for v in _VALUE_POOLS[attribute] if v != value])
            sentences.append(_statement(entity.name, attribute, value))
        rng.shuffle(sentences)
        return " ".join(sentences)

    def passages(self, item: QAItem, num_passages: int) -> list[str]:
        """The gold document of the item's entity and num_passages-1 other entities' documents, seeded order."""
        if not 1 <= num_passages <= len(self.entities):
            raise ValueError(f"synthetic_qa: num_passages must be in [1, {len(self.entities)}], "
                             f"got {num_passages}")
        rng = self._rng("passages", item.entity, item.attribute, num_passages)
        others = [e.name for e in self.entities if e.name != item.entity]
        names = [item.entity] + rng.sample(others, num_passages - 1)
        rng.shuffle(names)
        return [self.document(name) for name in names]

    def corpus(self, copies: int = 1) -> list[str]:
        """Every entity's document; each further copy restates it with its sentences in another seeded order."""
        if copies < 1:
            raise ValueError(f"synthetic_qa: copies must be >= 1, got {copies}")
        per_entity = [self._restatements(e.name, copies) for e in self.entities]
        return [texts[copy] for copy in range(copies) for texts in per_entity]

    def _restatements(self, entity_name: str, copies: int) -> list[str]:
        texts = [self.document(entity_name)]
        sentences = self._sentences(entity_name)
        # Retry so a copy repeats an earlier order only when (nearly) all orders are taken.
        attempts = min(50, math.factorial(len(sentences)))
        for copy in range(1, copies):
            rng = self._rng("corpus", entity_name, copy)
            for _ in range(attempts):
                rng.shuffle(sentences)
                if " ".join(sentences) not in texts:
                    break
            texts.append(" ".join(sentences))
        return texts

    def vocabulary_text(self) -> list[str]:
        """Lines a SentencePiece vocabulary is trained on, covering every word any text of the suite holds."""
        lines = [self.document(e.name) for e in self.entities]
        lines += [f"question: {item.question}" for item in self.train + self.test]
        lines += [" ".join(_VALUE_POOLS[attribute]) for attribute in ATTRIBUTES]
        # Imagined documents may state a wrong value with the other article, so every template word is listed.
        templates = [*_STATEMENTS.values(), *(q for qs in _QUESTIONS.values() for q in qs)]
        template_words = " ".join(re.sub(r"\{\w+\}|[?.]", " ", " ".join(templates)).split())
        lines += [f"{template_words} a an", "question context", " ".join("0123456789")]
        return lines


def _make_names(seed: int, count: int) -> list[str]:
    """`count` invented two-word names: unique, none inside another, none sharing text with a value."""
    rng = random.Random(f"synthetic_qa/{seed}/names")
    values = [v.lower() for pool in _VALUE_POOLS.values() for v in pool]

    def word() -> str:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)]
        return "".join(syllables).capitalize()

    names: list[str] = []
    while len(names) < count:
        candidate = f"{word()} {word()}"
        parts = candidate.lower().split()
        if any(p in v or v in p for p in parts for v in values):
            continue
        if any(candidate in n or n in candidate for n in names):
            continue
        names.append(candidate)
    return names


def make_suite(seed: int = 0, num_entities: int = 64, test_attributes_per_entity: int = 1,
               imagined_accuracy: float = 0.75, test_entity_fraction: float = 0.0) -> QASuite:
    """Build the suite deterministically from the arguments.

    Each entity's `test_attributes_per_entity` test attributes walk one seeded order of ATTRIBUTES, entity
    after entity, so every attribute is tested once num_entities * test_attributes_per_entity reaches
    len(ATTRIBUTES); the entity's other attributes are train items. With `test_entity_fraction` > 0 the split
    is by entity instead: that share of the entities (seeded, at least one) are asked about at test time only
    (every attribute), the others' facts are all train items, so no test entity is ever seen in a QA pair.
    """
    if not 0.0 <= test_entity_fraction < 1.0:
        raise ValueError(f"synthetic_qa: test_entity_fraction must be in [0, 1), got {test_entity_fraction}")
    if num_entities < 2:
        raise ValueError(f"synthetic_qa: num_entities must be >= 2, got {num_entities}")
    if not 1 <= test_attributes_per_entity <= len(ATTRIBUTES) - 1:
        raise ValueError(f"synthetic_qa: test_attributes_per_entity must be in [1, {len(ATTRIBUTES) - 1}], "
                         f"got {test_attributes_per_entity}")
    if not 0.0 <= imagined_accuracy <= 1.0:  # also rejects NaN
        raise ValueError(f"synthetic_qa: imagined_accuracy must be in [0, 1], got {imagined_accuracy}")

    names = _make_names(seed, num_entities)
    fact_rng = random.Random(f"synthetic_qa/{seed}/facts")
    entities = tuple(
        Entity(name, tuple((attribute, fact_rng.choice(_VALUE_POOLS[attribute])) for attribute in ATTRIBUTES))
        for name in names
    )

    test_order = list(ATTRIBUTES)
    random.Random(f"synthetic_qa/{seed}/split").shuffle(test_order)
    train: list[QAItem] = []
    test: list[QAItem] = []
    held_out: set[str] = set()
    if test_entity_fraction > 0:
        count = min(num_entities - 1, max(1, round(test_entity_fraction * num_entities)))
        held_out = set(random.Random(f"synthetic_qa/{seed}/test_entities").sample(names, count))
    for index, entity in enumerate(entities):
        start = index * test_attributes_per_entity
        tested = {test_order[(start + j) % len(ATTRIBUTES)] for j in range(test_attributes_per_entity)}
        if test_entity_fraction > 0:
            tested = set(ATTRIBUTES) if entity.name in held_out else set()
        for attribute, value in entity.facts:
            template = random.Random(f"synthetic_qa/{seed}/question/{entity.name}/{attribute}").choice(
                _QUESTIONS[attribute])
            item = QAItem(entity.name, attribute, template.format(name=entity.name), value)
            (test if attribute in tested else train).append(item)
    return QASuite(seed, entities, tuple(train), tuple(test), float(imagined_accuracy))
