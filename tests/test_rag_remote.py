"""rag.cli and rag.serve against servers on loopback: a real `chroma run` (the server in the chromadb wheel)
for --chroma-url, and a real vLLM (CPU build, its own virtualenv made by scripts/setup.sh) serving the
embedded SmolLM2 for --llm-url. The vLLM tests are marked `integration` and skip when its virtualenv is
missing ($TUNERAG_VLLM_VENV, default ~/.cache/tunerag/vllm-venv)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rag import index, remote
from rag.cli import Answerer, main
from rag.config import RagConfig
from rag.serve import ServeConfig, build_app
from tunerag.common import TuneragError
from tunerag.models import model_identity, resolve_embedder

QUESTIONS = ["What was the year-over-year growth rate of total revenue in 2025?",
             "What was the loan-to-deposit ratio at the end of 2025?",
             "How much did the group receive for the equipment leasing business?"]
VLLM_VENV = Path(os.environ.get("TUNERAG_VLLM_VENV") or "~/.cache/tunerag/vllm-venv").expanduser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], ready_url: str, log: Path, seconds: float, env: dict | None = None):
    """A server process in its own process group, once `ready_url` answers 200; stopped with stop()."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"{command[0]} did not come up at {ready_url}; its log ends:\n"
                        + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group: vLLM runs its engine in a child process
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    """`chroma run` on a fresh folder and a free loopback port (about 1 s to start)."""
    folder = tmp_path_factory.mktemp("chroma_server")
    port = free_port()
    chroma = Path(sys.executable).with_name("chroma")
    command = [str(chroma) if chroma.exists() else "chroma", "run", "--path", str(folder / "data"),
               "--host", "127.0.0.1", "--port", str(port)]
    proc = start(command, f"http://127.0.0.1:{port}/api/v2/heartbeat", folder / "chroma.log", 60)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def models():
    """Loaded models shared by every Answerer of the module (rag.serve's cache)."""
    return {}


def answerer(models, **settings) -> Answerer:
    return Answerer(RagConfig(**({"question": "-", "retrieve_only": True} | settings)), time.perf_counter(), models=models)


@pytest.fixture(scope="module")
def indexed(chroma_url, models, sample_doc, tmp_path_factory):
    """The sample report indexed twice, into the server and into a local folder: (remote, local) Answerers."""
    local = answerer(models, file=[sample_doc], persist_dir=tmp_path_factory.mktemp("local") / "db")
    return answerer(models, file=[sample_doc], chroma_url=chroma_url), local


# ---- flags (no server) ----

def test_header_and_url_flags():
    assert remote.parse_headers(["Authorization: Bearer a:b", "X-Token:  $T "], {"T": "v"}) == {
        "Authorization": "Bearer a:b", "X-Token": "v"}
    for bad in ("no colon", "Bad Name: x", ": x"):
        with pytest.raises(ValueError, match="is not 'Name: value'"):
            remote.parse_headers([bad], {})
    with pytest.raises(ValueError, match=r"\$UNSET_VAR is not set"):
        remote.parse_headers(["Authorization: $UNSET_VAR"], {})
    assert remote.check_url("--chroma-url", " http://h:8000/ ") == "http://h:8000"
    assert remote.host_port("https://store.lan/chroma") == "store.lan_443"
    assert remote.host_port("http://127.0.0.1:8123") == "127.0.0.1_8123"
    with pytest.raises(ValueError, match="--chroma-url 'h:8000' is not an http"):
        RagConfig(file=[Path("x")], chroma_url="h:8000")
    with pytest.raises(ValueError, match="port that is not a number"):
        RagConfig(file=[Path("x")], llm_url="http://h:x/v1")
    with pytest.raises(ValueError, match="pass --chroma-url too"):
        RagConfig(file=[Path("x")], chroma_header=["A: b"])
    with pytest.raises(ValueError, match="pass --llm-url too"):
        ServeConfig(file=[Path("x")], llm_model="m")  # rag.serve inherits the flags


