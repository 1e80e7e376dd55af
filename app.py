"""Wire the parts together and serve: ``python app.py --help`` lists every setting."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from monitoring.health import Health
from monitoring.metrics import Metrics
from monitoring.server import MetricsServer
from sd_pipeline.admission import Admission
from sd_pipeline.contract.backend import Backend, BackendInfo
from sd_pipeline.contract.errors import ModelLoadError
from sd_pipeline.contract.models import is_s3_model
from sd_pipeline.loras.sources import adapter_listing
from sd_pipeline.versions.cache import ModelCache
from sd_pipeline.versions.location import ModelLocation
from sd_pipeline.versions.registry import ModelRegistry, make_client
from sd_pipeline.versions.resolve import ResolvedModel, resolve_model
from sd_pipeline.versions.rollout import ModelRollout
from storage.base import ImageStore, StorageError, StorageUnreachableError
from storage.local import LocalStore, load_or_create_secret
from storage.s3 import S3Store
from storage.spool import Spool, SpoolingStore, SpoolLimits
from webapp.owners import address_of, parse_networks
from webapp.server import GracefulServer, create_app
from webapp.service import ImageService
from webapp.sessions import (
    APP_SECRET_FILE,
    OWNER_SECRET_FILE,
    REVOKED_SESSIONS_DIR,
    SESSION_MAX_AGE,
    RevokedSessions,
    Sessions,
)
from webapp.settings import Settings, SettingsError, load_settings, refuse_unsafe_start
from webapp.ui import build_demo

logger = logging.getLogger("sd_service")


@dataclass
class Parts:
    """Everything ``main`` starts, so it can stop them in order."""

    metrics: Metrics
    health: Health
    metrics_server: MetricsServer
    store: ImageStore
    backend: Backend | None = None
    admission: Admission | None = None
    service: ImageService | None = None
    rollout: ModelRollout | None = None
    native_size: int = 512  # the model's own side: the default width and height


def build_store(settings: Settings, metrics: Metrics) -> tuple[ImageStore, LocalStore | None]:
    """S3 (behind the outage spool) when a bucket is set, else the local folder."""
    s3_settings = settings.s3()
    if s3_settings is not None:
        spool = Spool(settings.data_dir / "spool", limits=SpoolLimits(max_items=settings.storage.spool_max_items))
        s3 = SpoolingStore(S3Store.from_settings(s3_settings), spool, observer=metrics)
        try:
            s3.primary.check()  # a missing bucket or refused keys stop start-up: a setting to fix
        except StorageUnreachableError as error:  # an outage: serve, spool images, upload when it is back
            logger.warning("%s: starting degraded; images wait in the spool until S3 answers", error)
        s3.start()
        return s3, None
    secret = (
        settings.storage.link_secret.get_secret_value().encode()
        if settings.storage.link_secret
        else load_or_create_secret(settings.data_dir)
    )
    local = LocalStore(
        settings.data_dir,
        secret=secret,
        link_ttl_seconds=settings.storage.link_ttl_seconds,
        base_url=settings.base_url(),
    )
    local.check()
    return local, local


def app_secret(settings: Settings) -> bytes:
    """The secret every front end shares (APP_SECRET, else one kept in DATA_DIR): signs login
    sessions, so rotating it ends every session."""
    if settings.app_secret is not None:
        return settings.app_secret.get_secret_value().encode()
    return load_or_create_secret(settings.data_dir, APP_SECRET_FILE)


def owner_secret(settings: Settings, session_secret: bytes) -> bytes:
    """The secret owner hashes are keyed with (OWNER_SECRET, else one kept in DATA_DIR), never
    rotated. Made the first time from the session secret, which keyed them before the two were
    apart, so histories stored until then keep their keys and APP_SECRET can rotate from then on."""
    if settings.owner_secret is not None:
        return settings.owner_secret.get_secret_value().encode()
    return load_or_create_secret(settings.data_dir, OWNER_SECRET_FILE, initial=session_secret)


def sessions(settings: Settings, logins: list[tuple[str, str]], secret: bytes, *, secure: bool) -> Sessions:
    """Login sessions: signed with ``secret``, revoked in DATA_DIR (shared by front ends on one
    folder), failed logins throttled per user and per client address."""
    trusted = parse_networks(settings.trusted_proxies)
    revoked = RevokedSessions(settings.data_dir / REVOKED_SESSIONS_DIR, max_age=SESSION_MAX_AGE)
    return Sessions(
        dict(logins),
        secret,
        secure=secure,
        revoked=revoked,
        address_of=functools.partial(address_of, trusted_proxies=trusted),
    )


def build_backend(settings: Settings, metrics: Metrics, *, model: str) -> Backend:
    """Ray Serve replicas when RAY_ADDRESS is set, else the supervised local worker process;
    ``model`` is SD_MODEL with an S3 model's version pinned (the one to start)."""
    plan = settings.ray_plan()
    if plan is not None:
        from sd_pipeline.backends.ray.backend import RayBackend

        pipeline = settings.replica_pipeline().model_copy(update={"model": model})
        return RayBackend(pipeline, plan, limits=settings.limits(), observer=metrics)
    from sd_pipeline.backends.local.process import PipelineProcess
    from sd_pipeline.backends.local.supervisor import LocalBackend

    policy = settings.restart_policy()
    new_worker = functools.partial(
        PipelineProcess,
        max_batch_images=settings.max_batch_size,
        observer=metrics,
        start_timeout=settings.worker.pipeline_start_timeout,
        stall_seconds=policy.stall_seconds,
    )
    return LocalBackend(
        settings.pipeline().model_copy(update={"model": model}),
        new_worker,
        limits=settings.limits(),
        max_running=settings.max_batch_size,
        policy=policy,
        observer=metrics,
        rollout=settings.engine.model_rollout,
    )


