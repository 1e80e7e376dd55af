"""The benchmark scripts run end to end in a short mode (numbers checked for sanity, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.app_server import ROOT
from tests.needs import needed_module


def run_module(module: str, *args: str, timeout: int = 600) -> str:
    finished = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished.stdout


def test_serving_benchmark_quick(tmp_path: Path) -> None:
    output = run_module("bench.serving", "--quick", "--out", str(tmp_path))
    assert "x raw batch 8" in output and "x peer" in output and "target <= +20" in output
    results = json.loads((tmp_path / "serving.json").read_text())
    for users in ("4", "8"):
        ours = results["ours"][users]
        assert ours["images_per_s"] > 0 and ours["p95_s"] >= ours["p50_s"] > 0
        assert ours["mean_batch"] >= 1 and ours["denoising_seconds_per_image"] > 0
        assert ours["web_cpu_seconds_per_image"] > 0 and ours["worker_cpu_seconds_per_image"] > 0
        assert 0 <= ours["idle_while_waiting_fraction"] <= 1 and 0 < ours["pipeline_busy_fraction"] <= 1
        assert results["peer"][users]["images_per_s"] > 0
    assert results["raw"]["8"]["images_per_s"] > 0 and results["raw"]["1"]["images_per_s"] > 0
    lone = results["lone_user"]
    assert lone["app_p50_s"] > 0 and lone["peer_p50_s"] > 0 and lone["echo_p50_s"] > 0
    assert results["ratios"]["loaded_over_raw_batch"] > 0 and results["ratios"]["loaded_over_peer"] > 0
    # The cores bound what the two processes' CPU per image allows (a clock tick of slack per process).
    assert results["ratios"]["ceiling_over_raw_batch"] >= 0.9 * results["ratios"]["loaded_over_raw_batch"]


def test_open_loop_benchmark_quick(tmp_path: Path) -> None:
    output = run_module("bench.serving", "--open-loop", "--quick", "--out", str(tmp_path), timeout=900)
    assert "80 % load: mean wait to first step" in output
    results = json.loads((tmp_path / "open_loop.json").read_text())
    assert results["capacity_images_per_s"] > 0 and results["peer_one_client_p50_s"] > 0
    for load in ("0.5", "0.8", "1.2"):
        measured = results["modes"]["step"][load]
        assert measured["p95_s"] >= measured["p50_s"] > 0
        assert measured["mean_unet_batch"] >= 1 and measured["step_s"] > 0
    assert 0 < results["modes"]["step"]["short_share_of_long"] < 1.5
    assert results["ratios"]["one_client_p50_over_peer"] > 0
    assert results["modes"]["step"]["0.8"]["wait_to_first_step_s"] >= 0


def test_previews_benchmark_quick(tmp_path: Path) -> None:
    output = run_module("bench.serving", "--previews", "--quick", "--out", str(tmp_path), timeout=900)
    assert "approx:" in output and "taesd:" in output
    results = json.loads((tmp_path / "previews.json").read_text())
    assert results["modes"]["off"]["previews_per_request"] == 0
    for mode in ("approx", "taesd"):
        measured = results["modes"][mode]
        assert measured["previews_per_request"] >= 1 and measured["images_per_s"] > 0
        assert measured["downloading_images_per_s"] > 0
        assert measured["first_preview_after_first_step_s"] >= 0
        assert results["ratios"][mode] > 0


def test_gpu_benchmark_tiny_on_cpu(tmp_path: Path) -> None:
    args = ["--tiny", "--batches", "1", "2", "--steps", "3", "--repeats", "1", "--skip-compile", "--out", str(tmp_path)]
    output = run_module("bench.gpu", *args)
    assert "MFU" in output
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert set(results["modes"]) == {"a: diffusers fp16 eager", "b: + channels_last", "c: + fused qkv"}
    for timings in results["modes"].values():
        for batch in ("1", "2"):
            assert timings[batch]["images_per_s"] > 0 and 0 < timings[batch]["mfu"] < 1
            assert 0 < timings[batch]["unet_fraction_of_call"] < 1  # the UNet is timed apart from the rest
            # UNet-only time: more UNet steps per second than whole calls per second
            assert timings[batch]["unet_it_per_s"] > timings[batch]["images_per_s"] / int(batch) * 3
            assert timings[batch]["max_abs_diff_vs_a"] < 0.02  # 8-bit PNG rounding is 0.004


def test_lora_benchmark_runs() -> None:
    output = run_module("bench.loras", "--repeats", "1", "--steps", "2", "--rank", "4")
    assert "4 different adapters vs one shared:" in output and "x the time" in output


def test_pictures_benchmark_runs() -> None:
    output = run_module("bench.pictures", "--repeats", "1", "--steps", "2")
    assert "4 mixed requests together vs one after another:" in output and "x the time" in output


def test_core_and_storage_benchmarks_run() -> None:
    core = run_module("bench.core", "--repeats", "1", "--steps", "2", "--family", "sd3")
    assert "Stable Diffusion 3 / 3.5: batch of 4 vs 4 single calls" in core
    storage = run_module("bench.storage", "--history", "15", "--repeats", "2")
    assert "| save one image + record " in storage and "history page of 12" in storage


def test_cuda_checks_script_runs_on_cpu(tmp_path: Path) -> None:
    output = run_module("bench.cuda_checks", "--tiny", "--out", str(tmp_path))
    assert "PASS compile" in output and "PASS oom_and_memory" in output and "PASS shapes" in output
    results = json.loads((tmp_path / "cuda_checks.json").read_text())
    assert results["compile"]["new_graphs"] == 0
    assert results["oom_and_memory"]["events"] == ["call:4", "call:4"]  # two steps, each one UNet call of 4 (no OOM)


def test_thread_policy_benchmark_quick(tmp_path: Path) -> None:
    output = run_module("bench.threads", "--quick", "--kinds", "heavy", "--steps", "4", "--out", str(tmp_path))
    assert "adaptive (default)" in output and "naive Gradio peer" in output and "heavy: 1 client p50" in output
    results = json.loads((tmp_path / "threads.json").read_text())
    (measured,) = results["kinds"].values()
    assert len(measured["app"]) == 3 and measured["raw"]["images_per_s"] > 0
    for by_clients in [*measured["app"].values(), measured["peer"]]:
        for clients in ("1", "8"):
            assert by_clients[clients]["p95_s"] >= by_clients[clients]["p50_s"] > 0


def test_gpu_served_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    """The SDXL row (the SD one runs the same code with SD's builder): raw at batch 1 and 2, served."""
    output = run_module(
        "bench.gpu_served",
        "--tiny",
        "--family",
        "sdxl",
        "--clients",
        "2",
        "--batch",
        "2",
        "--raw-batches",
        "1,2",
        "--per-client",
        "2",
        "--raw-calls",
        "1",
        "--out",
        str(tmp_path),
    )
    assert "served / raw at batch 2" in output and "raw pipeline, batch 1" in output
    results = json.loads((tmp_path / "gpu_served_sdxl.json").read_text())
    assert results["settings"]["family"] == "sdxl" and set(results["raw_by_batch"]) == {"1", "2"}
    assert results["raw"]["images_per_s"] > 0 and results["served"]["2"]["mean_batch"] >= 1
    assert results["served_over_raw"] > 0


def test_the_gpu_rows_build_the_published_architectures() -> None:
    """Built on the meta device (no memory): the UNets have SD 1.5's and SDXL base's published
    parameter counts, and SDXL's text towers give its 2048-wide context and 1280-wide pooled text."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    from bench.gpu import SD15_TEXT, SD15_UNET, SDXL_TEXT_2, SDXL_UNET

    with torch.device("meta"):
        unets = [UNet2DConditionModel(**config) for config in (SD15_UNET, SDXL_UNET)]
    assert [sum(p.numel() for p in unet.parameters()) for unet in unets] == [859_520_964, 2_567_463_684]
    first, second = CLIPTextConfig(**SD15_TEXT), CLIPTextConfig(**SDXL_TEXT_2)
    assert first.hidden_size + second.hidden_size == SDXL_UNET["cross_attention_dim"]
    time_ids = 6 * SDXL_UNET["addition_time_embed_dim"]
    assert SDXL_UNET["projection_class_embeddings_input_dim"] == second.projection_dim + time_ids


def test_simulated_scaleout_benchmark_quick(tmp_path: Path) -> None:
    needed_module("ray.serve")
    output = run_module("bench.scaleout", "--simulate", "--quick", "--out", str(tmp_path), timeout=900)
    assert "x N x 1 replica" in output
    results = json.loads((tmp_path / "scaleout_simulated.json").read_text())
    assert results["settings"]["simulated_gpu"] == "unet=32.6+1.1*n,vae=13*n"
    runs = {(run["replicas"], run["front_ends"]): run for run in results["runs"]}
    assert set(runs) == {(1, 1), (2, 1), (2, 2)}
    for run in runs.values():
        assert run["p95_s"] >= run["p50_s"] > 0 and run["cpu_cores"]["front ends"] > 0
        assert 'simulated="unet=32.6+1.1*n,vae=13*n"' in run["model_info"]  # the app says so
        # 25 modelled steps of at least 32.6 ms each: no request can be faster than the model says.
        assert run["p50_s"] > 25 * 0.0326


def test_framework_floors_benchmark_quick(tmp_path: Path) -> None:
    needed_module("ray.serve")
    output = run_module("bench.floors", "--quick", "--out", str(tmp_path), timeout=900)
    assert "bare Gradio /generate, 2 previews" in output and "bare Ray Serve stream, 9 messages" in output
    results = json.loads((tmp_path / "floors.json").read_text())
    gradio = {previews: results["gradio"][previews]["server_cpu_ms_per_request"] for previews in ("0", "2")}
    assert 0 < gradio["0"] < gradio["2"]  # each preview is an output Gradio processes and streams
    for messages in ("1", "9"):
        ray = results["ray"][messages]
        assert ray["caller_cpu_ms_per_request"] > 0 and ray["ray_cpu_ms_per_request"] > 0
        assert ray["requests_per_s"] > 0
    assert results["front_end_floor_ms"] == gradio["2"] + results["ray"]["9"]["caller_cpu_ms_per_request"]


def test_scaleout_benchmark_quick(tmp_path: Path) -> None:
    needed_module("ray.serve")
    output = run_module("bench.scaleout", "--quick", "--clients", "2", "--out", str(tmp_path), timeout=900)
    assert "x 1 replica" in output and "both running again after" in output
    results = json.loads((tmp_path / "scaleout.json").read_text())
    assert results["ratio_2_over_1"] > 0 and results["replicas"]["2"]["recovery_s"] > 0
    for replicas in ("1", "2"):
        assert results["replicas"][replicas]["p95_s"] >= results["replicas"][replicas]["p50_s"] > 0


def test_rollout_benchmark_quick(tmp_path: Path) -> None:
    output = run_module("bench.rollout", "--quick", "--out", str(tmp_path), timeout=900)
    results = json.loads((tmp_path / "rollout.json").read_text())
    (mode,) = results["modes"]
    assert mode["mode"] == "overlap" and mode["failed_requests"] == 0 and mode["served"] > 0
    (rollout,) = mode["rollouts"]
    assert rollout["promote_to_first_new_image_s"] > 0 and rollout["promote_to_switch_counted_s"] > 0
    assert "promote->first new image" in output
