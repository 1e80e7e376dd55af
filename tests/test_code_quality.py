"""The linters the project is held to run as part of the suite."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_lint_and_format() -> None:
    for command in (["check", "."], ["format", "--check", "."]):
        finished = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stdout + finished.stderr


def test_mypy_strict() -> None:
    packages = ["app.py", "sd_pipeline", "storage", "monitoring", "webapp"]
    existing = [name for name in packages if (ROOT / name).exists()]
    finished = subprocess.run(
        [sys.executable, "-m", "mypy", *existing], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr


def test_readme_documents_every_setting() -> None:
    from webapp.settings import setting_fields

    readme = (ROOT / "README.md").read_text()
    names = setting_fields()
    assert {"sd_model", "s3_bucket", "ray_address", "worker_stall_seconds", "host"} <= set(names)  # every group's
    missing = [name.upper() for name in names if f"`{name.upper()}`" not in readme]
    assert missing == []


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```bash\n")
    test_command = blocks[2].split("\n")[1]
    assert test_command == "bash scripts/install-test-deps.sh && python -m pytest"
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_import_rules_hold() -> None:
    """The layers and forbidden imports declared in pyproject.toml ([tool.importlinter]), checked by import-linter."""
    lint = Path(sys.executable).with_name("lint-imports")
    finished = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "0 broken" in finished.stdout


HEAVY = ("torch", "diffusers", "ray", "transformers")


def loaded_modules(code: str) -> tuple[list[str], str]:
    """The heavy packages a fresh interpreter has loaded after ``code``, and what it printed."""
    script = f"{code}\nimport sys\nprint('LOADED', [m for m in {HEAVY!r} if m in sys.modules])"
    finished = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    loaded = next(line for line in finished.stdout.splitlines() if line.startswith("LOADED"))
    return ast.literal_eval(loaded.removeprefix("LOADED ")), finished.stdout + finished.stderr


def test_help_and_a_bad_setting_load_no_model_stack() -> None:
    help_text = subprocess.run(
        [sys.executable, "-X", "importtime", "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0 and "--sd-model" in help_text.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in help_text.stderr.splitlines() if "|" in line}
    assert imported.isdisjoint(HEAVY), imported & set(HEAVY)
    bad = subprocess.run(
        [sys.executable, "-X", "importtime", "app.py", "--max-batch-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "invalid setting MAX_BATCH_SIZE" in bad.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in bad.stderr.splitlines() if "|" in line}
    assert imported.isdisjoint(HEAVY), imported & set(HEAVY)


def test_settings_the_web_layer_and_the_backends_parent_side_load_no_model_stack() -> None:
    loaded, output = loaded_modules(
        "import app, webapp.settings, webapp.ui, sd_pipeline.admission, sd_pipeline.backends.local.supervisor\n"
        "app.load_settings(['--ray-replicas', '2'], env={'RAY_ADDRESS': 'local'}).ray_plan()"
    )
    assert loaded == [], output


def test_a_missing_test_dependency_fails_in_ci_and_is_skipped_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken Ray (or a missing haproxy) in CI must fail the run, not pass as skipped tests."""
    from tests.needs import needed_module, needed_program

    monkeypatch.setenv("CI", "true")
    with pytest.raises(ModuleNotFoundError):
        needed_module("no_such_module_for_the_suite")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        needed_program("no-such-program-for-the-suite")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        needed_module("no_such_module_for_the_suite")
    with pytest.raises(pytest.skip.Exception):
        needed_program("no-such-program-for-the-suite")
    assert needed_module("json").dumps([]) == "[]"


def test_the_readme_demo_images_are_what_their_caption_says() -> None:
    """Each demo picture's PNG parameters are the model's recommended settings, as the caption says."""
    import json
    import re

    from sd_pipeline.png import read_png_parameters

    readme = (ROOT / "README.md").read_text()
    recommended = json.loads((ROOT / "models" / "tiny-shapes" / "model_defaults.json").read_text())
    guidance, steps = recommended["guidance_scale"], recommended["steps"]
    assert f"guidance {guidance:g}, {steps} steps" in readme
    shown = re.findall(r'<img src="(docs/images/demo-[a-z-]+\.png)" width="128" alt="([^"]+)">', readme)
    assert len(shown) == 4
    for seed, (path, prompt) in enumerate(shown, start=1):
        drawn = read_png_parameters((ROOT / path).read_bytes())
        assert (drawn.prompt, drawn.seed, drawn.steps, drawn.cfg_scale) == (prompt, seed, steps, guidance), path
        assert (drawn.sampler, drawn.width, drawn.height) == ("DPM++ 2M Karras", 64, 64), path


def test_the_metrics_table_names_every_metric_and_label() -> None:
    """README's metrics table against the registry: every sdapp_ metric, with its labels."""
    import re

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from monitoring.metrics import Metrics

    metrics = Metrics(registry=CollectorRegistry())
    readme = (ROOT / "README.md").read_text()
    first_cells = [line.split("|")[1] for line in readme.splitlines() if line.startswith("| `sdapp_")]
    documented = dict(re.findall(r"`(sdapp_[a-z_]+)(?:\{([a-z_,]+)\})?`", " ".join(first_cells)))
    missing = []
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name + {"counter": "_total", "info": "_info"}.get(metric._type, "")
        labels = ",".join(sorted(metric._labelnames))
        if metric._type == "info" and name in documented:
            continue  # an info metric's labels are its values, given when it is set
        if name not in documented or sorted(documented[name].split(",")) != sorted(labels.split(",")):
            missing.append(f"{name}{{{labels}}}" if labels else name)
    assert missing == []


def test_the_readme_lora_images_are_the_committed_adapters() -> None:
    """The two LoRA pictures: the caption's prompts at the model's settings, one drawn with the committed adapter."""
    import re

    from sd_pipeline.loras.folder import short_hash
    from sd_pipeline.png import read_png_parameters

    readme = (ROOT / "README.md").read_text()
    shown = re.findall(r'<img src="(docs/images/lora-ring-[a-z]+\.png)" width="128" alt="([^"]+)">', readme)
    assert [prompt for _, prompt in shown] == ["a red ring <lora:ring>", "a red ring"]
    drawn = [read_png_parameters((ROOT / path).read_bytes()) for path, _ in shown]
    assert [(d.prompt, d.seed, d.steps, d.cfg_scale) for d in drawn] == [(p, 1, 20, 4.0) for _, p in shown]
    assert drawn[0].lora_hashes == f"ring: {short_hash(ROOT / 'models' / 'loras' / 'ring.safetensors')}"
    assert drawn[1].lora_hashes == ""
