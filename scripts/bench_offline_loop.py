"""python scripts/bench_offline_loop.py [--copies 4] [--work W]

The whole offline embeddings loop on a 10-K-sized corpus (issue: "under 30 minutes on the 2-core CPU, with an
ETA shown before it starts"), timed as a user runs it: `python -m embeddings.prepare DOCS --out pairs` then
`python -m embeddings.finetune --train/--val/--heldout ... --out model`, each in its own process, defaults only
(`--query-styles` passes prepare's option of that name, to measure it).

No 10-K ships here (nothing may be downloaded), so the corpus is the long sample corpus (three annual
reports, a rating methodology, a prospectus: 368 index chunks) written out --copies times as other companies'
filings: each copy renames the company, the agency and the issuer, moves every year by 4 x its number and
scales every decimal figure by (1 + 0.05 x its number), so the copies share wording and differ in names,
years and figures, as a multi-year filing does. Four copies give about 1,470 index chunks of 254 MiniLM
tokens (rag.cli's chunking), the issue's 10-K is 1,392. The figures are times; the gain printed is the
never-worse check's (heldout.json), not a quality claim on text nobody here wrote.

One JSON object on stdout, a short table on stderr; prepare's own estimate line (printed after its second
batch, before the long loop) is kept beside the measured time.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from embeddings.config import QUERY_STYLES  # noqa: E402
from tunerag.common import parse_config  # noqa: E402

logger = logging.getLogger("bench_offline_loop")

# copy i renames these; copy 0 is the shipped text
NAMES = {
    "Halvorsen Ridge": ["Halvorsen Ridge", "Castellan Bay", "Wrenfield Cross", "Ostmark Vale", "Tidewater Crest"],
    "Meridian": ["Meridian", "Polaris", "Keystone", "Lodestar", "Sextant"],
}
ESTIMATE = re.compile(r"first batch: .*?; estimate (\d+) s for the other \d+ batches")


@dataclass
class OfflineLoopConfig:
    """Time prepare + finetune (the defaults) on a 10-K-sized corpus built from the long sample corpus."""

    copies: int = field(default=4, metadata={"help": "Copies of the long corpus (4: about 1,470 index chunks)."})
    work: Path | None = field(default=None, metadata={"help": "Working folder (default: a temp folder)."})
    query_styles: list[str] = field(default_factory=list, metadata={
        "help": "Passed to embeddings.prepare --query-styles (repeatable; default: prepare's own default).",
        "choices": [*QUERY_STYLES, "none"]})


def variant(text: str, i: int) -> str:
    """Copy `i` of a document: other names, years moved by 4i, decimal figures scaled by 1 + 0.05i. Pure."""
    if i == 0:
        return text
    for old, names in NAMES.items():
        new = names[i % len(names)]
        for form in (str, str.upper, lambda name: name.lower().replace(" ", "_")):  # text, headings, file names
            text = text.replace(form(old), form(new))
    text = re.sub(r"(?<!\d)(20[0-4]\d)(?!\d)", lambda m: str(int(m.group(1)) + 4 * i), text)
    return re.sub(r"\b(\d+)\.(\d+)\b", lambda m: f"{float(m.group()) * (1 + 0.05 * i):.{len(m.group(2))}f}", text)


def write_corpus(folder: Path, copies: int) -> list[Path]:
    from tunerag.samples import corpus_files

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(copies):
        for source in sorted(p for f in corpus_files("long") for p in ([f] if f.is_file() else f.glob("*.txt"))):
            path = folder / variant(f"{source.stem}_{i}.txt" if i else source.name, i)
            path.write_text(variant(source.read_text(encoding="utf-8"), i), encoding="utf-8")
            paths.append(path)
    return paths


def index_chunks(paths: list[Path]) -> int:
    """How many chunks rag.cli would index with its defaults (254 MiniLM tokens, the default overlap)."""
    from rag import index
    from rag.config import rag_default
    from rag.embedder import load_embeddings

    embeddings, _ = load_embeddings("minilm")
    splitter = index.make_splitter(embeddings.tokenizer, index.embedder_max_tokens(embeddings),
                                   rag_default("chunk_overlap"))
    return sum(len(index.split_document(d, splitter)[0]) for d in index.load_documents(paths))


def timed(command: list[str], log: Path) -> float:
    """Run `command`, its output shown on stderr and kept in `log`; seconds of wall time."""
    logger.info("$ %s", " ".join(command))
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # the trainer's log lines too: this script's stdout is its JSON alone
            sys.stderr.write(line)
            f.write(line)
    if proc.wait():
        raise SystemExit(f"{command[2]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - started


def main(cfg: OfflineLoopConfig) -> dict:
    work = Path(cfg.work or tempfile.mkdtemp(prefix="bench_offline_loop-"))
    paths = write_corpus(work / "docs", cfg.copies)
    words = sum(len(p.read_text(encoding="utf-8").split()) for p in paths)
    chunks = index_chunks(paths)
    logger.info("%d documents, %d words, %d index chunks", len(paths), words, chunks)
    pairs, model = work / "pairs", work / "model"
    prepare_s = timed([sys.executable, "-m", "embeddings.prepare", str(work / "docs"), "--out", str(pairs),
                       "--cache", str(work / "question_cache.jsonl"),
                       *(arg for style in cfg.query_styles for arg in ("--query-styles", style))], work / "prepare.log")
    estimate = ESTIMATE.search((work / "prepare.log").read_text(encoding="utf-8"))
    finetune_s = timed([sys.executable, "-m", "embeddings.finetune", "--train", str(pairs / "train.json"), "--val",
                        str(pairs / "val.json"), "--heldout", str(pairs / "heldout.json"), "--out", str(model)],
                       work / "finetune.log")
    stats = json.loads((pairs / "prepare_stats.json").read_text(encoding="utf-8"))
    metrics = json.loads((model / "metrics.json").read_text(encoding="utf-8"))
    result = {
        "bench": "offline_loop", "copies": cfg.copies, "documents": len(paths), "words": words, "index_chunks": chunks,
        "prepare_stats": stats, "prepare_seconds": round(prepare_s, 1), "finetune_seconds": round(finetune_s, 1),
        "total_minutes": round((prepare_s + finetune_s) / 60, 2),
        "estimate_line": estimate and estimate.group(), "estimate_s": estimate and int(estimate.group(1)),
        "train_pairs": metrics["data"]["train_pairs"], "steps": metrics["steps"], "kept": metrics["kept"],
        "checks": metrics["checks"],
    }
    print(json.dumps(result))
    print("| corpus | index chunks | prepare s | finetune s | total min | prepare's estimate s (the rest, after 1-2 "
          "batches) | kept |\n|---|---|---|---|---|---|---|\n"
          f"| long x{cfg.copies} ({words} words) | {chunks} | {prepare_s:.0f} | {finetune_s:.0f} | "
          f"{result['total_minutes']:.1f} | {result['estimate_s']} | {metrics['kept']} |", file=sys.stderr)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    main(parse_config(OfflineLoopConfig, prog="python scripts/bench_offline_loop.py"))
