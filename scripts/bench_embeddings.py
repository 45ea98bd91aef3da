"""Benchmark of the embeddings loop on the shipped sample document: prepare -> finetune -> evaluate.

    python scripts/bench_embeddings.py > bench_embeddings.json            # both generators, ~30 min on 2 cores
    python scripts/bench_embeddings.py --generator ict --no-bare          # the fast loop only

For each generator (ict, llm): pairs from data/finance_report.txt split by position (the last 20% of
the text is val), fine-tune with the FinetuneConfig defaults, then base vs tuned on
  - val: the held-out synthetic queries over the held-out chunks, and
  - qa_all: the 66 hand-written questions of data/finance_qa.json over every chunk of the document
    (prepare's own chunks, train and val); it includes questions on training passages, and
  - qa_heldout: only the questions whose relevant chunks all lie in the validation part of the text.
    A chunk is relevant when rag.metrics.chunk_answers says it answers the question (the rule
    scripts/bench_rag.py uses).
Also: wall time per phase, training pairs/s, peak RSS, and (--bare) the same training run as a bare
SentenceTransformerTrainer script on the same data, for our throughput relative to it.
Prints one JSON object on stdout and a short table on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embeddings.config import FinetuneConfig, PrepareConfig  # noqa: E402
from embeddings.data import Pairs, load_pairs  # noqa: E402
from tunerag.common import parse_config  # noqa: E402
from tunerag.samples import SAMPLE_QA, SAMPLE_REPORT  # noqa: E402

logger = logging.getLogger("bench_embeddings")


@dataclass
class BenchConfig:
    """Benchmark prepare -> finetune -> evaluate on the sample finance document."""

    doc: Path = field(default=SAMPLE_REPORT, metadata={"help": "Document to train on."})
    qa: Path = field(default=SAMPLE_QA, metadata={"help": "Hand-written questions with their passages."})
    generator: list[str] = field(default_factory=lambda: ["ict", "llm"], metadata={"help": "Generators to run (repeatable)."})
    max_chunks: int = field(default=0, metadata={"help": "Limit chunks per side for the llm generator (0: all)."})
    bare: bool = field(default=True, metadata={"help": "Also time a bare SentenceTransformerTrainer on the ict data."})
    throughput_rounds: int = field(default=2, metadata={
        "help": "With --bare: rounds of (bare script, embeddings.finetune), each run in a fresh process, whose mean "
                "pairs/s give the throughput ratio."})
    epochs: float = field(default=FinetuneConfig.epochs, metadata={"help": "Training epochs."})
    batch_size: int = field(default=FinetuneConfig.batch_size, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=FinetuneConfig.learning_rate, metadata={"help": "Learning rate."})
    warmup_ratio: float = field(default=FinetuneConfig.warmup_ratio, metadata={"help": "Warmup ratio."})
    work: Path | None = field(default=None, metadata={"help": "Working folder (default: a temp folder)."})
    seed: int = field(default=42, metadata={"help": "Seed."})


def peak_rss_mib() -> float:
    """Peak resident memory of this process or of its largest child (finetune runs in a child)."""
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(kib / 1024, 1)


def qa_pairs_over_chunks(qa: Path | list[dict], prepare_cfg: PrepareConfig) -> tuple[Pairs, Pairs]:
    """(all questions, held-out questions) against every chunk of the documents, chunked and split
    exactly as prepare chunks and splits them; a held-out question has all its relevant chunks in val.
    `qa`: a question file or its items."""
    from embeddings.prepare import document_chunks
    from rag.metrics import chunk_answers

    train_chunks, val_chunks, _, _ = document_chunks(prepare_cfg)
    corpus = {c.id: c.text for c in train_chunks + val_chunks}
    val_ids = {c.id for c in val_chunks}
    every, heldout = Pairs(corpus=corpus), Pairs(corpus=corpus)
    for item in json.loads(qa.read_text(encoding="utf-8")) if isinstance(qa, Path) else qa:
        relevant = [cid for cid, text in corpus.items() if chunk_answers(text, item["passage"], item["answer"])]
        if not relevant:
            logger.warning("qa item %s: no chunk answers it; left out", item["id"])
            continue
        for pairs in (every, heldout) if set(relevant) <= val_ids else (every,):
            pairs.queries[item["id"]] = item["question"]
            pairs.relevant_docs[item["id"]] = relevant
    return every, heldout


def finetune_in_process_of_its_own(cfg: FinetuneConfig) -> dict:
    """`python -m embeddings.finetune` as a user runs it, in a fresh process; its metrics.json.
    (A second training run inside one process runs slower here, which would skew comparisons.)"""
    cmd = [sys.executable, "-m", "embeddings.finetune", "--train", str(cfg.train), "--val", str(cfg.val),
           "--out", str(cfg.out), "--model", cfg.model, "--learning-rate", str(cfg.learning_rate),
           "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed),
           "--hard-negatives", str(cfg.hard_negatives), "--dtype", cfg.dtype]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((cfg.out / "metrics.json").read_text())


def bare_trainer(train_json: Path, val_json: Path, out: Path, cfg: BenchConfig) -> dict:
    """The same training as embeddings.finetune, written as a plain sentence-transformers script."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from sentence_transformers.util import cos_sim
    from transformers import set_seed

    from tunerag.models import minilm_folder

    set_seed(cfg.seed)
    train, val = json.loads(train_json.read_text()), json.loads(val_json.read_text())
    anchors = [train["queries"][q] for q, cs in train["relevant_docs"].items() for _ in cs]
    positives = [train["corpus"][c] for q, cs in train["relevant_docs"].items() for c in cs]
    model = SentenceTransformer(str(minilm_folder()))
    evaluator = InformationRetrievalEvaluator(
        val["queries"], val["corpus"], {q: set(c) for q, c in val["relevant_docs"].items()}, name="val",
        score_functions={"cosine": cos_sim}, main_score_function="cosine", write_csv=False)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio,
        batch_sampler=BatchSamplers.NO_DUPLICATES, eval_strategy="epoch", save_strategy="epoch", save_total_limit=1,
        save_only_model=True, load_best_model_at_end=True, metric_for_best_model="eval_val_cosine_ndcg@10",
        logging_steps=10, report_to="none", seed=cfg.seed, data_seed=cfg.seed)
    trainer = SentenceTransformerTrainer(model=model, args=args, loss=MultipleNegativesRankingLoss(model),
                                         train_dataset=Dataset.from_dict({"anchor": anchors, "positive": positives}),
                                         evaluator=evaluator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"train_seconds": round(seconds, 2), "pairs_per_second": round(len(anchors) * cfg.epochs / seconds, 2),
            "val_ndcg@10": round(evaluator(model)["val_cosine_ndcg@10"], 4)}


