"""python scripts/bench_embeddings_qa_pairs.py [--corpus long --corpus policy --corpus sample]

Good question/passage pairs (issue: "gains comparable to the reference project's +0.096"): each corpus's
hand-written *tune*-half questions with their passages go through `embeddings.prepare --qa-file` and
`embeddings.finetune` (defaults; the fine-tune in its own process, as a user runs it); the saved model and the base
are scored by NDCG@10 on the corpus's hand-written *held-out* questions over all its prepare chunks. One
JSON object on stdout, a line per corpus on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tunerag.common import parse_config  # noqa: E402

logger = logging.getLogger("bench_embeddings_qa_pairs")


@dataclass
class QaPairsConfig:
    """Fine-tune MiniLM on hand-written tune-half Q/A pairs; score it on the held-out half."""

    corpus: list[str] = field(default_factory=lambda: ["long", "policy", "sample"], metadata={
        "help": "Shipped corpora (repeatable).", "choices": ["sample", "long", "policy"]})
    work: Path | None = field(default=None, metadata={"help": "Working folder (default: a temp folder)."})


def main(cfg: QaPairsConfig) -> dict:
    from embeddings import evaluate, prepare
    from embeddings.config import FinetuneConfig, PrepareConfig
    from scripts.bench_embeddings import finetune_in_process_of_its_own, qa_pairs_over_chunks
    from tunerag.models import MINILM, load_embedder
    from tunerag.samples import corpus_files, corpus_questions

    work = Path(cfg.work or tempfile.mkdtemp(prefix="bench_qa_pairs-"))
    work.mkdir(parents=True, exist_ok=True)
    base = load_embedder(MINILM)
    out = {}
    for corpus in cfg.corpus:
        qa = work / f"{corpus}-tune.json"
        qa.write_text(json.dumps([{"question": it["question"], "passage": it["passage"]}
                                  for it in corpus_questions(corpus, "tune")]), encoding="utf-8")
        pairs, model = work / f"{corpus}-pairs", work / f"{corpus}-model"
        prepare.main(PrepareConfig(qa_file=qa, question_column="question", answer_column="passage", out=pairs))
        metrics = finetune_in_process_of_its_own(FinetuneConfig(train=pairs / "train.json", val=pairs / "val.json", out=model))
        handwritten, _ = qa_pairs_over_chunks(corpus_questions(corpus, "heldout"), PrepareConfig(docs=corpus_files(corpus)))
        scores = {name: evaluate.score(m, handwritten)["ndcg@10"] for name, m in (("base", base), ("tuned", load_embedder(str(model))))}
        out[corpus] = {"train_pairs": metrics["data"]["train_pairs"], "kept": metrics["kept"], "checks": metrics["checks"],
                       "handwritten_heldout": len(handwritten.queries), "base_ndcg@10": round(scores["base"], 4),
                       "saved_ndcg@10": round(scores["tuned"], 4), "gain": round(scores["tuned"] - scores["base"], 4),
                       "train_seconds": metrics["train_seconds"]}
        logger.info("%s: %s", corpus, json.dumps(out[corpus]))
    print(json.dumps({"bench": "embeddings_qa_pairs", "results": out}))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    main(parse_config(QaPairsConfig, prog="python scripts/bench_embeddings_qa_pairs.py"))
