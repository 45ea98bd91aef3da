"""Grounded fine-tuning data (RAFT, Zhang et al. 2024) from your documents, offline.

    python -m rag.raft report.pdf docs/ --out rag_sft.jsonl                 # SmolLM2 writes the questions
    python -m rag.raft docs/ --qa-file faq.json --questions 0 --out rag_sft.jsonl   # your Q/A (with passages)
    python -m llm_finetune.train --preset smollm2-cpu --data rag_sft.jsonl --data data/finance_alpaca.json

Each example is the exact prompt `rag.cli` sends for a question - the passages its own retriever and
evidence-first context return from an index of the same documents, rendered by `rag.chain`'s own
prompt code (so training and use cannot drift apart) - and the answer the chain asks for: the
supporting sentence copied word for word, then its passage number, "... [2]". Questions come from
`embeddings.prepare` (the LLM writes a question about a picked sentence, which is then the answer's
evidence) or from a Q/A file. RAFT's two twists: when retrieval misses the answering chunk it is put
in at a random place among the distractors, and for a share of questions (--p-missing) every passage
that holds the evidence is removed and the target is `rag.chain.NO_ANSWER`. A question whose sentence the
evidence-first context cut away is skipped (counted): neither a quote nor a fair "I don't know"; or, with
--evidence-cut insert, its sentence is kept first and the best others fill the budget. And questions
about documents you did not give (--p-foreign: the tune halves of the shipped sample corpora that are not among
DOCS, about other, fictional, companies) come with what the retriever returns for them and the same
"I don't know" target: the passages then hold related words but never the answer, the case a user meets
when the documents do not cover a question.

Train and val never share a chunk (embeddings.prepare's split by document or by position); each row
carries `"split"`, which llm_finetune.train honours. The output is written whole or not at all; the
LLM's questions are cached, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from embeddings.prepare import document_chunks, sentence_questions
from llm_finetune.data import load_rows
from rag.chain import NO_ANSWER, count_tokens, prompt_messages
from rag.config import RagConfig, rag_default
from rag.context import NUMBER, evidence_passages
from rag.metrics import answer_matches, squash
from rag.retrieve import YEAR
from tunerag.common import TuneragError, run_cli, stable_rng, tunerag_home, write_text_atomic
from tunerag.models import MINILM, SMOLLM2
from tunerag.samples import CORPORA, corpus_files, corpus_questions

logger = logging.getLogger(__name__)

MAX_PER_CHUNK = 3  # questions per chunk at most, when the documents have fewer chunks than --questions


@dataclass
class RaftConfig:
    """python -m rag.raft DOCS... --out rag_sft.jsonl: grounded fine-tuning data (question, the passages rag.cli
    retrieves for it, the answer quoting its sentence with a [n] citation, or "I don't know") as chat JSONL
    for llm_finetune.train --data."""

    docs: list[Path] = field(default_factory=list, metadata={
        "positional": True, "metavar": "DOCS", "help": "Documents (files or folders) to index and ask about."})
    out: Path = field(default=Path("rag_sft.jsonl"), metadata={"help": "Chat JSONL written here (whole, or not at all)."})
    llm: str = field(default=SMOLLM2, metadata={
        "help": "The LLM you will fine-tune: its tokenizer and chat template render the prompts, and it writes "
                "the questions unless --question-llm is given."})
    question_llm: str | None = field(default=None, metadata={"help": "LLM that writes the questions (default: --llm)."})
    questions: int = field(default=300, metadata={
        "help": "Questions to generate from the documents at most (0: none, only --qa-file)."})
    qa_file: Path | None = field(default=None, metadata={
        "help": "Also use this Q/A file (.json/.jsonl/.csv with question and answer, optionally passage: the "
                "sentence that answers)."})
    qa_split: str | None = field(default=None, metadata={
        "help": "--qa-file: keep only rows whose `split` field is this (e.g. tune)."})
    # 0 by default, both: with 0.1 and 0.2 (~25% "I don't know" rows) SmolLM2 declined 9 of the 33 held-out sample
    # questions (the base: none) and still answered the other companies' questions (README)
    p_missing: float = field(default=0.0, metadata={
        "help": "Share of questions shown without any passage that holds the answer; their target is the "
                "\"I don't know\" answer (default 0: measured, it taught SmolLM2 to decline answerable questions)."})
    evidence_cut: Literal["skip", "insert"] = field(default="skip", metadata={
        "help": "A question whose evidence sentence the context cut away: skip it (counted), or insert the sentence "
                "into the context first, with the best other sentences after it up to the budget (RAFT's oracle "
                "passage among distractors, at sentence level)."})
    p_foreign: float = field(default=0.0, metadata={
        "help": "Questions about documents you did not give (the shipped sample corpora's tune-half questions), as "
                "a share of your questions, shown with what the retriever returns for them; their target is the "
                "\"I don't know\" answer (default 0, as --p-missing)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of documents (or of the text) whose questions are validation rows."})
    split: Literal["auto", "document", "position"] = field(default="auto", metadata={
        "help": "As embeddings.prepare: val by document (2+ documents) or by the last part of the text."})
    embeddings: str = field(default=MINILM, metadata={"help": "The embedder of the index (as rag.cli --embeddings)."})
    k: int = field(default=rag_default("k"), metadata={"help": "As rag.cli --k."})
    retriever: Literal["hybrid", "dense", "bm25"] = field(default=rag_default("retriever"), metadata={"help": "As rag.cli."})
    bm25_weight: float = field(default=rag_default("bm25_weight"), metadata={"help": "As rag.cli."})
    context: Literal["sentences", "chunks"] = field(default=rag_default("context"), metadata={"help": "As rag.cli."})
    context_tokens: int = field(default=rag_default("context_tokens"), metadata={"help": "As rag.cli."})
    chunk_size: int = field(default=rag_default("chunk_size"), metadata={"help": "As rag.cli."})
    chunk_overlap: int = field(default=rag_default("chunk_overlap"), metadata={"help": "As rag.cli."})
    persist_dir: Path | None = field(default=None, metadata={
        "help": "Chroma folder of the index (default: $TUNERAG_HOME/raft/chroma; an existing rag.cli folder is reused)."})
    cache: Path | None = field(default=None, metadata={
        "help": "Cache of the LLM's questions (default: embeddings.prepare's)."})
    strict: bool = field(default=False, metadata={"help": "Stop at a bad file inside a DOCS folder instead of skipping it."})
    seed: int = field(default=42, metadata={"help": "Seed of the sentence choice, the missing share and passage places."})

    def __post_init__(self):
        self.docs = [Path(p) for p in self.docs]
        self.out = Path(self.out)
        if not self.docs:
            raise ValueError("give the documents (DOCS): the passages are retrieved from them")
        if not 0 <= self.p_missing < 1:
            raise ValueError(f"--p-missing ({self.p_missing}) must be in [0, 1)")
        if not 0 <= self.p_foreign <= 1:
            raise ValueError(f"--p-foreign ({self.p_foreign}) must be in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction ({self.val_fraction}) must be in (0, 1)")
        if self.questions < 0 or (self.questions == 0 and self.qa_file is None):
            raise ValueError("--questions must be > 0, or 0 with a --qa-file")
        if self.out.suffix.lower() != ".jsonl":
            raise ValueError(f"--out {str(self.out)!r} must end in .jsonl (llm_finetune.train --data reads it)")
        if self.qa_split is not None and self.qa_file is None:
            raise ValueError("--qa-split filters a --qa-file; pass --qa-file too")


# --------------------------------------------------------------------------- pure parts

def words(text: str) -> str:
    return squash(text).lower()


def holds(text: str, sentence: str) -> bool:
    """`text` holds `sentence` (whitespace and case aside)."""
    return words(sentence) in words(text)


def longest_unit(passages: list[Any], keep: Callable[[str], bool]) -> tuple[int, str] | None:
    """(passage number, unit text) of the longest unit shown (a passage without units is one) that `keep` accepts."""
    best = None
    for n, doc in enumerate(passages, 1):
        for _, _, text in doc.metadata.get("units") or [(0, 0, doc.page_content)]:
            if keep(text) and (best is None or len(text) > len(best[1])):
                best = (n, text)
    return best


def is_part(evidence: str, text: str) -> bool:
    """`text` is part of the evidence sentence or holds it: the splitters of embeddings.prepare and rag.context
    cut sentences a little differently."""
    return len(text.split()) >= 3 and (holds(evidence, text) or holds(text, evidence))


def target_unit(passages: list[Any], evidence: str) -> tuple[int, str] | None:
    """The longest unit shown that is part of the evidence sentence or holds it (is_part)."""
    return longest_unit(passages, lambda text: is_part(evidence, text))


def answering_unit(passages: list[Any], evidence: str, answer: str | None) -> tuple[int, str] | None:
    """The longest unit shown that holds the answer (when known) or every figure of the evidence sentence (when
    it has one): the same fact in other words, e.g. a highlights line."""
    if answer:
        return longest_unit(passages, lambda text: answer_matches(text, answer))
    figures = {n for n in NUMBER.findall(evidence) if not YEAR.fullmatch(n)}
    return longest_unit(passages, lambda text: bool(figures) and figures <= set(NUMBER.findall(text)))


def answer_text(unit: tuple[int, str] | None) -> str:
    return f"{squash(unit[1])} [{unit[0]}]" if unit else NO_ANSWER


def place_gold(docs: list[Any], gold: Any, k: int, rng) -> list[Any]:
    """The retrieved docs with the answering chunk put in at a random place (the last one makes room)."""
    if any(d.id == gold.id for d in docs):
        return list(docs)
    kept = list(docs[: max(0, k - 1)])
    kept.insert(rng.randrange(len(kept) + 1), gold)
    return kept


# --------------------------------------------------------------------------- building

class Builder:
    """The index, the retriever, the embedder and the target tokenizer, loaded once."""

    def __init__(self, cfg: RaftConfig):
        from rag.cli import Answerer
        from tunerag.models import load_tokenizer, resolve_llm

        rag_cfg = RagConfig(file=cfg.docs, retrieve_only=True, embeddings=cfg.embeddings, k=cfg.k,
                            retriever=cfg.retriever, bm25_weight=cfg.bm25_weight, chunk_size=cfg.chunk_size,
                            chunk_overlap=cfg.chunk_overlap, strict=cfg.strict,
                            persist_dir=cfg.persist_dir or tunerag_home() / "raft" / "chroma")
        self.cfg = cfg
        self.answerer = Answerer(rag_cfg, time.perf_counter())
        self.tokenizer = load_tokenizer(resolve_llm(cfg.llm))

    def passages(self, question: str, docs: list[Any], keep: Callable[[str], bool] | None = None) -> list[Any]:
        """What rag.cli's chain puts in the prompt (examples longer than llm_finetune.train's --max-length
        are dropped there, as the chain drops passages a short context window has no room for); `keep`: units
        kept first (rag.context.evidence_passages)."""
        if self.cfg.context == "sentences":
            docs = evidence_passages(question, docs, self.answerer.embeddings.embed_documents,
                                     lambda text: count_tokens(self.tokenizer, text), self.cfg.context_tokens, keep=keep)
        return docs

    def example(self, question: str, evidence: str | None, answer: str | None, split: str) -> tuple[dict | None, str]:
        """(row, what happened): one chat row, or None with the reason it was skipped."""
        rng = stable_rng(self.cfg.seed, question, evidence or answer or "")
        docs = self.answerer.retriever.invoke(question)
        if evidence is None:  # a Q/A row without a passage: the retrieved unit that holds the answer
            shown = self.passages(question, docs)
            found = [(n, t) for n, d in enumerate(shown, 1) for _, _, t in d.metadata.get("units") or []
                     if answer_matches(t, answer)]
            if not found:
                return None, "answer_not_found"
            evidence = found[0][1]
        gold = next((d for d in docs if holds(d.page_content, evidence)), None)
        if gold is None:  # retrieval missed it: the chunk that holds the sentence, searched by the sentence
            gold = next((d for d in self.answerer.retriever.invoke(evidence) if holds(d.page_content, evidence)), None)
            if gold is None:
                return None, "evidence_not_indexed"
        missing = rng.random() < self.cfg.p_missing
        retrieved = any(d.id == gold.id for d in docs)
        if missing:
            docs = [d for d in docs if not holds(d.page_content, evidence)]
        else:
            docs = place_gold(docs, gold, self.cfg.k, rng)
        shown = self.passages(question, docs)
        kind = "missing" if missing else "answer"
        if missing:
            unit = None
            if answering_unit(shown, evidence, answer):  # another report's sentence gives the same figure
                return None, "missing_answered"
        else:
            unit = target_unit(shown, evidence) or answering_unit(shown, evidence, answer)
            if unit is None and self.cfg.evidence_cut == "insert":
                shown = self.passages(question, docs, keep=lambda text: is_part(evidence, text))
                unit, kind = target_unit(shown, evidence), "evidence_inserted"
            if unit is None:
                # the context cut kept other sentences of the answering chunk: neither a quote nor a fair "I don't
                # know" (25% of the first grounded set was this; trained as "I don't know" it taught declining)
                return None, "evidence_cut"
        messages = prompt_messages(self.tokenizer, shown, question)
        row = {"messages": [*messages, {"role": "assistant", "content": answer_text(unit)}],
               "split": split, "kind": "missing" if missing else "answer", "evidence": evidence,
               "source": gold.metadata.get("source"), "retrieved": retrieved,  # False: the answering chunk was put
               "inserted": kind == "evidence_inserted"}  # in among what retrieval found; its sentence put first
        return row, kind

    def foreign_example(self, question: str, answer: str, split: str) -> tuple[dict | None, str]:
        """A question about another company's documents with the passages retrieved for it: "I don't know",
        unless a shown passage holds its answer after all (then skipped)."""
        shown = self.passages(question, self.answerer.retriever.invoke(question))
        if any(answer_matches(d.page_content, answer) for d in shown):
            return None, "foreign_answered"
        messages = [*prompt_messages(self.tokenizer, shown, question), {"role": "assistant", "content": NO_ANSWER}]
        row = {"messages": messages, "split": split, "kind": "foreign", "evidence": None, "source": None,
               "retrieved": False, "inserted": False}
        return row, "foreign"


def generated_questions(cfg: RaftConfig) -> tuple[list[tuple[str, str, str]], dict]:
    """(question, evidence sentence, split) written by the LLM about sentences of the documents: at most
    cfg.questions, one per chunk drawn evenly over each side (up to MAX_PER_CHUNK when chunks are few)."""
    from embeddings.config import PrepareConfig

    def prepare_config(per_chunk: int) -> PrepareConfig:
        return PrepareConfig(docs=cfg.docs, out=cfg.out.parent, generator="llm", llm=cfg.question_llm or cfg.llm,
                             embedder=cfg.embeddings, questions_per_chunk=per_chunk, split=cfg.split,
                             val_fraction=cfg.val_fraction, heldout_fraction=0.0, cache=cfg.cache, seed=cfg.seed,
                             strict=cfg.strict)

    train_chunks, val_chunks, _, stats = document_chunks(prepare_config(1))
    n_val = max(1, round(cfg.questions * cfg.val_fraction))
    rng = stable_rng(cfg.seed, "raft-chunks")
    triples, stats["llm"] = [], {}
    for chunks, n, split in ((train_chunks, cfg.questions - n_val, "train"), (val_chunks, n_val, "val")):
        per_chunk = min(MAX_PER_CHUNK, max(1, math.ceil(n / max(1, len(chunks)))))
        picked = [chunks[i] for i in sorted(rng.sample(range(len(chunks)), min(len(chunks), math.ceil(n / per_chunk))))]
        written, stats["llm"][split] = sentence_questions(picked, prepare_config(per_chunk))
        triples += [(q, sentence, split) for _, sentence, q in written[:n]]
    return triples, stats


def qa_split(cfg: RaftConfig, question: str) -> str:
    """"val" for a seeded draw of --val-fraction of the questions, else "train"."""
    return "val" if stable_rng(cfg.seed, "raft-qa", question).random() < cfg.val_fraction else "train"


def qa_questions(cfg: RaftConfig) -> tuple[list[tuple[str, str | None, str, str]], int]:
    """(question, passage or None, answer, split) from --qa-file; rows without a question or answer are
    counted. Val by a seeded draw of --val-fraction of the rows."""
    rows = load_rows(str(cfg.qa_file), flag="--qa-file")
    if cfg.qa_split is not None:
        rows = [r for r in rows if str(r.get("split")) == cfg.qa_split]
    items, bad = [], 0
    for row in rows:
        question, answer = str(row.get("question") or "").strip(), str(row.get("answer") or "").strip()
        if not question or not answer:
            bad += 1
            continue
        passage = str(row.get("passage") or "").strip() or None
        items.append((question, passage, answer, qa_split(cfg, question)))
    return items, bad


def covers(doc: Path, corpus: str) -> bool:
    """`doc` (a file or folder of DOCS) is, holds or lies inside one of the shipped corpus's files."""
    doc = doc.resolve()
    return any(doc == p or p in doc.parents or doc in p.parents for p in (f.resolve() for f in corpus_files(corpus)))


