"""The fixed list of sampler names users can pick, mapped to diffusers schedulers."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

DEFAULT_SCHEDULER = "DPM++ 2M Karras"

# name -> (scheduler class, config overrides). Names follow AUTOMATIC1111 so PNG
# parameters written here read back correctly in other tools.
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """Build the scheduler called ``name`` from a pipeline's scheduler config."""
    scheduler_class, overrides = _SCHEDULERS[name]
    scheduler: SchedulerMixin = scheduler_class.from_config(base_config, **overrides)
    return scheduler
