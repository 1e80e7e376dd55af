"""The launched app, driven through gradio_client, with S3 on loopback (moto)."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import requests
from gradio_client import Client, handle_file
from PIL import Image

from harness.app_server import ROOT, RunningApp, is_stepping, is_waiting, launched_app
from harness.images import assert_same_image, decompression_bomb_png, pipeline_image_from_picture
from harness.servers import S3Server, wait_until
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.model.loading import LoadedPipeline
from sd_pipeline.png import read_png_parameters
from tests.test_image_inputs import picture, square_mask
from tests.test_request import BAD_INPUTS

FAST: dict[str, Any] = {"steps": 3, "width": 64, "height": 64, "guidance_scale": 7.5, "scheduler": "Euler a"}
SLOW: dict[str, Any] = {"steps": 100, "width": 256, "height": 256, "guidance_scale": 7.5, "scheduler": "Euler"}


@pytest.fixture(scope="module")
def s3_app(tiny_model_dir: Path, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    s3_server.create_bucket("app-images")
    env = {"S3_BUCKET": "app-images", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    with launched_app(
        tiny_model_dir,
        tmp_path_factory.mktemp("s3-app"),
        env=env,
        args=["--history-page-size", "3", "--max-pixels", str(256 * 256), "--max-upload-bytes", "300000"],
    ) as app:
        yield app


def client(app: RunningApp, tmp_path: Path, **kwargs: Any) -> Client:
    return Client(app.url, verbose=False, download_files=str(tmp_path), **kwargs)


def generate(c: Client, prompt: str, **fields: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    values = {"negative_prompt": "", "seed": -1, "num_images": 1, **FAST, **fields}
    result: tuple[list[dict[str, Any]], dict[str, Any]] = c.predict(prompt=prompt, **values, api_name="/generate")
    return result


def fetch_pixels(url: str) -> np.ndarray:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_generate_returns_stored_images_with_working_links(s3_app: RunningApp, tmp_path: Path) -> None:
    gallery, result = generate(client(s3_app, tmp_path), "a paper boat", seed=1234, num_images=2)
    assert len(gallery) == 2 and [Path(item["image"]).suffix for item in gallery] == [".png", ".png"]
    records = result["images"]
    expected = {"id", "url", "seed", "prompt", "negative_prompt", "steps", "guidance_scale", "width", "height"}
    expected |= {"scheduler", "model", "created_at", "expires_at", "status"}
    assert all(expected <= set(record) for record in records)
    assert [record["seed"] for record in records] == [1234, 1235]
    assert {record["status"] for record in records} == {"stored"}
    response = requests.get(records[0]["url"], timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
    assert read_png_parameters(response.content).prompt == "a paper boat"
    assert Path(gallery[0]["image"]).read_bytes() == response.content


def test_history_pages_and_isolation(s3_app: RunningApp, tmp_path: Path) -> None:
    alice, bob = client(s3_app, tmp_path / "a"), client(s3_app, tmp_path / "b")
    for number in range(4):
        generate(alice, f"alice {number}", seed=number)
    generate(bob, "bob 0")
    _, first = alice.predict(1, api_name="/history")
    _, second = alice.predict(2, api_name="/history")
    assert [r["prompt"] for r in first["images"]] == ["alice 3", "alice 2", "alice 1"]
    assert (first["page"], first["has_more"]) == (1, True)
    assert [r["prompt"] for r in second["images"]] == ["alice 0"] and second["has_more"] is False
    _, bobs = bob.predict(1, api_name="/history")
    assert [r["prompt"] for r in bobs["images"]] == ["bob 0"]
    assert requests.get(first["images"][0]["url"], timeout=10).status_code == 200
    with pytest.raises(Exception, match="page: must be an integer from 1 to 10000"):
        alice.predict(0, api_name="/history")


def test_settings_from_a_record_reproduce_the_image(s3_app: RunningApp, tmp_path: Path) -> None:
    c = client(s3_app, tmp_path)
    _, result = generate(c, "a snowy pass", negative_prompt="fog", seed=-1, scheduler="DPM++ 2M")
    record = result["images"][0]
    assert 0 <= record["seed"] <= 2**32 - 1
    fields = {key: record[key] for key in ("negative_prompt", "seed", "steps", "guidance_scale", "width", "height")}
    _, again = generate(c, record["prompt"], **fields, scheduler=record["scheduler"])
    assert_same_image(fetch_pixels(record["url"]), fetch_pixels(again["images"][0]["url"]))


def test_concurrent_clients_are_batched_and_get_their_own_images(s3_app: RunningApp, tmp_path: Path) -> None:
    batches_before = s3_app.metric("sdapp_batch_size_images_count")
    images_before = s3_app.metric("sdapp_batch_size_images_sum")
    singles_before = s3_app.metric('sdapp_batch_size_images_bucket{le="1.0"}')
    outputs: dict[int, dict[str, Any]] = {}

    def one_client(number: int) -> None:
        _, result = generate(client(s3_app, tmp_path / str(number)), f"client {number}", seed=1000 + number, steps=8)
        outputs[number] = result

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outputs) == list(range(8))
    for number, result in outputs.items():
        (record,) = result["images"]
        assert (record["prompt"], record["seed"]) == (f"client {number}", 1000 + number)
        png = requests.get(record["url"], timeout=10).content
        assert read_png_parameters(png).seed == 1000 + number
    # With step batching (the default) each count is one UNet step: 8 requests x 8 steps alone
    # would be 64 single-image steps; shared steps carry several images.
    steps = s3_app.metric("sdapp_batch_size_images_count") - batches_before
    images = s3_app.metric("sdapp_batch_size_images_sum") - images_before
    singles = s3_app.metric('sdapp_batch_size_images_bucket{le="1.0"}') - singles_before
    assert images == 8 * 8, "every image-step counted once"
    assert singles < steps < 64, "some steps carried more than one image"


def _reaches_the_app(change: dict[str, Any], field: str) -> bool:
    """JSON cannot carry NaN or infinities, the API has no unknown fields, and a text box turns 42 into "42"."""
    values = list(change.values())
    return (
        field != "colour" and not any(isinstance(v, float) and not math.isfinite(v) for v in values) and values != [42]
    )


@pytest.mark.parametrize(("change", "field", "message"), [case for case in BAD_INPUTS if _reaches_the_app(*case[:2])])
def test_bad_input_is_rejected_by_name(
    s3_app: RunningApp, tmp_path: Path, change: dict[str, Any], field: str, message: str
) -> None:
    fields = {"prompt": "fine", "negative_prompt": "", "seed": 1, **FAST, "num_images": 1, **change}
    with pytest.raises(Exception, match=f"{field}: .*{re.escape(message)}"):
        client(s3_app, tmp_path).predict(**fields, api_name="/generate")


def test_bad_input_costs_no_gpu_work_and_others_still_succeed(s3_app: RunningApp, tmp_path: Path) -> None:
    image_steps_before = s3_app.metric("sdapp_batch_size_images_sum")
    invalid_before = s3_app.metric('sdapp_requests_total{outcome="invalid"}')
    good = client(s3_app, tmp_path / "good").submit(prompt="still works", **FAST, api_name="/generate")
    with pytest.raises(Exception, match=r"steps: must be from 1 to 100, got 0"):
        generate(client(s3_app, tmp_path / "bad"), "x", steps=0)
    assert good.result(timeout=60)[1]["images"][0]["prompt"] == "still works"
    assert s3_app.metric('sdapp_requests_total{outcome="invalid"}') == invalid_before + 1
    # Only the good request's 3 steps of one image ran on the model (one count per UNet step).
    assert s3_app.metric("sdapp_batch_size_images_sum") == image_steps_before + FAST["steps"]


def test_stop_cancels_only_the_callers_request(s3_app: RunningApp, tmp_path: Path) -> None:
    cancelled_before = s3_app.metric('sdapp_requests_total{outcome="cancelled"}')
    mine = client(s3_app, tmp_path / "mine").submit(prompt="mine", **{**SLOW, "steps": 60}, api_name="/generate")
    theirs = client(s3_app, tmp_path / "theirs").submit(prompt="theirs", **{**SLOW, "steps": 20}, api_name="/generate")
    wait_until(lambda: is_stepping(mine), timeout=120)  # cancelled while it runs, not while Gradio still queues it
    mine.cancel()
    assert theirs.result(timeout=120)[1]["images"][0]["prompt"] == "theirs"
    wait_until(lambda: s3_app.metric('sdapp_requests_total{outcome="cancelled"}') > cancelled_before, timeout=30)
    assert s3_app.metric('sdapp_requests_total{outcome="cancelled"}') == cancelled_before + 1


def test_metrics_move_with_real_traffic_and_pass_promtool(s3_app: RunningApp, tmp_path: Path) -> None:
    before = {
        name: s3_app.metric(name)
        for name in (
            'sdapp_requests_total{outcome="success"}',
            "sdapp_images_generated_total",
            "sdapp_request_duration_seconds_count",
            "sdapp_storage_upload_seconds_count",
            "sdapp_denoising_step_seconds_count",
        )
    }
    generate(client(s3_app, tmp_path), "metered", num_images=2)
    after = {name: s3_app.metric(name) for name in before}
    assert after['sdapp_requests_total{outcome="success"}'] == before['sdapp_requests_total{outcome="success"}'] + 1
    assert after["sdapp_images_generated_total"] == before["sdapp_images_generated_total"] + 2
    assert after["sdapp_request_duration_seconds_count"] == before["sdapp_request_duration_seconds_count"] + 1
    assert after["sdapp_storage_upload_seconds_count"] == before["sdapp_storage_upload_seconds_count"] + 2
    assert after["sdapp_denoising_step_seconds_count"] >= before["sdapp_denoising_step_seconds_count"] + 3
    assert s3_app.metric("sdapp_model_load_seconds") > 0
    exposition = requests.get(f"{s3_app.metrics_url}/metrics", timeout=10).text
    # A plain folder has no published version or hash (a model from S3 does: tests/test_rollout_app.py),
    # and the real device is not simulated (SD_SIMULATED_GPU).
    info = r'sdapp_model_info\{device="cpu",dtype="float32",family="sd",hash="",model="[^"]+",simulated="",version=""\}'
    assert re.search(info, exposition)
    assert "process_resident_memory_bytes" in exposition
    checked = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


UPLOAD_LIMIT = 300_000  # the s3 app's MAX_UPLOAD_BYTES
OVER_LIMIT = b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT)


def uploads_left(app: RunningApp, content: bytes) -> list[Path]:
    """Files holding ``content`` in the app's Gradio folder (where uploads land)."""
    folder = app.log_path.parent / "gradio"
    return [path for path in folder.rglob("*") if path.is_file() and path.read_bytes() == content]


