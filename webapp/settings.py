"""One typed settings object, read from the environment and from command-line flags."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Json, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sd_pipeline.admission import DEFAULT_QUEUE_CAPACITY
from sd_pipeline.contract.images import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MAX_UPLOAD_PIXELS
from sd_pipeline.contract.models import LoraStoreSettings, ModelStore, is_s3_model
from sd_pipeline.contract.plans import DEFAULT_STALL_SECONDS, DeployPolicy, RayPlan, ReplicaPlan, RestartPolicy
from sd_pipeline.contract.request import DEFAULT_MAX_PIXELS, RequestLimits
from sd_pipeline.contract.settings import (
    DEFAULT_MODEL,
    DEFAULT_PREVIEW_INTERVAL,
    DeviceName,
    DtypeName,
    PipelineSettings,
    PreviewName,
)
from sd_pipeline.contract.simulation import SimulatedAccelerator
from sd_pipeline.versions.location import LocationError, ModelLocation
from storage.s3 import DEFAULT_LINK_TTL_SECONDS, MAX_LINK_TTL_SECONDS, S3Settings
from storage.spool import SpoolLimits
from webapp.owners import parse_networks


def serving_cpu_threads() -> int:
    """All cores but one: torch's threads stall when the web server takes a core they wait on."""
    return max(1, (os.cpu_count() or 2) - 1)


def adaptive_cpu_threads() -> tuple[int, ...]:
    """What the worker's engine picks from per step by measuring: all cores but one, and all cores
    (nothing on one core, where there is no choice)."""
    choices = tuple(sorted({serving_cpu_threads(), os.cpu_count() or 1}))
    return choices if len(choices) > 1 else ()


class SettingsError(ValueError):
    """A setting is invalid; the message is one line naming it."""


