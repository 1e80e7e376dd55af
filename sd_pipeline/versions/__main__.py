"""``python -m sd_pipeline.versions publish|promote|list|publish-lora|list-loras``: manage versions in S3.

A model's versions are under ``s3://BUCKET/PREFIX``; a LoRA store (``LORA_S3``) holds one such
versioned place per adapter, ``s3://BUCKET/PREFIX/NAME`` (``promote`` and ``list`` take it).

The store is the one the app uses: ``MODEL_S3_ENDPOINT_URL`` or ``S3_ENDPOINT_URL`` (unset: AWS),
``S3_REGION``, ``S3_ADDRESSING_STYLE``; keys from boto3's usual chain (``AWS_ACCESS_KEY_ID`` ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from sd_pipeline.contract.models import LoraStoreSettings, ModelStore
from sd_pipeline.loras.folder import SUFFIX, family_of, read_header
from sd_pipeline.loras.store import ADAPTER_FILE, LoraStore, adapter_location
from sd_pipeline.versions.location import LocationError, ModelLocation
from sd_pipeline.versions.manifest import build_adapter_manifest
from sd_pipeline.versions.registry import ModelRegistry, RegistryError, make_client


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sd_pipeline.versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: MODEL_S3_ENDPOINT_URL, then S3_ENDPOINT_URL)")
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="upload a diffusers pipeline folder as a new version")
    publish.add_argument("folder", type=Path)
    publish.add_argument("location", help="s3://BUCKET/PREFIX")
    publish.add_argument("--version", required=True, help="the new version's name (never overwritten)")
    publish.add_argument("--promote", action="store_true", help="make it the current version once uploaded")
    publish.add_argument("--source", default="", help="where it comes from (default: the folder's name)")
    publish.add_argument("--create-bucket", action="store_true", help="create the bucket when it is missing")
    publish.add_argument(
        "--if-missing", action="store_true", help="do nothing (and promote nothing) when the version exists"
    )
    adapter = commands.add_parser(
        "publish-lora", help="upload a LoRA adapter's .safetensors file as a new version of adapter NAME"
    )
    adapter.add_argument("file", type=Path)
    adapter.add_argument("location", help="s3://BUCKET/PREFIX of the LoRA store (LORA_S3)")
    adapter.add_argument("--name", help="the name prompts use, <lora:NAME> (default: the file's name)")
    adapter.add_argument("--version", required=True, help="the new version's name (never overwritten)")
    adapter.add_argument("--promote", action="store_true", help="serve it once uploaded")
    adapter.add_argument("--create-bucket", action="store_true", help="create the bucket when it is missing")
    adapter.add_argument(
        "--if-missing", action="store_true", help="do nothing (and promote nothing) when the version exists"
    )
    adapters = commands.add_parser("list-loras", help="the adapters in a LoRA store, their versions in service")
    adapters.add_argument("location", help="s3://BUCKET/PREFIX of the LoRA store")
    promote = commands.add_parser("promote", help="make a version the current one (also how to roll back)")
    promote.add_argument("location", help="s3://BUCKET/PREFIX (an adapter's: s3://BUCKET/PREFIX/NAME)")
    promote.add_argument("version")
    listing = commands.add_parser("list", help="the versions, their sizes, and which is current")
    listing.add_argument("location", help="s3://BUCKET/PREFIX")
    return parser


def _store(endpoint_url: str | None) -> ModelStore:
    return ModelStore(
        endpoint_url=endpoint_url or os.environ.get("MODEL_S3_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL"),
        region=os.environ.get("S3_REGION"),
        addressing_style=os.environ.get("S3_ADDRESSING_STYLE", "auto"),
        cache_dir="",
    )


def _location(location: str) -> ModelLocation:
    parsed = ModelLocation.parse(location)
    if parsed.pinned:
        raise LocationError(f"location: {location!r} names a version; give s3://BUCKET/PREFIX and the version apart")
    return parsed


def _publish_lora(args: argparse.Namespace) -> None:
    root = _location(args.location)
    name = args.name or args.file.name.removesuffix(SUFFIX)
    registry = ModelRegistry(make_client(_store(args.endpoint_url)), adapter_location(root, name))
    if args.create_bucket:
        registry.create_bucket()
    if args.if_missing and registry.exists(args.version):
        print(f"{registry.location}@{args.version} is already published; nothing to do")
        return
    try:
        family = family_of(read_header(args.file))
    except (OSError, ValueError, struct.error) as error:
        raise ValueError(f"file: {args.file} is not a readable .safetensors file ({error})") from None
    manifest = build_adapter_manifest(
        args.file, name=ADAPTER_FILE, version=args.version, family=family, source=args.file.name
    )
    registry.publish_files(manifest, {ADAPTER_FILE: args.file}, promote=args.promote)
    made_for = family or "a family its file does not say"
    print(f"published {registry.location}@{manifest.version} (<lora:{name}>, for {made_for})")


def _list_loras(args: argparse.Namespace) -> None:
    root = _location(args.location)
    store = LoraStore(LoraStoreSettings(location=str(root), store=_store(args.endpoint_url)))
    print(f"{'NAME':<32} {'VERSION':<20} FAMILY")
    for name, published in store.listing().items():
        print(f"{name:<32} {published.version:<20} {published.family or '?'}")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "publish-lora":
            _publish_lora(args)
            return 0
        if args.command == "list-loras":
            _list_loras(args)
            return 0
        registry = ModelRegistry(make_client(_store(args.endpoint_url)), _location(args.location))
        if args.command == "publish":
            if args.create_bucket:
                registry.create_bucket()
            if args.if_missing and registry.exists(args.version):
                print(f"{registry.location}@{args.version} is already published; nothing to do")
                return 0
            manifest = registry.publish(args.folder, args.version, promote=args.promote, source=args.source)
            print(f"published {registry.location}@{manifest.version} (hash {manifest.short_hash})")
        elif args.command == "promote":
            registry.promote(args.version)
            print(f"current version of {registry.location}: {args.version}")
        else:
            print(f"{'VERSION':<20} {'CREATED':<26} {'SIZE':>10} {'FILES':>6}  HASH        {'PIPELINE':<26} CURRENT")
            for summary in registry.versions():
                mark = "*" if summary.current else ""
                size = f"{summary.total_bytes / 1e6:.1f} MB"
                print(
                    f"{summary.name:<20} {summary.created_at:<26} {size:>10} {summary.files:>6}  "
                    f"{summary.short_hash}  {summary.pipeline_class or '?':<26} {mark}"
                )
    except (LocationError, RegistryError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
