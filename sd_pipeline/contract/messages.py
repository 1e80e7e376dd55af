"""The one message set between the app and an engine (a worker process or a Ray replica).

Down to an engine: ``Submit`` (a request to run), ``Cancel``, ``Stop``. Up from it: ``Step``,
``PreviewReady``, ``Finished`` and ``Lost`` for a request, ``Facts`` for the metrics, and at
start ``Ready`` or ``LoadFailed``. The worker pipe and the Ray request stream carry the same
encoding (``encode``: plain data, no classes of ours), and every receiver checks what arrives
with ``decode``: a malformed message raises ``MalformedMessageError``, which the receiver logs
and drops while it keeps serving.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sd_pipeline.contract.backend import BackendInfo
from sd_pipeline.contract.errors import (
    GenerationCancelledError,
    InvalidRequestError,
    OutOfMemoryError,
    PipelineUnavailableError,
    WorkerCrashedError,
    WorkerLostError,
)
from sd_pipeline.contract.facts import FACT_NAMES, Fact
from sd_pipeline.contract.jobs import GenerationResult, JobOutcome, Preview, Timings
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import GenerationRequest


class MalformedMessageError(ValueError):
    """What arrived is not a message of this set (or not a valid one)."""


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FactData(_Message):
    """One metrics fact: an observer method's name and its keyword arguments."""

    name: Literal[tuple(sorted(FACT_NAMES))]  # type: ignore[valid-type]
    fields: dict[str, float | int]

    def fact(self) -> Fact:
        return (self.name, dict(self.fields))


class ImageData(_Message):
    """An image as raw pixels (lossless and cheap: no encoding on the engine's side)."""

    mode: Literal["RGB", "RGBA", "L"]
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    pixels: bytes

    @classmethod
    def of(cls, image: Image.Image) -> ImageData:
        return cls(mode=image.mode, width=image.width, height=image.height, pixels=image.tobytes())

    def image(self) -> Image.Image:
        return Image.frombytes(self.mode, (self.width, self.height), self.pixels)


class ResultData(_Message):
    """One image a request made, with everything needed to reproduce it. Its inputs come back
    without their pictures (``init_image``, ``mask``): the app has them in its ``Request``, and
    a request of four images would otherwise carry its pictures back four times."""

    image: ImageData
    inputs: GenerationRequest
    seed: int
    index: int = Field(ge=0)
    model: str
    generation_seconds: float = Field(ge=0)
    batch_images: int = Field(ge=1)
    nsfw: bool = False
    model_version: str = ""
    model_hash: str = ""
    lora_hashes: str = ""

    @classmethod
    def of(cls, result: GenerationResult) -> ResultData:
        return cls(
            image=ImageData.of(result.image),
            inputs=dataclasses.replace(result.request, init_image=None, mask=None),
            seed=result.seed,
            index=result.index,
            model=result.model,
            generation_seconds=result.timings.generation_seconds,
            batch_images=result.timings.batch_images,
            nsfw=result.nsfw,
            model_version=result.model_version,
            model_hash=result.model_hash,
            lora_hashes=result.lora_hashes,
        )

    def result(self, inputs: GenerationRequest) -> GenerationResult:
        """The result, its request being ``inputs`` (the one the app sent, pictures included)."""
        return GenerationResult(
            image=self.image.image(),
            request=inputs,
            seed=self.seed,
            index=self.index,
            model=self.model,
            timings=Timings(self.generation_seconds, self.batch_images),
            nsfw=self.nsfw,
            model_version=self.model_version,
            model_hash=self.model_hash,
            lora_hashes=self.lora_hashes,
        )


ErrorKind = Literal["invalid", "cancelled", "out_of_memory", "lost", "crashed", "unavailable", "other"]


class ErrorData(_Message):
    """Why a request ended without images, as one of the errors the app knows."""

    kind: ErrorKind
    message: str
    field: str = ""  # the request field an "invalid" error names
    reason: str = ""  # "died" or "stalled" for "lost"

    @classmethod
    def of(cls, error: Exception) -> ErrorData:
        if isinstance(error, InvalidRequestError):
            return cls(kind="invalid", message=error.detail, field=error.field)
        if isinstance(error, WorkerLostError):
            return cls(kind="lost", message=str(error), reason=error.reason)
        for kind, error_class in _ERROR_CLASSES.items():
            if isinstance(error, error_class):
                return cls(kind=kind, message=str(error))
        return cls(kind="other", message=f"{type(error).__name__}: {error}")

    def error(self) -> Exception:
        if self.kind == "invalid":
            return InvalidRequestError(self.field, self.message)
        if self.kind == "lost":
            return WorkerLostError(self.reason or "died", self.message)
        return _ERROR_CLASSES.get(self.kind, RuntimeError)(self.message)


