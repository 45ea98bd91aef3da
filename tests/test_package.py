"""The installable tool: the core package sits under the command packages, the `tunerag` console
script runs each command, and a built wheel works from an empty folder with its shipped data."""

import ast
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import REPO

# Which top-level packages each package may import (the graph reads top to bottom).
ALLOWED = {
    "tunerag": {"tunerag"},
    "embeddings": {"tunerag", "embeddings"},
    "llm_finetune": {"tunerag", "llm_finetune"},
    "rag": {"tunerag", "rag", "embeddings", "llm_finetune"},
}
OURS = {"tunerag", "embeddings", "llm_finetune", "rag", "scripts"}
# rag may use the other packages' public functions; their internals stay theirs
PUBLIC = {"embeddings", "embeddings.config", "embeddings.prepare", "llm_finetune", "llm_finetune.data",
          "llm_finetune.train", "llm_finetune.merge"}


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] in OURS]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_graph_reads_top_to_bottom(package):
    core_modules_on_top = {"tunerag.pipeline", "tunerag.cli", "tunerag.__main__"}  # the layer above the three
    for path in sorted((REPO / package).rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if module in core_modules_on_top:
            continue
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top in ALLOWED[package], f"{module} imports {name}"
            if package == "rag" and top in {"embeddings", "llm_finetune"}:
                assert name in PUBLIC, f"{module} imports {name}, an internal of {top}"


def test_embeddings_and_rag_never_import_llm_finetune_internals():
    for package in ("embeddings", "rag"):
        for path in (REPO / package).rglob("*.py"):
            for name in imports_of(path):
                assert not name.startswith("llm_finetune.") or name in PUBLIC, f"{path}: {name}"


def test_console_script_runs_every_command():
    from tunerag.cli import COMMANDS

    for name in COMMANDS:
        run = subprocess.run(["tunerag", name, "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (name, run.stderr[-1500:])
        assert run.stdout.startswith(f"usage: tunerag {name}"), run.stdout[:200]
    version = subprocess.run(["tunerag", "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip().startswith("tunerag 0.")


def test_help_shows_each_flag_once():
    run = subprocess.run(["tunerag", "ask", "--help"], capture_output=True, text=True, timeout=60)
    assert "--retrieve-only" in run.stdout
    assert "--retrieve_only" not in run.stdout and "--no-retrieve-only" not in run.stdout
    assert "--max_new_tokens" not in run.stdout


@pytest.mark.slow
def test_wheel_installs_and_answers_from_an_empty_folder(tmp_path, tunerag_home):
    """Build the wheel, install it (not editable) into a new virtualenv that sees this machine's
    dependencies but not the checkout, and run the quick start from an empty folder."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, timeout=300)
    wheel = next(dist.glob("tunerag-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PATH": f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import tunerag, tunerag.samples as s; print(tunerag.__file__); "
                            "print(s.SAMPLE_REPORT)"], cwd=empty, env=env, capture_output=True, text=True, check=True)
    module_file, report = where.stdout.split()
    assert module_file.startswith(str(env_dir)), "the wheel's tunerag, not the checkout's"
    assert report.startswith(str(env_dir)) and Path(report).is_file()
    tunerag = str(env_dir / "bin" / "tunerag")
    ask = subprocess.run([tunerag, "ask", "--file", report, "-q", "What was total revenue in 2025?", "--json",
                          "--max-new-tokens", "24"], cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert ask.returncode == 0, ask.stderr[-2000:]
    result = json.loads(ask.stdout)["result"]  # --answer auto with the local SmolLM2: a quote of the report
    assert result and " ".join(result.split())[:60] in " ".join(Path(report).read_text().split()), result
    assert subprocess.run([tunerag, "pipeline", "--help"], cwd=empty, env=env, capture_output=True,
                          timeout=120).returncode == 0
    preset = subprocess.run([str(python), "-c", "from llm_finetune.config import TrainConfig; "
                             "print(TrainConfig(preset='smollm2-cpu').data[0])"], cwd=empty, env=env, capture_output=True,
                            text=True, check=True)
    assert preset.stdout.strip().startswith(str(env_dir)) and Path(preset.stdout.strip()).is_file()
    samples = subprocess.run([tunerag, "samples"], cwd=empty, env=env, capture_output=True, text=True, timeout=60)
    assert "finance_alpaca.json" in samples.stdout and samples.stdout.startswith(str(env_dir))
    assert "policy/policy_qa.json" in samples.stdout  # every shipped corpus is in the wheel
    assert sorted(p.name for p in empty.iterdir()) == ["chroma_db"]
