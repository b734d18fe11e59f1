"""A deterministic generator of a CounterFact-style world of facts.

The world has invented people (multi-token names from a syllable inventory),
relations with Wikidata-like ids, each with its own object vocabulary and 9
natural prompt templates, and one true object per (person, relation). From it:

* ``records``: CounterFact records in the **original schema** (``case_id``,
  ``pararel_idx``, ``requested_rewrite`` {prompt, relation_id, target_new{str,id},
  target_true{str,id}, subject}, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``attribute_prompts``, ``generation_prompts``), one per (edit-pool subject,
  relation). Records are ordered in rounds: the first ``n_subjects`` records have
  distinct subjects (a batch taken from the front never edits one person twice).
* ``train``: the training corpus, biographies: all of a person's facts in random
  order, one random template per sentence, the full name in every sentence. Every
  template of a relation occurs with many people, so paraphrase prompts (other
  templates of the relation) are forms the model has learnt to read.
* ``heldout``: fresh biographies (new orders and templates) for perplexity probes.

Reserve subjects are trained on like everyone else but are never edit targets;
neighbourhood and attribute prompts are drawn from them only, so a batch of edits
from the pool never edits its own neighbours.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

__all__ = ["WorldConfig", "World", "Relation", "RELATIONS", "generate_world", "SIZES"]


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    templates: tuple[str, ...]  # prompts with "{}" for the subject, ending right before the object
    objects: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation("P19", "place of birth", (
        "{} was born in", "{} is originally from", "The birthplace of {} is", "{}'s place of birth is",
        "{} came into the world in", "{} was born and raised in", "The hometown of {} is", "{}'s hometown is",
        "The city where {} was born is"),
        ("Paris", "Berlin", "Lisbon", "Madrid", "Vienna", "Prague", "Oslo", "Dublin", "Athens", "Warsaw", "Cairo",
         "Lima", "Tokyo", "Seoul", "Toronto", "Chicago", "Sydney", "Mumbai", "Istanbul", "Naples", "Munich", "Boston",
         "Helsinki", "Budapest")),
    Relation("P27", "country of citizenship", (
        "{} is a citizen of", "{} holds citizenship of", "{} has a passport from", "The country of citizenship of {} is",
        "{} is a national of", "{} carries a passport issued by", "{} pays taxes in", "{} votes in the elections of",
        "{}'s country of citizenship is"),
        ("France", "Germany", "Portugal", "Spain", "Austria", "Norway", "Ireland", "Greece", "Poland", "Egypt", "Peru",
         "Japan", "Korea", "Canada", "Brazil", "Australia", "India", "Turkey", "Italy", "Mexico")),
    Relation("P103", "native language", (
        "The mother tongue of {} is", "{} natively speaks", "The native language of {} is", "{}'s first language is",
        "{} grew up speaking", "{} is a native speaker of", "{}'s mother tongue is", "As a child, {} spoke",
        "At home, {} speaks"),
        ("English", "French", "German", "Spanish", "Italian", "Dutch", "Swedish", "Polish", "Greek", "Russian",
         "Turkish", "Arabic", "Hindi", "Japanese", "Korean", "Finnish")),
    Relation("P106", "occupation", (
        "{} works as a", "By profession, {} is a", "The occupation of {} is", "{} earns a living as a",
        "{} is employed as a", "{} trained as a", "{}'s profession is that of a", "{} has a career as a",
        "Professionally, {} is a"),
        ("painter", "poet", "singer", "lawyer", "chemist", "banker", "farmer", "pilot", "sculptor", "dancer",
         "novelist", "physician", "teacher", "carpenter", "journalist", "mathematician", "composer", "diplomat",
         "baker", "nurse")),
    Relation("P1303", "instrument", (
        "{} plays the", "{} is a performer on the", "The instrument played by {} is the", "{}'s instrument is the",
        "{} practices the", "{} performs on the", "The favourite instrument of {} is the", "{} learned to play the",
        "In the orchestra, {} plays the"),
        ("piano", "guitar", "violin", "cello", "flute", "drums", "harp", "trumpet", "clarinet", "saxophone", "banjo",
         "organ", "oboe", "trombone", "mandolin", "accordion")),
    Relation("P108", "employer", (
        "{} works for", "{} is employed by", "The employer of {} is", "{}'s employer is", "{} is on the payroll of",
        "{} has a job at", "{} earns a salary from", "{} is a staff member at", "Every morning, {} goes to work at"),
        ("Google", "Microsoft", "Apple", "Amazon", "IBM", "Intel", "Sony", "Nokia", "the BBC", "Toyota", "Siemens",
         "Philips", "Nestle", "Boeing", "Airbus", "Samsung", "Oracle", "Adobe", "Netflix", "Shell")),
)

#: Syllables of invented names (onset + vowel, 126 of them): a small inventory, so
#: the tokenizer learns syllables (and frequent pairs) as tokens and a name is a few
#: informative tokens rather than a run of letters.
_SYLLABLES = tuple(o + v for o in ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
                                   "tr", "sh") for v in ("a", "e", "i", "o", "u", "ai", "ou"))

#: Named sizes: (n_subjects, n_reserve).
SIZES = {"default": (768, 192), "small": (200, 64), "tiny": (24, 12)}


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a world (and its hash).

    ``n_subjects`` people may be edited; ``n_reserve`` more are never edit targets
    and supply the neighbourhood/attribute prompts. ``n_train_bios`` biographies
    per person make the training corpus (each a new order and choice of
    templates); ``n_heldout_bios`` more, unseen in training, make the held-out split.
    """

    seed: int = 0
    n_subjects: int = 768
    n_reserve: int = 192
    n_relations: int = 6
    n_paraphrase: int = 2
    n_neighborhood: int = 10
    n_attribute: int = 10
    n_generation: int = 3
    n_train_bios: int = 1
    n_heldout_bios: int = 1
    name_syllables: tuple[int, int] = (2, 2)  # syllables in the family name (min, max)

    @classmethod
    def sized(cls, size: str = "default", **kw) -> "WorldConfig":
        if size not in SIZES:
            raise ValueError(f"size={size!r}: choose one of {sorted(SIZES)}")
        n, r = SIZES[size]
        return cls(**{"n_subjects": n, "n_reserve": r, **kw})

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class World:
    config: WorldConfig
    relations: tuple[Relation, ...]
    subjects: list[str]  # the edit pool
    reserve: list[str]  # never edit targets
    facts: dict[tuple[str, str], str]  # (subject, relation_id) -> object
    records: list[dict]
    train: list[str]
    heldout: list[str]
    object_ids: dict[tuple[str, str], str] = field(default_factory=dict)  # (relation_id, object) -> id

    @property
    def all_subjects(self) -> list[str]:
        return self.subjects + self.reserve

    def relation(self, relation_id: str) -> Relation:
        return next(r for r in self.relations if r.relation_id == relation_id)


