"""Fine-tune a sentence-transformers embedder on (query, passage) pairs and keep the best checkpoint.

    python -m embeddings.finetune --train pairs/train.json --val pairs/val.json --model minilm --out models/emb-tuned

The steps of sentence-transformers' own training scripts, nothing custom: MultipleNegativesRankingLoss
(every other passage in the batch is a negative; optionally cached for big batches, wrapped in
MatryoshkaLoss, or fed hard negatives mined with the base model), the NO_DUPLICATES batch sampler,
an InformationRetrievalEvaluator on val before training, during it (picking the best checkpoint by
NDCG@10) and after it; the val pairs are also the trainer's eval_dataset, so eval_loss is logged too. The folder in --out is a normal SentenceTransformer folder; its README.md
(the model card) and metrics.json record the base model, the data, the settings and before/after metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from embeddings.config import FinetuneConfig
from embeddings.data import Pairs, load_pairs
from tunerag.common import TuneragError, replace_folder, run_cli, temp_folder, write_json_atomic

logger = logging.getLogger(__name__)

EVAL_NAME = "val"
MAIN_METRIC = f"{EVAL_NAME}_cosine_ndcg@10"  # the evaluator's key; the trainer logs it as eval_<key>
# A fine-tune counts as better than the base on a question set when its mean per-query NDCG@10 gain is
# above this many standard errors of the paired differences (about 84% one-sided confidence).
NOISE_SE = 1.0


def ir_evaluator(pairs: Pairs, name: str = EVAL_NAME, batch_size: int = 32, show_progress_bar: bool = False):
    """sentence-transformers' InformationRetrievalEvaluator on a pairs file, cosine similarity only."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    queries, corpus, relevant_docs = pairs.ir_dicts()
    return InformationRetrievalEvaluator(
        queries, corpus, relevant_docs, name=name, score_functions={"cosine": cos_sim}, main_score_function="cosine",
        batch_size=batch_size, show_progress_bar=show_progress_bar, write_csv=False)


def ndcg_at_k(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, cid in enumerate(ranked[:k]) if cid in relevant)
    return dcg / sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))


def per_query_ndcg(model, pairs: Pairs, k: int = 10) -> dict[str, float]:
    """NDCG@k of every query of `pairs` (cosine over the pairs' own corpus), by query id: the paired
    scores that the base-vs-tuned check compares."""
    from sentence_transformers.util import semantic_search

    queries, corpus, relevant = pairs.ir_dicts()
    cids, qids = list(corpus), list(queries)
    encode = dict(convert_to_tensor=True, normalize_embeddings=True, batch_size=32, show_progress_bar=False)
    hits = semantic_search(model.encode([queries[q] for q in qids], **encode),
                           model.encode([corpus[c] for c in cids], **encode), top_k=k)
    return {q: ndcg_at_k([cids[h["corpus_id"]] for h in top], relevant[q], k) for q, top in zip(qids, hits)}


def compare(base: dict[str, float], tuned: dict[str, float]) -> dict:
    """Mean NDCG@10 of both, the mean paired gain, its standard error, and whether it is beyond noise."""
    diffs = [tuned[q] - base[q] for q in base]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    gain = statistics.fmean(diffs)
    return {"queries": len(diffs), "base": round(statistics.fmean(base.values()), 4),
            "tuned": round(statistics.fmean(tuned.values()), 4), "gain": round(gain, 4), "se": round(se, 4),
            "beats_base": gain > NOISE_SE * se}


def file_summary(path: Path, pairs: Pairs) -> dict:
    return {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16],
            "queries": len(pairs.queries), "passages": len(pairs.corpus)}


