"""The usual Gradio demo, as a peer to compare against: the pipeline is called inside the
handler, Gradio's default queue (one at a time), no batching, no storage.

    python -m bench.naive_peer --model DIR --port 7870
"""

from __future__ import annotations

import argparse

import gradio as gr
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline = StableDiffusionPipeline.from_pretrained(args.model, dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)

    def generate(prompt: str, seed: float, steps: float, width: float, height: float) -> Image.Image:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        output = pipeline(
            prompt, num_inference_steps=int(steps), width=int(width), height=int(height), generator=generator
        )
        image: Image.Image = output.images[0]
        return image

    def ping(text: str) -> str:
        return text

    with gr.Blocks(analytics_enabled=False) as demo:
        inputs = [gr.Textbox(), gr.Number(), gr.Number(), gr.Number(), gr.Number()]
        output = gr.Image()
        gr.Button().click(generate, inputs, output, api_name="generate")
        echo = gr.Textbox()
        gr.Button().click(ping, echo, echo, api_name="ping")  # the framework's own round trip, for reference
    demo.queue().launch(server_name="127.0.0.1", server_port=args.port, quiet=True)


if __name__ == "__main__":
    main()