class EngineSettings(BaseModel):
    """The model and how it runs: what ``Settings.pipeline()`` hands to the worker or the replicas
    (a setting the worker takes as it is names its field there in ``serialization_alias``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    sd_model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face model id, local pipeline folder, or s3://BUCKET/PREFIX (follows its 'current' "
        "version) or s3://BUCKET/PREFIX@VERSION (one version)",
        serialization_alias="model",
    )
    model_s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint of the model versions when it differs from S3_ENDPOINT_URL"
    )
    model_cache_dir: Path | None = Field(
        None, description="verified model versions on this host (default: DATA_DIR/models)"
    )
    model_poll_seconds: float = Field(
        30.0, ge=0, description="how often to check the model's 'current' version (0: never; SIGHUP: at once)"
    )
    model_rollout: Literal["overlap", "drain"] = Field(
        "overlap",
        description="overlap: load a new version beside the old one; drain: finish running requests, then swap "
        "(a GPU that cannot hold two models; requests wait meanwhile)",
    )
    sd_device: DeviceName = Field("auto", description="auto, cuda, mps or cpu", serialization_alias="device")
    sd_dtype: DtypeName = Field(
        "auto",
        description="auto (float16 on CUDA, float32 otherwise), float16, bfloat16, float32",
        serialization_alias="dtype",
    )
    sd_safety_checker: bool = Field(
        True, description="run the model's safety checker when it ships one", serialization_alias="safety_checker"
    )
    sd_t5: bool = Field(
        True,
        description="load an SD3 model's T5 text encoder (off: SD3 runs without it, several GB less memory)",
        serialization_alias="t5_encoder",
    )
    sd_cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of the worker (default: per step, whichever of all cores and all cores but "
        "one measures faster; a lone request gets every core, a loaded server keeps one for the web requests)",
    )
    sd_warmup: bool = Field(True, description="generate one tiny image at start-up", serialization_alias="warmup")
    sd_compile: bool = Field(False, description="torch.compile the UNet (CUDA)", serialization_alias="compile_unet")
    sd_cudnn_benchmark: bool = Field(
        False,
        description="let cuDNN time algorithms per new shape (CUDA; slow first request per shape)",
        serialization_alias="cudnn_benchmark",
    )
    sd_channels_last: bool = Field(
        False, description="channels-last memory format", serialization_alias="channels_last"
    )
    sd_fuse_qkv: bool = Field(False, description="fuse attention projections", serialization_alias="fuse_qkv")
    sd_preview: PreviewName = Field(
        "auto",
        description="live previews while a request renders: approx (a linear map of the latents, nearly free), "
        "taesd (the tiny decoder in SD_PREVIEW_DECODER), full (the model's own VAE), off, or auto (what the "
        "model recommends in its model_defaults.json, else approx)",
        serialization_alias="preview",
    )
    sd_preview_decoder: str | None = Field(
        None,
        description="local folder of a diffusers AutoencoderTiny (e.g. madebyollin/taesd), for SD_PREVIEW=taesd",
        serialization_alias="preview_decoder",
    )
    lora_dir: Path | None = Field(
        None,
        description="folder of LoRA adapters (NAME.safetensors, kohya/AUTOMATIC1111 or diffusers/PEFT files) that "
        "prompts name with <lora:NAME:WEIGHT>; none when unset",
    )
    lora_s3: str | None = Field(
        None,
        description="s3://BUCKET/PREFIX of LoRA adapters published with `python -m sd_pipeline.versions publish-lora` "
        "(same S3 store as the model versions); prompts name them as LORA_DIR's, which wins a name in both",
    )
    lora_s3_refresh_seconds: float = Field(
        30.0, gt=0, description="how old the list of published adapters and their current versions may be"
    )
    lora_cache_mb: int = Field(
        1024,
        ge=1,
        description="LoRA adapters kept loaded on the device, least recently used out first (MB)",
        serialization_alias="lora_cache_mb",
    )
    preview_interval_seconds: float = Field(
        DEFAULT_PREVIEW_INTERVAL,
        gt=0,
        description="at most one preview per request this often (and only after a new step)",
        serialization_alias="preview_interval",
    )
    sd_simulated_gpu: str | None = Field(
        None,
        description="benchmarks only: each UNet/VAE call lasts a modelled accelerator's time, "
        "'unet=A+B*n,vae=C*n' in ms (n = images, guidance counts twice) or 'h200'; the real module runs, "
        "then the process sleeps; a Ray replica then asks for no CPU or GPU",
        serialization_alias="simulated_gpu",
    )

    @field_validator("sd_simulated_gpu")
    @classmethod
    def _simulation_reads(cls, value: str | None) -> str | None:
        return SimulatedAccelerator.parse(value).spec if value else None

    @field_validator("lora_s3")
    @classmethod
    def _lora_store_is_a_place(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            location = ModelLocation.parse(value)
        except LocationError as error:
            raise ValueError(str(error).removeprefix("model: ")) from None
        if location.pinned is not None:
            raise ValueError(f"{value!r} names a version; give s3://BUCKET/PREFIX")
        return str(location)

    @model_validator(mode="after")
    def _lora_without_compile(self) -> EngineSettings:
        if (self.lora_dir is not None or self.lora_s3 is not None) and self.sd_compile:
            raise ValueError(
                "LORA_DIR and LORA_S3 cannot be combined with SD_COMPILE yet (LoRA layers are added while serving)"
            )
        return self


class StorageSettings(BaseModel):
    """Where images and their records are kept (S3, else the local folder) and how links are made;
    the S3 endpoint, region and addressing style serve the model versions too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    s3_bucket: str | None = Field(None, description="store images in this S3 bucket (unset: local folder)")
    s3_prefix: str = Field("", description="key prefix inside the bucket")
    s3_region: str | None = Field(None, description="bucket region")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (SeaweedFS, Garage, R2, Ceph)")
    s3_public_endpoint_url: str | None = Field(None, description="endpoint used only to sign links for browsers")
    s3_addressing_style: Literal["auto", "virtual", "path"] = Field("auto", description="S3 addressing style")
    s3_create_bucket: bool = Field(False, description="create the bucket at start-up when missing")
    link_ttl_seconds: int = Field(
        DEFAULT_LINK_TTL_SECONDS, ge=1, le=MAX_LINK_TTL_SECONDS, description="lifetime of image links"
    )
    link_secret: SecretStr | None = Field(None, description="HMAC key for local links (default: kept in DATA_DIR)")
    spool_max_items: int = Field(SpoolLimits.max_items, ge=1, description="uploads kept on disk while S3 is down")

    @field_validator("s3_prefix")
    @classmethod
    def _prefix_ends_with_slash(cls, value: str) -> str:
        return value if not value or value.endswith("/") else value + "/"


