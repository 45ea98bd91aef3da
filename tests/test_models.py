"""Model resolution: embedded defaults, local folders, and the one-line error for an unreachable hub id."""

import subprocess
import sys

import pytest

from tunerag.common import TuneragError
from tunerag.models import (
    MINILM_HUB_ID,
    ModelNotFoundError,
    load_embedder,
    load_llm,
    minilm_folder,
    resolve_embedder,
    resolve_llm,
    smollm2_folder,
)


def test_minilm_resolves_to_the_package_and_embeds(minilm_path):
    assert resolve_embedder("minilm") == str(minilm_path)
    model = load_embedder("minilm")
    vectors = model.encode(["The CET1 ratio rose to 13.1%.", "Net interest margin fell."], normalize_embeddings=True)
    assert vectors.shape == (2, 384)
    assert model.max_seq_length == 256


def test_minilm_hub_id_falls_back_to_the_embedded_copy_offline():
    assert resolve_embedder(MINILM_HUB_ID) == str(minilm_folder())


@pytest.mark.parametrize("resolve, name", [(resolve_llm, "smollm2"), (resolve_embedder, "minilm")])
def test_uncached_hub_id_offline_is_one_clear_line(resolve, name):
    with pytest.raises(ModelNotFoundError) as err:
        resolve("acme-bank/no-such-model-7b")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'acme-bank/no-such-model-7b'" in msg and "unreachable" in msg and f"'{name}'" in msg


def test_bad_local_paths_are_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_llm(str(tmp_path / "merged"))
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_llm(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_embedder(str(tmp_path / "weights.bin"))


def test_local_folder_loads(tiny_mistral):
    model, tokenizer = load_llm(str(tiny_mistral))
    assert model.config.model_type == "mistral"
    assert tokenizer.chat_template.startswith("{{ bos_token }}")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<s>[INST] hi [/INST]"


def test_smollm2_converts_once_keeps_chat_template_and_answers(smollm2_path):
    import torch

    assert smollm2_path == smollm2_folder()  # second call: cached, no conversion
    model, tokenizer = load_llm("smollm2")
    assert "<|im_start|>" in tokenizer.chat_template
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a bond? Answer in one sentence."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(answer.split()) >= 3


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, tiny_mistral):
    """Ctrl-C between writing and the final rename: no target folder, no temp leftovers; a re-run completes."""
    import transformers

    import tunerag.models as models

    real_model_load = transformers.AutoModelForCausalLM.from_pretrained
    real_tok_load = transformers.AutoTokenizer.from_pretrained
    # The real GGUF takes ~25 s to convert; the tiny model exercises the same write-then-rename path.
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: real_model_load(tiny_mistral))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok_load(tiny_mistral))
    monkeypatch.setenv("TUNERAG_HOME", str(tmp_path))

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "replace_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2_folder()
    assert list((tmp_path / "models").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: real_model_load(tiny_mistral))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok_load(tiny_mistral))
    monkeypatch.setenv("TUNERAG_HOME", str(tmp_path))
    folder = smollm2_folder()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]


def test_model_not_found_is_a_tunerag_error():
    assert issubclass(ModelNotFoundError, TuneragError)


def test_cli_error_is_one_line_without_traceback():
    code = (
        "from dataclasses import dataclass, field\n"
        "from tunerag.common import run_cli\n"
        "from tunerag.models import resolve_llm\n"
        "@dataclass\n"
        "class C:\n"
        "    llm: str = field(default='smollm2', metadata={'help': 'LLM spec'})\n"
        "run_cli(lambda cfg: resolve_llm(cfg.llm), C)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "--llm", "acme-bank/no-such-model-7b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: LLM 'acme-bank/no-such-model-7b'")


def test_missing_relative_folder_is_named_as_a_folder(tmp_path, monkeypatch):
    """`models/emb-tuned` before training: say the folder is missing, not that the hub is unreachable."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelNotFoundError, match="folder 'models/emb-tuned' does not exist"):
        resolve_embedder("models/emb-tuned")
    with pytest.raises(ModelNotFoundError, match="unreachable"):
        resolve_llm("mistralai/Mistral-7B-Instruct-v0.1")


def test_unwritable_output_is_one_line(tmp_path):
    """An OSError from a command (here: an output path under a file) is one `error:` line, exit 2."""
    (tmp_path / "file").write_text("x")
    code = (
        "from dataclasses import dataclass, field\n"
        "from pathlib import Path\n"
        "from tunerag.common import run_cli\n"
        "@dataclass\n"
        "class C:\n"
        "    out: Path = field(default=Path('.'), metadata={'help': 'output'})\n"
        "run_cli(lambda cfg: (cfg.out / 'x.json').parent.mkdir(parents=True), C)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "file" / "sub")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and str(tmp_path / "file") in proc.stderr
