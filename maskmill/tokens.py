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


def check_seed_phrases(tokenizer, prompt_set, classes: list[str], class_counts: list[int]) -> None:
    """Refuse (ClassNotInPromptError, one line naming the class) a class whose seed phrase some prompt
    of this set would push past the text encoder's token limit, where `phrase_token_indices` cannot
    find it and every sample of the class fails.

    Each class is tried in every slot of every template for the `class_counts` it is used with,
    every other slot holding its longest value (in tokens) and the other class slots the longest
    other classes: CLIP tokenizers split words apart before BPE, so no real prompt puts a phrase
    later than this. Classes are tried longest first, so the one at fault is named.
    """
    from .prompts import fill_longest

    cache: dict[str, int] = {}

    def length(text: str) -> int:
        if text not in cache:
            cache[text] = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        return cache[text]

    limit = tokenizer.model_max_length
    by_length = sorted(classes, key=length, reverse=True)
    for name in by_length:
        others = [c for c in by_length if c != name]
        for n in sorted(set(class_counts)):
            for template in prompt_set.templates_for(n):
                for pos in range(n):
                    names = others[: n - 1]
                    names.insert(pos, name)
                    prompt = fill_longest(template, names, prompt_set, length)
                    phrase = prompt.classes[pos].phrase
                    try:
                        phrase_token_indices(tokenizer, prompt.text, phrase)
                    except ClassNotInPromptError as e:
                        short = name if len(name) <= 40 else name[:37] + "..."
                        if length(prompt.text) + 2 > limit:
                            raise ClassNotInPromptError(
                                f"class {short!r} ({len(name)} characters): its seed phrase falls past the text "
                                f"encoder's {limit}-token limit (start/end tokens included) in prompts of "
                                f"template {template!r} ({length(prompt.text) + 2} tokens at most), so no sample "
                                f"of it could be made; shorten the class name or the template") from None
                        raise ClassNotInPromptError(f"class {short!r} in template {template!r}: {e}") from None
