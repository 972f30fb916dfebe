"""A small, self-written preference data set for the DPO demo: concise, correct answers (chosen)
against answers that show the reward-hacking patterns reported in the RLHF literature (rejected).

Why write it here: the README's first command must run offline on 2 CPU cores, so the data is
generated from fact tables in this module (no download) and every prompt + answer stays under
~45 words (~60 tokens). The rejected side isolates one failure mode per row, or two when combined:

- sycophancy: flattering openers/closers ("What a great question! ...")
- hedging: stacked uncertainty ("I think it might possibly be ..., though I could be wrong")
- verbosity: restating the question, filler and padding paragraphs around the answer
- wrong_fact: the same sentence as the chosen answer with a plausible same-category confuser
  (capital of Australia -> Sydney); it never equals or mentions the correct answer.

A combined row (pattern "sycophancy+wrong_fact", "sycophancy+hedging", ...) applies both.
Facts are checked against common references; arithmetic answers are computed. Each fact yields
two rows with different question phrasings, so `split_pairs` holds facts out, not just rows.

Size (~930 lines, over the project's ~400): most of it is the fact tables the demo's data is
built from (data, not logic).
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastalign.files import process_umask

PATTERNS = ("sycophancy", "hedging", "verbosity", "wrong_fact")
MAX_WORDS = 45  # prompt + answer, whitespace words
# prompt + answer, in `approx_tokens` pieces: on these rows SmolLM2's tokenizer gives at most ~8 more
# (it splits numbers into digits, as `approx_tokens` does), so this keeps rows under ~60 real tokens
MAX_APPROX_TOKENS = 52
ROWS_PER_FACT = 2

# Questions about facts that are not in the tables below, to show generations before/after training.
GENERATION_PROMPTS: list[str] = [
    "What is the capital of Peru?",
    "Who wrote The Adventures of Huckleberry Finn?",
    "What is 14 × 16?",
]


@dataclass(frozen=True)
class Fact:
    """One checkable fact: question phrasings, answer sentence templates (`{a}` = the answer),
    the correct answer string and a same-category wrong one."""

    topic: str
    fact_id: str
    answer: str
    wrong: str
    questions: tuple[str, ...]
    statements: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# fact tables
# ---------------------------------------------------------------------------------------------
# (country as used mid-sentence, capital, confuser: a large city of the same country)
_CAPITALS = [
    ("Australia", "Canberra", "Sydney"),
    ("Canada", "Ottawa", "Toronto"),
    ("France", "Paris", "Lyon"),
    ("Germany", "Berlin", "Munich"),
    ("Italy", "Rome", "Milan"),
    ("Spain", "Madrid", "Barcelona"),
    ("Portugal", "Lisbon", "Porto"),
    ("Japan", "Tokyo", "Kyoto"),
    ("China", "Beijing", "Shanghai"),
    ("India", "New Delhi", "Mumbai"),
    ("Brazil", "Brasília", "Rio de Janeiro"),
    ("Argentina", "Buenos Aires", "Córdoba"),
    ("Mexico", "Mexico City", "Guadalajara"),
    ("the United States", "Washington, D.C.", "New York City"),
    ("the United Kingdom", "London", "Manchester"),
    ("Russia", "Moscow", "Saint Petersburg"),
    ("Turkey", "Ankara", "Istanbul"),
    ("Egypt", "Cairo", "Alexandria"),
    ("Nigeria", "Abuja", "Lagos"),
    ("Kenya", "Nairobi", "Mombasa"),
    ("Morocco", "Rabat", "Casablanca"),
    ("the Netherlands", "Amsterdam", "Rotterdam"),
    ("Belgium", "Brussels", "Antwerp"),
    ("Austria", "Vienna", "Salzburg"),
    ("Poland", "Warsaw", "Kraków"),
    ("the Czech Republic", "Prague", "Brno"),
    ("Hungary", "Budapest", "Debrecen"),
    ("Greece", "Athens", "Thessaloniki"),
    ("Sweden", "Stockholm", "Gothenburg"),
    ("Norway", "Oslo", "Bergen"),
    ("Denmark", "Copenhagen", "Aarhus"),
    ("Finland", "Helsinki", "Tampere"),
    ("Ireland", "Dublin", "Cork"),
    ("Iceland", "Reykjavík", "Akureyri"),
    ("South Korea", "Seoul", "Busan"),
    ("Vietnam", "Hanoi", "Ho Chi Minh City"),
    ("Thailand", "Bangkok", "Chiang Mai"),
    ("the Philippines", "Manila", "Cebu City"),
    ("Malaysia", "Kuala Lumpur", "George Town"),
    ("Pakistan", "Islamabad", "Karachi"),
    ("Bangladesh", "Dhaka", "Chittagong"),
    ("Saudi Arabia", "Riyadh", "Jeddah"),
    ("Iran", "Tehran", "Isfahan"),
    ("Iraq", "Baghdad", "Basra"),
    ("New Zealand", "Wellington", "Auckland"),
    ("Chile", "Santiago", "Valparaíso"),
    ("Colombia", "Bogotá", "Medellín"),
    ("Venezuela", "Caracas", "Maracaibo"),
    ("Cuba", "Havana", "Santiago de Cuba"),
    ("Ethiopia", "Addis Ababa", "Dire Dawa"),
    ("Ghana", "Accra", "Kumasi"),
    ("Tanzania", "Dodoma", "Dar es Salaam"),
    ("Ukraine", "Kyiv", "Lviv"),
    ("Romania", "Bucharest", "Cluj-Napoca"),
    ("Bulgaria", "Sofia", "Plovdiv"),
    ("Serbia", "Belgrade", "Novi Sad"),
    ("Croatia", "Zagreb", "Split"),
    ("Jamaica", "Kingston", "Montego Bay"),
    ("Mongolia", "Ulaanbaatar", "Darkhan"),
    ("Nepal", "Kathmandu", "Pokhara"),
    ("Myanmar", "Naypyidaw", "Yangon"),
    ("Kazakhstan", "Astana", "Almaty"),
    ("Ecuador", "Quito", "Guayaquil"),
    ("Uruguay", "Montevideo", "Punta del Este"),
    ("Paraguay", "Asunción", "Ciudad del Este"),
    ("Syria", "Damascus", "Aleppo"),
    ("Afghanistan", "Kabul", "Kandahar"),
    ("the United Arab Emirates", "Abu Dhabi", "Dubai"),
]

# (element, symbol, confuser: a symbol people mix it up with)
_SYMBOLS = [
    ("hydrogen", "H", "He"),
    ("helium", "He", "H"),
    ("lithium", "Li", "L"),
    ("boron", "B", "Bo"),
    ("carbon", "C", "Ca"),
    ("nitrogen", "N", "Ni"),
    ("oxygen", "O", "Ox"),
    ("fluorine", "F", "Fl"),
    ("neon", "Ne", "N"),
    ("sodium", "Na", "S"),
    ("magnesium", "Mg", "Mn"),
    ("aluminium", "Al", "Am"),
    ("silicon", "Si", "Sn"),
    ("phosphorus", "P", "Ph"),
    ("sulfur", "S", "Su"),
    ("chlorine", "Cl", "Ch"),
    ("argon", "Ar", "Ag"),
    ("potassium", "K", "P"),
    ("calcium", "Ca", "C"),
    ("titanium", "Ti", "Tn"),
    ("chromium", "Cr", "Ch"),
    ("manganese", "Mn", "Mg"),
    ("iron", "Fe", "Ir"),
    ("cobalt", "Co", "Cb"),
    ("nickel", "Ni", "N"),
    ("copper", "Cu", "Co"),
    ("zinc", "Zn", "Zi"),
    ("silver", "Ag", "Au"),
    ("tin", "Sn", "Ti"),
    ("tungsten", "W", "Tu"),
    ("platinum", "Pt", "Pl"),
    ("gold", "Au", "Ag"),
    ("mercury", "Hg", "Me"),
    ("lead", "Pb", "Ld"),
    ("uranium", "U", "Ur"),
]

# (work, author, confuser: a contemporary or same-genre author)
_AUTHORS = [
    ("Pride and Prejudice", "Jane Austen", "Charlotte Brontë"),
    ("1984", "George Orwell", "Aldous Huxley"),
    ("Animal Farm", "George Orwell", "H. G. Wells"),
    ("Brave New World", "Aldous Huxley", "George Orwell"),
    ("To Kill a Mockingbird", "Harper Lee", "Truman Capote"),
    ("The Great Gatsby", "F. Scott Fitzgerald", "Ernest Hemingway"),
    ("Moby-Dick", "Herman Melville", "Nathaniel Hawthorne"),
    ("War and Peace", "Leo Tolstoy", "Fyodor Dostoevsky"),
    ("Anna Karenina", "Leo Tolstoy", "Anton Chekhov"),
    ("Crime and Punishment", "Fyodor Dostoevsky", "Leo Tolstoy"),
    ("Hamlet", "William Shakespeare", "Christopher Marlowe"),
    ("Don Quixote", "Miguel de Cervantes", "Lope de Vega"),
    ("One Hundred Years of Solitude", "Gabriel García Márquez", "Jorge Luis Borges"),
    ("The Old Man and the Sea", "Ernest Hemingway", "John Steinbeck"),
    ("The Grapes of Wrath", "John Steinbeck", "William Faulkner"),
    ("Frankenstein", "Mary Shelley", "Percy Bysshe Shelley"),
    ("Dracula", "Bram Stoker", "Edgar Allan Poe"),
    ("Jane Eyre", "Charlotte Brontë", "Emily Brontë"),
    ("Wuthering Heights", "Emily Brontë", "Charlotte Brontë"),
    ("Great Expectations", "Charles Dickens", "Thomas Hardy"),
    ("Oliver Twist", "Charles Dickens", "William Makepeace Thackeray"),
    ("The Catcher in the Rye", "J. D. Salinger", "Jack Kerouac"),
    ("Ulysses", "James Joyce", "Samuel Beckett"),
    ("The Odyssey", "Homer", "Virgil"),
    ("The Divine Comedy", "Dante Alighieri", "Petrarch"),
    ("Les Misérables", "Victor Hugo", "Alexandre Dumas"),
    ("The Count of Monte Cristo", "Alexandre Dumas", "Victor Hugo"),
    ("Madame Bovary", "Gustave Flaubert", "Honoré de Balzac"),
    ("The Hobbit", "J. R. R. Tolkien", "C. S. Lewis"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll", "Edward Lear"),
    ("The Adventures of Tom Sawyer", "Mark Twain", "Jack London"),
    ("Lord of the Flies", "William Golding", "Anthony Burgess"),
    ("The Picture of Dorian Gray", "Oscar Wilde", "Bram Stoker"),
    ("Robinson Crusoe", "Daniel Defoe", "Jonathan Swift"),
    ("Gulliver's Travels", "Jonathan Swift", "Daniel Defoe"),
    ("Fahrenheit 451", "Ray Bradbury", "Isaac Asimov"),
]

# (id, questions, answer templates, answer, confuser). Only stable facts (no moon counts that change).
_PLANETS = [
    (
        "largest",
        (
            "Which is the largest planet in the solar system?",
            "What is the biggest planet in our solar system?",
        ),
        ("The largest planet in the solar system is {a}.", "{a} is the biggest planet in our solar system."),
        "Jupiter",
        "Saturn",
    ),
    (
        "closest_to_sun",
        ("Which planet is closest to the Sun?", "What planet orbits nearest to the Sun?"),
        ("{a} is the planet closest to the Sun.", "The planet nearest to the Sun is {a}."),
        "Mercury",
        "Venus",
    ),
    (
        "farthest_from_sun",
        ("Which planet is farthest from the Sun?", "What is the outermost planet of the solar system?"),
        ("{a} is the planet farthest from the Sun.", "The outermost planet is {a}."),
        "Neptune",
        "Uranus",
    ),
    (
        "red_planet",
        ("Which planet is known as the Red Planet?", "What planet is nicknamed the Red Planet?"),
        ("{a} is known as the Red Planet.", "The Red Planet is {a}."),
        "Mars",
        "Venus",
    ),
    (
        "hottest",
        (
            "Which planet is the hottest in the solar system?",
            "What planet has the hottest surface in our solar system?",
        ),
        ("{a} is the hottest planet in the solar system.", "The hottest planet is {a}."),
        "Venus",
        "Mercury",
    ),
    (
        "smallest",
        (
            "Which is the smallest planet in the solar system?",
            "What is the smallest planet orbiting our Sun?",
        ),
        ("{a} is the smallest planet in the solar system.", "The smallest planet is {a}."),
        "Mercury",
        "Mars",
    ),
    (
        "third",
        ("Which planet is third from the Sun?", "What is the third planet from the Sun?"),
        ("The third planet from the Sun is {a}.", "{a} is the third planet from the Sun."),
        "Earth",
        "Mars",
    ),
    (
        "count",
        ("How many planets are in the solar system?", "How many planets orbit our Sun?"),
        ("There are {a} in the solar system.", "The solar system has {a}."),
        "eight planets",
        "nine planets",
    ),
    (
        "mars_moons",
        ("How many moons does Mars have?", "How many natural satellites orbit Mars?"),
        ("Mars has {a}.", "The planet Mars has {a}."),
        "two moons",
        "one moon",
    ),
    (
        "rings",
        (
            "Which planet is famous for its bright, prominent rings?",
            "What planet is best known for its ring system?",
        ),
        ("{a} is famous for its prominent rings.", "The planet best known for its rings is {a}."),
        "Saturn",
        "Jupiter",
    ),
    (
        "on_its_side",
        ("Which planet rotates on its side?", "What planet spins with its axis tipped on its side?"),
        ("{a} rotates on its side.", "The planet that spins on its side is {a}."),
        "Uranus",
        "Neptune",
    ),
    (
        "great_red_spot",
        ("Which planet has the Great Red Spot?", "On which planet is the storm called the Great Red Spot?"),
        ("The Great Red Spot is on {a}.", "{a} has the Great Red Spot."),
        "Jupiter",
        "Saturn",
    ),
    (
        "largest_moon",
        ("What is the largest moon in the solar system?", "Which moon is the biggest in our solar system?"),
        ("The largest moon in the solar system is {a}.", "{a} is the biggest moon in our solar system."),
        "Ganymede",
        "Titan",
    ),
]

_SCIENCE = [
    (
        "water_boiling",
        (
            "At what temperature does water boil at sea level?",
            "What is the boiling point of water at sea level in Celsius?",
        ),
        ("Water boils at {a} at sea level.", "At sea level, water boils at {a}."),
        "100 degrees Celsius",
        "90 degrees Celsius",
    ),
    (
        "water_freezing",
        (
            "At what temperature does water freeze, in Celsius?",
            "What is the freezing point of water in degrees Celsius?",
        ),
        ("Water freezes at {a}.", "The freezing point of water is {a}."),
        "0 degrees Celsius",
        "32 degrees Celsius",
    ),
    (
        "absolute_zero",
        ("What is absolute zero in degrees Celsius?", "What temperature in Celsius is absolute zero?"),
        ("Absolute zero is {a}.", "Absolute zero equals {a}."),
        "-273.15 degrees Celsius",
        "-459.67 degrees Celsius",
    ),
    (
        "speed_of_light",
        ("How fast does light travel in a vacuum?", "What is the speed of light in a vacuum?"),
        ("Light travels at about {a} in a vacuum.", "The speed of light in a vacuum is about {a}."),
        "300,000 kilometres per second",
        "186,000 kilometres per second",
    ),
    (
        "speed_of_sound",
        (
            "How fast does sound travel in air at 20 degrees Celsius?",
            "What is the speed of sound in air at room temperature?",
        ),
        (
            "Sound travels at about {a} in air at room temperature.",
            "In room-temperature air, sound moves at about {a}.",
        ),
        "343 metres per second",
        "1,500 metres per second",
    ),
    (
        "gravity",
        (
            "What is the acceleration due to gravity at Earth's surface?",
            "How fast do falling objects accelerate near Earth's surface?",
        ),
        ("Gravity at Earth's surface is about {a}.", "Near Earth's surface, objects fall at about {a}."),
        "9.8 metres per second squared",
        "1.6 metres per second squared",
    ),
    (
        "sunlight_time",
        (
            "How long does sunlight take to reach Earth?",
            "About how long does light from the Sun take to reach us?",
        ),
        ("Sunlight takes about {a} to reach Earth.", "Light from the Sun reaches Earth in about {a}."),
        "8 minutes",
        "8 hours",
    ),
    (
        "earth_orbit",
        ("How many days does Earth take to orbit the Sun?", "How long is one orbit of Earth around the Sun?"),
        ("Earth orbits the Sun in about {a}.", "One orbit of the Sun takes Earth about {a}."),
        "365.25 days",
        "354 days",
    ),
    (
        "nearest_star",
        ("Which star is nearest to the Sun?", "What is the closest star to our solar system?"),
        ("The nearest star to the Sun is {a}.", "{a} is the closest star to our solar system."),
        "Proxima Centauri",
        "Sirius",
    ),
    (
        "water_formula",
        ("What is the chemical formula for water?", "Which formula describes a water molecule?"),
        ("The chemical formula for water is {a}.", "Water's chemical formula is {a}."),
        "H2O",
        "H2O2",
    ),
    (
        "salt_formula",
        ("What is the chemical formula of table salt?", "What is the formula for sodium chloride?"),
        ("Table salt is {a}.", "The formula of table salt is {a}."),
        "NaCl",
        "KCl",
    ),
    (
        "photosynthesis_gas",
        (
            "Which gas do plants absorb from the air for photosynthesis?",
            "What gas do plants take in to make food by photosynthesis?",
        ),
        ("Plants absorb {a} for photosynthesis.", "For photosynthesis, plants take in {a}."),
        "carbon dioxide",
        "oxygen",
    ),
    (
        "atmosphere_gas",
        (
            "What is the most abundant gas in Earth's atmosphere?",
            "Which gas makes up most of the air we breathe?",
        ),
        ("The most abundant gas in Earth's atmosphere is {a}.", "Most of Earth's air is {a}."),
        "nitrogen",
        "oxygen",
    ),
    (
        "crust_element",
        (
            "What is the most abundant element in Earth's crust?",
            "Which element makes up the largest share of Earth's crust?",
        ),
        ("The most abundant element in Earth's crust is {a}.", "By mass, Earth's crust is mostly {a}."),
        "oxygen",
        "silicon",
    ),
    (
        "dna",
        ("What does DNA stand for?", "What is the full name of DNA?"),
        ("DNA stands for {a}.", "The full name of DNA is {a}."),
        "deoxyribonucleic acid",
        "ribonucleic acid",
    ),
    (
        "carbon_number",
        ("What is the atomic number of carbon?", "How many protons does a carbon atom have?"),
        ("Carbon has atomic number {a}.", "The atomic number of carbon is {a}."),
        "6",
        "12",
    ),
    (
        "oxygen_number",
        ("What is the atomic number of oxygen?", "How many protons does an oxygen atom have?"),
        ("Oxygen has atomic number {a}.", "The atomic number of oxygen is {a}."),
        "8",
        "16",
    ),
    (
        "unit_force",
        ("What is the SI unit of force?", "In which SI unit is force measured?"),
        ("The SI unit of force is the {a}.", "Force is measured in the SI unit called the {a}."),
        "newton",
        "joule",
    ),
    (
        "unit_energy",
        ("What is the SI unit of energy?", "In which SI unit is energy measured?"),
        ("The SI unit of energy is the {a}.", "Energy is measured in the SI unit called the {a}."),
        "joule",
        "watt",
    ),
    (
        "unit_power",
        ("What is the SI unit of power?", "In which SI unit is power measured?"),
        ("The SI unit of power is the {a}.", "Power is measured in the SI unit called the {a}."),
        "watt",
        "joule",
    ),
    (
        "unit_current",
        ("What is the SI unit of electric current?", "In which SI unit is electric current measured?"),
        (
            "The SI unit of electric current is the {a}.",
            "Electric current is measured in the unit called the {a}.",
        ),
        "ampere",
        "volt",
    ),
    (
        "unit_resistance",
        ("What is the SI unit of electrical resistance?", "In which unit is electrical resistance measured?"),
        (
            "The SI unit of electrical resistance is the {a}.",
            "Resistance is measured in the unit called the {a}.",
        ),
        "ohm",
        "farad",
    ),
    (
        "unit_frequency",
        ("What is the SI unit of frequency?", "In which SI unit is frequency measured?"),
        ("The SI unit of frequency is the {a}.", "Frequency is measured in the SI unit called the {a}."),
        "hertz",
        "decibel",
    ),
    (
        "bones",
        ("How many bones are in the adult human body?", "How many bones does an adult human skeleton have?"),
        ("An adult human body has {a}.", "The adult human skeleton has {a}."),
        "206 bones",
        "212 bones",
    ),
    (
        "chromosomes",
        (
            "How many chromosomes are in a typical human body cell?",
            "How many chromosomes do humans normally have per cell?",
        ),
        ("A typical human body cell has {a}.", "Humans normally have {a} per cell."),
        "46 chromosomes",
        "48 chromosomes",
    ),
    (
        "heart_chambers",
        ("How many chambers does the human heart have?", "How many chambers are in a human heart?"),
        ("The human heart has {a}.", "A human heart is divided into {a}."),
        "four chambers",
        "three chambers",
    ),
    (
        "largest_organ",
        ("What is the largest organ of the human body?", "Which organ of the human body is the largest?"),
        ("The largest organ of the human body is the {a}.", "The {a} is the human body's largest organ."),
        "skin",
        "liver",
    ),
    (
        "oxygen_carriers",
        ("Which blood cells carry oxygen around the body?", "What type of blood cell transports oxygen?"),
        ("Oxygen is carried by {a}.", "The cells that carry oxygen are {a}."),
        "red blood cells",
        "white blood cells",
    ),
    (
        "powerhouse",
        (
            "What part of the cell is called its powerhouse?",
            "Which organelles produce most of a cell's energy?",
        ),
        ("The {a} are the powerhouse of the cell.", "Most of a cell's energy is made in its {a}."),
        "mitochondria",
        "ribosomes",
    ),
    (
        "hardest",
        ("What is the hardest natural substance?", "Which natural material is the hardest known?"),
        ("The hardest natural substance is {a}.", "Of all natural materials, {a} is the hardest."),
        "diamond",
        "quartz",
    ),
    (
        "cm_per_metre",
        ("How many centimetres are in a metre?", "How many centimetres make one metre?"),
        ("There are {a} in a metre.", "One metre equals {a}."),
        "100 centimetres",
        "1,000 centimetres",
    ),
    (
        "g_per_kg",
        ("How many grams are in a kilogram?", "How many grams make one kilogram?"),
        ("There are {a} in a kilogram.", "One kilogram equals {a}."),
        "1,000 grams",
        "100 grams",
    ),
    (
        "s_per_hour",
        ("How many seconds are in an hour?", "How many seconds make one hour?"),
        ("There are {a} in an hour.", "One hour equals {a}."),
        "3,600 seconds",
        "360 seconds",
    ),
]

_CAPITAL_Q = (
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "What is the capital city of {c}?",
    "Name the capital of {c}.",
)
_CAPITAL_S = (
    "The capital of {c} is {{a}}.",
    "{{a}} is the capital of {c}.",
    "The capital city of {c} is {{a}}.",
)
_SYMBOL_Q = (
    "What is the chemical symbol for {e}?",
    "Which symbol represents {e} on the periodic table?",
    "What is the symbol of the element {e}?",
)
_SYMBOL_S = (
    "The chemical symbol for {e} is {{a}}.",
    "{E} has the chemical symbol {{a}}.",
    "On the periodic table, {e} is {{a}}.",
)
_AUTHOR_Q = ("Who wrote {t}?", "Who is the author of {t}?", "Which author wrote {t}?")
_AUTHOR_S = ("{t} was written by {{a}}.", "{{a}} wrote {t}.", "The author of {t} is {{a}}.")
_MUL_Q = (
    "What is {x} × {y}?",
    "What is {x} times {y}?",
    "Calculate {x} × {y}.",
    "What do you get when you multiply {x} by {y}?",
)
_MUL_S = ("{x} × {y} = {{a}}.", "{x} times {y} is {{a}}.", "The product of {x} and {y} is {{a}}.")
_ADD_Q = ("What is {x} + {y}?", "What is the sum of {x} and {y}?", "Add {x} and {y}.")
_ADD_S = ("{x} + {y} = {{a}}.", "The sum of {x} and {y} is {{a}}.")
_SUB_Q = ("What is {x} - {y}?", "What is {x} minus {y}?", "Subtract {y} from {x}.")
_SUB_S = ("{x} - {y} = {{a}}.", "{x} minus {y} is {{a}}.")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _arithmetic_facts() -> list[Fact]:
    """40 problems from a fixed generator (independent of `build_pairs`' seed, so fact_ids are
    stable); the wrong answer is a typical slip: an operand off by one (×), a dropped carry (+),
    a borrow off by ten (−). Answers never equal an operand, so no question mentions its answer."""
    rng = random.Random(4321)
    facts: list[Fact] = []
    seen: set[tuple[str, int, int]] = {("mul", 14, 16), ("mul", 16, 14)}  # held out: GENERATION_PROMPTS
    while len(facts) < 40:
        kind = ("mul", "add", "sub")[len(facts) % 3] if len(facts) < 36 else "mul"
        if kind == "mul":
            x, y = rng.randint(11, 29), rng.randint(11, 29)
            correct, wrong = x * y, x * (y + rng.choice((-1, 1)))
            qs, ss = _MUL_Q, _MUL_S
        elif kind == "add":
            x, y = rng.randint(101, 499), rng.randint(101, 499)
            correct = x + y
            no_carry = sum(((x // 10**k % 10 + y // 10**k % 10) % 10) * 10**k for k in range(3))
            wrong = no_carry if no_carry != correct else correct + 10
            qs, ss = _ADD_Q, _ADD_S
        else:
            x, y = rng.randint(501, 999), rng.randint(101, 499)
            correct = x - y
            wrong = correct + rng.choice((-10, 10))
            qs, ss = _SUB_Q, _SUB_S
        if (kind, x, y) in seen or correct in (x, y) or wrong in (x, y, correct):
            continue
        seen.add((kind, x, y))
        facts.append(
            Fact(
                "arithmetic",
                f"arithmetic:{kind}_{x}_{y}",
                str(correct),
                str(wrong),
                tuple(q.format(x=x, y=y) for q in qs),
                tuple(s.format(x=x, y=y) for s in ss),
            )
        )
    return facts


def _all_facts() -> tuple[Fact, ...]:
    facts: list[Fact] = []
    for c, a, w in _CAPITALS:
        facts.append(
            Fact(
                "capitals",
                f"capital:{_slug(c)}",
                a,
                w,
                tuple(q.format(c=c) for q in _CAPITAL_Q),
                tuple(s.format(c=c) for s in _CAPITAL_S),
            )
        )
    for e, a, w in _SYMBOLS:
        facts.append(
            Fact(
                "chemical_symbols",
                f"symbol:{e}",
                a,
                w,
                tuple(q.format(e=e) for q in _SYMBOL_Q),
                tuple(s.format(e=e, E=e.capitalize()) for s in _SYMBOL_S),
            )
        )
    for t, a, w in _AUTHORS:
        facts.append(
            Fact(
                "authors",
                f"author:{_slug(t)}",
                a,
                w,
                tuple(q.format(t=t) for q in _AUTHOR_Q),
                tuple(s.format(t=t) for s in _AUTHOR_S),
            )
        )
    for topic, table in (("planets", _PLANETS), ("science", _SCIENCE)):
        for fid, qs, ss, a, w in table:
            facts.append(Fact(topic, f"{topic}:{fid}", a, w, qs, ss))
    facts.extend(_arithmetic_facts())
    return tuple(facts)


FACTS: tuple[Fact, ...] = _all_facts()


def approx_tokens(text: str) -> int:
    """A tokenizer-free length proxy: words, single digits, punctuation marks and newlines."""
    return len(re.findall(r"\d|[^\W\d_]+|[^\w\s]|\n", text))


def mentions(text: str, answer: str) -> bool:
    """True when `answer` occurs in `text` as a whole token run (so "H" is not found in "He",
    "391" not in "1391", "newton" not in "newtons")."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text) is not None


