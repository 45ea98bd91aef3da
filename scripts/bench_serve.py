"""python scripts/bench_serve.py [--clients 20] [--duration-s 60] [--llm-url http://127.0.0.1:8001/v1]

The servers of rag.remote and rag.serve, measured on loopback:
  1. retrieval through --chroma-url (a `chroma run` this script starts) against the local store folder:
     latency median/p95 per question, hybrid and dense, interleaved question by question (target: within 2x);
  2. time to first token: rag.cli's Answerer (warm, as in a session; and one `rag.cli -q` from process start)
     against rag.serve's page in headless Chromium (open the page, type, Ask, first token on screen; plain
     HTTP when there is no /usr/bin/chromium), the server otherwise idle (target: within 1.5x);
  3. --clients API clients for --duration-s against one `python -m rag.serve` on /api/ask/stream: every
     request must end in `done` (no failed request, no lost answer), the queue wait (request sent to its
     turn) median/p95, first token, and the server's RSS from the start of the run to its peak (target: within
     10%), after a warm-up pass over the questions the clients ask (--warmup; RSS from the cold server is kept too).
Load averages before and after each part are recorded: on a shared machine read the figures with them.
One JSON object on stdout, a table on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without an install

from tunerag.common import run_cli  # noqa: E402
from tunerag.models import SMOLLM2  # noqa: E402
from tunerag.samples import SAMPLE_QA, SAMPLE_REPORT  # noqa: E402

logger = logging.getLogger("bench_serve")
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class BenchServeConfig:
    """python scripts/bench_serve.py: --chroma-url vs local retrieval, rag.serve's page vs rag.cli to the first
    token, and concurrent API clients against rag.serve."""

    file: list[Path] = field(default_factory=lambda: [SAMPLE_REPORT], metadata={"help": "Documents to index."})
    qa: Path = field(default=SAMPLE_QA, metadata={"help": "Questions (JSON list of {question, ...})."})
    retrieval_rounds: int = field(default=2, metadata={"help": "Passes over the questions per store and retriever."})
    first_token_rounds: int = field(default=5, metadata={"help": "Questions timed to the first token on each side."})
    clients: int = field(default=20, metadata={"help": "Concurrent API clients against rag.serve (0: skip the load run)."})
    duration_s: float = field(default=60.0, metadata={"help": "How long the clients send questions."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest answer (short figures; keeps the run minutes long)."})
    load_questions: int = field(default=20, metadata={"help": "The clients ask the first N questions, in turn."})
    warmup: bool = field(default=True, metadata={
        "help": "Ask those N questions once before the clients start, so the RSS figure is the steady state (torch "
                "keeps per-shape buffers: RSS grows over the first pass of new questions, then stays flat)."})
    llm: str = field(default=SMOLLM2, metadata={"help": "LLM of rag.cli and rag.serve (as their --llm)."})
    llm_url: str | None = field(default=None, metadata={
        "help": "Use this OpenAI-compatible server for both (as their --llm-url) instead of --llm."})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc, seconds: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up; log:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)


def stop(proc, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def spawn(command: list[str], log: Path, env: dict | None = None):
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def summary(values: list[float], scale: float = 1.0, digits: int = 3) -> dict:
    """median, p95 and max of `values` (times `scale`), or Nones when there are none."""
    from rag.evaluate import percentile

    if not values:
        return {"n": 0, "median": None, "p95": None, "max": None}
    return {"n": len(values), "median": round(statistics.median(values) * scale, digits),
            "p95": round(percentile(values, 0.95) * scale, digits), "max": round(max(values) * scale, digits)}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- 1. retrieval: --chroma-url against the local folder ----

def bench_retrieval(cfg: BenchServeConfig, questions: list[str], tmp: Path, models: dict) -> dict:
    from rag import remote
    from rag.cli import Answerer
    from rag.config import RagConfig

    port = free_port()
    chroma = Path(sys.executable).with_name("chroma")
    log = tmp / "chroma.log"
    proc = spawn([str(chroma) if chroma.exists() else "chroma", "run", "--path", str(tmp / "chroma_server"),
                  "--host", "127.0.0.1", "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/api/v2/heartbeat", proc, 60, log)
        rows = {}
        for retriever in ("hybrid", "dense"):
            common = {"file": cfg.file, "question": "-", "retrieve_only": True, "retriever": retriever}
            stores = {"local": Answerer(RagConfig(**common, persist_dir=tmp / "db"), time.perf_counter(), models=models),
                      "chroma_url": Answerer(RagConfig(**common, chroma_url=url), time.perf_counter(), models=models)}
            times: dict[str, list[float]] = {name: [] for name in stores}
            for name, a in stores.items():
                a.retriever.invoke(questions[0])  # warm: first-call costs are not retrieval
            for _ in range(cfg.retrieval_rounds):
                for question in questions:
                    for name, a in stores.items():  # interleaved: a load spike hits both sides alike
                        t0 = time.perf_counter()
                        a.retriever.invoke(question)
                        times[name].append(time.perf_counter() - t0)
            local, far = summary(times["local"], 1000, 2), summary(times["chroma_url"], 1000, 2)
            rows[retriever] = {"local_ms": local, "chroma_url_ms": far, "chunks": stores["local"].report.chunks,
                               "ratio_median": round(far["median"] / local["median"], 2),
                               "ratio_p95": round(far["p95"] / local["p95"], 2)}
        return rows
    finally:
        stop(proc)
        shutil.rmtree(remote.cache_folder(url), ignore_errors=True)  # this server's BM25 cache: it is gone


# ---- 2. time to first token: rag.cli against the page of rag.serve ----

def cli_first_tokens(cfg: BenchServeConfig, questions: list[str], tmp: Path, models: dict) -> list[float]:
    from rag.cli import Answerer
    from rag.config import RagConfig

    answerer = Answerer(RagConfig(file=cfg.file, question="-", persist_dir=tmp / "db", llm=cfg.llm,
                                  llm_url=cfg.llm_url, max_new_tokens=cfg.max_new_tokens), time.perf_counter(), models=models)
    answerer.ask(questions[-1], {})  # warm, as the server is once it answered one question
    times = []
    for question in questions[:cfg.first_token_rounds]:
        marks = answerer.ask(question, {})
        times.append(marks["first_token"])
    return times


def cli_cold_first_token(cfg: BenchServeConfig, question: str, tmp: Path) -> float:
    """`python -m rag.cli -q` in a new process: its --timings first_token_from_start (models load, index reused)."""
    command = [sys.executable, "-m", "rag.cli", *[a for f in cfg.file for a in ("--file", str(f))], "-q", question,
               "--persist-dir", str(tmp / "db"), "--max-new-tokens", str(cfg.max_new_tokens), "--llm", cfg.llm,
               "--timings", *(["--llm-url", cfg.llm_url] if cfg.llm_url else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    line = next(line for line in done.stderr.splitlines() if line.startswith("timings: "))
    return float(line.split("first_token_from_start ")[1].split("s")[0])


def page_first_tokens(base: str, questions: list[str]) -> tuple[str, list[float], list[float]]:
    """(how, seconds from opening the page to the first answer text on it, seconds to the page being ready),
    per question, a fresh page each."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        return "http", [http_first_token(base, q, with_page=True)[1] for q in questions], []
    times, loads = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            for question in [questions[-1], *questions]:  # the first one warms the browser up, untimed
                page = browser.new_page()
                t0 = time.perf_counter()
                page.goto(base)
                page.wait_for_function("() => /chunks/.test(document.querySelector('#health').textContent)")
                loaded = time.perf_counter() - t0  # the page has its documents and health: ready to ask
                page.fill("#question", question)
                page.click("#ask")
                page.wait_for_function("() => document.querySelector('#answer').textContent.trim().length > 0",
                                       timeout=300_000, polling="raf")
                times.append(time.perf_counter() - t0)
                loads.append(loaded)
                page.wait_for_function("() => /^Done in/.test(document.querySelector('#state').textContent)",
                                       timeout=300_000)
                page.close()
        finally:
            browser.close()
    return "chromium", times[1:], loads[1:]