def picture_file(folder: Path, name: str, content: bytes) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    return handle_file(str(folder / name))


def test_image_to_image_and_inpainting_through_the_api_equal_diffusers(
    s3_app: RunningApp, tiny_loaded: LoadedPipeline, tmp_path: Path
) -> None:
    """A picture and a mask sent with handle_file: the served PNG equals diffusers' pipelines, the
    inputs are stored behind links of their own (another client's history never shows them), the
    PNG says the strength, and the uploaded files are gone once the request is over."""
    start, mask = picture(seed=5), square_mask()
    c = client(s3_app, tmp_path)
    for fields in ({"strength": 0.6}, {"strength": 0.8, "mask": picture_file(tmp_path, "mask.png", mask)}):
        sent = {**fields, "init_image": picture_file(tmp_path, "start.png", start)}
        record = generate(c, "a red circle", seed=21, **sent)[1]["images"][0]
        wanted = check_inputs(
            {"prompt": "a red circle", "seed": 21, **FAST, "init_image": start, "strength": fields["strength"]}
            | ({"mask": mask} if "mask" in fields else {})
        )
        served = Image.open(io.BytesIO(requests.get(record["url"], timeout=10).content))
        assert_same_image(served.convert("RGB"), pipeline_image_from_picture(tiny_loaded, wanted)[0], tolerance=2)
        assert (
            read_png_parameters(requests.get(record["url"], timeout=10).content).denoising_strength
            == fields["strength"]
        )
        assert record["strength"] == fields["strength"]
        stored = fetch_pixels(record["init_image_url"])
        assert_same_image(stored, Image.open(io.BytesIO(start)).convert("RGB"))
        assert ("mask_url" in record) == ("mask" in fields)
        assert uploads_left(s3_app, start) == [] and uploads_left(s3_app, mask) == []
    others = client(s3_app, tmp_path / "other").predict(1, api_name="/history")[1]["images"]
    assert record["id"] not in {image["id"] for image in others}
    bare = record["init_image_url"].split("?")[0]
    assert requests.get(bare, timeout=10).status_code == 403  # private: the link's signature is the key


