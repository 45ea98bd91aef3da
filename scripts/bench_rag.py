"""python scripts/bench_rag.py [--corpus sample --corpus long] [--split heldout] [--gen-questions 40]

RAG benchmark of rag.cli's own path (rag.cli.Answerer) on the shipped corpora, side by side in one run:
  - per retriever (dense, bm25, hybrid): answer-in-top-k for k = 1, 2, 4, 8 (a top-k chunk holds the
    question's answering passage, rag.metrics.chunk_answers), retrieval latency median/p95, and the
    index build time and chunks/s into a fresh Chroma store;
  - per answer configuration (retriever/context, or retriever/extractive): answer match (the answer holds
    the expected figure), evidence match (the evidence sentence holds it), time to first token.
Corpora: `sample` (the 2025 report, 66 questions) and `long` (three annual reports, a rating
methodology and a bond prospectus, tunerag/data/long). Each question set is split into a tuning half and
a held-out half (`split` field); defaults are chosen on `--split tune`, figures reported on `heldout`.
One JSON object on stdout, a table on stderr.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without an install

from rag.config import rag_default  # noqa: E402
from rag.evaluate import RagEvalConfig, bench_embedder, bench_llm  # noqa: E402
from tunerag.common import run_cli  # noqa: E402
from tunerag.models import MINILM, SMOLLM2  # noqa: E402
from tunerag.samples import corpus_files, corpus_questions  # noqa: E402

logger = logging.getLogger("bench_rag")


@dataclass
class BenchRagConfig:
    """python scripts/bench_rag.py: retrieval and answer figures per retriever and context mode, on the shipped corpora."""

    corpus: list[str] = field(default_factory=lambda: ["sample", "long"], metadata={"help": "sample, long and/or policy (repeat; see tunerag.samples.CORPORA)."})
    split: Literal["heldout", "tune", "all"] = field(default="heldout", metadata={
        "help": "Which half of each question set: tune (to choose defaults) or heldout (to report)."})
    retrievers: list[str] = field(default_factory=lambda: ["dense", "bm25", "hybrid"], metadata={
        "help": "Retrievers to score for answer-in-top-k (repeat)."})
    configs: list[str] = field(default_factory=lambda: ["hybrid/sentences", "hybrid/sentences@float32", "hybrid/chunks",
                                                        "dense/chunks@float32", "hybrid/extractive"], metadata={
        "help": "Answer configurations RETRIEVER/CONTEXT[+quote][@DTYPE] or RETRIEVER/extractive (repeat; +quote: "
                "--answer quote); dense/chunks@float32 "
                "is the old path, @float32 beside the default (auto: bfloat16 where the CPU has it) checks the fast path."})
    embeddings: str = field(default=MINILM, metadata={"help": "Embedder."})
    llm: str = field(default=SMOLLM2, metadata={"help": "LLM."})
    k: int = field(default=rag_default("k"), metadata={"help": "Passages per question given to the LLM."})
    bm25_weight: float = field(default=rag_default("bm25_weight"), metadata={"help": "As rag.cli --bm25-weight."})
    fetch_k: int = field(default=rag_default("fetch_k"), metadata={"help": "As rag.cli --fetch-k."})
    sentence_weight: float = field(default=rag_default("sentence_weight"), metadata={"help": "As rag.cli --sentence-weight."})
    rerank_weight: float = field(default=rag_default("rerank_weight"), metadata={"help": "As rag.cli --rerank-weight."})
    year_weight: float = field(default=rag_default("year_weight"), metadata={"help": "As rag.cli --year-weight."})
    year_copies: Literal["last", "keep"] = field(default=rag_default("year_copies"), metadata={"help": "As rag.cli --year-copies."})
    abbreviations: bool = field(default=rag_default("abbreviations"), metadata={"help": "As rag.cli --abbreviations."})
    unknown_names: str = field(default=rag_default("unknown_names"), metadata={"help": "As rag.cli --unknown-names."})
    context_tokens: int = field(default=rag_default("context_tokens"), metadata={"help": "As rag.cli --context-tokens."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest answer; the expected answers are short figures."})
    gen_questions: int = field(default=0, metadata={"help": "Answer only the first N questions per corpus (0: all)."})
    seed: int = field(default=0, metadata={"help": "Seed (decoding is greedy)."})
    followups: bool = field(default=False, metadata={
        "help": "Only measure follow-up questions (tunerag/data/finance_followups.json, --split half): answer-in-top-4 "
                "of the follow-up searched alone, with the conversation (rag.chain.retrieval_query), and as the "
                "written-out standalone question."})
    min_support: float = field(default=rag_default("min_support"), metadata={"help": "As rag.cli --min-support."})
    names: bool = field(default=False, metadata={
        "help": "Only measure the answers \"I don't know\" given without the LLM (--unknown-names decline, then "
                "--min-support; extractive answers, no LLM loads): per --corpus, the share of its own questions "
                "(--split half) whose answer the passages hold that are still answered, and of the other corpora's "
                "that are declined; with the name check alone and with both."})


def retrieval_settings(cfg: BenchRagConfig) -> dict:
    """The hybrid retriever's flags, as every part of the benchmark passes them to RagEvalConfig."""
    return {"bm25_weight": cfg.bm25_weight, "fetch_k": cfg.fetch_k, "sentence_weight": cfg.sentence_weight,
            "rerank_weight": cfg.rerank_weight, "year_weight": cfg.year_weight, "year_copies": cfg.year_copies}


