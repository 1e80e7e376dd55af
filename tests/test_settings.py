"""The app's settings: typed groups read from today's flat environment names and flags."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sd_pipeline.admission import DEFAULT_QUEUE_CAPACITY
from sd_pipeline.contract.plans import RayPlan, ReplicaPlan, RestartPolicy
from sd_pipeline.contract.settings import PipelineSettings
from storage.s3 import S3Settings
from storage.spool import SpoolLimits
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


def test_the_settings_defaults_are_the_defaults_of_what_they_configure() -> None:
    """One default per setting: what the settings build by default equals each part built with none."""
    settings = load_settings([], env={"S3_BUCKET": "images"})
    assert settings.restart_policy() == RestartPolicy()
    built, default = settings.replica_plan(), ReplicaPlan()
    # RAY_MAX_REPLICAS (4) only bounds RAY_REPLICAS=auto; a plan's own default is a fixed count of 1.
    assert built == replace(default, max_replicas=4)
    assert load_settings([], env={"RAY_ADDRESS": "auto"}).ray_plan() == RayPlan("auto", deployment=built)
    assert settings.storage.spool_max_items == SpoolLimits().max_items
    assert settings.s3() == S3Settings(bucket="images")
    assert settings.queue_max_size == DEFAULT_QUEUE_CAPACITY


def test_every_engine_setting_the_worker_takes_names_a_field_it_has() -> None:
    carried = {field.serialization_alias for field in EngineSettings.model_fields.values()} - {None}
    assert len(carried) == 15 and carried <= set(PipelineSettings.model_fields)
    pipeline = load_settings(
        ["--sd-t5", "false", "--sd-compile", "true", "--preview-interval-seconds", "2"], env={"SD_DEVICE": "cpu"}
    ).pipeline()
    assert (pipeline.t5_encoder, pipeline.compile_unet, pipeline.preview_interval, pipeline.device) == (
        False,
        True,
        2.0,
        "cpu",
    )
