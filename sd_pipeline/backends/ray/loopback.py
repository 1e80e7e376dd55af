"""Keep a private Ray instance on the loopback address, and its secrets private.

Ray's own switch for single-machine use (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the
node, its GCS, raylet and workers on 127.0.0.1. One server escapes it: Ray Serve 2.60 binds
each replica's inter-deployment gRPC server to every interface (``"[::]:0"`` in
``ray/serve/_private/replica.py``), whatever the node address. ``keep_replica_grpc_on_loopback``
rewrites that one bind; it checks the Ray version it was written for, logs when it applies,
and warns loudly when it cannot (a test lists every listening socket of the private
instance and asserts each is on 127.0.0.1, so a Ray upgrade that breaks it fails the suite).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sd_pipeline.contract.errors import ModelLoadError

logger = logging.getLogger(__name__)

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps the node on the loopback address
WRITTEN_FOR_RAY = "2.60."
_EVERY_INTERFACE = "[::]"
_PATCHED = "_sd_service_loopback"


def loopback_requested() -> bool:
    """Whether this process belongs to a loopback-only instance (the switch is inherited by replicas)."""
    return os.environ.get(LOOPBACK_SWITCH) == "0"


def start_private_instance(*, num_cpus: int, object_store_bytes: int) -> Path:
    """Ray on this machine alone: loopback only, its files in a folder only this user can read (returned:
    remove it after ``ray.shutdown()``). ``LOOPBACK_SWITCH`` must be "0" before Ray is first imported;
    a node that came up elsewhere is shut down with ``ModelLoadError``."""
    import ray

    private_dir = Path(tempfile.mkdtemp(prefix="sd-ray-"))  # 0700
    with owner_only_files():  # Ray 2.60 turns on token auth for it and writes the token if missing
        ray.init(
            include_dashboard=False,
            object_store_memory=object_store_bytes,
            num_cpus=num_cpus,
            log_to_driver=False,
            configure_logging=False,
            _temp_dir=str(private_dir / "ray"),  # Ray opens this to all (0777); its parent is 0700
        )
    keep_token_private()
    node = ray.util.get_node_ip_address()
    if not node.startswith("127."):
        ray.shutdown()
        raise ModelLoadError(
            f"the private Ray instance came up on {node}, not on loopback: Ray was imported before "
            f"{LOOPBACK_SWITCH}=0 was set (set it in the environment, or import Ray only through the app)"
        )
    logger.info("private Ray instance at %s", ray.get_runtime_context().gcs_address)
    return private_dir


def keep_this_replica_on_loopback() -> None:
    """In a replica's constructor: its gRPC server on 127.0.0.1 when its instance is loopback-only."""
    if loopback_requested():
        keep_replica_grpc_on_loopback()


def keep_replica_grpc_on_loopback() -> bool:
    """In a replica of a loopback-only instance, bind its gRPC server to 127.0.0.1; False if it could not."""
    import ray
    from ray.serve._private import replica

    if not ray.__version__.startswith(WRITTEN_FOR_RAY):
        logger.warning(
            "the replica loopback patch was written for Ray %s*, this is Ray %s: check that the replica's "
            "gRPC server still binds on loopback (tests/test_ray.py lists every listening socket)",
            WRITTEN_FOR_RAY,
            ray.__version__,
        )
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None:
        logger.error(
            "Ray %s has no ray.serve._private.replica.add_port_to_grpc_server: the replica's gRPC server may "
            "listen on EVERY interface; keep this machine's firewall closed to Ray's ports",
            ray.__version__,
        )
        return False
    if not getattr(bind, _PATCHED, False):
        replica.add_port_to_grpc_server = _on_loopback(bind)
    return True


def _on_loopback(bind: Callable[[Any, str], int]) -> Callable[[Any, str], int]:
    def bind_on_loopback(server: Any, address: str) -> int:
        if _EVERY_INTERFACE not in address:
            logger.error(
                "Ray asked to bind a replica's gRPC server to %r, not %r: left as is; it may not be on loopback",
                address,
                _EVERY_INTERFACE,
            )
            return bind(server, address)
        address = address.replace(_EVERY_INTERFACE, "127.0.0.1")
        logger.info("replica gRPC server bound to %s (loopback-only instance)", address)
        return bind(server, address)

    setattr(bind_on_loopback, _PATCHED, True)
    return bind_on_loopback


@contextlib.contextmanager
def owner_only_files() -> Iterator[None]:
    """While a private instance starts, every file and folder Ray creates (its session folder, the token
    it generates) is readable by this user only."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def keep_token_private() -> Path | None:
    """Ray's token file (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``), made 0600 if it exists."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
        logger.warning("Ray's token file %s was readable by others; now 0600", path)
    return path
