"""python scripts/bench_speed.py [--parts embed --parts prefill ...] [--decode-prompts 20]

CPU speed of the product's paths, today's (float32, torch's thread count throughout) and the new
defaults (--dtype auto) side by side in ONE run, interleaved item by item so a
busy machine slows both alike:
  - embed: the long sample corpus chunked as rag.index does (254 MiniLM tokens, overlap 50), embedded
    with rag.embedder.load_embeddings in batches of rag.index.EMBED_BATCH; chunks/s, the cosine between
    the two vectors of each chunk, top-4 overlap and recall@4 (rag.metrics) on the corpus's tuning questions;
  - prefill: a 1,000-token SmolLM2 chat prompt: time to the first streamed token through rag.chain.make_llm
    (today: `todays_llm`, the session-4 path over langchain's HuggingFacePipeline, float32),
    the bare forward, and the matmul limit: the model's own linear layers (30 x q, k, v, o, gate, up,
    down at its shapes) as plain F.linear calls on 1,000 rows in the same dtype and threads, best of
    --repeats, compared with the best first-token time (attention's FLOPs are left out of the limit);
  - decode: greedy answers to 20 fixed RAG prompts through make_llm: tokens/s from the first to the last
    streamed chunk, and whether each answer is token-for-token the one of today's path; "new_float32" is
    the new loop on float32 alone (no bfloat16 reader: a CPU without AMX); "new_no_lookup" the new path
    without prompt lookup (--lookup-tokens 0: the previous release's defaults);
  - cli: `python -m rag.cli` one-shot on the sample report with a 48-token answer, wall time from the
    command's start to its exit, warm caches (one untimed run first), and the import time alone; today's
    command is rag.cli of --baseline-rev (the first version), run from a git worktree of it;
  - finetune: embeddings.finetune's training step, float32 against bfloat16 autocast.
One JSON object on stdout, a table on stderr; `uptime` load averages before and after each part.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without an install

from tunerag.common import run_cli  # noqa: E402

logger = logging.getLogger("bench_speed")
QUESTION = "What was the year-over-year growth rate of total revenue in 2025?"
BASELINE_REV = "1d707a1"  # the first version, before any speed work: the "today"


@dataclass
class BenchSpeedConfig:
    """python scripts/bench_speed.py: today's CPU path against the new defaults, in one run."""

    parts: list[str] = field(default_factory=lambda: ["embed", "prefill", "decode", "cli"], metadata={
        "help": "embed, prefill, decode and/or cli (repeat)."})
    new_dtype: str = field(default="auto", metadata={"help": "--dtype of the new path (auto, float32, bfloat16)."})
    prompt_tokens: int = field(default=1000, metadata={"help": "Prompt length for the prefill part."})
    repeats: int = field(default=3, metadata={"help": "Timed repeats (prefill, cli); the median is reported."})
    decode_prompts: int = field(default=20, metadata={"help": "Fixed prompts for the decode part."})
    decode_tokens: int = field(default=48, metadata={"help": "Longest answer in the decode part."})
    embed_chunks: int = field(default=0, metadata={"help": "Embed only the first N chunks (0: all)."})
    seed: int = field(default=0, metadata={"help": "Seed (everything is greedy)."})
    baseline_rev: str = field(default=BASELINE_REV, metadata={
        "help": "The git commit whose rag.cli is today's command in the cli part (default: the first version)."})


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def threads_label() -> int:
    import torch

    return torch.get_num_threads()


# ---- embed ----

def today_embeddings():
    """Today's path, pinned: sentence-transformers' own encode in float32 at its default batch of 32
    (rag.embedder's BATCH may move)."""
    from rag.embedder import sentence_transformers_encoder

    return sentence_transformers_encoder("minilm", "float32", batch_size=32)


