"""LoRA adapters as a prompt names them: AUTOMATIC1111's ``<lora:NAME:WEIGHT>`` tags.

A prompt may name any number of adapters (up to ``MAX_ADAPTERS``), each once, with a weight from
``MIN_WEIGHT`` to ``MAX_WEIGHT`` (1 when left out). The tags are stripped before the text is
encoded; the prompt as written (tags included) is what PNG parameters and history keep, as
AUTOMATIC1111 does. Every malformed tag is an ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sd_pipeline.contract.errors import InvalidRequestError

MIN_WEIGHT = -4.0
MAX_WEIGHT = 4.0
MAX_ADAPTERS = 8
MAX_NAME_CHARS = 100
# Any <lora:...> tag (checked further below), and anything that opens one without closing it.
_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_OPENED = re.compile(r"<lora:", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-. ]*")
_PATH_CHARACTERS = ("/", "\\", "..")


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a prompt names, with its weight."""

    name: str
    weight: float = 1.0

    @property
    def tag(self) -> str:
        """The tag AUTOMATIC1111 writes for it."""
        return f"<lora:{self.name}:{self.weight:g}>"


@dataclass(frozen=True)
class PromptAdapters:
    """A prompt split into the text the encoder reads and the adapters it names."""

    text: str
    loras: tuple[LoraChoice, ...] = ()


def _choice(body: str, field: str) -> LoraChoice:
    """``NAME`` or ``NAME:WEIGHT`` (the inside of one tag), checked."""
    name, _, weight_text = body.partition(":")
    name = name.strip()
    if not name:
        raise InvalidRequestError(field, "has a LoRA tag without a name; write <lora:NAME> or <lora:NAME:WEIGHT>")
    if any(mark in name for mark in _PATH_CHARACTERS):
        raise InvalidRequestError(field, f"LoRA name {name!r} must be a plain name, without / \\ or ..")
    if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            field,
            f"LoRA name {name!r} must be at most {MAX_NAME_CHARS} letters, digits, spaces, '_', '-' or '.'",
        )
    if not weight_text.strip():
        return LoraChoice(name)
    if ":" in weight_text:
        raise InvalidRequestError(field, f"LoRA tag <lora:{body}> has more than one weight; write <lora:{name}:WEIGHT>")
    try:
        weight = float(weight_text)
    except ValueError:
        raise InvalidRequestError(
            field, f"LoRA weight in <lora:{body}> must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}"
        ) from None
    if not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise InvalidRequestError(
            field, f"LoRA weight of {name!r} must be from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, got {weight_text.strip()}"
        )
    return LoraChoice(name, weight)


def parse_prompt(prompt: str, field: str = "prompt") -> PromptAdapters:
    """The prompt's text without its ``<lora:...>`` tags, and the adapters they name, in order."""
    loras: list[LoraChoice] = []
    for match in _TAG.finditer(prompt):
        choice = _choice(match.group(1), field)
        if any(seen.name == choice.name for seen in loras):
            raise InvalidRequestError(field, f"names LoRA {choice.name!r} twice; name each adapter once")
        loras.append(choice)
    text = _TAG.sub("", prompt)
    if _OPENED.search(text):
        raise InvalidRequestError(field, "has a <lora: tag that is not closed with '>'")
    if len(loras) > MAX_ADAPTERS:
        raise InvalidRequestError(field, f"names {len(loras)} LoRA adapters; at most {MAX_ADAPTERS} per prompt")
    return PromptAdapters(text=text.strip(), loras=tuple(loras))


def for_another_family(base: str, served: str) -> bool:
    """Whether an adapter made for ``base`` ("" when its file does not say) cannot serve the ``served`` family."""
    return bool(base) and base != served


def check_adapters(
    prompt: str, negative_prompt: str, listing: Callable[[], Mapping[str, str]], family: str
) -> PromptAdapters:
    """The prompt's adapters, each one of those ``listing`` gives (name -> base family, "" when unknown;
    listed only when the prompt names any) and made for the served ``family``. LoRA tags belong in
    the prompt: one in the negative prompt is refused."""
    if _OPENED.search(negative_prompt):
        raise InvalidRequestError("negative_prompt", "LoRA tags go in the prompt, not the negative prompt")
    adapters = parse_prompt(prompt)
    available = listing() if adapters.loras else {}
    for choice in adapters.loras:
        if choice.name not in available:
            close = difflib.get_close_matches(choice.name, list(available), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            listed = f" (available: {', '.join(sorted(available)[:20])})" if available and not close else ""
            raise InvalidRequestError("prompt", f"names LoRA {choice.name!r}, which is not available{hint}{listed}")
        base = available[choice.name]
        if for_another_family(base, family):
            raise InvalidRequestError(
                "prompt", f"LoRA {choice.name!r} is for {base} models; the served model is {family}"
            )
    return adapters
