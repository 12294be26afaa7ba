"""Prompt templates per class, sampled deterministically from a seed and a sample index.

A prompt set is a YAML file in `prompts/`: slot values, single-class templates with a
`{class}` slot, multi-class templates with `{a}`, `{b}`, `{c}` slots. Square brackets mark
the seed phrase of a class ("a [{colour} {class}]"): its tokens seed the class mask.
Without brackets the class name alone seeds it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator)

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
MULTI_SLOTS = ("a", "b", "c", "d")
_SLOT = re.compile(r"\{(\w+)\}")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


class PromptSetError(ValueError):
    pass


class _PromptFile(BaseModel):
    """The file's shape; the templates' own rules are checked by `validate_template`."""
    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    slots: dict[str, list[StrictStr | StrictInt | StrictFloat | StrictBool]] = Field(default_factory=dict)
    single: list[StrictStr] = Field(default_factory=list)
    multi: list[StrictStr] = Field(default_factory=list)
    distinct: list[StrictStr] = Field(default_factory=list)

    @field_validator("slots", mode="before")
    @classmethod
    def _no_slots(cls, v):
        return {} if v is None else v  # `slots:` with nothing under it

    @field_validator("single", "multi", "distinct", mode="before")
    @classmethod
    def _no_templates(cls, v):
        return [] if v is None else v


@dataclass(frozen=True)
class PromptClass:
    name: str
    phrase: str  # the text whose tokens seed this class


@dataclass(frozen=True)
class Prompt:
    text: str
    classes: tuple[PromptClass, ...]


@dataclass
class PromptSet:
    name: str
    slots: dict[str, list[str]]
    single: list[str]
    multi: list[str]
    distinct: tuple[str, ...] = ()

    @property
    def max_classes(self) -> int:
        return max([1] + [len(class_slots(t)) for t in self.multi])

    def templates_for(self, n_classes: int) -> list[str]:
        if n_classes == 1:
            return self.single
        return [t for t in self.multi if len(class_slots(t)) == n_classes]


def class_slots(template: str) -> list[str]:
    names = _SLOT.findall(template)
    return [n for n in names if n == "class" or n in MULTI_SLOTS]


def validate_template(template: str, slots: dict[str, list[str]], multi: bool, where: str) -> None:
    names = _SLOT.findall(template)
    cs = class_slots(template)
    if multi:
        if len(cs) < 2 or len(set(cs)) != len(cs) or cs != sorted(cs) or "class" in cs:
            raise PromptSetError(f"{where}: multi-class template {template!r} needs distinct slots "
                                 f"{{a}}, {{b}}, ... in order (found {cs or 'no class slot'})")
    elif cs != ["class"]:
        raise PromptSetError(f"{where}: template {template!r} needs exactly one {{class}} slot")
    for n in names:
        if n not in slots and n != "class" and n not in MULTI_SLOTS:
            raise PromptSetError(f"{where}: template {template!r} uses slot {{{n}}} with no values under 'slots'")
    for inner in _BRACKET.findall(template):
        if len(class_slots(inner)) != 1:
            raise PromptSetError(f"{where}: seed phrase [{inner}] in {template!r} must hold exactly one class slot")


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """Load and validate `prompts/<name>.yaml` or a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROMPTS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml")))
        raise PromptSetError(f"prompt set {str(name_or_path)!r} not found (looked for {path}); known: {known}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PromptSetError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    try:
        spec = _PromptFile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise PromptSetError(f"{path}: key '{key}': {msg}") from None
    slots = {k: [str(v) for v in vs] for k, vs in spec.slots.items()}
    for k, vs in slots.items():
        if not vs:
            raise PromptSetError(f"{path}: slot {k!r} has no values")
    single, multi = spec.single, spec.multi
    if not single:
        raise PromptSetError(f"{path}: no single-class templates under 'single'")
    for t in single:
        validate_template(t, slots, multi=False, where=str(path))
    for t in multi:
        validate_template(t, slots, multi=True, where=str(path))
    distinct = tuple(spec.distinct)
    for d in distinct:
        if d not in slots:
            raise PromptSetError(f"{path}: 'distinct' names slot {d!r} that has no values")
    return PromptSet(path.stem, slots, single, multi, distinct)


def fill_template(template: str, class_names: list[str], rng: np.random.Generator,
                  prompt_set: PromptSet) -> Prompt:
    """Fill slots left to right; returns the prompt text and each class's seed phrase."""
    return _fill(template, class_names, prompt_set, lambda choices: choices[int(rng.integers(len(choices)))])


def fill_longest(template: str, class_names: list[str], prompt_set: PromptSet,
                 length: Callable[[str], int]) -> Prompt:
    """The longest prompt `template` can make for these classes: every slot takes its longest value
    by `length` (e.g. a token count); a 'distinct' slot its longest values not yet used."""
    return _fill(template, class_names, prompt_set, lambda choices: max(choices, key=length))


def _fill(template: str, class_names: list[str], prompt_set: PromptSet,
          pick: Callable[[list[str]], str]) -> Prompt:
    used: dict[str, set[str]] = {d: set() for d in prompt_set.distinct}
    cs = class_slots(template)
    class_of = dict(zip(cs, class_names))

    def value(slot: str) -> str:
        if slot in class_of:
            return class_of[slot]
        choices = [v for v in prompt_set.slots[slot] if v not in used.get(slot, ())]
        if not choices:
            raise PromptSetError(f"slot {slot!r} ran out of distinct values for template {template!r}")
        v = pick(choices)
        if slot in used:
            used[slot].add(v)
        return v

    filled = _SLOT.sub(lambda m: value(m.group(1)), template)
    phrases: dict[str, str] = {}
    for inner in _BRACKET.findall(filled):
        phrases[inner] = " ".join(inner.split())
    text = " ".join(_BRACKET.sub(lambda m: m.group(1), filled).split())
    # Map each class slot to the bracketed phrase holding its value, in order of appearance.
    bracket_phrases = [" ".join(p.split()) for p in _BRACKET.findall(filled)]
    classes = []
    for slot in cs:
        name = class_of[slot]
        phrase = next((p for p in bracket_phrases if re.search(rf"\b{re.escape(name)}\b", p)), name)
        if phrase in bracket_phrases:
            bracket_phrases.remove(phrase)
        classes.append(PromptClass(name, phrase))
    return Prompt(text, tuple(classes))


def sample_prompt(prompt_set: PromptSet, class_names: list[str], rng: np.random.Generator) -> Prompt:
    """A prompt for exactly these classes (1..max_classes), template chosen by `rng`."""
    templates = prompt_set.templates_for(len(class_names))
    if not templates:
        raise PromptSetError(f"prompt set {prompt_set.name!r} has no template for {len(class_names)} classes")
    template = templates[int(rng.integers(len(templates)))]
    return fill_template(template, class_names, rng, prompt_set)