_ERROR_CLASSES: dict[str, type[Exception]] = {
    "cancelled": GenerationCancelledError,
    "out_of_memory": OutOfMemoryError,
    "crashed": WorkerCrashedError,
    "unavailable": PipelineUnavailableError,
}


class Submit(_Message):
    """App to engine: run this request."""

    kind: Literal["submit"] = "submit"
    id: str = Field(min_length=1)
    inputs: GenerationRequest
    previews: bool = False

    @classmethod
    def of(cls, request: Request) -> Submit:
        return cls(id=request.id, inputs=request.inputs, previews=request.wants_previews)


class Cancel(_Message):
    """App to engine: stop this request (it ends with a cancelled ``Finished``)."""

    kind: Literal["cancel"] = "cancel"
    id: str


class Stop(_Message):
    """App to engine: finish what you hold, then end."""

    kind: Literal["stop"] = "stop"


class _Up(_Message):
    """Engine to app: what every message up carries besides its own fields."""

    by: str = ""  # which replica sent it ("" from the local worker)
    facts: list[FactData] = Field(default_factory=list)  # the engine's metrics facts since its last message


class Step(_Up):
    kind: Literal["step"] = "step"
    id: str
    step: int = Field(ge=0)
    total: int = Field(ge=1)


class PreviewReady(_Up):
    kind: Literal["preview"] = "preview"
    id: str
    step: int = Field(ge=0)
    total: int = Field(ge=1)
    image: bytes  # PNG or JPEG
    size: tuple[int, int]

    @classmethod
    def of(cls, request_id: str, preview: Preview, **up: Any) -> PreviewReady:
        return cls(id=request_id, step=preview.step, total=preview.total, image=preview.image, size=preview.size, **up)

    def preview(self) -> Preview:
        return Preview(step=self.step, total=self.total, image=self.image, size=self.size)


class Finished(_Up):
    """A request's end: its images, or the error that ended it."""

    kind: Literal["finished"] = "finished"
    id: str
    results: list[ResultData] = Field(default_factory=list)
    error: ErrorData | None = None

    @classmethod
    def of(cls, request_id: str, outcome: JobOutcome, **up: Any) -> Finished:
        error = None if outcome.error is None else ErrorData.of(outcome.error)
        return cls(id=request_id, results=[ResultData.of(result) for result in outcome.results], error=error, **up)

    def outcome(self, inputs: GenerationRequest) -> JobOutcome:
        """The request's outcome; ``inputs``: the request as the app sent it (its results' request)."""
        return JobOutcome(
            results=[data.result(inputs) for data in self.results],
            error=None if self.error is None else self.error.error(),
        )


class Lost(_Up):
    """The engine running a request was lost (died, stalled, stopped serving): admission retries it once, alone."""

    kind: Literal["lost"] = "lost"
    id: str
    reason: Literal["died", "stalled"] = "died"
    message: str

    def error(self) -> WorkerLostError:
        return WorkerLostError(self.reason, self.message)


class Facts(_Up):
    """Metrics facts with no request to ride on (e.g. the warm-up's, or memory after a batch)."""

    kind: Literal["facts"] = "facts"


class Ready(_Up):
    """The engine loaded its model and is warm."""

    kind: Literal["ready"] = "ready"
    info: BackendInfo


class LoadFailed(_Up):
    kind: Literal["load_failed"] = "load_failed"
    reason: str


Message = Annotated[
    Submit | Cancel | Stop | Step | PreviewReady | Finished | Lost | Facts | Ready | LoadFailed,
    Field(discriminator="kind"),
]
Reply = Step | PreviewReady | Finished | Lost  # what admission hears about a request it handed out
_MESSAGE: TypeAdapter[Any] = TypeAdapter(Message)


def encode(message: _Message) -> dict[str, Any]:
    """Plain data (str, int, bytes, lists, dicts) for a pipe or a Ray stream."""
    return message.model_dump()


def decode(data: object) -> Any:
    """The message ``data`` encodes; ``MalformedMessageError`` (naming what is wrong) if it is none."""
    try:
        return _MESSAGE.validate_python(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'message'}: {problem['msg']}"
            for problem in error.errors()[:3]
        )
        raise MalformedMessageError(f"malformed message ({problems})") from None


def facts_of(facts: list[Fact]) -> list[FactData]:
    return [FactData(name=name, fields=fields) for name, fields in facts]


def replayable(message: _Up) -> list[Fact]:
    return [data.fact() for data in message.facts]