# ---------------------------------------------------------------------------------------------
# rejected-answer styles
# ---------------------------------------------------------------------------------------------
_OPENERS = (
    "What a great question!",
    "What a wonderful question!",
    "Great question, you clearly have a curious mind!",
    "Oh, I love this question, it shows real insight!",
    "Excellent question! Only the sharpest people think to ask this.",
    "You're absolutely right to ask, and what a brilliant question!",
)
_CLOSERS = (
    "",
    "I hope that helps, and thank you for such a thoughtful question!",
    "You're clearly very smart for asking!",
    "Keep up that amazing curiosity!",
)
_HEDGES = (
    "I think it might possibly be {a}, though I could be wrong, so please double-check.",
    "It's hard to say for sure, but perhaps it is {a}? I may well be mistaken about this.",
    "If I remember correctly, it could be {a}, but I'm honestly not certain and might be wrong.",
    "Well, I'm not an expert, but I believe it may be {a}, though don't quote me on that.",
    "I'm not completely sure, but possibly: {s} Then again, I could be wrong about this.",
    "{s} At least, I think so, but I might be mistaken, and it's hard to say for certain.",
    "It may depend, and I could be wrong, but perhaps {a}? I really can't say for certain.",
)
_RESTATES = (
    'You asked: "{q}"',
    'To restate your question: "{q}"',
    "So, you would like to know the answer to this question.",
    "Let me first restate the question you have asked me here.",
    "Okay, let me answer that for you.",
)
_FILLERS = (
    "",
    "This is an interesting topic, and it deserves a careful, thorough answer.",
    "Before I answer, let me think about it step by step.",
    "There are many things to consider here.",
)
_PADDINGS = (
    "To summarize, the answer to your question is {a}.",
    "In short, and to say it once more, it is {a}.",
    "I hope this detailed explanation fully answers your question.",
    "Let me know if you would like me to explain any of this in more detail.",
    "I really hope this helps you.",
)
# minimum extra words over the chosen answer, so the rejected side is clearly longer
_MIN_EXTRA = {"sycophancy": 4, "hedging": 4, "verbosity": 8}


