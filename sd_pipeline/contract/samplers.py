"""The sampler names users can pick (AUTOMATIC1111's names, so PNG parameters read back in other tools).

``sd_pipeline.model.schedulers`` maps each name to a diffusers scheduler.
"""

from __future__ import annotations

DEFAULT_SCHEDULER = "DPM++ 2M Karras"
SCHEDULER_NAMES: tuple[str, ...] = ("DPM++ 2M", "DPM++ 2M Karras", "Euler a", "Euler", "DDIM", "UniPC")
