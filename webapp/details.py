"""What the page says about one image: its link's lifetime in words and its parameters as a block."""

from __future__ import annotations

import datetime as dt
from typing import Any

_STATUS_WORDS = {
    "stored": "stored",
    "pending": "upload pending: storage is unreachable, the image is kept here and uploaded when it is back",
}


def lifetime_words(expires_at: str, *, now: dt.datetime | None = None) -> str:
    """'link valid for 24 hours' for a link that expires in a day (rounded to the nearest unit)."""
    seconds = (dt.datetime.fromisoformat(expires_at) - (now or dt.datetime.now(dt.UTC))).total_seconds()
    if seconds <= 0:
        return "link expired"
    for unit_seconds, unit in ((86_400, "days"), (3600, "hours"), (60, "minutes")):
        if seconds >= 2 * unit_seconds:
            return f"link valid for {round(seconds / unit_seconds)} {unit}"
    return f"link valid for {round(seconds)} seconds"


def status_words(image: dict[str, Any]) -> str:
    """The image's storage status (and the safety checker's verdict) in a sentence."""
    words = _STATUS_WORDS.get(image["status"], str(image["status"]))
    if image.get("nsfw"):
        words += " · blanked by the model's safety checker"
    return words


def summary_line(image: dict[str, Any]) -> str:
    """One line for a new image: seed, size, sampler, status and the link's lifetime."""
    return (
        f"seed `{image['seed']}` · {image['width']}×{image['height']} · {image['scheduler']} · "
        f"{status_words(image)} · {lifetime_words(image['expires_at'])}"
    )


def parameter_block(image: dict[str, Any]) -> str:
    """A history item's parameters, status and date as a Markdown table."""
    rows = [
        ("Prompt", image["prompt"]),
        ("Negative prompt", image["negative_prompt"] or "(none)"),
        ("Seed", image["seed"]),
        ("Steps", image["steps"]),
        ("Guidance", f"{image['guidance_scale']:g}"),
        ("Size", f"{image['width']}×{image['height']}"),
        ("Sampler", image["scheduler"]),
        ("Model", model_words(image)),
        *([("LoRA", image["lora_hashes"])] if image.get("lora_hashes") else []),
        *([("Denoising strength", f"{image['strength']:g}")] if image.get("strength") is not None else []),
        *([("True CFG scale", f"{image['true_cfg_scale']:g}")] if image.get("true_cfg_scale", 1) > 1 else []),
        ("Created", _readable_date(image["created_at"])),
        ("Status", status_words(image)),
        ("Link", lifetime_words(image["expires_at"])),
    ]
    lines = ["| Parameter | Value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    if pictures := input_links(image):
        lines.append(f"| Made from | {pictures} |")
    return "\n".join(lines)


def input_links(image: dict[str, Any]) -> str:
    """Links to the pictures an image was made from ("[input picture](...) · [mask](...)"), or ""."""
    names = (("init_image_url", "input picture"), ("mask_url", "inpainting mask"))
    return " · ".join(f"[{words}]({_url(image[key])})" for key, words in names if image.get(key))


def _url(url: str) -> str:
    """A link target that cannot end the Markdown link or break the table."""
    return url.replace("(", "%28").replace(")", "%29").replace("|", "%7C").replace(" ", "%20")


def model_words(image: dict[str, Any]) -> str:
    """The model, its version and short hash when it was published (``demo v2 · 1a2b3c4d5e``)."""
    words = str(image["model"])
    if image.get("model_version"):
        words += f" {image['model_version']}"
    if image.get("model_hash"):
        words += f" · {image['model_hash']}"
    return words


def _readable_date(created_at: str) -> str:
    moment = dt.datetime.fromisoformat(created_at)
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _cell(value: object) -> str:
    """Text that cannot break the table or run Markdown: pipes, stars and brackets escaped."""
    text = str(value).replace("\\", "\\\\").replace("\n", " ")
    for char in "|*_`[]<>#":
        text = text.replace(char, "\\" + char)
    return text
