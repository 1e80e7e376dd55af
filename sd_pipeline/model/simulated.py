"""Make a loaded pipeline's UNet and VAE calls last a modelled accelerator's time (benchmarks only).

Each call runs the real module, then sleeps what is left of the modelled time, so the images are
the real (tiny) model's and the process holds no core while "the GPU" works. On CUDA the real
call is synchronised first, so its own time counts once.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from sd_pipeline.contract.simulation import CallCost, SimulatedAccelerator

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], None]


def simulate_accelerator(
    denoiser: Any,
    vae: Any,
    accelerator: SimulatedAccelerator,
    *,
    clock: Clock = time.perf_counter,
    sleep: Sleep = time.sleep,
) -> None:
    """Wrap the denoiser's forward (the UNet's, or a transformer's) and ``vae.decode`` in the modelled time."""
    denoiser.forward = paced(denoiser.forward, accelerator.unet, clock=clock, sleep=sleep)
    vae.decode = paced(vae.decode, accelerator.vae, clock=clock, sleep=sleep)
    logger.warning(
        "SIMULATED ACCELERATOR (SD_SIMULATED_GPU=%s): every UNet and VAE call sleeps to the modelled time. "
        "For benchmarks only: this is not a real GPU.",
        accelerator.spec,
    )


def paced(call: Callable[..., Any], cost: CallCost, *, clock: Clock, sleep: Sleep) -> Callable[..., Any]:
    """``call`` made to last ``cost`` for the images in its batch (never shorter than itself): the first
    positional argument, or ``hidden_states`` (transformers are called with keywords only)."""

    @functools.wraps(call)
    def modelled(*args: Any, **kwargs: Any) -> Any:
        sample: torch.Tensor = args[0] if args else kwargs["hidden_states"]
        started = clock()
        output = call(*args, **kwargs)
        if sample.device.type == "cuda":
            torch.cuda.synchronize(sample.device)
        remaining = cost.seconds(int(sample.shape[0])) - (clock() - started)
        if remaining > 0:
            sleep(remaining)
        return output

    return modelled
