"""The Dockerfile and compose stack, validated as far as a machine without a Docker engine allows."""

from __future__ import annotations

import http.server
import importlib
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from harness.app_server import ROOT, wait_ready
from harness.servers import S3Server, free_ports, wait_for_port, wait_until
from sd_pipeline.backends.ray.replica import APP_NAME
from tests.needs import needed_program
from tests.test_monitoring import ALERT_RULES, DASHBOARD, DATASOURCE, PROMETHEUS_CONFIG

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
HAPROXY_CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"
STORE_KEYS = {
    "S3_ACCESS_KEY": "app-key",
    "S3_SECRET_KEY": "app-secret",
    "S3_ADMIN_ACCESS_KEY": "admin-key",
    "S3_ADMIN_SECRET_KEY": "admin-secret",
    "S3_BUCKET": "sd-images",
}
RAY_PROFILE = {"ray-head", "ray-gpu-worker", "app-ray", "app-ray-2", "lb", "lb-cert"}


def compose(*args: str, env_file: Path | None = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    command = ["docker-compose", "-f", str(COMPOSE)]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    clean_env = {key: value for key, value in os.environ.items() if not key.startswith(("S3_", "GRAFANA_", "AWS_"))}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=clean_env)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker-compose resolves it, with every profile."""
    shown = compose("--profile", "cpu", "--profile", "gpu", "--profile", "ray", "config")
    assert shown.returncode == 0, shown.stderr
    parsed: dict[str, Any] = yaml.safe_load(shown.stdout)
    return parsed


def test_compose_config_is_valid_and_requires_secrets() -> None:
    assert compose("config", "-q").returncode == 0
    missing = compose("config", "-q", env_file=None)
    assert missing.returncode != 0 and "S3_" in missing.stderr and "ACCESS_KEY in deploy/.env" in missing.stderr


def test_services_images_are_pinned_and_healthy_dependencies(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    setup = {"models-publish", "loras-publish", "image-bucket"}
    assert (
        set(services) == {"app", "app-cpu", "seaweedfs", "prometheus", "alertmanager", "grafana"} | RAY_PROFILE | setup
    )
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
    assert "minio" not in COMPOSE.read_text().lower()
    for app in ("app", "app-cpu", "app-ray", "app-ray-2"):
        assert services[app]["depends_on"]["seaweedfs"] == {"condition": "service_healthy"}
        for publish in ("models-publish", "loras-publish"):
            assert services[app]["depends_on"][publish] == {"condition": "service_completed_successfully"}
        assert services[app]["environment"]["SD_MODEL"] == "s3://models/demo"
        assert services[app]["environment"]["LORA_S3"] == "s3://models/loras"
        assert services[app]["environment"]["ALLOW_ANONYMOUS"] == "false"  # .env.example does not open it
        assert services[app]["stop_grace_period"] in ("90s", "1m30s")
    for gpu_service in ("app", "ray-gpu-worker"):
        devices = services[gpu_service]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["app-cpu"]["environment"]["SD_DEVICE"] == "cpu"
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_every_service_drops_all_capabilities_and_cannot_gain_privileges(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert set(service.get("cap_add", [])) <= {"CHOWN"}, name  # lb-cert hands the key to HAProxy's user


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
    assert all(profiles.pop(name) == ["ray"] for name in RAY_PROFILE)
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
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **STORE_KEYS, "S3_SECRET_KEY": secret}
    refused = subprocess.run(["sh", "-c", seaweedfs_command()], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 64 and "must not contain quotes" in refused.stderr
    assert "started" not in refused.stdout


@pytest.mark.parametrize("name", ["S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_ADMIN_ACCESS_KEY", "S3_ADMIN_SECRET_KEY"])
def test_seaweedfs_refuses_the_placeholder_keys(tmp_path: Path, name: str) -> None:
    fake_weed = tmp_path / "weed"
    fake_weed.write_text("#!/bin/sh\necho started\n")
    fake_weed.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **STORE_KEYS, name: "change-me-from-the-example"}
    refused = subprocess.run(["sh", "-c", seaweedfs_command()], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 64 and "placeholders from .env.example" in refused.stderr
    assert "started" not in refused.stdout


def test_seaweedfs_gives_the_app_its_buckets_only_and_keeps_its_servers_inside(
    tmp_path: Path, resolved: dict[str, Any]
) -> None:
    fake_weed = tmp_path / "weed"
    fake_weed.write_text(
        '#!/bin/sh\necho "$WEED_JWT_SIGNING_KEY $WEED_JWT_FILER_SIGNING_KEY"\necho "$@"\ncat /tmp/s3.json\n'
    )
    fake_weed.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **STORE_KEYS, "S3_SECRET_KEY": "s3cr3t/+=%&'$x"}
    started = subprocess.run(["sh", "-c", seaweedfs_command()], env=env, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    keys_line, arguments, identities = started.stdout.split("\n", 2)
    signing, filer_signing = keys_line.split()
    assert len(signing) == len(filer_signing) == 64 and signing != filer_signing  # random, per start
    assert "-ip.bind=127.0.0.1" in arguments and "-s3.ip.bind=0.0.0.0" in arguments  # only the S3 gateway is reachable
    app, admin = json.loads(identities)["identities"]
    assert app["credentials"] == [{"accessKey": "app-key", "secretKey": "s3cr3t/+=%&'$x"}]
    assert sorted(app["actions"]) == sorted(
        ["Read:sd-images", "Write:sd-images", "List:sd-images", "Tagging:sd-images", "Read:models", "List:models"]
    )  # no Admin, no other bucket
    assert (
        admin["credentials"] == [{"accessKey": "admin-key", "secretKey": "admin-secret"}]
        and "Admin" in admin["actions"]
    )
    services = resolved["services"]
    for setup in ("models-publish", "loras-publish", "image-bucket"):  # only the one-shot setup is admin
        assert services[setup]["environment"]["AWS_ACCESS_KEY_ID"] == "change-me-admin-access-key"
    for app_service in ("app", "app-cpu", "app-ray", "app-ray-2"):
        environment = services[app_service]["environment"]
        assert environment["AWS_ACCESS_KEY_ID"] == "change-me-access-key" and environment["S3_CREATE_BUCKET"] == "false"
        assert services[app_service]["depends_on"]["image-bucket"] == {"condition": "service_completed_successfully"}
    seaweedfs = services["seaweedfs"]
    assert "http://127.0.0.1:8333/healthz" in seaweedfs["healthcheck"]["test"]
    grace = seaweedfs["stop_grace_period"]
    assert grace.endswith("s") and int(grace.rstrip("s")) > 10  # longer than the volume server's 10 s pre-stop


def test_the_image_bucket_step_creates_the_bucket_once(s3_server: S3Server, resolved: dict[str, Any]) -> None:
    service = resolved["services"]["image-bucket"]
    bucket = f"images-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "S3_BUCKET": bucket, "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    command = [sys.executable, *service["entrypoint"][1:], *service["command"]]
    for _ in range(2):  # a second start finds it and succeeds
        made = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and f"bucket '{bucket}' is ready" in made.stdout, made.stderr
    bad = subprocess.run([sys.executable, "-m", "storage"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: python -m storage create-bucket" in bad.stderr


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
    port, metrics_port = free_ports(2)
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


@pytest.mark.parametrize(
    ("service", "variable"), [("ray-head", "RAY_AUTH_TOKEN"), ("grafana", "GF_SECURITY_ADMIN_PASSWORD")]
)
def test_services_refuse_the_placeholder_secrets(
    resolved: dict[str, Any], tmp_path: Path, service: str, variable: str
) -> None:
    """The stack's other secrets: the service's own command runs only with a real one."""
    entrypoint = resolved["services"][service]["entrypoint"]
    for program in ("ray", "run.sh"):  # stand-ins for what the images run
        fake = tmp_path / program
        fake.write_text('#!/bin/sh\necho started "$@"\n')
        fake.chmod(0o755)
    script = (
        entrypoint[2].replace("$$", "$").replace("exec /run.sh", f"exec {tmp_path}/run.sh")
    )  # as the container sees it
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    for value, refused in (("change-me-ray-token", True), ("change-me", True), ("", True), ("a-real-one", False)):
        ran = subprocess.run(
            ["sh", "-c", script, entrypoint[3], "--flag"], env={**env, variable: value}, capture_output=True, text=True
        )
        assert (ran.returncode == 64) == refused, (value, ran.stdout, ran.stderr)
        assert ("started" in ran.stdout) != refused and ("placeholder" in ran.stderr) == refused
        if not refused:
            assert ran.stdout.strip().endswith("--flag")  # the service's own arguments still arrive


def test_the_ray_profile_wires_one_cluster_two_front_ends_and_one_token(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    image = services["app-ray"]["image"]
    assert all(services[name]["image"] == image for name in ("ray-head", "ray-gpu-worker", "app-ray-2"))
    head, worker = services["ray-head"], services["ray-gpu-worker"]
    assert head["entrypoint"] == worker["entrypoint"] and head["entrypoint"][-1] == "ray-start"
    assert 'exec ray start "$$@"' in head["entrypoint"][2]  # Ray's own command, after the token check
    assert {"--head", "--port=6379", "--num-cpus=0", "--num-gpus=0", "--block"} <= set(head["command"])
    assert {"--address=ray-head:6379", "--num-gpus=1", "--block"} <= set(worker["command"])
    for node in (head, worker):
        assert "--metrics-export-port=8080" in node["command"]  # what Prometheus's "ray" job scrapes
        assert "--dashboard-agent-listen-port=52365" in node["command"]  # what the health checks ask
        assert "52365/api/local_raylet_healthz" in " ".join(node["healthcheck"]["test"])
    assert worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    for name in ("ray-head", "ray-gpu-worker", "app-ray", "app-ray-2"):
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token" and environment["RAY_AUTH_TOKEN"] == "change-me-ray-token"
    for name, deploy in (("app-ray", "if-missing"), ("app-ray-2", "never")):
        front_end = services[name]
        assert front_end["environment"]["RAY_ADDRESS"] == "auto" and front_end["environment"]["RAY_DEPLOY"] == deploy
        # A node with nothing to offer, so its driver joins the cluster and no replica lands there.
        assert "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0" in front_end["command"][0]
        assert front_end["command"][0].endswith("&& exec python app.py")
        assert "ports" not in front_end  # reached through the load balancer only
    assert services["app-ray-2"]["depends_on"]["app-ray"] == {"condition": "service_healthy"}
    missing = compose("--profile", "ray", "config", "-q", env_file=None)
    assert missing.returncode != 0


def lb_certificate(resolved: dict[str, Any], folder: Path) -> Path:
    """The certificate lb-cert makes, made here by the same command (openssl): the folder holding site.pem."""
    certs = folder / "certs"
    certs.mkdir()
    command = resolved["services"]["lb-cert"]["command"][0]
    for name in ("key.pem", "cert.pem"):
        command = command.replace(f"/tmp/{name}", str(folder / name))
    command = command.replace("/certs/", f"{certs}/")
    made = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    site = certs / "site.pem"
    assert stat.S_IMODE(site.stat().st_mode) == 0o600 and site.stat().st_uid == 99  # HAProxy's user alone
    assert subprocess.run(["sh", "-c", command], capture_output=True, timeout=60).returncode == 0  # kept, not remade
    return certs


def test_the_load_balancer_keeps_each_client_on_one_ready_front_end(resolved: dict[str, Any], tmp_path: Path) -> None:
    needed_program("haproxy")
    config = HAPROXY_CONFIG.read_text()
    certs = lb_certificate(resolved, tmp_path)  # checked by haproxy -c below
    local_config = tmp_path / "haproxy.cfg"
    local_config.write_text(config.replace("/usr/local/etc/haproxy/certs/", f"{certs}/"))
    checked = subprocess.run(["haproxy", "-c", "-f", str(local_config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "redirect scheme https code 301 unless { ssl_fc }" in config and "ssl crt" in config
    servers = [line.split() for line in config.splitlines() if line.strip().startswith("server ")]
    assert {server[2] for server in servers} == {"app-ray:7860", "app-ray-2:7860"}
    assert all(server[-2:] == ["cookie", server[1]] for server in servers)  # sticky by cookie
    assert "cookie SDFRONTEND insert indirect nocache" in config
    assert "option httpchk GET /readyz" in config and "check port 8000" in config  # the metrics side port
    lb = resolved["services"]["lb"]
    assert lb["depends_on"]["app-ray"] == {"condition": "service_healthy"}
    assert lb["depends_on"]["lb-cert"] == {"condition": "service_completed_successfully"}
    assert sorted(lb["ports"]) == ["127.0.0.1:7443:7443/tcp", "127.0.0.1:7860:7860/tcp"]  # TLS, and the redirect
    assert "monitor-uri /healthz" in config and "8404/healthz" in " ".join(lb["healthcheck"]["test"])
    # Per-address rate limit here; the front ends trust this balancer's X-Forwarded-For, and only its.
    assert "http-request deny deny_status 429 if { sc_http_req_rate(0) gt" in config
    assert "http-request del-header X-Forwarded-For" in config and "option forwardfor" in config
    address = lb["networks"]["default"]["ipv4_address"]
    for front_end in ("app-ray", "app-ray-2"):
        assert resolved["services"][front_end]["environment"]["TRUSTED_PROXIES"] == address


class EchoFrontEnd(http.server.BaseHTTPRequestHandler):
    """Stands in for a front end behind the balancer: answers /readyz, echoes each request's headers."""

    def do_GET(self) -> None:
        body = json.dumps({name.lower(): value for name, value in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def shipped_haproxy(resolved: dict[str, Any], folder: Path) -> Iterator[tuple[int, int]]:
    """deploy/haproxy/haproxy.cfg as shipped, on loopback ports, in front of an echoing front end:
    only the addresses, the certificate's folder and the servers' names are changed. Its TLS and
    plain ports."""
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoFrontEnd)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    tls, plain, health = free_ports(3)
    config = HAPROXY_CONFIG.read_text()
    config = config.replace("/usr/local/etc/haproxy/certs/", f"{lb_certificate(resolved, folder)}/")
    config = config.replace("bind :7443 ", f"bind 127.0.0.1:{tls} ").replace("bind :7860", f"bind 127.0.0.1:{plain}")
    config = config.replace("bind :8404", f"bind 127.0.0.1:{health}")
    config = config.replace("check port 8000", f"check port {backend.server_port}")
    for name in ("app-ray", "app-ray-2"):
        config = config.replace(f"{name}:7860", f"127.0.0.1:{backend.server_port}")
    (folder / "haproxy.cfg").write_text(config)
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(folder / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(tls)
        yield tls, plain
    finally:
        process.terminate()
        process.wait(timeout=30)
        backend.shutdown()


def open_connection(port: int) -> socket.socket | None:
    """A connection to the balancer that answered a request and stays open, or None if it was closed."""
    try:
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return None
    try:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        if connection.recv(1024).startswith(b"HTTP/1.1 301"):
            return connection
    except OSError:  # reset, or a broken pipe: refused
        pass
    connection.close()
    return None


def test_the_shipped_balancer_config_ends_tls_redirects_strips_forwarding_and_limits_each_address(
    resolved: dict[str, Any], tmp_path: Path
) -> None:
    needed_program("haproxy")
    with shipped_haproxy(resolved, tmp_path) as (tls, plain):
        redirect = requests.get(f"http://127.0.0.1:{plain}/page", allow_redirects=False, timeout=10)
        assert redirect.status_code == 301 and redirect.headers["location"] == f"https://127.0.0.1:{plain}/page"
        secure = requests.Session()
        site = f"https://localhost:{tls}/"  # the name lb-cert's certificate is made for (TLS_HOSTNAME)

        def get(**options: Any) -> requests.Response:
            return secure.get(site, verify=str(tmp_path / "cert.pem"), timeout=10, **options)

        # Polled slowly: every request counts toward the 300 per 10 s this address may make, and a
        # fast poll while the front end is still being checked used that up (CI saw 429s below).
        wait_until(lambda: get().status_code == 200, timeout=30, interval=0.5)
        answer = get(headers={"X-Forwarded-For": "6.6.6.6"})
        seen = answer.json()
        assert seen["x-forwarded-for"] == "127.0.0.1"  # what the client claimed is gone; the real address went on
        assert seen["x-forwarded-proto"] == "https"
        assert answer.headers["strict-transport-security"].startswith("max-age=")
        assert "SDFRONTEND" in secure.cookies  # sticky by the cookie its first answer set
        # At most 50 connections open at once per address: the next one is closed at once.
        secure.close()  # its pooled connection would count as one
        held: list[socket.socket] = []
        try:
            while len(held) <= 50 and (connection := open_connection(plain)) is not None:
                held.append(connection)
            # 50 at most; a few fewer when connections this test closed just before still count.
            assert 45 <= len(held) <= 50
        finally:
            for connection in held:
                connection.close()
        wait_until(lambda: (connection := open_connection(plain)) is not None and connection.close() is None)
        # More than 300 requests in 10 s from one address: 429 before any front end.
        codes = [get().status_code for _ in range(310)]
        assert codes.count(429) >= 1 and codes[0] == 200 and codes[-1] == 429


KUBERAY = DEPLOY / "kuberay" / "rayservice.yaml"


def test_the_kuberay_example_deploys_the_pipeline_and_front_ends_that_join_it() -> None:
    documents = list(yaml.safe_load_all(KUBERAY.read_text()))
    ray_service, web, volume, service, *policies = documents
    kinds = (ray_service["kind"], web["kind"], volume["kind"], service["kind"])
    assert kinds == ("RayService", "Deployment", "PersistentVolumeClaim", "Service")
    assert [policy["kind"] for policy in policies] == ["NetworkPolicy", "NetworkPolicy"]
    ray_policy, web_policy = (policy["spec"] for policy in policies)
    assert ray_policy["podSelector"]["matchLabels"] == {"app": "sd-service-ray"}
    allowed = [peer["podSelector"]["matchLabels"]["app"] for peer in ray_policy["ingress"][0]["from"]]
    assert allowed == ["sd-service-ray", "sd-service-web"]
    assert web_policy["ingress"][0] == {"ports": [{"port": 7860, "protocol": "TCP"}]}
    cluster = ray_service["spec"]["rayClusterConfig"]
    pinned = next(line for line in (ROOT / "requirements-ray.txt").read_text().splitlines() if "==" in line)
    assert cluster["rayVersion"] == pinned.split("==")[1]
    serve_config = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    assert serve_config["proxy_location"] == "HeadOnly"  # never on a front end, whose port 8000 is the metrics port
    (application,) = serve_config["applications"]
    assert application["name"] == APP_NAME
    module_name, builder_name = application["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), builder_name)
    deployment = builder(application["args"])._bound_deployment  # what Serve would deploy from this config
    assert (deployment.name, deployment.ray_actor_options["num_gpus"]) == ("pipeline", 1)
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)

    images = {cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    images |= {group["template"]["spec"]["containers"][0]["image"] for group in cluster["workerGroupSpecs"]}
    (container,) = web["spec"]["template"]["spec"]["containers"]
    assert images == {container["image"]}  # one image serves both
    pods = [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]
    for pod in [*pods, web["spec"]["template"]]:
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for each in pod["spec"]["containers"]:
            assert each["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert {pod["metadata"]["labels"]["app"] for pod in pods} == {"sd-service-ray"}
    env = {item["name"]: item.get("value") for item in container["env"]}
    secrets = {
        item["name"]: item["valueFrom"]["secretKeyRef"]["name"] for item in container["env"] if "valueFrom" in item
    }
    assert secrets["APP_SECRET"] == "sd-service-app-secret"  # shared by the front ends, never in the manifest
    # The app refuses a public bind without a login: the front ends get logins (and no anonymous use).
    assert secrets["AUTH_USERS"] == "sd-service-app-secret" and "ALLOW_ANONYMOUS" not in env
    assert secrets["OWNER_SECRET"] == "sd-service-app-secret"
    assert env["PUBLIC_URL"].startswith("https://")  # Secure cookies behind the TLS Ingress
    # The spool is on a volume, not in the container's layer (pending images survive a restart).
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    (data,) = [v for v in web["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[env["DATA_DIR"]]]
    assert data["persistentVolumeClaim"]["claimName"] == volume["metadata"]["name"]
    assert volume["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by every front end
    # Every secret the manifests name, with each key, is made by the commands at the top of the file.
    created = {
        match.group(1): set(re.findall(r"--from-literal=([A-Za-z_-]+)=", match.group(2)))
        for match in re.finditer(r"kubectl create secret generic (\S+)((?:.*\\\n#)*.*)", KUBERAY.read_text())
    }
    referenced = [
        (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
        for pod in [*pods, web["spec"]["template"]]
        for each in pod["spec"]["containers"]
        for item in each.get("env", [])
        if "valueFrom" in item
    ]
    assert referenced and all(key in created.get(name, set()) for name, key in referenced), (referenced, created)
    for each in container.get("envFrom", []):
        assert each["secretRef"]["name"] in created
    assert env["RAY_ADDRESS"] == "auto" and env["RAY_DEPLOY"] == "never" and env["RAY_AUTH_MODE"] == "token"
    args = application["args"]
    assert (env["RAY_REPLICAS"], env["RAY_MAX_REPLICAS"]) == (args["ray_replicas"], str(args["ray_max_replicas"]))
    assert env["MAX_BATCH_SIZE"] == str(args["max_batch_size"]) and env["SD_MODEL"] == args["sd_model"]
    head_service = f"{ray_service['metadata']['name']}-head-svc:6379"
    assert f"ray start --address={head_service} --num-cpus=0 --num-gpus=0" in container["args"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"web": 7860, "metrics": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # Gradio's queue needs sticky clients
    assert service["spec"]["selector"] == web["spec"]["selector"]["matchLabels"]
