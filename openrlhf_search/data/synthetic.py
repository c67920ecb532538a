"""A deterministic synthetic knowledge base: invented entities, passages, single- and two-hop questions.

Why: the quickstart and the tests need a QA task that (1) ships with the code (no download), (2) *requires*
retrieval, since every answer is an invented name or number that no model can know or guess from the question,
and (3) is small enough to train a tiny model on CPU. Real benchmarks (NQ, HotpotQA) are read by
:mod:`openrlhf_search.data.formats` instead.

The world (all from one ``random.Random(seed)``):

* countries, cities (in a country, on a river, known for a product), companies (an industry, a founding year,
  headquarters in a city, a chief executive), people (a profession, a birth year, a birth city, an employer);
* one passage per entity, 30-60 words, in the Search-R1 corpus format ``{"id", "contents": "\\"Title\\"\\ntext"}``;
  names are built from a small syllable set so the vocabulary stays small (a 2k-token BPE covers it);
* questions: single-hop (``Where was <person> born?`` -> city, ``Which company does <person> work for?``,
  ``In what year was <company> founded?``, ``In which country is <city>?``, ...) and two-hop through a bridge
  entity (``In which country was <person> born?`` = person -> birth city -> country; ``In which city is the
  headquarters of the company <person> works for?`` = person -> employer -> city; ...).

Train and test are two disjoint sub-worlds: every entity (country, city, company, person) belongs to one split and
only refers to entities of its split, so test questions never mention, or are answered by, a train entity.
The corpus holds both sub-worlds (a retriever must find the right passages among all of them).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from openrlhf_search.data.formats import read_corpus_jsonl, read_flashrag_jsonl
from openrlhf_search.data.types import QASample
from openrlhf_search.env.observation import format_observation
from openrlhf_search.env.templates import get_template
from openrlhf_search.retrieval.types import Document, Hit

__all__ = [
    "SyntheticKB",
    "Demonstration",
    "generate_kb",
    "name_words",
    "fresh_worlds",
    "write_kb",
    "synthetic_trajectories",
    "load_kb_dir",
]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "x"]

_PROFESSIONS = [
    "painter",
    "engineer",
    "teacher",
    "chemist",
    "pilot",
    "architect",
    "farmer",
    "doctor",
    "writer",
    "baker",
]
_INDUSTRIES = ["shipping", "textile", "software", "mining", "publishing", "farming", "glass", "battery", "toy", "tea"]
_PRODUCTS = ["glass", "silk", "cheese", "clocks", "paper", "honey", "boats", "lamps", "salt", "wool"]
_HOBBIES = ["chess", "sailing", "gardening", "running", "music", "painting", "fishing", "cooking"]
_SIZES = ["small", "large", "busy", "quiet", "old", "new"]


@dataclass
class SyntheticKB:
    """The generated corpus and question splits."""

    corpus: list[Document]
    """One passage per entity, ids ``syn-<kind>-<n>``."""
    train: list[QASample]
    """Questions about train-split entities."""
    test: list[QASample]
    """Questions about test-split entities (disjoint from train)."""
    entities: dict[str, list[dict]] = field(default_factory=dict)
    """The world by kind (``country``, ``city``, ``company``, ``person``): one dict of attributes per entity."""
    seed: int = 0
    """The seed that generated this KB."""

    def doc_by_id(self) -> dict[str, Document]:
        """Map passage id -> Document."""
        return {d.id: d for d in self.corpus}


class _Names:
    """Unique invented names from a small syllable inventory (deterministic given the rng)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        n = self.rng.randint(*syllables)
        w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n - 1))
        return (w + self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)).capitalize()

    def unique(self, syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
        """A word (plus ``suffix``) never returned before; words are compared case-insensitively."""
        for _ in range(1000):
            w = self.word(syllables) + suffix
            if w.lower() not in self.used:
                self.used.add(w.lower())
                return w
        raise RuntimeError("synthetic KB: ran out of unique names; lower n_entities")


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _doc(kind: str, idx: int, title: str, text: str) -> Document:
    return Document(id=f"syn-{kind}-{idx}", contents=f'"{title}"\n{text}')


def generate_kb(
    seed: int = 0,
    n_entities: int = 120,
    test_fraction: float = 0.25,
    two_hop_fraction: float = 0.4,
    reserved_words: Iterable[str] = (),
) -> SyntheticKB:
    """Generate the synthetic world, its passages and its questions.

    Args:
        seed: everything is a function of the seed (same seed -> identical KB).
        n_entities: number of people; cities, companies and countries scale with it (n/4, n/4, n/12, minimum 4).
        test_fraction: share of each entity kind assigned to the test sub-world.
        two_hop_fraction: share of two-hop questions among each split's questions (the rest single-hop).
        reserved_words: name parts this world must not use (compared case-insensitively), e.g. every name word of
            another world, so that demonstrations drawn from fresh worlds never mention an evaluation entity.

    Returns:
        :class:`SyntheticKB`. Questions are shuffled deterministically; ``metadata`` holds ``hops``,
        ``relation``, ``subject``, ``bridge`` (two-hop) and ``supporting_doc_ids``.
    """
    if n_entities < 8:
        raise ValueError(f"generate_kb: n_entities={n_entities} is too small (need >= 8)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"generate_kb: test_fraction={test_fraction} must be in (0, 1)")
    rng = random.Random(seed)
    names = _Names(rng)
    names.used.update(w.lower() for w in reserved_words)
    corpus: list[Document] = []
    world: dict[str, list[dict]] = {"country": [], "city": [], "company": [], "person": []}
    counts = {
        "country": max(4, n_entities // 12),
        "city": max(4, n_entities // 4),
        "company": max(4, n_entities // 4),
        "person": n_entities,
    }

    def split_of(i: int, n: int) -> str:
        n_test = max(1, round(n * test_fraction))
        return "test" if i >= n - n_test else "train"

    def pick(kind: str, split: str) -> dict:
        return rng.choice([e for e in world[kind] if e["split"] == split])

    for i in range(counts["country"]):
        name = names.unique((2, 3), "ia")
        c = {
            "id": f"syn-country-{i}",
            "name": name,
            "split": split_of(i, counts["country"]),
            "capital_word": rng.choice(_SIZES),
        }
        world["country"].append(c)
    for i in range(counts["city"]):
        split = split_of(i, counts["city"])
        city = {
            "id": f"syn-city-{i}",
            "name": names.unique((2, 3)),
            "split": split,
            "country": pick("country", split)["name"],
            "river": names.unique((2, 2)),
            "product": rng.choice(_PRODUCTS),
            "size": rng.choice(_SIZES),
            "population": rng.randint(2, 90) * 1000,
        }
        world["city"].append(city)
    for i in range(counts["company"]):
        split = split_of(i, counts["company"])
        suffix = rng.choice(["Works", "Group", "Labs", "Company"])
        comp = {
            "id": f"syn-company-{i}",
            "name": names.unique((2, 3)) + " " + suffix,
            "split": split,
            "industry": rng.choice(_INDUSTRIES),
            "founded": rng.randint(1850, 2015),
            "city": pick("city", split)["name"],
            "staff": rng.randint(2, 99) * 10,
        }
        world["company"].append(comp)
    for i in range(counts["person"]):
        split = split_of(i, counts["person"])
        person = {
            "id": f"syn-person-{i}",
            "name": names.unique((2, 2)) + " " + names.unique((2, 3)),
            "split": split,
            "profession": rng.choice(_PROFESSIONS),
            "born": rng.randint(1940, 2000),
            "city": pick("city", split)["name"],
            "employer": pick("company", split)["name"],
            "hobby": rng.choice(_HOBBIES),
            "she": rng.random() < 0.5,
        }
        world["person"].append(person)
    # Each company is led by one of its own split's people (gives passages a second mention of a person).
    for comp in world["company"]:
        comp["ceo"] = pick("person", comp["split"])["name"]

    for i, c in enumerate(world["country"]):
        cities = [x["name"] for x in world["city"] if x["country"] == c["name"]][:3] or ["no large towns"]
        corpus.append(
            _doc(
                "country",
                i,
                c["name"],
                f"{c['name']} is {_a(c['capital_word'])} country with hills, lakes and farms. Its towns "
                f"include {', '.join(cities)}. The people of {c['name']} speak their own language and "
                f"hold a market festival every spring.",
            )
        )
    for i, x in enumerate(world["city"]):
        corpus.append(
            _doc(
                "city",
                i,
                x["name"],
                f"{x['name']} is {_a(x['size'])} city in the country of {x['country']}. It lies on the "
                f"{x['river']} river and is known for its {x['product']}. About {x['population']} people "
                f"live in {x['name']}, and a stone bridge crosses the river in the old town.",
            )
        )
    for i, x in enumerate(world["company"]):
        corpus.append(
            _doc(
                "company",
                i,
                x["name"],
                f"{x['name']} is {_a(x['industry'])} company founded in {x['founded']}. Its headquarters "
                f"are in the city of {x['city']}. The company employs about {x['staff']} people and its "
                f"chief executive is {x['ceo']}.",
            )
        )
    for i, p in enumerate(world["person"]):
        he, his = ("She", "her") if p["she"] else ("He", "his")
        first = p["name"].split()[0]
        corpus.append(
            _doc(
                "person",
                i,
                p["name"],
                f"{p['name']} is {_a(p['profession'])} who was born in {p['city']} in {p['born']}. "
                f"{he} works for {p['employer']}. In {his} free time {first} enjoys {p['hobby']} with "
                f"old friends from school.",
            )
        )

    by_name = {kind: {e["name"]: e for e in ents} for kind, ents in world.items()}
    splits: dict[str, list[QASample]] = {"train": [], "test": []}
    for split in ("train", "test"):
        people = [p for p in world["person"] if p["split"] == split]
        comps = [c for c in world["company"] if c["split"] == split]
        cities = [c for c in world["city"] if c["split"] == split]
        single: list[tuple] = []
        for p in people:
            single.append(("birth_city", 1, f"Where was {p['name']} born?", p["city"], p["name"], None, [p["id"]]))
            single.append(
                ("employer", 1, f"Which company does {p['name']} work for?", p["employer"], p["name"], None, [p["id"]])
            )
            single.append(
                ("birth_year", 1, f"In what year was {p['name']} born?", str(p["born"]), p["name"], None, [p["id"]])
            )
        for c in comps:
            single.append(
                ("founded", 1, f"In what year was {c['name']} founded?", str(c["founded"]), c["name"], None, [c["id"]])
            )
            single.append(
                ("headquarters", 1, f"In which city is {c['name']} based?", c["city"], c["name"], None, [c["id"]])
            )
        for c in cities:
            single.append(
                (
                    "country",
                    1,
                    f"In which country is the city of {c['name']}?",
                    c["country"],
                    c["name"],
                    None,
                    [c["id"]],
                )
            )
            single.append(
                ("river", 1, f"Which river flows through {c['name']}?", c["river"], c["name"], None, [c["id"]])
            )
        double: list[tuple] = []
        for p in people:
            city, comp = by_name["city"][p["city"]], by_name["company"][p["employer"]]
            double.append(
                (
                    "birth_country",
                    2,
                    f"In which country was {p['name']} born?",
                    city["country"],
                    p["name"],
                    city["name"],
                    [p["id"], city["id"]],
                )
            )
            double.append(
                (
                    "employer_city",
                    2,
                    f"In which city is the company that {p['name']} works for based?",
                    comp["city"],
                    p["name"],
                    comp["name"],
                    [p["id"], comp["id"]],
                )
            )
            double.append(
                (
                    "employer_founded",
                    2,
                    f"In what year was the employer of {p['name']} founded?",
                    str(comp["founded"]),
                    p["name"],
                    comp["name"],
                    [p["id"], comp["id"]],
                )
            )
            double.append(
                (
                    "birth_river",
                    2,
                    f"Which river flows through the city where {p['name']} was born?",
                    city["river"],
                    p["name"],
                    city["name"],
                    [p["id"], city["id"]],
                )
            )
        rng.shuffle(single)
        rng.shuffle(double)
        # Keep the requested share of two-hop questions (as many single-hop as the world allows).
        n_double = min(len(double), round(len(single) * two_hop_fraction / max(1e-9, 1 - two_hop_fraction)))
        rows = single + double[:n_double]
        rng.shuffle(rows)
        for j, (rel, hops, q, ans, subj, bridge, support) in enumerate(rows):
            splits[split].append(
                QASample(
                    id=f"syn-{split}-{j}",
                    question=q,
                    golden_answers=[ans],
                    data_source="synthetic",
                    metadata={
                        "hops": hops,
                        "relation": rel,
                        "subject": subj,
                        "bridge": bridge,
                        "supporting_doc_ids": support,
                    },
                )
            )
    return SyntheticKB(corpus=corpus, train=splits["train"], test=splits["test"], entities=world, seed=seed)


def name_words(kb: SyntheticKB) -> set[str]:
    """Every word of every invented name in ``kb`` (entities and rivers): the ``reserved_words`` of another world."""
    words: set[str] = set()
    for ents in kb.entities.values():
        for e in ents:
            for key in ("name", "river"):
                words.update(str(e.get(key, "")).split())
    return words


def fresh_worlds(base: SyntheticKB, n_worlds: int, n_entities: int, two_hop_fraction: float = 0.0,
                 seed: int = 1000) -> list[SyntheticKB]:
    """``n_worlds`` new worlds (seeds ``seed``, ``seed + 1``, ...) that share no name word with ``base``.

    For warm-start demonstrations that cannot leak a fact of ``base`` (its train or test questions).
    """
    reserved = name_words(base)
    return [generate_kb(seed=seed + i, n_entities=n_entities, two_hop_fraction=two_hop_fraction,
                        reserved_words=reserved) for i in range(n_worlds)]


def write_kb(kb: SyntheticKB, out_dir: str | Path) -> dict[str, Path]:
    """Write ``corpus.jsonl`` (Search-R1 corpus rows) and ``train.jsonl`` / ``test.jsonl`` (FlashRAG rows).

    Returns the written paths by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl", "test": out / "test.jsonl"}
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        for d in kb.corpus:
            f.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
    for split in ("train", "test"):
        with open(paths[split], "w", encoding="utf-8") as f:
            for s in getattr(kb, split):
                f.write(json.dumps(s.to_flashrag(), ensure_ascii=False) + "\n")
    return paths


def load_kb_dir(path: str | Path) -> tuple[list[Document], list[QASample], list[QASample]]:
    """Read back what :func:`write_kb` wrote: ``(corpus, train, test)``."""
    p = Path(path)
    return (
        read_corpus_jsonl(p / "corpus.jsonl"),
        read_flashrag_jsonl(p / "train.jsonl"),
        read_flashrag_jsonl(p / "test.jsonl"),
    )


# ------------------------------------------------------------------------------------------------ demonstrations
@dataclass
class Demonstration:
    """A gold-ish multi-turn response for supervised warm-up, split into model and environment segments."""

    sample: QASample
    """The question it answers."""
    segments: list[tuple[str, bool]]
    """``(text, is_model)`` pieces in order; environment pieces (observations) must be masked out of the loss."""
    correct: bool
    """Whether the final answer is a golden answer (mistakes are injected on purpose)."""

    @property
    def text(self) -> str:
        """The whole response text (model and observation segments concatenated)."""
        return "".join(t for t, _ in self.segments)


_RELATION_QUERY = {
    "birth_city": "{s} born",
    "employer": "{s} works for",
    "birth_year": "{s} born",
    "founded": "{s} founded",
    "headquarters": "{s} headquarters",
    "country": "{s} city country",
    "river": "{s} river",
}
_BRIDGE_QUERY = {
    "birth_country": ("{s} born", "{b} city country"),
    "employer_city": ("{s} works for", "{b} headquarters"),
    "employer_founded": ("{s} works for", "{b} founded"),
    "birth_river": ("{s} born", "{b} river"),
}


def synthetic_trajectories(
    kb: SyntheticKB,
    split: str = "train",
    n: int | None = None,
    mistake_rate: float = 0.2,
    seed: int = 0,
    retriever=None,
    topk: int = 3,
    template=None,
    tokenizer=None,
    max_obs_tokens: int | None = None,
    no_search_share: float = 0.5,
) -> list[Demonstration]:
    """Demonstrations in the tag protocol: think, search (one per hop), information, think, answer.

    Args:
        kb: the knowledge base.
        split: ``train`` or ``test`` questions.
        n: number of demonstrations (default: one per question of the split, in order).
        mistake_rate: share of demonstrations with a wrong final answer (a same-kind distractor entity) or an
            answer given without searching; the rest are correct. Lets the warm-up see imperfect behaviour.
        seed: seeds the mistakes and the distractor passages.
        retriever: if given, observations are its real top-``topk`` hits for each query; otherwise the supporting
            passage plus ``topk - 1`` random distractors (at a random rank).
        topk: documents per observation.
        template: a :class:`openrlhf_search.env.templates.PromptTemplate` (default: the ``search_r1`` template) that
            wraps observations exactly as the environment does.
        tokenizer: passed to :func:`~openrlhf_search.env.observation.format_observation` (neutralization of its
            special tokens, token budget); None counts words.
        max_obs_tokens: observation budget as in the environment (None = unlimited).
        no_search_share: share of the mistakes that answer (wrongly) without searching; the other mistakes search
            and then answer with a wrong entity. 1.0 makes every mistake a skipped search, so the warm-started
            policy's errors are one early decision RL can fix (search, then copy) rather than copying noise.

    Returns:
        list of :class:`Demonstration`.
    """
    template = template or get_template("search_r1")
    if template.protocol != "tags":
        raise ValueError(f"synthetic_trajectories: template {template.name!r} is not a tag-protocol template")
    rng = random.Random(seed)
    samples = list(getattr(kb, split))
    if n is not None:
        samples = [samples[i % len(samples)] for i in range(n)]
    docs = kb.doc_by_id()
    answers_of_kind: dict[str, list[str]] = {}
    for s in samples:
        answers_of_kind.setdefault(s.metadata["relation"], []).append(s.golden_answers[0])

    def observe(query: str, gold_id: str) -> str:
        if retriever is not None:
            hits = retriever.search([query], topk)[0]
        else:
            others = rng.sample([d for d in kb.corpus if d.id != gold_id], topk - 1)
            others.insert(rng.randrange(topk), docs[gold_id])
            hits = [Hit(d, 0.0) for d in others]
        return template.wrap_observation(format_observation(hits, tokenizer, max_tokens=max_obs_tokens))

    out = []
    for s in samples:
        meta, gold = s.metadata, s.golden_answers[0]
        mistake = rng.random() < mistake_rate
        answer = gold
        if mistake:
            pool = [a for a in answers_of_kind[meta["relation"]] if a != gold] or ["unknown"]
            answer = rng.choice(pool)
        segs: list[tuple[str, bool]] = []
        if mistake and rng.random() < no_search_share:
            segs.append((f"<think>I think I already know this.</think>\n<answer>{answer}</answer>", True))
            out.append(Demonstration(s, segs, answer == gold))
            continue
        if meta["hops"] == 1:
            q = _RELATION_QUERY[meta["relation"]].format(s=meta["subject"])
            segs.append((f"<think>I need to look up {meta['subject']}.</think>\n<search>{q}</search>", True))
            segs.append((observe(q, meta["supporting_doc_ids"][0]), False))
        else:
            q1, q2 = (t.format(s=meta["subject"], b=meta["bridge"]) for t in _BRIDGE_QUERY[meta["relation"]])
            segs.append((f"<think>First I need to look up {meta['subject']}.</think>\n<search>{q1}</search>", True))
            segs.append((observe(q1, meta["supporting_doc_ids"][0]), False))
            segs.append(
                (
                    f"<think>The answer depends on {meta['bridge']}. Let me look it up.</think>\n"
                    f"<search>{q2}</search>",
                    True,
                )
            )
            segs.append((observe(q2, meta["supporting_doc_ids"][1]), False))
        segs.append((f"<think>The documents give the answer.</think>\n<answer>{answer}</answer>", True))
        out.append(Demonstration(s, segs, answer == gold))
    return out
