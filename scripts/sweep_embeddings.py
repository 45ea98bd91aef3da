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

    python scripts/sweep_embeddings.py --corpus sample --corpus long --corpus policy --generator ict \
        --generator llm --hard-negatives 0 --hard-negatives 1 --seed 42 --seed 43     # defaults that transfer

With --corpus (repeatable: the shipped corpora of tunerag.samples) every setting is trained on each corpus
(prepare on all its documents: split by document, heldout.json from the end of each training document)
and ranked by its gain in NDCG@10 on **heldout.json** - synthetic questions about text the model trained
on neither side of - averaged over the corpora (each corpus's gain the mean over seeds); the spread is
the lowest and highest single-seed gain. Those gains are the best checkpoint's against the base as
embeddings.finetune scores them for its never-worse check, kept or not (`kept` counts the runs whose
checkpoint was saved). The corpus's hand-written *held-out* questions, searched over all its chunks, are
scored on the model finetune saved (the base itself when the check kept the base) and never choose.
Each generator writes its own heldout.json (ICT's are sentences, llm's questions), so the ranking compares
settings within one generator, not one generator against the other.
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

from embeddings.config import QUERY_STYLES, FinetuneConfig, PrepareConfig  # noqa: E402
from tunerag.common import parse_config  # noqa: E402
from tunerag.samples import SAMPLE_QA, SAMPLE_REPORT  # noqa: E402

logger = logging.getLogger("sweep_embeddings")


# none, or every non-empty set of prepare's query styles in its flag's order, joined by "+"
QUERY_STYLE_SETS = ["none"] + ["+".join(c) for n in (1, 2, 3) for c in itertools.combinations(QUERY_STYLES, n)]


@dataclass
class SweepConfig:
    """Grid search of embeddings.finetune settings, picked by the gain in validation NDCG@10 over the base model."""

    doc: Path = field(default=SAMPLE_REPORT, metadata={"help": "Document to train on."})
    qa: Path = field(default=SAMPLE_QA, metadata={"help": "Hand-written questions (reported, never used to pick)."})
    corpus: list[str] = field(default_factory=list, metadata={
        "help": "Shipped corpora to sweep over (repeatable: sample, long, policy); replaces --doc and --qa.",
        "choices": ["sample", "long", "policy"]})
    generator: list[str] = field(default_factory=lambda: ["ict"], metadata={
        "help": "Query generator for the pairs (repeatable).", "choices": ["ict", "llm"]})
    questions_per_chunk: list[int] = field(default_factory=lambda: [PrepareConfig.questions_per_chunk],
                                           metadata={"help": "Queries per chunk (repeatable: one pairs set each)."})
    roundtrip_top_k: list[int] = field(default_factory=lambda: [PrepareConfig.roundtrip_top_k],
                                       metadata={"help": "--generator llm: round-trip filter K (repeatable: one pairs set each)."})
    drop_easy: list[str] = field(default_factory=lambda: ["off"], metadata={
        "help": "--generator llm: embeddings.prepare --drop-easy off or on (repeatable: one pairs set each).",
        "choices": ["off", "on"]})
    query_styles: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "--generator llm: embeddings.prepare --query-styles, as none or styles joined by '+' (keyword+dated) "
                "(repeatable: one pairs set each).", "choices": QUERY_STYLE_SETS})
    llm_dtype: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "help": "--corpus: embeddings.prepare --llm-dtype of the question writer (repeatable: one pairs set each; "
                "a value other than auto is named in the setting's data).", "choices": ["auto", "float32", "bfloat16"]})
    learning_rate: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4], metadata={"help": "Repeatable."})
    epochs: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0], metadata={"help": "Repeatable."})
    batch_size: list[int] = field(default_factory=lambda: [16, 32], metadata={"help": "Repeatable."})
    check_generator: str = field(default="same", metadata={
        "help": "--corpus: embeddings.prepare --check-generator (same or llm).", "choices": ["same", "llm"]})
    hard_negatives: list[int] = field(default_factory=lambda: [FinetuneConfig.hard_negatives], metadata={
        "help": "Mined hard negatives per pair (repeatable)."})
    seed: list[int] = field(default_factory=lambda: [42], metadata={"help": "Training seeds (repeatable); scores are averaged."})
    work: Path | None = field(default=None, metadata={"help": "Working folder (default: a temp folder)."})