@pytest.mark.parametrize(
    ("pictures", "fields", "message"),
    [
        ({"init_image": b"just text, named like a picture"}, {}, r"init_image: must be a PNG, JPEG or WebP image"),
        ({"init_image": decompression_bomb_png()}, {}, r"init_image: must be at most \d+ pixels"),
        (
            {"init_image": b"\x89PNG\r\n\x1a\n" + bytes(UPLOAD_LIMIT)},
            {},
            rf"init_image: must be at most {UPLOAD_LIMIT} bytes",
        ),
        ({"mask": square_mask()}, {}, r"mask: needs an init_image"),
        ({"init_image": picture()}, {"strength": 0}, r"strength: must be a number greater than 0 and at most 1, got 0"),
        ({"init_image": picture()}, {"strength": 1.5}, r"strength: must be a number greater than 0 and at most 1"),
    ],
    ids=[
        "text-named-png",
        "30000x30000-png",
        "over-max-upload-bytes",
        "mask-without-image",
        "strength-0",
        "strength-1.5",
    ],
)
def test_a_bad_picture_is_refused_by_field_and_leaves_nothing_on_disk(
    s3_app: RunningApp, tmp_path: Path, pictures: dict[str, bytes], fields: dict[str, Any], message: str
) -> None:
    sent = {name: picture_file(tmp_path, f"{name}.png", content) for name, content in pictures.items()}
    with pytest.raises(Exception, match=message):
        generate(client(s3_app, tmp_path), "x", **sent, **fields)
    assert all(uploads_left(s3_app, content) == [] for content in pictures.values())
    assert generate(client(s3_app, tmp_path), "still serving")[1]["images"][0]["prompt"] == "still serving"


