"""One config dataclass per `embeddings` command; the fields are the command's flags.

Defaults live only here. `__post_init__` checks values and names the flag, so a bad value is a
usage error (exit 2) before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunerag.models import MINILM, SMOLLM2


QUERY_STYLES = ("keyword", "dated", "definition")


@dataclass
class PrepareConfig:
    """Synthetic (query, passage) pairs from your documents, as train.json/val.json in the LlamaIndex
    EmbeddingQAFinetuneDataset layout. Example: python -m embeddings.prepare report.pdf docs/ --out pairs/"""

    docs: list[Path] = field(default_factory=list, metadata={
        "positional": True, "metavar": "DOCS",
        "help": "Documents: .txt, .md, .pdf, .html or .docx files, or folders of them (walked; a bad file "
                "found in a folder is skipped with a warning, see --strict)."})
    strict: bool = field(default=False, metadata={
        "help": "Stop at the first unreadable file found in a DOCS folder instead of skipping it (a bad file "
                "named on the command line always stops)."})
    out: Path = field(default=Path("pairs"), metadata={"help": "Folder for train.json, val.json and prepare_stats.json."})
    qa_file: Path | None = field(default=None, metadata={
        "help": "Use an existing Q/A set instead of DOCS: JSON, JSONL or CSV with question and answer "
                "columns; each distinct answer becomes a passage."})
    qa_dataset: str | None = field(default=None, metadata={
        "help": "Use a Q/A data set instead of DOCS, through datasets.load_dataset: a hub id (the reference "
                "project's input), a local data set folder, or a .parquet/.csv/.json/.jsonl file."})
    qa_split: str = field(default="train", metadata={"help": "--qa-dataset: the data set split to read."})
    question_column: str | None = field(default=None, metadata={
        "help": "--qa-dataset/--qa-file: the question column (default: the first of question, query, instruction)."})
    answer_column: str | None = field(default=None, metadata={
        "help": "--qa-dataset/--qa-file: the answer column (default: the first of answer, response, output)."})
    answer_template: str | None = field(default=None, metadata={
        "help": "--qa-dataset/--qa-file: compose the passage from several columns, e.g. '{topic} {message_2}' "
                "(overrides --answer-column)."})
    generator: Literal["llm", "ict"] = field(default="llm", metadata={
        "help": "llm: a local causal LM writes questions per chunk. ict: inverse cloze task, a sentence "
                "of the chunk is the query and the rest of the chunk the passage (no LLM, fast)."})
    questions_per_chunk: int = field(default=2, metadata={
        "help": "Queries per chunk: ICT sentences, or LLM questions (one prompt per picked sentence of the chunk)."})
    check_generator: Literal["same", "llm"] = field(default="same", metadata={
        "help": "Queries of val.json and heldout.json (the checkpoint choice and finetune's never-worse check): "
                "same: from --generator; llm: questions written by --llm even with --generator ict (ICT's "
                "sentence queries passed models that hurt hand-written questions; see the README)."})
    llm: str = field(default=SMOLLM2, metadata={
        "help": "LLM for --generator llm: a local folder (e.g. a merged model), a hub id, or the embedded 'smollm2'."})
    llm_dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "dtype of --llm while it writes questions: auto is bfloat16 on a CPU with bfloat16 matrix instructions "
                "(AMX/AVX512-BF16: 2.6x the prompts a second of float32 here, most questions word for word the same; "
                "README) and float32 elsewhere."})
    roundtrip_top_k: int = field(default=3, metadata={
        "help": "--generator llm: keep a training question only if --embedder ranks its own chunk in the top K "
                "training chunks (drops questions the chunk does not answer); 0: keep all. Validation questions "
                "are never filtered, so the base model is not favoured there."})
    drop_easy: bool = field(default=False, metadata={
        "help": "--generator llm with the round-trip filter: also drop a training question whose own chunk --embedder "
                "already ranks first (an easy pair, which teaches the fine-tune little)."})
    query_styles: list[str] = field(default_factory=list, metadata={
        "help": "--generator llm: extra training queries in the styles users type (repeatable; none, the default: "
                "only the LLM's questions): keyword (a kept question's words less question and function words: 'CET1 ratio end "
                "year'), dated (the question with the year of a document whose file name has one: 'What was the CET1 "
                "ratio at the end of 2024?'), definition ('What does Connected Group mean?' for a chunk's sentence "
                "that defines a quoted term). val.json and heldout.json keep the LLM's questions. Off by default: "
                "measured in the README.",
        "choices": [*QUERY_STYLES, "none"]})
    embedder: str = field(default=MINILM, metadata={
        "help": "Embedder whose tokenizer and max_seq_length size the chunks (the model you will fine-tune)."})
    chunk_tokens: int = field(default=128, metadata={
        "help": "Chunk size in embedder tokens; capped so a chunk never exceeds what the embedder reads."})
    chunk_overlap: int = field(default=32, metadata={"help": "Tokens of whole sentences repeated between neighbouring chunks."})
    drop_pattern: list[str] = field(default_factory=list, metadata={
        "help": "Regex; a line that matches is removed before chunking (disclaimers, page headers). Repeatable."})
    split: Literal["auto", "document", "position"] = field(default="auto", metadata={
        "help": "How train/val are separated: by document, or by position in the text (the last part is val). "
                "auto: by document when there are 2+ documents, else by position."})
    val_fraction: float = field(default=0.2, metadata={"help": "Share of documents (or of the text) used for validation."})
    heldout_fraction: float = field(default=0.15, metadata={
        "help": "Share of each training document's text, cut from its end, whose questions go to heldout.json: text "
                "in neither train nor val, on which embeddings.finetune checks that the tuned model beats the base "
                "(0: none)."})
    max_chunks: int = field(default=0, metadata={
        "help": "Use only the first N chunks of each side (0: all); to bound LLM generation time."})
    batch_size: int = field(default=8, metadata={"help": "Prompts (one per question) per LLM generation batch."})
    max_new_tokens: int = field(default=48, metadata={"help": "LLM tokens generated per question (a question is about 20)."})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy decoding; >0: sampling seeded by --seed."})
    cache: Path | None = field(default=None, metadata={
        "help": "JSONL cache of generated questions (resumes interrupted runs); "
                "default $TUNERAG_HOME/embeddings/question_cache.jsonl."})
    seed: int = field(default=42, metadata={"help": "Seed for ICT sentence choice, LLM sampling and the document split."})

    def __post_init__(self):
        self.docs = [Path(p) for p in self.docs]
        self.out = Path(self.out)
        sources = [bool(self.docs), self.qa_file is not None, self.qa_dataset is not None]
        if sum(sources) != 1:
            raise ValueError("pass exactly one of DOCS (files or folders), --qa-file or --qa-dataset")
        if self.answer_template is not None:
            import string

            try:
                fields = [name for _, name, _, _ in string.Formatter().parse(self.answer_template) if name]
            except ValueError as e:
                raise ValueError(f"--answer-template {self.answer_template!r}: {e}") from None
            if not fields:
                raise ValueError(f"--answer-template {self.answer_template!r} names no column; e.g. '{{topic}} {{message_2}}'")
        if self.questions_per_chunk < 1:
            raise ValueError(f"--questions-per-chunk ({self.questions_per_chunk}) must be >= 1")
        if self.chunk_tokens < 16:
            raise ValueError(f"--chunk-tokens ({self.chunk_tokens}) must be >= 16")
        if not 0 <= self.chunk_overlap < self.chunk_tokens // 2:
            raise ValueError(f"--chunk-overlap ({self.chunk_overlap}) must be >= 0 and < half of --chunk-tokens ({self.chunk_tokens})")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction ({self.val_fraction}) must be between 0 and 1")
        if not 0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"--heldout-fraction ({self.heldout_fraction}) must be in [0, 0.5)")
        if "none" in self.query_styles:
            if len(self.query_styles) > 1:
                raise ValueError("--query-styles none cannot go with other styles")
            self.query_styles = []
        if self.query_styles and (self.generator != "llm" or not self.docs):
            raise ValueError("--query-styles adds to the questions --generator llm writes from DOCS")
        if self.roundtrip_top_k < 0:
            raise ValueError(f"--roundtrip-top-k ({self.roundtrip_top_k}) must be >= 0")
        if self.batch_size < 1 or self.max_new_tokens < 8 or self.max_chunks < 0 or self.temperature < 0:
            raise ValueError("--batch-size must be >= 1, --max-new-tokens >= 8, --max-chunks >= 0, --temperature >= 0")
        import re

        for pattern in self.drop_pattern:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"--drop-pattern {pattern!r} is not a valid regex ({e})") from None


@dataclass
class FinetuneConfig:
    """Fine-tune a sentence-transformers model on train.json with in-batch negatives, keeping the
    checkpoint with the best validation NDCG@10. Example:
    python -m embeddings.finetune --train pairs/train.json --val pairs/val.json --model minilm --out models/emb-tuned"""

    train: Path = field(metadata={"help": "train.json from embeddings.prepare (or LlamaIndex generate_qa_embedding_pairs)."})
    val: Path = field(metadata={"help": "val.json, same layout; scored every --eval-steps and picks the best checkpoint."})
    heldout: Path | None = field(default=None, metadata={
        "help": "heldout.json (default: the one beside --train, if any): text trained on by neither side; the best "
                "checkpoint is kept only if it beats the base on --val and here beyond noise, else the base is."})
    require_gain: bool = field(default=False, metadata={
        "help": "Exit with an error (and write no model) when the fine-tune does not beat the base; the scores go "
                "to OUT.scores.json beside --out."})
    model: str = field(default=MINILM, metadata={"help": "Base embedder: a local folder, a hub id, or the embedded 'minilm'."})
    out: Path = field(default=Path("models/emb-tuned"), metadata={"help": "Folder for the tuned model (SentenceTransformer(out) loads it)."})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per batch; every other passage in the batch is a negative."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (linear decay)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps spent warming up the learning rate."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate on --val every N steps (0: once per epoch)."})
    hard_negatives: int = field(default=0, metadata={
        "help": "Hard negatives per pair mined with the base model (sentence_transformers.util.mine_hard_negatives); 0: off."})
    cached_loss: bool = field(default=False, metadata={
        "help": "CachedMultipleNegativesRankingLoss: large batches in constant memory (GradCache)."})
    mini_batch_size: int = field(default=16, metadata={"help": "Mini-batch of --cached-loss."})
    matryoshka_dims: list[int] = field(default_factory=list, metadata={
        "help": "Wrap the loss in MatryoshkaLoss with these dimensions (repeatable, e.g. --matryoshka-dims 384 "
                "--matryoshka-dims 128); empty: off."})
    dtype: str = field(default="auto", metadata={
        "help": "Training step precision: auto (bfloat16 autocast on a CPU with bfloat16 matrix instructions, "
                "float32 elsewhere and on CUDA), float32, or bfloat16 (autocast; the weights stay float32)."})
    seed: int = field(default=42, metadata={"help": "Seed for shuffling and initialisation."})

    def __post_init__(self):
        self.train, self.val, self.out = Path(self.train), Path(self.val), Path(self.out)
        if self.heldout is None and (self.train.parent / "heldout.json").is_file():
            self.heldout = self.train.parent / "heldout.json"
        self.heldout = Path(self.heldout) if self.heldout is not None else None
        if self.epochs <= 0 or self.batch_size < 2 or self.learning_rate <= 0:
            raise ValueError(f"--epochs ({self.epochs}) and --learning-rate ({self.learning_rate}) must be > 0 "
                             f"and --batch-size ({self.batch_size}) >= 2 (in-batch negatives need 2)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio ({self.warmup_ratio}) must be in [0, 1)")
        if self.eval_steps < 0 or self.hard_negatives < 0 or self.mini_batch_size < 1:
            raise ValueError("--eval-steps and --hard-negatives must be >= 0, --mini-batch-size >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16")
        if any(d < 1 for d in self.matryoshka_dims):
            raise ValueError(f"--matryoshka-dims ({self.matryoshka_dims}) must be positive")


@dataclass
class EvaluateConfig:
    """Retrieval metrics (accuracy@k, MRR@10, NDCG@10, MAP@100; cosine) of one or more embedders on a
    pairs file, side by side. Example: python -m embeddings.evaluate --data pairs/val.json --model minilm --model models/emb-tuned"""

    data: Path = field(metadata={"help": "A pairs file (queries, corpus, relevant_docs), e.g. val.json."})
    model: list[str] = field(default_factory=lambda: [MINILM], metadata={
        "help": "Embedder to score: a local folder, a hub id, or 'minilm'. Repeatable."})
    json: bool = field(default=False, metadata={"help": "Print the metrics as one JSON object on stdout (the table goes to stderr)."})
    batch_size: int = field(default=32, metadata={"help": "Encoding batch size."})

    def __post_init__(self):
        self.data = Path(self.data)
        if not self.model:
            raise ValueError("pass at least one --model")
        if len(set(self.model)) != len(self.model):
            raise ValueError(f"--model given twice: {self.model}")
