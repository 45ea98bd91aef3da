"""Fold a QLoRA adapter and its trained lm_head into the full-precision base, verified before it counts.

    python -m llm_finetune.merge --adapter runs/smollm2-cpu --out merged/smollm2-finance
    python -m llm_finetune.merge --adapter runs/mistral --out merged/mistral --dtype bfloat16

The base is the one recorded with the adapter (`--base` overrides it), loaded in --dtype, never in
4-bit. The merged folder is written beside --out under a temporary name, reloaded from disk, and its
logits on a probe batch compared with base+adapter before it is swapped into place: a head lost on
the way (e.g. re-tied to the input embeddings of a tied base such as SmolLM2) fails the merge. With
--overwrite, --out holds the old or the new complete model at every instant, even if the merge is
killed; temp folders of killed merges are removed by the next one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from llm_finetune.config import MergeConfig
from tunerag.common import TuneragError, replace_folder, run_cli, temp_folder
from tunerag.models import check_tokenizer, resolve_llm

logger = logging.getLogger(__name__)

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
# Largest |merged - (base+adapter)| logit difference accepted, relative to the largest logit: float32
# differs only by summation order; 16-bit merges round W + BA to 8 or 11 mantissa bits.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
PROBE_PROMPTS = [
    "What is the difference between gross and net debt?",
    "A bank has a CET1 ratio of 13.2%. Is that well capitalised? Explain briefly.",
]
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def check_adapter_folder(adapter: Path) -> None:
    hint = "point --adapter at the --out folder of `python -m llm_finetune.train`"
    if not adapter.is_dir():
        raise TuneragError(f"adapter folder {str(adapter)!r} does not exist; {hint}")
    missing = [n for n in ("adapter_config.json",) if not (adapter / n).is_file()]
    if not any((adapter / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        missing.append("adapter_model.safetensors")
    if missing:
        raise TuneragError(f"adapter folder {str(adapter)!r} is incomplete (no {', '.join(missing)}); {hint} "
                           "after training has finished")


def recorded_base(adapter: Path) -> str:
    """The base the run recorded: the user's spec (e.g. 'smollm2' or a hub id) written by our train."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except ValueError as e:
        raise TuneragError(f"{str(adapter / 'adapter_config.json')!r} is not valid JSON ({e})") from None
    if not base:
        raise TuneragError(f"{str(adapter)!r} records no base model; pass --base")
    return base


def same_base(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The config keys on which two bases differ (an adapter fits only one architecture and size)."""
    return [f"{k} {a.get(k)!r} != {b.get(k)!r}" for k in CONFIG_KEYS if a.get(k) != b.get(k)]


def count_params(config) -> int:
    """Parameter count of a model built on the meta device: no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def memory_needed(n_params: int, head_params: int, dtype: str) -> int:
    """Bytes for the merge: the model once, the base head kept for the check and the trained head
    loaded beside it, plus room for the probe batch and the save."""
    return (n_params + 2 * head_params) * BYTES_PER_PARAM[dtype] + 512 * 2**20


def memory_available(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def check_memory(needed: int, available: int, dtype: str, device: str) -> None:
    if needed > available:
        gib = 2**30
        hint = " or --dtype bfloat16" if dtype == "float32" else ""
        raise TuneragError(f"merging in {dtype} needs about {needed / gib:.1f} GiB of {device} memory but only "
                           f"{available / gib:.1f} GiB is free; free some memory{hint}")


def probe_batch(tokenizer, device: str):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROBE_PROMPTS]
    return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)


def max_logit_diff(expected, actual, attention_mask) -> float:
    keep = attention_mask.bool()
    return (expected[keep].float() - actual[keep].float()).abs().max().item()


