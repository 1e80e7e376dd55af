"""The sampler names users can pick (``contract.samplers``), mapped to diffusers schedulers."""

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

from sd_pipeline.contract.samplers import SCHEDULER_NAMES

__all__ = ["SCHEDULER_NAMES", "make_scheduler", "scheduler_names"]

# name -> (scheduler class, config overrides), for every name in ``SCHEDULER_NAMES``.
_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """Build the scheduler called ``name`` from a pipeline's scheduler config."""
    scheduler_class, overrides = _SCHEDULERS[name]
    scheduler: SchedulerMixin = scheduler_class.from_config(base_config, **overrides)
    return scheduler


def scheduler_names() -> tuple[str, ...]:
    """The names this module can build, in order (a test checks they are ``SCHEDULER_NAMES``)."""
    return tuple(_SCHEDULERS)
