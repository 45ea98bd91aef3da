"""python scripts/bench_rag.py [--embeddings minilm --embeddings out/tuned] [--llm smollm2 --llm out/merged] [--gen-questions 66]

RAG benchmark on the shipped sample: per embedder, index build time and chunks/s into a fresh
Chroma store, retrieval latency (median, p95) and recall@k over data/finance_qa.json; per LLM (with
the first embedder), load time, time to first token, generation tokens/s and answer quality (share of
answers containing the expected `answer`, see rag/metrics.py). One JSON object on stdout, a table on stderr.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without an install

from embeddings.models import MINILM  # noqa: E402
from llm_finetune.common import run_cli  # noqa: E402
from llm_finetune.models import SMOLLM2  # noqa: E402
logger = logging.getLogger("bench_rag")


@dataclass
class BenchRagConfig:
    """python scripts/bench_rag.py: index, retrieval and generation figures for rag.cli on the sample data."""

    embeddings: list[str] = field(default_factory=lambda: [MINILM], metadata={"help": "Embedder(s) to compare (repeat)."})
    llm: list[str] = field(default_factory=lambda: [SMOLLM2], metadata={"help": "LLM(s) to compare (repeat)."})
    file: list[Path] = field(default_factory=lambda: [REPO / "data" / "finance_report.txt"], metadata={
        "help": "Document(s) or folder(s) to index (repeat)."})
    qa: Path = field(default=REPO / "data" / "finance_qa.json", metadata={"help": "Questions with answer and passage."})
    k: int = field(default=4, metadata={"help": "Passages per question."})
    chunk_size: int = field(default=512, metadata={"help": "As rag.cli (capped at the embedder's limit)."})
    chunk_overlap: int = field(default=50, metadata={"help": "As rag.cli."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer; the expected answers are short figures."})
    gen_questions: int = field(default=66, metadata={"help": "Answer only the first N questions with each LLM (generation is slow on CPU)."})
    seed: int = field(default=0, metadata={"help": "Seed (decoding is greedy)."})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_embedder(cfg: BenchRagConfig, spec: str, items: list[dict], persist_dir: Path) -> dict:
    from rag.cli import Answerer
    from rag.config import RagConfig
    from rag.metrics import recall_at_k

    t0 = time.perf_counter()
    answerer = Answerer(RagConfig(file=list(cfg.file), question="-", embeddings=spec, persist_dir=persist_dir, k=cfg.k,
                                  chunk_size=cfg.chunk_size, chunk_overlap=cfg.chunk_overlap, retrieve_only=True), t0)
    report = answerer.report
    answerer.retriever.invoke(items[0]["question"])  # warm-up, not timed
    latencies, retrieved = [], []
    for item in items:
        t = time.perf_counter()
        docs = answerer.retriever.invoke(item["question"])
        latencies.append(time.perf_counter() - t)
        retrieved.append([d.page_content for d in docs])
    top1 = [r[:1] for r in retrieved]
    return {
        "embeddings": spec, "collection": report.collection, "chunks": report.chunks,
        "load_s": round(answerer.timings["load_embedder"], 3),
        "index_build_s": report.seconds, "chunks_per_s": round(report.embedded / report.seconds, 1),
        "retrieval_median_ms": round(1000 * statistics.median(latencies), 1),
        "retrieval_p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        f"recall@{cfg.k}": round(recall_at_k(retrieved, items), 4), "recall@1": round(recall_at_k(top1, items), 4),
    }


def bench_llm(cfg: BenchRagConfig, spec: str, embedder: str, items: list[dict], persist_dir: Path) -> dict:
    from rag.cli import Answerer
    from rag.config import RagConfig
    from rag.metrics import answer_matches

    t0 = time.perf_counter()
    answerer = Answerer(RagConfig(file=list(cfg.file), question="-", embeddings=embedder, llm=spec, persist_dir=persist_dir,
                                  k=cfg.k, chunk_size=cfg.chunk_size, chunk_overlap=cfg.chunk_overlap,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed), t0)
    ttft, rates, matches, answers = [], [], [], []
    for item in items[: cfg.gen_questions]:
        out: dict = {}
        stamps: list[float] = []
        t = time.perf_counter()
        marks = answerer.ask(item["question"], out, on_token=lambda _: stamps.append(time.perf_counter()))
        ttft.append(marks.get("first_token", time.perf_counter() - t))
        tokens = len(answerer.tokenizer(out["result"], add_special_tokens=False)["input_ids"])
        if len(stamps) > 1 and tokens > 1:
            rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
        matches.append(answer_matches(out["result"], item["answer"]))
        answers.append({"id": item["id"], "answer": item["answer"], "result": out["result"], "match": matches[-1]})
        logger.info("%s %s: %s | expected %s", item["id"], "ok " if matches[-1] else "no ", out["result"][:100].replace("\n", " "), item["answer"])
    return {
        "llm": spec, "embeddings": embedder, "questions": len(matches), "load_s": round(answerer.timings["load_llm"], 3),
        "first_token_median_s": round(statistics.median(ttft), 3), "first_token_p95_s": round(percentile(ttft, 0.95), 3),
        "tokens_per_s_median": round(statistics.median(rates), 2) if rates else None,
        "answer_match": round(sum(matches) / len(matches), 4), "answers": answers,
    }


def main(cfg: BenchRagConfig) -> dict:
    import torch
    from transformers import set_seed

    from rag.cli import quiet_libraries

    t0 = time.perf_counter()
    set_seed(cfg.seed)
    quiet_libraries()
    logger.info("config: %s", asdict(cfg))
    items = json.loads(Path(cfg.qa).read_text())
    retrieval, generation = [], []
    with tempfile.TemporaryDirectory(prefix="bench_rag-") as tmp:
        store = Path(tmp) / "db"  # fresh, so the index build is measured, not reused
        for spec in cfg.embeddings:
            retrieval.append(bench_embedder(cfg, spec, items, store))
        for spec in cfg.llm:
            generation.append(bench_llm(cfg, spec, cfg.embeddings[0], items, store))
    result = {"bench": "rag", "config": asdict(cfg), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "metrics": {"retrieval": retrieval, "generation": generation},
              "seconds": round(time.perf_counter() - t0, 3)}
    print_table(cfg, retrieval, generation)
    print(json.dumps(result, default=str))
    return result


def print_table(cfg: BenchRagConfig, retrieval: list[dict], generation: list[dict]) -> None:
    err = sys.stderr
    print(f"\n{'embedder':<28} {'chunks':>6} {'build s':>8} {'chunks/s':>8} {'med ms':>7} {'p95 ms':>7} "
          f"{f'R@{cfg.k}':>6} {'R@1':>6}", file=err)
    for r in retrieval:
        print(f"{r['embeddings'][-28:]:<28} {r['chunks']:>6} {r['index_build_s']:>8.2f} {r['chunks_per_s']:>8.1f} "
              f"{r['retrieval_median_ms']:>7.1f} {r['retrieval_p95_ms']:>7.1f} {r[f'recall@{cfg.k}']:>6.3f} {r['recall@1']:>6.3f}",
              file=err)
    print(f"\n{'llm':<28} {'n':>3} {'load s':>7} {'TTFT med':>9} {'TTFT p95':>9} {'tok/s':>6} {'match':>6}", file=err)
    for g in generation:
        rate = f"{g['tokens_per_s_median']:.1f}" if g["tokens_per_s_median"] else "-"
        print(f"{g['llm'][-28:]:<28} {g['questions']:>3} {g['load_s']:>7.2f} {g['first_token_median_s']:>9.2f} "
              f"{g['first_token_p95_s']:>9.2f} {rate:>6} {g['answer_match']:>6.3f}", file=err)


if __name__ == "__main__":
    run_cli(main, BenchRagConfig)
