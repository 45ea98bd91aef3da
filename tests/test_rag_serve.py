"""`python -m rag.serve`: the HTTP API in-process over one real app (MiniLM, the embedded SmolLM2, the
sample report, real Chroma in tmp), plus the same app under a real uvicorn for what needs a socket
(a client that disconnects, two clients in line)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from rag.serve import ServeConfig, build_app

QUESTION = "What was the year-over-year growth rate of total revenue in 2025?"
KEY = "s3cret-key-for-tests"
NEW_DOC = ("Zephyr Harbour Fund annual note.\n\nThe Zephyr Harbour Fund reported an expense ratio of 0.37% for 2025, "
           "and its assets under management reached $912 million at year end.\n")


@pytest.fixture(scope="module")
def app(tmp_path_factory, sample_doc):
    """One app for the module: the models load once (seconds)."""
    folder = tmp_path_factory.mktemp("serve")
    return build_app(ServeConfig(file=[sample_doc], llm="smollm2", max_new_tokens=16, persist_dir=folder / "db",
                                 upload_dir=folder / "uploads", max_upload_mb=1))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


@pytest.fixture
def server(app):
    return app.state.server


@pytest.fixture(scope="module")
def live(app):
    """The same app under a real uvicorn on a free loopback port (lifespan off: the module's TestClient owns it)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    http.should_exit = True
    thread.join(10)


def sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) of each server-sent event in a whole response body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


def wait_for_empty_line(server, seconds: float) -> float:
    t0 = time.monotonic()
    while server.tickets:
        assert time.monotonic() - t0 < seconds, f"{len(server.tickets)} request(s) still in line after {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - t0


# ---- flags ----