def http_first_token(base: str, question: str, with_page: bool = False) -> tuple[dict, float]:
    """(the request's record, seconds to its first token); see ask_stream."""
    import httpx

    t0 = time.perf_counter()
    if with_page:
        httpx.get(base, timeout=30).raise_for_status()
    record = ask_stream(base, question)
    return record, (record["first_token"] or float("nan")) + (record["sent"] - t0)


def ask_stream(base: str, question: str, client=None) -> dict:
    """One /api/ask/stream request, timed from sending: "queued" (the first ahead count), "wait" (to its
    turn: the queued event that says 0 ahead), "first_token", "total", "result", "error"."""
    import httpx

    record = {"sent": time.perf_counter(), "ahead": None, "wait": None, "first_token": None, "total": None,
              "result": None, "error": None}
    t0 = record["sent"]
    try:
        with (client or httpx).stream("GET", f"{base}/api/ask/stream", params={"question": question},
                                      timeout=httpx.Timeout(30, read=600)) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}"
                return record
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    now = time.perf_counter() - t0
                    if event == "queued":
                        if record["ahead"] is None:
                            record["ahead"] = data["ahead"]
                        if data["ahead"] == 0:
                            record["wait"] = now
                    elif event == "token" and record["first_token"] is None:
                        record["first_token"] = now
                    elif event == "done":
                        record["result"], record["total"] = data.get("result"), now
                    elif event == "error":
                        record["error"] = data.get("detail")
    except httpx.HTTPError as e:
        record["error"] = f"{type(e).__name__}: {e}"
    if record["result"] is None and record["error"] is None:
        record["error"] = "the stream ended without done"
    return record