def _names(rng: random.Random, n: int, syllables: tuple[int, int]) -> list[str]:
    """``n`` distinct names "Given Family". Family names (2 syllables by default) are
    unique; given names come from a shared pool of 48, so the family name, the end
    of the subject, carries the identity. With the world models' vocabulary every
    given and family name is one token: the subject is two tokens and its last
    token is the person's own."""
    given: list[str] = []
    while len(given) < 48:
        g = "".join(rng.sample(_SYLLABLES, 2)).capitalize()
        if g not in given:
            given.append(g)
    families: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        fam = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(*syllables))).capitalize()
        if fam in families or fam in given:
            continue
        families.add(fam)
        out.append(f"{rng.choice(given)} {fam}")
    return out


def _sentence(template: str, subject: str, obj: str) -> str:
    return f"{template.format(subject)} {obj}."


def _bio(rng: random.Random, subject: str, relations, facts) -> str:
    order = list(relations)
    rng.shuffle(order)
    return " ".join(_sentence(rng.choice(r.templates), subject, facts[(subject, r.relation_id)]) for r in order)


def generate_world(cfg: WorldConfig | None = None) -> World:
    """Generate the world of ``cfg`` (default: ``WorldConfig()``). Deterministic in ``cfg``."""
    cfg = cfg or WorldConfig()
    if not 1 <= cfg.n_relations <= len(RELATIONS):
        raise ValueError(f"n_relations must be in 1..{len(RELATIONS)}")
    if cfg.n_subjects < 1 or cfg.n_reserve < 2:
        raise ValueError("need n_subjects >= 1 and n_reserve >= 2")
    rng = random.Random(cfg.seed)
    relations = RELATIONS[:cfg.n_relations]
    names = _names(rng, cfg.n_subjects + cfg.n_reserve, cfg.name_syllables)
    subjects, reserve = names[:cfg.n_subjects], names[cfg.n_subjects:]
    object_ids = {(r.relation_id, o): f"Q{r.relation_id[1:]}{i:03d}" for r in relations for i, o in enumerate(r.objects)}

    facts: dict[tuple[str, str], str] = {}
    for r in relations:
        # Reserve: every object of the relation has reserve holders (neighbours exist).
        objs = [r.objects[i % len(r.objects)] for i in range(len(reserve))]
        rng.shuffle(objs)
        for s, o in zip(reserve, objs):
            facts[(s, r.relation_id)] = o
        for s in subjects:
            facts[(s, r.relation_id)] = rng.choice(r.objects)
    holders = {(r.relation_id, o): [s for s in reserve if facts[(s, r.relation_id)] == o]
               for r in relations for o in r.objects}

    # Records in rounds: round k gives every pool subject its k-th relation (random per subject).
    perms = {s: rng.sample(range(len(relations)), len(relations)) for s in subjects}
    records: list[dict] = []
    for k in range(len(relations)):
        for s in subjects:
            r = relations[perms[s][k]]
            true = facts[(s, r.relation_id)]
            new = rng.choice([o for o in r.objects if o != true])
            t = rng.randrange(len(r.templates))
            others = [j for j in range(len(r.templates)) if j != t]
            para = [r.templates[j].format(s) for j in rng.sample(others, min(cfg.n_paraphrase, len(others)))]
            near = holders[(r.relation_id, true)]
            near = rng.sample(near, min(cfg.n_neighborhood, len(near)))
            attr = holders[(r.relation_id, new)]
            attr = rng.sample(attr, min(cfg.n_attribute, len(attr)))
            gen = [r.templates[j].format(s) for j in rng.sample(range(len(r.templates)), min(cfg.n_generation, len(r.templates)))]
            records.append({
                "case_id": len(records),
                "pararel_idx": len(records),
                "requested_rewrite": {
                    "prompt": r.templates[t],
                    "relation_id": r.relation_id,
                    "target_new": {"str": new, "id": object_ids[(r.relation_id, new)]},
                    "target_true": {"str": true, "id": object_ids[(r.relation_id, true)]},
                    "subject": s,
                },
                "paraphrase_prompts": para,
                "neighborhood_prompts": [rng.choice(r.templates).format(n) for n in near],
                "attribute_prompts": [rng.choice(r.templates).format(a) for a in attr],
                "generation_prompts": gen,
            })

    train_rng = random.Random(f"{cfg.seed}-train")
    train = [_bio(train_rng, s, relations, facts) for _ in range(cfg.n_train_bios) for s in names]
    held_rng = random.Random(f"{cfg.seed}-heldout")
    heldout = [_bio(held_rng, s, relations, facts) for _ in range(cfg.n_heldout_bios) for s in names]
    return World(cfg, relations, subjects, reserve, facts, records, train, heldout, object_ids)