def bench_followups(cfg: BenchRagConfig) -> dict:
    from rag.chain import retrieval_query
    from rag.cli import Answerer
    from rag.metrics import recall_at_k
    from tunerag.samples import sample_path

    items = [it for it in json.loads(sample_path("finance_followups.json").read_text(encoding="utf-8"))
             if cfg.split == "all" or it["split"] == cfg.split]
    with tempfile.TemporaryDirectory(prefix="bench_followups-") as tmp:
        run = RagEvalConfig(file=corpus_files("sample"), k=cfg.k, **retrieval_settings(cfg))
        answerer = Answerer(run.rag_config(embeddings=cfg.embeddings, persist_dir=Path(tmp), retrieve_only=True), 0.0)
        queries = {"without history": [it["followup"] for it in items],
                   "with history": [retrieval_query(it["followup"], [(it["first"], "")]) for it in items],
                   "standalone (written out)": [it["standalone"] for it in items]}
        scores = {name: round(recall_at_k([[d.page_content for d in answerer.retriever.invoke(q)] for q in qs], items), 4)
                  for name, qs in queries.items()}
    print(f"\nfollow-ups ({len(items)}, {cfg.split}): answer-in-top-{cfg.k} " +
          ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), file=sys.stderr)
    return {"questions": len(items), f"recall@{cfg.k}": scores}


def bench_names(cfg: BenchRagConfig) -> dict:
    """Per corpus: of its own questions whose answer the retrieved passages hold, the share answered; of the
    other corpora's (whose answers are in none of its documents), the share answered "I don't know" without
    the LLM; by the name check alone (--min-support 0) and with the support check too."""
    from rag.cli import Answerer
    from rag.metrics import answer_matches

    result = {}
    with tempfile.TemporaryDirectory(prefix="bench_names-") as tmp:
        for corpus in cfg.corpus:
            own = corpus_questions(corpus, cfg.split)
            others = {other: corpus_questions(other, cfg.split) for other in cfg.corpus if other != corpus}
            result[corpus] = {}
            for label, min_support in (("names", 0.0), ("names+support", cfg.min_support)):
                run = RagEvalConfig(file=corpus_files(corpus), k=cfg.k, min_support=min_support,
                                    **retrieval_settings(cfg))
                # extractive: the checks run as for any answer, and no LLM loads
                answerer = Answerer(run.rag_config(embeddings=cfg.embeddings, persist_dir=Path(tmp),
                                                   answer="extractive"), 0.0)

                def asked(items: list[dict]) -> list[tuple[bool, bool]]:
                    """(declined, answer in the passages) per question."""
                    rows = []
                    for item in items:
                        out: dict = {}
                        answerer.ask(item["question"], out)
                        shown = any(answer_matches(d.page_content, item["answer"]) for d in out["source_documents"])
                        rows.append((out["result"].startswith("I don't know:"), shown))
                    return rows

                answerable = [declined for declined, shown in asked(own) if shown]
                row = {"own_answerable": len(answerable),
                       "own_answered": round(1 - sum(answerable) / len(answerable), 4)}
                for other, items in others.items():
                    declines = [declined for declined, shown in asked(items) if not shown]
                    row[f"{other}_questions"] = len(declines)
                    row[f"{other}_declined"] = round(sum(declines) / len(declines), 4)
                result[corpus][label] = row
                print(f"{corpus:<8} {label:<14} own answered {row['own_answered']:.3f} of {len(answerable)}; other "
                      "corpora's declined: " + ", ".join(f"{o} {row[o + '_declined']:.3f} of {row[o + '_questions']}"
                                                          for o in others), file=sys.stderr)
    return result


