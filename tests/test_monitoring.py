"""Metrics, the side port, the Prometheus and Grafana files, and a real Prometheus scraping the app."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from gradio_client import Client

from harness.app_server import ROOT, RunningApp, launched_app
from harness.servers import free_port, wait_for_port, wait_until
from monitoring.health import Health
from monitoring.metrics import Metrics, Outcome
from monitoring.server import MetricsServer

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sd-service.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
# Only these series exist on a CUDA device; the test app runs on the CPU.
CUDA_ONLY_METRICS = ("sdapp_gpu_memory_allocated_bytes", "sdapp_gpu_memory_reserved_bytes")
# Only with RAY_ADDRESS set: the app's replica counts, and Ray's own metrics (scraped from Ray's nodes).
RAY_ONLY_METRICS = ("sdapp_pipeline_replicas", "ray_serve_")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_config_and_rules_and_alert_unit_tests_pass() -> None:
    for checked in (promtool("check", "config", str(PROMETHEUS_CONFIG)), promtool("check", "rules", str(ALERT_RULES))):
        assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_metrics_record_facts_into_their_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.request_finished(Outcome.SUCCESS, seconds=2.5, images=3)
    first.request_finished(Outcome.INVALID)
    first.pipeline_call(seconds=1.5, images=4)
    first.failure(operation="upload")
    first.pending(count=7)
    value = first.registry.get_sample_value
    assert value("sdapp_requests_total", {"outcome": "success"}) == 1
    assert value("sdapp_requests_total", {"outcome": "invalid"}) == 1
    assert value("sdapp_images_generated_total") == 3
    assert value("sdapp_request_duration_seconds_sum") == 2.5
    assert value("sdapp_batch_size_images_bucket", {"le": "4.0"}) == 1
    assert value("sdapp_batch_size_images_bucket", {"le": "3.0"}) == 0
    assert value("sdapp_pipeline_busy_seconds_total") == 1.5
    assert value("sdapp_storage_failures_total", {"operation": "upload"}) == 1
    assert value("sdapp_storage_uploads_pending") == 7
    assert second.registry.get_sample_value("sdapp_requests_total", {"outcome": "success"}) == 0
    with pytest.raises(ValueError):
        first.failure(operation="prompt text")  # labels come from a fixed set only


def test_a_ray_front_end_is_up_while_a_replica_runs() -> None:
    """SdServiceWorkerDown pages on sdapp_worker_up == 0: on Ray it follows the running replicas
    (it was never set there, so the page fired on every Ray front end)."""
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    metrics.replicas(by_state={"RUNNING": 2, "STARTING": 1})
    assert value("sdapp_worker_up") == 1 and value("sdapp_pipeline_replicas", {"state": "RUNNING"}) == 2
    metrics.replicas(by_state={"STARTING": 1})
    assert value("sdapp_worker_up") == 0
    metrics.replicas(by_state={})  # Ray's status unavailable
    assert value("sdapp_worker_up") == 0


def test_every_metric_is_documented_with_units_in_the_name() -> None:
    metrics = Metrics()
    for family in metrics.registry.collect():
        if not family.name.startswith("sdapp_"):
            continue
        assert family.documentation, family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_images")), family.name


@pytest.fixture()
def side_port() -> Iterator[tuple[MetricsServer, Health]]:
    health = Health(cache_seconds=0)
    server = MetricsServer(Metrics().registry, health, host="127.0.0.1", port=0)
    server.start()
    yield server, health
    server.stop()


def test_readyz_follows_model_server_storage_and_shutdown(side_port: tuple[MetricsServer, Health]) -> None:
    server, health = side_port
    base = f"http://127.0.0.1:{server.port}"
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "alive"}
    not_ready = requests.get(f"{base}/readyz", timeout=5)
    assert not_ready.status_code == 503
    assert not_ready.json()["reasons"] == ["model not loaded", "web server not started"]
    health.model_loaded()
    health.serving()
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
    storage_up = [False]

    def storage_check() -> None:
        if not storage_up[0]:
            raise ConnectionError("down")

    health.storage_check = storage_check
    down = requests.get(f"{base}/readyz", timeout=5)
    assert down.status_code == 503 and down.json()["reasons"] == ["storage unreachable: ConnectionError"]
    storage_up[0] = True  # checked again in the background: /readyz never waits on storage
    wait_until(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, timeout=10)
    health.shutting_down()
    assert requests.get(f"{base}/readyz", timeout=5).json()["reasons"] == ["shutting down"]
    assert requests.get(f"{base}/metrics", timeout=5).headers["Content-Type"].startswith("text/plain")
    assert requests.get(f"{base}/nope", timeout=5).status_code == 404


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = next(line.split(":", 1)[1].strip() for line in DATASOURCE.read_text().splitlines() if "uid:" in line)
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
    assert len(dashboard_queries()) >= 20


@pytest.fixture()
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real Prometheus (Debian's package) on loopback; the test writes its targets file."""
    port = free_port()
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{ALERT_RULES}']\n"
        "scrape_configs:\n  - job_name: sd-service\n    file_sd_configs:\n"
        f"      - files: ['{targets}']\n        refresh_interval: 1s\n"
    )
    command = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"]
    command += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", targets
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus_url: str, expr: str) -> dict[str, Any]:
    response = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = response.json()
    assert body["status"] == "success", (expr, body)
    return body


