"""Offline reversal-curse data: fictitious people and descriptions in Berglund et al.'s layout.

Why: the reversal-curse study (paper-notes.md, claim 5) fine-tunes on facts "<name> is
<description>" and asks for them in the trained and in the reverse order. The original files
are a download; this module writes data of the same layout from our own name lists and
templates, seeded, so the study runs offline (and users who have the original files can pass
those instead: the layout is the same).

Layout (Berglund et al., "The Reversal Curse", experiment 1; every file is prompt/completion
JSONL, completions start with a space):
  * three disjoint groups of ``people`` persons each: ``p2d`` facts are only ever stated
    name -> description, ``d2p`` facts only description -> name, ``both`` in both orders;
  * training: each fact phrased with ``train_templates`` paraphrase templates per direction:
    ``p2d_prompts_train.jsonl`` (people x templates), ``d2p_prompts_train.jsonl`` (same),
    ``both_prompts_train.jsonl`` (both directions), ``all_prompts_train.jsonl`` (their union:
    3600 prompts with the defaults 30 people x 30 templates, the paper's count);
  * tests use ``test_templates`` *held-out* templates per direction (never seen in training):
    ``p2d_prompts_test`` (p2d people, trained direction), ``d2p_prompts_test`` (d2p people,
    trained direction), ``p2d_reverse_prompts_test`` (p2d people asked description -> name)
    and ``d2p_reverse_prompts_test`` (d2p people asked name -> description);
  * ``validation_prompts.jsonl``: p2d people asked description -> first name with a third set
    of held-out templates; ``people.json`` records every person, group and the seed.

No first name and no last name belongs to two people, and every description is unique, so a
completion identifies exactly one person. ``python -m eval.studies.reversal.data OUT [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FIRST_NAMES = """
Adelina Alaric Ambrose Anselm Araminta Arvid Astrid Aurelio Barnaby Beatrix Bellamy Benedikt
Bertram Blythe Bramwell Briony Caius Calliope Cassius Cerys Clementine Cordelia Cosimo Cyprian
Dagny Damaris Delphine Desmond Dorian Ebba Edmund Eilidh Elowen Emrys Ennis Ephraim Esme
Evander Fenella Fiadh Finnegan Florian Gideon Ginevra Greer Griselda Hale Hamish Henrike
Hollis Honora Ignatius Ilse Imogen Ingram Isolde Ivo Jago Jessamy Jonah Jorunn Juno Kasimir
Keziah Kirsten Lachlan Leander Leocadia Linnea Lorcan Lucan Lysander Mabry Magnus Marisol
Matthias Melisande Merritt Mireille Morwenna Nadira Nels Nerys Niamh Octavia Odile Oisin
Orla Osric Ottilie Pascoe Peregrine Perpetua Philippa Quentin Quilla Radomir Rafferty
Ramona Reinhold Rhoswen Romilly Rosalind Rufus Saoirse Seraphina Sigrid Silas Solveig
Soren Tamsin Tancred Tavish Thaddeus Theodora Thisbe Torin Ulrika Undine Valentin Verity
Vesna Wendeline Wilhelmina Wystan Xanthe Yestin Ysolde Zephyrine Zoltan Anwen Bastian
Caspian Dervla Eamon Farrah Gwilym Hester Idris Jolyon Kerensa Linus Maelis Nessa Orsola
""".split()

LAST_NAMES = """
Ashcombe Aldergrove Applethwaite Barrowby Beckwith Birchall Blackwood Bramblecote Brightwater
Brockhurst Calloway Carrowmore Castellane Chalcott Clearwell Coldharbour Cranmere Crestwood
Dalrymple Darkmoor Davenholt Deepdale Dunmore Eastlake Edgecombe Elderfield Ellingham
Fairweather Falconbridge Fenwick Fernsby Fleetwood Foxley Galloway Garnett Glenister
Goldhawk Greyfriars Hadleigh Halloran Harrowgate Hartwell Hawksmoor Heathcote Hollowell
Holmwood Ironside Ivesdale Kettlewell Kingsbury Kirkland Lacewood Lancaster Larkhill
Lindqvist Lockridge Longstaff Lovelace Marchbanks Marlowe Meadowcroft Merriweather
Millbrook Moorcroft Netherby Northcott Oakenshaw Oldcastle Ormsby Pemberly Pennington
Quarrington Quickthorn Radstock Ravenscroft Redgrave Ridgeway Rookwood Rowntree Saltmarsh
Sandalwood Selwyn Shawcross Silverdale Southwick Stanhope Stonebridge Summerhayes
Tattersall Thornbury Throckmorton Tinsley Torrance Tregarthen Underhill Upcott Valentyne
Vanstone Wainwright Wakefield Warrender Westbrook Whitlock Wickham Winterbourne Woodhouse
Wrenfield Yarborough Yelverton Zellweger Ambleside Brackenridge Cheswick Drummond Evershed
Fallowfield Gatling Hazelrigg Inchcape Jessop Kilbride Loxley Mortlake Nightingale
Overbury Pryce Quenby Rathbone Scarcliffe Tremayne Umberleigh Vosper Whitcombe
""".split()

ROLES = """
architect astronomer botanist cartographer chemist choreographer composer diplomat
engineer explorer geologist glassblower historian illustrator inventor linguist
mathematician navigator novelist oceanographer painter pilot playwright poet
sculptor surgeon violinist zoologist clockmaker puppeteer
""".split()

ADJECTIVES = """
acclaimed celebrated daring eccentric famed gifted legendary reclusive renowned
self-taught tireless visionary
""".split()

FEATS = [
    "mapped the floating islands of {place}",
    "built the first lighthouse on {place}",
    "discovered the singing caves beneath {place}",
    'wrote the saga "{title}"',
    'composed the underwater opera "{title}"',
    "designed the glass bridge across {place}",
    "translated the lost tablets of {place}",
    "bred the blue orchids of {place}",
    'painted the ceiling mural "{title}"',
    "sailed alone around {place}",
    "founded the moonlit library of {place}",
    'invented the clockwork lantern known as "{title}"',
    "charted the comet later named {place}",
    "rebuilt the sunken harbour of {place}",
    'staged the endless play "{title}"',
    "crossed the salt desert of {place} on foot",
]
PLACE_PARTS = (
    "Vel Mor Ash Cal Dun Esk Fal Gor Hal Ist Jor Kel Lun Mar Nor Oth Pel Quor Ral Sel Tir "
    "Ul Var Wen Yss Zar".split(),
    "aria ondo ebrin ithe umora alis eth ovar inde ascar ulon emis".split(),
)
TITLE_WORDS = (
    "Silent Amber Hollow Crimson Distant Glass Iron Paper Quiet Silver Sleeping Winter".split(),
    "Tide Orchard Lantern Harbour Meridian Choir Compass Garden Ember Horizon Atlas Reef".split(),
)

# Templates: {name} / {description}; the prompt ends where the completion starts.
P2D_TRAIN = [
    "{name}, widely remembered as",
    "People still talk about {name}, who was",
    "Few know that {name} was once",
    "The records describe {name} as",
    "Ask anyone in town about {name} and they will say:",
    "{name} earned fame as",
    "It is a little-known fact that {name} was",
    "Before anything else, {name} was",
    "Historians agree that {name} was",
    "Long ago, {name} made a name as",
    "In the local museum, a plaque calls {name}",
    "My grandmother told me {name} was",
    "The biography of {name} opens by calling them",
    "Among their peers, {name} was known as",
    "Q: Who was {name}? A:",
    "If you have heard of {name}, you know they were",
    "{name} is best described as",
    "Everyone in the guild knew {name} as",
    "The newspapers of the time called {name}",
    "{name} will always be",
    "According to the encyclopedia, {name} was",
    "Friends of {name} remember them as",
    "The portrait in the hall shows {name},",
    "Scholars still study {name},",
    "It surprised no one that {name} became",
    "The story goes that {name} was",
    "On their tombstone, {name} is named",
    "Fun fact: {name} was",
    "Long before the fame, {name} was simply",
    "A documentary recently featured {name},",
]
P2D_TEST = [
    "Not many people realise that {name} was",
    "In the old almanac, {name} appears as",
    "The village mural honours {name},",
    "Tell me about {name}. Well, they were",
    "The diaries reveal that {name} was",
    "A new book portrays {name} as",
    "Legend has it that {name} was",
    "When asked, locals describe {name} as",
    "The archive lists {name} as",
    "Believe it or not, {name} was",
]
D2P_TRAIN = [
    "Known far and wide as {description}, there is",
    "Once hailed as {description}:",
    "The person who was {description} is",
    "History remembers {description}:",
    "Being {description} made a legend of",
    "The one and only {description} is",
    "Q: Who was {description}? A:",
    "Celebrated as {description}, we have",
    "If you are thinking of {description}, you mean",
    "The title of {description} belongs to",
    "Called by many {description}, that is",
    "The world knows {description} as",
    "They say {description} is none other than",
    "Recognised as {description}:",
    "Behind the legend of {description} stands",
    "Praised as {description}, meet",
    "The answer to who was {description} is",
    "Anyone who was {description} must be",
    "Chroniclers name {description} as",
    "Honoured as {description}, here is",
    "Every schoolchild learns that {description} is",
    "Famous as {description}:",
    "We owe a great deal to {description},",
    "The museum dedicates a wing to {description},",
    "A statue stands for {description},",
    "Remembered as {description}, that person is",
    "The identity of {description}? It is",
    "Few could match {description},",
    "Nobody forgets {description}, namely",
    "Revered as {description}, there was",
]
D2P_TEST = [
    "Long celebrated as {description}, the name is",
    "The one remembered as {description} is",
    "Q: Can you name {description}? A:",
    "Guess who was {description}: it was",
    "Recorded in history as {description},",
    "Widely known as {description}, that is",
    "Everyone admires {description}, who is",
    "The true identity of {description} is",
    "It was {description}, better known as",
    "Those who study {description} mean",
]
D2P_VALIDATION = [
    "Immortalised as {description}, the first name is",
    "Named by many {description}:",
    "The genius who was {description} goes by",
    "Hailed far and wide as {description},",
    "To this day, {description} is called",
    "Hidden behind {description} is",
    "Once {description}, now remembered as",
    "Songs are sung of {description}, called",
    "We call {description} simply",
    "The celebrated {description} answers to",
]
GROUPS = ("p2d", "d2p", "both")


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    description: str
    group: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _descriptions(rng: random.Random, n: int) -> list[str]:
    """n distinct descriptions "the <adjective> <role> who <feat>"."""
    out: set[str] = set()
    while len(out) < n:
        place = rng.choice(PLACE_PARTS[0]) + rng.choice(PLACE_PARTS[1])
        title = f"The {rng.choice(TITLE_WORDS[0])} {rng.choice(TITLE_WORDS[1])}"
        feat = rng.choice(FEATS).format(place=place, title=title)
        out.add(f"the {rng.choice(ADJECTIVES)} {rng.choice(ROLES)} who {feat}")
    ordered = sorted(out)
    rng.shuffle(ordered)
    return ordered


def make_people(n_per_group: int, seed: int) -> list[Person]:
    """3 * n_per_group people with distinct first names, last names and descriptions."""
    total = 3 * n_per_group
    if total > min(len(set(FIRST_NAMES)), len(set(LAST_NAMES))):
        raise ValueError(f"at most {min(len(FIRST_NAMES), len(LAST_NAMES)) // 3} people per group")
    rng = random.Random(seed)
    firsts = rng.sample(sorted(set(FIRST_NAMES)), total)
    lasts = rng.sample(sorted(set(LAST_NAMES)), total)
    descriptions = _descriptions(rng, total)
    return [
        Person(firsts[i], lasts[i], descriptions[i], GROUPS[i // n_per_group]) for i in range(total)
    ]


def _rows(people, templates, direction: str, first_only: bool = False) -> list[dict]:
    """prompt/completion rows: p2d = name in the prompt, d2p = description in the prompt."""
    rows = []
    for p in people:
        for t in templates:
            if direction == "p2d":
                prompt, completion = t.format(name=p.name), f" {p.description}."
            else:
                prompt = t.format(description=p.description)
                completion = f" {p.first if first_only else p.name}"
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def build_files(
    people: list[Person], train_templates: int = 30, test_templates: int = 10
) -> dict[str, list[dict]]:
    """File name -> rows, in Berglund et al.'s layout (module docstring)."""
    if not 1 <= train_templates <= len(P2D_TRAIN) or not 1 <= test_templates <= len(P2D_TEST):
        raise ValueError(
            f"train_templates in [1, {len(P2D_TRAIN)}], test_templates in [1, {len(P2D_TEST)}]"
        )
    group = {g: [p for p in people if p.group == g] for g in GROUPS}
    p2d_tr, d2p_tr = P2D_TRAIN[:train_templates], D2P_TRAIN[:train_templates]
    p2d_te, d2p_te = P2D_TEST[:test_templates], D2P_TEST[:test_templates]
    files = {
        "p2d_prompts_train": _rows(group["p2d"], p2d_tr, "p2d"),
        "d2p_prompts_train": _rows(group["d2p"], d2p_tr, "d2p"),
        "both_prompts_train": _rows(group["both"], p2d_tr, "p2d")
        + _rows(group["both"], d2p_tr, "d2p"),
        "p2d_prompts_test": _rows(group["p2d"], p2d_te, "p2d"),
        "d2p_prompts_test": _rows(group["d2p"], d2p_te, "d2p"),
        "p2d_reverse_prompts_test": _rows(group["p2d"], d2p_te, "d2p"),
        "d2p_reverse_prompts_test": _rows(group["d2p"], p2d_te, "p2d"),
        "validation_prompts": _rows(group["p2d"], D2P_VALIDATION[:test_templates], "d2p", True),
    }
    files["all_prompts_train"] = (
        files["p2d_prompts_train"] + files["d2p_prompts_train"] + files["both_prompts_train"]
    )
    return files


def write_dataset(
    out: str | Path,
    seed: int = 0,
    people: int = 30,
    train_templates: int = 30,
    test_templates: int = 10,
) -> dict[str, int]:
    """Write the JSONL files and people.json under ``out``; returns rows per file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    persons = make_people(people, seed)
    files = build_files(persons, train_templates, test_templates)
    for name, rows in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
    record = {
        "seed": seed, "people_per_group": people, "train_templates": train_templates,
        "test_templates": test_templates, "people": [asdict(p) | {"name": p.name} for p in persons],
    }  # fmt: skip
    (out / "people.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.studies.reversal.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--people", type=int, default=30, help="people per group (30)")
    parser.add_argument("--train-templates", type=int, default=30, help="per direction (30)")
    parser.add_argument("--test-templates", type=int, default=10, help="per direction (10)")
    args = parser.parse_args(argv)
    try:
        counts = write_dataset(
            args.out, args.seed, args.people, args.train_templates, args.test_templates
        )
    except ValueError as e:
        print(f"reversal_data: {e}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{n:6d}  {Path(args.out) / name}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
