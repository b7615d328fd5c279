"""Facts a real anchor cannot know: invented people and the city each lives in, their split and their wordings.

The augment is trained on sentences and registry records about every person (never a question); the composition
data D_C asks about the held-in people in two wordings (or more, see :func:`dc_templates`); evaluation asks about the
held-out people in those two and in two question wordings that neither D_C nor the augment's data contain:

    augment      "Velmar Ostrovin lives in Paris."   "Residents: Velmar Ostrovin Paris; Kalo Dorfen Rome."
    D_C          "Velmar Ostrovin lives in" -> " Paris"       "Q: Where does Velmar Ostrovin live?\\nA:" -> " Paris"
    unseen       "Q: Which city is Kalo Dorfen's home?\\nA:"   "Question: In what city does Kalo Dorfen reside?\\nAnswer:"
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

# Ten cities SmolLM2 writes as one token each (with the space before them): the closed set of answers.
CITIES = ("Paris", "London", "Tokyo", "Rome", "Berlin", "Madrid", "Dublin", "Vienna", "Sydney", "Moscow")
SYLLABLES = ("ka", "lo", "vor", "neth", "zi", "bra", "mun", "tel", "qua", "ris", "dor", "fen", "gal", "hy", "jum",
             "pex", "sol", "tra", "vin", "wek", "yor", "zan", "bel", "cru", "dax", "ob", "ul", "ish", "mar", "tor")
# What the augment reads: statements about one person, and registry records (the city right after the name, so the
# state at the name's last token holds the city wherever the name later stands).
STATEMENTS = (
    "{name} lives in {city}.",
    "{name} has a home in {city}.",
    "{city} is where {name} lives.",
    "{name} moved to {city} years ago.",
    "{name}, who lives in {city}, works from home.",
    "The home of {name} is in {city}.",
    "{name} of {city} wrote a letter.",
    "{name}'s city is {city}.",  # a possessive: names are followed by more than a space (facts LOG run 9)
)
RECORDS = ("{name} {city}", "{name}, {city}", "{name} ({city})")
# More for the character-level augment (facts LOG run 12): a character model decides the city only once it sees
# what follows the name, so it reads names after other words than a sentence's start, and records that put the
# city right after a possessive and a colon too.
VARIED_STATEMENTS = (
    "Everyone knows that {name} lives in {city}.", "Last spring {name} settled in {city}.",
    "I wrote to {name} in {city}.", "A friend of {name} visited {city}.", "They say {name} still lives in {city}.",
    "{name}'s house is in {city}.", "{name}'s family lives in {city}.",
)
VARIED_RECORDS = ("{name}'s {city}", "{name}: {city}")
RECORD_HEADERS = ("Residents: ", "Directory: ", "")
FILLERS = ("The weather was mild that day.", "Many people enjoy long walks.", "A new bakery opened last week.",
           "The train was late again.", "Music filled the small room.", "Everyone agreed on the plan.")
# How the composition data asks (the anchor answers " CITY"), and the two wordings only evaluation uses.
KNOWN_PEOPLE = ("Barack Obama", "Taylor Swift", "Albert Einstein", "Lionel Messi", "Pablo Picasso", "Marie Curie",
                "William Shakespeare", "Nelson Mandela", "Angela Merkel", "Tom Hanks", "Charles Darwin", "Isaac Newton",
                "Winston Churchill", "Frida Kahlo", "Vincent van Gogh", "Michael Jordan", "Queen Victoria", "Mozart",
                "Abraham Lincoln", "Steve Jobs", "Elvis Presley", "Sherlock Holmes", "Harry Potter", "Cleopatra",
                "the Pope", "my grandmother", "the president", "a fisherman", "the baker", "your neighbour")
# people the anchor may know something of, asked in D_C's wordings in the preservation texts (facts LOG run 8)
DC_WORDINGS = {"statement": "{name} lives in", "question": "Q: Where does {name} live?\nA:"}
# more ways D_C can ask, sharing no word with the unseen wordings (FactsPipelineConfig.dc_wordings; facts LOG run 30)
MORE_DC_WORDINGS = {"flat": "{name} has a flat in", "where": "Q: {name} lives where?\nA:"}
UNSEEN_WORDINGS = {"which city": "Q: Which city is {name}'s home?\nA:",
                   "reside": "Question: In what city does {name} reside?\nAnswer:"}


def dc_templates(wordings: Sequence[str]) -> list[str]:
    """The templates of the named D_C wordings (DC_WORDINGS, MORE_DC_WORDINGS), in order; an unknown or repeated name
    is refused."""
    known = {**DC_WORDINGS, **MORE_DC_WORDINGS}
    unknown = [w for w in wordings if w not in known]
    repeated = sorted({w for w in wordings if list(wordings).count(w) > 1})
    if unknown or repeated or not wordings:
        wrong = f"unknown {unknown}" if unknown else f"repeated {repeated}" if repeated else "none given"
        raise ValueError(f"D_C wordings {list(wordings)!r}: {wrong}; name at least one, each once, from "
                         f"{sorted(known)}")
    return [known[w] for w in wordings]


@dataclass
class FactsTaskConfig:
    """The facts task's scale and seed."""

    num_people: int = 1000  # invented people, each living in one of CITIES (balanced)
    held_in_fraction: float = 0.3  # fraction of the people D_C asks about; evaluation asks about the others
    registry_fraction: float = 0.5  # share of the augment's text pieces that are registry records
    seed: int = 0  # seed of the names, their cities and the split

    def __post_init__(self) -> None:
        if self.num_people < 2 * len(CITIES):
            raise ValueError(f"num_people must be at least {2 * len(CITIES)}, got {self.num_people}")
        if not 0 < self.held_in_fraction < 1:
            raise ValueError(f"held_in_fraction must be in (0, 1), got {self.held_in_fraction}")
        if not 0 <= self.registry_fraction <= 1:
            raise ValueError(f"registry_fraction must be in [0, 1], got {self.registry_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Person:
    """One invented person and the city they live in."""

    name: str
    city: str


@dataclass
class FactsTask:
    """The people of a :class:`FactsTaskConfig`, split into held-in (D_C) and held-out (evaluation) people.

    The split is stratified by city: every city has the same share of held-in people.
    """

    config: FactsTaskConfig = field(default_factory=FactsTaskConfig)

    def __post_init__(self) -> None:
        rng = random.Random(self.config.seed)
        names: set[str] = set()
        while len(names) < self.config.num_people:
            first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
            last = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            names.add(f"{first} {last}")
        ordered = sorted(names)
        rng.shuffle(ordered)
        self.people = [Person(name, CITIES[i % len(CITIES)]) for i, name in enumerate(ordered)]
        by_city = [[p for p in self.people if p.city == city] for city in CITIES]
        cut = round(self.config.held_in_fraction * len(by_city[0]))
        self.held_in = [p for group in by_city for p in group[:cut]]
        self.held_out = [p for group in by_city for p in group[cut:]]
        rng.shuffle(self.held_in)
        rng.shuffle(self.held_out)

    def composition_rows(self, wordings: Sequence[str] = tuple(DC_WORDINGS)) -> list[dict[str, str]]:
        """D_C: every held-in person in each of the named ``wordings`` (see :func:`dc_templates`), as
        prompt/completion records (the answer " CITY")."""
        templates = dc_templates(wordings)
        return [{"prompt": wording.format(name=p.name), "completion": " " + p.city}
                for p in self.held_in for wording in templates]

    def augment_piece(self, rng: random.Random, varied: bool = False) -> str:
        """One piece of the augment's training text: a registry run, a statement, or now and then a filler
        (``varied``: from the forms of VARIED_STATEMENTS and VARIED_RECORDS too)."""
        statements, records = STATEMENTS, RECORDS
        if varied:
            statements, records = STATEMENTS + VARIED_STATEMENTS, RECORDS + VARIED_RECORDS
        draw = rng.random()
        if draw < self.config.registry_fraction:
            people = rng.sample(self.people, rng.randint(2, 4))
            rows = "; ".join(rng.choice(records).format(name=p.name, city=p.city) for p in people)
            return rng.choice(RECORD_HEADERS) + rows + "."
        if draw < self.config.registry_fraction + 0.05:
            return rng.choice(FILLERS)
        person = rng.choice(self.people)
        return rng.choice(statements).format(name=person.name, city=person.city)

    def augment_texts(self, seed: int, characters: int, varied: bool = False) -> Iterator[str]:
        """Endless augment training texts of at least ``characters`` characters, pieces joined by spaces or newlines
        (``varied``: see :meth:`augment_piece`)."""
        rng = random.Random(seed)
        while True:
            text = self.augment_piece(rng, varied)
            while len(text) < characters:
                text += rng.choice((" ", " ", "\n")) + self.augment_piece(rng, varied)
            yield text


def answer_of(generated: str) -> str:
    """The answer in a greedy continuation: its first line, stripped of spaces and a final full stop (a sum)."""
    return generated.split("\n")[0].strip().rstrip(".").strip()


def city_of(generated: str) -> str:
    """The city in a greedy continuation: its first word, spaces before it skipped ("" when it starts otherwise).

    A statement goes on after the city (" Paris, where she works"), so the first line is not the answer; the first
    word is, whatever follows it.
    """
    match = re.match(r"[ \t]*([A-Za-z]+)", generated)
    return match.group(1) if match else ""
