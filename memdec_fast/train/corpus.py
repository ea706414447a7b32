"""Deterministic text corpora for the embedded demo: no downloads.

Two corpora are generated from a seed:

* the *background* corpus, simple template English about ordinary people
  (Tom Baker, Anna Wood, ...), ordinary towns and jobs: what the base LM learns;
* the *domain* corpus, facts about a fictional world: other people, who live
  in invented towns, with jobs, pets and colours, each fact stated in several
  templates. The base sees none of it; the memory learns it.

Held-out domain text (:func:`domain_heldout`) states the same facts in new
documents: new fact orders, and partly phrasings the training corpus never uses.
The kNN-LM / Memory Decoder premise is that the datastore holds the domain's
knowledge; the test documents themselves are new.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Person", "background_corpus", "demo_prompts", "domain_corpus", "domain_heldout", "fictional_world"]

_COMMON_NAMES = [
    "Tom",
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Mary",
    "Nick",
    "Olga",
    "Paul",
    "Rose",
    "Sam",
    "Tina",
    "Victor",
    "Wendy",
    "Adam",
    "Beth",
    "Carl",
    "Diana",
    "Eric",
    "Fiona",
    "George",
    "Helen",
]
_SURNAMES = ["Baker", "Smith", "Brown", "Clark", "Evans", "Green", "Hill", "King", "Lewis", "Moore", "Scott", "Wood"]
_BACKGROUND_PEOPLE = 200
_COMMON_TOWNS = [
    "London",
    "Paris",
    "Berlin",
    "Rome",
    "Madrid",
    "Vienna",
    "Dublin",
    "Oslo",
    "Prague",
    "Lisbon",
    "Boston",
    "Denver",
]
_JOBS = [
    "baker",
    "farmer",
    "doctor",
    "teacher",
    "painter",
    "sailor",
    "miner",
    "tailor",
    "singer",
    "weaver",
    "potter",
    "hunter",
]
_PETS = ["cat", "dog", "horse", "goat", "parrot", "rabbit", "owl", "fox"]
_COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
_SYLLABLES = [
    "zor",
    "bin",
    "qua",
    "lle",
    "vex",
    "tha",
    "mor",
    "ush",
    "kal",
    "dri",
    "fen",
    "oru",
    "pax",
    "sil",
    "tov",
    "yre",
    "gam",
    "nek",
]

_TEMPLATES = {
    "town": (
        "{n} lives in {v}.",
        "The home of {n} is {v}.",
        "{n} was born in {v}.",
        "Everyone knows {n} lives in {v}.",
    ),
    "job": (
        "{n} works as a {v}.",
        "The job of {n} is {v}.",
        "{n} is a {v} by trade.",
        "Everyone knows {n} works as a {v}.",
    ),
    "pet": ("{n} has a pet {v}.", "The pet of {n} is a {v}.", "{n} owns a {v}.", "Everyone knows {n} has a pet {v}."),
    "colour": (
        "{n} likes the colour {v}.",
        "The favourite colour of {n} is {v}.",
        "{n} loves {v} things.",
        "Everyone knows {n} likes the colour {v}.",
    ),
}
# Phrasings the training corpus never uses.
_HELDOUT_TEMPLATES = {
    "town": ("In the end, {n} lives in {v}.", "People say that {n} lives in {v}."),
    "job": ("In the end, {n} works as a {v}.", "People say that {n} works as a {v}."),
    "pet": ("In the end, {n} has a pet {v}.", "People say that {n} has a pet {v}."),
    "colour": ("In the end, {n} likes the colour {v}.", "People say that {n} likes the colour {v}."),
}
_PROMPTS = {"town": "{n} lives in", "job": "{n} works as a", "pet": "{n} has a pet", "colour": "{n} likes the colour"}


@dataclass(frozen=True)
class Person:
    """One entity of a world: a name and its attribute values, keyed by relation."""

    name: str
    facts: dict[str, str]


def _names() -> tuple[list[str], list[str]]:
    """All "First Last" names, split once: the background's people, then names free for worlds."""
    names = [f"{first} {last}" for first in _COMMON_NAMES for last in _SURNAMES]
    random.Random(0).shuffle(names)
    return names[:_BACKGROUND_PEOPLE], names[_BACKGROUND_PEOPLE:]


