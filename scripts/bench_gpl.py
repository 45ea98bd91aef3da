"""Is GPL worth it here? Pseudo-labels from a cross-encoder trained from MiniLM, against today's default.

    python scripts/bench_gpl.py --corpus long --corpus policy --corpus sample --work W

GPL (Wang et al. 2022) trains the bi-encoder on (query, positive, negative) triples labelled by a
cross-encoder's margin CE(q, pos) - CE(q, neg) (MarginMSELoss), so a "negative" that in fact answers the
query costs nothing. No cross-encoder weights ship on the package registries, so this one is trained
here, from the embedded MiniLM's encoder with a fresh one-logit head, on the same synthetic questions
(BinaryCrossEntropyLoss: the question's own passage 1, the base embedder's hardest other passages 0).

Per --corpus: `embeddings.prepare` with its defaults (the same pairs and question cache as
scripts/sweep_embeddings.py's default row); then, scored on heldout.json (synthetic questions about text
neither side trained on) and on the corpus's hand-written held-out questions over all its chunks, gain
over the base MiniLM:
  - `default`: `python -m embeddings.finetune` with its defaults, in a process of its own (MNRL); the
    checkpoint's gain, as finetune's never-worse check sees it;
  - `cross-encoder`: the base embedder's top RERANK_DEPTH passages re-ordered by the cross-encoder
    (whether it learned to rank at all);
  - `gpl`: the base embedder trained with MarginMSELoss on the cross-encoder's margins.
One JSON object on stdout, a table on stderr. Resumable per corpus with the same --work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
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

logger = logging.getLogger("bench_gpl")
RERANK_DEPTH = 20  # passages of the base embedder's ranking the cross-encoder re-orders
MINED_FROM = 10  # negatives are drawn from the base embedder's top passages other than the positive


@dataclass
class GplConfig:
    """GPL pseudo-labels from a cross-encoder trained here, against embeddings.finetune's defaults."""

    corpus: list[str] = field(default_factory=lambda: ["long", "policy", "sample"], metadata={
        "help": "Shipped corpora (repeat).", "choices": ["sample", "long", "policy"]})
    negatives: int = field(default=3, metadata={"help": "Mined negatives per training question."})
    ce_epochs: float = field(default=2.0, metadata={"help": "Cross-encoder epochs."})
    ce_learning_rate: float = field(default=5e-5, metadata={"help": "Cross-encoder learning rate."})
    gpl_epochs: float = field(default=2.0, metadata={"help": "Bi-encoder (MarginMSE) epochs."})
    gpl_learning_rate: float = field(default=FinetuneConfig.learning_rate, metadata={
        "help": "Bi-encoder learning rate."})
    batch_size: int = field(default=32, metadata={"help": "Both trainings' batch size."})
    seed: int = field(default=42, metadata={"help": "Seed."})
    work: Path | None = field(default=None, metadata={"help": "Working folder (default: a temp folder)."})


def mined_triples(model, pairs, negatives: int, seed: int) -> list[tuple[str, str, str]]:
    """(query, its passage, another passage) for each training query: the other passages drawn from the
    base embedder's MINED_FROM nearest, as GPL mines them."""
    import torch

    ids = list(pairs.corpus)
    passages = model.encode([pairs.corpus[i] for i in ids], convert_to_tensor=True, normalize_embeddings=True)
    qids = list(pairs.queries)
    queries = model.encode([pairs.queries[q] for q in qids], convert_to_tensor=True, normalize_embeddings=True)
    order = torch.topk(queries @ passages.T, k=min(len(ids), MINED_FROM + 1)).indices.tolist()
    rng = random.Random(seed)
    triples = []
    for qid, ranked in zip(qids, order):
        own = set(pairs.relevant_docs[qid])
        others = [ids[j] for j in ranked if ids[j] not in own][:MINED_FROM]
        for neg in rng.sample(others, min(negatives, len(others))):
            triples.append((pairs.queries[qid], pairs.corpus[pairs.relevant_docs[qid][0]], pairs.corpus[neg]))
    return triples


