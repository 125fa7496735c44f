"""`layerprune env`: the environment report a bug report needs, as a table and as JSON (offline)."""

import importlib.metadata
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.cli.app import console
from layerprune.hardware import compute
from layerprune.hardware.env import format_report, memory_report
from layerprune.files.cache import cache_dir

runner = CliRunner()

REPORT_KEYS = {"layerprune", "python", "platform", "packages", "cpu", "gpus", "mps", "memory", "cache", "env_vars"}
PACKAGES = {"torch", "transformers", "peft", "lm_eval", "accelerate", "datasets", "safetensors", "gguf",
            "bitsandbytes", "trl"}


@pytest.fixture
def wide_console(monkeypatch):
    """A console wide enough that no table cell wraps (the test runner's terminal is 80 columns)."""
    monkeypatch.setattr(console, "width", 250)  # rich's public setter


def test_env_json_reports_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert set(report["packages"]) == PACKAGES
    assert report["packages"]["torch"] == importlib.metadata.version("torch")
    assert report["cpu"]["cores"] == os.cpu_count()
    assert report["cpu"]["native_bf16"] == compute.cpu_native_bf16()
    assert report["cpu"]["compute"] == compute.compute_choice("cpu").to_json()
    assert report["cpu"]["isa"] == compute.isa_names(compute.cpu_flags())
    assert report["cache"]["path"] == str(cache_dir()) == str(tmp_path / "cache")
    assert report["cache"]["free_gib"] is not None  # measured on the nearest existing parent (tmp_path)
    assert report["env_vars"]["OMP_NUM_THREADS"] == "3"
    assert report["env_vars"]["LAYERPRUNE_CACHE"] == str(tmp_path / "cache")
    assert "ONEDNN_MAX_CPU_ISA" not in report["env_vars"]
    assert isinstance(report["gpus"], list)
    if not torch.cuda.is_available():
        assert report["gpus"] == []


def test_env_table_names_torch_native_bf16_and_the_cpu(wide_console):
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.stdout
    assert "native bf16" in result.stdout
    assert compute.cpu_model_name() in result.stdout
    assert importlib.metadata.version("torch") in result.stdout


def _hand_made_report(**cpu):
    return {
        "layerprune": "0.1.0", "python": "3.12.0", "platform": "Linux-x86_64",
        "packages": {"torch": "2.13.0", "peft": None},
        "cpu": {"model": "AMD EPYC 7B12", "cores": 2, "isa": ["AVX2"], "torch_capability": "AVX2",
                "native_bf16": False, "native_fp16": False, "bf16_matmul_ratio": None, **cpu},
        "gpus": [], "mps": False, "memory": {"total_gib": 7.8, "available_gib": None},
        "cache": {"path": "/tmp/cache", "free_gib": 12.5}, "env_vars": {"HF_HUB_OFFLINE": "1"},
    }


def test_format_report_of_an_avx2_cpu_says_no_native_bf16():
    rows = dict(format_report(_hand_made_report()))
    assert rows["native bf16"] == "no"
    assert "AVX2" in rows["cpu ISA"]
    assert rows["cpu"] == "AMD EPYC 7B12 (2 cores)"
    assert rows["torch"] == "2.13.0"
    assert rows["peft"] == "not installed"
    assert rows["memory"] == "7.8 GiB total, unknown available"
    assert rows["gpu"].startswith("none")
    assert rows["$HF_HUB_OFFLINE"] == "1"


def test_format_report_shows_the_measured_bf16_ratio_and_each_gpu():
    report = _hand_made_report(isa=["AVX2", "AVX512", "AMX-BF16"], native_bf16=True, bf16_matmul_ratio=0.4)
    report["gpus"] = [{"name": "NVIDIA H100", "memory_gib": 79.1, "bf16": True, "capability": "9.0"}]
    rows = dict(format_report(report))
    assert rows["native bf16"].startswith("yes") and "0.4x" in rows["native bf16"]
    assert rows["gpu 0"] == "NVIDIA H100, 79.1 GiB, capability 9.0, bf16 yes"
    assert "gpu" not in rows


def test_memory_report_reads_meminfo_and_tolerates_its_absence():
    meminfo = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n"
    assert memory_report(meminfo) == {"total_gib": 15.6, "available_gib": 7.8}
    assert memory_report("") == {"total_gib": None, "available_gib": None}
