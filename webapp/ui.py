"""The Gradio page and its two public API endpoints, ``/generate`` and ``/history``."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

import gradio as gr

from sd_pipeline.contract.loras import MAX_WEIGHT, MIN_WEIGHT
from sd_pipeline.contract.models import ModelDefaults
from sd_pipeline.contract.recommended import RECOMMENDABLE
from sd_pipeline.contract.request import InputRules, RequestLimits
from webapp.components import validated_by_app
from webapp.details import parameter_block, summary_line
from webapp.endpoints import Endpoints, GalleryItems
from webapp.loras import AdapterListing, insert_lora, lora_choices, lora_listing
from webapp.owners import Network
from webapp.painting import Painting, mask_painter
from webapp.service import ImageService

# The history is a grid of thumbnails (at most ~2x112 px wide) whatever the count: left alone,
# Gradio draws a single image as one square as wide as the page, zoomed in by its crop.
PAGE_CSS = """
#history-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)) !important; }
#selected-image img { width: 100%; height: 100%; object-fit: contain !important; }
/* The result's preview pane: opaque. Gradio blurs the thumbnail grid behind it, which showed as a
   faint blurred copy of the image around and under the thumbnail strip. */
#result-gallery .preview { backdrop-filter: none !important; background: var(--block-background-fill) !important; }
"""


PICTURES_OPTIONAL = "Start from a picture (image-to-image, inpainting)"
PICTURES_REQUIRED = "Picture and mask (required: this model redraws the masked part of a picture)"


def _history_note(found: dict[str, Any] | None) -> str:
    """Under the history: what the page shows (and that it has loaded), or that there is nothing yet."""
    if not found:
        return "Loading your history…"
    count, page = len(found.get("images", [])), found.get("page", 1)
    if count == 0:
        return "No images yet: the ones you make appear here." if page == 1 else f"Page {page} is empty."
    more = " · older ones on the next page" if found.get("has_more") else ""
    return f"Page {page}: {count} image{'s' if count != 1 else ''}, newest first{more}."


def _links_markdown(result: dict[str, Any]) -> str:
    lines = []
    for number, image in enumerate(result.get("images", []), start=1):
        note = " (upload pending: the link works once storage is back)" if image["status"] == "pending" else ""
        if image.get("nsfw"):
            note += " (blanked by the model's safety checker)"
        lines.append(f"{number}. [Shareable link]({image['url']}) · seed `{image['seed']}`{note}")
    return "\n".join(lines)


def build_demo(
    service: ImageService,
    *,
    limits: RequestLimits,
    model_name: str,
    default_size: int = 512,
    model_defaults: ModelDefaults | None = None,
    rules: InputRules | None = None,
    trusted_proxies: Sequence[Network] = (),
    owner_secret: bytes | None = None,
    loras: AdapterListing | None = None,
) -> gr.Blocks:
    """The page: a form, the new images with links, and the owner's paged history.

    ``default_size`` is the model's native side (512 for SD 1.x) and ``model_defaults`` what the
    model recommends: the form's and the API's defaults. A page opened after a model rollout
    gets the new model's recommendations (``service.model_defaults``). ``rules``: what the
    model's family accepts (the sampler choices, the size multiple, what guidance means).
    ``loras``: the LoRA adapters prompts may name (a picker on the page, ``/loras`` in the API)."""

    endpoints = Endpoints(
        service,
        limits=limits,
        default_size=default_size,
        model_defaults=model_defaults,
        rules=rules or InputRules(),
        trusted_proxies=trusted_proxies,
        owner_secret=owner_secret,
    )
    fields, names, history = endpoints.fields, endpoints.names, endpoints.history
    inpainting_model = endpoints.rules.needs_mask  # it draws only from a picture and a mask

    skip_missing_matplotlib_probe()
    with gr.Blocks(title="sd-service · text to image", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        task = "Inpainting" if inpainting_model else "Text to image"
        gr.Markdown(f"## {task}\nModel: `{model_name}` · images are stored with shareable links.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=320):
                form_inputs: dict[str, Any] = {}

                def place(name: str) -> Any:
                    """Draw the field called ``name`` here in the layout."""
                    form_inputs[name] = next(field for field in fields if field.name == name).render()
                    return form_inputs[name]

                prompt = place("prompt")
                if loras is not None:
                    lora_pick = gr.Dropdown(
                        label="LoRA adapters",
                        info=f"Adds <lora:NAME:1> to the prompt; edit its weight there "
                        f"({MIN_WEIGHT:g} to {MAX_WEIGHT:g})",
                        choices=[],
                        value=None,
                        elem_id="lora-pick",
                    )
                place("negative_prompt")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                with gr.Accordion("Settings", open=True):
                    with gr.Row():
                        seed = place("seed")
                        place("scheduler")
                    with gr.Row():
                        place("width")
                        place("height")
                    for name in ("steps", "guidance_scale", "true_cfg_scale", "num_images"):
                        place(name)
                with gr.Accordion(
                    PICTURES_REQUIRED if inpainting_model else PICTURES_OPTIONAL,
                    open=inpainting_model,
                    elem_id="pictures",
                ) as pictures:
                    init_image = place("init_image")
                    strength = place("strength")
                    strength.visible = False  # shown once there is a picture to start from
                    painter = mask_painter()
                    mask = place("mask")
            with gr.Column(scale=7, min_width=320):
                # Progress ("waiting ...", "step n/N ...") shows here, above the images, so the live
                # preview below it stays in sight while the request renders.
                status = gr.Markdown(
                    "Progress shows here while your images render.",  # not an empty box before the first run
                    elem_id="result-status",
                    min_height=64,
                    container=True,
                )
                gallery = gr.Gallery(
                    label="Images",
                    columns=2,
                    height=420,
                    object_fit="contain",
                    preview=True,
                    format="jpeg",  # how Gradio encodes the live previews (finished images are PNG files)
                    buttons=["download", "fullscreen"],
                    elem_id="result-gallery",
                )
                with gr.Group():
                    result_link = _link_box("Shareable link (click an image above to pick it)", "result-link")
                    result_summary = gr.Markdown(elem_id="result-summary")
                with gr.Row():
                    result_download = gr.DownloadButton(
                        "Download PNG", size="sm", interactive=False, elem_id="result-download"
                    )
                    result_to_start = gr.Button("Start from this picture", size="sm", elem_id="result-to-start")
                    random_seed = gr.Button("Random seed", size="sm", elem_id="random-seed")
                    reuse_seed = gr.Button("Reuse last seed", size="sm", elem_id="reuse-seed")
                links = gr.Markdown(elem_id="links")
                with gr.Accordion("API result (JSON)", open=False):
                    result = gr.JSON(label="Result", elem_id="result")
        with gr.Accordion("History", open=True):
            with gr.Row():
                previous_page = gr.Button("◀ Newer", size="sm")
                page = validated_by_app(
                    gr.Number(label="Page", value=1, precision=0, scale=0, min_width=90, elem_id="page")
                )
                next_page = gr.Button("Older ▶", size="sm")
                refresh = gr.Button("Refresh", size="sm", elem_id="refresh")
            history_gallery = gr.Gallery(
                label="History",
                columns=6,
                height=300,
                object_fit="cover",
                preview=False,
                interactive=False,  # an output: no "Drop media here" (pictures go in "Start from a picture")
                elem_id="history-gallery",
            )
            history_note = gr.Markdown("Loading your history…", elem_id="history-note")
            with gr.Row(equal_height=False):
                selected_image = gr.Image(
                    label="Selected image",
                    type="filepath",
                    format="png",
                    interactive=False,
                    height=320,
                    buttons=["download", "fullscreen"],
                    elem_id="selected-image",
                )
                with gr.Column():
                    selected = gr.Markdown("Click an image in the history to see it here.", elem_id="selected")
                    selected_link = _link_box("Shareable link (freshly signed)", "selected-link")
                    with gr.Row():
                        selected_download = gr.DownloadButton(
                            "Download PNG", size="sm", interactive=False, elem_id="selected-download"
                        )
                        load_settings = gr.Button(
                            "Load these settings into the form", size="sm", elem_id="load-settings"
                        )
                        selected_to_start = gr.Button("Start from this picture", size="sm", elem_id="selected-to-start")
            history_json = gr.JSON(label="History page", visible=False)
        chosen = gr.State()

        history_event = dict(inputs=page, outputs=[history_gallery, history_json])
        demo.load(history, **history_event, api_name="history", concurrency_limit=None)

        demo.load(
            endpoints.model_recommends,
            outputs=[form_inputs[name] for name in RECOMMENDABLE],
            api_name=False,
            queue=False,
            show_progress="hidden",
        )
        if loras is not None:
            demo.load(
                lambda: gr.Dropdown(choices=lora_choices(loras, service.model_rules.family), value=None),
                outputs=lora_pick,
                api_name=False,
                queue=False,
                show_progress="hidden",
            )
            lora_pick.input(insert_lora, inputs=[prompt, lora_pick], outputs=prompt, api_visibility="private").then(
                lambda: None, outputs=lora_pick, api_visibility="private", queue=False
            )

            def list_loras() -> dict[str, Any]:
                """The LoRA adapters a prompt may name with <lora:NAME:WEIGHT>, the family each was made
                for ("" when its file does not say) and whether the served model can use it."""
                return lora_listing(loras, service.model_rules.family)

            gr.api(list_loras, api_name="loras", queue=False)
        form = [form_inputs[name] for name in names]
        generation = gr.on(
            [run.click, prompt.submit],
            endpoints.generate(),
            inputs=form,
            outputs=[gallery, result],
            api_name="generate",
            validator=endpoints.check_form,
            show_progress_on=[status],
            concurrency_limit=None,
            concurrency_id="generate",
        )
        new_image = [result_link, result_download, result_summary]
        generation.success(
            _new_images, inputs=[result, gallery], outputs=[links, *new_image], api_visibility="private"
        ).then(history, inputs=page, outputs=[history_gallery, history_json], api_visibility="private")
        generation.success(endpoints.keep_pictures, inputs=result, outputs=[init_image, mask], api_visibility="private")
        gallery.select(_pick_new_image, inputs=[result, gallery], outputs=new_image, api_visibility="private")
        # Cancel first, then clear: the page dispatches a click's listeners one after another, so
        # a clearing step that waits for the generation to end must not come before the cancel.
        stop.click(None, cancels=[generation], api_visibility="private").then(
            endpoints.stop,
            inputs=result,
            outputs=[gallery, result],
            api_visibility="private",
            concurrency_limit=None,  # each page's Stop waits for its own generation only
        )
        painting = Painting(limits, service.gallery_dir)
        init_image.change(
            lambda picture: (gr.Slider(visible=bool(picture)), painting.background(picture)),
            inputs=init_image,
            outputs=[strength, painter],
            api_visibility="private",
            show_progress="hidden",
        )
        # Strokes fire "input" (not "change") on Gradio 6's editor.
        painter.input(painting.mask, inputs=painter, outputs=mask, api_visibility="private", show_progress="hidden")
        for button, picked in ((result_to_start, result_download), (selected_to_start, selected_image)):
            button.click(_start_from, inputs=picked, outputs=[init_image, pictures], api_visibility="private")
        random_seed.click(lambda: -1, outputs=seed, api_visibility="private")
        reuse_seed.click(_last_seed, inputs=[result, seed], outputs=seed, api_visibility="private")

        history_json.change(_history_note, inputs=history_json, outputs=history_note, api_visibility="private")
        refresh.click(history, **history_event, api_visibility="private")
        page.submit(history, **history_event, api_visibility="private")
        previous_page.click(lambda p: max(1, int(p or 1) - 1), page, page, api_visibility="private").then(
            history, **history_event, api_visibility="private"
        )
        next_page.click(_next_page, [page, history_json], page, api_visibility="private").then(
            history, **history_event, api_visibility="private"
        )
        history_gallery.select(
            _select,
            inputs=[history_json, history_gallery],
            outputs=[selected_image, selected, selected_link, selected_download, chosen],
            api_visibility="private",
        )
        load_settings.click(endpoints.load_settings, inputs=chosen, outputs=form, api_visibility="private")
    return demo


def skip_missing_matplotlib_probe() -> None:
    """Gradio tries ``import matplotlib`` twice for every event it processes (to switch its backend);
    without matplotlib each try searches every import path again (measured: ~3 % of the web
    process's CPU under load). Marking it absent makes the same ImportError instant."""
    if "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is None:
        sys.modules["matplotlib"] = None  # type: ignore[assignment]  # Python's "not importable" marker


def _start_from(png: str | None) -> tuple[Any, Any]:
    """ "Start from this picture": the picked image becomes the input picture, its section opened."""
    if not png:
        raise gr.Error("Pick an image first", print_exception=False)
    return png, gr.Accordion(open=True)


def _last_seed(result: dict[str, Any] | None, current: float) -> float:
    images = (result or {}).get("images") or []
    return float(images[0]["seed"]) if images else current


def _next_page(page: float, listing: dict[str, Any] | None) -> int:
    current = int(page or 1)
    return current + 1 if (listing or {}).get("has_more") else current


def _link_box(label: str, elem_id: str) -> gr.Textbox:
    """A read-only, one-line link with Gradio's copy button."""
    return gr.Textbox(label=label, buttons=["copy"], interactive=False, max_lines=1, elem_id=elem_id)


def _select(
    listing: dict[str, Any] | None, shown: GalleryItems | None, event: gr.SelectData
) -> tuple[str, str, str, Any, dict[str, Any]]:
    """The history item clicked: the whole image, its parameters, a fresh link, its PNG."""
    image = ((listing or {}).get("images") or [])[event.index]
    png = _png_at(shown, event.index)
    download = gr.DownloadButton(value=png, interactive=png is not None)
    return png or "", parameter_block(image), image["url"], download, image


def _new_images(result: dict[str, Any] | None, shown: GalleryItems | None) -> tuple[str, str, Any, str]:
    """After a generation: every image's link, and the first image picked for copy and download."""
    return (_links_markdown(result or {}), *_details((result or {}).get("images") or [], shown, 0))


def _pick_new_image(
    result: dict[str, Any] | None, shown: GalleryItems | None, event: gr.SelectData
) -> tuple[str, Any, str]:
    return _details((result or {}).get("images") or [], shown, event.index)


def _details(images: list[dict[str, Any]], shown: GalleryItems | None, index: int) -> tuple[str, Any, str]:
    if not 0 <= index < len(images):
        return "", gr.DownloadButton(value=None, interactive=False), ""
    png = _png_at(shown, index)
    return images[index]["url"], gr.DownloadButton(value=png, interactive=png is not None), summary_line(images[index])


def _png_at(shown: GalleryItems | None, index: int) -> str | None:
    """The local PNG a gallery shows at ``index`` (the one with the ``parameters`` chunk)."""
    items = shown or []
    if not 0 <= index < len(items):
        return None
    item = items[index]
    return str(item[0] if isinstance(item, (tuple, list)) else item)