def train_cross_encoder(base_folder: str, triples, cfg: GplConfig, out: Path):
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model = CrossEncoder(base_folder, num_labels=1, max_length=320)
    rows = {(q, p, 1.0) for q, p, _ in triples} | {(q, n, 0.0) for q, _, n in triples}
    rows = sorted(rows)
    random.Random(cfg.seed).shuffle(rows)
    data = Dataset.from_dict({"query": [r[0] for r in rows], "passage": [r[1] for r in rows],
                              "label": [r[2] for r in rows]})
    args = CrossEncoderTrainingArguments(output_dir=str(out), num_train_epochs=cfg.ce_epochs,
                                         per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.ce_learning_rate,
                                         warmup_ratio=0.1, seed=cfg.seed, save_strategy="no", report_to="none",
                                         logging_steps=50, disable_tqdm=True)
    CrossEncoderTrainer(model=model, args=args, train_dataset=data, loss=BinaryCrossEntropyLoss(model)).train()
    return model


def rerank_ndcg(base, cross_encoder, pairs) -> float:
    """NDCG@10 of the base embedder's top RERANK_DEPTH re-ordered by the cross-encoder."""
    import torch

    from embeddings.finetune import ndcg_at_k

    ids = list(pairs.corpus)
    passages = base.encode([pairs.corpus[i] for i in ids], convert_to_tensor=True, normalize_embeddings=True)
    scores = []
    for qid, text in pairs.queries.items():
        query = base.encode([text], convert_to_tensor=True, normalize_embeddings=True)
        top = [ids[j] for j in torch.topk((query @ passages.T)[0], k=min(len(ids), RERANK_DEPTH)).indices.tolist()]
        logits = cross_encoder.predict([(text, pairs.corpus[i]) for i in top], show_progress_bar=False)
        reranked = [i for _, i in sorted(zip(logits, top), key=lambda pair: -pair[0])]
        scores.append(ndcg_at_k(reranked, set(pairs.relevant_docs[qid])))
    return statistics.mean(scores)


def train_gpl(base_folder: str, triples, cross_encoder, cfg: GplConfig, out: Path):
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.losses import MarginMSELoss

    pos = cross_encoder.predict([(q, p) for q, p, _ in triples], show_progress_bar=False)
    neg = cross_encoder.predict([(q, n) for q, _, n in triples], show_progress_bar=False)
    data = Dataset.from_dict({"query": [t[0] for t in triples], "positive": [t[1] for t in triples],
                              "negative": [t[2] for t in triples], "label": [float(a - b) for a, b in zip(pos, neg)]})
    model = SentenceTransformer(base_folder)
    args = SentenceTransformerTrainingArguments(output_dir=str(out), num_train_epochs=cfg.gpl_epochs,
                                                per_device_train_batch_size=cfg.batch_size,
                                                learning_rate=cfg.gpl_learning_rate, warmup_ratio=0.1, seed=cfg.seed,
                                                save_strategy="no", report_to="none", logging_steps=50,
                                                disable_tqdm=True)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=MarginMSELoss(model)).train()
    return model


