"""The Dockerfile and compose stack, validated as far as a machine without a Docker engine allows."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.app_server import ROOT, wait_ready
from tests.servers import free_port
from tests.test_monitoring import ALERT_RULES, DASHBOARD, DATASOURCE, PROMETHEUS_CONFIG

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"


def compose(*args: str, env_file: Path | None = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    command = ["docker-compose", "-f", str(COMPOSE)]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    clean_env = {key: value for key, value in os.environ.items() if not key.startswith(("S3_", "GRAFANA_", "AWS_"))}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=clean_env)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker-compose resolves it, with every profile."""
    shown = compose("--profile", "cpu", "--profile", "gpu", "config")
    assert shown.returncode == 0, shown.stderr
    parsed: dict[str, Any] = yaml.safe_load(shown.stdout)
    return parsed


def test_compose_config_is_valid_and_requires_secrets() -> None:
    assert compose("config", "-q").returncode == 0
    missing = compose("config", "-q", env_file=None)
    assert missing.returncode != 0 and "S3_ACCESS_KEY" in missing.stderr


def test_services_images_are_pinned_and_healthy_dependencies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {"app", "app-cpu", "seaweedfs", "prometheus", "alertmanager", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
    assert "minio" not in COMPOSE.read_text().lower()
    for app in ("app", "app-cpu"):
        assert services[app]["depends_on"] == {"seaweedfs": {"condition": "service_healthy"}}
        assert services[app]["stop_grace_period"] in ("90s", "1m30s")
    devices = services["app"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["app-cpu"]["environment"]["SD_DEVICE"] == "cpu"
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_nothing_is_published_beyond_loopback_by_default(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            # docker-compose writes "IP:HOST:CONTAINER/tcp" when bound to an address, a mapping otherwise
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)


def test_each_app_has_its_own_profile_and_a_plain_up_starts_neither(resolved: dict[str, Any]) -> None:
    # Compose starts a service with profiles only when one of them is active; the rest always start.
    profiles = {name: service.get("profiles", []) for name, service in resolved["services"].items()}
    assert profiles.pop("app") == ["gpu"] and profiles.pop("app-cpu") == ["cpu"]
    assert all(found == [] for found in profiles.values()), profiles


def seaweedfs_command() -> str:
    raw = yaml.safe_load(COMPOSE.read_text())
    command: str = raw["services"]["seaweedfs"]["command"][0]
    return command.replace("$$", "$")


@pytest.mark.parametrize("secret", ['with"quote', "with\\backslash", "with\nnewline"])
def test_seaweedfs_refuses_secrets_that_would_break_its_identity_json(tmp_path: Path, secret: str) -> None:
    secret = secret.encode().decode("unicode_escape")
    fake_weed = tmp_path / "weed"
    fake_weed.write_text("#!/bin/sh\necho started\n")
    fake_weed.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "S3_ACCESS_KEY": "access", "S3_SECRET_KEY": secret}
    refused = subprocess.run(["sh", "-c", seaweedfs_command()], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 64 and "must not contain quotes" in refused.stderr
    assert "started" not in refused.stdout


def test_seaweedfs_writes_a_valid_identity_and_is_probed_on_its_s3_gateway(
    tmp_path: Path, resolved: dict[str, Any]
) -> None:
    fake_weed = tmp_path / "weed"
    fake_weed.write_text("#!/bin/sh\ncat /tmp/s3.json\n")
    fake_weed.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "S3_ACCESS_KEY": "ak-1", "S3_SECRET_KEY": "s3cr3t/+=%&'$x"}
    started = subprocess.run(["sh", "-c", seaweedfs_command()], env=env, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    credentials = json.loads(started.stdout)["identities"][0]["credentials"][0]
    assert credentials == {"accessKey": "ak-1", "secretKey": "s3cr3t/+=%&'$x"}
    seaweedfs = resolved["services"]["seaweedfs"]
    assert "http://127.0.0.1:8333/healthz" in seaweedfs["healthcheck"]["test"]
    grace = seaweedfs["stop_grace_period"]
    assert grace.endswith("s") and int(grace.rstrip("s")) > 10  # longer than the volume server's 10 s pre-stop


def test_prometheus_sends_alerts_to_a_valid_alertmanager(resolved: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"] and "alertmanager" in resolved["services"]
    checked = subprocess.run(["amtool", "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    routes = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())["route"]["routes"]
    assert routes[0]["matchers"] == ['severity="page"']


def test_no_secret_values_in_git() -> None:
    text = COMPOSE.read_text()
    for line in text.splitlines():
        if any(word in line for word in ("SECRET", "PASSWORD", "ACCESS_KEY")) and ":" in line and "$" not in line:
            assert line.strip().startswith(("#", "-")) or line.strip().endswith(":"), line
    ignored = subprocess.run(["git", "check-ignore", "deploy/.env"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 0, "deploy/.env must be git-ignored"


def test_every_mounted_file_exists_and_is_the_one_the_monitoring_tests_check(resolved: dict[str, Any]) -> None:
    mounted: set[Path] = set()
    for service in resolved["services"].values():
        for volume in service.get("volumes", []):
            source_text = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source_text.startswith("/"):
                source = Path(source_text)
                assert source.exists(), source
                mounted |= {source} if source.is_file() else set(source.rglob("*.*"))
    mounted = {path.resolve() for path in mounted}
    for checked in (PROMETHEUS_CONFIG, ALERT_RULES, DASHBOARD, DATASOURCE):
        assert checked.resolve() in mounted, checked
    build = resolved["services"]["app"]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE.resolve()


def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_copies_existing_paths_runs_unprivileged_and_checks_health() -> None:
    instructions = dockerfile_instructions()
    copied = [shlex.split(args)[:-1] for name, args in instructions if name == "COPY"]
    for sources in copied:
        for source in (s for s in sources if not s.startswith("--")):
            assert (ROOT / source).exists(), source
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for sources in copied:
        for source in (s for s in sources if not s.startswith("--")):
            assert f"!{source}" in ignore, f".dockerignore must let {source} into the build context"
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(name == "HEALTHCHECK" and "/healthz" in args and "--start-period" in args for name, args in instructions)
    assert {args for name, args in instructions if name == "EXPOSE"} == {"7860 8000"}
    assert instructions[0][0] == "FROM" and "cuda" in instructions[0][1] and ":" in instructions[0][1]
    pip_step = next(args for name, args in instructions if name == "RUN" and "pip install" in args)
    first_code_copy = next(i for i, (name, args) in enumerate(instructions) if name == "COPY" and "app.py" in args)
    assert instructions.index(("RUN", pip_step)) < first_code_copy, "dependencies are installed before the code"


def dockerfile_entrypoint_and_env() -> tuple[list[str], dict[str, str]]:
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    for name, args in dockerfile_instructions():
        if name == "ENTRYPOINT":
            entrypoint = json.loads(args)
        if name == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return entrypoint, env


def test_the_image_entrypoint_starts_the_app_here(tiny_model_dir: Path, tmp_path: Path) -> None:
    entrypoint, image_env = dockerfile_entrypoint_and_env()
    assert entrypoint == ["python", "app.py"]
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, **{k: v for k, v in image_env.items() if k not in ("PATH", "VIRTUAL_ENV")}}
    # Same command and image settings; only what must differ outside a container is overridden.
    env.update(HOST="127.0.0.1", PORT=str(port), METRICS_PORT=str(metrics_port), DATA_DIR=str(tmp_path / "data"))
    env.update(HF_HOME=str(tmp_path / "hf"), GRADIO_TEMP_DIR=str(tmp_path / "gradio"), SD_MODEL=str(tiny_model_dir))
    log_path = tmp_path / "entrypoint.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(entrypoint, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{metrics_port}", process, log_path)
        assert requests.get(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5).status_code == 200
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
