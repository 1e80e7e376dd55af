"""The LoRA adapters as the page and the API show them: a picker that writes the prompt's tag, and a listing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sd_pipeline.contract.loras import LoraChoice, for_another_family

AdapterListing = Callable[[], dict[str, str]]  # name -> the family it was made for ("" when unknown)


def lora_listing(adapters: AdapterListing, served_family: str) -> dict[str, Any]:
    """Every adapter with its family and whether the served model can use it (as far as its file tells)."""
    return {
        "served_family": served_family,
        "loras": [
            {
                "name": name,
                "family": family,
                "usable": not for_another_family(family, served_family),
                "tag": LoraChoice(name).tag,
            }
            for name, family in sorted(adapters().items())
        ],
    }


def lora_choices(adapters: AdapterListing, served_family: str) -> list[tuple[str, str]]:
    """The picker's entries: ``name · family`` (or ``· for another model``), valued by name."""
    entries = []
    for name, family in sorted(adapters().items()):
        note = family or "family not recorded"
        if for_another_family(family, served_family):
            note = f"{family}: not for this model"
        entries.append((f"{name} · {note}", name))
    return entries


def insert_lora(prompt: str, name: str | None) -> str:
    """The prompt with ``<lora:NAME:1>`` appended, as AUTOMATIC1111's LoRA cards do (once per adapter)."""
    if not name or f"<lora:{name}:" in prompt or f"<lora:{name}>" in prompt:
        return prompt
    return f"{prompt.rstrip()} {LoraChoice(name).tag}".strip()