def test_pipeline_passes_the_store_flags_to_every_rag_config(monkeypatch, tmp_path, sample_doc):
    from rag import evaluate
    from tunerag.pipeline import PipelineConfig, rag_evaluation

    seen = []

    def record(bench, spec, items, store, **kw):
        seen.append(bench.rag_config(embeddings=spec, persist_dir=store))
        return {"recall@4": 1.0, "questions": 1, "answer_match": 1.0, "evidence_match": 1.0,
                "answered_when_in_passages": 1.0, "declined_when_not_in_passages": None, "first_token_median_s": 0.0,
                "tokens_per_s_median": 0.0, "answers": []}

    monkeypatch.setattr(evaluate, "bench_embedder", record)
    monkeypatch.setattr(evaluate, "bench_llm", lambda bench, spec, emb, items, store: record(bench, emb, items, store))
    cfg = PipelineConfig(docs=[sample_doc], out=tmp_path, chroma_url="http://127.0.0.1:9/", chroma_header=["A: b"])
    rag_evaluation(cfg, tmp_path)
    assert len(seen) == 6 and {(c.chroma_url, tuple(c.chroma_header)) for c in seen} == {("http://127.0.0.1:9", ("A: b",))}
    with pytest.raises(ValueError, match="is not an http"):
        PipelineConfig(chroma_url="127.0.0.1:8000")


# ---- the store on a server ----

def test_the_server_holds_the_same_chunks_and_answers_the_same(indexed, chroma_url, tunerag_home):
    far, near = indexed
    client = index.open_client(None, chroma_url)
    collection = client.get_collection(far.report.collection)
    assert far.report.collection == near.report.collection  # the same per-embedder name
    assert collection.metadata[remote.MARKER_KEY] == 1 and collection.metadata["chunk_size"] == 254
    local_ids = set(index.open_client(near.cfg.persist_dir).get_collection(near.report.collection).get(include=[])["ids"])
    assert set(collection.get(include=[])["ids"]) == local_ids and far.report.embedded == len(local_ids) > 20
    for question in QUESTIONS:  # hybrid retrieval (dense on the server + BM25 from the local cache)
        a, b = far.retriever.invoke(question), near.retriever.invoke(question)
        assert [d.page_content for d in a] == [d.page_content for d in b]
        assert [d.metadata["found_by"] for d in a] == [d.metadata["found_by"] for d in b]
        assert [d.metadata["score"] for d in a] == pytest.approx([d.metadata["score"] for d in b], abs=1e-6)
    bm25 = tunerag_home / "bm25" / remote.host_port(chroma_url) / far.report.collection
    assert bm25.is_dir() and any(bm25.iterdir())


def test_a_second_run_embeds_nothing_and_a_changed_file_replaces_its_chunks(indexed, models, chroma_url, sample_doc,
                                                                             tmp_path, caplog):
    again = answerer(models, file=[sample_doc], chroma_url=chroma_url)
    assert (again.report.embedded, again.report.removed) == (0, 0) and again.report.reused == again.report.chunks
    doc = tmp_path / "note.txt"
    doc.write_text("The Zephyr Harbour Fund reported an expense ratio of 0.37% for 2025.\n")
    first = answerer(models, file=[doc], chroma_url=chroma_url)
    doc.write_text("The Zephyr Harbour Fund reported an expense ratio of 0.41% for 2026.\n")
    with caplog.at_level("INFO"):
        second = answerer(models, file=[doc], chroma_url=chroma_url)
    assert (first.report.embedded, second.report.embedded, second.report.removed) == (1, 1, 1)
    assert "removed its 1 old chunks" in caplog.text
    got = second.retriever.invoke("Zephyr Harbour expense ratio")
    assert [d.page_content for d in got if "Zephyr" in d.page_content] == [doc.read_text().strip()]


def test_each_embedder_gets_its_own_collection(indexed, models, chroma_url, tiny_bert, sample_doc):
    far, _ = indexed
    other = answerer(models, file=[sample_doc], chroma_url=chroma_url, embeddings=str(tiny_bert), retriever="dense")
    assert other.report.collection != far.report.collection and other.report.embedded > 0
    names = {c.name for c in index.open_client(None, chroma_url).list_collections()}
    assert {far.report.collection, other.report.collection} <= names


