"""The tiny shapes model: pictures drawn here, a pipeline trained on them, and the measures that read them."""

from pathlib import Path

SHAPES_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny-shapes"
DEMO_LORA_DIR = Path(__file__).resolve().parents[2] / "models" / "loras"  # its demo LoRA adapter (a ring)