def bench_embed(cfg: BenchSpeedConfig) -> dict:
    import torch

    from rag import index
    from rag.embedder import load_embeddings
    from rag.metrics import recall_at_k
    from tunerag.samples import corpus_files, corpus_questions

    old = today_embeddings()
    new, _ = load_embeddings("minilm", dtype=cfg.new_dtype)
    docs = index.load_documents(corpus_files("long"))
    splitter = index.make_splitter(old.tokenizer, index.embedder_max_tokens(old), 50)
    texts = [c.page_content for d in docs for c in index.split_document(d, splitter)[0]]
    texts = texts[: cfg.embed_chunks] if cfg.embed_chunks else texts
    old.embed_documents(texts[:8]), new.embed_documents(texts[:8])  # warm-up, not timed
    seconds, vectors = {"old": 0.0, "new": 0.0}, {"old": [], "new": []}
    for start in range(0, len(texts), index.EMBED_BATCH):  # interleaved: a busy machine slows both alike
        batch = texts[start:start + index.EMBED_BATCH]
        for name, emb in (("old", old), ("new", new)):
            t = time.perf_counter()
            vectors[name] += emb.embed_documents(batch)
            seconds[name] += time.perf_counter() - t
    items = corpus_questions("long", "tune")
    scores = {}
    for name, emb in (("old", old), ("new", new)):
        q = torch.tensor(emb.embed_documents([it["question"] for it in items]))
        top = (q @ torch.tensor(vectors[name]).T).topk(4, dim=1).indices.tolist()
        scores[name] = {"top": top, "recall@4": recall_at_k([[texts[i] for i in row] for row in top], items)}
    cos = (torch.tensor(vectors["old"]) * torch.tensor(vectors["new"])).sum(1)
    overlap = statistics.mean(len(set(a) & set(b)) / 4 for a, b in zip(scores["old"]["top"], scores["new"]["top"]))
    rate = {k: len(texts) / v for k, v in seconds.items()}
    return {"chunks": len(texts), "questions": len(items), "new_dtype": str(new.dtype), "new_backend": new.backend,
            "old_chunks_per_s": round(rate["old"], 2), "new_chunks_per_s": round(rate["new"], 2),
            "speedup": round(rate["new"] / rate["old"], 2), "cosine_min": round(cos.min().item(), 5),
            "cosine_mean": round(cos.mean().item(), 5), "top4_overlap": round(overlap, 4),
            "old_recall@4": round(scores["old"]["recall@4"], 4), "new_recall@4": round(scores["new"]["recall@4"], 4)}


# ---- the LLM ----

def load_llms(cfg: BenchSpeedConfig):
    """(today's float32 model, the new path's (writer, reader or None), tokenizer): as rag.cli loads them."""
    from tunerag.models import llm_dtypes, load_llm, prefill_copy

    old, tokenizer = load_llm("smollm2", dtype="float32")
    weights, reader = llm_dtypes(cfg.new_dtype)
    new = old if weights == "float32" else load_llm("smollm2", dtype=weights or "auto")[0].eval()
    return old.eval(), (new, prefill_copy(new, reader)), tokenizer


def todays_llm(model, tokenizer, max_new_tokens: int):
    """The session-4 LLM path, kept here to compare with: langchain's HuggingFacePipeline over a
    transformers text-generation pipeline (its `stream` runs `generate` in a new thread per answer)
    with the same NumberGuard, reset for each prompt as that pipeline did."""
    from langchain_huggingface import HuggingFacePipeline
    from transformers import LogitsProcessorList, TextGenerationPipeline, pipeline

    from rag.chain import NumberGuard

    guard = NumberGuard(tokenizer)

    class ResetPipeline(TextGenerationPipeline):
        def __call__(self, *args, **kwargs):
            guard.reset()
            return super().__call__(*args, **kwargs)

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, pipeline_class=ResetPipeline,
                         return_full_text=False, max_new_tokens=max_new_tokens, add_special_tokens=False,
                         pad_token_id=tokenizer.eos_token_id, logits_processor=LogitsProcessorList([guard]),
                         do_sample=False)
    return HuggingFacePipeline(pipeline=generator)


def long_prompt(tokenizer, n_tokens: int) -> str:
    """A chat-templated RAG prompt of about `n_tokens` tokens over the first long report."""
    from langchain_core.documents import Document

    from rag.chain import count_tokens, render_prompt
    from tunerag.samples import corpus_files

    text = sorted(corpus_files("long")[0].glob("*.txt"))[0].read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    frame = count_tokens(tokenizer, render_prompt(tokenizer, [Document(page_content="x")], QUESTION)) - 1
    return render_prompt(tokenizer, [Document(page_content=tokenizer.decode(ids[: n_tokens - frame]))], QUESTION)


def first_token_s(llm, prompt: str) -> float:
    t = time.perf_counter()
    stream = llm.stream(prompt)
    for chunk in stream:
        if chunk:
            break
    seconds = time.perf_counter() - t
    for _ in stream:  # runs on to max_new_tokens=2
        pass
    return seconds


