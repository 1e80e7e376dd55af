"""The one way the service generates: step-level (continuous) batching.

A diffusers pipeline call runs a batch from first step to last, so a request that arrives one
step into a 60-step call waits for all 60 steps, and requests with different steps, guidance
or samplers never share a call. ``StepEngine`` keeps a set of active requests and, between
two denoising steps, admits waiting ones and drops finished and cancelled ones.
Each step is one denoiser call over every active image of one size, with a timestep and a
conditioning per image, classifier-free guidance only for the images that use it, and each
request's own scheduler stepping its own slice. What differs between model families (text
encoders, extra conditioning, latents, the denoiser's inputs, decoding) is asked of the
model's family (``sd_pipeline.model.families``), whose answers are the diffusers pipeline's own
parts; with each scheduler's ``set_timesteps`` / ``scale_model_input`` / ``step`` and the image
processor, a request alone gives that pipeline's ``__call__`` image.

The engine is driven by whoever owns the model (``sd_pipeline.backends.engine_loop`` in the
worker process and in each Ray replica): ``submit`` from any thread, ``step`` in a loop on the
thread that owns the pipeline. ``run`` and ``generate`` drive it to the end on the calling
thread (the CLI, tools, benchmarks and tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_pipeline.contract.errors import GenerationCancelledError, InvalidRequestError, OutOfMemoryError
from sd_pipeline.contract.facts import GenerationObserver
from sd_pipeline.contract.images import InputImage
from sd_pipeline.contract.jobs import GenerationResult, JobOutcome, Preview, Timings
from sd_pipeline.contract.lifecycle import Request
from sd_pipeline.contract.request import GenerationRequest
from sd_pipeline.contract.settings import DEFAULT_PREVIEW_INTERVAL
from sd_pipeline.model.failures import Failure, classify
from sd_pipeline.model.families import Conditioning, join_rows, split_rows
from sd_pipeline.model.families.images import ImageStart, KeepOutsideMask, Picture
from sd_pipeline.model.loading import LoadedPipeline, freeze_compiled_shapes
from sd_pipeline.model.loras import LoraAdapters, RowChoices
from sd_pipeline.model.previews import Previewer
from sd_pipeline.model.threads import ThreadTuner, samples_bucket

Done = Callable[[JobOutcome], None]
_EncodedPicture = tuple[Picture, list[DiagonalGaussianDistribution]]  # a picture and its VAE distributions
logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    job: Request
    done: Done
    submitted_at: float


@dataclass
class _Active:
    """One request inside the engine: its scheduler, latents and conditioning, and how far it got."""

    job: Request
    done: Done
    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    latents: torch.Tensor
    positive: Conditioning
    negative: Conditioning | None  # None: no classifier-free guidance
    step_kwargs: dict[str, Any]
    admitted_at: float
    last_stepped_at: float
    step: int = 0
    largest_batch: int = 0
    unet_chunks: int = 1  # UNet calls its images need: more than 1 after running out of memory
    last_preview_at: float = -math.inf
    preview_due: bool = False  # this step also predicts the clean latents for a preview
    clean: torch.Tensor | None = None  # those latents (first image), once predicted
    results: list[GenerationResult] = field(default_factory=list)
    extra_channels: torch.Tensor | None = None  # inpainting UNet: mask and masked-image latents, per image
    keep: KeepOutsideMask | None = None  # inpainting with a regular UNet: what stays outside the mask

    @property
    def size(self) -> tuple[int, int]:
        return (self.job.inputs.width, self.job.inputs.height)

    @property
    def images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def unet_samples(self) -> int:
        return self.images * (2 if self.negative is not None else 1)

    @property
    def finished(self) -> bool:
        return self.step >= len(self.timesteps)


class StepEngine:
    """Active requests of one pipeline, advanced one denoising step at a time."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        max_batch_images: int = 8,
        observer: GenerationObserver | None = None,
        previewer: Previewer | None = None,
        preview_interval: float = DEFAULT_PREVIEW_INTERVAL,
        threads: ThreadTuner | None = None,
        loras: LoraAdapters | None = None,
    ) -> None:
        self.loaded = loaded
        self.loras = loras
        self.threads = threads
        self.max_batch_images = max_batch_images
        self.observer = observer
        self.previewer = previewer
        self.preview_interval = preview_interval
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()
        self._active: list[_Active] = []
        self._base_config = loaded.pipeline.scheduler.config

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._active

    @property
    def active_images(self) -> int:
        return sum(active.images for active in self._active)

    def submit(self, job: Request, done: Done) -> None:
        """Queue a validated job; ``done`` gets its outcome (images, or the error that ended it)."""
        with self._lock:
            self._waiting.append(_Waiting(job, done, time.perf_counter()))
        if self.loras is not None and job.inputs.loras:
            self.loras.prefetch(job.inputs.loras)

    def warmup(self) -> float:
        """Generate before the first user does; returns the seconds it took.

        On the CPU one tiny image pays for lazy initialisation. On CUDA, or with a compiled
        UNet, the default size runs with and without guidance (two UNet batch sizes) and as two
        requests stepping together, so the first real request finds its shapes compiled; after
        that a compiled UNet never recompiles (new shapes run eagerly).
        """
        started = time.perf_counter()
        if not (self.loaded.compiled or self.loaded.device.type == "cuda"):
            self.generate([self._warmup_request(steps=1, width=64, height=64)])
            return time.perf_counter() - started
        guided = self._warmup_request(steps=2)
        self.generate([guided])
        self.generate([self._warmup_request(steps=2, guidance_scale=1.0)])
        self.generate([guided, guided])
        if self.loaded.compiled:
            freeze_compiled_shapes()
        return time.perf_counter() - started

    def _warmup_request(self, **fields: Any) -> GenerationRequest:
        """A warm-up request in the model's default sampler; with a picture and a mask for an inpainting model."""
        rules = self.loaded.family.rules
        request = GenerationRequest(prompt="warm-up", scheduler=rules.default_sampler, **fields)
        if not rules.needs_mask:
            return request
        size = (request.width, request.height)
        picture, mask = InputImage.stand_ins(size)
        return dataclasses.replace(request, init_image=picture, mask=mask, strength=1.0)

    def run(self, jobs: Sequence[Request]) -> list[JobOutcome]:
        """Submit jobs and step on this thread until the engine is idle; each job's outcome, in order."""
        outcomes: dict[int, JobOutcome] = {}
        for job in jobs:
            self.submit(job, functools.partial(outcomes.__setitem__, id(job)))
        self.run_until_idle()
        return [outcomes[id(job)] for job in jobs]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationResult]]:
        """Generate every request together; each request's images, in order. Raises the first error."""
        outcomes = self.run([Request(request) for request in requests])
        for outcome in outcomes:
            if outcome.error is not None:
                raise outcome.error
        return [outcome.results for outcome in outcomes]

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones, run one denoising step for one size group,
        and finish the requests that reached their last step."""
        self._drop_cancelled()
        self._admit()
        group = self._next_group()
        if not group:
            return
        self._denoise(group)
        finished = [active for active in group if active.finished and active in self._active]
        if finished:
            self._finish(finished)

    # Admission.
    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [waiting for waiting in self._waiting if waiting.job.cancelled]
            for waiting in gone:
                self._waiting.remove(waiting)
        for waiting in gone:
            waiting.done(JobOutcome(error=GenerationCancelledError("cancelled")))
        for active in [active for active in self._active if active.job.cancelled]:
            self._end(active, JobOutcome(error=GenerationCancelledError("cancelled")))

    def _admit(self) -> None:
        admitted: list[_Waiting] = []
        room = self.max_batch_images - self.active_images
        with self._lock:
            for waiting in list(self._waiting):
                if self.loras is not None and not self.loras.ready(waiting.job.inputs.loras):
                    continue  # its adapter's file is still being read: the others go ahead
                images = waiting.job.inputs.num_images
                if images > room and (self._active or admitted):
                    break
                self._waiting.remove(waiting)
                admitted.append(waiting)
                room -= images
            reading = bool(self._waiting) and not admitted and not self._active
        if admitted:
            self._start(admitted)
        elif reading and self.loras is not None:
            self.loras.wait_for_reads(timeout=0.05)

    def _start(self, admitted: list[_Waiting]) -> None:
        """Load the LoRA adapters the admitted requests name, encode their input pictures together,
        every prompt and negative prompt together (each text with its request's adapters), and draw
        each request's latents."""
        family = self.loaded.family
        device = self.loaded.device
        admitted, pictures = self._encode_pictures(self._with_adapters(admitted))
        requests = [waiting.job.inputs for waiting in admitted]
        negative_prompts = [r.negative_prompt if family.guided(r) else None for r in requests]
        text_loras = [requests[index].loras for index in family.text_rows(negative_prompts)]
        try:
            with torch.no_grad(), self._lora_rows(text_loras):
                positives, negatives = family.encode([r.text for r in requests], negative_prompts, device)
        except Exception as error:  # noqa: BLE001 - classified; every admitted job gets the error
            self._fail_all(admitted, error)
            return
        now = time.perf_counter()
        for waiting, positive, negative in zip(admitted, positives, negatives, strict=True):
            request = waiting.job.inputs
            scheduler = family.make_scheduler(request.scheduler, self._base_config)
            family.set_timesteps(scheduler, request, device)
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in request.seeds()]
            try:
                start = self._start_of(request, generators, scheduler, pictures.get(id(waiting)))
            except Exception as error:  # noqa: BLE001 - classified; only this request ends
                self._fail_all([waiting], error)
                continue
            self._active.append(
                _Active(
                    job=waiting.job,
                    done=waiting.done,
                    scheduler=scheduler,
                    timesteps=start.timesteps,
                    latents=start.latents,
                    extra_channels=start.extra_channels,
                    keep=start.keep,
                    positive=family.conditioning(request, positive),
                    negative=family.conditioning(request, negative) if family.guided(request) else None,
                    step_kwargs=family.step_kwargs(scheduler, generators),
                    admitted_at=waiting.submitted_at,
                    last_stepped_at=waiting.submitted_at,
                )
            )
            if self.observer is not None:
                self.observer.first_step_wait(seconds=now - waiting.submitted_at)

    def _start_of(
        self,
        request: GenerationRequest,
        generators: list[torch.Generator],
        scheduler: SchedulerMixin,
        picture: _EncodedPicture | None,
    ) -> ImageStart:
        """A request's starting latents and timesteps: noise over the whole schedule, or its input
        picture's latents noised at its start step (it joins the others there)."""
        family, device, dtype = self.loaded.family, self.loaded.device, self.loaded.dtype
        if picture is None:
            latents = family.initial_latents(request, generators, scheduler, device=device, dtype=dtype)
            return ImageStart(latents=latents, timesteps=scheduler.timesteps)
        prepared, encoded = picture
        with torch.no_grad():
            return family.image_start(request, generators, scheduler, prepared, encoded, device=device, dtype=dtype)

    def _encode_pictures(self, admitted: list[_Waiting]) -> tuple[list[_Waiting], dict[int, _EncodedPicture]]:
        """The admitted requests' input pictures, prepared and VAE-encoded together (by ``id`` of their
        ``_Waiting``); a request whose picture fails ends with the error, the others go on."""
        family, device, dtype = self.loaded.family, self.loaded.device, self.loaded.dtype
        prepared: dict[int, tuple[Picture, list[torch.Tensor]]] = {}
        for waiting in [waiting for waiting in admitted if waiting.job.inputs.init_image is not None]:
            try:
                picture = family.prepare_picture(waiting.job.inputs)
            except Exception as error:  # noqa: BLE001 - classified; only this request ends
                self._fail_all([waiting], error)
                continue
            prepared[id(waiting)] = (picture, picture.to_encode())
        ready = [w for w in admitted if w.job.inputs.init_image is None or id(w) in prepared]
        if not prepared:
            return ready, {}
        try:
            with torch.no_grad():
                tensors = [tensor for _, to_encode in prepared.values() for tensor in to_encode]
                encoded = family.encode_pictures(tensors, device=device, dtype=dtype)
        except Exception as error:  # noqa: BLE001 - classified; the requests with pictures end
            self._fail_all([w for w in ready if id(w) in prepared], error)
            return [w for w in ready if id(w) not in prepared], {}
        pictures, offset = {}, 0
        for key, (picture, to_encode) in prepared.items():
            pictures[key] = (picture, encoded[offset : offset + len(to_encode)])
            offset += len(to_encode)
        return ready, pictures

    def _with_adapters(self, admitted: list[_Waiting]) -> list[_Waiting]:
        """The admitted requests whose LoRA adapters are loaded (loading them now); the others end
        with the error that names why their adapter cannot serve this model."""
        ready = []
        in_use = {choice.name for active in self._active for choice in active.job.inputs.loras}
        for waiting in admitted:
            loras = waiting.job.inputs.loras
            try:
                if loras:
                    if self.loras is None:
                        raise InvalidRequestError("prompt", "names LoRA adapters, but this service serves none")
                    self.loras.ensure(loras, keep=in_use)
            except (InvalidRequestError, OutOfMemoryError) as error:  # only this request ends
                waiting.done(JobOutcome(error=error))
                continue
            in_use |= {choice.name for choice in loras}
            ready.append(waiting)
        return ready

    def _next_group(self) -> list[_Active]:
        """The active requests of one size: the size whose least recently stepped request waited longest."""
        if not self._active:
            return []
        oldest = min(self._active, key=lambda active: active.last_stepped_at)
        return [active for active in self._active if active.size == oldest.size]

    # One step.
    def _denoise(self, group: list[_Active], *, chunks: int | None = None) -> None:
        """One step for ``group``. Out of memory, the group is halved by requests, and one request's
        UNet batch by images (``chunks`` UNet calls, kept for its later steps), before that request fails."""
        chunks = chunks or max(active.unet_chunks for active in group)
        started = time.perf_counter()
        for active in group:
            active.preview_due = self._preview_due(active, started)
        samples = sum(active.unet_samples for active in group)
        if self.threads is not None:
            self.threads.before_step(samples_bucket(samples), group[0].size)
        failure = self._unet_step(group, chunks)
        if self.threads is not None and failure is None:
            self.threads.after_step((time.perf_counter() - started) / samples)
        if failure is not None and failure.out_of_memory:
            self._free_memory()
            if len(group) > 1:
                half = len(group) // 2
                self._denoise(group[:half])
                self._denoise([active for active in group[half:] if active in self._active])
            elif chunks < group[0].unet_samples:
                self._denoise(group, chunks=chunks * 2)
            else:
                self._end(group[0], JobOutcome(error=OutOfMemoryError(_oom_message(group[0]))))
            return
        if failure is not None:
            for active in group:
                self._end(active, JobOutcome(error=failure.error))
            return
        now = time.perf_counter()
        images = sum(active.images for active in group)
        if self.observer is not None:
            self.observer.denoising_step(seconds=now - started)
            self.observer.pipeline_call(seconds=now - started, images=images)
        for active in group:
            active.step += 1
            active.unet_chunks = chunks if len(group) == 1 else active.unet_chunks
            active.last_stepped_at = now
            active.largest_batch = max(active.largest_batch, images)
            active.job.report_step(active.step, len(active.timesteps))
        self._send_previews([active for active in group if active.clean is not None and not active.finished], now)

    def _unet_step(self, group: list[_Active], chunks: int) -> Failure | None:
        """The group's UNet batch (in ``chunks`` calls) and each request's scheduler step; None, or how it failed."""
        try:
            with torch.no_grad():
                self._unet_step_unguarded(group, chunks)
            return None
        except Exception as error:  # noqa: BLE001 - classified here, recovery happens outside
            return classify(error)

    def _unet_step_unguarded(self, group: list[_Active], chunks: int) -> None:
        family = self.loaded.family
        inputs, conditions, timesteps = [], [], []
        rows: list[RowChoices] = []
        for active in group:
            t = active.timesteps[active.step]
            negative = active.negative
            sample = active.latents if negative is None else torch.cat([active.latents] * 2)
            model_input = family.model_input(active.scheduler, sample, t)
            if active.extra_channels is not None:
                extra = active.extra_channels if negative is None else torch.cat([active.extra_channels] * 2)
                model_input = torch.cat([model_input, extra], dim=family.channel_dim)
            inputs.append(model_input)
            conditions.append(active.positive if negative is None else join_rows([negative, active.positive]))
            timesteps.append(t.reshape(1).expand(sample.shape[0]))
            rows += [active.job.inputs.loras] * sample.shape[0]
        samples = torch.cat(inputs).tensor_split(chunks)
        pieces = zip(
            samples,
            torch.cat(timesteps).tensor_split(chunks),
            split_rows(join_rows(conditions), chunks),
            _split_list(rows, [len(piece) for piece in samples]),
            strict=True,
        )
        outputs = []
        for sample, t, condition, choices in pieces:
            with self._lora_rows(choices):
                outputs.append(family.denoise(sample, t, condition))
        noise = torch.cat(outputs)
        for active, predicted in zip(group, torch.split(noise, [a.unet_samples for a in group]), strict=True):
            if active.negative is not None:
                uncond, text = predicted.chunk(2)
                predicted = uncond + family.guidance_scale(active.job.inputs) * (text - uncond)
            t = active.timesteps[active.step]
            output = active.scheduler.step(predicted, t, active.latents, **active.step_kwargs, return_dict=True)
            if active.preview_due:
                clean = family.predicted_clean(active.scheduler, output, predicted[:1], t, active.latents[:1])
                active.clean = family.spatial(clean[:1], active.job.inputs)
            active.latents = output.prev_sample
            if active.keep is not None:
                following = active.timesteps[active.step + 1] if active.step + 1 < len(active.timesteps) else None
                active.latents = active.keep.apply(active.scheduler, active.latents, following)

    def _lora_rows(self, choices: list[RowChoices]) -> contextlib.AbstractContextManager[None]:
        if self.loras is None or not any(choices):
            return contextlib.nullcontext()
        return self.loras.rows(choices, self.loaded.device)

    # Previews.
    def _preview_due(self, active: _Active, now: float) -> bool:
        """A preview for this request on this step: asked for, the last one (if any) ``preview_interval``
        old, and the final image not due within an interval anyway. The estimate needs a step's time,
        so the first preview comes after the first step at the earliest; a request that ends within an
        interval gets none (a picture replaced a moment later costs the server and shows nothing)."""
        if self.previewer is None or not active.job.wants_previews:
            return False
        steps_left = len(active.timesteps) - active.step - 1
        final_soon = steps_left * (active.last_stepped_at - active.admitted_at) / max(active.step, 1)
        return now - active.last_preview_at >= self.preview_interval and final_soon >= self.preview_interval

    def _send_previews(self, due: list[_Active], now: float) -> None:
        """One picture each for the requests due a preview, rendered together; a failed preview only logs."""
        if not due or self.previewer is None:
            return
        clean = torch.cat([active.clean for active in due if active.clean is not None])
        try:
            pictures = self.previewer.render(clean)
        except Exception as error:  # noqa: BLE001 - a preview never fails its request; sticky errors still raise
            failure = classify(error)
            logger.warning("no preview this step: %s", failure.error or "out of memory")
            pictures = []
        for active, picture in zip(due, pictures, strict=False):
            preview = Preview(step=active.step, total=len(active.timesteps), image=picture, size=active.size)
            active.job.report_preview(preview)
        for active in due:
            active.last_preview_at, active.clean = now, None

    # Finishing.
    def _finish(self, finished: list[_Active]) -> None:
        """Decode the requests that finished on this step together (one at a time after an OOM)."""
        try:
            images, flags = self._decode(finished)
        except Exception as error:  # noqa: BLE001 - classified below
            failure = classify(error)
        else:
            self._deliver(finished, images, flags)
            return
        if failure.out_of_memory and len(finished) > 1:
            self._free_memory()
            for active in finished:
                self._finish([active])
            return
        for active in finished:
            self._end(
                active,
                JobOutcome(error=OutOfMemoryError(_oom_message(active)) if failure.out_of_memory else failure.error),
            )

    def _decode(self, finished: list[_Active]) -> tuple[list[Any], list[bool]]:
        family = self.loaded.family
        latents = torch.cat([family.spatial(active.latents, active.job.inputs) for active in finished])
        with torch.no_grad():
            decoded, flags = family.decode(latents, self.loaded.device)
        images = self.loaded.pipeline.image_processor.postprocess(
            decoded, output_type="pil", do_denormalize=[not flag for flag in flags]
        )
        return images, flags

    def _deliver(self, finished: list[_Active], images: list[Any], flags: list[bool]) -> None:
        now = time.perf_counter()
        offset = 0
        for active in finished:
            request = active.job.inputs
            timings = Timings(generation_seconds=now - active.admitted_at, batch_images=active.largest_batch)
            results = [
                GenerationResult(
                    image=images[offset + index],
                    request=request,
                    seed=seed,
                    index=index,
                    model=self.loaded.model,
                    timings=timings,
                    nsfw=flags[offset + index],
                    model_version=self.loaded.version,
                    model_hash=self.loaded.model_hash,
                    lora_hashes=self.loras.hashes(request.loras) if self.loras is not None else "",
                )
                for index, seed in enumerate(request.seeds())
            ]
            offset += active.images
            self._end(active, JobOutcome(results=results))

    def _end(self, active: _Active, outcome: JobOutcome) -> None:
        if active in self._active:
            self._active.remove(active)
            active.done(outcome)

    def _fail_all(self, admitted: list[_Waiting], error: Exception) -> None:
        failure = classify(error)
        reported = failure.error
        if failure.out_of_memory:
            reported = OutOfMemoryError("out of GPU memory encoding the prompts or pictures; try again in a moment")
        for waiting in admitted:
            waiting.done(JobOutcome(error=reported))

    def _free_memory(self) -> None:
        if self.observer is not None:
            self.observer.out_of_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _split_list(items: list[RowChoices], sizes: list[int]) -> list[list[RowChoices]]:
    """``items`` in consecutive pieces of ``sizes``."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(items[start : start + size])
        start += size
    return pieces


def _oom_message(active: _Active) -> str:
    request = active.job.inputs
    return f"out of GPU memory generating {request.width}x{request.height} images; try a smaller width and height"
