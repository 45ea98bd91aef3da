"""Retrieval metrics of one or more embedders on a pairs file, side by side.

    python -m embeddings.evaluate --data pairs/val.json --model minilm --model models/emb-tuned
    python -m embeddings.evaluate --data pairs/val.json --model models/emb-tuned --json > metrics.json

The numbers are sentence-transformers' own InformationRetrievalEvaluator's (cosine similarity):
accuracy@1/3/5/10, MRR@10, NDCG@10 and MAP@100, one column per --model.
"""

from __future__ import annotations

import json
import logging
import sys

from embeddings.config import EvaluateConfig
from embeddings.data import Pairs, load_pairs
from tunerag.common import run_cli

logger = logging.getLogger(__name__)

METRICS = ["accuracy@1", "accuracy@3", "accuracy@5", "accuracy@10", "mrr@10", "ndcg@10", "map@100"]


def score(model, pairs: Pairs, batch_size: int = 32) -> dict[str, float]:
    """{metric: value} for METRICS, straight from the evaluator (its key `cosine_<metric>`)."""
    from embeddings.finetune import ir_evaluator

    evaluator = ir_evaluator(pairs, name="", batch_size=batch_size, show_progress_bar=len(pairs.corpus) > 2000)
    results = evaluator(model)
    return {m: float(results[f"cosine_{m}"]) for m in METRICS}


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as rows, models as columns."""
    names = list(results)
    width = max(len(m) for m in METRICS)
    cols = [max(len(n), 7) for n in names]
    lines = [" | ".join([f"{'metric':<{width}}"] + [f"{n:>{w}}" for n, w in zip(names, cols)])]
    lines.append("-+-".join(["-" * width] + ["-" * w for w in cols]))
    for m in METRICS:
        lines.append(" | ".join([f"{m:<{width}}"] + [f"{results[n][m]:>{w}.4f}" for n, w in zip(names, cols)]))
    return "\n".join(lines)


def main(cfg: EvaluateConfig) -> dict:
    from tunerag.models import load_embedder

    pairs = load_pairs(cfg.data)
    logger.info("%s: %d queries over %d passages", cfg.data, len(pairs.queries), len(pairs.corpus))
    results = {}
    for spec in cfg.model:
        results[spec] = score(load_embedder(spec), pairs, cfg.batch_size)
    table = format_table(results)
    if cfg.json:
        print(table, file=sys.stderr)
        print(json.dumps({"data": str(cfg.data), "queries": len(pairs.queries), "passages": len(pairs.corpus),
                          "similarity": "cosine", "metrics": results}))
    else:
        print(table)
    return results


if __name__ == "__main__":
    run_cli(main, EvaluateConfig)
