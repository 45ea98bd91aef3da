"""Benchmark of llm_finetune end to end: the smollm2-cpu preset, then its merge, then a bare Trainer.

    python scripts/bench_llm_finetune.py                      # the whole preset
    python scripts/bench_llm_finetune.py --max-steps 6        # a short run (label it as such)
    python scripts/bench_llm_finetune.py --answers            # the grounded fine-tune: base vs tuned answers

--answers (the grounded fine-tune, RAFT): rag.raft builds grounded data from each shipped corpus
(SmolLM2 writes the questions; hand-written questions are never trained on), the preset trains on it
mixed with the shipped instructions (--data-weight), the adapter is merged, and the base and the
merged model answer the held-out hand-written questions of every corpus through rag.cli's own path
(same retriever, context and store), side by side: answer match, evidence match, the share answered
when the passages hold the answer and the share declined when they do not; and the other corpus's
questions, whose answers are in none of the passages ("foreign": declined is right).

Prints one JSON object on stdout (perplexity on the held-out split before/after, training tokens/s,
peak memory, merge seconds, and our tokens/s as a ratio to a bare transformers Trainer run with the same
model, 4-bit config, LoRA, examples and batch settings) and a short table on stderr.
Tokens/s counts non-padding input tokens over the Trainer's running train_runtime at the last training
step, in both runs; in-training evaluation and checkpoints are off for the timed run, and the
Trainer's end-of-training evaluation comes after that log, so both runs time the same work.
"""

from __future__ import annotations

import itertools
import json
import logging
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a checkout without an install

from tunerag.common import parse_config  # noqa: E402

logger = logging.getLogger("bench_llm_finetune")


