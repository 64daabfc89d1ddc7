"""A small built-in generator of heterogeneous instruction tasks.

Used by the embedded default when ``../shared/data`` is not present (a user's machine):
each task has its own input distribution and its own output format, so a model
personalised to one task scores visibly lower on the others.
"""

from __future__ import annotations

import random

from fedblend.text.sources import Example

_WORDS = ["apple", "river", "stone", "cloud", "garden", "window", "pencil", "forest", "candle", "silver", "tiger", "ocean", "mountain", "button", "rocket", "violin", "lemon", "castle", "harbor", "meadow"]


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return Example("Reverse the order of these words: " + " ".join(words), " ".join(words[::-1]))


def _uppercase(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(2, 4))
    return Example("Write in capital letters: " + " ".join(words), " ".join(words).upper())


def _sort_numbers(rng: random.Random) -> Example:
    nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
    return Example(
        "Sort ascending: " + ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))
    )


def _parity(rng: random.Random) -> Example:
    n = rng.randint(1, 999)
    return Example(
        f"Is {n} even or odd?\nOPTIONS:\n- even\n- odd", "even" if n % 2 == 0 else "odd"
    )


def _first_letter(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return Example("First letters of: " + " ".join(words), "".join(w[0] for w in words))


def _compare(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 100), 2)
    return Example(
        f"Which is larger, {a} or {b}?", str(max(a, b))
    )


TASKS = {
    "reverse_words": _reverse,
    "uppercase": _uppercase,
    "sort_numbers": _sort_numbers,
    "parity": _parity,
    "first_letters": _first_letter,
    "compare_numbers": _compare,
}


def generate(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of ``task``; the same seed gives the same examples."""
    rng = random.Random(f"{task}:{seed}")
    out = []
    for _ in range(n):
        ex = TASKS[task](rng)
        out.append(Example(ex.instruction, ex.output, task, ex.output))
    return out
