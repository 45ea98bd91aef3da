"""QLoRA fine-tuning of a causal LLM on instruction data, as a thin layer over transformers' Trainer.

    python -m llm_finetune.train --preset smollm2-cpu --out runs/smollm2
    python -m llm_finetune.train --out runs/mistral            # the reference recipe: Mistral-7B, finance-alpaca
    python -m llm_finetune.train --preset smollm2-cpu --out runs/smollm2 --resume     # after Ctrl-C or a crash
    accelerate launch --multi_gpu --num_processes 2 -m llm_finetune.train --preset smollm2-cpu --out runs/ddp

The last line is data parallel (one process per GPU; on a machine without a GPU, two CPU processes in
one gloo group). With accelerate 1.15, `accelerate launch --cpu --num_processes 2` starts ONE process
unless MPI is set up (its CPU multi-process path is mpirun), so use `--multi_gpu` (torchrun) for CPUs too.

The run folder (--out) ends up with the adapter (adapter_model.safetensors, holding the trained
lm_head too), adapter_config.json, the tokenizer, run_config.json (the resolved options) and
metrics.json (loss curves, perplexity before and after); checkpoints/ holds the resumable steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from llm_finetune.config import TrainConfig
from llm_finetune.data import build_examples, ensure_pad_token, load_rows, make_collator, mix_sources, split_rows
from tunerag.common import TuneragError, run_cli
from tunerag.models import load_tokenizer, resolve_llm

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# What a checkpoint folder must hold before --resume trusts it. The Trainer writes trainer_state.json
# last, so a checkpoint cut short by Ctrl-C or a crash lacks it (or holds half of it).
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt")


def checkpoint_is_complete(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_step(folder: Path) -> int:
    try:
        return int(folder.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def last_complete_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint-N under out/checkpoints that was written completely."""
    folders = sorted((out / CHECKPOINTS).glob("checkpoint-*"), key=checkpoint_step, reverse=True)
    return next((f for f in folders if checkpoint_step(f) >= 0 and checkpoint_is_complete(f)), None)


def bnb_config(compute_dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_qlora_model(cfg: TrainConfig, base_path: str, cuda: bool):
    """The base in 4-bit NF4, prepared for k-bit training, with LoRA adapters and a trainable float32 head."""
    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    compute_dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base_path, quantization_config=bnb_config(compute_dtype), dtype=compute_dtype,
        # each data-parallel process holds its own full copy on its own GPU
        device_map={"": PartialState().local_process_index} if cuda else None,
    )
    disable_cpu_inference_packing(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM",
                      modules_to_save=["lm_head"] if cfg.train_head else None)
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # e.g. a --lora-targets name the model does not have
        raise TuneragError(f"LoRA could not be applied to {cfg.base_model!r}: {str(e).splitlines()[0]}") from None
    # peft records the local folder it loaded from; record what the user asked for, so that merge can
    # resolve it again (e.g. 'smollm2' or a hub id, not a cache path).
    model.peft_config["default"].base_model_name_or_path = recorded_base(cfg.base_model)
    head = model.get_output_embeddings()
    for p in head.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the trained head stays float32 under bf16 autocast: no fp16 unscale errors
    return model


def disable_cpu_inference_packing(model) -> None:
    """Keep bitsandbytes' 4-bit layers trainable after an evaluation on the CPU.

    On CPUs with AVX512-BF16, a Linear4bit that runs in eval mode repacks its weight for a faster
    inference kernel (gemv_4bit) that has no backward. The training steps that follow an
    evaluation then drop the gradient through every frozen 4-bit layer (torch only warns "an
    autograd kernel was not registered"), and a checkpoint save unpacks the weight again with
    slightly different numerics, so a resumed run would not repeat the original one.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def recorded_base(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def make_trainer(cfg: TrainConfig, model, tokenizer, train_set, val_set, cuda: bool, callbacks=()):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    class QLoRATrainer(Trainer):
        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "eval_loss" in logs:  # perplexity next to every evaluation loss, in the logs and log_history
                logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            super().log(logs, *args, **kwargs)

    class LossProgressCallback(ProgressCallback):
        """Trainer's bar (steps, rate, ETA) with the last training loss on it."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
            super().on_log(args, state, control, logs=logs, **kwargs)

    args = TrainingArguments(
        output_dir=str(Path(cfg.out) / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda,
        # gradient checkpointing (non-reentrant); transformers 5 names it activation checkpointing
        activation_checkpointing=cfg.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints, logging_steps=cfg.logging_steps, report_to="none",
        seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        dataloader_pin_memory=cuda,
        # without it, processes started by torchrun on a machine with no GPU each train alone instead
        # of joining one gloo process group
        use_cpu=not cuda,
    )
    trainer = QLoRATrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                           data_collator=make_collator(tokenizer), processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgressCallback)
    return trainer


