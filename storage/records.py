"""What is stored beside each image, and what callers get back."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from sd_pipeline.contract.jobs import GenerationResult

Status = Literal["stored", "pending"]
InputPictures = Mapping[str, bytes]  # a request's stored input pictures: image id -> PNG


class ImageRecord(BaseModel):
    """The JSON record kept beside each PNG: its parameters and seed. Never holds a URL."""

    id: str
    owner: str
    created_at: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    model: str
    model_version: str = ""  # the published version that drew it (models from S3)
    model_hash: str = ""
    lora_hashes: str = ""  # the LoRA adapters the prompt named: "NAME: HASH, ..." (AUTOMATIC1111's)
    strength: float | None = None  # image-to-image / inpainting: the denoising strength
    true_cfg_scale: float = 1.0  # FLUX.1's true CFG (1: off)
    init_image: str = ""  # the id of the stored input picture it started from ("" for text-to-image)
    mask: str = ""  # the id of the stored inpainting mask
    nsfw: bool = False
    status: Status = "stored"

    @classmethod
    def from_result(
        cls,
        result: GenerationResult,
        *,
        image_id: str,
        owner: str,
        created_at: dt.datetime,
        init_image: str = "",
        mask: str = "",
    ) -> ImageRecord:
        """The record for one generated image; ``init_image`` and ``mask``: its stored inputs' ids."""
        request = result.request
        return cls(
            id=image_id,
            owner=owner,
            created_at=created_at.isoformat(timespec="milliseconds"),
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=result.seed,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            scheduler=request.scheduler,
            model=result.model,
            model_version=result.model_version,
            model_hash=result.model_hash,
            lora_hashes=result.lora_hashes,
            strength=request.strength if request.init_image is not None else None,
            true_cfg_scale=request.true_cfg_scale,
            init_image=init_image,
            mask=mask,
            nsfw=result.nsfw,
        )

    @property
    def input_ids(self) -> list[str]:
        """The ids of the stored pictures this image was made from (input image, mask)."""
        return [image_id for image_id in (self.init_image, self.mask) if image_id]


@dataclass(frozen=True)
class Link:
    """A URL that fetches one image until ``expires_at``."""

    url: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class LinkedImage:
    """A record with a freshly made link, as handed to users."""

    record: ImageRecord
    link: Link
    input_links: Mapping[str, Link] = field(default_factory=dict)  # "init_image" / "mask" -> link

    def to_api(self) -> dict[str, Any]:
        """The record as the public API returns it (the owner key stays internal); a stored input
        picture gets its link beside its id (``init_image_url``, ``mask_url``)."""
        fields = self.record.model_dump(exclude={"owner"})
        fields["url"] = self.link.url
        fields["expires_at"] = self.link.expires_at.isoformat(timespec="seconds")
        for name, link in self.input_links.items():
            fields[f"{name}_url"] = link.url
        return fields


@dataclass(frozen=True)
class HistoryPage:
    """One page of an owner's images, newest first."""

    images: list[LinkedImage]
    page: int
    has_more: bool