def matmul_limit_s(model, n: int, repeats: int) -> tuple[float, float]:
    """(seconds, FLOPs) of the model's linear layers as bare matmuls over n rows: prefill's floor here."""
    import torch
    import torch.nn.functional as F

    weights = [m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(n, w.shape[1], dtype=w.dtype) for w in weights}
    flops = sum(2 * n * w.shape[0] * w.shape[1] for w in weights)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            for w in weights:
                F.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t)
    return min(times[1:]), flops  # the best repeat: the machine's capability, not its neighbours' load


def bench_prefill(cfg: BenchSpeedConfig, old, new_pair, tokenizer) -> dict:
    import torch

    from rag.chain import count_tokens, make_llm

    new, reader = new_pair
    prompt = long_prompt(tokenizer, cfg.prompt_tokens)
    n = count_tokens(tokenizer, prompt)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    paths = {"old": todays_llm(old, tokenizer, max_new_tokens=2),
             "new": make_llm(new, tokenizer, max_new_tokens=2, prefill_model=reader)[0]}
    models = {"old": old, "new": reader or new}  # the model that reads the prompt
    ttft, forward = {"old": [], "new": []}, {"old": [], "new": []}
    for name in paths:
        first_token_s(paths[name], prompt)  # warm-up
    for _ in range(cfg.repeats):
        for name in paths:
            ttft[name].append(first_token_s(paths[name], prompt))
            with torch.inference_mode():
                t = time.perf_counter()
                models[name](ids, logits_to_keep=torch.tensor([n - 1]))  # as rag.local_llm reads a prompt
                forward[name].append(time.perf_counter() - t)
    out = {"prompt_tokens": n, "threads": threads_label(), "new_dtype": str(models["new"].dtype)}
    for name in paths:
        limit, flops = matmul_limit_s(models[name], n, cfg.repeats)
        out |= {f"{name}_ttft_s": round(statistics.median(ttft[name]), 3),
                f"{name}_ttft_best_s": round(min(ttft[name]), 3),
                f"{name}_forward_s": round(statistics.median(forward[name]), 3),
                f"{name}_matmul_limit_s": round(limit, 3), f"{name}_matmul_gflops": round(flops / limit / 1e9, 1)}
    out["speedup"] = round(out["old_ttft_s"] / out["new_ttft_s"], 2)
    out["new_ttft_over_limit"] = round(out["new_ttft_best_s"] / out["new_matmul_limit_s"], 2)  # best vs best
    out["linear_gflop"] = round(flops / 1e9, 1)
    return out


def decode_prompts(tokenizer, n: int) -> list[str]:
    from langchain_core.documents import Document

    from rag.chain import render_prompt
    from tunerag.samples import corpus_questions

    items = corpus_questions("long", "tune")[:n]
    return [render_prompt(tokenizer, [Document(page_content=it["passage"])], it["question"]) for it in items]