def prepare_out(cfg: TrainConfig) -> Path | None:
    """Check --out against --resume; the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    has_run = (out / CHECKPOINTS).is_dir() or (out / "adapter_config.json").is_file()
    if not cfg.resume:
        if has_run:
            raise TuneragError(f"--out {str(out)!r} already holds a run; pass --resume to continue it, "
                               "or choose another --out")
        return None
    ckpt = last_complete_checkpoint(out)
    if ckpt is None:
        raise TuneragError(f"--resume: no complete checkpoint under {str(out / CHECKPOINTS)!r}; "
                           "run without --resume (and a fresh --out) to start over")
    saved = out / "run_config.json"
    if saved.is_file():
        before = {k: v for k, v in json.loads(saved.read_text()).items() if k not in {"resume", "config"}}
        now = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k in before}
        changed = sorted(k for k in now if now[k] != before[k])
        if changed:
            logger.warning("resuming with options that differ from the first run: %s", ", ".join(changed))
    return ckpt


def drop_incomplete_checkpoints(out: Path, keep: Path) -> None:
    for folder in (out / CHECKPOINTS).glob("checkpoint-*"):
        if checkpoint_step(folder) > checkpoint_step(keep) and not checkpoint_is_complete(folder):
            logger.warning("removing half-written %s", folder)
            shutil.rmtree(folder, ignore_errors=True)


def loss_curves(log_history: list[dict[str, Any]], eval_before: dict[str, float]) -> dict[str, list[dict[str, float]]]:
    """Training loss per logging step; evaluation loss and perplexity from step 0 (before training)
    on, one point per step (the final evaluation repeats the last in-training one when they coincide)."""
    evals = {0: {"step": 0, "loss": eval_before["eval_loss"], "perplexity": eval_before["eval_perplexity"]}}
    for e in log_history:
        if "eval_loss" in e:
            evals[e["step"]] = {"step": e["step"], "loss": e["eval_loss"], "perplexity": e["eval_perplexity"]}
    return {"train": [{"step": e["step"], "loss": e["loss"]} for e in log_history if "loss" in e],
            "eval": [evals[step] for step in sorted(evals)]}


def save_final(trainer, tokenizer, out: Path, files: dict[str, Any]) -> None:
    """Adapter, tokenizer and JSON files written beside each other, then moved into --out;
    adapter_config.json goes last, so a folder that has it has everything merge needs."""
    tmp = out / ".final-tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # every process calls it; only the main one writes
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(tmp))
    for name, value in files.items():
        (tmp / name).write_text(json.dumps(value, indent=2, default=str))
    for item in sorted(tmp.iterdir(), key=lambda p: p.name == "adapter_config.json"):
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def training_rows(cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val) rows of every --data source, mixed by --data-weight; the validation rows in the same
    shares, at most --val-size of them when that is a count."""
    splits = [split_rows(load_rows(source), cfg.val_size, cfg.seed) for source in cfg.data]
    train = mix_sources([t for t, _ in splits], cfg.data_weight, cfg.seed)
    val = mix_sources([v for _, v in splits], cfg.data_weight, cfg.seed,
                      limit=int(cfg.val_size) if cfg.val_size >= 1 and len(splits) > 1 else None)
    return train, val


def main(cfg: TrainConfig) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import set_seed

    set_seed(cfg.seed)
    out = Path(cfg.out)
    resume_from = prepare_out(cfg)
    cuda = torch.cuda.is_available()
    logger.info("options: %s", json.dumps(dataclasses.asdict(cfg), default=str))

    base_path = resolve_llm(cfg.base_model)
    tokenizer = load_tokenizer(base_path)
    ensure_pad_token(tokenizer)
    if not tokenizer.chat_template:
        raise TuneragError(f"{cfg.base_model!r} has no chat template; use an instruct/chat model")
    train_rows, val_rows = training_rows(cfg)
    train_set = Dataset.from_list(build_examples(tokenizer, train_rows, cfg.max_length))
    val_set = Dataset.from_list(build_examples(tokenizer, val_rows, cfg.max_length))
    logger.info("%d training and %d validation examples from %s", len(train_set), len(val_set), " + ".join(cfg.data))

    model = load_qlora_model(cfg, base_path, cuda)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    trainer = make_trainer(cfg, model, tokenizer, train_set, val_set, cuda)
    out.mkdir(parents=True, exist_ok=True)
    before_file = out / "eval_before.json"
    if resume_from is not None and before_file.is_file():
        eval_before = json.loads(before_file.read_text())
    else:
        eval_before = trainer.evaluate()
        if trainer.is_world_process_zero():
            before_file.write_text(json.dumps(eval_before, indent=2))
            (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    logger.info("before training: eval loss %.4f, perplexity %.2f", eval_before["eval_loss"], eval_before["eval_perplexity"])

    if resume_from is not None:
        drop_incomplete_checkpoints(out, resume_from)
        logger.info("resuming from %s", resume_from)
    try:
        train_result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        last = last_complete_checkpoint(out)
        where = (f"the last complete checkpoint is {str(last)!r}; continue with the same command plus --resume"
                 if last else "no checkpoint was completed yet; the run must start over")
        logger.error("training stopped at step %d: %s", trainer.state.global_step, where)
        raise
    # the Trainer evaluates at its last step already (eval_strategy "steps"); no second pass on the same weights
    final = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
    eval_after = final[-1] if final else trainer.evaluate()
    logger.info("after training: eval loss %.4f, perplexity %.2f", eval_after["eval_loss"], eval_after["eval_perplexity"])

    metrics = {
        "base_model": cfg.base_model, "n_train": len(train_set), "n_val": len(val_set),
        "trainable_params": trainable, "total_params": total,
        "perplexity_before": eval_before["eval_perplexity"], "perplexity_after": eval_after["eval_perplexity"],
        "eval_loss_before": eval_before["eval_loss"], "eval_loss_after": eval_after["eval_loss"],
        "global_step": trainer.state.global_step, "train": train_result.metrics,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "curves": loss_curves(trainer.state.log_history, eval_before), "log_history": trainer.state.log_history,
    }
    save_final(trainer, tokenizer, out, {"run_config.json": dataclasses.asdict(cfg), "metrics.json": metrics})
    if trainer.is_world_process_zero():
        logger.info("adapter, head, tokenizer and metrics saved in %s; merge with "
                    "`python -m llm_finetune.merge --adapter %s --out merged/`", out, out)
    return metrics


if __name__ == "__main__":
    run_cli(main, TrainConfig)