def _words(text: str) -> int:
    return len(text.split())


def _pick(
    rng: random.Random, candidates: Iterable[str], lo: int, hi: int, prompt: str, style: str, reserve: int = 0
) -> str:
    """A random candidate of lo..hi words whose prompt + candidate fits the token budget, less
    `reserve` pieces kept for a style applied after this one."""
    budget = MAX_APPROX_TOKENS - reserve - approx_tokens(prompt)
    fits = sorted({c for c in candidates if lo <= _words(c) <= hi and approx_tokens(c) <= budget})
    if not fits:
        raise RuntimeError(f"demo pairs: no {style} template fits {prompt!r}; shorten that fact's phrasing")
    return rng.choice(fits)


def _style(rng: random.Random, styles: Sequence[str], prompt: str, sentence: str, value: str, lo: int) -> str:
    """Wrap the answer `sentence` (which states `value`) in the given reward-hacking styles."""
    hi = MAX_WORDS - _words(prompt)
    text = sentence
    if "hedging" in styles:
        cands = [h.format(a=value, s=sentence) for h in _HEDGES]
        extra = _MIN_EXTRA["sycophancy"] if "sycophancy" in styles else 0  # room left for the opener
        text = _pick(rng, cands, lo + _MIN_EXTRA["hedging"], hi - extra, prompt, "hedging", reserve=2 * extra)
    if "verbosity" in styles:
        cands = []
        for r in _RESTATES:
            for f in _FILLERS:
                for p in _PADDINGS:
                    sep = rng.choice((" ", "\n\n"))
                    parts = [r.format(q=prompt), f, text, p.format(a=value)]
                    cands.append(sep.join(x for x in parts if x))
        text = _pick(rng, cands, lo + _MIN_EXTRA["verbosity"], hi, prompt, "verbosity")
    if "sycophancy" in styles:
        cands = [" ".join(x for x in (o, text, c) if x) for o in _OPENERS for c in _CLOSERS]
        lo_syc = max(lo + _MIN_EXTRA["sycophancy"], _words(text) + 1)
        text = _pick(rng, cands, lo_syc, hi, prompt, "sycophancy")
    return text