def test_a_collection_that_tunerag_did_not_create_is_refused(indexed, models, chroma_url, sample_doc):
    name = index.collection_name("minilm", model_identity(resolve_embedder("minilm")), 100, 20)
    theirs = index.open_client(None, chroma_url).create_collection(name, metadata={"owner": "someone else"})
    theirs.add(ids=["x"], documents=["their text"], embeddings=[[0.0] * 384])
    with pytest.raises(index.StoreError, match=f"collection '{name}' on the Chroma server at {chroma_url} was not "
                                               "created by tunerag") as e:
        answerer(models, file=[sample_doc], chroma_url=chroma_url, chunk_size=100, chunk_overlap=20)
    assert "\n" not in str(e.value)
    assert theirs.count() == 1 and theirs.get()["documents"] == ["their text"]  # not written into


def test_headers_go_with_every_request_and_a_missing_server_is_one_line(chroma_url, sample_doc, monkeypatch):
    monkeypatch.setenv("TUNERAG_TEST_TOKEN", "t0ken")
    client = index.open_client(None, chroma_url, ["Authorization: Bearer abc", "X-Tunerag-Token: $TUNERAG_TEST_TOKEN"])
    headers = client._server._session.headers  # the httpx session chromadb sends every request with
    assert (headers["authorization"], headers["x-tunerag-token"]) == ("Bearer abc", "t0ken")
    assert client.heartbeat() > 0
    nobody = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(index.StoreError, match=f"the Chroma server at {nobody} cannot be reached") as e:
        Answerer(RagConfig(file=[sample_doc], question="-", retrieve_only=True, chroma_url=nobody), t0)
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 20  # before any model loads


def test_cli_json_over_the_server(indexed, chroma_url, sample_doc, capsys):
    out = main(RagConfig(file=[sample_doc], question=QUESTIONS[0], chroma_url=chroma_url, answer="extractive",
                         json=True))
    printed = json.loads(capsys.readouterr().out)
    assert "6.8%" in printed["result"] and printed["evidence"]["text"] == out["result"]
    assert printed["citations"] == [printed["evidence"]["passage"]]


