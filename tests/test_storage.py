"""Storage against a real S3 API over HTTP (moto server on loopback), and the local backend."""

from __future__ import annotations

import datetime as dt
import errno
import io
import multiprocessing
import os
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pydantic import ValidationError

from harness.servers import S3Server
from sd_pipeline.contract.request import check_inputs
from sd_pipeline.contract.settings import PipelineSettings
from sd_pipeline.model.engine import StepEngine
from sd_pipeline.model.loading import load_pipeline
from sd_pipeline.png import encode_png, read_png_parameters
from storage import keys
from storage.base import SpoolFullError, StorageError, StorageFullError, StorageUnreachableError
from storage.local import LINK_ROUTE, ForbiddenLinkError, LocalStore, load_or_create_secret
from storage.records import ImageRecord, InputPictures
from storage.s3 import S3Settings, S3Store
from storage.spool import Spool, SpoolingStore, SpoolLimits

OWNER = keys.owner_key("alice")
OTHER = keys.owner_key("bob")


def make_record(owner: str, *, when: dt.datetime | None = None, prompt: str = "a cat") -> ImageRecord:
    created = when or dt.datetime.now(dt.UTC)
    return ImageRecord(
        id=keys.new_image_id(created),
        owner=owner,
        created_at=created.isoformat(),
        prompt=prompt,
        negative_prompt="",
        seed=1,
        steps=2,
        guidance_scale=7.5,
        width=64,
        height=64,
        scheduler="Euler",
        model="tiny",
    )


