"""The `tunerag` console script: one command with the subcommands below, each the very same
`main(cfg)` and flags as its `python -m` form.

    tunerag ask --file report.pdf -q "What was the CET1 ratio?"     # python -m rag.cli
    tunerag pipeline --docs my_reports/ --out runs/mine              # python -m tunerag.pipeline
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tunerag import __version__

# subcommand: (module, config class, what it does); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str, str]] = {
    "ask": ("rag.cli", "RagConfig", "answer questions about your documents (python -m rag.cli)"),
    "serve": ("rag.serve", "ServeConfig", "a web page and HTTP API over your documents"),
    "prepare": ("embeddings.prepare", "PrepareConfig", "synthetic (query, passage) pairs from documents"),
    "finetune": ("embeddings.finetune", "FinetuneConfig", "fine-tune the embedder on those pairs"),
    "evaluate": ("embeddings.evaluate", "EvaluateConfig", "retrieval metrics of embedders, side by side"),
    "raft": ("rag.raft", "RaftConfig", "grounded fine-tuning data from documents (questions, passages, cited answers)"),
    "train": ("llm_finetune.train", "TrainConfig", "QLoRA fine-tuning of a causal LLM"),
    "merge": ("llm_finetune.merge", "MergeConfig", "merge a QLoRA adapter into the full-precision base"),
    "pipeline": ("tunerag.pipeline", "PipelineConfig", "the whole loop, with report.md"),
    "samples": ("tunerag.samples", "SamplesConfig", "print the paths of the shipped sample files"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="tunerag", description="End-to-end finance RAG, offline: " + ", ".join(COMMANDS) + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {name:<10}{what}" for name, (_, _, what) in COMMANDS.items())
        + "\n\n`tunerag COMMAND --help` lists a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"tunerag {__version__}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] not in COMMANDS:  # --help, --version, or a usage error
        parser.parse_args(argv)
    module_name, config_name, _ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    from tunerag.common import run_cli

    run_cli(module.main, getattr(module, config_name), argv[1:], prog=f"tunerag {argv[0]}")


if __name__ == "__main__":
    main()
