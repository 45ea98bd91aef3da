"""rag.embedder: the transformers backend gives sentence-transformers' vectors on the layouts it takes,
hands every other layout to sentence-transformers, and does not import it."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from rag.embedder import load_embeddings, plain_layout
from tunerag.common import TuneragError

TEXTS = ["What was the CET1 ratio in 2025?", "  Net interest income rose 8.8% to $2.94 billion.\n", "",
         "Total revenue for the year ended December 31, 2025 was $8.64 billion. " * 40]  # the last one is cut at 256


def vectors(embeddings) -> torch.Tensor:
    return torch.tensor(embeddings.embed_documents(TEXTS))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_minilm_gives_sentence_transformers_vectors(dtype):
    fast, _ = load_embeddings("minilm", dtype=dtype)
    reference, _ = load_embeddings("minilm", dtype=dtype, backend="sentence-transformers")
    assert fast.backend == "transformers" and reference.backend == "sentence-transformers"
    assert fast.max_seq_length == reference.max_seq_length == 256
    assert fast.dtype == reference.dtype == getattr(torch, dtype)
    a, b = vectors(fast), vectors(reference)
    if dtype == "float32":
        assert (a - b).abs().max() < 1e-5
    else:
        assert (a * b).sum(1).min() > 0.995
    alone = torch.tensor(fast.embed_query(TEXTS[0]))  # padded in a batch or not: the same vector
    assert (alone - a[0]).abs().max() < 1e-5 if dtype == "float32" else (alone @ a[0]) > 0.995
    assert torch.allclose(a.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-4)


def saved(folder, tiny_bert, pooling: str, dense: bool = False):
    from sentence_transformers import SentenceTransformer, models

    modules = [models.Transformer(str(tiny_bert), max_seq_length=64), models.Pooling(16, pooling_mode=pooling)]
    if dense:
        modules.append(models.Dense(16, 8))
    SentenceTransformer(modules=modules + [models.Normalize()]).save(str(folder))
    return folder


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_saved_sentence_transformers_folder_gives_the_same_vectors(tmp_path, tiny_bert, pooling):
    folder = saved(tmp_path / "model", tiny_bert, pooling)
    assert plain_layout(folder)["pooling"] == pooling
    fast, _ = load_embeddings(str(folder))
    reference, _ = load_embeddings(str(folder), backend="sentence-transformers")
    assert fast.backend == "transformers" and fast.max_seq_length == reference.max_seq_length == 64
    assert (vectors(fast) - vectors(reference)).abs().max() < 1e-5


def test_other_layouts_go_through_sentence_transformers(tmp_path, tiny_bert):
    folder = saved(tmp_path / "dense", tiny_bert, "mean", dense=True)
    assert plain_layout(folder) is None
    embeddings, _ = load_embeddings(str(folder))
    assert embeddings.backend == "sentence-transformers" and len(embeddings.embed_query("revenue")) == 8
    with pytest.raises(TuneragError, match="not a plain transformer") as raised:
        load_embeddings(str(folder), backend="transformers")
    assert "\n" not in str(raised.value)
    with pytest.raises(TuneragError, match="--embed-backend 'onnx' is not one of"):
        load_embeddings("minilm", backend="onnx")


def test_the_fast_path_does_not_import_sentence_transformers():
    code = ("import sys; from rag.embedder import load_embeddings; e, _ = load_embeddings('minilm'); "
            "e.embed_query('x'); print('sentence_transformers' in sys.modules, 'langchain_huggingface' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["False", "False"]