def build_rollout(
    settings: Settings,
    backend: Backend,
    resolved: ResolvedModel,
    metrics: Metrics,
    on_switched: Callable[[BackendInfo], None],
) -> ModelRollout | None:
    """The watcher of an ``s3://`` model's ``current`` version (None for a pinned version, a folder or a Hub id)."""
    store = settings.model_store()
    if store is None:
        return None
    location = ModelLocation.parse(settings.engine.sd_model)
    if location.pinned is not None:
        return None
    cache = ModelCache(Path(store.cache_dir))
    cache.remember_served(location, resolved.version)
    return ModelRollout(
        backend,
        ModelRegistry(make_client(store), location),
        cache,
        serving=resolved.version,
        poll_seconds=settings.engine.model_poll_seconds,
        observer=metrics,
        on_switched=on_switched,
    )


def report_model(metrics: Metrics, info: BackendInfo) -> None:
    metrics.model_loaded(
        model=info.model,
        version=info.version,
        model_hash=info.model_hash,
        device=info.device,
        dtype=info.dtype,
        seconds=info.load_seconds,
        simulated=info.simulated,
        family=info.family,
    )


def build_ray_app(args: dict[str, Any]) -> Any:
    """The Serve application for Ray's own tools (``serve run app:build_ray_app``, a Serve config's
    ``import_path``, KubeRay's serveConfigV2): the replicas the app would deploy itself, from the
    same settings: this process's environment, then the config's ``args`` (setting names, any case)."""
    from sd_pipeline.backends.ray.replica import pipeline_application

    overrides = {name.upper(): str(value) for name, value in args.items()}
    settings = load_settings([], env={**os.environ, **overrides})
    return pipeline_application(settings.replica_pipeline(), settings.replica_plan())


