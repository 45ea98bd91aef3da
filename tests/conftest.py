import os

# Tests never touch a model hub, and converted embedded models go to a per-run cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


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
def minilm_path() -> Path:
    from embeddings.models import minilm_folder

    return minilm_folder()


@pytest.fixture(scope="session")
def smollm2_path(tunerag_home) -> Path:
    from llm_finetune.models import smollm2_folder

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