def run_corpus(cfg: GplConfig, corpus: str, work: Path) -> dict:
    from embeddings import evaluate, prepare
    from embeddings.data import load_pairs
    from scripts.bench_embeddings import finetune_in_process_of_its_own, qa_pairs_over_chunks
    from tunerag.models import MINILM, load_embedder, resolve_embedder
    from tunerag.samples import corpus_files, corpus_questions

    docs = corpus_files(corpus)
    pairs_dir = work / corpus / "pairs"
    t = time.perf_counter()
    prepare.main(PrepareConfig(docs=docs, out=pairs_dir, cache=work / f"question_cache-{corpus}.jsonl"))
    prepare_s = time.perf_counter() - t
    train, heldout = load_pairs(pairs_dir / "train.json"), load_pairs(pairs_dir / "heldout.json")
    handwritten, _ = qa_pairs_over_chunks(corpus_questions(corpus, "heldout"), PrepareConfig(docs=docs))
    sets = {"heldout": heldout, "handwritten": handwritten}
    base = load_embedder(MINILM)
    base_scores = {name: evaluate.score(base, s)["ndcg@10"] for name, s in sets.items()}

    t = time.perf_counter()
    out = work / corpus / "default"
    metrics = finetune_in_process_of_its_own(FinetuneConfig(train=pairs_dir / "train.json", val=pairs_dir / "val.json",
                                                            out=out, seed=cfg.seed))
    default_s = time.perf_counter() - t
    # the checkpoint, kept or not: finetune's own heldout gain; hand-written scored on its saved model
    saved = evaluate.score(load_embedder(str(out)), handwritten)["ndcg@10"]
    default = {"heldout": metrics["checks"]["heldout"]["gain"], "kept": metrics["kept"],
               "handwritten": saved - base_scores["handwritten"]}

    t = time.perf_counter()
    triples = mined_triples(base, train, cfg.negatives, cfg.seed)
    cross_encoder = train_cross_encoder(str(resolve_embedder(MINILM)), triples, cfg, work / corpus / "ce")
    ce_s = time.perf_counter() - t
    reranked = {name: rerank_ndcg(base, cross_encoder, s) - base_scores[name] for name, s in sets.items()}
    t = time.perf_counter()
    gpl = train_gpl(str(resolve_embedder(MINILM)), triples, cross_encoder, cfg, work / corpus / "gpl")
    gpl_s = time.perf_counter() - t
    gpl_gain = {name: evaluate.score(gpl, s)["ndcg@10"] - base_scores[name] for name, s in sets.items()}
    return {"corpus": corpus, "train_questions": len(train.queries), "triples": len(triples),
            "heldout_queries": len(heldout.queries), "handwritten_queries": len(handwritten.queries),
            "base_ndcg@10": {k: round(v, 4) for k, v in base_scores.items()},
            "default_gain": {k: round(v, 4) if isinstance(v, float) else v for k, v in default.items()},
            "cross_encoder_rerank_gain": {k: round(v, 4) for k, v in reranked.items()},
            "gpl_gain": {k: round(v, 4) for k, v in gpl_gain.items()},
            "seconds": {"prepare": round(prepare_s, 1), "default": round(default_s, 1),
                        "cross_encoder": round(ce_s, 1), "gpl": round(gpl_s, 1)}}


def main(cfg: GplConfig) -> dict:
    work = Path(cfg.work or tempfile.mkdtemp(prefix="bench_gpl-"))
    rows = []
    for corpus in cfg.corpus:
        done = work / corpus / "row.json"  # a finished corpus is kept: the same --work goes on after a kill
        if not done.is_file():
            with contextlib.redirect_stdout(sys.stderr):  # the trainers print their logs; stdout is the JSON
                row = run_corpus(cfg, corpus, work)
            done.write_text(json.dumps(row))
        rows.append(json.loads(done.read_text()))
        logger.info("%s", done.read_text())
    out = {"bench": "gpl", "config": json.loads(json.dumps(asdict(cfg), default=str)), "rows": rows}
    print(json.dumps(out))
    lines = [f"{'corpus':8} {'set':12} {'base':>6} {'default':>8} {'CE rerank':>9} {'GPL':>7}"]
    for r in rows:
        for name in ("heldout", "handwritten"):
            lines.append(f"{r['corpus']:8} {name:12} {r['base_ndcg@10'][name]:6.3f} {r['default_gain'][name]:+8.3f} "
                         f"{r['cross_encoder_rerank_gain'][name]:+9.3f} {r['gpl_gain'][name]:+7.3f}")
    lines.append("NDCG@10 of the base, and each method's gain over it.")
    print("\n".join(lines), file=sys.stderr)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(parse_config(GplConfig, prog="python scripts/bench_gpl.py"))