def test_real_prometheus_scrapes_the_app_and_every_dashboard_query_answers(
    tiny_model_dir: Path, tmp_path: Path, prometheus: tuple[str, Path]
) -> None:
    prometheus_url, targets = prometheus
    with launched_app(tiny_model_dir, tmp_path) as app:
        metrics_target = app.metrics_url.removeprefix("http://")
        targets.write_text(json.dumps([{"targets": [metrics_target]}]))
        drive_traffic(app, tmp_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            scraped = query(prometheus_url, 'sdapp_requests_total{outcome="success"}')["data"]["result"]
            if scraped and float(scraped[0]["value"][1]) >= 2:
                break
            time.sleep(0.5)

        # rate() needs two samples after the traffic: wait until Prometheus holds three.
        def scraped_thrice() -> bool:
            after = query(prometheus_url, 'count_over_time(sdapp_requests_total{outcome="success"}[1m]) >= 3')
            return bool(after["data"]["result"])

        wait_until(scraped_thrice, timeout=60, interval=0.5)
        assert query(prometheus_url, 'up{job="sd-service"}')["data"]["result"][0]["value"][1] == "1"
        empty = []
        for expr in dashboard_queries():
            result = query(prometheus_url, expr)["data"]["result"]
            if not result and not any(name in expr for name in CUDA_ONLY_METRICS + RAY_ONLY_METRICS):
                empty.append(expr)
        assert empty == [], f"dashboard queries with no series: {empty}"
        success = query(prometheus_url, 'sdapp_requests_total{outcome="success"}')["data"]["result"]
        assert float(success[0]["value"][1]) == 2
        invalid = query(prometheus_url, 'sdapp_requests_total{outcome="invalid"}')["data"]["result"]
        assert float(invalid[0]["value"][1]) == 1
        rules = requests.get(f"{prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert {rule["name"] for rule in rules} >= {"SdServiceDown", "SdServiceErrorRatio", "SdServiceUploadsPending"}
        assert all(rule["health"] == "ok" for rule in rules), rules


def drive_traffic(app: RunningApp, tmp_path: Path) -> None:
    client = Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
    fields = {"steps": 2, "width": 64, "height": 64, "scheduler": "Euler"}
    client.predict(prompt="scraped one", num_images=2, **fields, api_name="/generate")
    client.predict(prompt="scraped two", **fields, api_name="/generate")
    with pytest.raises(Exception, match="width"):
        client.predict(prompt="bad", **{**fields, "width": 70}, api_name="/generate")
    client.predict(1, api_name="/history")


def test_worker_restarts_readiness_and_crash_loop_reach_the_side_port() -> None:
    metrics = Metrics()
    problems: dict[str, str | None] = {"ready": None, "alive": None}
    health = Health(
        cache_seconds=0,
        pipeline_readiness=lambda: problems["ready"],
        pipeline_liveness=lambda: problems["alive"],
    )
    health.model_loaded()
    health.serving()
    server = MetricsServer(metrics.registry, health, host="127.0.0.1", port=0)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        metrics.worker_up(up=True)
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
        metrics.worker_up(up=False)
        metrics.worker_restarted(reason="stalled")
        problems["ready"] = "pipeline worker restarting (it stalled)"
        not_ready = requests.get(f"{base}/readyz", timeout=5)
        assert not_ready.status_code == 503 and not_ready.json()["reasons"] == [problems["ready"]]
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200  # restarting is not a reason to die
        problems["alive"] = "pipeline worker crash loop: 5 restarts in the last 600s"
        unhealthy = requests.get(f"{base}/healthz", timeout=5)
        assert unhealthy.status_code == 503
        assert unhealthy.json() == {"status": "unhealthy", "reasons": [problems["alive"]]}
        text = requests.get(f"{base}/metrics", timeout=5).text
        assert 'sdapp_worker_restarts_total{reason="stalled"} 1.0' in text
        assert 'sdapp_worker_restarts_total{reason="died"} 0.0' in text
        assert "sdapp_worker_up 0.0" in text
        with pytest.raises(ValueError):
            metrics.worker_restarted(reason="bored")  # labels come from a fixed set only
    finally:
        server.stop()
