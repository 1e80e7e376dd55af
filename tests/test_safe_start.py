"""Start-up refuses what would be unsafe to serve: placeholder or weak secrets, and an address
beyond loopback with no login unless ALLOW_ANONYMOUS says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.app_server import ROOT
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


def test_the_app_stops_at_once_with_one_clear_line() -> None:
    environment = {**os.environ, "HOST": "0.0.0.0"}
    for name in ("AUTH_USERS", "AUTH_FILE", "ALLOW_ANONYMOUS"):
        environment.pop(name, None)
    finished = subprocess.run(
        [sys.executable, "app.py", "--model", "/nonexistent"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip().startswith("error: HOST=0.0.0.0 serves beyond this machine without login")
