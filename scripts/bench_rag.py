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
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without an install

from rag.evaluate import RagEvalConfig as BenchRagConfig  # noqa: E402
from rag.evaluate import bench_embedder, bench_llm  # noqa: E402
from tunerag.common import run_cli  # noqa: E402

logger = logging.getLogger("bench_rag")


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