class RaySettings(BaseModel):
    """The pipeline replicas on Ray Serve (``RAY_ADDRESS`` set), and how Serve looks after them."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    ray_address: str | None = Field(
        None,
        description="unset: one local worker process; 'local': a private Ray instance on this machine; "
        "'auto', 'host:port' or 'ray://host:10001': join that Ray cluster (Ray Serve replicas)",
    )
    ray_replicas: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        1, description="pipeline replicas on Ray (with RAY_ADDRESS); 'auto': Serve autoscaling between the next two"
    )
    ray_min_replicas: int = Field(1, ge=1, le=1024, description="fewest replicas with RAY_REPLICAS=auto")
    ray_max_replicas: int = Field(4, ge=1, le=1024, description="most replicas with RAY_REPLICAS=auto")
    ray_autoscaling: Json[dict[str, Any]] = Field(
        "{}",  # type: ignore[arg-type]  # JSON text, parsed like the environment's
        description="more fields of Ray Serve's autoscaling_config as JSON, e.g. '{\"upscale_delay_s\": 10}'",
    )
    ray_gpus_per_replica: float | None = Field(
        None, ge=0, description="GPUs each Ray replica holds (default: 1 when the cluster has GPUs, else 0)"
    )
    ray_cpus_per_replica: float = Field(
        ReplicaPlan.cpus_per_replica, gt=0, description="CPUs each Ray replica holds (its torch threads)"
    )
    ray_max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="requests each front end may have waiting in Ray for a replica; more get 'busy' at once "
        "(default: no bound; the app's own queue bounds what it hands to Ray)",
    )
    ray_deploy: DeployPolicy = Field(
        "if-missing",
        description="on a shared cluster: 'if-missing' deploys the pipeline unless running, 'always' redeploys "
        "it with these settings, 'never' waits for one (a RayService or another front end deploys it)",
    )
    ray_health_check_period: float = Field(
        ReplicaPlan.health_check_period_s,
        gt=0,
        description="seconds between Serve's health checks of each replica (a failed engine is replaced)",
    )
    ray_health_check_timeout: float = Field(
        ReplicaPlan.health_check_timeout_s,
        gt=0,
        description="a replica that does not answer its health check this long (frozen) is replaced",
    )

    @field_validator("ray_replicas", mode="before")
    @classmethod
    def _replicas_are_a_count_or_auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto" and not value.strip().isdigit():
            raise ValueError("must be a whole number from 1 to 1024, or 'auto'")
        return value

    @model_validator(mode="after")
    def _replica_bounds_in_order(self) -> RaySettings:
        if self.ray_min_replicas > self.ray_max_replicas:
            raise ValueError("RAY_MIN_REPLICAS must not exceed RAY_MAX_REPLICAS")
        return self


class WorkerSettings(BaseModel):
    """How the local worker process (or, on Ray, a replica) is watched and replaced."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    worker_stall_seconds: float = Field(
        DEFAULT_STALL_SECONDS,
        gt=0,
        description="replace the pipeline worker when it makes no progress this long while working",
    )
    worker_max_restarts: int = Field(
        RestartPolicy.max_restarts,
        ge=1,
        description="worker restarts within WORKER_RESTART_WINDOW that make /healthz report unhealthy",
    )
    worker_restart_window: float = Field(
        RestartPolicy.restart_window, gt=0, description="seconds over which worker restarts are counted"
    )
    pipeline_start_timeout: float = Field(
        RayPlan.start_timeout,
        gt=0,
        description="seconds to wait at start-up for the model to load (or, on Ray, for a replica)",
    )


GROUPS: dict[str, type[BaseModel]] = {
    "engine": EngineSettings,
    "storage": StorageSettings,
    "ray": RaySettings,
    "worker": WorkerSettings,
}
GROUP_OF = {name: group for group, model in GROUPS.items() for name in model.model_fields}


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Settings by their flat names (the environment's, the flags', lower case) in their groups; a
    flat name wins over the same setting inside a group's mapping."""
    nested: dict[str, Any] = {key: value for key, value in flat.items() if key not in GROUP_OF}
    for key, value in flat.items():
        if key in GROUP_OF:
            group = nested.get(GROUP_OF[key])
            nested[GROUP_OF[key]] = {**(group if isinstance(group, Mapping) else {}), key: value}
    return nested


