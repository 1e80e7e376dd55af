"""The app's settings: typed groups read from today's flat environment names and flags."""

from __future__ import annotations

import pytest

from webapp.settings import EngineSettings, SettingsError, load_settings


def test_flat_environment_names_and_flags_land_in_their_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_MODEL", "./models/tiny-shapes")
    monkeypatch.setenv("s3_bucket", "images-env")  # case-insensitive, as before
    monkeypatch.setenv("WORKER_STALL_SECONDS", "7")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setenv("ENGINE__SD_DEVICE", "cpu")  # a nested name is not a setting: the flat one is
    settings = load_settings(["--s3-bucket", "images-flag", "--port", "7000"])
    assert settings.engine.sd_model == "./models/tiny-shapes" and settings.engine.sd_device == "auto"
    assert settings.storage.s3_bucket == "images-flag"  # the flag wins over the environment
    assert settings.worker.worker_stall_seconds == 7 and settings.ray.ray_address == "auto" and settings.port == 7000
    plan = settings.ray_plan()
    assert plan is not None and plan.deployment.stall_seconds == 7  # groups meet in the plans built from them
    assert settings.pipeline().model == "./models/tiny-shapes"


def test_a_groups_own_rule_is_named_like_any_other() -> None:
    with pytest.raises(SettingsError, match=r"^invalid settings: RAY_MIN_REPLICAS must not exceed RAY_MAX_REPLICAS$"):
        load_settings([], env={"RAY_MIN_REPLICAS": "5", "RAY_MAX_REPLICAS": "2"})
    with pytest.raises(SettingsError, match=r"^invalid setting SD_CPU_THREADS: .* \(got '0'\)$"):
        load_settings(["--sd-cpu-threads", "0"])
    assert EngineSettings().sd_preview == "auto"  # a group's defaults are the app's