def start(settings: Settings) -> tuple[Parts, LocalStore | None]:
    """Start metrics, storage, the backend and admission; raises on anything unusable."""
    metrics = Metrics(version="0.1.0")
    metrics.queue_capacity.set(settings.queue_max_size)
    health = Health()
    metrics_server = MetricsServer(
        metrics.registry, health, host=settings.metrics_host or settings.host, port=settings.metrics_port
    )
    metrics_server.start()
    store, local_store = build_store(settings, metrics)
    health.storage_check = store.check
    health.storage_detail = store.degraded
    parts = Parts(metrics=metrics, health=health, metrics_server=metrics_server, store=store)
    # An S3 model: the version to start, fetched and verified here (or the last one served, if S3 is down).
    resolved = (
        resolve_model(settings.engine.sd_model, settings.model_store())
        if is_s3_model(settings.engine.sd_model)
        else None
    )
    backend = build_backend(settings, metrics, model=resolved.pinned if resolved else settings.engine.sd_model)
    parts.backend = backend
    health.pipeline_readiness = backend.readiness_problem
    health.pipeline_liveness = backend.liveness_problem
    info = backend.start()
    parts.native_size = info.native_size
    report_model(metrics, info)
    parts.admission = Admission(
        backend,
        capacity=settings.queue_max_size,
        observer=metrics,
        max_per_owner=settings.max_requests_per_user,
        max_per_address=settings.max_requests_per_address,
    )
    parts.admission.start()
    parts.service = ImageService(backend, parts.admission, store, metrics, page_size=settings.history_page_size)
    parts.service.model_defaults = info.defaults
    parts.service.model_rules, parts.service.native_size = info.rules, info.native_size
    service = parts.service

    def on_switched(switched: BackendInfo) -> None:
        """A new model version serves: metrics, and the defaults new pages get."""
        report_model(metrics, switched)
        service.model_defaults = switched.defaults
        service.model_rules, service.native_size = switched.rules, switched.native_size

    if resolved is not None:
        rollout = parts.rollout = build_rollout(settings, backend, resolved, metrics, on_switched)
        note = resolved.note  # e.g. S3 was down at start: the cached version serves
        if rollout is None:
            health.model_detail = lambda: note
        else:
            rollout.detail = note
            health.model_detail = lambda: rollout.detail
            rollout.start()
    health.model_loaded()
    return parts, local_store


def drain(parts: Parts, settings: Settings) -> None:
    """Stop taking requests, finish queued and running work, then let in-flight saves complete."""
    parts.health.shutting_down()
    if parts.admission is not None:
        parts.admission.close(timeout=settings.shutdown_timeout)
    if parts.service is not None:
        parts.service.wait_idle(timeout=10)
    time.sleep(settings.shutdown_linger)  # clients fetch their result files before the listener closes


def stop(parts: Parts) -> None:
    """Stop the backend, flush uploads (the spool keeps the rest) and close the side port."""
    if parts.rollout is not None:
        parts.rollout.close()
    if parts.backend is not None:
        parts.backend.close()
    parts.store.close()
    parts.metrics_server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, start everything, serve until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(argv)
        auth = settings.credentials()
        refuse_unsafe_start(settings, auth, os.environ)
        secret = app_secret(settings)
        parts, local_store = start(settings)
    except (SettingsError, ModelLoadError, StorageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    assert parts.service is not None
    demo = build_demo(
        parts.service,
        limits=settings.limits(),
        model_name=parts.service.backend.model,
        default_size=parts.native_size,
        model_defaults=parts.service.model_defaults,
        rules=parts.service.model_rules,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        owner_secret=owner_secret(settings, secret),
        loras=adapter_listing(
            str(settings.engine.lora_dir) if settings.engine.lora_dir else None, settings.lora_store()
        ),
    )
    demo.queue(max_size=settings.queue_max_size, api_open=False, default_concurrency_limit=16)
    secure = settings.base_url().startswith("https://")
    app = create_app(
        demo,
        local_store=local_store,
        sessions=sessions(settings, auth, secret, secure=secure) if auth else None,
        max_upload_bytes=settings.max_upload_bytes,
        trusted_proxies=tuple(parse_networks(settings.trusted_proxies)),
        secure_cookies=secure,
    )
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = GracefulServer(config, drain=lambda: drain(parts, settings), on_started=parts.health.serving)
    if parts.rollout is not None:
        rollout = parts.rollout
        signal.signal(signal.SIGHUP, lambda signum, frame: rollout.check_now())  # look at 'current' now
    logger.info("serving on %s (metrics on port %d)", settings.base_url(), parts.metrics_server.port)
    try:
        server.run()
    finally:
        stop(parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