class FlatEnvironment(PydanticBaseSettingsSource):
    """Every setting from its environment variable, its flat name in upper case (``SD_MODEL``, not
    ``ENGINE__SD_MODEL``), whichever group holds it; case-insensitive like the rest."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the names itself

    def __call__(self) -> dict[str, Any]:
        return named_settings(os.environ)


class Settings(BaseSettings):
    """Every setting of the app, in typed groups (``engine``, ``storage``, ``ray``, ``worker``) beside the
    web server's own. Environment names are the settings' names in upper case, grouped or not."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    engine: EngineSettings = Field(default_factory=EngineSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=64 * 64, description="largest width x height accepted")
    max_upload_bytes: int = Field(
        DEFAULT_MAX_UPLOAD_BYTES, ge=1024, description="largest init_image or mask file accepted (bytes)"
    )
    max_upload_pixels: int = Field(
        DEFAULT_MAX_UPLOAD_PIXELS,
        ge=64 * 64,
        description="largest init_image or mask accepted (width x height, read from the header before decoding)",
    )
    host: str = Field("127.0.0.1", description="address the web app binds (0.0.0.0 in containers)")
    port: int = Field(7860, ge=1, le=65535, description="web app port")
    metrics_host: str | None = Field(None, description="address of the metrics side port (default: HOST)")
    metrics_port: int = Field(8000, ge=0, le=65535, description="Prometheus metrics and health side port")
    public_url: str | None = Field(None, description="base URL users reach the app at (for local-storage links)")
    data_dir: Path = Field(Path("data"), description="local images, upload spool and link secret")
    queue_max_size: int = Field(
        DEFAULT_QUEUE_CAPACITY, ge=1, description="requests accepted at once; more get 'busy, try again'"
    )
    max_batch_size: int = Field(
        ReplicaPlan.max_batch_images,
        ge=1,
        le=64,
        description="most requests stepping together in the engine (on Ray: in each replica)",
    )
    max_requests_per_user: int = Field(
        4, ge=1, description="requests one user (login, browser or API session) may have waiting or running"
    )
    max_requests_per_address: int = Field(
        16,
        ge=1,
        description="requests all anonymous users at one client address may have waiting or running together",
    )
    trusted_proxies: str = Field(
        "", description="addresses or networks of proxies whose X-Forwarded-For names the client (comma-separated)"
    )
    history_page_size: int = Field(12, ge=1, le=100, description="images per history page")
    auth_file: Path | None = Field(None, description="file of 'user:password' lines; turns login on")
    auth_users: SecretStr | None = Field(None, description="'user:password,user2:password2'; turns login on")
    app_secret: SecretStr | None = Field(
        None,
        description="shared by every front end: signs login sessions (rotate it to end them all); at least 32 "
        "bytes (default: a random one kept in DATA_DIR/.app-secret)",
    )
    owner_secret: SecretStr | None = Field(
        None,
        description="shared by every front end, never rotated: keys the owner hashes histories are stored under; "
        "at least 32 bytes (default: kept in DATA_DIR/.owner-secret, made from the APP_SECRET of the first start)",
    )
    allow_anonymous: bool = Field(
        False, description="serve without login on an address beyond loopback (HOST); refused at start otherwise"
    )
    shutdown_timeout: float = Field(
        ReplicaPlan.graceful_shutdown_s, gt=0, description="seconds to finish running work on SIGTERM"
    )
    shutdown_linger: float = Field(3.0, ge=0, description="seconds to keep serving after work is done, for downloads")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, FlatEnvironment(settings_cls)

    @model_validator(mode="before")
    @classmethod
    def _grouped(cls, data: Any) -> Any:
        return nest(data) if isinstance(data, Mapping) else data

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: str) -> str:
        parse_networks(value)  # ValueError names the bad entry
        return value

    def model_store(self) -> ModelStore | None:
        """Where versions of an ``s3://`` model come from and are cached (None for a Hub id or folder)."""
        return self._versions_store() if is_s3_model(self.engine.sd_model) else None

    def lora_store(self) -> LoraStoreSettings | None:
        """Where published LoRA adapters come from (None without ``LORA_S3``)."""
        engine = self.engine
        if engine.lora_s3 is None:
            return None
        return LoraStoreSettings(
            location=engine.lora_s3, store=self._versions_store(), refresh_seconds=engine.lora_s3_refresh_seconds
        )

    def _versions_store(self) -> ModelStore:
        """The S3 store of model and adapter versions (the images' endpoint unless MODEL_S3_ENDPOINT_URL
        says otherwise), and this host's cache of them."""
        engine, storage = self.engine, self.storage
        return ModelStore(
            endpoint_url=engine.model_s3_endpoint_url or storage.s3_endpoint_url,
            region=storage.s3_region,
            addressing_style=storage.s3_addressing_style,
            cache_dir=str((engine.model_cache_dir or self.data_dir / "models").resolve()),
        )

    def pipeline(self) -> PipelineSettings:
        """The engine group as the worker and the replicas take it: each carried setting under the
        name it declares (``serialization_alias``), with what comes from elsewhere: the version
        stores, the largest image, the LoRA folder's full path, this host's thread choices."""
        engine = self.engine
        carried = {name for name, field in EngineSettings.model_fields.items() if field.serialization_alias}
        return PipelineSettings(
            **engine.model_dump(include=carried, by_alias=True),
            model_store=self.model_store(),
            cpu_threads=engine.sd_cpu_threads or serving_cpu_threads(),
            cpu_thread_choices=() if engine.sd_cpu_threads else adaptive_cpu_threads(),
            max_pixels=self.max_pixels,
            lora_dir=str(engine.lora_dir.resolve()) if engine.lora_dir else None,
            lora_store=self.lora_store(),
        )

    def ray_plan(self) -> RayPlan | None:
        """Where the Ray replicas run, or None for the local worker process."""
        if not self.ray.ray_address:
            return None
        return RayPlan(
            address=self.ray.ray_address,
            deployment=self.replica_plan(),
            deploy=self.ray.ray_deploy,
            start_timeout=self.worker.pipeline_start_timeout,
        )

    def replica_plan(self) -> ReplicaPlan:
        """How many Ray replicas, what each holds and how much each takes (a simulated accelerator: nothing)."""
        ray = self.ray
        simulated = self.engine.sd_simulated_gpu is not None
        return ReplicaPlan(
            replicas=None if ray.ray_replicas == "auto" else ray.ray_replicas,
            min_replicas=ray.ray_min_replicas,
            max_replicas=ray.ray_max_replicas,
            autoscaling=ray.ray_autoscaling,
            gpus_per_replica=0 if simulated else ray.ray_gpus_per_replica,
            cpus_per_replica=0 if simulated else ray.ray_cpus_per_replica,
            max_batch_images=self.max_batch_size,
            max_queued_requests=ray.ray_max_queued_requests or -1,
            stall_seconds=self.worker.worker_stall_seconds,
            health_check_period_s=ray.ray_health_check_period,
            health_check_timeout_s=ray.ray_health_check_timeout,
            graceful_shutdown_s=self.shutdown_timeout,
        )

    def replica_pipeline(self) -> PipelineSettings:
        """The pipeline settings of a Ray replica: its torch threads are the CPUs Ray gives it."""
        threads = self.engine.sd_cpu_threads or max(1, int(self.ray.ray_cpus_per_replica))
        return self.pipeline().model_copy(update={"cpu_threads": threads, "cpu_thread_choices": ()})

    def restart_policy(self) -> RestartPolicy:
        worker = self.worker
        return RestartPolicy(
            stall_seconds=worker.worker_stall_seconds,
            max_restarts=worker.worker_max_restarts,
            restart_window=worker.worker_restart_window,
        )

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_pixels=self.max_pixels,
            max_upload_bytes=self.max_upload_bytes,
            max_upload_pixels=self.max_upload_pixels,
        )

    def s3(self) -> S3Settings | None:
        """Where images go: None for the local folder (no ``S3_BUCKET``)."""
        storage = self.storage
        if not storage.s3_bucket:
            return None
        return S3Settings(
            bucket=storage.s3_bucket,
            prefix=storage.s3_prefix,
            region=storage.s3_region,
            endpoint_url=storage.s3_endpoint_url,
            public_endpoint_url=storage.s3_public_endpoint_url,
            addressing_style=storage.s3_addressing_style,
            link_ttl_seconds=storage.link_ttl_seconds,
            create_bucket=storage.s3_create_bucket,
        )

    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def credentials(self) -> list[tuple[str, str]]:
        """Login pairs from AUTH_FILE and AUTH_USERS; empty means no login."""
        lines: list[str] = []
        if self.auth_file is not None:
            lines += self.auth_file.read_text(encoding="utf-8").splitlines()
        if self.auth_users is not None:
            lines += self.auth_users.get_secret_value().split(",")
        pairs = []
        for line in (line.strip() for line in lines):
            if not line or line.startswith("#"):
                continue
            user, separator, password = line.partition(":")
            if not separator or not user or not password:
                raise SettingsError("auth: each entry must be 'user:password'")
            pairs.append((user, password))
        return pairs


