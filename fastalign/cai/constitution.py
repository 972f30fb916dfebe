"""A constitution: the written principles that critiques, revisions and AI feedback refer to.

File format (YAML or JSON): a list of principles, or a mapping with a `principles:` list. Each
principle is a mapping with

- `id`: a unique non-empty string (recorded in every trace and label row),
- `critique`: the critique request ("Identify specific ways in which the last response is ..."),
- `revision`: the revision request ("Please rewrite the response to remove ..."),
- `feedback` (optional): the multiple-choice question for labelling ("Which response is less
  harmful?"); without it the label step asks `DEFAULT_FEEDBACK`.

Why strict checks: a typo'd key (`critque`) would otherwise silently send an empty request to the
model and produce garbage data for hours; every error names the file, the principle (index and id)
and the field. `load_constitution("default")` reads the shipped `default_constitution.yaml`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml

DEFAULT = "default"
DEFAULT_FILE = "default_constitution.yaml"
DEFAULT_FEEDBACK = "Which of these assistant responses is more helpful, honest and harmless?"
_REQUIRED = ("id", "critique", "revision")
_KEYS = (*_REQUIRED, "feedback")


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    feedback: str = DEFAULT_FEEDBACK


def _read(path: str) -> tuple[object, str]:
    """(parsed document, name for messages); the default comes from the package data."""
    if path == DEFAULT:
        return _parse(
            files("fastalign.cai").joinpath(DEFAULT_FILE).read_text("utf-8"), DEFAULT_FILE
        ), DEFAULT_FILE
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"constitution file not found: {path} (a YAML/JSON list of principles)")
    return _parse(p.read_text(encoding="utf-8"), str(p)), str(p)


def _parse(text: str, name: str) -> object:

    try:
        return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{name}: not valid {'JSON' if name.endswith('.json') else 'YAML'}: {e}") from None


def _principle(item: object, i: int, name: str) -> Principle:
    if not isinstance(item, dict):
        raise ValueError(
            f"{name}: principle {i}: expected a mapping with {', '.join(_REQUIRED)}, got {item!r:.60}"
        )
    label = f"{name}: principle {i} (id {item.get('id')!r})"
    unknown = sorted(set(map(str, item)) - set(_KEYS))
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {unknown}; expected {', '.join(_KEYS)}")
    for key in _REQUIRED:
        if key not in item:
            raise ValueError(f"{label}: missing field {key!r}")
    for key in _KEYS:
        if key in item and (not isinstance(item[key], str) or not item[key].strip()):
            raise ValueError(f"{label}: field {key!r} must be a non-empty string, got {item[key]!r:.60}")
    fields = {k: item[k].strip() for k in _KEYS if k in item}
    return Principle(**fields)


def load_constitution(path: str = DEFAULT) -> list[Principle]:
    """The principles of a YAML/JSON file (or the shipped default), validated (see module doc)."""
    doc, name = _read(path)
    if isinstance(doc, dict) and set(doc) == {"principles"}:
        doc = doc["principles"]
    if not isinstance(doc, list) or not doc:
        raise ValueError(
            f"{name}: expected a non-empty list of principles (or a mapping with a 'principles' list), "
            f"got {type(doc).__name__ if doc else 'nothing'}"
        )
    principles = [_principle(item, i, name) for i, item in enumerate(doc)]
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p.id in seen:
            raise ValueError(
                f"{name}: principle {i} (id {p.id!r}): duplicate id (also principle {seen[p.id]})"
            )
        seen[p.id] = i
    return principles


def pick(principles: list[Principle], rng: random.Random) -> Principle:
    """One principle, uniformly, from a caller-owned (per-prompt seeded) RNG."""
    return principles[rng.randrange(len(principles))]
