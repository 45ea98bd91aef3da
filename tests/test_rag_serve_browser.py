"""The page of `python -m rag.serve` in a real headless Chromium (Debian's /usr/bin/chromium driven by
Playwright from PyPI; never `playwright install`): load it, upload a document, ask about it, see the
answer stream in and the passages with the evidence marked. Saves a screenshot to look at."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOC = ("# Zephyr Harbour Fund, annual note\n\nThe Zephyr Harbour Fund reported an expense ratio of 0.37% for 2025. "
       "Its assets under management reached $912 million at year end, up from $804 million.\n")
QUESTION = "What expense ratio did the Zephyr Harbour Fund report for 2025?"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium; "
                                                                 "scripts/setup.sh does it as root)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path, sample_doc):
    """`python -m rag.serve` for real on a free loopback port; stopped (SIGINT, as Ctrl-C) at the end."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rag.serve", "--file", str(sample_doc), "--llm", "smollm2",
                                 "--max-new-tokens", "24", "--port", str(port), "--persist-dir", str(tmp_path / "db"),
                                 "--upload-dir", str(tmp_path / "uploads")],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TUNERAG_API_KEY": ""})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server was not up in 240 s"
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()


def test_upload_ask_and_see_the_streamed_answer_and_passages(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    doc = tmp_path / "zephyr_note.md"
    doc.write_text(DOC)
    requests, problems = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(served)
            expect(page.locator("#health")).to_contain_text("chunks")
            expect(page.locator("#docs")).to_contain_text("finance_report.txt")

            page.set_input_files("#file", str(doc))
            page.click("#upload")
            expect(page.locator("#upload-status")).to_have_text(re.compile("^Indexed zephyr_note.md"), timeout=120_000)
            expect(page.locator("#docs")).to_contain_text("zephyr_note.md")

            # Count the answer's updates: streamed token by token, it changes many times.
            page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.querySelector('#answer'), {childList: true, characterData: true, subtree: true}); }""")
            # Another client holds the LLM: this page's question waits in line, and says so.
            other = threading.Thread(target=httpx.get, args=(f"{served}/api/ask/stream",),
                                     kwargs={"params": {"question": "What was the CET1 ratio?"}, "timeout": 120})
            other.start()
            while httpx.get(f"{served}/api/health").json()["queue"] == 0:
                time.sleep(0.02)
            page.fill("#question", QUESTION)
            page.click("#ask")
            expect(page.locator("#state")).to_have_text(re.compile("^Busy, 1 ahead"))
            page.screenshot(path=str(tmp_path / "serve_busy.png"))
            expect(page.locator("#state")).to_have_text(re.compile("^Done in"), timeout=180_000)
            other.join(120)
            answer = page.inner_text("#answer")
            assert answer.strip() and page.evaluate("() => window.updates") > 2
            sources = page.locator("#sources li")
            assert sources.count() >= 1
            assert "zephyr_note.md" in sources.first.inner_text() and "score" in sources.first.inner_text()
            if page.is_visible("#evidence"):  # the answer came with an evidence sentence: it is marked in its passage
                assert page.locator("#sources mark").count() == 1
                assert page.locator("#sources mark").inner_text() in page.inner_text("#evidence")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            page.goto(f"{served}/docs")  # FastAPI's API page, its assets served locally too
            expect(page.locator(".swagger-ui")).to_contain_text("/api/ask/stream", timeout=30_000)
        finally:
            browser.close()
    shutil.copy(tmp_path / "serve.png", "/tmp/serve_screenshot.png")
    shutil.copy(tmp_path / "serve_busy.png", "/tmp/serve_screenshot_busy.png")
    assert all(url.startswith(served) for url in requests), [u for u in requests if not u.startswith(served)]
    assert not problems, problems
