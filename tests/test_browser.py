"""The web page in a real browser: Debian's chromium driven by Playwright, against the launched app.

Screenshots of every step go to test-artifacts/browser/ (laptop- and phone-sized windows).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from harness.app_server import ROOT, RunningApp, launched_app
from harness.images import assert_same_image
from harness.servers import S3Server, wait_until
from tests.test_image_inputs import picture

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def app(
    tiny_model_dir: Path, tiny_lora_dir: Path, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    s3_server.create_bucket("browser-images")
    env = {"S3_BUCKET": "browser-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    env["LORA_DIR"] = str(tiny_lora_dir)
    with launched_app(tiny_model_dir, tmp_path_factory.mktemp("browser-app"), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/install-test-deps.sh does)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture()
def context(browser: Browser) -> Iterator[BrowserContext]:
    created = browser.new_context(viewport=LAPTOP)
    created.set_default_timeout(30_000)
    # expect() has its own timeout (5 s by default), which a generation on a busy 2-core machine can outlast.
    expect.set_options(timeout=30_000)
    yield created
    created.close()


def open_page(context: BrowserContext, app: RunningApp) -> tuple[Page, list[str]]:
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app.url)
    expect(page.locator("#generate")).to_be_visible()
    expect(page.locator("#history-gallery")).to_be_visible()
    return page, errors


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def set_number(page: Page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(value)
    box.press("Enter")


def fill_form(page: Page, prompt: str, *, size: str = "64", steps: str = "4", seed: str = "-1") -> None:
    page.locator("#prompt textarea").fill(prompt)
    set_number(page, "width", size)
    set_number(page, "height", size)
    set_number(page, "steps", steps)
    set_number(page, "seed", seed)


def png_pixels(page: Page, url: str) -> np.ndarray:
    response = page.request.get(url)
    assert response.ok and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def newest_link(page: Page) -> str:
    link = page.locator("#links a").first
    expect(link).to_be_visible()
    href = link.get_attribute("href")
    assert href
    return href


def test_generate_see_progress_image_and_link(context: BrowserContext, app: RunningApp) -> None:
    page, errors = open_page(context, app)
    expect(page.locator("#result-status")).to_contain_text("Progress shows here")  # no empty box
    shot(page, "01-loaded")
    fill_form(page, "a red fox in the snow", size="256", steps="60")
    page.locator("#generate").click()
    expect(page.get_by_text(re.compile(r"step \d+/60")).first).to_be_visible()
    shot(page, "02-progress")
    expect(page.locator("#result-gallery img").first).to_be_visible(timeout=60_000)
    href = newest_link(page)
    assert png_pixels(page, href).shape == (256, 256, 3)
    # The preview pane is opaque: no blurred copy of the thumbnail grid shows through it.
    pane = page.eval_on_selector("#result-gallery .preview", "e => getComputedStyle(e).backdropFilter")
    assert pane == "none"
    shot(page, "03-image-and-link")
    page.set_viewport_size(PHONE)
    shot(page, "04-phone")
    assert errors == []


def test_the_preview_forms_in_the_result_box_and_the_final_image_replaces_it(
    context: BrowserContext, app: RunningApp
) -> None:
    page, errors = open_page(context, app)
    fill_form(page, "a forming picture", size="256", steps="100")
    page.locator("#generate").click()
    shown: list[str] = []
    preview = page.locator("#result-gallery img").first
    for _ in range(300):  # while it renders: the preview's picture, as it changes
        if page.locator("#links a").count():
            break
        if preview.count() and (source := preview.get_attribute("src")) and source not in shown:
            shown.append(source)
        page.wait_for_timeout(100)
        if len(shown) == 2:
            shot(page, "05-preview")
    final = newest_link(page)
    expect(page.get_by_text(re.compile(r"step \d+/100"))).to_have_count(0)
    final_picture = page.locator("#result-gallery img").first.get_attribute("src")
    previews = [source for source in shown if source != final_picture]
    assert len(previews) >= 2, shown  # it appeared, then changed, and the final image replaced it
    assert png_pixels(page, final).shape == (256, 256, 3)
    shot(page, "06-final-after-preview")
    assert errors == []


def test_history_survives_reload_and_is_private(context: BrowserContext, browser: Browser, app: RunningApp) -> None:
    page, _ = open_page(context, app)
    fill_form(page, "a lighthouse for history", seed="77")
    page.locator("#generate").click()
    newest_link(page)  # finished: a live preview shows in the gallery earlier, and a reload then would cancel it
    page.reload()
    expect(page.locator("#history-gallery img").first).to_be_visible()
    expect(page.locator("#history-note")).to_contain_text(re.compile(r"Page 1: \d+ images?, newest first"))
    shot(page, "05-history-after-reload")
    stranger = browser.new_context(viewport=LAPTOP)
    try:
        other, _ = open_page(stranger, app)
        expect(other.locator("#history-note")).to_contain_text("No images yet")  # the history has loaded
        expect(other.locator("#history-gallery img")).to_have_count(0)
        # And the stranger's own history, asked with the stranger's owner cookie, is empty too.
        cookies = "; ".join(f"{c['name']}={c['value']}" for c in stranger.cookies())
        _, theirs = Client(app.url, verbose=False, headers={"Cookie": cookies}).predict(1, api_name="/history")
        assert theirs["images"] == []
        shot(other, "06-second-browser-empty-history")
    finally:
        stranger.close()


def test_load_settings_from_history_reproduces_the_image(context: BrowserContext, app: RunningApp) -> None:
    page, _ = open_page(context, app)
    fill_form(page, "a green tram at night", seed="4242")
    page.locator("#generate").click()
    first_link = newest_link(page)
    expect(page.locator("#history-gallery img").first).to_be_visible()
    page.locator("#history-gallery img").first.click()
    expect(page.locator("#selected")).to_contain_text("a green tram at night")
    expect(page.locator("#selected")).to_contain_text("4242")
    expect(page.locator("#selected")).to_contain_text("link valid for 24 hours")
    expect(page.locator("#selected-link").get_by_role("textbox")).to_have_value(re.compile(r"^http"))
    expect(page.locator("#selected-image img")).to_be_visible()
    assert_shown_whole(page, "img", "#selected-image", (64, 64))  # opened whole, not the thumbnail's crop
    shot(page, "07-history-selected")
    page.locator("#prompt textarea").fill("something else")
    set_number(page, "seed", "1")
    page.locator("#load-settings").click()
    expect(page.locator("#prompt textarea")).to_have_value("a green tram at night")
    expect(page.locator("#seed input")).to_have_value("4242")
    shot(page, "08-settings-loaded")
    page.locator("#generate").click()
    expect(page.locator("#links a").first).not_to_have_attribute("href", first_link)
    second_link = newest_link(page)
    assert_same_image(png_pixels(page, first_link), png_pixels(page, second_link))


def test_invalid_width_shows_a_readable_error_and_the_page_keeps_working(
    context: BrowserContext, app: RunningApp
) -> None:
    page, _ = open_page(context, app)
    fill_form(page, "a bad size")
    set_number(page, "width", "100")
    page.locator("#generate").click()
    message = "width: must be a multiple of 8 from 64 to 1024, got 100"
    expect(page.locator("#width").get_by_text(message)).to_be_visible()  # next to the field itself
    expect(page.locator("#prompt textarea")).to_have_value("a bad size")  # what was typed stays
    shot(page, "09-invalid-width")
    set_number(page, "width", "64")
    page.locator("#generate").click()
    newest_link(page)
    expect(page.locator("#result-gallery img").first).to_be_visible()
    shot(page, "10-recovered")


def test_stop_cancels_a_long_generation(context: BrowserContext, app: RunningApp) -> None:
    cancelled_before = app.metric('sdapp_requests_total{outcome="cancelled"}')
    page, _ = open_page(context, app)
    fill_form(page, "a very long render", size="256", steps="100")
    page.locator("#generate").click()
    expect(page.get_by_text(re.compile(r"step \d+/100")).first).to_be_visible()
    page.locator("#stop").click()
    expect(page.get_by_text(re.compile(r"step \d+/100"))).to_have_count(0, timeout=10_000)
    shot(page, "11-stopped")
    for _ in range(50):
        if app.metric('sdapp_requests_total{outcome="cancelled"}') > cancelled_before:
            break
        page.wait_for_timeout(200)
    assert app.metric('sdapp_requests_total{outcome="cancelled"}') == cancelled_before + 1
    expect(page.locator("#result-gallery img")).to_have_count(0)


def test_api_page_lists_the_endpoints(context: BrowserContext, app: RunningApp) -> None:
    page, _ = open_page(context, app)
    page.get_by_text("Use via API").first.click()
    expect(page.get_by_text("/generate").first).to_be_visible()
    expect(page.get_by_text("/history").first).to_be_visible()
    shot(page, "12-api-page")


def test_a_waiting_request_shows_its_position_and_an_estimate(
    context: BrowserContext, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One request at a time (MAX_BATCH_SIZE=1): while another user's long render runs, the page
    says how many are ahead and about how long, then the step and the time left."""
    with launched_app(tiny_model_dir, tmp_path, args=["--max-batch-size", "1"]) as single:
        other = Client(single.url, verbose=False, download_files=str(tmp_path / "other"))
        long_render = other.submit(
            prompt="someone else's long render", steps=100, width=384, height=384, api_name="/generate"
        )
        wait_until(lambda: single.metric("sdapp_denoising_step_seconds_count") > 5, timeout=60)
        page, errors = open_page(context, single)
        fill_form(page, "mine, after theirs", size="128", steps="100")  # long enough to watch it run
        page.locator("#generate").click()
        expect(page.get_by_text(re.compile(r"1 ahead · about \d+ (s|min)")).first).to_be_visible()
        shot(page, "13-waiting-with-estimate")
        long_render.cancel()
        running = re.compile(r"step \d+/100 · (about \d+ s|under a second) left")
        expect(page.get_by_text(running).first).to_be_visible(timeout=60_000)
        expect(page.locator("#result-gallery img").first).to_be_visible(timeout=60_000)
        page.set_viewport_size(PHONE)
        shot(page, "14-waiting-done-phone")
        assert errors == []


