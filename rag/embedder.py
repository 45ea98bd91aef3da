"""The embedder behind rag's index and retrieval, as a LangChain `Embeddings` (normalized vectors: cosine = dot).

A sentence-transformers folder of the common layout - a transformer, mean or CLS pooling, an optional
Normalize, no prompts - runs on transformers directly ("transformers" backend): the vectors
sentence-transformers computes (max difference under 1e-6 in float32, tested on MiniLM) without
importing sentence-transformers, whose import (it pulls in peft, bitsandbytes and scikit-learn) took
3.9 s of a ~9 s one-shot answer on the 2-core CPU. Any other layout, or `backend="sentence-transformers"`,
goes through sentence-transformers itself.

    embeddings = load_embeddings("minilm", dtype="auto")     # (FolderEmbeddings, resolved path)
    embeddings.embed_query("What was the CET1 ratio?")       # 384 floats
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from langchain_core.embeddings import Embeddings

from tunerag.common import TuneragError, first_line

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "sentence-transformers")
# Texts sorted by length, padded per batch. 16, not sentence-transformers' 32: MiniLM over the long corpus's
# 254-token chunks here ran 106 against 92 chunks/s in bfloat16 and 38 against 33 in float32 (2 cores).
BATCH = 16


class FolderEmbeddings(Embeddings):
    """`encode(texts) -> vectors` with the tokenizer, the most tokens it reads and the weights' dtype."""

    def __init__(self, encode: Callable[[list[str]], list[list[float]]], tokenizer, max_seq_length: int | None,
                 dtype, backend: str):
        self.encode, self.tokenizer, self.max_seq_length, self.dtype, self.backend = (
            encode, tokenizer, max_seq_length, dtype, backend)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encode(list(texts))

    def embed_query(self, text: str) -> list[float]:
        return self.encode([text])[0]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def plain_layout(folder: Path) -> dict | None:
    """{"pooling": "mean"|"cls", "max_seq_length", "lower_case"} when `folder` is a transformer + pooling
    (+ Normalize) with no prompts, the layout the transformers backend reproduces; None otherwise."""
    try:
        return read_layout(folder)
    except (ValueError, KeyError, TypeError, AttributeError):  # an unreadable layout: sentence-transformers says why
        return None


def read_layout(folder: Path) -> dict | None:
    modules = read_json(folder / "modules.json") or None
    if not isinstance(modules, list):
        return None
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0].get("path"):
        return None
    pooling = read_json(folder / modules[1]["path"] / "config.json")
    if pooling_mode(pooling) not in ("mean", "cls") or pooling.get("include_prompt") is False:
        return None
    settings = read_json(folder / "config_sentence_transformers.json")
    if any(settings.get("prompts", {}).values()) or settings.get("default_prompt_name"):
        return None
    transformer = read_json(folder / "sentence_bert_config.json")
    if set(transformer) - {"max_seq_length", "do_lower_case", "transformer_task", "modality_config", "module_output_name"}:
        return None  # settings this backend does not read (tokenizer or model arguments)
    if transformer.get("module_output_name", "token_embeddings") != "token_embeddings":
        return None
    return {"pooling": pooling_mode(pooling), "max_seq_length": transformer.get("max_seq_length"),
            "lower_case": bool(transformer.get("do_lower_case"))}


def pooling_mode(config: dict) -> str | None:
    """"mean", "cls", ... from a Pooling config: one `pooling_mode` name (sentence-transformers >= 5) or
    one true `pooling_mode_*` flag of the older layout."""
    if "pooling_mode" in config:
        return config["pooling_mode"]
    flags = [key.removeprefix("pooling_mode_") for key, value in config.items() if key.startswith("pooling_mode_") and value]
    return {"mean_tokens": "mean", "cls_token": "cls"}.get(flags[0], flags[0]) if len(flags) == 1 else None


def transformers_encoder(folder: Path, layout: dict, dtype: str | None) -> FolderEmbeddings:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=dtype or "float32").eval()  # float32 unless told: as sentence-transformers
    if torch.cuda.is_available():  # as sentence-transformers places it
        model.to("cuda")
    limits = [n for n in (layout["max_seq_length"], tokenizer.model_max_length,
                          getattr(model.config, "max_position_embeddings", None)) if isinstance(n, int) and n < 1_000_000]
    max_length = layout["max_seq_length"] or (min(limits) if limits else None)
    device = model.device

    def encode(texts: list[str]) -> list[list[float]]:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # as sentence-transformers batches them
        vectors: list[Any] = [None] * len(texts)
        for start in range(0, len(order), BATCH):
            picked = order[start:start + BATCH]
            batch = [texts[i].strip() for i in picked]
            batch = [t.lower() for t in batch] if layout["lower_case"] else batch
            inputs = tokenizer(batch, padding=True, truncation="longest_first", max_length=max_length,
                               return_tensors="pt").to(device)
            with torch.inference_mode():
                hidden = model(**inputs).last_hidden_state.float()
            if layout["pooling"] == "cls":
                pooled = hidden[:, 0]
            else:
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            for i, row in zip(picked, torch.nn.functional.normalize(pooled, dim=1).tolist()):
                vectors[i] = row
        return vectors

    return FolderEmbeddings(encode, tokenizer, max_length, model.dtype, "transformers")


def sentence_transformers_encoder(spec: str, dtype: str | None, batch_size: int = BATCH) -> FolderEmbeddings:
    from tunerag.models import load_embedder

    model = load_embedder(spec, dtype=dtype)

    def encode(texts: list[str]) -> list[list[float]]:
        return model.encode(texts, normalize_embeddings=True, batch_size=batch_size, show_progress_bar=False).tolist()

    return FolderEmbeddings(encode, model.tokenizer, model.max_seq_length, model.dtype, "sentence-transformers")


def load_embeddings(spec: str, dtype: str = "float32", backend: str = "auto") -> tuple[FolderEmbeddings, str]:
    """(the embeddings, the resolved path or hub id). `dtype`: float32, bfloat16, or auto (bfloat16 where
    the CPU has bfloat16 matrix instructions; tunerag.models.pick_dtype); vectors differ by about 0.002 in
    cosine, so both share one collection. `backend`: see the module docstring; "transformers" on a
    folder of another layout is an error."""
    from tunerag.models import EMBEDDER_INSTEAD, pick_dtype, resolve_embedder

    if backend not in BACKENDS:
        raise TuneragError(f"--embed-backend {backend!r} is not one of {', '.join(BACKENDS)}")
    resolved = resolve_embedder(spec)
    chosen = pick_dtype(dtype)
    layout = plain_layout(Path(resolved)) if Path(resolved).is_dir() and backend != "sentence-transformers" else None
    if backend == "transformers" and layout is None:
        raise TuneragError(f"embedder {spec!r} is not a plain transformer + mean/CLS pooling folder; "
                           "use --embed-backend sentence-transformers")
    try:
        if layout is not None:
            return transformers_encoder(Path(resolved), layout, chosen), resolved
        return sentence_transformers_encoder(spec, chosen), resolved
    except TuneragError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise TuneragError(f"embedder {spec!r} could not be loaded ({first_line(e)}); pass {EMBEDDER_INSTEAD}") from None