def stream_answer(llm, tokenizer, prompt: str) -> tuple[list[int], float | None]:
    """(token ids of the answer, tokens/s from the first streamed chunk to the last)."""
    stamps, text = [], ""
    for chunk in llm.stream(prompt):
        if chunk:
            stamps.append(time.perf_counter())
            text += chunk
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rate = (len(ids) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and len(ids) > 1 else None
    return ids, rate


def bench_decode(cfg: BenchSpeedConfig, old, new_pair, tokenizer) -> dict:
    from rag.chain import make_llm

    new, reader = new_pair
    prompts = decode_prompts(tokenizer, cfg.decode_prompts)
    paths = {"old": todays_llm(old, tokenizer, cfg.decode_tokens),
             "new_float32": make_llm(old, tokenizer, max_new_tokens=cfg.decode_tokens)[0],
             # the new path without prompt lookup: the previous release's defaults
             "new_no_lookup": make_llm(new, tokenizer, max_new_tokens=cfg.decode_tokens, prefill_model=reader,
                                       lookup_tokens=0)[0],
             "new": make_llm(new, tokenizer, max_new_tokens=cfg.decode_tokens, prefill_model=reader)[0]}
    stream_answer(paths["new"], tokenizer, prompts[0])  # warm-up
    rates = {k: [] for k in paths}
    answers = {k: [] for k in paths}
    for prompt in prompts:
        for name, llm in paths.items():
            ids, rate = stream_answer(llm, tokenizer, prompt)
            answers[name].append(ids)
            if rate:
                rates[name].append(rate)
    out = {"prompts": len(prompts), "max_new_tokens": cfg.decode_tokens, "threads": threads_label(),
           "new_dtype": str(new.dtype), "new_reader_dtype": str(reader.dtype) if reader is not None else None}
    for name in paths:
        out[f"{name}_tokens_per_s"] = round(statistics.median(rates[name]), 2) if rates[name] else None
        out[f"{name}_same_as_old"] = sum(a == b for a, b in zip(answers[name], answers["old"])) / len(prompts)
    out["speedup"] = round(out["new_tokens_per_s"] / out["old_tokens_per_s"], 2)
    out["speedup_float32"] = round(out["new_float32_tokens_per_s"] / out["old_tokens_per_s"], 2)
    out["speedup_no_lookup"] = round(out["new_no_lookup_tokens_per_s"] / out["old_tokens_per_s"], 2)
    return out


# ---- fine-tuning ----

def bench_finetune(cfg: BenchSpeedConfig) -> dict:
    """embeddings.finetune's step (MultipleNegativesRankingLoss on MiniLM, batch 32 of question/passage pairs):
    float32 against bfloat16 autocast (what Trainer's bf16=True does on the CPU), same batches, interleaved."""
    import torch
    from sentence_transformers import SentenceTransformer, losses

    from tunerag.models import minilm_folder
    from tunerag.samples import corpus_questions

    items = corpus_questions("long", "tune")[:64]
    batches = [items[:32], items[32:64]]
    runs = {}
    for name in ("old", "new"):
        torch.manual_seed(cfg.seed)
        model = SentenceTransformer(str(minilm_folder()))
        runs[name] = (model, losses.MultipleNegativesRankingLoss(model), torch.optim.AdamW(model.parameters(), lr=2e-5))
    seconds, loss_values = {"old": [], "new": []}, {"old": [], "new": []}
    for step in range(2 + 2 * cfg.repeats):  # the first two steps warm up, untimed
        batch = batches[step % 2]
        for name, (model, loss, optimizer) in runs.items():
            features = [model.tokenize([it["question"] for it in batch]), model.tokenize([it["passage"] for it in batch])]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "new"):
                value = loss(features, None)
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:
                seconds[name].append(time.perf_counter() - t)
                loss_values[name].append(round(value.item(), 4))
    rate = {k: 32 / statistics.median(v) for k, v in seconds.items()}
    return {"model": "minilm", "batch": 32, "steps": len(seconds["old"]), "old_pairs_per_s": round(rate["old"], 2),
            "new_pairs_per_s": round(rate["new"], 2), "speedup": round(rate["new"] / rate["old"], 2),
            "old_losses": loss_values["old"], "new_losses": loss_values["new"]}


# ---- the command ----

def bench_cli(cfg: BenchSpeedConfig, work: Path) -> dict:
    """Today's command is rag.cli as it was at --baseline-rev (the first version: float32, langchain's
    HuggingFacePipeline, dense retrieval), run from a `git worktree` of that commit; the new one is this
    checkout's. The same file, question and answer length; each has its own store."""
    from tunerag.samples import SAMPLE_REPORT

    old_tree = work / "baseline"
    made = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), cfg.baseline_rev],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"error: --baseline-rev {cfg.baseline_rev!r}: {(made.stderr.strip() or 'git worktree failed').splitlines()[-1]}")
    args = ["-m", "rag.cli", "--file", str(SAMPLE_REPORT), "-q", QUESTION, "--max-new-tokens", "48", "--timings"]
    commands = {"old": ([sys.executable, *args, "--persist-dir", str(work / "db-old")], old_tree),
                "new": ([sys.executable, *args, "--persist-dir", str(work / "db-new"), "--dtype", cfg.new_dtype], REPO)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def run(command: list[str], cwd: Path) -> tuple[float, str]:
        t = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env={**env, "PYTHONPATH": str(cwd)}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(command[1:4])} in {cwd} failed: {done.stderr.strip()[-500:]}")
        return time.perf_counter() - t, done.stdout.split("\nEvidence")[0].split("\nSources")[0].strip()

    try:
        for command, cwd in commands.values():
            run(command, cwd)  # warm: the index and the converted SmolLM2 exist, files are in the page cache
        walls, answers = {k: [] for k in commands}, {}
        for _ in range(cfg.repeats):
            for name, (command, cwd) in commands.items():
                seconds, answers[name] = run(command, cwd)
                walls[name].append(seconds)
        imports = [sys.executable, "-c", "import gc; gc.disable(); import rag.cli, torch, transformers.models.bert.modeling_bert, "
                   "transformers.models.llama.modeling_llama, langchain_chroma, chromadb"]  # the new one-shot's, gc off as it loads
        import_s = statistics.median(run(imports, REPO)[0] for _ in range(cfg.repeats))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
    out = {name: round(statistics.median(v), 2) for name, v in walls.items()}
    return {"baseline_rev": cfg.baseline_rev, "old_wall_s": out["old"], "new_wall_s": out["new"],
            "speedup": round(out["old"] / out["new"], 2), "import_s": round(import_s, 2),
            "old_answer": answers["old"], "new_answer": answers["new"]}