def test_help_lists_the_serve_flags_and_not_the_one_shot_ones():
    done = subprocess.run([sys.executable, "-m", "tunerag.cli", "serve", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0
    for flag in ("--file", "--llm", "--embeddings", "--k", "--host", "--port", "--api-key", "--upload-dir",
                 "--max-upload-mb"):
        assert flag in done.stdout
    for flag in ("--question", "--questions", "--json", "--timings"):
        assert flag not in done.stdout


def test_an_open_host_without_a_key_refuses_to_start(sample_doc):
    env = {k: v for k, v in os.environ.items() if k != "TUNERAG_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "rag.serve", "--file", str(sample_doc), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "--host 0.0.0.0" in last and "TUNERAG_API_KEY" in last and "Traceback" not in done.stderr
    with pytest.raises(ValueError, match="--host 0.0.0.0"):
        ServeConfig(file=[sample_doc], host="0.0.0.0", api_key=None)


def test_the_key_comes_from_the_environment_and_stays_out_of_repr(sample_doc, monkeypatch, tunerag_home):
    monkeypatch.setenv("TUNERAG_API_KEY", KEY)
    cfg = ServeConfig(file=[sample_doc], host="0.0.0.0")
    assert cfg.api_key == KEY and KEY not in repr(cfg)
    assert cfg.upload_dir == tunerag_home / "uploads" and cfg.port == 8000 and cfg.max_upload_mb == 50
    with pytest.raises(ValueError, match="--max-upload-mb"):
        ServeConfig(file=[sample_doc], max_upload_mb=0)


# ---- answers ----

def test_ask_returns_the_json_shape_of_rag_cli(client):
    response = client.post("/api/ask", json={"question": QUESTION})
    assert response.status_code == 200
    out = response.json()
    assert {"query", "result", "source_documents"} <= set(out)
    assert out["query"] == QUESTION and isinstance(out["result"], str) and out["result"]
    assert out["source_documents"]
    for doc in out["source_documents"]:
        assert {"text", "source", "chunk", "score"} <= set(doc)
    assert any("$8.64 billion" in d["text"] for d in out["source_documents"])


def test_stream_sends_queued_sources_tokens_then_done(client):
    response = client.get("/api/ask/stream", params={"question": QUESTION})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and events[0][1] == {"ahead": 0}
    assert kinds[-1] == "done" and kinds.count("sources") == 1 and "error" not in kinds
    assert kinds.index("sources") < kinds.index("token")
    done = events[-1][1]
    assert "".join(data["text"] for kind, data in events if kind == "token").strip() == done["result"]
    assert done["source_documents"] == events[kinds.index("sources")][1]["source_documents"]


def test_an_empty_or_missing_question_is_a_one_line_error(client):
    for response in (client.post("/api/ask", json={"question": "   "}),
                     client.get("/api/ask/stream", params={"question": ""})):
        assert response.status_code == 400
        assert response.json() == {"detail": "the question is empty; ask something about the documents"}
    for response in (client.post("/api/ask", json={}), client.get("/api/ask/stream"),
                     client.post("/api/ask", content=b"{not json", headers={"content-type": "application/json"})):
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail


def test_health_and_the_pages(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["models"] == {"embeddings": "minilm", "llm": "smollm2"}
    assert health["chunks"] > 0 and health["queue"] == 0 and health["auth"] is False
    assert ".txt" in health["upload"]["types"] and health["upload"]["max_mb"] == 1
    page = client.get("/")
    assert page.status_code == 200 and "<title>tunerag</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    docs = client.get("/docs")
    assert docs.status_code == 200 and "https://" not in docs.text and "http://" not in docs.text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    assert "/api/ask/stream" in client.get("/openapi.json").json()["paths"]


# ---- who may call ----

def test_with_a_key_every_api_call_needs_it(client, server, monkeypatch):
    monkeypatch.setattr(server.cfg, "api_key", KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for response in (client.get("/api/health", headers=headers), client.get("/api/documents", headers=headers),
                         client.post("/api/ask", json={"question": QUESTION}, headers=headers),
                         client.post("/api/documents", files={"file": ("a.txt", b"text")}, headers=headers)):
            assert response.status_code == 401, (headers, response.request.url)
            assert response.headers["www-authenticate"] == "Bearer" and "Bearer KEY" in response.json()["detail"]
    assert client.get("/api/health", headers={"Authorization": f"Bearer {KEY}"}).json()["auth"] is True
    assert client.get("/").status_code == 200  # the page loads, then asks for the key


def test_without_a_key_only_loopback_names_and_the_same_origin_are_served(client):
    assert client.get("/api/health", headers={"host": "rebound.example:8000"}).status_code == 403
    assert client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
    response = client.post("/api/documents", files={"file": ("a.txt", b"text")}, headers={"origin": "http://evil.example"})
    assert response.status_code == 403 and "cross-site" in response.json()["detail"]
    assert client.get("/api/health", headers={"origin": "http://127.0.0.1:8000"}).status_code == 200


# ---- uploads ----

def test_an_upload_is_stored_by_hash_inside_upload_dir_and_answered_from(client, server, tmp_path):
    upload_dir = server.cfg.upload_dir
    model_before = getattr(server.answerer, "model", None)
    chunks_before = client.get("/api/health").json()["chunks"]
    response = client.post("/api/documents", files={"file": ("../../etc/passwd.txt", NEW_DOC.encode())})
    assert response.status_code == 201, response.text
    stored = upload_dir / f"{hashlib.sha256(NEW_DOC.encode()).hexdigest()}.txt"
    assert response.json()["document"] == {"name": "passwd.txt", "file": stored.name, "bytes": len(NEW_DOC.encode()),
                                           "sha256": stored.stem}
    assert sorted(p.name for p in upload_dir.iterdir()) == [stored.name]  # no temp file, no client name
    assert not (upload_dir.parent / "etc").exists()
    assert response.json()["added"] is True and response.json()["chunks"] > chunks_before
    listed = client.get("/api/documents").json()
    assert {"name": "passwd.txt", "file": stored.name, "source": str(stored.resolve()), "bytes": len(NEW_DOC.encode()),
            "uploaded": True} in listed and len(listed) == 2
    if model_before is not None:  # the new Answerer reuses the loaded LLM (rag.cli.Answerer models=)
        assert server.answerer.model is model_before
    out = client.post("/api/ask", json={"question": "What expense ratio did the Zephyr Harbour Fund report?"}).json()
    assert out["source_documents"][0]["source"] == str(stored.resolve())
    again = client.post("/api/documents", files={"file": ("copy.txt", NEW_DOC.encode())})
    assert again.status_code == 200 and again.json()["added"] is False and len(client.get("/api/documents").json()) == 2


def test_upload_limits_and_types(client, server):
    upload_dir = server.cfg.upload_dir
    before = sorted(p.name for p in upload_dir.iterdir()) if upload_dir.exists() else []
    over = client.post("/api/documents", files={"file": ("big.txt", b"a" * (2**20 + 1))})  # body within the slack
    assert over.status_code == 413 and "1 MB" in over.json()["detail"]
    assert client.post("/api/documents", files={"file": ("huge.txt", b"a" * (3 * 2**20))}).status_code == 413
    wrong = client.post("/api/documents", files={"file": ("tool.exe", b"MZ")})
    assert wrong.status_code == 415 and ".txt" in wrong.json()["detail"]
    assert client.post("/api/documents", files={"file": ("README", b"text")}).status_code == 415
    assert client.post("/api/documents", files={"file": ("empty.md", b"")}).status_code == 400
    assert client.post("/api/documents", files={"other": ("a.txt", b"text")}).status_code == 400
    binary = client.post("/api/documents", files={"file": ("data.txt", b"\0\1\2 not text")})
    assert binary.status_code == 422 and "data.txt" in binary.json()["detail"] and str(upload_dir) not in binary.text
    assert sorted(p.name for p in upload_dir.iterdir()) == before  # nothing stays behind
    assert client.get("/api/health").json()["queue"] == 0


# ---- the line in front of the LLM (a real server: these need a socket) ----

def test_a_client_that_disconnects_stops_its_answer(live, server, caplog):
    with caplog.at_level("INFO", logger="rag.serve"):
        with httpx.Client(base_url=live, timeout=60) as http:
            with http.stream("GET", "/api/ask/stream", params={"question": QUESTION}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line == "event: token":
                        break
            left = time.monotonic()
        wait_for_empty_line(server, 10)
        stopped_after = time.monotonic() - left
    answered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("answered in")]
    assert answered and "(stopped: the client left)" in answered[-1], caplog.text
    tokens = int(answered[-1].split(", ")[1].split()[0])
    assert tokens < server.cfg.max_new_tokens and stopped_after < 5
    assert httpx.get(f"{live}/api/health").json()["queue"] == 0


def test_a_second_client_is_told_how_many_are_ahead(live, server):
    results: dict[str, list] = {}

    def stream(name: str) -> None:
        with httpx.Client(base_url=live, timeout=120) as http:
            results[name] = sse(http.get("/api/ask/stream", params={"question": QUESTION}).text)

    first = threading.Thread(target=stream, args=("first",))
    first.start()
    deadline = time.monotonic() + 10
    while not server.tickets:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = threading.Thread(target=stream, args=("second",))
    second.start()
    first.join(120)
    second.join(120)
    assert results["first"][0] == ("queued", {"ahead": 0})
    queued = [data["ahead"] for kind, data in results["second"] if kind == "queued"]
    assert queued == [1, 0]
    for name in ("first", "second"):
        assert results[name][-1][0] == "done"
    assert results["first"][-1][1]["result"] == results["second"][-1][1]["result"]  # greedy: the same answer


def test_a_followup_is_answered_with_the_conversation(client):
    """history: the follow-up is searched for with the question before it (rag.chain.retrieval_query)."""
    first = "How many branch locations did the consumer bank operate when 2025 ended?"
    alone = client.post("/api/ask", json={"question": "And the mobile logins growth?"})
    with_history = client.post("/api/ask", json={"question": "And the mobile logins growth?",
                                                 "history": [{"question": first, "answer": "588"}]})
    assert alone.status_code == with_history.status_code == 200
    texts = " ".join(d["text"] for d in with_history.json()["source_documents"])
    assert "588 locations" in texts or "Mobile logins grew 19%" in texts
    bad = client.get("/api/ask/stream", params={"question": "And in 2024?", "history": "{not json"})
    assert bad.status_code == 400 and "history must be JSON" in bad.json()["detail"]