def main(cfg: MergeConfig) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter, out = Path(cfg.adapter), Path(cfg.out)
    check_adapter_folder(adapter)
    if out.exists() and not cfg.overwrite:
        raise TuneragError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TuneragError("--device cuda: no CUDA device is available; use --device cpu")
    recorded = recorded_base(adapter)
    base_spec = cfg.base or recorded
    base_path = resolve_llm(base_spec)
    base_config = AutoConfig.from_pretrained(base_path)
    if getattr(base_config, "quantization_config", None):
        raise TuneragError(f"base {base_spec!r} is a quantized model; merging needs the full-precision weights "
                           "(pass the unquantized original with --base)")
    if cfg.base and cfg.base != recorded:
        try:
            differs = same_base(AutoConfig.from_pretrained(resolve_llm(recorded)).to_dict(), base_config.to_dict())
        except (TuneragError, OSError, ValueError):
            differs = []  # the recorded base is not available here; the shape check below still applies
            logger.warning("the adapter was trained on %r; merging into %r as asked", recorded, cfg.base)
        if differs:
            raise TuneragError(f"the adapter was made for another base ({recorded!r}, not {cfg.base!r}: "
                               f"{'; '.join(differs)})")

    n_params = count_params(base_config)
    head_params = base_config.vocab_size * base_config.hidden_size
    needed = memory_needed(n_params, head_params, cfg.dtype)
    available = memory_available(cfg.device)
    logger.info("%s parameters in %s: about %.2f GiB needed, %.2f GiB free", f"{n_params:,}", cfg.dtype,
                needed / 2**30, available / 2**30)
    check_memory(needed, available, cfg.dtype, cfg.device)

    tokenizer_from = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base_path)
    if tokenizer_from.is_dir():
        check_tokenizer(tokenizer_from, "adapter" if tokenizer_from == adapter else "base")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    dtype = getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(cfg.device)
    base_head = model.get_output_embeddings().weight.detach().clone()
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else type(e).__name__)
        raise TuneragError(f"the adapter in {str(adapter)!r} was made for another base than {base_spec!r} "
                           f"({detail[:200]})") from None
    trains_head = bool(model.peft_config["default"].modules_to_save)
    model.eval()
    probe = probe_batch(tokenizer, cfg.device)
    with torch.no_grad():
        expected = model(**probe).logits.cpu()

    merged = model.merge_and_unload(safe_merge=True)
    # A tied base (SmolLM2) would re-tie the trained head to the input embeddings on save or reload,
    # silently dropping it: the merged model has its own head, so it is untied.
    if trains_head:
        merged.config.tie_word_embeddings = False
        if getattr(merged.config, "get_text_config", None):
            merged.config.get_text_config().tie_word_embeddings = False
    merged.config.dtype = cfg.dtype
    tmp = temp_folder(out)
    try:
        merged.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(tmp)
        del model, merged

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(cfg.device).eval()
        with torch.no_grad():
            actual = reloaded(**probe).logits.cpu()
        diff = max_logit_diff(expected, actual, probe["attention_mask"].cpu())
        scale = max(1.0, expected.abs().max().item())
        tolerance = TOLERANCE[cfg.dtype] * scale
        logger.info("merged vs base+adapter logits on the probe batch: max abs diff %.3g (tolerance %.3g)",
                    diff, tolerance)
        if not diff <= tolerance:
            raise TuneragError(f"verification failed: the merged model's logits differ from base+adapter by {diff:.3g} "
                               f"(> {tolerance:.3g}); nothing was written to {str(out)!r}")
        head_change = (reloaded.get_output_embeddings().weight.detach().cpu().float() - base_head.cpu().float()).abs().max().item()
        if trains_head and head_change == 0:
            raise TuneragError("verification failed: the merged lm_head equals the base head, the trained head was lost; "
                               f"nothing was written to {str(out)!r}")
        report = {"adapter": str(adapter), "base": base_spec, "dtype": cfg.dtype, "max_abs_logit_diff": diff,
                  "tolerance": tolerance, "head_max_abs_change": head_change, "params": n_params}
        (tmp / "merge_info.json").write_text(json.dumps(report, indent=2))
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged model saved in %s (head changed by up to %.3g); load it with "
                "AutoModelForCausalLM.from_pretrained(%r)", out, head_change, str(out))
    return report


if __name__ == "__main__":
    run_cli(main, MergeConfig)
