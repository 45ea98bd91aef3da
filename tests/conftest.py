import os

# Tests never touch a model hub, and converted embedded models go to a per-run cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tunerag" / "data"


@pytest.fixture(scope="session", autouse=True)
def tunerag_home(tmp_path_factory):
    """A fresh $TUNERAG_HOME per test run, so the SmolLM2 conversion is tested, not assumed."""
    home = os.environ.get("TUNERAG_TEST_HOME") or str(tmp_path_factory.mktemp("tunerag_home"))
    os.environ["TUNERAG_HOME"] = home
    return Path(home)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """Folder of a 2-layer random MistralForCausalLM with the real Mistral tokenizer."""
    from tiny_models import save_tiny_mistral

    return save_tiny_mistral(tmp_path_factory.mktemp("tiny_mistral"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> Path:
    """Folder of a 1-layer, 16-wide random BERT with MiniLM's tokenizer (a fast stand-in embedder)."""
    from tiny_models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_path)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from tunerag.models import minilm_folder

    return minilm_folder()


@pytest.fixture(scope="session")
def smollm2_path(tunerag_home) -> Path:
    from tunerag.models import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def sample_doc() -> Path:
    return DATA / "finance_report.txt"


@pytest.fixture(scope="session")
def sample_qa() -> Path:
    return DATA / "finance_qa.json"


@pytest.fixture(scope="session")
def sample_alpaca() -> Path:
    return DATA / "finance_alpaca.json"


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory, tiny_mistral) -> Path:
    """A 2-layer random Llama with TIED input/output embeddings (like SmolLM2) and the Mistral tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama_tied")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for f in tiny_mistral.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_qlora_run(tmp_path_factory, tiny_mistral, sample_alpaca) -> Path:
    """A finished 6-step QLoRA run (real 4-bit NF4) of the tiny Mistral: checkpoints at steps 3 and 6."""
    from llm_finetune.config import TrainConfig
    from llm_finetune.train import main

    out = tmp_path_factory.mktemp("qlora_run") / "run"
    main(TrainConfig(base_model=str(tiny_mistral), data=str(sample_alpaca), val_size=8, max_length=128,
                     max_steps=6, batch_size=2, grad_accum=1, lr=1e-2, eval_steps=3, save_steps=3,
                     logging_steps=1, out=str(out)))
    return out


def write_pdf(path: Path, pages: list[str | None]) -> Path:
    """A PDF with one page per entry, each with a real text layer (None: a page without text)."""
    n = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n)), n),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 3 0 R >> >> >>" % (5 + 2 * i))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(out)
    return path
