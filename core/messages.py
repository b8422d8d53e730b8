"""Pieces of the messages kiln prints for a user to act on: a value as it is written on the command line, the
choice a misspelt word was meant to be, an exception's first line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def fmt(value: Any, limit: int = 60) -> str:
    """A value as the user would write it on the command line."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value) if isinstance(value, str) else str(value)
    if isinstance(value, list | tuple):
        text = "[" + ", ".join(fmt(v, limit) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {fmt(v, limit)}" for k, v in value.items()) + "}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def closest(word: str, choices: Iterable[Any]) -> str | None:
    """The choice `word` was probably meant to be, or None."""
    return next(iter(difflib.get_close_matches(word, [str(c) for c in choices], n=1)), None)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(set(choices))
    if close := closest(word, choices):
        return f"did you mean '{close}'?"
    return f"allowed: {', '.join(choices)}" if choices else "no keys are allowed here"


def reason(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
