"""Which prompt tokens seed a class: the tokens of its phrase, wherever it occurs in the prompt."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassSpec:
    """One class of a sample's prompt: its name and the prompt token positions that seed it."""

    name: str
    token_indices: tuple[int, ...]


class ClassNotInPromptError(ValueError):
    pass


def phrase_token_indices(tokenizer, prompt: str, phrase: str) -> tuple[int, ...]:
    """Positions (in the padded 77-token sequence, BOS at 0) of every occurrence of `phrase`'s tokens.

    Multi-token names ("potted plant", "traffic light") use all their tokens.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    target = tokenizer(phrase, add_special_tokens=False).input_ids
    if not target:
        raise ClassNotInPromptError(f"class phrase {phrase!r} has no tokens")
    n = len(target)
    hits = [i for i in range(len(ids) - n + 1) if ids[i : i + n] == target]
    if not hits:
        raise ClassNotInPromptError(f"class phrase {phrase!r} does not occur in prompt {prompt!r}")
    return tuple(i + j for i in hits for j in range(n))
