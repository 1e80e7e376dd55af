"""Which of a model's tokenizers reads its prompt furthest, and how far: what prompts are measured against.

SD 1.x / 2.x and SDXL read the prompt with CLIP only (77 tokens). SD3 and FLUX.1 also read it with
T5, up to the ``max_sequence_length`` their diffusers pipelines use by default (SD3 256, FLUX.1
512); their CLIP encoders read the first 77 tokens of it, as diffusers' pipelines do (the pooled
text). SD3 served without T5 (``SD_T5=false``, or a folder saved without it) reads with CLIP only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CLIP_SUBFOLDER = "tokenizer"


@dataclass(frozen=True)
class PromptReader:
    """A tokenizer (its subfolder in the model's folder) and the tokens its encoder reads
    (None: the tokenizer's own ``model_max_length``)."""

    subfolder: str
    max_tokens: int | None = None


SD3_T5 = PromptReader("tokenizer_3", 256)
FLUX_T5 = PromptReader("tokenizer_2", 512)
T5_READERS: dict[str, PromptReader] = {
    "StableDiffusion3Pipeline": SD3_T5,
    "FluxPipeline": FLUX_T5,
    "FluxFillPipeline": FLUX_T5,
}
OPTIONAL_T5 = frozenset({"StableDiffusion3Pipeline"})  # SD_T5=false leaves it out


def prompt_reader(index: Mapping[str, Any], *, t5_encoder: bool = True) -> PromptReader:
    """The reader of the model whose ``model_index.json`` is ``index``."""
    pipeline_class = str(index.get("_class_name", ""))
    reader = T5_READERS.get(pipeline_class)
    if reader is None or index.get(reader.subfolder) in (None, [None, None]):
        return PromptReader(CLIP_SUBFOLDER)
    if pipeline_class in OPTIONAL_T5 and not t5_encoder:
        return PromptReader(CLIP_SUBFOLDER)
    return reader