def image_boxes(page: Page, selector: str) -> list[dict[str, float | str]]:
    return page.eval_on_selector_all(
        selector,
        "els => els.map(e => ({w: e.getBoundingClientRect().width, h: e.getBoundingClientRect().height, "
        "nw: e.naturalWidth, nh: e.naturalHeight, fit: getComputedStyle(e).objectFit}))",
    )


def assert_shown_whole(page: Page, image: str, component: str, natural: tuple[int, int]) -> None:
    """The first ``image`` in ``component`` has this natural size, is drawn undistorted (object-fit: contain),
    and the picture it draws lies inside the component's box: nothing is cropped or scrolled out of view."""
    shown = page.eval_on_selector(
        f"{component} {image}",
        """(img, component) => {
            const box = img.getBoundingClientRect();
            const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
            const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
            const outer = document.querySelector(component).getBoundingClientRect();
            return {nw: img.naturalWidth, nh: img.naturalHeight, fit: getComputedStyle(img).objectFit, w, h,
                    left: box.x + (box.width - w) / 2, top: box.y + (box.height - h) / 2,
                    outer: [outer.x, outer.y, outer.right, outer.bottom]};
        }""",
        component,
    )
    assert (shown["nw"], shown["nh"]) == natural, shown
    assert shown["fit"] == "contain", shown
    left, top, right, bottom = shown["outer"]
    inside = (
        shown["left"] >= left - 1
        and shown["top"] >= top - 1
        and shown["left"] + shown["w"] <= right + 1
        and shown["top"] + shown["h"] <= bottom + 1
    )
    assert inside and shown["w"] >= 64, shown


