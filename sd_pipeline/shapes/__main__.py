"""The tiny shapes model: ``python -m sd_pipeline.shapes train DIR`` and ``... check DIR``.

``train`` draws the pictures, trains the pipeline on this machine's CPU (about 15 minutes on
two cores with the defaults) and writes it, with its model card and loss log, into DIR.
``train-lora`` trains the demo LoRA adapter (a ring) for the committed model into DIR, measures
it and writes its card. ``check`` loads DIR through the app's own loading code and prints how often its pictures show
the colour and the shape their prompt asks for, per sampler and guidance scale (``--save``
also writes the table to DIR/adherence.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sd_pipeline.shapes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the tiny shapes pipeline into a folder")
    train.add_argument("folder", type=Path)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--pictures", type=int, default=4096)
    train.add_argument("--vae-steps", type=int, default=None)
    train.add_argument("--unet-steps", type=int, default=None)
    check = commands.add_parser("check", help="measure a trained pipeline's prompt adherence")
    check.add_argument("folder", type=Path)
    check.add_argument("--seeds", type=int, default=4, help="images per prompt, sampler and guidance")
    check.add_argument("--steps", type=int, default=20)
    check.add_argument("--save", action="store_true", help="also write the table to DIR/adherence.md")
    adapter = commands.add_parser("train-lora", help="train the demo LoRA adapter (ring) into a folder")
    adapter.add_argument("folder", type=Path)
    adapter.add_argument("--steps", type=int, default=None)
    fit = commands.add_parser("fit-preview", help="fit the live preview's latent-to-RGB map (latent_rgb.json)")
    fit.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "train-lora":
        from sd_pipeline.shapes.lora import LoraPlan, ring_rates, train_lora, write_lora_card

        lora_plan = LoraPlan() if args.steps is None else LoraPlan(steps=args.steps)
        report = train_lora(args.folder, lora_plan)
        rates = [ring_rates(args.folder, sampler=sampler) for sampler in ("DPM++ 2M Karras", "Euler a")]
        write_lora_card(args.folder, report, rates)
        print(json.dumps(report, indent=2))
        print("\n".join(rate.row() for rate in rates))
    elif args.command == "fit-preview":
        from sd_pipeline.shapes.preview_fit import write_latent_rgb

        print(json.dumps(write_latent_rgb(args.folder), indent=2))
    elif args.command == "train":
        from sd_pipeline.shapes.card import write_model_card, write_recommended_defaults
        from sd_pipeline.shapes.train import TrainingPlan, train_pipeline

        steps = {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps}
        plan = TrainingPlan(
            seed=args.seed, pictures=args.pictures, **{name: n for name, n in steps.items() if n is not None}
        )
        report = train_pipeline(args.folder, plan)
        from sd_pipeline.shapes.preview_fit import write_latent_rgb

        report["preview"] = write_latent_rgb(args.folder)
        write_recommended_defaults(args.folder)
        write_model_card(args.folder, report)
        print(json.dumps(report, indent=2))
    else:
        from sd_pipeline.shapes.adherence import measure_folder

        adherence = measure_folder(args.folder, seeds=args.seeds, steps=args.steps)
        print(adherence.table())
        if args.save:
            header = f"# Adherence: {args.seeds} seeds x 12 prompts, {args.steps} steps, 64x64, CPU float32\n\n"
            command = f"Measured with `python -m sd_pipeline.shapes check {args.folder.name} --save`.\n\n"
            (args.folder / "adherence.md").write_text(header + command + adherence.table() + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
