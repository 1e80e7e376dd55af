"""The pipeline application for Ray Serve's own tools: ``serve run``, ``serve deploy``, KubeRay.

``import_path: webapp.ray_app:build`` in a Serve config (a RayService's ``serveConfigV2``)
deploys the same replicas the app would deploy itself, from the same settings: the
environment of the process that builds it, then the config's ``args`` (setting names, any
case). Front ends then join it with ``RAY_DEPLOY=never``.
"""

from __future__ import annotations

import os
from typing import Any

from sd_pipeline.ray_serving import pipeline_application
from webapp.settings import load_settings


def build(args: dict[str, Any]) -> Any:
    """The Serve application for these settings (Serve calls this with the config's ``args``)."""
    overrides = {name.upper(): str(value) for name, value in args.items()}
    settings = load_settings([], env={**os.environ, **overrides})
    return pipeline_application(settings.replica_pipeline(), settings.replica_plan())
