"""benchmarks/gpu_check.sh without a GPU: valid bash, a clear message at once, a dry run that shows
what it would run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_the_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for minutes")
def test_without_a_gpu_it_stops_at_once_with_a_message():
    done = run_script(timeout=60)
    assert done.returncode == 0
    assert "gpu_check: skipped: no CUDA GPU is visible" in done.stdout and "--dry-run" in done.stdout


def test_dry_run_shows_the_commands_the_tests_and_the_measurements(tmp_path):
    done = run_script("--dry-run", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "-m pytest -m cuda" in out and "benchmarks/gpu_check.py" in out and "--budget-s=240" in out
    assert "tests/test_cuda.py::test_ddp_over_nccl_matches_the_single_process_step" in out
    for row in ("ResNet-101, crop 513, 2 + 2, engine, fp32", "ResNet-101, crop 513, 2 + 2, engine, bf16",
                "ResNet-101, crop 513, 2 + 2, research-style, fp32", "DINOv2-B + DPT, crop 518, 4 + 4",
                "sliding eval"):
        assert row in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_unknown_option_is_a_usage_error():
    done = run_script("--fast")
    assert done.returncode == 2 and "unknown option '--fast'" in done.stderr