# ---- 3. concurrent clients against rag.serve ----

def bench_clients(cfg: BenchServeConfig, base: str, pid: int, questions: list[str]) -> dict:
    import httpx
    import psutil

    server = psutil.Process(pid)

    def rss() -> int:  # the server and any children (an LLM server it started would be separate)
        return server.memory_info().rss + sum(c.memory_info().rss for c in server.children(recursive=True))

    records: list[dict] = []
    lock, done = threading.Lock(), threading.Event()
    samples: list[tuple[float, int]] = []
    t_start = time.perf_counter()

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter() - t_start, rss()))
            done.wait(0.5)

    def client(n: int):
        with httpx.Client() as http:
            i = n
            while time.perf_counter() - t_start < cfg.duration_s:
                record = ask_stream(base, questions[i % len(questions)], http)
                record["client"] = n
                with lock:
                    records.append(record)
                i += cfg.clients

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rss_start = rss()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(cfg.clients)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # a burst, but in a known order
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    done.set()
    sampler.join()
    answered = [r for r in records if r["result"] is not None and r["error"] is None]
    failed = [r for r in records if r["error"] is not None]
    peak = max(v for _, v in samples)
    return {"clients": cfg.clients, "duration_s": cfg.duration_s, "wall_s": round(wall, 1),
            "requests": len(records), "answered": len(answered), "failed": len(failed),
            "lost": len(records) - len(answered) - len(failed), "errors": sorted({r["error"] for r in failed})[:5],
            "empty_answers": sum(1 for r in answered if not r["result"].strip()),
            "answers_per_min": round(len(answered) / wall * 60, 1),
            "queue_wait_s": summary([r["wait"] for r in answered if r["wait"] is not None], 1, 2),
            "first_token_s": summary([r["first_token"] for r in answered if r["first_token"] is not None], 1, 2),
            "total_s": summary([r["total"] for r in answered], 1, 2),
            "max_ahead": max((r["ahead"] or 0) for r in records) if records else None,
            "rss_mb": {"start": round(rss_start / 2**20), "peak": round(peak / 2**20),
                       "end": round(samples[-1][1] / 2**20), "growth": round(peak / rss_start - 1, 3),
                       "every_10s": [round(v / 2**20) for t, v in samples[::20]]}}


def bench_serve(cfg: BenchServeConfig, questions: list[str], tmp: Path) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "rag.serve", *[a for f in cfg.file for a in ("--file", str(f))],
               "--port", str(port), "--persist-dir", str(tmp / "db"), "--upload-dir", str(tmp / "uploads"),
               "--max-new-tokens", str(cfg.max_new_tokens), "--llm", cfg.llm,
               *(["--llm-url", cfg.llm_url] if cfg.llm_url else [])]
    log = tmp / "serve.log"
    proc = spawn(command, log, env={"TUNERAG_API_KEY": ""})
    try:
        t0 = time.perf_counter()
        wait_until_up(f"{base}/api/health", proc, 300, log)
        result = {"ready_s": round(time.perf_counter() - t0, 1)}
        httpx.post(f"{base}/api/ask", json={"question": questions[-1]}, timeout=300).raise_for_status()  # warm
        import psutil

        result["rss_mb_first_answer"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20)
        result["load_before"] = load()
        method, times, loads = page_first_tokens(base, questions[:cfg.first_token_rounds])
        result["page_first_token"] = {"method": method, **summary(times, 1, 3), "values": [round(t, 3) for t in times],
                                      "page_ready": summary(loads, 1, 3)}
        result["api_first_token"] = summary([http_first_token(base, q)[1] for q in questions[:cfg.first_token_rounds]],
                                            1, 3)
        if cfg.clients:
            asked = questions[:cfg.load_questions]
            if cfg.warmup:
                t = time.perf_counter()
                for question in asked:
                    httpx.post(f"{base}/api/ask", json={"question": question}, timeout=300).raise_for_status()
                result["warmup_s"] = round(time.perf_counter() - t, 1)
            result["rss_mb_before_clients"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20)
            result["clients"] = bench_clients(cfg, base, proc.pid, asked)
        result["load_after"] = load()
        return result
    finally:
        stop(proc, signal.SIGINT)  # as Ctrl-C: uvicorn's clean shutdown


