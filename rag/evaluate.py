"""Scoring retrieval and answers on a question set (used by tunerag.pipeline and scripts/bench_rag.py).

Per embedder: index build time and chunks/s into a Chroma store, retrieval latency (median, p95) and
recall@k; per LLM: load time, time to first token, generation tokens/s and answer match (see rag.metrics).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rag.config import RagConfig, rag_default
from tunerag.models import MINILM, SMOLLM2
from tunerag.samples import SAMPLE_QA, SAMPLE_REPORT

logger = logging.getLogger(__name__)


@dataclass
class RagEvalConfig:
    """Index, retrieval and generation figures for rag.cli on a question set (default: the shipped sample)."""

    embeddings: list[str] = field(default_factory=lambda: [MINILM], metadata={"help": "Embedder(s) to compare (repeat)."})
    llm: list[str] = field(default_factory=lambda: [SMOLLM2], metadata={"help": "LLM(s) to compare (repeat)."})
    file: list[Path] = field(default_factory=lambda: [SAMPLE_REPORT], metadata={
        "help": "Document(s) or folder(s) to index (repeat)."})
    qa: Path = field(default=SAMPLE_QA, metadata={"help": "Questions with answer and passage."})
    k: int = field(default=rag_default("k"), metadata={"help": "Passages per question."})
    chunk_size: int = field(default=rag_default("chunk_size"), metadata={"help": "As rag.cli (capped at the embedder's limit)."})
    chunk_overlap: int = field(default=rag_default("chunk_overlap"), metadata={"help": "As rag.cli."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest answer; the expected answers are short figures."})
    gen_questions: int = field(default=66, metadata={"help": "Answer only the first N questions with each LLM (generation is slow on CPU)."})
    retriever: str = field(default=rag_default("retriever"), metadata={"help": "As rag.cli --retriever."})
    bm25_weight: float = field(default=rag_default("bm25_weight"), metadata={"help": "As rag.cli --bm25-weight."})
    fetch_k: int = field(default=rag_default("fetch_k"), metadata={"help": "As rag.cli --fetch-k."})
    sentence_weight: float = field(default=rag_default("sentence_weight"), metadata={"help": "As rag.cli --sentence-weight."})
    rerank_weight: float = field(default=rag_default("rerank_weight"), metadata={"help": "As rag.cli --rerank-weight."})
    year_weight: float = field(default=rag_default("year_weight"), metadata={"help": "As rag.cli --year-weight."})
    year_copies: Literal["last", "keep"] = field(default=rag_default("year_copies"), metadata={"help": "As rag.cli --year-copies."})
    dtype: str = field(default="auto", metadata={"help": "As rag.cli --dtype."})
    abbreviations: bool = field(default=rag_default("abbreviations"), metadata={"help": "As rag.cli --abbreviations."})
    unknown_names: str = field(default=rag_default("unknown_names"), metadata={"help": "As rag.cli --unknown-names."})
    min_support: float = field(default=rag_default("min_support"), metadata={"help": "As rag.cli --min-support."})
    context: str = field(default=rag_default("context"), metadata={"help": "As rag.cli --context."})
    context_tokens: int = field(default=rag_default("context_tokens"), metadata={"help": "As rag.cli --context-tokens."})
    answer: str = field(default=rag_default("answer"), metadata={"help": "As rag.cli --answer."})
    seed: int = field(default=0, metadata={"help": "Seed (decoding is greedy)."})

    def rag_config(self, **overrides) -> RagConfig:
        settings = {"file": list(self.file), "question": "-", "k": self.k, "chunk_size": self.chunk_size,
                    "chunk_overlap": self.chunk_overlap, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                    "retriever": self.retriever, "bm25_weight": self.bm25_weight, "fetch_k": self.fetch_k,
                    "sentence_weight": self.sentence_weight, "rerank_weight": self.rerank_weight,
                    "year_weight": self.year_weight, "year_copies": self.year_copies, "context": self.context,
                    "context_tokens": self.context_tokens, "answer": self.answer, "dtype": self.dtype,
                    "abbreviations": self.abbreviations, "unknown_names": self.unknown_names,
                    "min_support": self.min_support}
        return RagConfig(**(settings | overrides))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def bench_embedder(cfg: RagEvalConfig, spec: str, items: list[dict], persist_dir: Path, ks=(1, 2, 4, 8)) -> dict:
    """Index build (or reuse) and retrieval figures of one embedder with cfg's retriever."""
    from rag.cli import Answerer
    from rag.metrics import recall_at_k

    t0 = time.perf_counter()
    answerer = Answerer(cfg.rag_config(embeddings=spec, persist_dir=persist_dir, k=max(ks), retrieve_only=True), t0)
    report = answerer.report
    answerer.retriever.invoke(items[0]["question"])  # warm-up, not timed
    latencies, retrieved = [], []
    for item in items:
        t = time.perf_counter()
        docs = answerer.retriever.invoke(item["question"])
        latencies.append(time.perf_counter() - t)
        retrieved.append([d.page_content for d in docs])
    return {
        "embeddings": spec, "retriever": cfg.retriever, "collection": report.collection, "chunks": report.chunks,
        "load_s": round(answerer.timings["load_embedder"], 3),
        "index_build_s": report.seconds, "chunks_per_s": round(report.embedded / report.seconds, 1) if report.embedded else None,
        "retrieval_median_ms": round(1000 * statistics.median(latencies), 1),
        "retrieval_p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        **{f"recall@{k}": round(recall_at_k([r[:k] for r in retrieved], items), 4) for k in sorted({*ks, cfg.k})},
    }