def card_section(cfg: FinetuneConfig, data: dict, before: dict, after: dict, train_seconds: float, checks: dict,
                 improved: bool) -> str:
    keys = [k for k in before if k.startswith(f"{EVAL_NAME}_cosine_") and "precision" not in k and "recall" not in k]
    rows = "\n".join(f"| {k.removeprefix(f'{EVAL_NAME}_cosine_')} | {before[k]:.4f} | {after[k]:.4f} |" for k in keys)
    settings = {k: v for k, v in json.loads(json.dumps(asdict(cfg), default=str)).items() if k not in ("train", "val", "out")}
    return (
        "\n\n## tunerag fine-tuning record\n\n"
        f"- Base model: `{cfg.model}`\n"
        f"- Train data: `{data['train']['path']}` ({data['train']['queries']} queries, {data['train']['passages']} passages, "
        f"sha256 {data['train']['sha256']}); {data['train_pairs']} training pairs\n"
        f"- Validation data: `{data['val']['path']}` ({data['val']['queries']} queries, {data['val']['passages']} passages, "
        f"sha256 {data['val']['sha256']})\n"
        f"- Settings: `{json.dumps(settings)}`\n"
        f"- Training time: {train_seconds:.0f} s\n\n"
        "Retrieval on the validation set (cosine; sentence-transformers InformationRetrievalEvaluator):\n\n"
        f"| metric | base | tuned |\n|---|---|---|\n{rows}\n\n"
        "Base vs the best checkpoint, per-query NDCG@10 (val chose the checkpoint; heldout is text trained on by "
        "neither):\n\n| set | queries | base | checkpoint | gain | noise (1 s.e.) |\n|---|---|---|---|---|---|\n"
        + "".join(f"| {name} | {c['queries']} | {c['base']:.4f} | {c['tuned']:.4f} | {c['gain']:+.4f} | {c['se']:.4f} |\n"
                  for name, c in checks.items())
        + ("\nThe checkpoint beat the base on every set: these are its weights.\n" if improved else
           "\nThe checkpoint did not beat the base beyond noise: **these are the base model's weights, unchanged.**\n")
    )


