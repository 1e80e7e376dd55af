"""What the page writes about an image: link lifetimes in words and the parameter block."""

from __future__ import annotations

import datetime as dt

import pytest

from webapp.details import lifetime_words, parameter_block, summary_line

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


def api_image(**changes: object) -> dict[str, object]:
    image: dict[str, object] = {
        "id": "1",
        "created_at": "2026-12-02T11:59:30.000+00:00",
        "prompt": "a red circle",
        "negative_prompt": "",
        "seed": 42,
        "steps": 20,
        "guidance_scale": 7.5,
        "width": 128,
        "height": 64,
        "scheduler": "Euler",
        "model": "tiny",
        "nsfw": False,
        "status": "stored",
        "url": "http://example/x.png",
        "expires_at": (dt.datetime.now(dt.UTC) + dt.timedelta(hours=24)).isoformat(timespec="seconds"),
    }
    image.update(changes)
    return image


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (86_400, "link valid for 24 hours"),
        (7 * 86_400, "link valid for 7 days"),
        (3600, "link valid for 60 minutes"),
        (90 * 60, "link valid for 90 minutes"),
        (45, "link valid for 45 seconds"),
        (0, "link expired"),
        (-10, "link expired"),
    ],
)
def test_link_lifetimes_read_as_plain_words(seconds: int, words: str) -> None:
    expires_at = (NOW + dt.timedelta(seconds=seconds)).isoformat(timespec="seconds")
    assert lifetime_words(expires_at, now=NOW) == words


def test_the_summary_names_seed_size_sampler_status_and_lifetime() -> None:
    line = summary_line(api_image())
    assert line.startswith("seed `42` · 128×64 · Euler · stored · link valid for ")
    assert line.endswith(("24 hours", "23 hours"))


def test_a_pending_upload_says_so() -> None:
    assert "upload pending" in summary_line(api_image(status="pending"))


def test_the_parameter_block_is_a_table_of_every_setting() -> None:
    block = parameter_block(api_image())
    rows = dict(line.strip("|").split("|", 1) for line in block.splitlines()[2:])
    table = {name.strip(): value.strip() for name, value in rows.items()}
    assert table == {
        "Prompt": "a red circle",
        "Negative prompt": "(none)",
        "Seed": "42",
        "Steps": "20",
        "Guidance": "7.5",
        "Size": "128×64",
        "Sampler": "Euler",
        "Model": "tiny",
        "Created": "2026-12-02 11:59 UTC",
        "Status": "stored",
        "Link": table["Link"],
    }
    assert table["Link"].startswith("link valid for ")


def test_prompts_cannot_break_the_table_or_inject_markdown() -> None:
    block = parameter_block(api_image(prompt="a | b\n**bold** [x](http://evil)"))
    prompt_row = block.splitlines()[2]
    assert prompt_row == r"| Prompt | a \| b \*\*bold\*\* \[x\](http://evil) |"
    assert len(block.splitlines()) == 13