def test_the_upload_route_is_bounded_before_it_stores_anything(s3_app: RunningApp) -> None:
    """Past twice MAX_UPLOAD_BYTES a file is refused by the route itself (Gradio's limit, no field to name)."""
    too_big = b"\x89PNG\r\n\x1a\n" + bytes(2 * UPLOAD_LIMIT + 1)
    response = requests.post(s3_app.url + "gradio_api/upload", files={"files": ("big.png", too_big)}, timeout=30)
    assert response.status_code == 413
    assert uploads_left(s3_app, too_big) == []


def test_storage_outage_does_not_lose_images(s3_app: RunningApp, s3_server: S3Server, tmp_path: Path) -> None:
    c = client(s3_app, tmp_path)
    s3_server.stop()
    try:
        _, result = generate(c, "during the outage")
        assert result["images"][0]["status"] == "pending"
        assert s3_app.metric("sdapp_storage_uploads_pending") == 1

        def degraded_but_ready() -> bool:  # balancers keep sending traffic: the spool takes the images
            response = requests.get(f"{s3_app.metrics_url}/readyz", timeout=10)
            return response.status_code == 200 and "upload spool" in " ".join(response.json().get("details", []))

        wait_until(degraded_but_ready, timeout=30, interval=0.5)  # the storage check is cached for 5 s
    finally:
        s3_server.start()
    deadline = time.monotonic() + 60
    while s3_app.metric("sdapp_storage_uploads_pending") > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert requests.get(result["images"][0]["url"], timeout=10).status_code == 200
    _, history = c.predict(1, api_name="/history")
    assert history["images"][0]["prompt"] == "during the outage" and history["images"][0]["status"] == "stored"
    assert s3_app.metric('sdapp_storage_failures_total{operation="upload"}') >= 1


