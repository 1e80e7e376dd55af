"""The public API's handlers, ``/generate`` and ``/history``, and the page's load-time defaults;
what they do lives in ``ImageService`` (webapp.service), the layout in ``webapp.ui``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import gradio as gr
from PIL import Image

from sd_pipeline.contract.errors import InvalidRequestError
from sd_pipeline.contract.jobs import Preview
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.recommended import RECOMMENDABLE, recommended_request
from sd_pipeline.contract.request import InputRules, RequestLimits
from webapp.form import generate_fields, settings_of, with_signature
from webapp.owners import Network, caller_of
from webapp.previews import LatestPreview
from webapp.service import GeneratedImage, ImageService, UserFacingError
from webapp.uploads import PICTURE_FIELDS, remove_pictures, take_pictures

GalleryItems = list[tuple[str, str]]

STOP_WAIT_SECONDS = 10.0  # how long Stop waits for the page's generation to end before clearing anyway


class Endpoints:
    """The form's fields and the handlers Gradio calls for them; one per page built."""

    def __init__(
        self,
        service: ImageService,
        *,
        limits: RequestLimits,
        default_size: int,
        model_defaults: ModelDefaults | None,
        rules: InputRules,
        trusted_proxies: Sequence[Network],
        owner_secret: bytes | None,
    ) -> None:
        self.service = service
        self.limits = limits
        self.default_size = default_size
        self.trusted_proxies = trusted_proxies
        self.owner_secret = owner_secret
        self.rules = rules
        self.fields = generate_fields(limits, default_size=default_size, model_defaults=model_defaults, rules=rules)
        self.names = [field.name for field in self.fields]
        self.built_with = recommended_request(limits, native_size=default_size, model=model_defaults, rules=rules)
        # Per page (Gradio session): resolves when its generation ends, True if it delivered images.
        self._generations: dict[str | None, asyncio.Future[bool]] = {}

    def generate(self) -> Callable[..., AsyncIterator[tuple[Any, dict[str, Any]]]]:
        """The ``/generate`` handler, with one named, documented parameter per field (Gradio reads them)."""

        async def generate(*arguments: Any) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
            *values, request, progress = arguments  # Gradio passes the request and progress after the fields
            assert isinstance(request, gr.Request)
            previews = LatestPreview(asyncio.get_running_loop())
            caller = caller_of(request, secret=self.owner_secret, trusted_proxies=self.trusted_proxies)
            try:  # the uploaded files are read, and removed, before anything else
                fields = take_pictures(self._fields(values), max_bytes=self.limits.max_upload_bytes, remove=True)
            except InvalidRequestError as error:
                raise gr.Error(str(self.service.refused(error)), print_exception=False) from None
            running = asyncio.ensure_future(
                self.service.generate(
                    fields,
                    owner=caller.owner,
                    progress=lambda desc, done: progress(done, desc=desc),
                    on_preview=previews.put,
                    address=caller.address,
                )
            )
            ended = self._generation_started(request.session_hash)
            try:
                async for preview in previews.until(running):  # intermediate outputs: the picture so far
                    yield _preview_output(preview)
                images = running.result()
            except BaseException as error:  # failed, or Stop closed the generator: the request ends too
                running.cancel()
                self._generation_ended(request.session_hash, ended, delivered=False)
                if isinstance(error, UserFacingError):
                    raise gr.Error(str(error), print_exception=False) from None
                raise
            try:
                yield _gallery(images), {"images": [image.linked.to_api() for image in images]}
            finally:
                self._generation_ended(request.session_hash, ended, delivered=True)

        with_signature(
            generate, self.fields, summary="Generate images from a prompt, store them, return them with links."
        )
        return generate

    def check_form(self, *values: Any) -> list[dict[str, Any]]:
        """Gradio's validator for /generate: a bad field is named next to its input, before the queue.
        A refused request's uploaded pictures are removed with it."""
        fields = self._fields(values)
        try:
            error = self.service.invalid_field(
                take_pictures(fields, max_bytes=self.limits.max_upload_bytes, remove=False)
            )
        except InvalidRequestError as refused:
            error = self.service.refused(refused)
        if error is not None:
            remove_pictures(fields)
        return [
            gr.validate(error is None or error.field != name, str(error) if error is not None else "")
            for name in self.names
        ]

    def load_settings(self, image: dict[str, Any] | None, request: gr.Request) -> list[Any]:
        """ "Load these settings": a history image's parameters as form values, its input picture
        and mask (fetched from storage) among them."""
        if not image:
            raise gr.Error("Select an image in the history first", print_exception=False)
        caller = caller_of(request, secret=self.owner_secret, trusted_proxies=self.trusted_proxies)
        try:
            pictures = self.service.input_copies(owner=caller.owner, record=image)
        except UserFacingError as error:
            raise gr.Error(str(error), print_exception=False) from None
        values = settings_of(image, self.fields)
        for name in PICTURE_FIELDS:
            values[self.names.index(name)] = str(pictures[name]) if name in pictures else None
        return values

    def keep_pictures(self, result: dict[str, Any] | None, request: gr.Request) -> tuple[Any, Any]:
        """After a generation: the form's input picture and mask become the stored copies (the uploads
        were removed by the request), so Generate again starts from the same picture."""
        images = (result or {}).get("images") or []
        if not images or not images[0].get("init_image"):
            return gr.skip(), gr.skip()
        caller = caller_of(request, secret=self.owner_secret, trusted_proxies=self.trusted_proxies)
        try:
            pictures = self.service.input_copies(owner=caller.owner, record=images[0])
        except UserFacingError:
            return gr.skip(), gr.skip()
        mask = str(pictures["mask"]) if "mask" in pictures else None
        return str(pictures["init_image"]), mask

    def _fields(self, values: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(self.names, values, strict=True))

    def history(self, page: float = 1, request: gr.Request | None = None) -> tuple[GalleryItems, dict[str, Any]]:
        """One page of your earlier images, newest first, with freshly signed links.

        Args:
            page: page number, from 1
        """
        assert request is not None
        try:
            caller = caller_of(request, secret=self.owner_secret, trusted_proxies=self.trusted_proxies)
            found = self.service.history(owner=caller.owner, page=page, earlier_owner=caller.earlier_owner)
        except UserFacingError as error:
            raise gr.Error(str(error), print_exception=False) from None
        records = [image.to_api() for image in found.page.images]
        gallery = [(str(path), caption(image)) for path, image in zip(found.png_paths, records, strict=True)]
        return gallery, {"images": records, "page": found.page.page, "has_more": found.page.has_more}

    async def stop(self, result: dict[str, Any] | None, request: gr.Request) -> tuple[Any, Any]:
        """On Stop (Gradio cancels the page's generation beside this): once that generation has
        ended, its preview goes; finished images stay. Waiting first matters: a preview already on
        its way when Stop was pressed would otherwise land after the clearing."""
        ended = self._generations.get(request.session_hash)
        delivered = False
        if ended is not None:
            with contextlib.suppress(TimeoutError):
                delivered = await asyncio.wait_for(asyncio.shield(ended), timeout=STOP_WAIT_SECONDS)
        if delivered or (result and result.get("images")):
            return gr.skip(), gr.skip()
        return [], None

    def _generation_started(self, session: str | None) -> asyncio.Future[bool]:
        ended: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._generations[session] = ended
        return ended

    def _generation_ended(self, session: str | None, ended: asyncio.Future[bool], *, delivered: bool) -> None:
        if not ended.done():
            ended.set_result(delivered)
        if self._generations.get(session) is ended:
            del self._generations[session]

    def model_recommends(self) -> list[Any]:
        """On page load: the served model's recommendations, where they changed since the page was built;
        after a rollout to another family, its samplers become the sampler choices."""
        service = self.service
        rules = service.model_rules
        native = service.native_size or self.default_size
        now = recommended_request(self.limits, native_size=native, model=service.model_defaults, rules=rules)
        changed = [
            gr.skip() if getattr(now, name) == getattr(self.built_with, name) else getattr(now, name)
            for name in RECOMMENDABLE
        ]
        if rules.samplers != self.rules.samplers:
            changed[RECOMMENDABLE.index("scheduler")] = gr.Dropdown(choices=list(rules.samplers), value=now.scheduler)
        return changed


def caption(image: dict[str, Any]) -> str:
    """An image's caption in a gallery: seed, size and sampler."""
    return f"seed {image['seed']} · {image['width']}x{image['height']} · {image['scheduler']}"


def _preview_output(preview: Preview) -> tuple[list[tuple[Image.Image, str]], dict[str, Any]]:
    """An intermediate /generate output: the preview where the images will be, and the step it shows."""
    step = f"preview · step {preview.step}/{preview.total}"
    return [(preview.picture(), step)], {"images": [], "preview": {"step": preview.step, "total": preview.total}}


def _gallery(images: list[GeneratedImage]) -> GalleryItems:
    return [(str(image.png_path), caption(image.linked.to_api())) for image in images]