def test_images_keep_their_shape_and_the_phone_page_does_not_scroll_sideways(
    context: BrowserContext, app: RunningApp
) -> None:
    page, errors = open_page(context, app)
    fill_form(page, "a wide one", size="64", steps="3")
    set_number(page, "width", "128")
    page.locator("#generate").click()
    newest_link(page)
    expect(page.locator("#history-gallery img").first).to_be_visible(timeout=30_000)
    for viewport, name in ((LAPTOP, "15-shapes-laptop"), (PHONE, "16-shapes-phone")):
        page.set_viewport_size(viewport)
        page.wait_for_timeout(500)
        shot(page, name)
        assert_shown_whole(page, "img", "#result-gallery", (128, 64))
        thumbnails = image_boxes(page, "#history-gallery img")
        assert thumbnails and all(float(t["w"]) <= 256 and float(t["h"]) <= 256 for t in thumbnails), thumbnails
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{overflow}px of horizontal scroll at {viewport['width']}px"
    assert errors == []


def test_a_new_image_has_a_link_to_copy_a_png_to_download_and_its_lifetime(
    browser: Browser, app: RunningApp, tmp_path: Path
) -> None:
    context = browser.new_context(viewport=LAPTOP, permissions=["clipboard-read", "clipboard-write"])
    try:
        page, errors = open_page(context, app)
        fill_form(page, "a yellow kite | over *hills*", seed="31337")
        page.locator("#generate").click()
        expect(page.locator("#result-gallery img").first).to_be_visible(timeout=60_000)
        summary = page.locator("#result-summary")
        expect(summary).to_contain_text("seed 31337")
        expect(summary).to_contain_text("link valid for 24 hours")
        link = page.locator("#result-link").get_by_role("textbox")
        expect(link).to_have_value(newest_link(page))
        page.locator("#result-link").get_by_role("button", name=re.compile("copy", re.IGNORECASE)).click()
        assert page.evaluate("navigator.clipboard.readText()") == link.input_value()
        with page.expect_download() as download_info:
            page.locator("#result-download").click()
        saved = tmp_path / "download.png"
        download_info.value.save_as(saved)
        parameters = Image.open(saved).text["parameters"]
        assert parameters.startswith("a yellow kite | over *hills*\n")
        assert "Seed: 31337" in parameters and "Size: 64x64" in parameters and "Steps: 4" in parameters
        shot(page, "17-copy-and-download")
        assert errors == []
    finally:
        context.close()


