"""Storage cost against a local S3 API server (moto on loopback): one save, one history page.

    python -m bench.storage [--history 200] [--page-size 12] [--repeats 20]

Also counts the HTTP requests each operation sends, which is what costs money and latency
against real S3 (tens of milliseconds per request) far more than this loopback timing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os

from PIL import Image

from bench.common import machine, median, percentile, table, write_json
from harness.servers import running_s3_server
from storage.keys import new_image_id, owner_key
from storage.records import ImageRecord
from storage.s3 import S3Settings, S3Store


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((512, 512), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _record(owner: str, when: dt.datetime) -> ImageRecord:
    return ImageRecord(
        id=new_image_id(when),
        owner=owner,
        created_at=when.isoformat(),
        prompt="a lighthouse",
        negative_prompt="",
        seed=1,
        steps=25,
        guidance_scale=7.5,
        width=512,
        height=512,
        scheduler="Euler",
        model="bench",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=200, help="images already in the owner's history")
    parser.add_argument("--page-size", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    png = _png()
    owner = owner_key("bench-user")
    with running_s3_server() as server:
        server.create_bucket("bench")
        store = S3Store.from_settings(S3Settings(bucket="bench", endpoint_url=server.endpoint_url, region="us-east-1"))
        sent: list[str] = []
        store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.method))
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        for second in range(args.history):
            store.save(png, _record(owner, start + dt.timedelta(seconds=second)))
        save_times, page_times = [], []
        for _ in range(args.repeats):
            sent.clear()
            began = dt.datetime.now(dt.UTC)
            store.save(png, _record(owner, began))
            save_times.append((dt.datetime.now(dt.UTC) - began).total_seconds())
            save_requests = len(sent)
            sent.clear()
            began = dt.datetime.now(dt.UTC)
            store.history(owner, page=1, page_size=args.page_size)
            page_times.append((dt.datetime.now(dt.UTC) - began).total_seconds())
            page_requests = len(sent)
        store.close()
    results = {
        "machine": machine(),
        "settings": vars(args) | {"png_bytes": len(png)},
        "save": {"median_s": median(save_times), "p95_s": percentile(save_times, 0.95), "requests": save_requests},
        "history_page": {
            "median_s": median(page_times),
            "p95_s": percentile(page_times, 0.95),
            "requests": page_requests,
        },
    }
    print(
        table(
            ["operation", "median ms", "p95 ms", "S3 requests"],
            [
                [
                    "save one image + record",
                    f"{median(save_times) * 1000:.1f}",
                    f"{percentile(save_times, 0.95) * 1000:.1f}",
                    str(save_requests),
                ],
                [
                    f"history page of {args.page_size} (of {args.history + args.repeats})",
                    f"{median(page_times) * 1000:.1f}",
                    f"{percentile(page_times, 0.95) * 1000:.1f}",
                    str(page_requests),
                ],
            ],
        )
    )
    print(f"written {write_json('storage.json', results)}")


if __name__ == "__main__":
    main()
