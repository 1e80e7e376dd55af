"""Start-up refuses what would be unsafe to serve: placeholder or weak secrets, and an address
beyond loopback with no login unless ALLOW_ANONYMOUS says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.app_server import ROOT
from webapp.settings import SettingsError, load_settings, refuse_unsafe_start

GOOD_ENV = {"AWS_ACCESS_KEY_ID": "AKIAREAL", "AWS_SECRET_ACCESS_KEY": "x" * 40}


def refusal(argv: list[str], environ: dict[str, str] | None = None) -> str | None:
    settings = load_settings(argv, env={})
    try:
        refuse_unsafe_start(settings, settings.credentials(), environ or GOOD_ENV)
    except SettingsError as error:
        return str(error)
    return None


def test_placeholder_and_short_secrets_are_refused_by_name_never_shown() -> None:
    assert refusal([]) is None
    short = refusal(["--link-secret", "too-short"])
    assert short is not None and short.startswith("LINK_SECRET must be at least 32") and "too-short" not in short
    assert refusal(["--link-secret", "change-me-" + "x" * 40]) is not None
    assert refusal(["--link-secret", "y" * 32]) is None
    app = refusal(["--app-secret", "change-me-app-secret-but-long-enough-anyway"])
    assert app is not None and app.startswith("APP_SECRET must be at least 32")
    aws = refusal([], {**GOOD_ENV, "AWS_SECRET_ACCESS_KEY": "change-me-secret-key"})
    assert aws is not None and "AWS_SECRET_ACCESS_KEY" in aws and "change-me-secret-key" not in aws
    ray = refusal([], {**GOOD_ENV, "RAY_AUTH_TOKEN": "change-me-ray-token"})
    assert ray is not None and ray.startswith("RAY_AUTH_TOKEN is still the placeholder")
    login = refusal(["--auth-users", "alice:change-me"])
    assert login is not None and "'alice'" in login
    short_password = refusal(["--auth-users", "alice:wonderland,bob:1234567"])
    assert short_password is not None and "'bob'" in short_password and "8 characters" in short_password
    assert "1234567" not in short_password
    owner = refusal(["--owner-secret", "short"])
    assert owner is not None and owner.startswith("OWNER_SECRET must be at least 32")


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["--host", "0.0.0.0"], True),
        (["--host", "0.0.0.0", "--auth-users", "alice:wonderland"], False),
        (["--host", "0.0.0.0", "--allow-anonymous", "true"], False),
        (["--host", "::1"], False),
        (["--host", "localhost"], False),
    ],
)
def test_a_public_bind_needs_a_login_or_an_explicit_yes(argv: list[str], refused: bool) -> None:
    assert (refusal(argv) is not None) == refused


def dockerfile_environment() -> dict[str, str]:
    """The ``ENV`` the image sets (``ENV A=1 \\`` continued over lines)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found |= dict(pair.split("=", 1) for pair in line.removeprefix("ENV ").split())
    return found


def test_a_bare_docker_run_refuses_to_start_without_a_login() -> None:
    """What ``docker run IMAGE`` does (the image's environment, no login, no ALLOW_ANONYMOUS): the
    app stops at once with one clear line."""
    image = dockerfile_environment()
    assert image["HOST"] == "0.0.0.0"
    environment = {
        key: value for key, value in os.environ.items() if key not in ("AUTH_USERS", "AUTH_FILE", "ALLOW_ANONYMOUS")
    }
    environment |= {key: value for key, value in image.items() if key in ("HOST", "PORT", "METRICS_PORT")}
    finished = subprocess.run(
        [sys.executable, "app.py", "--model", "models/tiny-shapes"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip().startswith("error: HOST=0.0.0.0 serves beyond this machine without login")
    readme = (ROOT / "README.md").read_text()
    assert "a bare `docker run` refuses to start without a login" in readme
