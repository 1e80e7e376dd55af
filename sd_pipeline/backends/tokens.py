"""The model's tokenizer in the web process, so prompts are measured before anything is queued."""

from __future__ import annotations

from sd_pipeline.contract.request import TokenBudget
from sd_pipeline.contract.settings import model_source


def token_budget(model: str) -> TokenBudget:
    """The tokenizer the worker or replica uses (already downloaded by it); transformers only, no torch."""
    from transformers import CLIPTokenizer

    return TokenBudget.of(CLIPTokenizer.from_pretrained(model_source(model), subfolder="tokenizer"))