def main(cfg: SweepConfig, json_out=None) -> dict:
    if cfg.corpus:
        return sweep_corpora(cfg, json_out)
    if len(cfg.generator) != 1:
        raise SystemExit("error: without --corpus, pass one --generator per run")
    if cfg.hard_negatives != [FinetuneConfig.hard_negatives]:
        raise SystemExit("error: --hard-negatives is swept with --corpus only")
    generator = cfg.generator[0]
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
    roundtrip = cfg.roundtrip_top_k if generator == "llm" else [0]
    for qpc, top_k in itertools.product(cfg.questions_per_chunk, roundtrip):
        data = f"q{qpc}" + (f"-rt{top_k}" if generator == "llm" else "")
        pairs = work / f"pairs-{generator}-{data}"
        prepare.main(PrepareConfig(docs=[cfg.doc], out=pairs, generator=generator, questions_per_chunk=qpc,
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


SETTING = ("generator", "data", "learning_rate", "epochs", "batch_size", "hard_negatives")  # what a row was trained with


def setting_key(row: dict) -> tuple:
    return tuple(row[k] for k in SETTING)


def sweep_corpora(cfg: SweepConfig, json_out=None) -> dict:
    """Every setting on every --corpus; ranked by the mean gain on heldout.json over the corpora."""
    from embeddings import evaluate, prepare
    from embeddings.data import load_pairs
    from scripts.bench_embeddings import finetune_in_process_of_its_own, qa_pairs_over_chunks
    from tunerag.models import MINILM, load_embedder
    from tunerag.samples import corpus_files, corpus_questions

    work = Path(cfg.work or tempfile.mkdtemp(prefix="sweep_embeddings-"))
    t0 = time.perf_counter()
    base = load_embedder(MINILM)
    rows, baselines = [], {}
    # each finished row is kept in --work, so a killed sweep started again with the same --work goes on
    rows_file = work / "rows.jsonl"
    done = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] if rows_file.is_file() else []
    for corpus in cfg.corpus:
        docs = corpus_files(corpus)
        handwritten, _ = qa_pairs_over_chunks(corpus_questions(corpus, "heldout"), PrepareConfig(docs=docs))
        for generator in cfg.generator:
            roundtrip = cfg.roundtrip_top_k if generator == "llm" else [0]
            dtypes = cfg.llm_dtype if generator == "llm" or cfg.check_generator == "llm" else ["auto"]
            easy = cfg.drop_easy if generator == "llm" else ["off"]
            styles = cfg.query_styles if generator == "llm" else ["none"]
            for qpc, top_k, llm_dtype, drop_easy, style in itertools.product(
                    cfg.questions_per_chunk, roundtrip, dtypes, easy, styles):
                data = f"q{qpc}" + (f"-rt{top_k}" if generator == "llm" else "")
                data += "-noeasy" if drop_easy == "on" else ""
                data += f"-{style}" if style != "none" else ""
                data += "-checkllm" if generator == "ict" and cfg.check_generator == "llm" else ""
                data += f"-{llm_dtype}" if llm_dtype != "auto" else ""
                pairs = work / corpus / f"pairs-{generator}-{data}"
                t = time.perf_counter()
                prepare.main(PrepareConfig(docs=docs, out=pairs, generator=generator, questions_per_chunk=qpc,
                                           roundtrip_top_k=top_k, check_generator=cfg.check_generator,
                                           llm_dtype=llm_dtype, drop_easy=drop_easy == "on",
                                           query_styles=[] if style == "none" else style.split("+"),
                                           cache=work / f"question_cache-{corpus}.jsonl"))
                prepare_seconds = round(time.perf_counter() - t, 1)
                sets = {"val": load_pairs(pairs / "val.json"), "heldout": load_pairs(pairs / "heldout.json"),
                        "handwritten": handwritten}
                base_scores = {name: evaluate.score(base, scored)["ndcg@10"] for name, scored in sets.items()}
                baselines[f"{corpus}/{generator}-{data}"] = {k: round(v, 4) for k, v in base_scores.items()}
                for lr, epochs, batch, negatives in itertools.product(cfg.learning_rate, cfg.epochs, cfg.batch_size,
                                                                      cfg.hard_negatives):
                    finished = [r for r in done if r["corpus"] == corpus and r["seeds"] == cfg.seed and setting_key(r) == (
                        generator, data, lr, epochs, batch, negatives)]
                    if finished:
                        rows.append(finished[0])
                        continue
                    gains = {name: [] for name in sets}  # val/heldout: the checkpoint; handwritten: the saved model
                    seconds, kept = [], []
                    for seed in cfg.seed:
                        out = work / "model"
                        shutil.rmtree(out, ignore_errors=True)
                        metrics = finetune_in_process_of_its_own(FinetuneConfig(
                            train=pairs / "train.json", val=pairs / "val.json", out=out, learning_rate=lr,
                            epochs=epochs, batch_size=batch, seed=seed, hard_negatives=negatives))
                        for name in ("val", "heldout"):  # the checkpoint against the base, scored by finetune itself
                            gains[name].append(metrics["checks"][name]["gain"])
                        saved = load_embedder(str(out))  # the checkpoint, or the base if the check did not keep it
                        gains["handwritten"].append(
                            round(evaluate.score(saved, handwritten)["ndcg@10"] - base_scores["handwritten"], 4))
                        seconds.append(metrics["train_seconds"])
                        kept.append(metrics["kept"])
                    row = {"corpus": corpus, "generator": generator, "data": data, "learning_rate": lr,
                           "epochs": epochs, "batch_size": batch, "hard_negatives": negatives, "seeds": cfg.seed,
                           "train_pairs": metrics["data"]["train_pairs"], "heldout_queries": len(sets["heldout"].queries),
                           "handwritten_queries": len(handwritten.queries), "kept": kept,
                           "prepare_seconds": prepare_seconds, "train_seconds": round(statistics.mean(seconds), 1),
                           **{f"{k}_gain": round(statistics.mean(v), 4) for k, v in gains.items()},
                           **{f"{k}_gain_by_seed": v for k, v in gains.items()}}
                    logger.info("%s", json.dumps(row))
                    rows.append(row)
                    with rows_file.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
    settings = {}
    for row in rows:
        settings.setdefault(setting_key(row), []).append(row)
    ranked = []
    for key, per_corpus in settings.items():
        ranked.append({**dict(zip(SETTING, key)),
                       "corpora": [r["corpus"] for r in per_corpus],
                       **{f"mean_{k}_gain": round(statistics.mean(r[f"{k}_gain"] for r in per_corpus), 4)
                          for k in ("heldout", "val", "handwritten")},
                       "lowest_heldout_gain": min(g for r in per_corpus for g in r["heldout_gain_by_seed"]),
                       "highest_heldout_gain": max(g for r in per_corpus for g in r["heldout_gain_by_seed"]),
                       "kept": sum(k == "tuned" for r in per_corpus for k in r["kept"]),
                       "runs": sum(len(r["kept"]) for r in per_corpus)})
    ranked.sort(key=lambda r: -r["mean_heldout_gain"])
    out = {"bench": "sweep_embeddings", "config": json.loads(json.dumps(asdict(cfg), default=str)),
           "base_ndcg@10": baselines, "selected_by_heldout": ranked[0], "ranked": ranked, "rows": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out), file=json_out or sys.stdout)
    lines = [f"{'generator':>9} {'lr':>7} {'epochs':>6} {'batch':>5} {'hn':>2} "
             + " ".join(f"{c[:7]:>15}" for c in cfg.corpus) + f" {'mean held':>9} {'spread':>15} {'mean hand':>9} {'kept':>5}"]
    for r in ranked:
        by_corpus = {row["corpus"]: row for row in settings[setting_key(r)]}
        cells = " ".join(f"{by_corpus[c]['heldout_gain']:>+7.3f}/{by_corpus[c]['handwritten_gain']:>+7.3f}" for c in cfg.corpus)
        lines.append(f"{r['generator'] + '-' + r['data']:>9} {r['learning_rate']:>7.0e} {r['epochs']:>6g} {r['batch_size']:>5} "
                     f"{r['hard_negatives']:>2} {cells} {r['mean_heldout_gain']:>+9.3f} "
                     f"{r['lowest_heldout_gain']:>+7.3f}..{r['highest_heldout_gain']:<+6.3f} "
                     f"{r['mean_handwritten_gain']:>+9.3f} {r['kept']:>2}/{r['runs']:<2}")
    lines.append("Gain in NDCG@10 over the base, mean over seeds: per corpus the checkpoint's on heldout.json / the saved "
                 "model's on the hand-written held-out questions; ranked by the mean heldout.json gain over the corpora "
                 "(the hand-written ones never choose); "
                 "spread: the lowest..highest single-seed heldout gain; kept: runs whose tuned model passed the never-worse check.")
    print("\n".join(lines), file=sys.stderr)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)  # the evaluator logs every score
    main(parse_config(SweepConfig, prog="python scripts/sweep_embeddings.py"))