def main(cfg: BenchServeConfig) -> dict:
    import torch

    from rag.cli import quiet_libraries

    t0 = time.perf_counter()
    quiet_libraries()
    logger.info("config: %s", asdict(cfg))
    questions = [item["question"] for item in json.loads(Path(cfg.qa).read_text(encoding="utf-8"))]
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_at_start": load()}
    models: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve-") as name:
        tmp = Path(name)
        logger.info("1/3 retrieval: --chroma-url vs the local folder")
        retrieval = {"load_before": load(), **bench_retrieval(cfg, questions, tmp, models), "load_after": load()}
        logger.info("2/3 rag.cli: time to first token")
        cli = {"load_before": load(), **summary(cli_first_tokens(cfg, questions, tmp, models), 1, 3)}
        cli["one_shot_from_start_s"] = round(cli_cold_first_token(cfg, questions[0], tmp), 2)
        models.clear()  # the server process loads its own; this one holds none while it runs
        logger.info("3/3 rag.serve: the page to the first token, then %d clients for %.0f s", cfg.clients, cfg.duration_s)
        serve = bench_serve(cfg, questions, tmp)
    ratio = serve["page_first_token"]["median"] / cli["median"]
    result = {"bench": "serve", "config": asdict(cfg), "machine": machine, "torch": torch.__version__,
              "metrics": {"retrieval": retrieval, "cli_first_token_s": cli, "serve": serve,
                          "page_vs_cli_first_token": round(ratio, 2)},
              "seconds": round(time.perf_counter() - t0, 1)}
    print_table(result["metrics"])
    print(json.dumps(result, default=str))
    return result


def print_table(m: dict) -> None:
    err = sys.stderr
    print(f"\n{'retrieval (ms)':<22} {'local med':>9} {'p95':>7} {'chroma_url med':>14} {'p95':>7} {'ratio':>6}", file=err)
    for retriever in ("hybrid", "dense"):
        r = m["retrieval"][retriever]
        print(f"{retriever:<22} {r['local_ms']['median']:>9.2f} {r['local_ms']['p95']:>7.2f} "
              f"{r['chroma_url_ms']['median']:>14.2f} {r['chroma_url_ms']['p95']:>7.2f} {r['ratio_median']:>6.2f}", file=err)
    s, page = m["serve"], m["serve"]["page_first_token"]
    print(f"\nfirst token (s)        rag.cli {m['cli_first_token_s']['median']:.3f} (one-shot from start "
          f"{m['cli_first_token_s']['one_shot_from_start_s']:.1f})   page ({page['method']}) {page['median']:.3f} "
          f"(ready {page['page_ready']['median']})   API {s['api_first_token']['median']:.3f}   "
          f"page/cli {m['page_vs_cli_first_token']:.2f}", file=err)
    if "clients" in s:
        c = s["clients"]
        print(f"\n{c['clients']} clients, {c['duration_s']:.0f} s: {c['requests']} requests, {c['answered']} answered, "
              f"{c['failed']} failed, {c['lost']} lost; {c['answers_per_min']} answers/min", file=err)
        print(f"queue wait median {c['queue_wait_s']['median']} s, p95 {c['queue_wait_s']['p95']} s; first token "
              f"p95 {c['first_token_s']['p95']} s; RSS {c['rss_mb']['start']} -> peak {c['rss_mb']['peak']} MB "
              f"({c['rss_mb']['growth']:+.1%}; {s['rss_mb_first_answer']} MB after the first answer)", file=err)


if __name__ == "__main__":
    run_cli(main, BenchServeConfig)