def main(cfg: BenchConfig, json_out=None) -> dict:
    import torch
    from transformers import set_seed

    from embeddings import evaluate, prepare
    from scripts.bench_llm_finetune import in_fresh_process
    from tunerag.models import MINILM, load_embedder

    set_seed(cfg.seed)
    work = Path(cfg.work or tempfile.mkdtemp(prefix="bench_embeddings-"))
    t0 = time.perf_counter()
    results: dict = {}
    base = load_embedder(MINILM)
    qa_all, qa_heldout = qa_pairs_over_chunks(cfg.qa, PrepareConfig(docs=[cfg.doc], seed=cfg.seed))
    base_qa = {"qa_all": evaluate.score(base, qa_all), "qa_heldout": evaluate.score(base, qa_heldout)}
    for gen in cfg.generator:
        r: dict = {}
        started = time.perf_counter()
        stats = prepare.main(PrepareConfig(docs=[cfg.doc], out=work / f"pairs-{gen}", generator=gen, seed=cfg.seed,
                                           max_chunks=cfg.max_chunks if gen == "llm" else 0,
                                           cache=work / "question_cache.jsonl"))
        r["prepare_seconds"] = round(time.perf_counter() - started, 1)
        r["pairs"] = {k: stats[k] for k in ("chunks_train", "chunks_val", "train_queries", "val_queries", "chunks_without_query")}
        if "llm" in stats:
            r["pairs"]["llm"] = stats["llm"]
        started = time.perf_counter()
        finetune_cfg = FinetuneConfig(
            train=work / f"pairs-{gen}" / "train.json", val=work / f"pairs-{gen}" / "val.json", out=work / f"model-{gen}",
            epochs=cfg.epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
            warmup_ratio=cfg.warmup_ratio, seed=cfg.seed)
        metrics = finetune_in_process_of_its_own(finetune_cfg)
        r["finetune_seconds"] = round(time.perf_counter() - started, 1)
        r["train_pairs_per_second"] = metrics["pairs_per_second"]
        r["steps"] = metrics["steps"]
        started = time.perf_counter()
        val = load_pairs(work / f"pairs-{gen}" / "val.json")
        tuned = load_embedder(str(work / f"model-{gen}"))
        r["val"] = {"base": evaluate.score(base, val), "tuned": evaluate.score(tuned, val)}
        for name, qa in (("qa_all", qa_all), ("qa_heldout", qa_heldout)):
            r[name] = {"base": base_qa[name], "tuned": evaluate.score(tuned, qa)}
        r["evaluate_seconds"] = round(time.perf_counter() - started, 1)
        r["loop_seconds"] = round(r["prepare_seconds"] + r["finetune_seconds"] + r["evaluate_seconds"], 1)
        r["peak_rss_mib"] = peak_rss_mib()
        results[gen] = r
        if gen == "ict" and cfg.bare:
            ours, bare = [], []
            for _ in range(cfg.throughput_rounds):  # alternated, so drift in machine load hits both alike
                shutil.rmtree(work / "bare", ignore_errors=True)
                bare.append(in_fresh_process(bare_trainer, finetune_cfg.train, finetune_cfg.val, work / "bare", cfg))
                shutil.rmtree(work / "again", ignore_errors=True)
                ours.append(finetune_in_process_of_its_own(replace(finetune_cfg, out=work / "again"))["pairs_per_second"])
            r["bare_trainer"] = {"pairs_per_second": [b["pairs_per_second"] for b in bare],
                                 "val_ndcg@10": bare[0]["val_ndcg@10"], "ours_pairs_per_second": ours}
            r["throughput_vs_bare"] = round(statistics.mean(ours) / statistics.mean(r["bare_trainer"]["pairs_per_second"]), 3)
        logger.info("%s done: %s", gen, json.dumps(r, default=str))  # kept even if a later generator is interrupted
    out = {"bench": "embeddings", "config": json.loads(json.dumps(asdict(cfg), default=str)), "device": str(base.device),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "qa_sets": {"qa_all": f"{len(qa_all.queries)} hand-written questions over all {len(qa_all.corpus)} chunks; "
                                 "includes questions on training passages",
                       "qa_heldout": f"{len(qa_heldout.queries)} of them whose passage lies in the validation part "
                                     "of the text, over the same chunks"},
           "qa_questions": len(qa_all.queries), "qa_heldout_questions": len(qa_heldout.queries),
           "qa_passages": len(qa_all.corpus), "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, default=str), file=json_out or sys.stdout)
    lines = [f"{'generator':<9} {'set':<10} {'NDCG@10 base->tuned':>20} {'acc@1 base->tuned':>18} {'loop s':>7} {'pairs/s':>8}"]
    for gen, r in results.items():
        for split in ("val", "qa_all", "qa_heldout"):
            b, t = r[split]["base"], r[split]["tuned"]
            lines.append(f"{gen:<9} {split:<10} {b['ndcg@10']:>9.3f} -> {t['ndcg@10']:.3f} {b['accuracy@1']:>8.3f} -> "
                         f"{t['accuracy@1']:.3f} {r['loop_seconds']:>7.0f} {r['train_pairs_per_second']:>8.1f}")
        if "throughput_vs_bare" in r:
            lines.append(f"  pairs/s in fresh processes, alternated: bare SentenceTransformerTrainer "
                         f"{r['bare_trainer']['pairs_per_second']}, embeddings.finetune "
                         f"{r['bare_trainer']['ours_pairs_per_second']}; ours/bare = {r['throughput_vs_bare']}")
    lines.append(f"qa_all: {out['qa_sets']['qa_all']}; qa_heldout: {out['qa_sets']['qa_heldout']}")
    print("\n".join(lines), file=sys.stderr)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import contextlib

    cfg = parse_config(BenchConfig, prog="python scripts/bench_embeddings.py")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs; stdout carries one JSON object
        result = main(cfg, json_out=real_stdout)
