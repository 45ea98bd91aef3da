"""The benchmark and sweep scripts start and explain their flags (they take minutes to run for real;
their numbers are in the README, with the command lines that produced them)."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("script", ["bench_embeddings.py", "bench_embeddings_qa_pairs.py", "sweep_embeddings.py", "bench_llm_finetune.py", "bench_rag.py"])
def test_script_help(script):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout and "--" in run.stdout


def test_sweep_embeddings_says_which_grid_needs_corpora():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep_embeddings.py"), "--generator", "ict",
                          "--generator", "llm"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode != 0 and "pass one --generator per run" in run.stderr
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep_embeddings.py"), "--corpus", "nowhere"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2 and "invalid choice" in run.stderr
