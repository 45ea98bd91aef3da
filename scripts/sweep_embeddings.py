"""How the CPU defaults of embeddings.finetune were chosen: a grid of training settings on the sample document.

    python scripts/sweep_embeddings.py > sweep_ict.json                          # the default grid, ict pairs
    python scripts/sweep_embeddings.py --generator llm --learning-rate 1e-4 --epochs 4

For each --questions-per-chunk value, prepare makes pairs from data/finance_report.txt exactly as
scripts/bench_embeddings.py does (split by position, last 20% of the text is val). Then every
combination of --learning-rate x --epochs x --batch-size x --seed is trained by `python -m
embeddings.finetune` in its own process (a second training run in one process is slower here) and
the tuned model is scored on
  - val: the held-out synthetic queries; this is what a user has, so it alone picks the winner, and
  - qa_all / qa_heldout: the hand-written questions (see bench_embeddings.py); they never choose
    anything and are printed to show whether the choice made on val carries over.
Prints one JSON object on stdout and a table on stderr, ranked by the gain in val NDCG@10 over the
base model (mean over seeds): each data setting has its own val queries, so the gain is what compares.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embeddings.config import FinetuneConfig, PrepareConfig  # noqa: E402
from tunerag.common import parse_config  # noqa: E402
from tunerag.samples import SAMPLE_QA, SAMPLE_REPORT  # noqa: E402

logger = logging.getLogger("sweep_embeddings")


@dataclass
class SweepConfig:
    """Grid search of embeddings.finetune settings, picked by the gain in validation NDCG@10 over the base model."""

    doc: Path = field(default=SAMPLE_REPORT, metadata={"help": "Document to train on."})
    qa: Path = field(default=SAMPLE_QA, metadata={"help": "Hand-written questions (reported, never used to pick)."})
    generator: str = field(default="ict", metadata={"help": "Query generator for the pairs.", "choices": ["ict", "llm"]})
    questions_per_chunk: list[int] = field(default_factory=lambda: [PrepareConfig.questions_per_chunk],
                                           metadata={"help": "Queries per chunk (repeatable: one pairs set each)."})
    roundtrip_top_k: list[int] = field(default_factory=lambda: [PrepareConfig.roundtrip_top_k],
                                       metadata={"help": "--generator llm: round-trip filter K (repeatable: one pairs set each)."})
    learning_rate: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4], metadata={"help": "Repeatable."})
    epochs: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0], metadata={"help": "Repeatable."})
    batch_size: list[int] = field(default_factory=lambda: [16, 32], metadata={"help": "Repeatable."})
    seed: list[int] = field(default_factory=lambda: [42], metadata={"help": "Training seeds (repeatable); scores are averaged."})
    work: Path | None = field(default=None, metadata={"help": "Working folder (default: a temp folder)."})


def main(cfg: SweepConfig, json_out=None) -> dict:
    from embeddings import evaluate, prepare
    from embeddings.data import load_pairs
    from scripts.bench_embeddings import finetune_in_process_of_its_own, qa_pairs_over_chunks
    from tunerag.models import MINILM, load_embedder

    work = Path(cfg.work or tempfile.mkdtemp(prefix="sweep_embeddings-"))
    t0 = time.perf_counter()
    base = load_embedder(MINILM)
    qa_all, qa_heldout = qa_pairs_over_chunks(cfg.qa, PrepareConfig(docs=[cfg.doc]))
    rows, baselines = [], {}
    base_qa = {"qa_all": evaluate.score(base, qa_all), "qa_heldout": evaluate.score(base, qa_heldout)}
    roundtrip = cfg.roundtrip_top_k if cfg.generator == "llm" else [0]
    for qpc, top_k in itertools.product(cfg.questions_per_chunk, roundtrip):
        data = f"q{qpc}" + (f"-rt{top_k}" if cfg.generator == "llm" else "")
        pairs = work / f"pairs-{cfg.generator}-{data}"
        prepare.main(PrepareConfig(docs=[cfg.doc], out=pairs, generator=cfg.generator, questions_per_chunk=qpc,
                                   roundtrip_top_k=top_k, cache=work / "question_cache.jsonl"))
        val = load_pairs(pairs / "val.json")
        baselines[data] = {"val": evaluate.score(base, val), **base_qa}
        for lr, epochs, batch in itertools.product(cfg.learning_rate, cfg.epochs, cfg.batch_size):
            scores = {"val": [], "qa_all": [], "qa_heldout": []}
            seconds, best = [], []
            for seed in cfg.seed:
                out = work / "model"
                shutil.rmtree(out, ignore_errors=True)
                metrics = finetune_in_process_of_its_own(FinetuneConfig(
                    train=pairs / "train.json", val=pairs / "val.json", out=out, learning_rate=lr, epochs=epochs,
                    batch_size=batch, seed=seed))
                tuned = load_embedder(str(out))
                for name, scored in (("val", val), ("qa_all", qa_all), ("qa_heldout", qa_heldout)):
                    scores[name].append(evaluate.score(tuned, scored)["ndcg@10"])
                seconds.append(metrics["train_seconds"])
                best.append(metrics["best_checkpoint"])
            row = {"data": data, "questions_per_chunk": qpc, "roundtrip_top_k": top_k, "learning_rate": lr,
                   "epochs": epochs, "batch_size": batch, "train_pairs": metrics["data"]["train_pairs"],
                   "best_checkpoints": best,
                   "train_seconds": round(statistics.mean(seconds), 1),
                   **{f"{k}_ndcg@10": round(statistics.mean(v), 4) for k, v in scores.items()},
                   **{f"{k}_ndcg@10_by_seed": v for k, v in scores.items()}}
            row["val_gain"] = round(row["val_ndcg@10"] - baselines[data]["val"]["ndcg@10"], 4)
            logger.info("%s", json.dumps(row))
            rows.append(row)
    rows.sort(key=lambda r: -r["val_gain"])  # val sets differ between data settings; the gain over base compares
    out = {"bench": "sweep_embeddings", "config": json.loads(json.dumps(asdict(cfg), default=str)),
           "base_ndcg@10": {d: {k: round(v["ndcg@10"], 4) for k, v in b.items()} for d, b in baselines.items()},
           "selected_by_val": rows[0], "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out), file=json_out or sys.stdout)
    lines = [f"{'data':>8} {'lr':>7} {'epochs':>6} {'batch':>5} {'val':>6} {'gain':>6} {'qa_all':>6} {'qa_held':>7} "
             f"{'train s':>7}"]
    for data, b in out["base_ndcg@10"].items():
        lines.append(f"{data:>8} {'base':>7} {'':>6} {'':>5} {b['val']:>6.3f} {'':>6} {b['qa_all']:>6.3f} "
                     f"{b['qa_heldout']:>7.3f}")
    for r in rows:
        lines.append(f"{r['data']:>8} {r['learning_rate']:>7.0e} {r['epochs']:>6g} {r['batch_size']:>5} "
                     f"{r['val_ndcg@10']:>6.3f} {r['val_gain']:>+6.3f} {r['qa_all_ndcg@10']:>6.3f} "
                     f"{r['qa_heldout_ndcg@10']:>7.3f} {r['train_seconds']:>7.0f}")
    lines.append("NDCG@10, mean over seeds; ranked by the gain on val over base (val is the only set used to choose).")
    print("\n".join(lines), file=sys.stderr)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # the evaluator logs every score
    main(parse_config(SweepConfig, prog="python scripts/sweep_embeddings.py"))