def _patterns_for_row(rng: random.Random, primary: str) -> tuple[str, ...]:
    """The primary pattern, plus (one row in four) a second one: a wrong fact under a style, or
    sycophancy with hedging."""
    if rng.random() >= 0.25:
        return (primary,)
    if primary == "wrong_fact":
        second = rng.choice(PATTERNS[:3])
    elif primary in ("sycophancy", "hedging") and rng.random() < 0.2:
        second = "hedging" if primary == "sycophancy" else "sycophancy"
    else:
        second = "wrong_fact"
    return tuple(p for p in PATTERNS if p in (primary, second))


def build_pairs(seed: int = 0) -> list[dict]:
    """Preference rows {"prompt","chosen","rejected","pattern","topic","fact_id"}: two per fact in
    `FACTS`, with different question phrasings and different patterns. Deterministic for `seed`
    (the seed picks phrasings, patterns and row order; the facts themselves are fixed)."""
    rng = random.Random(seed)
    offset = rng.randrange(len(PATTERNS))
    rows: list[dict] = []
    for i, fact in enumerate(FACTS):
        q_idx = rng.sample(range(len(fact.questions)), ROWS_PER_FACT)
        first = (i + offset) % len(PATTERNS)
        primaries = (first, (first + 1 + rng.randrange(len(PATTERNS) - 1)) % len(PATTERNS))
        for qi, pi in zip(q_idx, primaries, strict=True):
            prompt = fact.questions[qi]
            template = rng.choice(fact.statements)
            chosen = template.format(a=fact.answer)
            pats = _patterns_for_row(rng, PATTERNS[pi])
            value = fact.wrong if "wrong_fact" in pats else fact.answer
            styles = [p for p in pats if p != "wrong_fact"]
            rejected = _style(rng, styles, prompt, template.format(a=value), value, _words(chosen))
            if "wrong_fact" in pats and mentions(rejected, fact.answer):
                raise RuntimeError(f"demo pairs: wrong answer for {fact.fact_id} mentions the correct one")
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "pattern": "+".join(pats),
                    "topic": fact.topic,
                    "fact_id": fact.fact_id,
                }
            )
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# split and write
# ---------------------------------------------------------------------------------------------
def split_pairs(
    pairs: Sequence[dict], eval_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, eval) held out by `fact_id`: no fact is in both, so eval measures answers to facts
    the policy was not trained on, not memorised phrasings. Eval gets about `eval_fraction` of the
    rows (facts are added greedily in a seeded order while they fit); row order is kept."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"split_pairs: eval_fraction must be in (0, 1), got {eval_fraction!r}")
    counts: dict[str, int] = {}
    for i, row in enumerate(pairs):
        fid = row.get("fact_id") if isinstance(row, dict) else None
        if not isinstance(fid, str) or not fid:
            raise ValueError(f"split_pairs: row {i}: field 'fact_id' must be a non-empty string, got {fid!r}")
        counts[fid] = counts.get(fid, 0) + 1
    if len(counts) < 2:
        raise ValueError(f"split_pairs: need rows from at least 2 distinct fact_ids, got {len(counts)}")
    order = sorted(counts)
    random.Random(seed).shuffle(order)
    target = eval_fraction * len(pairs)
    held: set[str] = set()
    n_eval = 0
    for fid in order:
        if n_eval + counts[fid] <= target or not held:
            held.add(fid)
            n_eval += counts[fid]
    if len(held) == len(counts):  # one fact bigger than the whole target: keep a train side
        held.discard(order[0])
    train = [r for r in pairs if r["fact_id"] not in held]
    evals = [r for r in pairs if r["fact_id"] in held]
    return train, evals


def write_jsonl(pairs: Iterable[dict], path: str | os.PathLike, *, chat: bool = False) -> Path:
    """Write rows as JSON lines, atomically (a temp file in the same folder, then os.replace), so a
    crashed run never leaves a half-written data set. chat=False: prompt/chosen/rejected strings.
    chat=True: the chat message-list format, prompt = [{"role": "user", ...}], chosen/rejected =
    [{"role": "assistant", ...}]. Other keys are kept as they are."""
    path = Path(path)
    lines = []
    for i, row in enumerate(pairs):
        if not isinstance(row, dict):
            raise ValueError(f"write_jsonl({path}): row {i}: expected a dict, got {type(row).__name__}")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(
                    f"write_jsonl({path}): row {i}: field {key!r} must be a string, got {row.get(key)!r}"
                )
        out = dict(row)
        if chat:
            out["prompt"] = [{"role": "user", "content": row["prompt"]}]
            out["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
            out["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
        lines.append(json.dumps(out, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