PLACEHOLDER_PREFIX = "change-me"  # what .env.example ships: never a secret in service
MIN_HMAC_KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 8  # login passwords; failed logins are throttled too (webapp.sessions.LoginThrottle)
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")


def refuse_unsafe_start(settings: Settings, logins: list[tuple[str, str]], environ: Mapping[str, str]) -> None:
    """Stop start-up (``SettingsError``, naming the setting, never its value) on a placeholder or
    weak secret, or on an address beyond loopback with no login unless ALLOW_ANONYMOUS says so."""
    named = (("LINK_SECRET", settings.storage.link_secret), ("APP_SECRET", settings.app_secret))
    for name, value in (*named, ("OWNER_SECRET", settings.owner_secret)):
        secret = value.get_secret_value() if value is not None else None
        if secret is not None and (secret.startswith(PLACEHOLDER_PREFIX) or len(secret.encode()) < MIN_HMAC_KEY_BYTES):
            raise SettingsError(
                f"{name} must be at least {MIN_HMAC_KEY_BYTES} random bytes, not a placeholder "
                "(make one: openssl rand -hex 32)"
            )
    for name in CREDENTIAL_VARIABLES:
        if environ.get(name, "").startswith(PLACEHOLDER_PREFIX):
            raise SettingsError(f"{name} is still the placeholder from .env.example: set the real key")
    for user, password in logins:
        if password.startswith(PLACEHOLDER_PREFIX):
            raise SettingsError(f"AUTH_USERS/AUTH_FILE: the password of '{user}' is a placeholder")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise SettingsError(
                f"AUTH_USERS/AUTH_FILE: the password of '{user}' is shorter than {MIN_PASSWORD_LENGTH} characters"
            )
    if settings.host not in LOOPBACK_HOSTS and not logins and not settings.allow_anonymous:
        raise SettingsError(
            f"HOST={settings.host} serves beyond this machine without login: set AUTH_USERS or AUTH_FILE, "
            "or ALLOW_ANONYMOUS=true if a proxy in front logs users in or the port is published on loopback only"
        )