@dataclass
class BenchConfig:
    """python scripts/bench_llm_finetune.py [--max-steps N]: train (smollm2-cpu), merge, and a bare-Trainer baseline."""

    preset: str = field(default="smollm2-cpu", metadata={"help": "Training preset to benchmark."})
    max_steps: int | None = field(default=None, metadata={"help": "Override the preset's steps (a short run)."})
    baseline: bool = field(default=True, metadata={"help": "Also time a bare Trainer run for the tokens/s ratio."})
    workdir: str | None = field(default=None, metadata={"help": "Where runs go (default: a temporary folder)."})
    seed: int = field(default=42, metadata={"help": "Seed."})
    answers: bool = field(default=False, metadata={"help": "Benchmark the grounded fine-tune's answers instead (see above)."})
    corpus: list[str] = field(default_factory=lambda: ["sample", "long", "policy"], metadata={
        "help": "--answers: corpora (repeat)."})
    raft_questions: list[int] = field(default_factory=lambda: [100, 200, 100], metadata={
        "help": "--answers: generated questions per corpus, in --corpus order."})
    p_missing: float = field(default=0.0, metadata={"help": "--answers: rag.raft --p-missing."})
    p_foreign: float = field(default=0.0, metadata={
        "help": "--answers: rag.raft --p-foreign (tune-half questions of the other corpora; the held-out ones asked "
                "as foreign questions are never trained on)."})
    evidence_cut: Literal["skip", "insert"] = field(default="skip", metadata={"help": "--answers: rag.raft --evidence-cut."})
    raft_context_tokens: int | None = field(default=None, metadata={
        "help": "--answers: rag.raft --context-tokens, the passages' budget in the training prompts "
                "(default: rag.cli's)."})
    eval_context_tokens: list[int] | None = field(default=None, metadata={
        "help": "--answers: rag.cli --context-tokens of the answers, repeat to compare budgets (default: rag.cli's)."})
    answer: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "help": "--answers: rag.cli --answer of the answers, repeat to compare them.", "choices": ["auto", "llm", "quote"]})
    data_weight: list[float] = field(default_factory=lambda: [4.0, 1.0], metadata={
        "help": "--answers: shares of grounded data and of the shipped instructions."})
    lr: float | None = field(default=None, metadata={"help": "--answers: learning rate (default: the preset's)."})
    lora_alpha: int | None = field(default=None, metadata={"help": "--answers: LoRA alpha (default: the preset's)."})
    lora_targets: list[str] | None = field(default=None, metadata={
        "help": "--answers: modules that get LoRA, repeatable (default: the preset's)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "--answers: recompute activations in the backward pass (default: the preset's)."})
    qa_tune: bool = field(default=True, metadata={
        "help": "--answers: rag.raft also gets each corpus's hand-written tune-half questions (--qa-file); the "
                "held-out half is never trained on."})
    eval_questions: int = field(default=0, metadata={
        "help": "--answers: answer only the first N held-out questions per corpus (0: all; generation is slow on CPU)."})
    foreign_questions: int = field(default=20, metadata={
        "help": "--answers: held-out questions of the other corpus asked per corpus (their answers are absent)."})


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def steady_tokens_per_second(log_history: list[dict]) -> float:
    """Tokens/s from the Trainer's own per-step log (num_input_tokens_seen, running train_runtime), from
    the end of step 1 (warm-up excluded) to the last step. The last step is logged before the
    Trainer's end-of-training evaluation and checkpoint, so both runs time the same work."""
    steps = [e for e in log_history if "loss" in e and "train_runtime" in e]
    first, last = (steps[0], steps[-1]) if len(steps) > 1 else ({"num_input_tokens_seen": 0, "train_runtime": 0.0}, steps[-1])
    return (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / (last["train_runtime"] - first["train_runtime"])


def bare_trainer_tokens_per_second(train_cfg, workdir: Path) -> dict:
    """The same model, 4-bit config, LoRA, examples and batch settings through a plain Trainer: no chat
    template bookkeeping, no evaluation, no checkpoints, labels from DataCollatorForLanguageModeling."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from llm_finetune.data import build_examples, ensure_pad_token
    from llm_finetune.train import bnb_config, training_rows
    from tunerag.models import load_tokenizer, resolve_llm

    set_seed(train_cfg.seed)
    base = resolve_llm(train_cfg.base_model)
    tokenizer = load_tokenizer(base)
    ensure_pad_token(tokenizer)
    train_rows, _ = training_rows(train_cfg)
    examples = [{"input_ids": e["input_ids"]} for e in build_examples(tokenizer, train_rows, train_cfg.max_length)]
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config(torch.float32), dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha, lora_dropout=train_cfg.lora_dropout, bias="none",
        target_modules=list(train_cfg.lora_targets), modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.grad_accum, learning_rate=train_cfg.lr, lr_scheduler_type="cosine",
        max_steps=train_cfg.max_steps, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch", save_strategy="no",
        eval_strategy="no", logging_steps=train_cfg.logging_steps, report_to="none", seed=train_cfg.seed,
        data_seed=train_cfg.seed, include_num_input_tokens_seen="non_padding", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    result = trainer.train()
    return {"train_tokens": trainer.state.num_input_tokens_seen, "train_seconds": result.metrics["train_runtime"],
            "tokens_per_second": steady_tokens_per_second(trainer.state.log_history)}


def quiet_stdout(fn, *args):
    """The Trainer prints its log dicts to stdout; stdout is reserved for the one JSON object."""
    import contextlib

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args)


def in_fresh_process(fn, *args):
    """Run one phase in its own process: a second training in the same process ran 4-5x slower here
    (measured), and each phase gets its own peak RSS."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(quiet_stdout, fn, *args).result()


def phase_ours(train_cfg) -> dict:
    from llm_finetune import train

    t0 = time.perf_counter()
    metrics = train.main(train_cfg)
    return {**metrics, "command_seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()}


def phase_merge(merge_cfg) -> dict:
    from llm_finetune import merge

    t0 = time.perf_counter()
    report = merge.main(merge_cfg)
    return {**report, "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib()}


def phase_bare(train_cfg, workdir: Path) -> dict:
    return {**bare_trainer_tokens_per_second(train_cfg, workdir), "peak_rss_gib": peak_rss_gib()}


def phase_raft(raft_cfg) -> dict:
    from rag import raft

    return raft.main(raft_cfg)


def phase_answers(eval_cfg, spec: str, corpus_items: list, persist_dir: Path) -> dict:
    from rag.evaluate import bench_llm

    return bench_llm(eval_cfg, spec, eval_cfg.embeddings[0], corpus_items, persist_dir)


def spread(items: list, n: int) -> list:
    """n items taken at an even stride (every document of a corpus is represented); all when n is 0."""
    return items if not n or n >= len(items) else [items[i * len(items) // n] for i in range(n)]


TRAIN_OVERRIDES = ("lr", "lora_alpha", "lora_targets", "gradient_checkpointing")  # --answers: preset values if None


def grounded(cfg: BenchConfig) -> dict:
    """The --answers benchmark (see the module docstring)."""
    from llm_finetune.config import MergeConfig, TrainConfig
    from rag.config import rag_default
    from rag.evaluate import RagEvalConfig
    from rag.raft import RaftConfig
    from tunerag.samples import SAMPLE_INSTRUCTIONS, corpus_files, corpus_questions

    t0 = time.perf_counter()
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_grounded-"))
    workdir.mkdir(parents=True, exist_ok=True)
    grounded_rows = workdir / "grounded.jsonl"
    raft_stats = {}
    if not grounded_rows.is_file():
        for corpus, n in zip(cfg.corpus, cfg.raft_questions):
            qa_file = None
            if cfg.qa_tune:
                qa_file = workdir / f"tune_{corpus}.json"
                qa_file.write_text(json.dumps(corpus_questions(corpus, "tune")))
            raft_stats[corpus] = in_fresh_process(phase_raft, RaftConfig(
                docs=corpus_files(corpus), out=workdir / f"raft_{corpus}.jsonl", questions=n, p_missing=cfg.p_missing,
                p_foreign=cfg.p_foreign, evidence_cut=cfg.evidence_cut, qa_file=qa_file, persist_dir=workdir / "chroma",
                seed=cfg.seed,
                **({"context_tokens": cfg.raft_context_tokens} if cfg.raft_context_tokens else {})))
        grounded_rows.write_text("".join((workdir / f"raft_{c}.jsonl").read_text() for c in cfg.corpus))
    overrides = {"max_steps": cfg.max_steps} if cfg.max_steps else {}
    train_cfg = TrainConfig(preset=cfg.preset, out=str(workdir / "run"), seed=cfg.seed,
                            data=[str(grounded_rows), str(SAMPLE_INSTRUCTIONS)], data_weight=list(cfg.data_weight),
                            **overrides, **{name: getattr(cfg, name) for name in TRAIN_OVERRIDES
                                            if getattr(cfg, name) is not None})
    if not (workdir / "run" / "adapter_config.json").is_file():
        metrics = in_fresh_process(phase_ours, train_cfg)
    else:
        metrics = json.loads((workdir / "run" / "metrics.json").read_text())
    merged = workdir / "merged"
    if not (merged / "config.json").is_file():
        in_fresh_process(phase_merge, MergeConfig(adapter=train_cfg.out, out=str(merged)))
    results = {}
    for i, corpus in enumerate(cfg.corpus):
        other = cfg.corpus[(i + 1) % len(cfg.corpus)]
        heldout = corpus_questions(corpus, "heldout")
        sets = {"heldout": spread(heldout, cfg.eval_questions)}
        if other != corpus and cfg.foreign_questions:
            sets["foreign"] = spread(corpus_questions(other, "heldout"), cfg.foreign_questions)
        for tokens, answer in itertools.product(cfg.eval_context_tokens or [rag_default("context_tokens")], cfg.answer):
            eval_cfg = RagEvalConfig(file=corpus_files(corpus), gen_questions=10_000, max_new_tokens=48, seed=0,
                                     context_tokens=tokens, answer=answer)
            for name, items in sets.items():
                for label, spec in (("base", train_cfg.base_model), ("tuned", str(merged))):
                    results[f"{corpus}/{name}/{label}@{tokens}/{answer}"] = in_fresh_process(
                        phase_answers, eval_cfg, spec, items, workdir / "chroma")
    keys = ("answer_match", "evidence_match", "answered_when_in_passages", "declined_when_not_in_passages")
    table = {name: {k: r[k] for k in keys} | {"questions": r["questions"]} for name, r in results.items()}
    report = {"bench": "llm_finetune_answers", "config": asdict(cfg), "train_config": asdict(train_cfg),
              "raft": raft_stats, "train": {k: metrics.get(k) for k in ("n_train", "n_val", "global_step", "perplexity_before",
                                                                        "perplexity_after", "train")},
              "results": table, "answers": {name: r["answers"] for name, r in results.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{'corpus/questions/model@tokens/answer':<40} {'n':>4} {'answer':>7} {'evidence':>9} {'answered':>9} "
          f"{'declined':>9}", file=sys.stderr)
    for name, row in table.items():
        cells = [f"{row[k]:.3f}" if row[k] is not None else "-" for k in keys]
        print(f"{name:<40} {row['questions']:>4} {cells[0]:>7} {cells[1]:>9} {cells[2]:>9} {cells[3]:>9}",
              file=sys.stderr)
    print(json.dumps(report, default=str))
    return report


def main(cfg: BenchConfig) -> dict:
    import torch

    from llm_finetune.config import MergeConfig, TrainConfig

    t0 = time.perf_counter()
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_llm_finetune-"))
    overrides = {"max_steps": cfg.max_steps} if cfg.max_steps else {}
    probe = TrainConfig(preset=cfg.preset, **overrides)
    # evaluation and checkpoints only before/after the training steps, so that both runs time the same work
    train_cfg = TrainConfig(preset=cfg.preset, out=str(workdir / "run"), seed=cfg.seed, logging_steps=1,
                            eval_steps=probe.max_steps + 1, save_steps=probe.max_steps + 1, **overrides)
    logger.info("training %s for %d steps in %s", train_cfg.base_model, train_cfg.max_steps, workdir)
    # the machine may be shared: bare runs before AND after ours bracket any drift in load
    bare_runs = [in_fresh_process(phase_bare, train_cfg, workdir / "bare1")] if cfg.baseline else []
    metrics = in_fresh_process(phase_ours, train_cfg)
    merged = in_fresh_process(phase_merge, MergeConfig(adapter=train_cfg.out, out=str(workdir / "merged")))
    ours = steady_tokens_per_second(metrics["log_history"])
    result = {
        "perplexity_before": metrics["perplexity_before"], "perplexity_after": metrics["perplexity_after"],
        "n_train": metrics["n_train"], "n_val": metrics["n_val"], "steps": metrics["global_step"],
        "train_tokens": metrics["train_tokens"], "train_tokens_per_second": ours,
        "train_command_seconds": metrics["command_seconds"], "peak_rss_gib_train": metrics["peak_rss_gib"],
        "merge_seconds": merged["seconds"], "merge_max_abs_logit_diff": merged["max_abs_logit_diff"],
        "peak_rss_gib_merge": merged["peak_rss_gib"], "trainable_params": metrics["trainable_params"],
    }
    if cfg.baseline:
        bare_runs.append(in_fresh_process(phase_bare, train_cfg, workdir / "bare2"))
        bare = sum(b["tokens_per_second"] for b in bare_runs) / len(bare_runs)
        result.update({"bare_trainer_runs": bare_runs, "bare_trainer_tokens_per_second": bare,
                       "tokens_per_second_ratio_vs_bare": ours / bare})
    report = {"bench": "llm_finetune", "config": asdict(cfg), "train_config": asdict(train_cfg), "device": "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "metrics": result,
              "seconds": round(time.perf_counter() - t0, 3)}
    rows = [("perplexity before -> after", f"{result['perplexity_before']:.3f} -> {result['perplexity_after']:.3f}"),
            ("train tokens/s, steps 2..N (ours)", f"{ours:.1f}"),
            ("train tokens/s (bare Trainer, runs)",
             ", ".join(f"{b['tokens_per_second']:.1f}" for b in bare_runs) if cfg.baseline else "-"),
            ("ratio ours / mean bare", f"{result.get('tokens_per_second_ratio_vs_bare', float('nan')):.3f}"),
            ("steps / train command wall s", f"{result['steps']} / {result['train_command_seconds']:.0f}"),
            ("peak RSS GiB (train, merge)", f"{result['peak_rss_gib_train']:.2f}, {result['peak_rss_gib_merge']:.2f}"),
            ("merge seconds (max |dlogit|)", f"{result['merge_seconds']:.1f} ({result['merge_max_abs_logit_diff']:.2g})")]
    print("\n".join(f"{k:<40} {v}" for k, v in rows), file=sys.stderr)
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = parse_config(BenchConfig, prog="python scripts/bench_llm_finetune.py")
    grounded(config) if config.answers else main(config)