def small_png(shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def s3_store(server: S3Server, bucket: str, **overrides: object) -> S3Store:
    settings = S3Settings(bucket=bucket, endpoint_url=server.endpoint_url, region="us-east-1", **overrides)
    return S3Store.from_settings(settings)


def test_saved_image_link_serves_identical_png(engine: StepEngine, s3_server: S3Server, bucket: str) -> None:
    result = engine.generate([check_inputs({"prompt": "a kite", "seed": 3, "steps": 2, "width": 64, "height": 64})])
    png = encode_png(result[0][0])
    store = s3_store(s3_server, bucket, prefix="sd/")
    saved = store.save(png, make_record(OWNER))
    assert saved.record.status == "stored"
    response = requests.get(saved.link.url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    assert response.content == png
    assert read_png_parameters(response.content).seed == 3
    assert "a kite" not in saved.link.url and "alice" not in saved.link.url
    assert saved.link.url.startswith(f"{s3_server.endpoint_url}/{bucket}/sd/owners/{OWNER}/images/")


def test_the_image_is_uploaded_before_its_record(s3_server: S3Server, bucket: str) -> None:
    """A failure (or a kill) between the two uploads never leaves a history entry without its picture."""
    store = s3_store(s3_server, bucket)

    def refuse_images(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].endswith(".png"):
            raise ConnectionError("the image upload failed")

    store.client.meta.events.register("provide-client-params.s3.PutObject", refuse_images)
    with pytest.raises(ConnectionError):
        store.put(small_png(), make_record(OWNER))
    store._pool.shutdown(wait=True)  # let any upload still running in the store's threads finish
    listed = store.client.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert listed == []


def test_bucket_stays_private(s3_server: S3Server, bucket: str) -> None:
    store = s3_store(s3_server, bucket)
    saved = store.save(small_png(), make_record(OWNER))
    unsigned = saved.link.url.split("?", 1)[0]
    assert requests.get(unsigned, timeout=10).status_code == 403


def test_history_pages_newest_first(s3_server: S3Server, bucket: str) -> None:
    store = s3_store(s3_server, bucket)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for minute in range(7):
        store.save(
            small_png(minute), make_record(OWNER, when=start + dt.timedelta(minutes=minute), prompt=f"p{minute}")
        )
    pages = [store.history(OWNER, page=page, page_size=3) for page in (1, 2, 3, 4)]
    assert [[i.record.prompt for i in p.images] for p in pages] == [["p6", "p5", "p4"], ["p3", "p2", "p1"], ["p0"], []]
    assert [p.has_more for p in pages] == [True, True, False, False]
    assert all(requests.get(i.link.url, timeout=10).status_code == 200 for i in pages[0].images)


def test_owners_are_isolated(s3_server: S3Server, bucket: str) -> None:
    store = s3_store(s3_server, bucket)
    store.save(small_png(), make_record(OWNER, prompt="alice's"))
    store.save(small_png(), make_record(OTHER, prompt="bob's"))
    assert [i.record.prompt for i in store.history(OWNER, page=1, page_size=10).images] == ["alice's"]
    assert [i.record.prompt for i in store.history(OTHER, page=1, page_size=10).images] == ["bob's"]
    with pytest.raises(ValueError, match="owner"):
        store.history("../" + OTHER, page=1, page_size=10)


def test_first_page_costs_requests_in_proportion_to_page_size(s3_server: S3Server, bucket: str) -> None:
    store = s3_store(s3_server, bucket)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for second in range(1500):  # more than one S3 listing page (1000 keys)
        record = make_record(OWNER, when=start + dt.timedelta(seconds=second))
        store.client.put_object(
            Bucket=bucket, Key=keys.record_key("", OWNER, record.id), Body=record.model_dump_json().encode()
        )
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    page = store.history(OWNER, page=1, page_size=12)
    assert len(page.images) == 12 and page.has_more
    assert len(sent) == 1 + 12  # one listing, one GET per record
    assert page.images[0].record.created_at > page.images[-1].record.created_at


def test_link_lifetime_is_validated_and_enforced(s3_server: S3Server, bucket: str) -> None:
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValidationError, match="link_ttl_seconds"):
            S3Settings(bucket=bucket, link_ttl_seconds=bad)
    store = s3_store(s3_server, bucket, link_ttl_seconds=90)
    saved = store.save(small_png(), make_record(OWNER))
    now = dt.datetime.now(dt.UTC)
    assert now + dt.timedelta(seconds=85) <= saved.link.expires_at <= now + dt.timedelta(seconds=91)
    query = parse_qs(urlparse(saved.link.url).query)  # moto does not enforce expiry; S3 does, from these
    assert query["X-Amz-Expires"] == ["90"] and query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    signed_at = dt.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    assert abs((signed_at - now).total_seconds()) < 5
    time.sleep(1.1)
    fresh = store.link(OWNER, saved.record.id)
    assert fresh.url != saved.link.url and fresh.expires_at > saved.link.expires_at
    assert requests.get(fresh.url, timeout=10).status_code == 200


def test_public_endpoint_is_used_only_for_links(s3_server: S3Server, bucket: str) -> None:
    store = s3_store(s3_server, bucket, public_endpoint_url="https://images.example.org")
    saved = store.save(small_png(), make_record(OWNER))
    assert saved.link.url.startswith(f"https://images.example.org/{bucket}/owners/")


def test_missing_bucket_error_names_bucket_and_endpoint_not_secrets(s3_server: S3Server) -> None:
    store = s3_store(s3_server, "no-such-bucket-here")
    with pytest.raises(StorageError) as raised:
        store.check()
    assert not isinstance(raised.value, StorageUnreachableError)  # a setting to fix: start-up stops
    message = str(raised.value)
    assert "no-such-bucket-here" in message and s3_server.endpoint_url in message
    assert "test-secret-key" not in message and "test-access-key" not in message
    creating = s3_store(s3_server, "created-on-demand", create_bucket=True)
    creating.check()  # made here
    creating.check()  # and found the second time
    assert "created-on-demand" in [b["Name"] for b in creating.client.list_buckets()["Buckets"]]


def test_unreachable_endpoint_is_a_clear_error() -> None:
    settings = S3Settings(bucket="b-b-b", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=0.5)
    with pytest.raises(StorageUnreachableError, match=r"bucket 'b-b-b' at http://127.0.0.1:9 is unreachable"):
        S3Store.from_settings(settings).check()  # an outage (the app starts degraded), not a wrong setting


def wait_until(condition: object, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_outage_spools_then_uploads_everything(tmp_path: Path) -> None:
    server = S3Server()
    server.start()
    server.create_bucket("outage")
    store = SpoolingStore(
        s3_store(server, "outage", max_attempts=1, connect_timeout=0.5, read_timeout=1),
        Spool(tmp_path / "spool"),
        min_backoff=0.2,
        max_backoff=1.0,
    )
    store.start()
    try:
        server.stop()
        saved = [store.save(small_png(n), make_record(OWNER, prompt=f"outage {n}")) for n in range(5)]
        assert [s.record.status for s in saved] == ["pending"] * 5
        with pytest.raises(StorageError):  # S3 is down: history says so clearly
            store.history(OWNER, page=1, page_size=10)
        server.start()
        assert wait_until(lambda: not store.spool.entries(), timeout=20)
        history = store.history(OWNER, page=1, page_size=10)
        assert sorted(i.record.prompt for i in history.images) == [f"outage {n}" for n in range(5)]
        assert {i.record.status for i in history.images} == {"stored"}
        for item in saved:  # the links handed out while S3 was down now work
            assert requests.get(item.link.url, timeout=10).status_code == 200
    finally:
        store.close(flush_timeout=1)
        server.stop()


def test_restart_with_a_full_spool_drains_it(tmp_path: Path) -> None:
    server = S3Server()
    server.start()
    server.create_bucket("drain")
    server.stop()
    spool_dir = tmp_path / "spool"
    first = SpoolingStore(s3_store(server, "drain", max_attempts=1, connect_timeout=0.5), Spool(spool_dir))
    first.start()
    for n in range(3):
        first.save(small_png(n), make_record(OWNER, prompt=f"kept {n}"))
    first.close(flush_timeout=0.5)  # S3 still down: everything stays on disk
    assert len(list(spool_dir.iterdir())) == 3
    server.start()
    try:
        second = SpoolingStore(s3_store(server, "drain"), Spool(spool_dir), min_backoff=0.1)
        second.start()
        assert wait_until(lambda: not second.spool.entries(), timeout=20)
        assert len(second.history(OWNER, page=1, page_size=10).images) == 3
        second.close()
    finally:
        server.stop()


def test_full_spool_fails_clearly(tmp_path: Path) -> None:
    settings = S3Settings(bucket="down", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=0.2)
    store = SpoolingStore(S3Store.from_settings(settings), Spool(tmp_path, limits=SpoolLimits(max_items=2)))
    store.save(small_png(), make_record(OWNER))
    store.save(small_png(), make_record(OWNER))
    with pytest.raises(SpoolFullError, match="spool is full"):
        store.save(small_png(), make_record(OWNER))
    assert len(store.spool.entries()) == 2
    assert [r.status for r in store.spool.pending_for(OWNER)] == ["pending", "pending"]


def test_local_store_signed_links(tmp_path: Path) -> None:
    secret = load_or_create_secret(tmp_path)
    assert (tmp_path / ".link-secret").stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(tmp_path) == secret
    store = LocalStore(tmp_path, secret=secret, link_ttl_seconds=60, base_url="http://app")
    saved = store.save(small_png(), make_record(OWNER))
    path_and_query = saved.link.url.removeprefix("http://app/files/")
    key, query = path_and_query.split("?")
    params = dict(pair.split("=") for pair in query.split("&"))
    assert store.open_signed(key, **params).read_bytes() == small_png()
    with pytest.raises(ForbiddenLinkError):
        store.open_signed(key, expires=params["expires"], signature="0" * 64)
    with pytest.raises(ForbiddenLinkError):
        store.open_signed(key, expires=str(int(params["expires"]) + 1), signature=params["signature"])
    for expires, signature in (("9" * 5000, params["signature"]), (params["expires"], "été" * 21 + "x")):
        with pytest.raises(ForbiddenLinkError):  # past int()'s digit limit; a non-ASCII signature
            store.open_signed(key, expires=expires, signature=signature)
    expired = LocalStore(tmp_path, secret=secret, link_ttl_seconds=-1).link(OWNER, saved.record.id)
    e_key, e_query = expired.url.removeprefix("/files/").split("?")
    with pytest.raises(ForbiddenLinkError, match="expired"):
        store.open_signed(e_key, **dict(pair.split("=") for pair in e_query.split("&")))


def test_local_store_refuses_traversal(tmp_path: Path) -> None:
    secret = load_or_create_secret(tmp_path / "data")
    (tmp_path / "secret.txt").write_text("top secret")
    store = LocalStore(tmp_path / "data", secret=secret, link_ttl_seconds=60)
    expires = str(int(time.time()) + 60)
    for key in (
        "../secret.txt",
        "owners/../../secret.txt",
        f"owners/{OWNER}/images/../../../../secret.txt",
        ".link-secret",
    ):
        signature = store._sign(key, int(expires))  # even a correctly signed bad key is refused
        with pytest.raises(ForbiddenLinkError):
            store.open_signed(key, expires=expires, signature=signature)


def test_local_history_matches_s3_layout(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, secret=b"k" * 32, link_ttl_seconds=60)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for minute in range(3):
        store.save(small_png(), make_record(OWNER, when=start + dt.timedelta(minutes=minute), prompt=f"p{minute}"))
    page = store.history(OWNER, page=1, page_size=2)
    assert [i.record.prompt for i in page.images] == ["p2", "p1"] and page.has_more
    assert store.history(OTHER, page=1, page_size=2).images == []
    assert (tmp_path / "objects" / "owners" / OWNER / "images").is_dir()


def flagging_safety_checker() -> tuple[Any, Any]:
    """diffusers' own safety checker, tiny and random, with thresholds every picture exceeds; and its
    feature extractor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine similarity is at least -1: every concept scores
    features = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker.eval(), features


def test_the_safety_checker_blanks_flagged_images_and_their_records_say_so(tiny_model_dir: Path) -> None:
    """The engine runs the pipeline's safety checker on every decoded batch: a flagged image is black
    and marked, in its result and its stored record."""
    loaded = load_pipeline(PipelineSettings(model=str(tiny_model_dir), device="cpu"))
    plain = StepEngine(loaded).generate([check_inputs({"prompt": "flag", "steps": 2, "width": 64, "height": 64})])
    assert plain[0][0].nsfw is False and np.asarray(plain[0][0].image).max() > 0
    loaded.pipeline.safety_checker, loaded.pipeline.feature_extractor = flagging_safety_checker()
    requests = [check_inputs({"prompt": "flag", "steps": 2, "width": 64, "height": 64, "num_images": 2})]
    (results,) = StepEngine(loaded).generate(requests)
    assert [result.nsfw for result in results] == [True, True]
    assert all(np.asarray(result.image).max() == 0 for result in results)  # blanked
    record = ImageRecord.from_result(
        results[0], image_id="0" * 13 + "-" + "0" * 12, owner=OWNER, created_at=dt.datetime.now(dt.UTC)
    )
    assert record.nsfw is True
    assert read_png_parameters(encode_png(results[0])).prompt == "flag"


class CountingObserver:
    def __init__(self) -> None:
        self.uploads = 0
        self.failures: list[str] = []

    def upload(self, *, seconds: float) -> None:
        self.uploads += 1

    def failure(self, *, operation: str) -> None:
        self.failures.append(operation)

    def pending(self, *, count: int) -> None:
        pass


def other_front_end(spool_dir: str, endpoint_url: str, stop: Any, uploads: Any) -> None:
    """A second front end's uploader, in a process of its own, on the same spool folder."""
    observer = CountingObserver()
    settings = S3Settings(
        bucket="shared", endpoint_url=endpoint_url, max_attempts=1, connect_timeout=0.3, read_timeout=1
    )
    store = SpoolingStore(
        S3Store.from_settings(settings), Spool(Path(spool_dir)), observer=observer, min_backoff=0.05, max_backoff=0.3
    )
    store.start()
    for number in range(10):
        store.save(small_png(number), make_record(OTHER, prompt=f"other {number}"))
    stop.wait()
    uploads.put((observer.uploads, store._thread.is_alive()))
    store.close(flush_timeout=1)


def test_two_front_ends_on_one_spool_upload_every_image_once_through_two_outages(tmp_path: Path) -> None:
    server = S3Server()
    server.start()
    server.create_bucket("shared")
    server.stop()  # S3 is down from the start: everything goes to the shared spool
    spool_dir = tmp_path / "data" / "spool"
    observer = CountingObserver()
    settings = S3Settings(
        bucket="shared", endpoint_url=server.endpoint_url, max_attempts=1, connect_timeout=0.3, read_timeout=1
    )
    store = SpoolingStore(
        S3Store.from_settings(settings), Spool(spool_dir), observer=observer, min_backoff=0.05, max_backoff=0.3
    )
    store.start()
    context = multiprocessing.get_context("spawn")
    stop, uploads = context.Event(), context.Queue()
    other = context.Process(target=other_front_end, args=(str(spool_dir), server.endpoint_url, stop, uploads))
    other.start()
    try:
        for number in range(10):
            store.save(small_png(number), make_record(OWNER, prompt=f"mine {number}"))
        assert wait_until(lambda: len(store.spool.entries()) == 20, timeout=60)
        assert store.check() is None and store.degraded() is not None  # can serve; S3 down is a detail
        server.start()
        assert wait_until(lambda: not store.spool.entries(), timeout=60)
        server.stop()  # the second outage: both uploaders still work
        for number in range(10, 15):
            store.save(small_png(number), make_record(OWNER, prompt=f"mine {number}"))
        server.start()
        assert wait_until(lambda: not store.spool.entries(), timeout=60)
        stop.set()
        other_uploads, other_alive = uploads.get(timeout=60)
        other.join(timeout=60)
        assert other_alive and store._thread.is_alive()  # no uploader died of the other's work
        assert observer.uploads + other_uploads == 25  # every image uploaded exactly once
        assert len(store.history(OWNER, page=1, page_size=50).images) == 15
        assert len(store.history(OTHER, page=1, page_size=50).images) == 10
    finally:
        stop.set()
        other.join(timeout=10)
        store.close(flush_timeout=1)
        server.stop()


def test_the_uploader_outlives_unexpected_errors(tmp_path: Path, s3_server: S3Server, bucket: str) -> None:
    observer = CountingObserver()
    store = SpoolingStore(
        s3_store(s3_server, bucket), Spool(tmp_path / "spool"), observer=observer, min_backoff=0.05, max_backoff=0.2
    )
    real_put, calls = store.primary.put, []

    def put(png: bytes, record: ImageRecord, inputs: InputPictures | None = None) -> None:
        calls.append(record.id)
        if len(calls) <= 2:
            raise RuntimeError("a bug, not an S3 error")
        real_put(png, record, inputs)

    store.primary.put = put  # type: ignore[method-assign]
    store._healthy = False  # as after a failed upload: new images go to the spool
    store.start()
    try:
        store.save(small_png(), make_record(OWNER))
        assert wait_until(lambda: not store.spool.entries(), timeout=20)
        assert store._thread.is_alive() and observer.failures.count("upload") >= 2 and observer.uploads == 1
    finally:
        store.close(flush_timeout=1)


def test_a_starting_front_end_keeps_another_ones_write_in_progress(tmp_path: Path) -> None:
    fresh, stale = tmp_path / ".tmp-fresh", tmp_path / ".tmp-stale"
    fresh.mkdir()
    stale.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    Spool(tmp_path)
    assert fresh.exists() and not stale.exists()


def test_readiness_needs_room_in_the_spool_not_s3(tmp_path: Path) -> None:
    settings = S3Settings(bucket="down", endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout=0.2)
    store = SpoolingStore(S3Store.from_settings(settings), Spool(tmp_path, limits=SpoolLimits(max_items=1)))
    store.check()  # S3 down, spool empty: this front end can serve
    detail = store.degraded()
    assert detail is not None and "unreachable" in detail and "upload spool (0 waiting)" in detail
    store.save(small_png(), make_record(OWNER))
    with pytest.raises(SpoolFullError, match=r"spool .* is full"):
        store.check()


def test_an_empty_or_short_secret_file_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / ".link-secret").write_bytes(b"")  # as an interrupted first start could once leave it
    with pytest.raises(StorageError, match="0 bytes, fewer than 32"):
        load_or_create_secret(tmp_path)
    fresh = tmp_path / "fresh"
    assert len(load_or_create_secret(fresh)) == 32 and sorted(p.name for p in fresh.iterdir()) == [".link-secret"]


def test_owner_keys_are_keyed_with_the_shared_secret() -> None:
    keyed = keys.owner_key("user:alice", b"k" * 32)
    assert keyed != keys.owner_key("user:alice") and keyed != keys.owner_key("user:alice", b"j" * 32)
    assert keyed == keys.owner_key("user:alice", b"k" * 32) and keys.OWNER_PATTERN.fullmatch(keyed)


@pytest.mark.parametrize("backend", ["s3", "local"])
def test_an_earlier_history_moves_to_the_new_owner_key(
    backend: str, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    earlier, owner = keys.owner_key("user:alice"), keys.owner_key("user:alice", b"k" * 32)
    store: S3Store | LocalStore = (
        s3_store(s3_server, bucket)
        if backend == "s3"
        else LocalStore(tmp_path, secret=b"s" * 32, link_ttl_seconds=60, base_url="http://app")
    )
    for number in range(3):
        store.save(small_png(number), make_record(earlier, prompt=f"old {number}"))
    assert store.adopt(earlier, owner) == 3
    moved = store.history(owner, page=1, page_size=10).images
    assert sorted(image.record.prompt for image in moved) == ["old 0", "old 1", "old 2"]
    assert {image.record.owner for image in moved} == {owner}
    assert store.fetch(owner, moved[0].record.id).startswith(b"\x89PNG")
    assert store.history(earlier, page=1, page_size=10).images == []
    assert store.adopt(earlier, owner) == 0  # nothing left: a second view costs one listing


def test_an_interrupted_local_adoption_is_finished_by_the_next(tmp_path: Path) -> None:
    """Killed after moving an image and before writing its record: the next adoption goes on."""
    earlier, owner = keys.owner_key("user:alice"), keys.owner_key("user:alice", b"k" * 32)
    store = LocalStore(tmp_path, secret=b"s" * 32, link_ttl_seconds=60, base_url="http://app")
    saved = [store.save(small_png(number), make_record(earlier, prompt=f"old {number}")) for number in range(3)]
    interrupted = saved[1].record.id  # what the kill left: its image moved, its record not yet
    moved_image = store._path(keys.image_key("", owner, interrupted))
    moved_image.parent.mkdir(parents=True)
    store._path(keys.image_key("", earlier, interrupted)).replace(moved_image)
    assert store.adopt(earlier, owner) == 3
    moved = store.history(owner, page=1, page_size=10).images
    assert sorted(image.record.prompt for image in moved) == ["old 0", "old 1", "old 2"]
    assert all(store.fetch(owner, image.record.id) == small_png(n) for n, image in enumerate(reversed(moved)))
    assert store.history(earlier, page=1, page_size=10).images == []


def test_a_full_disk_is_a_clear_storage_full_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool = Spool(tmp_path / "spool")
    monkeypatch.setattr("storage.spool.write_synced", no_space)
    with pytest.raises(StorageFullError, match=r"storage full: no space left in .*spool"):
        spool.put(small_png(), make_record(OWNER))
    assert list((tmp_path / "spool").iterdir()) == []  # no half-written entry left behind
    local = LocalStore(tmp_path / "data", secret=b"s" * 32, link_ttl_seconds=60)
    monkeypatch.setattr("storage.local.write_atomic", no_space)
    with pytest.raises(StorageFullError, match="storage full"):
        local.save(small_png(), make_record(OWNER))


def test_front_ends_starting_together_on_one_folder_share_one_secret(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        made = list(pool.map(lambda _: load_or_create_secret(tmp_path, ".app-secret"), range(8)))
    assert len(set(made)) == 1 and len(made[0]) == 32
    assert sorted(path.name for path in tmp_path.iterdir()) == [".app-secret"]  # no temporary left behind


def test_input_pictures_are_stored_private_beside_their_images_and_move_with_them(s3_server: S3Server) -> None:
    """Two images made from one picture and mask: the pictures are stored once, behind presigned links
    like the images (no link, no read), and an adoption moves them with the records that name them."""
    s3_server.create_bucket("inputs")
    store = s3_store(s3_server, "inputs", prefix="sd/")
    earlier, owner = keys.owner_key("user:alice"), keys.owner_key("user:alice", b"k" * 32)
    picture_id, mask_id = keys.new_image_id(dt.datetime.now(dt.UTC)), keys.new_image_id(dt.datetime.now(dt.UTC))
    inputs = {picture_id: small_png(10), mask_id: small_png(20)}
    records = [
        make_record(earlier, prompt=f"inpainted {n}").model_copy(update={"init_image": picture_id, "mask": mask_id})
        for n in range(2)
    ]
    store.save(small_png(1), records[0], inputs)
    store.save(small_png(2), records[1])
    assert requests.get(store.link(earlier, picture_id).url, timeout=10).content == small_png(10)
    bare = f"{s3_server.endpoint_url}/inputs/sd/owners/{earlier}/images/{picture_id}.png"
    assert requests.get(bare, timeout=10).status_code == 403  # private: only the signed link reads it
    assert store.adopt(earlier, owner) == 2
    assert store.fetch(owner, picture_id) == small_png(10) and store.fetch(owner, mask_id) == small_png(20)
    with pytest.raises(StorageError):
        store.fetch(earlier, picture_id)


def test_input_pictures_wait_in_the_spool_with_their_image_through_an_outage(tmp_path: Path) -> None:
    server = S3Server()
    server.start()
    server.create_bucket("outage-inputs")
    store = SpoolingStore(
        s3_store(server, "outage-inputs", max_attempts=1, connect_timeout=0.5, read_timeout=1),
        Spool(tmp_path / "spool"),
        min_backoff=0.2,
        max_backoff=1.0,
    )
    store.start()
    try:
        server.stop()
        picture_id = keys.new_image_id(dt.datetime.now(dt.UTC))
        record = make_record(OWNER).model_copy(update={"init_image": picture_id})
        assert store.save(small_png(1), record, {picture_id: small_png(30)}).record.status == "pending"
        server.start()
        assert wait_until(lambda: not store.spool.entries(), timeout=20)
        assert store.fetch(OWNER, picture_id) == small_png(30)
        assert store.fetch(OWNER, record.id) == small_png(1)
    finally:
        store.close(flush_timeout=1)
        server.stop()


def test_local_input_pictures_are_behind_signed_links_and_move_with_their_image(tmp_path: Path) -> None:
    earlier, owner = keys.owner_key("user:alice"), keys.owner_key("user:alice", b"k" * 32)
    store = LocalStore(tmp_path, secret=b"s" * 32, link_ttl_seconds=60, base_url="http://app")
    picture_id = keys.new_image_id(dt.datetime.now(dt.UTC))
    record = make_record(earlier).model_copy(update={"init_image": picture_id})
    store.save(small_png(1), record, {picture_id: small_png(40)})
    link = urllib.parse.urlsplit(store.link(earlier, picture_id).url)
    key, query = link.path.removeprefix(LINK_ROUTE + "/"), dict(urllib.parse.parse_qsl(link.query))
    assert store.open_signed(key, **query).read_bytes() == small_png(40)
    with pytest.raises(ForbiddenLinkError):
        store.open_signed(key, expires=query["expires"], signature="0" * 64)
    assert store.adopt(earlier, owner) == 1
    assert store.fetch(owner, picture_id) == small_png(40)
