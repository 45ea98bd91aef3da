"""The flags of `python -m rag.cli`: one dataclass, each field is a flag (see tunerag.common)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tunerag.models import MINILM, SMOLLM2


@dataclass
class RagConfig:
    """python -m rag.cli --file doc.txt [-q "question"]: answer questions about your documents from a
    persistent Chroma index, with the embedded MiniLM + SmolLM2 or your tuned models. Without -q or
    --questions it opens an interactive session (/sources, /quit, Ctrl-D; Ctrl-C stops an answer)."""

    file: list[Path] = field(metadata={"help": "A .txt, .md, .pdf, .html/.htm or .docx document (or a folder of them); repeat the flag for more.",
                                       "metavar": "PATH"})
    question: str | None = field(default=None, metadata={"help": "Answer this one question and exit.", "aliases": ["-q"]})
    questions: Path | None = field(default=None, metadata={
        "help": "Answer every line of this file (one question a line); prints one JSON object a line.", "metavar": "FILE"})
    retrieve_only: bool = field(default=False, metadata={"help": "Return the retrieved passages only; the LLM is not loaded."})
    embeddings: str = field(default=MINILM, metadata={
        "help": f"Embedder: '{MINILM}' (embedded all-MiniLM-L6-v2), a folder from embeddings.finetune, or a hub id."})
    embed_backend: Literal["auto", "transformers", "sentence-transformers"] = field(default="auto", metadata={
        "help": "How the embedder runs: auto is transformers directly for a plain transformer + mean/CLS pooling "
                "folder (the same vectors, without sentence-transformers' ~4 s import) and sentence-transformers "
                "for anything else; either forces one."})
    llm: str = field(default=SMOLLM2, metadata={
        "help": f"LLM: '{SMOLLM2}' (embedded SmolLM2-135M-Instruct), a folder from llm_finetune.merge, or a hub id."})
    k: int = field(default=4, metadata={"help": "Passages retrieved per question (fewer reach the LLM if they overflow its context)."})
    retriever: Literal["hybrid", "dense", "bm25"] = field(default="hybrid", metadata={
        "help": "hybrid: BM25 and the embedder fused by reciprocal rank; dense: the embedder only (Chroma); "
                "bm25: lexical only."})
    bm25_weight: float = field(default=3.0, metadata={
        "help": "Weight of the BM25 ranking against the embedder's (1.0) in the hybrid fusion (3.0: best mean "
                "answer-in-top-4 over the tuning halves of the sample and long corpora, see README)."})
    fetch_k: int = field(default=80, metadata={
        "help": "hybrid: candidates each side (the embedder, BM25) ranks before the fusion; a chunk ranked low by both "
                "sides still rises (80: best mean answer-in-top-4 over the three tuning halves among 20-160, see "
                "README). At least --k."})
    sentence_weight: float = field(default=2.0, metadata={
        "help": "Weight, in the hybrid fusion, of a ranking of chunks by the embedder's cosine of their best sentence "
                "(every sentence and table row is embedded once and stored beside the BM25 index, about doubling a first "
                "index build; 2.0: best mean answer-in-top-4 over the three tuning halves among 0-2.5, see README); "
                "0: off, nothing more is embedded."})
    rerank_weight: float = field(default=0.0, metadata={
        "help": "hybrid: fuse the fused top 8 chunks once more with a ranking of them by their best sentence's score, "
                "the score that picks the extractive answer and the LLM's context (cosine from the stored sentence "
                "vectors + the question's words + the kind of answer asked for), at this weight against the "
                "fusion's 1.0. At 1.0 more right passages reach the top 4 (long corpus's tuning half 0.958 -> 0.976) "
                "but the answers picked from them by that same score lost (quote: 0.713 -> 0.695 there), so it suits "
                "passages read whole: --retrieve-only, --context chunks with a larger --llm. 0: off (see README)."})
    year_weight: float = field(default=0.5, metadata={
        "help": "Weight, in the hybrid fusion, of a third ranking: the candidates from documents whose title (file "
                "name) names a year the question names, e.g. 'in 2024' and halvorsen_2024_annual_report.txt (0: off; "
                "0.5: best answer-in-top-4 on the long corpus's tuning half, 0.850 -> 0.904, see README)."})
    year_copies: Literal["last", "keep"] = field(default="last", metadata={
        "help": "hybrid, for a question that names a year: last puts after the rest a chunk of another year's report "
                "that names none of the question's years and repeats (word overlap >= 0.65, figures aside) a chunk "
                "ranked above it from the named year's report: 'NSFR at December 31, 2023?' is answered by the 2023 "
                "report, not by the 2024 and 2025 reports' copies of its glossary (long corpus's tuning half, "
                "answer-in-top-4 0.958 -> 0.976, see README); keep: the fused order."})
    abbreviations: bool = field(default=True, metadata={
        "help": "Search for an abbreviation in the question with its long form too (ROA: return on assets), from the "
                "documents' own definitions and a list of common finance ones (rag.abbreviations)."})
    unknown_names: Literal["decline", "answer"] = field(default="decline", metadata={
        "help": "decline: a question that names someone or something no indexed document mentions (a capitalised "
                "word other than the first, e.g. 'Halvorsen') is answered \"I don't know: the documents never "
                "mention Halvorsen.\" at once, without the LLM (hybrid and bm25 retrievers); answer: ask anyway."})
    min_support: float = field(default=1.0, metadata={
        "help": "Answer \"I don't know: the passages do not say.\" at once, without the LLM, when the retrieved "
                "passages' best sentence scores below this against the question (cosine + 2 x the share of the "
                "question's words it holds + 0.3 if it holds a figure: rag.context.score_units); 0: off. 1.0: the "
                "highest that declined none of the answerable questions of the three tuning halves (other corpora's "
                "questions declined: 0.643 with the name check alone, 0.743 with this; README)."})
    context: Literal["sentences", "chunks"] = field(default="sentences", metadata={
        "help": "sentences: the LLM reads only the retrieved chunks' sentences that best match the question, up to "
                "--context-tokens (best for small LLMs); chunks: the whole chunks."})
    context_tokens: int = field(default=40, metadata={
        "help": "--context sentences: token budget of the kept sentences; the best one is kept whatever its length "
                "(40: SmolLM2's best answer match on all three tuning halves among 30-160, see README; more for a "
                "larger --llm)."})
    answer: Literal["auto", "llm", "quote", "extractive"] = field(default="auto", metadata={
        "help": "quote: the LLM answers with one of the passages' sentences, word for word (it chooses which; a local "
                "--llm only); llm: the LLM writes the answer; auto: quote with a local --llm, llm with --llm-url "
                "(SmolLM2-135M's quotes held the expected figure for 0.65 of the tuning questions, its own words for "
                "0.44; a larger --llm may write better, see README); extractive: the best-matching sentence itself, "
                "no LLM (fast, never invents a figure)."})
    chunk_size: int = field(default=512, metadata={
        "help": "Chunk size in tokens of the embedder; capped at what the embedder reads (256 for MiniLM)."})
    chunk_overlap: int = field(default=50, metadata={"help": "Tokens shared by neighbouring chunks."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in LLM tokens."})
    temperature: float = field(default=0.0, metadata={"help": "0 decodes greedily (deterministic); above 0 samples."})
    persist_dir: Path = field(default=Path("chroma_db"), metadata={"help": "Folder of the Chroma index (created if missing)."})
    reindex: bool = field(default=False, metadata={"help": "Rebuild this collection from scratch."})
    strict: bool = field(default=False, metadata={
        "help": "Stop at a bad file inside a --file folder (default: skip it with a warning that lists it)."})
    chroma_url: str | None = field(default=None, metadata={
        "help": "Use the Chroma server at this URL (`chroma run`; behind a TLS proxy that checks a token) instead of "
                "--persist-dir; the BM25 index is cached in $TUNERAG_HOME/bm25/HOST_PORT.", "metavar": "URL"})
    chroma_header: list[str] = field(default_factory=list, metadata={
        "help": "'Name: value' HTTP header sent with every --chroma-url request (repeatable), e.g. the proxy's "
                "'Authorization: Bearer TOKEN'; a value written $VAR is read from the environment.", "metavar": "HEADER"})
    llm_url: str | None = field(default=None, metadata={
        "help": "Stream answers from this OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama; usually ending in /v1) "
                "instead of loading --llm here; its key, if any, from $TUNERAG_LLM_API_KEY.", "metavar": "URL"})
    llm_model: str | None = field(default=None, metadata={
        "help": "The model name at --llm-url (default: the only one it serves).", "metavar": "NAME"})
    json: bool = field(default=False, metadata={
        "help": 'Print {"query", "result", "citations", "evidence", "source_documents": [{"text", "source", "page", '
                '"chunk", "score", "found_by"}]}; see the README for each field.'})
    timings: bool = field(default=False, metadata={
        "help": "Print load, index, retrieve, first-token and total seconds to stderr."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling when --temperature > 0."})
    dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "Weights of the embedder and the LLM: auto on a CPU with bfloat16 matrix instructions (AMX, "
                "AVX512-BF16) embeds in bfloat16 and reads the prompt with a bfloat16 copy of the LLM (about 3x "
                "faster there), writing the answer in float32 (faster one token at a time); float32 elsewhere; "
                "float32 or bfloat16 forces one for both."})
    decode_threads: int = field(default=0, metadata={
        "help": "CPU threads while the LLM writes the answer (the prompt is always read with all of torch's threads); "
                "0 keeps torch's count."})
    lookup_tokens: int = field(default=10, metadata={
        "help": "Greedy answers: guess up to this many next tokens from what followed the answer's last two tokens "
                "in the prompt (prompt lookup) and check them in one forward pass; the answer is the same, written "
                "faster where it quotes the passages. 0 writes one token a step."})

    def __post_init__(self):
        self.file = [Path(p) for p in self.file]
        if not self.file:
            raise ValueError("give at least one --file")
        if self.question is not None and self.questions is not None:
            raise ValueError("pass either --question or --questions, not both")
        if self.k < 1 or self.fetch_k < 1:
            raise ValueError(f"--k and --fetch-k must be at least 1 (got {self.k}, {self.fetch_k})")
        if self.min_support < 0:
            raise ValueError(f"--min-support must be >= 0 (got {self.min_support}; 0 turns the check off)")
        if self.chunk_size < 8:
            raise ValueError(f"--chunk-size must be at least 8 tokens (got {self.chunk_size})")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(f"--chunk-overlap ({self.chunk_overlap}) must be >= 0 and < --chunk-size ({self.chunk_size})")
        weights = (self.bm25_weight, self.sentence_weight, self.rerank_weight, self.year_weight)
        if min(weights) < 0 or self.context_tokens < 16:
            raise ValueError(f"--bm25-weight, --sentence-weight, --rerank-weight and --year-weight must be >= 0 and "
                             f"--context-tokens >= 16 (got {self.bm25_weight}, {self.sentence_weight}, "
                             f"{self.rerank_weight}, {self.year_weight}, {self.context_tokens})")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (got {self.temperature})")
        if self.lookup_tokens < 0:
            raise ValueError(f"--lookup-tokens must be >= 0 (got {self.lookup_tokens})")
        self.persist_dir = Path(self.persist_dir)
        if self.answer == "auto":  # a server writes free text; a local LLM can be steered to quote
            self.answer = "llm" if self.llm_url is not None else "quote"
        self.check_servers()

    def check_servers(self) -> None:
        """--chroma-url, --chroma-header, --llm-url, --llm-model (see rag.remote): checked before anything loads."""
        from rag.remote import check_url, parse_headers

        if self.chroma_header and self.chroma_url is None:
            raise ValueError("--chroma-header is sent to a --chroma-url server; pass --chroma-url too")
        if self.llm_model is not None and self.llm_url is None:
            raise ValueError("--llm-model names a model of the --llm-url server; pass --llm-url too")
        if self.answer == "quote" and self.llm_url is not None:
            raise ValueError("--answer quote steers a local --llm token by token; a --llm-url server writes free text "
                             "(use --answer llm there)")
        self.chroma_url = check_url("--chroma-url", self.chroma_url) if self.chroma_url is not None else None
        self.llm_url = check_url("--llm-url", self.llm_url) if self.llm_url is not None else None
        parse_headers(self.chroma_header)


def rag_default(name: str) -> Any:
    """rag.cli's default for flag `name`: the commands and benchmarks that mirror its flags read it here."""
    return next(f.default for f in fields(RagConfig) if f.name == name)