def test_generate_is_reachable_without_scrolling_on_a_laptop(context: BrowserContext, app: RunningApp) -> None:
    page, _ = open_page(context, app)
    box = page.locator("#generate").bounding_box()
    assert box is not None and box["y"] + box["height"] <= LAPTOP["height"], box


def test_the_lora_picker_writes_the_tag_and_history_lists_the_adapter(context: BrowserContext, app: RunningApp) -> None:
    page, errors = open_page(context, app)
    fill_form(page, "a lora lighthouse", seed="77")
    page.locator("#lora-pick input").click()
    page.get_by_role("option", name="style · sd").click()
    expect(page.locator("#prompt textarea")).to_have_value("a lora lighthouse <lora:style:1>")
    page.locator("#generate").click()
    newest_link(page)
    page.locator("#refresh").click()
    page.locator("#history-gallery img").first.click()
    expect(page.locator("#selected")).to_contain_text("<lora:style:1>")
    expect(page.locator("#selected")).to_contain_text(re.compile(r"style: [0-9a-f]{12}"))  # the adapter's hash
    shot(page, "15-lora-picked")
    assert errors == []


def test_start_from_a_picture_paint_a_mask_and_find_both_in_history(
    context: BrowserContext, app: RunningApp, tmp_path: Path
) -> None:
    """Upload a picture, paint over its middle, generate: the result is inpainted there, and the
    history details link the stored input picture and mask."""
    page, errors = open_page(context, app)
    fill_form(page, "an inpainted door", seed="31", steps="8")
    page.get_by_text("Start from a picture").click()
    start = tmp_path / "start.png"
    start.write_bytes(picture(seed=9))
    page.locator("#init-image input[type=file]").set_input_files(str(start))
    expect(page.locator("#strength")).to_be_visible()
    canvas = page.locator("#mask-painter canvas").first
    expect(canvas).to_be_visible()
    canvas.scroll_into_view_if_needed()  # the mouse acts in the viewport only
    box = canvas.bounding_box()
    assert box is not None
    middle_x, middle_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(middle_x - box["width"] / 6, middle_y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(middle_x - box["width"] / 6 + step * box["width"] / 30, middle_y + step)
    page.mouse.up()
    expect(page.locator("#mask img").first).to_be_visible()
    shot(page, "18-picture-and-painted-mask")
    page.locator("#generate").click()
    href = newest_link(page)
    made = png_pixels(page, href)
    source = np.asarray(Image.open(start).convert("RGB"))
    changed = np.abs(made.astype(int) - source).max(axis=2) > 24
    assert changed[28:36, 24:40].mean() > changed[:8, :8].mean()  # redrawn where painted, kept in the corner
    # The request removed the uploads; the form now holds the stored copies, so Generate works again.
    expect(page.locator("#init-image img").first).to_be_visible()
    expect(page.locator("#mask img").first).to_be_visible()
    page.locator("#generate").click()
    expect(page.locator("#links a").first).not_to_have_attribute("href", href, timeout=60_000)
    assert_same_image(png_pixels(page, newest_link(page)), made)  # the same picture, mask and seed
    page.locator("#refresh").click()
    page.locator("#history-gallery img").first.click()
    expect(page.locator("#selected")).to_contain_text("Denoising strength")
    stored = page.locator("#selected a", has_text="input picture").get_attribute("href")
    assert stored is not None
    assert_same_image(png_pixels(page, stored), source)
    expect(page.locator("#selected a", has_text="inpainting mask")).to_be_visible()
    shot(page, "19-history-made-from")
    for field in ("init-image", "mask"):  # cleared, then "Load these settings" brings both back
        page.locator(f"#{field} button[aria-label='Remove Image']").click()
        expect(page.locator(f"#{field} img")).to_have_count(0)
    page.locator("#load-settings").click()
    expect(page.locator("#init-image img").first).to_be_visible()
    expect(page.locator("#mask img").first).to_be_visible()
    page.set_viewport_size(PHONE)  # the open picture section (editor included) fits a phone
    page.wait_for_timeout(500)
    shot(page, "20-pictures-phone")
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"{overflow}px of horizontal scroll at {PHONE['width']}px"
    assert errors == []


def test_an_image_dragged_from_the_history_becomes_the_picture_to_start_from(
    context: BrowserContext, app: RunningApp
) -> None:
    """The browser drags an image as its address; the page turns the drop into an upload of that file."""
    page, errors = open_page(context, app)
    fill_form(page, "a picture to start from", seed="41")
    page.locator("#generate").click()
    made = png_pixels(page, newest_link(page))
    page.locator("#refresh").click()
    expect(page.locator("#history-gallery img").first).to_be_visible()
    page.get_by_text("Start from a picture").click()
    expect(page.locator("#init-image")).to_be_visible()
    page.set_viewport_size({"width": LAPTOP["width"], "height": 2400})  # both ends of the drag in sight
    page.locator("#history-gallery img").first.drag_to(page.locator("#init-image"))
    dropped = page.locator("#init-image img").first
    expect(dropped).to_be_visible()
    expect(page.locator("#strength")).to_be_visible()  # the page treats it as any picture
    source = dropped.get_attribute("src")
    assert source is not None
    response = page.request.get(source)
    assert response.ok
    assert_same_image(np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB")), made)
    shot(page, "21-dragged-from-history")
    assert errors == []