def test_serve_answers_from_the_server(indexed, chroma_url, sample_doc, tmp_path):
    from fastapi.testclient import TestClient

    app = build_app(ServeConfig(file=[sample_doc], chroma_url=chroma_url, answer="extractive",
                                upload_dir=tmp_path / "uploads"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        got = client.post("/api/ask", json={"question": QUESTIONS[0]})
        assert got.status_code == 200 and "6.8%" in got.json()["result"]
        assert client.get("/api/health").json()["chunks"] == indexed[0].report.chunks
        note = client.post("/api/documents", files={"file": ("note.txt", b"Orion Bank's CET1 ratio was 13.9% in 2025.\n")})
        assert note.status_code == 201
        assert "13.9%" in client.post("/api/ask", json={"question": "Orion Bank CET1 ratio"}).json()["result"]


# ---- the LLM on a server (vLLM, CPU build) ----

@pytest.fixture(scope="module")
def llm_url(smollm2_path, tmp_path_factory):
    """vLLM's OpenAI-compatible server on the embedded SmolLM2 (about a minute to start on 2 cores)."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no vLLM virtualenv at {VLLM_VENV} (bash scripts/setup.sh makes it; or set TUNERAG_VLLM_VENV)")
    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_path),
               "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
               "--gpu-memory-utilization", "0.2", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    proc = start(command, f"http://127.0.0.1:{port}/v1/models", log, 300, env={"VLLM_NO_USAGE_STATS": "1"})
    yield f"http://127.0.0.1:{port}/v1"
    stop(proc)


@pytest.mark.integration
def test_the_server_reads_the_same_prompt_as_the_local_llm(llm_url, smollm2_path, sample_doc):
    from langchain_core.documents import Document
    from transformers import AutoTokenizer

    from rag.chain import count_tokens, render_prompt

    chat, model = remote.chat_model(llm_url, None, max_new_tokens=4, temperature=0.0, seed=0)
    assert model == "smollm2"  # the only model it serves
    docs = [Document(page_content="Total revenue was $8.64 billion, up 6.8%."), Document(page_content="CET1 was 12.1%.")]
    reply = chat.model_copy(update={"streaming": False}).invoke(remote.chat_messages(docs, QUESTIONS[0]))  # with usage
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert reply.usage_metadata["input_tokens"] == count_tokens(tokenizer, render_prompt(tokenizer, docs, QUESTIONS[0]))


@pytest.mark.integration
def test_cli_streams_the_answer_from_the_server_with_evidence(llm_url, indexed, models, chroma_url, sample_doc,
                                                              capsys):
    out = main(RagConfig(file=[sample_doc], question=QUESTIONS[0], chroma_url=chroma_url, llm_url=llm_url,
                         llm_model="smollm2", max_new_tokens=48, json=True, timings=True))
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["result"] == out["result"] and len(out["result"]) > 5
    assert printed["evidence"] and printed["citations"] and len(printed["source_documents"]) >= 1
    assert "first_token_from_start" in captured.err and "load_llm" in captured.err
    with pytest.raises(TuneragError, match="--llm-model 'nope' is not served at .*; it serves smollm2"):
        answerer(models, file=[sample_doc], chroma_url=chroma_url, llm_url=llm_url, llm_model="nope",
                 retrieve_only=False)


@pytest.mark.integration
def test_a_stopped_answer_ends_at_the_next_token(llm_url, indexed, models, sample_doc):
    local = indexed[1].cfg.persist_dir
    asker = answerer(models, file=[sample_doc], persist_dir=local, llm_url=llm_url, retrieve_only=False,
                     max_new_tokens=1000, context="chunks", min_support=0.0)  # a question no sentence answers
    tokens: list[str] = []

    def stop_after_three(text: str) -> None:
        tokens.append(text)
        if len(tokens) == 3:
            asker.stop.event.set()  # what Ctrl-C and a web client that leaves do

    def metric(name: str) -> float:  # vLLM's own counters and gauges, summed over their labels
        text = httpx.get(llm_url.removesuffix("/v1") + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split("{")[0] == name)

    def in_flight() -> float:
        return metric("vllm:num_requests_running") + metric("vllm:num_requests_waiting")

    # Unstopped, this answer runs to about 960 tokens (72 s here).
    question = ("List every figure in the report, one per line, with what it measures, "
                "and explain each one in a long paragraph.")
    before, out = metric("vllm:generation_tokens_total"), {}
    asker.ask(question, out, on_token=stop_after_three)
    assert len(tokens) == 3 and out["result"] == "".join(tokens).strip()
    deadline = time.monotonic() + 30
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not in_flight()  # the request ended on the server too, not at --max-new-tokens 1000
    # A few tokens past the three chunks; more only when a busy server coalesced tokens into those chunks.
    assert metric("vllm:generation_tokens_total") - before < 300
    again: dict = {}
    asker.ask(QUESTIONS[0], again)  # the next answer runs in full again
    assert len(again["result"]) > len(out["result"])


@pytest.mark.integration
def test_serve_streams_tokens_from_the_server(llm_url, chroma_url, indexed, sample_doc, tmp_path):
    from fastapi.testclient import TestClient

    app = build_app(ServeConfig(file=[sample_doc], chroma_url=chroma_url, llm_url=llm_url, max_new_tokens=24,
                                upload_dir=tmp_path / "uploads"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        body = client.get("/api/ask/stream", params={"question": QUESTIONS[0]}).text
    kinds = [line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "queued" and kinds[1] == "sources" and kinds[-1] == "done" and kinds.count("token") > 3


def test_bench_serve_explains_its_flags():
    run = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "scripts" / "bench_serve.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--clients" in run.stdout and "--llm-url" in run.stdout


def test_a_quote_answer_needs_a_local_llm():
    with pytest.raises(ValueError, match="--answer quote steers a local --llm"):
        RagConfig(file=[Path("x")], llm_url="http://127.0.0.1:8000/v1", answer="quote")