def foreign_questions(cfg: RaftConfig, n: int) -> list[tuple[str, str, str]]:
    """(question, answer, split): n tune-half questions of the shipped corpora that no DOCS entry covers (their
    held-out halves, which the benchmarks ask, are never used), drawn with the seed."""
    pool = [(item["question"], item["answer"]) for corpus in CORPORA if not any(covers(d, corpus) for d in cfg.docs)
            for item in corpus_questions(corpus, "tune")]
    picked = stable_rng(cfg.seed, "raft-foreign").sample(pool, min(n, len(pool)))
    return [(q, a, qa_split(cfg, q)) for q, a in picked]


def main(cfg: RaftConfig) -> dict:
    from tqdm.auto import tqdm

    from rag.cli import quiet_libraries

    started = time.perf_counter()
    quiet_libraries()
    items: list[tuple[str, str | None, str | None, str]] = []
    stats: dict[str, Any] = {"config": json.loads(json.dumps(asdict(cfg), default=str))}
    if cfg.qa_file is not None:  # read first: a bad file fails before any model loads
        qa, stats["qa_rows_skipped"] = qa_questions(cfg)
        items += qa
        stats["qa_questions"] = len(qa)
    builder = Builder(cfg)
    if cfg.questions:
        generated, stats["documents"] = generated_questions(cfg)
        items += [(q, sentence, None, split) for q, sentence, split in generated]
        stats["generated_questions"] = len(generated)
    if not items:
        raise TuneragError("no questions: the documents gave none (too short?) and no --qa-file rows were usable")
    foreign = foreign_questions(cfg, round(cfg.p_foreign * len(items)))
    stats["foreign_questions"] = len(foreign)
    rows, counts = [], {"answer": 0, "evidence_inserted": 0, "missing": 0, "foreign": 0, "evidence_cut": 0,
                        "answer_not_found": 0, "evidence_not_indexed": 0, "missing_answered": 0, "foreign_answered": 0}
    jobs = [(builder.example, item) for item in items] + [(builder.foreign_example, item) for item in foreign]
    for build, item in tqdm(jobs, desc="retrieving passages", unit="question"):
        row, what = build(*item)
        counts[what] += 1
        if row is not None:
            rows.append(row)
    if not any(r["split"] == "train" for r in rows):
        raise TuneragError(f"no training examples could be built ({counts})")
    try:
        write_text_atomic(cfg.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    except OSError as e:
        raise TuneragError(f"cannot write --out {str(cfg.out)!r}: {e.strerror or e}") from None
    stats.update(rows=len(rows), train=sum(r["split"] == "train" for r in rows),
                 val=sum(r["split"] == "val" for r in rows), kinds=counts, seconds=round(time.perf_counter() - started, 1))
    logger.info("wrote %s: %d rows (%d train, %d val): %d answer the question (%d with their sentence inserted), %d "
                "without the answering passage and %d about other documents (target \"I don't know\"); skipped %d "
                "questions whose sentence the context cut, %d Q/A rows whose answer no passage holds, %d questions "
                "whose sentence is in no indexed chunk, %d whose other passages still answer them and %d foreign "
                "questions a passage answers (%.1f s)", cfg.out,
                len(rows), stats["train"], stats["val"], counts["answer"] + counts["evidence_inserted"],
                counts["evidence_inserted"], counts["missing"], counts["foreign"],
                counts["evidence_cut"], counts["answer_not_found"], counts["evidence_not_indexed"],
                counts["missing_answered"], counts["foreign_answered"], stats["seconds"])
    return stats


if __name__ == "__main__":
    run_cli(main, RaftConfig)