# Short flags people expect, besides the --field-name form every setting has.
_ALIASES = {"sd_model": ["--model"], "sd_device": ["--device"]}


def setting_fields() -> dict[str, FieldInfo]:
    """Every setting by its flat name (its environment variable in lower case, its flag's stem),
    the web server's own and each group's."""
    own = {name: field for name, field in Settings.model_fields.items() if name not in GROUPS}
    engine, *others = GROUPS.values()  # --help lists the model's settings first, the web server's next
    grouped = [model.model_fields for model in others]
    return {**engine.model_fields, **own, **{name: field for fields in grouped for name, field in fields.items()}}


def named_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings an environment names (case-insensitive), by their flat names; the rest ignored."""
    names = setting_fields()
    return {key.lower(): value for key, value in environ.items() if key.lower() in names}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Text-to-image web app. Every flag can also be set by the environment variable in brackets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, field in setting_fields().items():
        flags = [f"--{name.replace('_', '-')}", *_ALIASES.get(name, [])]
        default = field.default if not isinstance(field.default, SecretStr) else "(secret)"
        parser.add_argument(
            *flags,
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{field.description} [{name.upper()}] (default: {default})",
        )
    return parser


def load_settings(argv: Sequence[str] | None = None, *, env: dict[str, str] | None = None) -> Settings:
    """Settings from flags (highest), then the environment, then defaults; one-line error when bad."""
    flags: dict[str, Any] = vars(_parser().parse_args(argv))
    try:
        if env is not None:
            return Settings.model_validate({**named_settings(env), **flags})
        return Settings(**flags)
    except ValidationError as error:
        first = error.errors()[0]
        place = [str(part) for part in first["loc"]]
        if place and place[0] in GROUPS:
            place = place[1:]  # the setting, not the group that holds it
        if not place:  # a rule across settings names them in its message
            raise SettingsError(f"invalid settings: {first['msg'].removeprefix('Value error, ')}") from None
        field = place[0].upper()  # the setting, not the branch of its type that failed
        raise SettingsError(f"invalid setting {field}: {first['msg']} (got {first.get('input')!r})") from None
