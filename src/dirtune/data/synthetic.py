"""A small procedural world: the offline demo's data and tokenizer.

The world is a set of people, each with a town, a trade, a favourite colour, a pet and a
friend. From it come two domains:

- the *source* domain: English prose about the people, many phrasings of the same facts
  (the pretraining corpus, ``source_train.txt``, and a held-out ``source_valid.txt`` whose
  loss measures forgetting);
- the *task*: alpaca records (``instruction``, ``input``, ``output``) that ask about the same
  facts in another form: short answers to questions, and profile cards. The task splits are
  disjoint *by person*, so the validation and test people are known only from the source
  prose: a model that learned the source domain can transfer that knowledge.

Everything is deterministic given the seed. The tokenizer is character-level over printable
ASCII and newline (any prompt template renders without unknown tokens), with LLaMA's special
ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, and ``<pad>`` 3.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Person",
    "World",
    "make_world",
    "source_paragraphs",
    "task_records",
    "write_demo_data",
    "char_tokenizer",
    "SPECIAL_TOKENS",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, as in LLaMA (pad added)
_ALPHABET = [chr(i) for i in range(32, 127)] + ["\n"]  # printable ASCII and newline

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "l", "sh", "th", "m", "x"]
_TOWN_ENDS = ["ford", "mere", "holt", "wick", "dale", "by"]
_TRADES = ["baker", "potter", "smith", "weaver", "miller", "fisher", "tailor", "carpenter",
           "healer", "scribe", "farmer", "mason"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_ANIMALS = ["cat", "dog", "goat", "owl", "horse", "rabbit", "crow", "hedgehog"]
ATTRIBUTES = ("town", "trade", "colour", "pet", "friend")


@dataclass(frozen=True)
class Person:
    name: str
    town: str
    trade: str
    colour: str
    pet: str
    friend: str  # another person's name


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    towns: tuple[str, ...]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)


def make_world(n_people: int = 48, n_towns: int = 8, seed: int = 0) -> World:
    """A world of `n_people` people with distinct names, each with a friend other than themself."""
    if n_people < 2:
        raise ValueError(f"n_people: {n_people!r} is not valid; expected an integer >= 2")
    if n_towns < 1:
        raise ValueError(f"n_towns: {n_towns!r} is not valid; expected an integer >= 1")
    rng = random.Random(f"world-{seed}")
    towns: list[str] = []
    while len(towns) < n_towns:
        t = (_word(rng, 1) + rng.choice(_TOWN_ENDS)).capitalize()
        if t not in towns:
            towns.append(t)
    names: list[str] = []
    while len(names) < n_people:
        n = _word(rng, 2).capitalize()
        if n not in names and n not in towns:
            names.append(n)
    people = []
    for i, name in enumerate(names):
        friend = names[(i + rng.randrange(1, n_people)) % n_people]  # never oneself
        people.append(Person(name, rng.choice(towns), rng.choice(_TRADES), rng.choice(_COLOURS),
                             rng.choice(_ANIMALS), friend))
    return World(tuple(people), tuple(towns))


# ---------------------------------------------------------------- source domain: prose

def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


_FACT_SENTENCES = {
    "town": ["{n} lives in {v}.", "{n} has a house in {v}.", "The home of {n} is {v}.",
             "In {v} lives {n}.", "{n} was born in {v} and never left."],
    "trade": ["{n} works as {a}.", "{n} is {a} by trade.", "By day, {n} is {a}.",
              "Everyone knows {n} as the {v}."],
    "colour": ["{n} likes the colour {v}.", "The favourite colour of {n} is {v}.",
               "{n} wears {v} every day.", "{n} painted the door {v}."],
    "pet": ["{n} keeps {a}.", "{n} has a pet {v}.", "{A} lives with {n}.",
            "The {v} of {n} sleeps by the fire."],
    "friend": ["{n} is a friend of {v}.", "{n} and {v} are old friends.", "{n} often visits {v}.",
               "On market days {n} eats with {v}."],
}
_OPENERS = ["", "", "", "Also, ", "They say that ", "It is true that "]


def _fact_sentence(p: Person, attr: str, rng: random.Random) -> str:
    v = getattr(p, attr)
    s = rng.choice(_FACT_SENTENCES[attr]).format(n=p.name, v=v, a=_a(v), A=_a(v).capitalize())
    opener = rng.choice(_OPENERS)
    return opener + (s[0].lower() + s[1:] if opener and not s.startswith(p.name) else s)


def _paragraph(world: World, rng: random.Random) -> str:
    p = rng.choice(world.people)
    attrs = rng.sample(ATTRIBUTES, rng.randint(2, 4))
    sentences = [_fact_sentence(p, a, rng) for a in attrs]
    if rng.random() < 0.3:  # a second person: the friend, so facts appear in each other's context
        f = next(q for q in world.people if q.name == p.friend)
        sentences.append(_fact_sentence(f, rng.choice(ATTRIBUTES[:4]), rng))
    return " ".join(sentences)


def source_paragraphs(world: World, n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """`n` distinct paragraphs of prose about the world, none of them in `exclude`."""
    rng = random.Random(f"source-{seed}")
    out: list[str] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot make {n} distinct paragraphs from a world of "
                             f"{len(world.people)} people; ask for fewer or a larger world")
        para = _paragraph(world, rng)
        if para not in seen:
            seen.add(para)
            out.append(para)
    return out


# ---------------------------------------------------------------- task: alpaca records

_QUESTIONS = {
    "town": ["Where does {n} live?", "Which town is home to {n}?"],
    "trade": ["What does {n} do for a living?", "What is the trade of {n}?"],
    "colour": ["Which colour does {n} like best?", "What is the favourite colour of {n}?"],
    "pet": ["What animal does {n} keep?", "Which pet lives with {n}?"],
    "friend": ["Who is a friend of {n}?", "Whom does {n} often visit?"],
}


def _card(p: Person) -> str:
    return (f"name: {p.name}; town: {p.town}; trade: {p.trade}; colour: {p.colour}; "
            f"pet: {p.pet}; friend: {p.friend}")


def task_records(people: list[Person] | tuple[Person, ...]) -> list[dict]:
    """Every task record about `people`: two questions per attribute (short answers), one card."""
    recs = []
    for p in people:
        for attr in ATTRIBUTES:
            for q in _QUESTIONS[attr]:
                recs.append({"instruction": "Answer with one word.", "input": q.format(n=p.name),
                             "output": getattr(p, attr)})
        recs.append({"instruction": f"Write the profile card of {p.name}.", "input": "",
                     "output": _card(p)})
    return recs


def _split_people(world: World, seed: int, valid: float, test: float) -> tuple[list, list, list]:
    rng = random.Random(f"split-{seed}")
    people = list(world.people)
    rng.shuffle(people)
    n_valid = max(1, round(valid * len(people)))
    n_test = max(1, round(test * len(people)))
    if n_valid + n_test >= len(people):
        raise ValueError(f"a world of {len(people)} people is too small for valid={valid}, test={test}")
    return people[n_valid + n_test:], people[:n_valid], people[n_valid:n_valid + n_test]


def write_demo_data(out_dir: str | Path, seed: int = 0, n_people: int = 48, n_towns: int = 8,
                    n_source_train: int = 1500, n_source_valid: int = 150,
                    valid_share: float = 0.17, test_share: float = 0.17) -> dict[str, Path]:
    """Write the five demo files into `out_dir` and return their paths by name.

    ``source_train.txt`` / ``source_valid.txt``: one paragraph per line, no line in both.
    ``task_{train,valid,test}.jsonl``: alpaca records; the three splits are about disjoint people,
    shuffled (train) with a seeded generator.
    """
    world = make_world(n_people, n_towns, seed)
    train_p, valid_p, test_p = _split_people(world, seed, valid_share, test_share)
    src_train = source_paragraphs(world, n_source_train, seed)
    src_valid = source_paragraphs(world, n_source_valid, seed + 7919, exclude=set(src_train))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task_train = task_records(train_p)
    random.Random(f"order-{seed}").shuffle(task_train)
    paths = {
        "source_train": out / "source_train.txt",
        "source_valid": out / "source_valid.txt",
        "task_train": out / "task_train.jsonl",
        "task_valid": out / "task_valid.jsonl",
        "task_test": out / "task_test.jsonl",
    }
    paths["source_train"].write_text("\n".join(src_train) + "\n", encoding="utf-8")
    paths["source_valid"].write_text("\n".join(src_valid) + "\n", encoding="utf-8")
    for key, recs in (("task_train", task_train), ("task_valid", task_records(valid_p)),
                      ("task_test", task_records(test_p))):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return paths


# ---------------------------------------------------------------- tokenizer

def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: 4 specials + 96 characters = 100 ids.

    Like LLaMA's tokenizer it prepends ``<s>`` and does not append ``</s>``; characters outside
    the alphabet map to ``<unk>``. Save it with ``save_pretrained(dir)``; ``AutoTokenizer
    .from_pretrained(dir)`` then loads it offline.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + _ALPHABET)}
    # BPE with no merges is a character-level model: every character is its own token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()  # join characters without separators
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=4096)
