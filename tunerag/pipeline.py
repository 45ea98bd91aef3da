"""The whole loop in one command: your documents in, a tuned embedder and a tuned LLM out, and a
RAG evaluation that compares them with the base models, written up in report.md.

    python -m tunerag.pipeline --docs data/ --out runs/demo
    python -m tunerag.pipeline --docs data/ --out runs/demo --force rag_eval     # redo one step

Steps, each a command you can also run alone (see README):
  1. prepare        embeddings.prepare      docs -> pairs/train.json, pairs/val.json
  2. emb_finetune   embeddings.finetune     pairs -> emb-tuned/
  3. emb_evaluate   embeddings.evaluate     base vs tuned embedder on pairs/val.json
  4. llm_data       rag.raft                docs -> grounded.jsonl (questions, retrieved passages, cited answers)
  5. llm_train      llm_finetune.train      QLoRA on grounded.jsonl and/or the instructions (--llm-data) -> llm-adapter/
  6. llm_merge      llm_finetune.merge      adapter + base in float32 -> llm-merged/
  7. rag_eval       rag.evaluate            {base, tuned embedder} x {base, merged LLM} on the held-out questions
  8. report         report.md + plots/*.png

A step whose recorded input hash (its settings plus the content of its input files) matches the
run manifest, and whose outputs exist, is skipped; so a re-run after Ctrl-C continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from tunerag.common import run_cli, temp_folder, write_json_atomic
from tunerag.models import model_identity
from tunerag.samples import SAMPLE_INSTRUCTIONS, SAMPLE_QA, SAMPLE_REPORT

logger = logging.getLogger(__name__)

STEPS = ("prepare", "emb_finetune", "emb_evaluate", "llm_data", "llm_train", "llm_merge", "rag_eval")
# grounded rows against instructions in the --llm-data both mix: chosen with scripts/bench_llm_finetune.py --answers
GROUNDED_WEIGHTS = [4.0, 1.0]


@dataclass
class PipelineConfig:
    """python -m tunerag.pipeline --docs data/ --out runs/demo: prepare, fine-tune and evaluate an embedder,
    QLoRA-tune and merge an LLM, evaluate RAG with base vs tuned models, and write report.md."""

    docs: list[Path] = field(default_factory=lambda: [SAMPLE_REPORT], metadata={
        "help": "Documents (.txt/.md/.pdf/.html/.docx files or folders); repeatable."})
    out: Path = field(default=Path("runs/demo"), metadata={"help": "Run folder: every step's output, manifest.json, report.md."})
    questions: Path = field(default=SAMPLE_QA, metadata={
        "help": "RAG evaluation set: JSON list of {question, answer, passage} about the documents; where items have a "
                "`split` field only the heldout ones are asked."})
    instructions: Path = field(default=SAMPLE_INSTRUCTIONS, metadata={
        "help": "Instruction data (alpaca columns) for the LLM fine-tune."})
    embedder: str = field(default="minilm", metadata={"help": "Base embedder: 'minilm', a folder or a hub id."})
    llm: str = field(default="smollm2", metadata={"help": "Base LLM: 'smollm2', a folder or a hub id."})
    generator: Literal["ict", "llm"] = field(default="ict", metadata={
        "help": "Query generator of embeddings.prepare (ict: no LLM, fast; llm: the base LLM writes questions)."})
    llm_preset: Literal["smollm2-cpu", "mistral-7b"] = field(default="smollm2-cpu", metadata={
        "help": "llm_finetune.train preset (its base model is replaced by --llm)."})
    llm_max_steps: int = field(default=0, metadata={"help": "Cap the LLM fine-tune's steps (0: the preset's)."})
    # both by default: in scripts/bench_llm_finetune.py --answers --no-qa-tune (README; this pipeline's recipe,
    # generated questions only) the grounded fine-tune, mixed 4:1 with the instructions, raised held-out answer
    # match from 0.275 to 0.475 (long corpus) and 0.300 to 0.500 (policies), and tied the base on the sample (0.606),
    # all in the LLM's own words (--answer llm); under rag.cli's quoted answer (the default since) it adds little
    # (session 16: +0.000 / +0.000 / +0.025, README)
    llm_data: Literal["instructions", "grounded", "both"] = field(default="both", metadata={
        "help": "What the LLM is fine-tuned on: instructions (--instructions), grounded (rag.raft data from --docs: "
                "answers quoted from retrieved passages, with citations), or both mixed (4:1, the default: best "
                "measured, README)."})
    raft_questions: int = field(default=200, metadata={"help": "Questions rag.raft writes about --docs for the grounded data."})
    question_llm: str | None = field(default=None, metadata={
        "help": "LLM that writes those questions (default: --llm; e.g. 'smollm2' when --llm is a base model without "
                "a chat template)."})
    emb_epochs: float = field(default=0, metadata={"help": "Embedding fine-tune epochs (0: embeddings.finetune's default)."})
    max_chunks: int = field(default=0, metadata={"help": "Use only the first N chunks per split in prepare (0: all)."})
    rag_questions: int = field(default=24, metadata={
        "help": "Answer the first N questions with each of the 4 configurations (0: all; generation is the slow part "
                "on a CPU). Retrieval recall always uses every question."})
    k: int = field(default=4, metadata={"help": "Passages retrieved per question in the RAG evaluation."})
    max_new_tokens: int = field(default=32, metadata={
        "help": "Longest RAG answer in the evaluation, in tokens (the expected answers are short figures)."})
    force: list[str] = field(default_factory=list, metadata={
        "help": f"Redo this step even if it is complete (repeatable): {', '.join(STEPS)}, or 'all'."})
    chroma_url: str | None = field(default=None, metadata={
        "help": "RAG evaluation: index into the Chroma server at this URL (as rag.cli --chroma-url).", "metavar": "URL"})
    chroma_header: list[str] = field(default_factory=list, metadata={
        "help": "'Name: value' header for --chroma-url (repeatable; as rag.cli).", "metavar": "HEADER"})

    def forced(self, step: str) -> bool:
        return step in self.force or "all" in self.force

    def __post_init__(self):
        self.docs, self.out = [Path(p) for p in self.docs], Path(self.out)
        bad = set(self.force) - set(STEPS) - {"all"}
        if bad:
            raise ValueError(f"--force {sorted(bad)}: not a step; steps are {', '.join(STEPS)}")
        if min(self.llm_max_steps, self.emb_epochs, self.max_chunks, self.rag_questions) < 0 or self.k < 1:
            raise ValueError("--llm-max-steps, --emb-epochs, --max-chunks and --rag-questions must be >= 0, --k >= 1")
        if self.raft_questions < 1 and self.llm_data != "instructions":
            raise ValueError("--raft-questions must be >= 1 for --llm-data grounded or both")
        if self.chroma_url is not None or self.chroma_header:  # checked now, not after an hour of training
            from rag.config import RagConfig

            self.chroma_url = RagConfig(file=self.docs, chroma_url=self.chroma_url,
                                        chroma_header=self.chroma_header).chroma_url


# --- the run manifest --------------------------------------------------------------------------


def hash_paths(paths: list[Path]) -> str:
    """sha256 of the names and bytes of every file under `paths` (folders walked in sorted order)."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0".encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def step_key(settings: dict, inputs: list[Path]) -> str:
    """What a step's result depends on: its settings and the content of its input files."""
    text = json.dumps(settings, sort_keys=True, default=str) + hash_paths(inputs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Manifest:
    """out/manifest.json: per step, the input key it ran with, its outputs, seconds and metrics."""

    def __init__(self, out: Path):
        self.path = out / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def is_complete(self, name: str, key: str, outputs: list[Path]) -> bool:
        entry = self.data["steps"].get(name)
        return bool(entry) and entry["key"] == key and all(p.exists() for p in outputs)

    def record(self, name: str, key: str, outputs: list[Path], seconds: float, metrics: Any) -> None:
        self.data["steps"][name] = {"key": key, "outputs": [str(p) for p in outputs],
                                    "seconds": round(seconds, 1), "metrics": metrics,
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(self.path, self.data)

    def metrics(self, name: str) -> Any:
        return self.data["steps"][name]["metrics"]


def run_step(manifest: Manifest, cfg: PipelineConfig, name: str, settings: dict, inputs: list[Path],
             outputs: list[Path], body: Callable[[], Any], keep_outputs: bool = False) -> Any:
    """Run `body` unless the manifest says this step already ran with the same key and its outputs exist.

    Outputs left by an unfinished or outdated run are removed first, except with `keep_outputs`
    (a training run that resumes from its own checkpoints, or a command that swaps its output folder
    in whole). The key is written into each training folder, so such a resume only ever continues a
    run of the same inputs.
    """
    key = step_key(settings, inputs)
    if not cfg.forced(name) and manifest.is_complete(name, key, outputs):
        logger.info("[%s] complete, inputs unchanged: skipped", name)
        return manifest.metrics(name)
    if not keep_outputs:
        for p in outputs:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    logger.info("[%s] running", name)
    started = time.perf_counter()
    metrics = body()
    seconds = time.perf_counter() - started
    manifest.record(name, key, outputs, seconds, metrics)
    logger.info("[%s] done in %.0f s", name, seconds)
    return metrics


# --- the report --------------------------------------------------------------------------------


def plot_curves(series: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str,
                right: dict[str, list[tuple[float, float]]] | None = None, right_label: str = "") -> Path:
    """Lines over training steps; `right` series go on a second y axis (e.g. NDCG@10 next to loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, points in series.items():
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for label, points in right.items():
            if points:
                ax2.plot(*zip(*points), marker="s", markersize=3, linestyle="--", color="tab:green", label=label)
        ax2.set_ylabel(right_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(groups: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars with the value printed on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(series)) / 2 + 2), 4), dpi=110)
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, max((v for vs in series.values() for v in vs), default=1) * 1.15))
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(cfg: PipelineConfig, out: Path, manifest: Manifest, emb_scores: dict, rag: dict) -> Path:
    """report.md with the headline tables and PNG plots under out/plots/."""
    import platform

    from embeddings.evaluate import METRICS

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    steps = manifest.data["steps"]
    emb_metrics = json.loads((out / "emb-tuned" / "metrics.json").read_text())
    llm_metrics = json.loads((out / "llm-adapter" / "metrics.json").read_text())
    merge_info = json.loads((out / "llm-merged" / "merge_info.json").read_text())
    recall = f"recall@{cfg.k}"
    configs = rag["configurations"]

    # 1. RAG: the four configurations
    plot_bars([c["config"].replace(" + ", "\n+ ") for c in configs],
              {recall: [c[recall] for c in configs], "answer match": [c["answer_match"] for c in configs]},
              plots / "rag_configurations.png", f"RAG on {cfg.questions.name}: retrieval and answers", "share of questions")
    # 2. Embedder: base vs tuned on held-out queries
    base_spec, tuned_spec = cfg.embedder, str(out / "emb-tuned")
    plot_bars(METRICS, {f"base ({base_spec})": [emb_scores[base_spec][m] for m in METRICS],
                        "tuned": [emb_scores[tuned_spec][m] for m in METRICS]},
              plots / "embedder_base_vs_tuned.png", "Embedder on held-out queries (val.json)", "score (cosine)")
    # 3. Loss curves of both fine-tunes
    history = emb_metrics.get("log_history", [])
    ndcg_key = f"eval_{emb_metrics.get('main_metric', 'val_cosine_ndcg@10')}"
    plot_curves({"training loss (MNRL)": [(e["step"], e["loss"]) for e in history if "loss" in e],
                 "eval loss (val pairs)": [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]},
                plots / "embedder_loss.png", "Embedding fine-tune", "loss",
                right={"val NDCG@10": [(e["step"], e[ndcg_key]) for e in history if ndcg_key in e]},
                right_label="NDCG@10")
    curves = llm_metrics["curves"]
    plot_curves({"training loss": [(p["step"], p["loss"]) for p in curves["train"]],
                 "eval loss (held-out)": [(p["step"], p["loss"]) for p in curves["eval"]]},
                plots / "llm_loss.png", f"QLoRA fine-tune of {cfg.llm}", "cross-entropy (response tokens)")

    rag_rows = [[c["config"], c[recall], c["answer_match"], c.get("evidence_match", "-"),
                 c.get("answered_when_in_passages", "-"), c.get("declined_when_not_in_passages", "-"),
                 c["first_token_median_s"], c["tokens_per_s_median"] or "-"] for c in configs]
    emb_rows = [[m, emb_scores[base_spec][m], emb_scores[tuned_spec][m], emb_scores[tuned_spec][m] - emb_scores[base_spec][m]]
                for m in METRICS]
    step_rows = [[name, steps[name]["seconds"], steps[name]["finished"]] for name in STEPS if name in steps]
    n_questions = configs[0]["questions"] if configs else 0
    text = f"""# tunerag pipeline report

Run folder `{out}`; documents {", ".join(f"`{p}`" for p in cfg.docs)}; question set `{cfg.questions}` ({n_questions} questions
answered per configuration); base embedder `{cfg.embedder}`, base LLM `{cfg.llm}`. Machine: {platform.machine()},
{os.cpu_count()} CPU threads{", CUDA" if _cuda() else ", no GPU"}.

## RAG: base vs tuned

{md_table(["configuration", recall, "answer match", "evidence match", "answered (in passages)", "declined (not in passages)",
           "first token (s, median)", "tokens/s (median)"], rag_rows)}

*{recall}*: share of questions whose answering passage is among the top {cfg.k} chunks. *answer match*: share of
answers that contain the expected figure or phrase (rag/metrics.py); *evidence match*: the evidence sentence shown
under the answer holds it. *answered*: of the questions whose answer is in the passages the LLM read, the share it
answered (not "I don't know"); *declined*: of those whose passages do not hold it, the share it declined (the
"not in the documents" answer). The LLM was fine-tuned on `{cfg.llm_data}` data (`--llm-data`).

![RAG configurations](plots/rag_configurations.png)

## Embedder: `{cfg.embedder}` vs fine-tuned, held-out queries

{md_table(["metric", "base", "tuned", "change"], emb_rows)}

Generator `{cfg.generator}`; {emb_metrics["data"]["train_pairs"]} training pairs, {emb_metrics["steps"]} steps,
{emb_metrics["pairs_per_second"]} pairs/s; best checkpoint by validation NDCG@10: {emb_metrics.get("best_checkpoint")}.
Base vs that checkpoint, per-query NDCG@10 ({"; ".join(f"{name}: {c['base']:.4f} -> {c['tuned']:.4f}, gain {c['gain']:+.4f}, "
f"noise {c['se']:.4f}, {c['queries']} queries" for name, c in emb_metrics.get("checks", {}).items())}):
**`emb-tuned` holds the {"fine-tuned model" if emb_metrics.get("kept", "tuned") == "tuned" else "base model, unchanged (the fine-tune did not beat it beyond noise)"}**.

![Embedder base vs tuned](plots/embedder_base_vs_tuned.png)
![Embedding fine-tune loss](plots/embedder_loss.png)

## LLM: QLoRA fine-tune and merge

Perplexity on the held-out examples: {llm_metrics["perplexity_before"]:.2f} before, {llm_metrics["perplexity_after"]:.2f}
after ({llm_metrics["global_step"]} steps, {llm_metrics["n_train"]} training examples, {llm_metrics["trainable_params"]:,}
trainable parameters). Merge verified: max |logit difference| between merged and base+adapter
{merge_info["max_abs_logit_diff"]:.2e} (tolerance {merge_info["tolerance"]:.0e}); the trained head moved by up to
{merge_info["head_max_abs_change"]:.2e}.

![LLM loss](plots/llm_loss.png)

## Steps

{md_table(["step", "seconds", "finished"], step_rows)}

## Next

```bash
python -m rag.cli {" ".join(f"--file {p}" for p in cfg.docs)} --embeddings {out / "emb-tuned"} --llm {out / "llm-merged"}
```
"""
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the steps ---------------------------------------------------------------------------------


def rag_configurations(cfg: PipelineConfig, out: Path) -> list[tuple[str, str, str]]:
    """(label, embedder, llm) for base/tuned embedder x base/merged LLM."""
    tuned_emb, merged = str(out / "emb-tuned"), str(out / "llm-merged")
    return [("base emb + base LLM", cfg.embedder, cfg.llm), ("tuned emb + base LLM", tuned_emb, cfg.llm),
            ("base emb + merged LLM", cfg.embedder, merged), ("tuned emb + merged LLM", tuned_emb, merged)]


def heldout_items(items: list[dict]) -> list[dict]:
    """The held-out half of a question set that has a `split` field (its tuning half chose defaults); all otherwise."""
    heldout = [item for item in items if item.get("split") == "heldout"]
    return heldout if any("split" in item for item in items) and heldout else items


def rag_evaluation(cfg: PipelineConfig, out: Path) -> dict:
    """Retrieval recall per embedder, and answer quality, time to first token and tokens/s for the four pairs."""
    from rag.evaluate import RagEvalConfig, bench_embedder, bench_llm

    items = heldout_items(json.loads(cfg.questions.read_text(encoding="utf-8")))
    n_gen = cfg.rag_questions or len(items)
    bench = RagEvalConfig(file=cfg.docs, qa=cfg.questions, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                           gen_questions=n_gen)
    if cfg.chroma_url is not None:  # every rag.cli config of the evaluation uses the server
        plain = bench.rag_config
        bench.rag_config = lambda **overrides: plain(**({"chroma_url": cfg.chroma_url,
                                                         "chroma_header": cfg.chroma_header} | overrides))
    # a new folder each time: chromadb keeps clients per path, so a deleted and re-created path is stale in-process;
    # named after this process, so the next run removes what a killed one left
    store = temp_folder(out / "rag_eval_db")
    retrieval = {spec: bench_embedder(bench, spec, items, store) for spec in (cfg.embedder, str(out / "emb-tuned"))}
    rows = []
    for label, emb, llm in rag_configurations(cfg, out):
        gen = bench_llm(bench, llm, emb, items, store)
        rows.append({"config": label, "embeddings": emb, "llm": llm, f"recall@{cfg.k}": retrieval[emb][f"recall@{cfg.k}"],
                     **{k: gen[k] for k in ("questions", "answer_match", "evidence_match", "answered_when_in_passages",
                                            "declined_when_not_in_passages", "first_token_median_s", "tokens_per_s_median")},
                     "answers": gen["answers"]})
    shutil.rmtree(store, ignore_errors=True)
    return {"retrieval": list(retrieval.values()), "configurations": rows}


def resumable(folder: Path, key: str, last_checkpoint: Callable[[Path], Path | None], allow: bool = True) -> bool:
    """True when `folder` holds an unfinished training run of these very inputs, with a checkpoint;
    otherwise (or when not `allow`ed) the folder is emptied and stamped with `key` for a fresh run."""
    stamp = folder / ".pipeline_key"
    if allow and stamp.is_file() and stamp.read_text() == key and last_checkpoint(folder) is not None:
        return True
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stamp.write_text(key)
    return False


def without(metrics: dict, *keys: str) -> dict:
    return {k: v for k, v in metrics.items() if k not in keys}


def main(cfg: PipelineConfig) -> dict:
    from embeddings import evaluate as emb_evaluate
    from embeddings import finetune as emb_finetune
    from embeddings import prepare as emb_prepare
    from embeddings.config import EvaluateConfig, FinetuneConfig, PrepareConfig
    from llm_finetune import merge as llm_merge
    from llm_finetune import train as llm_train
    from llm_finetune.config import MergeConfig, TrainConfig
    from rag import raft
    from rag.raft import RaftConfig
    from tunerag.documents import find_documents

    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "pipeline_config.json", asdict(cfg))
    manifest = Manifest(out)
    pairs, emb_tuned, adapter, merged = out / "pairs", out / "emb-tuned", out / "llm-adapter", out / "llm-merged"
    started = time.perf_counter()
    llm_files = model_identity(cfg.llm)  # a base LLM re-written in its folder is a new input to every LLM step

    prepare_cfg = PrepareConfig(docs=cfg.docs, out=pairs, generator=cfg.generator, llm=cfg.llm, embedder=cfg.embedder,
                                max_chunks=cfg.max_chunks, cache=out / "question_cache.jsonl")
    documents = find_documents(cfg.docs)  # the files prepare reads: other files beside them change nothing
    # prepare and merge swap their output folder in whole, so the previous one stays until the new one is complete
    run_step(manifest, cfg, "prepare", asdict(prepare_cfg) | {"llm_files": llm_files}, documents, [pairs],
             lambda: emb_prepare.main(prepare_cfg), keep_outputs=True)

    finetune_cfg = FinetuneConfig(train=pairs / "train.json", val=pairs / "val.json", model=cfg.embedder, out=emb_tuned,
                                  **({"epochs": cfg.emb_epochs} if cfg.emb_epochs else {}))
    run_step(manifest, cfg, "emb_finetune", asdict(finetune_cfg), [pairs], [emb_tuned],
             lambda: without(emb_finetune.main(finetune_cfg), "log_history"))

    evaluate_cfg = EvaluateConfig(data=pairs / "val.json", model=[cfg.embedder, str(emb_tuned)])
    emb_scores = run_step(manifest, cfg, "emb_evaluate", asdict(evaluate_cfg), [pairs / "val.json", emb_tuned], [],
                          lambda: emb_evaluate.main(evaluate_cfg))

    grounded = out / "grounded.jsonl"
    if cfg.llm_data != "instructions":
        raft_cfg = RaftConfig(docs=cfg.docs, out=grounded, llm=cfg.llm, question_llm=cfg.question_llm,
                              embeddings=cfg.embedder, questions=cfg.raft_questions,
                              persist_dir=out / "raft_db", cache=out / "question_cache.jsonl", k=cfg.k)
        run_step(manifest, cfg, "llm_data", asdict(raft_cfg) | {"llm_files": llm_files}, documents, [grounded],
                 lambda: raft.main(raft_cfg))
    sources = {"grounded": [grounded], "instructions": [cfg.instructions], "both": [grounded, cfg.instructions]}[cfg.llm_data]
    train_cfg = TrainConfig(preset=cfg.llm_preset, base_model=cfg.llm, data=[str(p) for p in sources], out=str(adapter),
                            data_weight=GROUNDED_WEIGHTS if cfg.llm_data == "both" else None,
                            **({"max_steps": cfg.llm_max_steps} if cfg.llm_max_steps else {}))
    train_settings = asdict(train_cfg) | {"base_files": llm_files}
    train_key = step_key(train_settings, sources)
    forced = cfg.forced("llm_train")
    if forced or not manifest.is_complete("llm_train", train_key, [adapter]):
        resume = resumable(adapter, train_key, llm_train.last_complete_checkpoint, allow=not forced)
        train_cfg = dataclasses.replace(train_cfg, resume=resume)
        if resume:
            logger.info("[llm_train] an unfinished run of the same inputs is in %s: resuming it", adapter)
    run_step(manifest, cfg, "llm_train", train_settings, sources, [adapter],
             lambda: without(llm_train.main(train_cfg), "log_history", "curves"), keep_outputs=True)

    merge_cfg = MergeConfig(adapter=str(adapter), out=str(merged), overwrite=True)
    run_step(manifest, cfg, "llm_merge", asdict(merge_cfg), [adapter / "adapter_model.safetensors",
                                                              adapter / "adapter_config.json"], [merged],
             lambda: llm_merge.main(merge_cfg), keep_outputs=True)

    rag_settings = {"k": cfg.k, "max_new_tokens": cfg.max_new_tokens, "rag_questions": cfg.rag_questions,
                    "embedder": cfg.embedder, "llm": cfg.llm, "llm_files": llm_files}
    rag = run_step(manifest, cfg, "rag_eval", rag_settings, [*documents, cfg.questions, emb_tuned, merged], [],
                   lambda: rag_evaluation(cfg, out))

    report = write_report(cfg, out, manifest, emb_scores, rag)
    total = time.perf_counter() - started
    logger.info("pipeline finished in %.0f s; report: %s", total, report)
    docs = " ".join(f"--file {p}" for p in cfg.docs)
    print(f"\nReport: {report}\nAsk your documents with the tuned pair:\n"
          f"  python -m rag.cli {docs} --embeddings {emb_tuned} --llm {merged}")
    return {"report": str(report), "seconds": round(total, 1), "manifest": manifest.data}


if __name__ == "__main__":
    run_cli(main, PipelineConfig)