def table(results: dict) -> str:
    rows = ["| part | today | new | ratio | accuracy | load |", "|---|---|---|---|---|---|"]
    if "embed" in results:
        r = results["embed"]
        rows.append(f"| embed {r['chunks']} chunks | {r['old_chunks_per_s']} chunks/s | {r['new_chunks_per_s']} chunks/s "
                    f"| {r['speedup']}x | recall@4 {r['old_recall@4']} -> {r['new_recall@4']}, top-4 overlap "
                    f"{r['top4_overlap']}, cos min {r['cosine_min']} | {r['load']} |")
    if "prefill" in results:
        r = results["prefill"]
        rows.append(f"| first token, {r['prompt_tokens']}-token prompt | {r['old_ttft_s']} s | {r['new_ttft_s']} s "
                    f"| {r['speedup']}x | matmul limit {r['new_matmul_limit_s']} s ({r['new_ttft_over_limit']}x of it) "
                    f"| {r['load']} |")
    if "decode" in results:
        r = results["decode"]
        rows.append(f"| decode, {r['prompts']} prompts | {r['old_tokens_per_s']} tok/s | {r['new_tokens_per_s']} tok/s "
                    f"({r['new_float32_tokens_per_s']} float32, {r['new_no_lookup_tokens_per_s']} no lookup) | "
                    f"{r['speedup']}x ({r['speedup_float32']}x, {r['speedup_no_lookup']}x) | same answer "
                    f"{r['new_same_as_old']} ({r['new_float32_same_as_old']} float32, {r['new_no_lookup_same_as_old']} no "
                    f"lookup) | {r['load']} |")
    if "cli" in results:
        r = results["cli"]
        rows.append(f"| rag.cli one-shot, 48 tokens | {r['old_wall_s']} s | {r['new_wall_s']} s | {r['speedup']}x "
                    f"| imports alone {r['import_s']} s | {r['load']} |")
    if "finetune" in results:
        r = results["finetune"]
        rows.append(f"| embedder fine-tune step (MNRL, batch 32) | {r['old_pairs_per_s']} pairs/s | {r['new_pairs_per_s']} "
                    f"pairs/s (bf16 autocast) | {r['speedup']}x | losses {r['old_losses']} vs {r['new_losses']} | {r['load']} |")
    return "\n".join(rows)


def main(cfg: BenchSpeedConfig) -> dict:
    import tempfile

    import torch
    from transformers import set_seed

    set_seed(cfg.seed)
    t0 = time.perf_counter()
    from rag.cli import quiet_libraries
    from tunerag.models import cpu_bf16_flags

    quiet_libraries()
    results: dict = {}
    llms = None
    with tempfile.TemporaryDirectory(prefix="bench_speed-") as work:
        for part in cfg.parts:
            before = load()
            logger.info("%s (%s)", part, before)
            if part == "embed":
                results[part] = bench_embed(cfg)
            elif part in ("prefill", "decode"):
                llms = llms or load_llms(cfg)
                results[part] = (bench_prefill if part == "prefill" else bench_decode)(cfg, *llms)
            elif part == "cli":
                results[part] = bench_cli(cfg, Path(work))
            elif part == "finetune":
                results[part] = bench_finetune(cfg)
            else:
                raise ValueError(f"--parts {part!r} is not one of embed, prefill, decode, cli, finetune")
            results[part]["load"] = f"{before} -> {load().split()[-3]}"
            logger.info("%s: %s", part, json.dumps(results[part], default=str))
    print(table(results), file=sys.stderr)
    out = {"bench": "speed", "config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_flags": sorted(cpu_bf16_flags()),
           "results": results, "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_cli(main, BenchSpeedConfig)