def main(cfg: BenchRagConfig) -> dict:
    import torch
    from transformers import set_seed

    from rag.cli import quiet_libraries

    t0 = time.perf_counter()
    set_seed(cfg.seed)
    quiet_libraries()
    logger.info("config: %s", asdict(cfg))
    if cfg.names:
        result = {"bench": "rag_unknown_names", "config": asdict(cfg), "metrics": bench_names(cfg)}
        print(json.dumps(result))
        return result
    if cfg.followups:
        result = {"bench": "rag_followups", "config": asdict(cfg), "metrics": bench_followups(cfg)}
        print(json.dumps(result))
        return result
    results: dict[str, dict] = {}
    for corpus in cfg.corpus:
        items = corpus_questions(corpus, cfg.split)
        base = RagEvalConfig(embeddings=[cfg.embeddings], llm=[cfg.llm], file=corpus_files(corpus), k=cfg.k,
                             max_new_tokens=cfg.max_new_tokens, gen_questions=cfg.gen_questions or len(items),
                             context_tokens=cfg.context_tokens, seed=cfg.seed,
                             abbreviations=cfg.abbreviations, unknown_names=cfg.unknown_names,
                             min_support=cfg.min_support, **retrieval_settings(cfg))
        retrieval, generation = [], []
        with tempfile.TemporaryDirectory(prefix="bench_rag-") as tmp:
            store = Path(tmp) / "db"  # fresh, so the first row measures the index build
            for retriever in cfg.retrievers:
                retrieval.append(bench_embedder(replace(base, retriever=retriever), cfg.embeddings, items, store))
            for config in cfg.configs:
                config, _, dtype = config.partition("@")
                config, _, quote = config.partition("+")
                retriever, _, mode = config.partition("/")
                answer = "extractive" if mode == "extractive" else "quote" if quote == "quote" else "llm"
                run = replace(base, retriever=retriever, answer=answer,
                              context=mode if mode != "extractive" else "sentences", dtype=dtype or "auto")
                generation.append({**bench_llm(run, cfg.llm, cfg.embeddings, items, store), "dtype": run.dtype})
        results[corpus] = {"questions": len(items), "retrieval": retrieval, "generation": generation}
    result = {"bench": "rag", "config": asdict(cfg), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "metrics": results, "seconds": round(time.perf_counter() - t0, 3)}
    print_table(results)
    print(json.dumps(result, default=str))
    return result


def print_table(results: dict[str, dict]) -> None:
    err = sys.stderr
    for corpus, r in results.items():
        print(f"\n{corpus} ({r['questions']} questions)", file=err)
        print(f"{'retriever':<10} {'top1':>6} {'top2':>6} {'top4':>6} {'top8':>6} {'med ms':>7} {'p95 ms':>7} "
              f"{'build s':>8} {'chunks':>6}", file=err)
        for x in r["retrieval"]:
            print(f"{x['retriever']:<10} {x['recall@1']:>6.3f} {x['recall@2']:>6.3f} {x['recall@4']:>6.3f} "
                  f"{x['recall@8']:>6.3f} {x['retrieval_median_ms']:>7.1f} {x['retrieval_p95_ms']:>7.1f} "
                  f"{x['index_build_s']:>8.2f} {x['chunks']:>6}", file=err)
        print(f"{'answer config':<28} {'n':>4} {'answer':>7} {'evidence':>8} {'TTFT med':>9} {'tok/s':>6}", file=err)
        for g in r["generation"]:
            rate = f"{g['tokens_per_s_median']:.1f}" if g["tokens_per_s_median"] else "-"
            label = f"{g['retriever']}/{g['context'] if g['llm'] != '(extractive)' else 'extractive'}"
            label += f"{'+quote' if g.get('answer') == 'quote' else ''} {g['dtype']}"
            print(f"{label:<28} {g['questions']:>4} {g['answer_match']:>7.3f} {g['evidence_match']:>8.3f} "
                  f"{g['first_token_median_s']:>9.2f} {rate:>6}", file=err)


if __name__ == "__main__":
    run_cli(main, BenchRagConfig)
