"""The model's tokenizer in the web process, so prompts are measured before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd_pipeline.contract.prompt_reader import prompt_reader
from sd_pipeline.contract.request import TokenBudget
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.versions.resolve import resolve_model


def token_budget(settings: PipelineSettings) -> TokenBudget:
    """The tokenizer that reads the served model's prompt furthest (CLIP, or SD3's / FLUX.1's T5) and
    how far. A version from S3 is fetched and verified into this host's cache first (a no-op once
    there), which also checks it before any replica loads it. transformers only, no torch."""
    from transformers import AutoTokenizer

    source = resolve_model(settings.model, settings.model_store).source
    reader = prompt_reader(_model_index(source), t5_encoder=settings.t5_encoder)
    return TokenBudget.of(AutoTokenizer.from_pretrained(source, subfolder=reader.subfolder), reader.max_tokens)


def _model_index(source: str) -> dict[str, Any]:
    """``model_index.json`` of a folder or a Hub id."""
    if Path(source).is_dir():
        path = Path(source) / "model_index.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "model_index.json"))
    index: dict[str, Any] = json.loads(path.read_text())
    return index
