"""`python -m rag.cli` end to end: real MiniLM, real Chroma on disk, the tiny random Mistral as LLM."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rag.cli import Answerer, main
from rag.config import RagConfig
from tunerag.common import TuneragError

QUESTION = "How much did the group receive for the equipment leasing business?"


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_doc):
    """The sample report indexed once (retrieval only); tests that write copy it first."""
    folder = tmp_path_factory.mktemp("cli") / "db"
    main(RagConfig(file=[sample_doc], question=QUESTION, retrieve_only=True, persist_dir=folder))
    return folder


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "rag.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_help():
    done = cli("--help")
    assert done.returncode == 0
    for flag in ("--file", "--question", "--questions", "--retrieve-only", "--embeddings", "--llm", "--k",
                 "--chunk-size", "--chunk-overlap", "--max-new-tokens", "--temperature", "--persist-dir",
                 "--reindex", "--json", "--timings"):
        assert flag in done.stdout


def test_one_shot_prints_answer_and_sources(store, sample_doc, tiny_mistral, capsys, caplog):
    with caplog.at_level("INFO"):
        out = main(RagConfig(file=[sample_doc], question=QUESTION, llm=str(tiny_mistral), persist_dir=store,
                             max_new_tokens=8))
    printed = capsys.readouterr().out
    assert out["result"] and out["result"] in printed
    assert "\nSources:\n[1] finance_report.txt chunk " in printed
    assert "reusing the stored vectors" in caplog.text


def test_json_shape_and_timings(store, sample_doc, tiny_mistral, capsys):
    main(RagConfig(file=[sample_doc], question=QUESTION, llm=str(tiny_mistral), persist_dir=store,
                   max_new_tokens=8, json=True, timings=True, k=3, retriever="dense", context="chunks"))
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) == {"query", "result", "citations", "evidence", "source_documents"}
    assert out["query"] == QUESTION and isinstance(out["result"], str) and out["result"]
    assert len(out["source_documents"]) == 3
    for doc in out["source_documents"]:
        assert set(doc) == {"text", "source", "page", "chunk", "score", "found_by"}
        assert doc["source"] == str(sample_doc.resolve()) and isinstance(doc["chunk"], int)
        assert -1.0 <= doc["score"] <= 1.0 and doc["found_by"] == ["dense"]
    evidence = out["evidence"]
    text = sample_doc.read_text(encoding="utf-8")
    assert text[evidence["start"]:evidence["end"]] == evidence["text"]
    assert out["citations"] and all(1 <= c <= 3 for c in out["citations"])
    scores = [d["score"] for d in out["source_documents"]]
    assert scores == sorted(scores, reverse=True)
    assert any("$415 million" in d["text"] for d in out["source_documents"])
    timings = [line for line in captured.err.splitlines() if line.startswith("timings:")]
    assert len(timings) == 1 and "first_token_from_start" in timings[0] and "retrieve" in timings[0]


def test_questions_file_gives_one_json_line_each(store, sample_doc, tiny_mistral, tmp_path, capsys):
    questions = tmp_path / "q.txt"
    questions.write_text(f"{QUESTION}\n\n  What was the CET1 ratio?  \n")
    results = main(RagConfig(file=[sample_doc], questions=questions, llm=str(tiny_mistral), persist_dir=store,
                             max_new_tokens=4))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(results) == 2
    assert [json.loads(line)["query"] for line in lines] == [QUESTION, "What was the CET1 ratio?"]


def test_retrieve_only_never_loads_the_llm(store, sample_doc, tmp_path, capsys):
    out = main(RagConfig(file=[sample_doc], question=QUESTION, llm=str(tmp_path / "no-such-model"),
                         persist_dir=store, retrieve_only=True, json=True))
    assert out["result"] is None and len(out["source_documents"]) == 4
    assert json.loads(capsys.readouterr().out)["result"] is None


def test_non_utf8_text_warns_and_goes_on(tmp_path, caplog, capsys):
    doc = tmp_path / "latin1.txt"
    doc.write_bytes("Le chiffre d'affaires a progressé de 4 % à 8,64 milliards.\n".encode("latin-1"))
    with caplog.at_level("WARNING"):
        out = main(RagConfig(file=[doc], question="chiffre d'affaires?", retrieve_only=True,
                             persist_dir=tmp_path / "db"))
    assert "not valid UTF-8" in caplog.text and "8,64 milliards" in out["source_documents"][0].page_content


def test_questions_file_goes_on_after_a_bad_question(store, sample_doc, tiny_mistral, tmp_path, capsys):
    questions = tmp_path / "q.txt"
    too_long = "What was the CET1 ratio? " * 600  # more tokens than the LLM's context
    questions.write_text(f"{QUESTION}\n{too_long}\nWhat was the CET1 ratio?\n")
    with pytest.raises(TuneragError, match="1 of 3 questions failed"):
        main(RagConfig(file=[sample_doc], questions=questions, llm=str(tiny_mistral), persist_dir=store, max_new_tokens=4))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == [QUESTION, too_long.strip(), "What was the CET1 ratio?"]
    assert "result" in lines[0] and "result" in lines[2]
    assert set(lines[1]) == {"query", "error"} and "the question alone needs" in lines[1]["error"]


@pytest.fixture(scope="module")
def answerer(store, sample_doc, tiny_mistral):
    return Answerer(RagConfig(file=[sample_doc], question=QUESTION, llm=str(tiny_mistral), persist_dir=store,
                              max_new_tokens=30), time.perf_counter())


@pytest.fixture
def slow_forward(answerer):
    """Each forward of the LLM takes at least `delay[0]` seconds; returns (delay, [end time of each forward])."""
    delay, calls = [0.0], []
    model = answerer.model
    hooks = [model.register_forward_pre_hook(lambda *_: time.sleep(delay[0])),
             model.register_forward_hook(lambda *_: calls.append(time.monotonic()))]
    yield delay, calls
    for hook in hooks:
        hook.remove()


def test_a_stopped_answer_ends_at_once_and_the_next_is_whole(answerer, slow_forward):
    delay, calls = slow_forward
    delay[0] = 0.05  # 30 new tokens take 1.5 s: a generation left running would go on after Ctrl-C

    def interrupt(_):
        raise KeyboardInterrupt  # Ctrl-C as the first words stream

    with pytest.raises(KeyboardInterrupt):
        answerer.ask(QUESTION, {}, on_token=interrupt)
    stopped = len(calls)
    time.sleep(0.3)
    assert len(calls) == stopped < 30  # nothing ran on after Ctrl-C
    out: dict = {}
    answerer.ask("What was the CET1 ratio?", out)
    assert len(calls) - stopped == 30 or out["result"]  # the next answer was not cut short by the old Ctrl-C


def test_a_failure_while_writing_is_raised_and_the_next_question_works(answerer):
    def broken(*_):
        raise RuntimeError("out of memory (simulated)")

    hook = answerer.model.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            answerer.ask(QUESTION, {})
    finally:
        hook.remove()
    out: dict = {}
    answerer.ask(QUESTION, out)  # the next question works
    assert out["result"]


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "empty question", "foreign store", "embedder folder",
                                  "store under a file"])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, sample_doc):
    doc, store, extra = sample_doc, tmp_path / "db", []
    if case == "missing":
        doc = tmp_path / "nope.txt"
    elif case == "empty":
        doc = tmp_path / "empty.txt"
        doc.write_text("  \n")
    elif case == "binary":
        doc = tmp_path / "blob.txt"
        doc.write_bytes(b"\x00\x01\x02" * 100)
    elif case == "foreign store":
        store.mkdir()
        (store / "thesis.tex").write_text("mine")
    elif case == "store under a file":
        (tmp_path / "plain.txt").write_text("a file, not a folder")
        store = tmp_path / "plain.txt" / "db"
    elif case == "embedder folder":
        (tmp_path / "not-a-model").mkdir()
        extra = ["--embeddings", str(tmp_path / "not-a-model")]
    question = "   " if case == "empty question" else QUESTION
    done = cli("--file", str(doc), "-q", question, "--persist-dir", str(store), "--retrieve-only", *extra)
    assert done.returncode == 2
    assert done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    expected = {"missing": "does not exist", "empty": "is empty", "binary": "looks binary",
                "empty question": "question is empty", "foreign store": "is not a tunerag index",
                "embedder folder": "is not a model folder",
                "store under a file": f"--persist-dir {str(store)!r} cannot be written"}[case]
    assert expected in errors[0]


def test_an_llm_folder_that_is_not_a_model(store, sample_doc, tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("not weights")
    with pytest.raises(TuneragError, match="is not a model folder"):
        main(RagConfig(file=[sample_doc], question=QUESTION, llm=str(tmp_path / "merged"), persist_dir=store))


# ---- the interactive session, through a pseudo-terminal ----

class Terminal:
    """A child process on a pty; `expect` reads until a marker appears (or fails with what it saw)."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            # Ctrl-C must raise KeyboardInterrupt in the child even when the tests run in the background
            # (`cmd &` in a script starts them with SIGINT ignored, and exec keeps ignored signals ignored).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.environ.update(env)
            os.execvp(argv[0], argv)
        self.seen, self.pos = b"", 0

    def expect(self, marker: str, timeout: float = 180) -> str:
        """Output from the last match up to and including `marker`."""
        deadline = time.monotonic() + timeout
        while (found := self.seen.find(marker.encode(), self.pos)) < 0:
            self.read(deadline, f"{marker!r}")
        text, self.pos = self.seen[self.pos:found + len(marker)], found + len(marker)
        return text.decode(errors="replace")

    def read(self, deadline: float, waiting_for: str = "more output") -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {waiting_for} in time; saw:\n{self.seen.decode(errors='replace')}")
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # the child closed the terminal
            data = b""
        if not data:
            raise AssertionError(f"session ended before {waiting_for}; saw:\n{self.seen.decode(errors='replace')}")
        self.seen += data

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain, so the child never blocks on a full terminal
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        raise AssertionError(f"the session did not exit; saw:\n{self.seen.decode(errors='replace')}")


