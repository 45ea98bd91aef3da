"""Faults a new user hit with model folders, on real folders: the wrong kind of model (SmolLM2 as the
embedder indexed at 1 chunk/s; MiniLM as the LLM "answered" with random words; both exited 0), a
weights file cut short by a killed copy, and a half-copied folder without its tokenizer."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunerag.models import ModelFolderError, load_embedder, load_llm, resolve_embedder, resolve_llm

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*names))
    return dst


def truncated_copy(src: Path, dst: Path, name: str = "model.safetensors", keep: float = 0.5) -> Path:
    """What a killed `cp -r` leaves: every file, the weights cut short."""
    copy_without(src, dst, name)
    data = (src / name).read_bytes()
    (dst / name).write_bytes(data[: int(len(data) * keep)])
    return dst


# --- the wrong kind of model --------------------------------------------------------------------


def test_the_minilm_folder_is_refused_as_llm(minilm_path):
    with pytest.raises(ModelFolderError) as err:
        load_llm(str(minilm_path))
    msg = one_line(err)
    assert f"LLM folder {str(minilm_path)!r} is a sentence-transformers embedder (BertModel), not a causal LM" in msg
    assert "'smollm2'" in msg


def test_a_plain_bert_folder_is_refused_as_llm(tiny_bert):
    with pytest.raises(ModelFolderError, match=r"holds a BertModel model, not a causal LM .*'smollm2'") as err:
        resolve_llm(str(tiny_bert))
    one_line(err)


def test_the_smollm2_folder_is_refused_as_embedder(smollm2_path):
    with pytest.raises(ModelFolderError) as err:
        load_embedder(str(smollm2_path))
    msg = one_line(err)
    assert f"embedder folder {str(smollm2_path)!r} is a causal LM (LlamaForCausalLM), not a sentence embedder" in msg
    assert "'minilm'" in msg


def test_right_kinds_still_resolve(minilm_path, tiny_bert, tiny_mistral, tiny_llama_tied, tmp_path):
    assert resolve_embedder(str(minilm_path)) == str(minilm_path)
    assert resolve_embedder(str(tiny_bert)) == str(tiny_bert)  # an encoder folder: sentence-transformers adds pooling
    assert resolve_llm(str(tiny_mistral)) == str(tiny_mistral)
    assert resolve_llm(str(tiny_llama_tied)) == str(tiny_llama_tied)


def test_a_lora_adapter_folder_is_named_as_one(tiny_qlora_run):
    with pytest.raises(ModelFolderError, match="is a LoRA adapter, not a whole model; merge it first") as err:
        resolve_llm(str(tiny_qlora_run))
    one_line(err)


# --- damaged and half-copied folders ------------------------------------------------------------


def test_truncated_llm_weights_are_one_line_naming_the_file(tiny_mistral, tmp_path):
    folder = truncated_copy(tiny_mistral, tmp_path / "cut")
    size = (tiny_mistral / "model.safetensors").stat().st_size
    with pytest.raises(ModelFolderError) as err:
        load_llm(str(folder))
    msg = one_line(err)
    assert str(folder) in msg and "model.safetensors is truncated" in msg and f"of {size:,} bytes" in msg


def test_truncated_embedder_weights_are_one_line_naming_the_file(minilm_path, tmp_path):
    folder = truncated_copy(minilm_path, tmp_path / "cut", keep=0.3)
    with pytest.raises(ModelFolderError) as err:
        load_embedder(str(folder))
    assert str(folder) in one_line(err) and "model.safetensors is truncated" in str(err.value)


def test_weights_cut_inside_the_header_and_missing_shards(tiny_mistral, tmp_path):
    cut = truncated_copy(tiny_mistral, tmp_path / "cut", keep=0.00001)  # a few hundred bytes: inside the header
    with pytest.raises(ModelFolderError, match="model.safetensors is truncated"):
        resolve_llm(str(cut))
    # a sharded model whose copy stopped before the last shard
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_mistral).save_pretrained(sharded, max_shard_size="4MB")
    for f in tiny_mistral.glob("tokenizer*"):
        shutil.copy(f, sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and resolve_llm(str(sharded)) == str(sharded)
    shards[-1].unlink()
    with pytest.raises(ModelFolderError, match=rf"is incomplete: {shards[-1].name} \(listed in model.safetensors"
                                               r".index.json\) missing") as err:
        resolve_llm(str(sharded))
    one_line(err)
    (sharded / "model.safetensors.index.json").unlink()
    for s in shards[:-1]:
        s.unlink()
    with pytest.raises(ModelFolderError, match="has no weights"):
        resolve_llm(str(sharded))


def test_a_folder_without_its_tokenizer_says_so(tiny_mistral, minilm_path, tmp_path):
    llm = copy_without(tiny_mistral, tmp_path / "llm", "tokenizer.json")
    with pytest.raises(ModelFolderError) as err:
        load_llm(str(llm))
    msg = one_line(err)
    assert str(llm) in msg and "has no tokenizer" in msg and "tokenizer.json" in msg
    emb = copy_without(minilm_path, tmp_path / "emb", "tokenizer.json", "vocab.txt")
    with pytest.raises(ModelFolderError, match="has no tokenizer"):
        load_embedder(str(emb))


def test_a_truncated_tokenizer_json_says_so(tiny_mistral, tmp_path):
    folder = truncated_copy(tiny_mistral, tmp_path / "t", name="tokenizer.json", keep=0.7)
    with pytest.raises(ModelFolderError, match="tokenizer.json is truncated") as err:
        load_llm(str(folder))
    one_line(err)


def test_a_damaged_config_json_says_so(tiny_mistral, tmp_path):
    folder = truncated_copy(tiny_mistral, tmp_path / "c", name="config.json", keep=0.5)
    with pytest.raises(ModelFolderError, match="config.json is damaged") as err:
        resolve_llm(str(folder))
    one_line(err)


# --- through the commands that hit them ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_doc(tmp_path_factory) -> Path:
    doc = tmp_path_factory.mktemp("doc") / "note.txt"
    doc.write_text("Total revenue grew 12% to $4.2 billion in 2025. The CET1 ratio ended the year at 13.2%.\n")
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("case", ["smollm2 as embeddings", "minilm as llm", "truncated llm"])
def test_rag_cli_refuses_in_one_line(case, small_doc, smollm2_path, minilm_path, tiny_mistral, tmp_path):
    if case == "smollm2 as embeddings":
        extra, expected = ["--embeddings", str(smollm2_path), "--retrieve-only"], "is a causal LM (LlamaForCausalLM)"
    elif case == "minilm as llm":
        extra, expected = ["--llm", str(minilm_path)], "is a sentence-transformers embedder (BertModel)"
    else:
        extra, expected = ["--llm", str(truncated_copy(tiny_mistral, tmp_path / "cut"))], "model.safetensors is truncated"
    done = subprocess.run([sys.executable, "-m", "rag.cli", "--file", str(small_doc), "-q", "What was revenue?",
                           "--persist-dir", str(tmp_path / "db"), *extra],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in done.stderr and expected in errors[0], done.stderr[-2000:]
