"""The model's tokenizer in the web process, so prompts are measured before anything is queued."""

from __future__ import annotations

from sd_pipeline.contract.request import TokenBudget
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.versions.resolve import resolve_model


def token_budget(settings: PipelineSettings) -> TokenBudget:
    """The tokenizer the worker or replica uses: a version from S3 is fetched and verified into this
    host's cache first (a no-op once there), which also checks it before any replica loads it.
    transformers only, no torch."""
    from transformers import CLIPTokenizer

    source = resolve_model(settings.model, settings.model_store).source
    return TokenBudget.of(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"))