def main(cfg: FinetuneConfig) -> dict:
    from transformers import set_seed

    set_seed(cfg.seed)
    config = json.loads(json.dumps(asdict(cfg), default=str))
    logger.info("finetune: %s", config)
    train, val = load_pairs(cfg.train), load_pairs(cfg.val)
    heldout = load_pairs(cfg.heldout) if cfg.heldout is not None else None
    if cfg.out.exists() and not cfg.out.is_dir():
        raise TuneragError(f"--out {str(cfg.out)!r} is a file; pass a new folder")
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise TuneragError(f"--out {str(cfg.out)!r} exists and is not empty; pick a new folder or remove it")
    # Checkpoints live in a temp folder beside --out (made now, so an unwritable --out fails before any work)
    try:
        work = temp_folder(cfg.out)  # also removes what killed runs left beside --out (checkpoints included)
    except OSError as e:
        raise TuneragError(f"cannot write --out {str(cfg.out)!r}: {e.strerror or e}") from None
    try:
        return train_and_save(cfg, config, train, val, heldout, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_and_save(cfg: FinetuneConfig, config: dict, train: Pairs, val: Pairs, heldout: Pairs | None, work: Path) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from tunerag.models import load_embedder

    # 1. The base model
    model = load_embedder(cfg.model)

    # 2. Training pairs: (anchor, positive), plus mined hard negatives if asked
    anchors, positives = train.anchor_positive()
    if len(anchors) < 2:
        raise TuneragError(f"{str(cfg.train)!r} has {len(anchors)} training pair(s); in-batch negatives need at least 2")
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
    if cfg.hard_negatives:
        from sentence_transformers.util import mine_hard_negatives

        # relative_margin: skip "negatives" nearly as close as the positive; they are often true answers too.
        dataset = mine_hard_negatives(
            dataset, model, corpus=list(train.corpus.values()), num_negatives=cfg.hard_negatives,
            relative_margin=0.05, sampling_strategy="top", output_format="n-tuple", batch_size=64, verbose=False)
        logger.info("mined hard negatives: %d of %d pairs kept a negative", len(dataset), len(anchors))
        if len(dataset) < 2:
            raise TuneragError(f"hard-negative mining kept {len(dataset)} of {len(anchors)} pairs (no passage was far "
                               "enough below the positive); lower --hard-negatives or pass 0")

    # 3. The loss: in-batch negatives
    if cfg.cached_loss:
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=cfg.mini_batch_size)
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    if cfg.matryoshka_dims:
        dim = model.get_embedding_dimension()
        if max(cfg.matryoshka_dims) > dim:
            raise TuneragError(f"--matryoshka-dims {cfg.matryoshka_dims} exceed the model's {dim} dimensions")
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=sorted(set(cfg.matryoshka_dims), reverse=True))

    # 4. The evaluator, and the baseline it gives the base model
    evaluator = ir_evaluator(val)
    before = evaluator(model)
    logger.info("base model on val: NDCG@10 %.4f, accuracy@1 %.4f", before[MAIN_METRIC], before[f"{EVAL_NAME}_cosine_accuracy@1"])
    checked = {"val": val, **({"heldout": heldout} if heldout is not None else {})}
    base_scores = {name: per_query_ndcg(model, pairs) for name, pairs in checked.items()}

    # The val pairs as eval_dataset: the trainer logs eval_loss (same loss) beside the evaluator's metrics
    val_anchors, val_positives = val.anchor_positive()
    eval_dataset = Dataset.from_dict({"anchor": val_anchors, "positive": val_positives})

    # 5. Training arguments; checkpoints go to `work` (removed by main)
    strategy = "steps" if cfg.eval_steps else "epoch"
    # bfloat16 autocast: 1.28x a step on the 2-core AMX CPU, losses within 0.007 (scripts/bench_speed.py --parts finetune)
    import torch

    from tunerag.models import pick_dtype

    autocast_bf16 = pick_dtype(cfg.dtype) == "bfloat16"
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "checkpoints"),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # two queries of one chunk in a batch would be false negatives
        eval_strategy=strategy, eval_steps=cfg.eval_steps or None,
        save_strategy=strategy, save_steps=cfg.eval_steps or None, save_total_limit=1, save_only_model=True,
        load_best_model_at_end=True, metric_for_best_model=f"eval_{MAIN_METRIC}", greater_is_better=True,
        logging_steps=2, report_to="none", seed=cfg.seed, data_seed=cfg.seed,  # CPU runs are tens of steps long
        disable_tqdm=False, bf16=autocast_bf16,
        use_cpu=autocast_bf16 and not torch.cuda.is_available(),  # transformers asks for it to autocast on a CPU
    )

    # 6. Train; the best checkpoint is still chosen by val NDCG@10 (metric_for_best_model), not by eval_loss
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                                         loss=loss, evaluator=evaluator)
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started

    # 7. Evaluate the best checkpoint (load_best_model_at_end put it back into `model`) against the base,
    # on val (which chose it) and on the held-out text (which did not)
    after = evaluator(model)
    logger.info("tuned model on val: NDCG@10 %.4f (base %.4f)", after[MAIN_METRIC], before[MAIN_METRIC])
    checks = {name: compare(base_scores[name], per_query_ndcg(model, pairs)) for name, pairs in checked.items()}
    improved = all(c["beats_base"] for c in checks.values())
    verdict = "; ".join(f"{name} NDCG@10 {c['base']:.4f} -> {c['tuned']:.4f} (gain {c['gain']:+.4f}, noise {c['se']:.4f}, "
                        f"{c['queries']} queries)" for name, c in checks.items())
    if heldout is None:
        logger.warning("no heldout.json: the tuned model is checked on val only, which also chose the checkpoint")

    # 8. Save: a complete folder renamed into place, so a crash never leaves a half-written model
    data = {"train": file_summary(cfg.train, train), "val": file_summary(cfg.val, val), "train_pairs": len(dataset)}
    metrics = {
        "base_model": cfg.model, "data": data, "config": config,
        "before": before, "after": after, "main_metric": MAIN_METRIC,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name or None,
        "steps": trainer.state.global_step, "train_seconds": round(train_seconds, 2),
        "train_runtime": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "pairs_per_second": round(len(dataset) * cfg.epochs / train_seconds, 2),
        "checks": checks, "kept": "tuned" if improved else "base",
        "log_history": trainer.state.log_history,  # training loss, eval_loss and val metrics per step, for plots
    }
    if not improved:
        if cfg.require_gain:
            scores = cfg.out.with_name(f"{cfg.out.name}.scores.json")
            write_json_atomic(scores, {k: v for k, v in metrics.items() if k != "log_history"})
            raise TuneragError(f"the fine-tune does not beat the base beyond noise ({verdict}); no model written "
                               f"(--require-gain), scores in {str(scores)!r}")
        logger.warning("the fine-tune does not beat the base beyond noise (%s): --out gets the base model, "
                       "unchanged", verdict)
        model = load_embedder(cfg.model)  # never worse than the base, by construction
        after = before
    model.model_card_data.model_name = (f"{Path(cfg.model).name} fine-tuned with tunerag on {cfg.train.name}" if improved
                                        else f"{Path(cfg.model).name} (the base: tunerag's fine-tune did not beat it)")
    staged = work / "model"
    try:
        model.save(str(staged))
        with (staged / "README.md").open("a", encoding="utf-8") as f:
            f.write(card_section(cfg, data, before, after, train_seconds, checks, improved))
        write_json_atomic(staged / "metrics.json", metrics)
        write_json_atomic(staged / "run_config.json", config)
        replace_folder(staged, cfg.out)  # an empty --out (checked above) is swapped out, never left half-full
    except OSError as e:
        raise TuneragError(f"cannot write the model to --out {str(cfg.out)!r}: {e.strerror or e}") from None
    logger.info("saved %s (%s): %s; trained in %.0f s (%.1f pairs/s)", cfg.out,
                "the tuned model" if improved else "the base model", verdict, train_seconds, metrics["pairs_per_second"])
    return metrics


if __name__ == "__main__":
    run_cli(main, FinetuneConfig)