@pytest.fixture
def session_store(store, tmp_path):
    shutil.copytree(store, tmp_path / "db")
    return tmp_path / "db"


def start_session(sample_doc, tiny_mistral, store, home, *extra):
    argv = [sys.executable, "-m", "rag.cli", "--file", str(sample_doc), "--llm", str(tiny_mistral),
            "--persist-dir", str(store), *extra]
    return Terminal(argv, {"TUNERAG_HOME": str(home)})


def test_session_streams_stops_shows_sources_and_quits(sample_doc, tiny_mistral, session_store, tmp_path):
    # 1500 new tokens of a random model: long enough to be stopped mid-answer; leaves room for 1 passage.
    term = start_session(sample_doc, tiny_mistral, session_store, tmp_path / "home", "--max-new-tokens", "1500",
                         "--context", "chunks")
    term.expect("/quit or Ctrl-D leaves")
    term.expect("> ")
    term.send(QUESTION + "\n")
    term.expect(QUESTION + "\r\n")
    term.expect("prompt tokens at most)\r\n")  # the note on dropped passages comes just before the answer
    term.read(time.monotonic() + 120)  # the answer has begun streaming
    term.send("\x03")  # Ctrl-C stops this answer, not the session
    term.expect("[stopped]")
    term.expect("> ")
    term.send("/sources\n")
    assert "[1] finance_report.txt chunk " in term.expect("> ")
    term.send("What was the CET1 ratio? " * 150 + "\n")  # longer than the LLM's room for a prompt
    assert "error: the question alone needs" in term.expect("> ")
    term.send("/nonsense\n")
    assert "unknown command '/nonsense'" in term.expect("> ")
    term.send("/quit\n")
    assert term.exit_code() == 0
    assert QUESTION in (tmp_path / "home" / "rag_history").read_text()


def test_session_ends_on_ctrl_d(sample_doc, tiny_mistral, session_store, tmp_path):
    term = start_session(sample_doc, tiny_mistral, session_store, tmp_path / "home", "--max-new-tokens", "4")
    term.expect("> ")
    term.send("What was the net income?\n")
    term.expect("> ")
    term.send("\x04")
    assert term.exit_code() == 0
