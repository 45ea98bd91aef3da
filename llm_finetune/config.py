"""Configs of `llm_finetune.train` and `llm_finetune.merge`: their fields are the commands' flags.

A training setting comes from, highest priority first: the flags, the optional `--config` file
(YAML or JSON, keys are the flag names), the `--preset`, and the `mistral-7b` preset (the reference
recipe). That is why the preset-controlled fields default to None: None means "not set here".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunerag.models import DEFAULT_TRAIN_MODEL, SMOLLM2
from tunerag.samples import SAMPLE_INSTRUCTIONS

PRESETS: dict[str, dict[str, Any]] = {
    # The reference recipe: Mistral-7B-Instruct v0.1 on gbharti/finance-alpaca, 4-bit NF4 QLoRA.
    "mistral-7b": {
        "base_model": DEFAULT_TRAIN_MODEL,
        "data": "gbharti/finance-alpaca",
        "val_size": 500.0,
        "max_length": 1024,
        "epochs": 1.0,
        "max_steps": -1,
        "batch_size": 4,
        "grad_accum": 4,
        "lr": 1e-4,
        "lora_r": 16,
        "lora_alpha": 4,
        "lora_dropout": 0.05,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "train_head": True,
        "gradient_checkpointing": True,
        "eval_steps": 200,
        "save_steps": 200,
        "logging_steps": 10,
    },
}
# SmolLM2-135M, sized for a 2-core CPU: 60 steps of 8 examples of up to 512 tokens, LoRA (alpha 32) on every
# linear layer (attention and MLP) plus the head, no gradient checkpointing (a 135M model's activations fit).
# The grounded fine-tune's recipe, chosen with scripts/bench_llm_finetune.py --answers (README): 60 steps
# took 16 min on grounded + instruction mixes (~16 s a step, prompts of ~200 tokens). By itself it trains on
# the shipped 578 finance instructions; `--data grounded.jsonl --data ...` (or the pipeline's --llm-data)
# gives it the grounded data of your documents mixed with them. SmolLM2 is a Llama: q/k/v/o and
# gate/up/down are its projections. A small validation split: on the CPU, evaluation of the 4-bit model
# costs about as much per example as training.
PRESETS["smollm2-cpu"] = {
    **PRESETS["mistral-7b"],
    "base_model": SMOLLM2,
    "data": str(SAMPLE_INSTRUCTIONS),
    "val_size": 24.0,
    "max_length": 512,
    "max_steps": 60,
    # one micro-batch of 8 per step: bitsandbytes de-quantizes every 4-bit weight once per forward
    # (three times with gradient checkpointing), so bigger micro-batches amortize it on the CPU
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 3e-4,
    "lora_alpha": 32,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gradient_checkpointing": False,
    "eval_steps": 20,
    "save_steps": 20,
    "logging_steps": 2,
}


def _h(text: str, **meta: Any) -> dict[str, Any]:
    return {"help": text, **meta}


@dataclass
class TrainConfig:
    """python -m llm_finetune.train --preset smollm2-cpu --out runs/smollm2: QLoRA fine-tuning (4-bit NF4 base,
    LoRA on the attention projections, trainable float32 lm_head) with the tokenizer's chat template and a
    response-only loss. Unset options come from --config, then --preset (default mistral-7b)."""

    preset: Literal["mistral-7b", "smollm2-cpu"] | None = field(
        default=None, metadata=_h("A whole setting: mistral-7b (the reference recipe, the default) or smollm2-cpu "
                                  "(the embedded SmolLM2-135M on the shipped finance_alpaca.json, ~16 min on 2 CPU "
                                  "cores)."))
    config: str | None = field(default=None, metadata=_h("A YAML or JSON file of options (keys are flag names); "
                                                         "flags override it, it overrides the preset."))
    base_model: str | None = field(default=None, metadata=_h(
        f"Base LLM: hub id, local folder, or '{SMOLLM2}' (preset: {DEFAULT_TRAIN_MODEL})."))
    data: list[str] | None = field(default=None, metadata=_h(
        "Hub data set id, or a local .json/.jsonl/.csv with instruction/input/output columns, or chat rows "
        "with `messages` (e.g. from rag.raft); repeat for several sources (preset: gbharti/finance-alpaca)."))
    data_weight: list[float] | None = field(default=None, metadata=_h(
        "Share of each --data source in the training mix, in --data order (e.g. 3 1); default: every row "
        "of every source once."))
    val_size: float | None = field(default=None, metadata=_h("Held-out validation split: a fraction (<1) or a row count."))
    out: str | None = field(default=None, metadata=_h("Run folder: checkpoints, final adapter, metrics (default runs/<preset>)."))
    max_length: int | None = field(default=None, metadata=_h("Longest example in tokens; longer ones are dropped."))
    epochs: float | None = field(default=None, metadata=_h("Training epochs."))
    max_steps: int | None = field(default=None, metadata=_h("Optimizer steps; overrides --epochs when > 0."))
    batch_size: int | None = field(default=None, metadata=_h("Examples per device per forward pass."))
    grad_accum: int | None = field(default=None, metadata=_h("Gradient accumulation steps."))
    lr: float | None = field(default=None, metadata=_h("Peak learning rate (cosine schedule)."))
    lora_r: int | None = field(default=None, metadata=_h("LoRA rank."))
    lora_alpha: int | None = field(default=None, metadata=_h("LoRA alpha."))
    lora_dropout: float | None = field(default=None, metadata=_h("LoRA dropout."))
    lora_targets: list[str] | None = field(default=None, metadata=_h(
        "Module names that get LoRA (repeatable; preset: q_proj k_proj v_proj o_proj)."))
    train_head: bool | None = field(default=None, metadata=_h("Train the lm_head too (float32, saved with the adapter)."))
    gradient_checkpointing: bool | None = field(default=None, metadata=_h(
        "Recompute activations in the backward pass (less memory, more compute; preset: on)."))
    eval_steps: int | None = field(default=None, metadata=_h("Evaluate loss and perplexity every N steps."))
    save_steps: int | None = field(default=None, metadata=_h("Checkpoint every N steps."))
    logging_steps: int | None = field(default=None, metadata=_h("Log the training loss every N steps."))
    keep_checkpoints: int = field(default=2, metadata=_h("How many recent checkpoints to keep."))
    seed: int = field(default=42, metadata=_h("Seed for the split, LoRA init and data order."))
    resume: bool = field(default=False, metadata=_h("Continue from the last complete checkpoint in --out."))

    def __post_init__(self) -> None:
        from_file = load_config_file(self.config) if self.config else {}
        unknown = sorted(set(from_file) - {f.name for f in dataclasses.fields(self)} - {"config"})
        if unknown:
            raise ValueError(f"--config {self.config!r}: unknown option(s) {', '.join(unknown)}")
        if self.preset is None:
            self.preset = from_file.get("preset", "mistral-7b")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.name in from_file:
                setattr(self, f.name, from_file[f.name])
            elif getattr(self, f.name) is None and f.name in PRESETS[self.preset]:
                setattr(self, f.name, PRESETS[self.preset][f.name])
        if self.out is None:
            self.out = f"runs/{self.preset}"
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        if not self.data:
            raise ValueError("--data needs at least one source")
        if self.data_weight is not None and (len(self.data_weight) != len(self.data) or min(self.data_weight) < 0
                                             or not sum(self.data_weight)):
            raise ValueError(f"--data-weight needs one share >= 0 per --data source ({len(self.data)}), not all 0")
        for name in ("max_length", "batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} ({getattr(self, name)}) must be >= 1")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set --epochs > 0 or --max-steps > 0")
        if not self.val_size or self.val_size <= 0:
            raise ValueError(f"--val-size ({self.val_size}) must be > 0: perplexity is measured on the held-out split")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout ({self.lora_dropout}) must be in [0, 1)")
        if not self.lora_targets:
            raise ValueError("--lora-targets needs at least one module name")


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML or JSON file; `max-length` and `max_length` are the same key."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"--config {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same one-line usage error
        raise ValueError(f"--config {path!r} could not be parsed: {str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


@dataclass
class MergeConfig:
    """python -m llm_finetune.merge --adapter runs/smollm2-cpu --out merged/: fold a QLoRA adapter and its trained
    lm_head into the full-precision base, verify the logits, and save a standard transformers folder."""

    adapter: str = field(metadata=_h("Run folder of llm_finetune.train (has adapter_config.json)."))
    out: str = field(metadata=_h("Where the merged model folder is written."))
    base: str | None = field(default=None, metadata=_h("Override the base model recorded with the adapter."))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_h("Weights dtype of the merge."))
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata=_h("Where the merge runs."))
    max_shard_size: str = field(default="2GB", metadata=_h("Largest safetensors shard."))
    overwrite: bool = field(default=False, metadata=_h("Replace --out if it exists."))

    def __post_init__(self) -> None:
        if not self.max_shard_size.strip():
            raise ValueError("--max-shard-size must not be empty (e.g. 2GB)")