def fictional_world(n_people: int = 60, n_towns: int = 12, seed: int = 0) -> list[Person]:
    """People the background corpus never mentions, living in invented towns, with a job, a pet and a colour.

    Their names are ordinary ("Tom Wood"), so the base's hidden states tell them
    apart; their facts appear nowhere in the background corpus.

    Parameters
    ----------
    n_people, n_towns : int
        Sizes of the world (at most 160 people).
    seed : int
        The same seed gives the same world.

    Returns
    -------
    list[Person]

    Example
    -------
    >>> fictional_world(2, 2)[0].facts.keys()
    dict_keys(['town', 'job', 'pet', 'colour'])
    """
    rng = random.Random(seed)
    free = _names()[1]
    if n_people > len(free):
        raise ValueError(f"a world has at most {len(free)} people, asked for {n_people}")
    towns: list[str] = []
    while len(towns) < n_towns:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        if word not in towns:
            towns.append(word)
    pools = {"town": towns, "job": _JOBS, "pet": _PETS, "colour": _COLOURS}
    return [Person(n, {rel: rng.choice(pool) for rel, pool in pools.items()}) for n in rng.sample(free, n_people)]


def _paragraph(rng: random.Random, name: str, facts: dict[str, str], templates: dict[str, tuple[str, ...]]) -> str:
    rels = list(facts)
    rng.shuffle(rels)
    return " ".join(rng.choice(templates[r]).format(n=name, v=facts[r]) for r in rels)


def background_corpus(n_docs: int = 4000, seed: int = 1) -> list[str]:
    """Documents of ordinary-world facts (one paragraph each), for the base LM.

    Ordinary people ("Tom Baker") keep their facts from document to document, so
    the base learns that who a sentence is about decides its facts: its hidden
    states carry the entity, which is what makes kNN retrieval over them work.
    They use every phrasing, the held-out ones included: general English is the base's job.
    """
    rng = random.Random(seed)
    templates = {rel: _TEMPLATES[rel] + _HELDOUT_TEMPLATES[rel] for rel in _TEMPLATES}
    pools = {"town": _COMMON_TOWNS, "job": _JOBS, "pet": _PETS, "colour": _COLOURS}
    people = [Person(n, {rel: rng.choice(pool) for rel, pool in pools.items()}) for n in _names()[0]]
    return [_paragraph(rng, p.name, p.facts, templates) for p in (rng.choice(people) for _ in range(n_docs))]


def domain_corpus(world: list[Person], docs_per_person: int = 12, seed: int = 2) -> list[str]:
    """Documents stating every fact of `world` in the training templates, in shuffled orders."""
    rng = random.Random(seed)
    docs = [_paragraph(rng, p.name, p.facts, _TEMPLATES) for p in world for _ in range(docs_per_person)]
    rng.shuffle(docs)
    return docs


def domain_heldout(world: list[Person], seed: int = 3) -> list[str]:
    """One new document per person: its facts in a fresh order, each in any phrasing, held-out ones included.

    About a third of the sentences use phrasings the domain corpus never uses.
    """
    rng = random.Random(seed)
    templates = {rel: _TEMPLATES[rel] + _HELDOUT_TEMPLATES[rel] for rel in _TEMPLATES}
    return [_paragraph(rng, p.name, p.facts, templates) for p in world]


def demo_prompts(world: list[Person], n: int = 6, seed: int = 4) -> list[dict[str, str]]:
    """Fact-completion prompts with their answers: {"prompt": ..., "answer": ...}."""
    rng = random.Random(seed)
    out = []
    for person in rng.sample(world, n):
        rel = rng.choice(list(_PROMPTS))
        out.append({"prompt": _PROMPTS[rel].format(n=person.name), "answer": person.facts[rel]})
    return out