def test_a_front_end_started_during_an_s3_outage_serves_and_uploads_later(
    tiny_model_dir: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    """The spool exists for outages: starting in one is no reason to stop (it was exit code 2)."""
    s3_server.create_bucket("started-in-outage")
    env = {"S3_BUCKET": "started-in-outage", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    s3_server.stop()
    try:
        with launched_app(tiny_model_dir, tmp_path, env=env) as app:
            assert "starting degraded" in app.log_path.read_text()
            c = client(app, tmp_path)
            _, result = generate(c, "made while S3 was down")
            assert result["images"][0]["status"] == "pending"
            s3_server.start()
            wait_until(lambda: app.metric("sdapp_storage_uploads_pending") == 0, timeout=60, interval=0.5)
            assert requests.get(result["images"][0]["url"], timeout=10).status_code == 200
            _, history = c.predict(1, api_name="/history")
            assert [(image["prompt"], image["status"]) for image in history["images"]] == [
                ("made while S3 was down", "stored")
            ]
    finally:
        s3_server.start()  # for the tests after this one, whatever happened


def test_a_missing_bucket_still_stops_start_up(tiny_model_dir: Path, s3_server: S3Server, tmp_path: Path) -> None:
    """A wrong setting is not an outage: one clear line, exit code 2."""
    environment = {**os.environ, "S3_BUCKET": "no-such-bucket", "S3_ENDPOINT_URL": s3_server.endpoint_url}
    finished = subprocess.run(
        [sys.executable, "app.py", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT,
        env={**environment, "S3_REGION": "us-east-1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 2 and "no-such-bucket" in finished.stderr and "not usable" in finished.stderr


def test_sigterm_while_busy_loses_nothing(tiny_model_dir: Path, s3_server: S3Server, tmp_path: Path) -> None:
    s3_server.create_bucket("sigterm")
    env = {"S3_BUCKET": "sigterm", "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_REGION": "us-east-1"}
    env["SHUTDOWN_LINGER"] = "3"  # the clients fetch their results while the app stops
    with launched_app(tiny_model_dir, tmp_path, env=env) as app:
        steps_before = app.metric("sdapp_denoising_step_seconds_count")  # the warm-up ran one
        jobs = [
            client(app, tmp_path / str(n)).submit(prompt=f"term {n}", **{**SLOW, "steps": 60}, api_name="/generate")
            for n in range(3)
        ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # all three queued or running, one batch under way
            accepted = app.metric("sdapp_queue_wait_seconds_count") + app.metric("sdapp_queue_depth")
            if accepted >= 3 and app.metric("sdapp_denoising_step_seconds_count") > steps_before:
                break
            time.sleep(0.05)
        app.process.send_signal(15)

        def draining() -> bool:  # the balancer is told at once, while the work still runs
            answer = requests.get(f"{app.metrics_url}/readyz", timeout=5)
            return answer.status_code == 503 and "shutting down" in answer.json()["reasons"]

        wait_until(draining, timeout=30, interval=0.05)
        assert not any(job.done() for job in jobs)
        results = [job.result(timeout=120) for job in jobs]
        assert app.process.wait(timeout=60) == 0
    assert sorted(r[1]["images"][0]["prompt"] for r in results) == ["term 0", "term 1", "term 2"]
    listed = boto3.client("s3", endpoint_url=s3_server.endpoint_url).list_objects_v2(Bucket="sigterm")
    assert sum(item["Key"].endswith(".png") for item in listed.get("Contents", [])) == 3


@pytest.fixture(scope="module")
def local_auth_app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    folder = tmp_path_factory.mktemp("auth-app")
    (folder / "users").write_text("alice:wonderland\n# comment\nbob:the-builder\n")
    args = ["--auth-file", str(folder / "users"), "--queue-max-size", "2"]
    with launched_app(tiny_model_dir, folder, args=args) as app:
        yield app


def test_users_with_auth_see_only_their_history(local_auth_app: RunningApp, tmp_path: Path) -> None:
    alice = client(local_auth_app, tmp_path / "a", auth=("alice", "wonderland"))
    generate(alice, "alice's secret")
    alice_again = client(local_auth_app, tmp_path / "a2", auth=("alice", "wonderland"))
    _, mine = alice_again.predict(1, api_name="/history")
    assert [r["prompt"] for r in mine["images"]] == ["alice's secret"]
    bob = client(local_auth_app, tmp_path / "b", auth=("bob", "the-builder"))
    assert bob.predict(1, api_name="/history")[1]["images"] == []
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the point is no access
        client(local_auth_app, tmp_path / "x", auth=("alice", "wrong"))


def test_local_links_are_signed(local_auth_app: RunningApp, tmp_path: Path) -> None:
    alice = client(local_auth_app, tmp_path, auth=("alice", "wonderland"))
    _, result = generate(alice, "local file")
    url = result["images"][0]["url"]
    assert url.startswith(local_auth_app.url + "files/owners/")
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert requests.get(tampered, timeout=10).status_code == 403
    key, _, query = url.partition("?")
    records = key.replace("/images/", "/records/").replace(".png", ".json") + "?" + query
    assert requests.get(records, timeout=10).status_code == 404  # not an image key at all
    image_id = key.rsplit("/", 1)[1].removesuffix(".png")
    arabic_digit = image_id.replace("0", "\u0660", 1) if "0" in image_id else "\u0660" + image_id[1:]
    assert requests.get(key.replace(image_id, arabic_digit) + "?" + query, timeout=10).status_code == 404
    superscript = query.replace("expires=", "expires=\u00b2", 1)  # a digit to str.isdigit, not to int()
    assert requests.get(key + "?" + superscript, timeout=10).status_code == 403
    huge_expiry = query.replace("expires=", "expires=" + "9" * 5000, 1)  # past int()'s digit limit
    assert requests.get(key + "?" + huge_expiry, timeout=10).status_code == 403
    foreign_signature = re.sub(r"signature=[^&]*", "signature=%C3%A9t%C3%A9", query)  # non-ASCII
    assert requests.get(key + "?" + foreign_signature, timeout=10).status_code == 403
    assert requests.get(
        local_auth_app.url + "files/../../etc/passwd?expires=9999999999&signature=x", timeout=10
    ).status_code in (403, 404)


def test_full_queue_answers_fast(local_auth_app: RunningApp, tmp_path: Path) -> None:
    clients = [client(local_auth_app, tmp_path / str(n), auth=("bob", "the-builder")) for n in range(3)]
    running = [c.submit(prompt=f"fill {n}", **SLOW, api_name="/generate") for n, c in enumerate(clients[:2])]
    wait_until(lambda: all(is_stepping(job) or is_waiting(job) for job in running), timeout=60)  # both in the queue
    with pytest.raises(Exception, match="busy"):
        clients[2].predict(prompt="one too many", **FAST, api_name="/generate")
    assert not any(job.done() for job in running)  # refused at once, not after the queue drained
    for job in running:
        job.cancel()


def test_help_lists_settings_and_bad_settings_fail_in_one_line() -> None:
    shown = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    for name in ("SD_MODEL", "HOST", "PORT", "METRICS_PORT", "DATA_DIR", "S3_BUCKET", "S3_PREFIX", "S3_ENDPOINT_URL"):
        assert name in shown.stdout
    for name in ("S3_PUBLIC_ENDPOINT_URL", "LINK_TTL_SECONDS", "QUEUE_MAX_SIZE", "MAX_BATCH_SIZE", "AUTH_FILE"):
        assert name in shown.stdout
    bad = subprocess.run(
        [sys.executable, "app.py", "--link-ttl-seconds", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: invalid setting LINK_TTL_SECONDS")


def test_only_the_apps_own_files_are_served(s3_app: RunningApp) -> None:
    monitoring = requests.get(s3_app.url + "monitoring", timeout=10)  # Gradio's monitoring page is off
    assert monitoring.status_code in (403, 404) and "not enabled" in monitoring.text.lower()
    for path in ("gradio_api/file=/etc/passwd", f"gradio_api/file={ROOT / 'app.py'}"):
        assert requests.get(s3_app.url + path, timeout=10).status_code in (403, 404), path


def test_gallery_files_are_not_served_by_path(s3_app: RunningApp, tmp_path: Path) -> None:
    gallery, result = generate(client(s3_app, tmp_path), "private file")
    image_id = result["images"][0]["id"]
    direct = f"{s3_app.url}gradio_api/file={tempfile.gettempdir()}/sd-service-gallery/{image_id}.png"
    assert requests.get(direct, timeout=10).status_code in (403, 404)
    assert Path(gallery[0]["image"]).stat().st_size > 0  # the client still got its copy through Gradio's cache


def test_one_client_flooding_is_limited_and_others_are_served(s3_app: RunningApp, tmp_path: Path) -> None:
    flooder = client(s3_app, tmp_path / "flood")  # one gradio_client session: one owner
    long = {**SLOW, "width": 128, "height": 128}
    flood = [flooder.submit(prompt=f"flood {n}", **long, api_name="/generate") for n in range(4)]
    wait_until(lambda: s3_app.metric("sdapp_requests_in_progress") >= 4, timeout=60)
    with pytest.raises(Exception, match="you already have 4 requests in progress"):
        generate(flooder, "one too many")
    _, served = generate(client(s3_app, tmp_path / "page"), "someone else")
    assert served["images"][0]["prompt"] == "someone else"
    assert not all(job.done() for job in flood)  # the flood was still running when the other user got served
    for job in flood:
        job.cancel()