def bench_llm(cfg: RagEvalConfig, spec: str, embedder: str, items: list[dict], persist_dir: Path) -> dict:
    """Answer figures of one LLM (or of --answer extractive) with cfg's retriever and context."""
    from rag.chain import is_no_answer
    from rag.cli import Answerer
    from rag.metrics import answer_matches

    t0 = time.perf_counter()
    answerer = Answerer(cfg.rag_config(embeddings=embedder, llm=spec, persist_dir=persist_dir), t0)
    mode = answerer.cfg.answer  # --answer auto as resolved
    ttft, rates, matches, evidence, answers = [], [], [], [], []
    shown, declined = [], []  # the answer is in the passages the LLM read; the LLM said it does not know
    for item in items[: cfg.gen_questions]:
        out: dict = {}
        stamps: list[float] = []
        t = time.perf_counter()
        marks = answerer.ask(item["question"], out, on_token=lambda _: stamps.append(time.perf_counter()))
        ttft.append(marks.get("first_token", time.perf_counter() - t))
        if mode != "extractive":
            tokens = len(answerer.tokenizer(out["result"], add_special_tokens=False)["input_ids"])
            if len(stamps) > 1 and tokens > 1:
                rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
        matches.append(answer_matches(out["result"], item["answer"]))
        evidence.append(bool(out.get("evidence")) and answer_matches(out["evidence"]["text"], item["answer"]))
        shown.append(any(answer_matches(d.page_content, item["answer"]) for d in out["source_documents"]))
        declined.append(is_no_answer(out["result"]))
        answers.append({"id": item["id"], "answer": item["answer"], "result": out["result"], "match": matches[-1],
                        "evidence": (out.get("evidence") or {}).get("text"), "evidence_match": evidence[-1],
                        "citations": out.get("citations"), "answer_in_passages": shown[-1], "declined": declined[-1]})
        logger.info("%s %s: %s | expected %s", item["id"], "ok " if matches[-1] else "no ", out["result"][:100].replace("\n", " "), item["answer"])
    return {
        "llm": spec if mode != "extractive" else "(extractive)", "embeddings": embedder, "retriever": cfg.retriever,
        "context": cfg.context if mode != "extractive" else "-", "answer": mode, "questions": len(matches),
        "load_s": round(answerer.timings.get("load_llm", 0.0), 3),
        "first_token_median_s": round(statistics.median(ttft), 3), "first_token_p95_s": round(percentile(ttft, 0.95), 3),
        "tokens_per_s_median": round(statistics.median(rates), 2) if rates else None,
        "answer_match": round(sum(matches) / len(matches), 4), "evidence_match": round(sum(evidence) / len(evidence), 4),
        # of the questions whose answer the passages hold: the share answered (not "I don't know");
        # of those whose passages do not hold it: the share declined
        "answered_when_in_passages": share([not d for d, s in zip(declined, shown) if s]),
        "declined_when_not_in_passages": share([d for d, s in zip(declined, shown) if not s]),
        "answers": answers,
    }
