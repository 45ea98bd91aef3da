"""Synthetic (query, passage) pairs from your documents, split train/val, in the LlamaIndex layout.

    python -m embeddings.prepare data/finance_report.txt --out pairs/                  # SmolLM2 writes questions
    python -m embeddings.prepare docs/ --generator ict --out pairs/                     # no LLM: inverse cloze task
    python -m embeddings.prepare --qa-file faq.csv --out pairs/                         # an existing Q/A set
    python -m embeddings.prepare --qa-dataset ID --answer-template "{topic} {message_2}" --out pairs/  # a hub data set

Documents are cleaned (whitespace collapsed, --drop-pattern lines removed), cut into sentences and
packed into chunks that fit the embedder's tokenizer (all-MiniLM-L6-v2 reads 256 tokens; more is
silently truncated), then each chunk gets queries. Train and val never share a chunk: with 2+
documents whole documents go to val, with one document the last part of the text does.
The LLM writes one question per prompt, a prompt per picked sentence of a chunk; its outputs are
cached per prompt (JSONL, one line each), so a rerun resumes; the batches are fixed by prompt order,
so a resumed run writes what an uninterrupted one would. Training questions whose chunk the base
embedder does not rank in its top K are dropped (--roundtrip-top-k).
Each training document's last --heldout-fraction of text gets questions too, written to heldout.json:
text in neither train nor val, on which embeddings.finetune checks that the tuned model beats the base.
Writes train.json, val.json, heldout.json and prepare_stats.json into a temp folder beside --out and swaps it in
whole: --out holds either the complete new set or the previous one. prepare_stats.json describes the
data only (the same inputs give the same bytes; scripts/pipeline.py hashes the folder); timings and
cache hits go to the log and to the dict main() returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from embeddings.config import PrepareConfig
from embeddings.data import (
    Chunk,
    Pairs,
    chunk_sentences,
    clean_text,
    definition_queries,
    document_year,
    ict_pairs,
    normalise_question,
    parse_questions,
    pick_sentences,
    plain_question_prompt,
    qa_pairs,
    qa_to_pairs,
    question_contexts,
    question_messages,
    read_qa_file,
    split_by_position,
    split_documents,
    split_sentences,
    stable_rng,
    styled_queries,
)
from tunerag.common import (
    TuneragError,
    first_line,
    replace_folder,
    run_cli,
    temp_folder,
    tunerag_home,
    write_json_atomic,
)
from tunerag.documents import read_documents

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- chunks

def embedder_token_counter(spec: str, chunk_tokens: int):
    """(count_tokens, chunk limit): the embedder's own tokenizer, and `chunk_tokens` capped at its
    max_seq_length minus the special tokens it adds ([CLS] and [SEP] for MiniLM)."""
    from tunerag.models import load_embedder

    model = load_embedder(spec, device="cpu")
    tokenizer = model.tokenizer
    specials = len(tokenizer("")["input_ids"])
    limit = min(chunk_tokens, model.max_seq_length - specials)
    if limit < chunk_tokens:
        logger.warning("--chunk-tokens %d is more than %s reads (%d tokens incl. %d special); using %d",
                       chunk_tokens, spec, model.max_seq_length, specials, limit)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count_tokens, limit


def document_chunks(cfg: PrepareConfig) -> tuple[list[Chunk], list[Chunk], list[Chunk], dict]:
    """(train, val, heldout chunks, stats) for the documents in cfg.docs. In each document the text runs
    train | heldout | val (by position), or train | heldout with whole documents as val."""
    documents, skipped = read_documents(cfg.docs, cfg.strict)  # before the embedder loads: bad input fails fast
    paths = [p for p, _ in documents]
    count_tokens, limit = embedder_token_counter(cfg.embedder, cfg.chunk_tokens)
    overlap = min(cfg.chunk_overlap, limit // 2 - 1)
    names = {}
    for p in paths:  # short ids; the full path only where two documents share a file name
        names[p] = p.name if sum(q.name == p.name for q in paths) == 1 else str(p)
    sentences, dropped_lines, empty = {}, 0, []
    for p, text in documents:
        lines, dropped = clean_text(text, cfg.drop_pattern)
        dropped_lines += dropped
        sents = split_sentences(lines)
        if sents:
            sentences[names[p]] = sents
        else:
            empty.append(names[p])
    if empty:
        logger.warning("%d document(s) had no text left after --drop-pattern: %s", len(empty), ", ".join(empty[:5]))
    if not sentences:
        raise TuneragError("no text left in the documents after cleaning; check --drop-pattern")
    split = cfg.split if cfg.split != "auto" else ("document" if len(sentences) > 1 else "position")
    train, val, heldout = [], [], []

    def add_training_text(sents: list[str], doc: str) -> None:
        nonlocal train, heldout
        if cfg.heldout_fraction and len(sents) >= 2:
            sents, tail = split_by_position(sents, count_tokens, cfg.heldout_fraction)
            heldout += chunk_sentences(tail, count_tokens, limit, overlap, f"{doc}:heldout")
        train += chunk_sentences(sents, count_tokens, limit, overlap, f"{doc}:train" if split == "position" else doc)

    if split == "document":
        if len(sentences) < 2:
            raise TuneragError("--split document needs at least 2 documents with text; use --split position")
        train_docs, val_docs = split_documents(list(sentences), cfg.val_fraction, cfg.seed)
        for doc in train_docs:
            add_training_text(sentences[doc], doc)
        for doc in val_docs:
            val += chunk_sentences(sentences[doc], count_tokens, limit, overlap, doc)
    else:
        for doc, sents in sentences.items():
            if len(sents) < 2:
                logger.warning("%s has a single sentence; it goes to train only", doc)
                train += chunk_sentences(sents, count_tokens, limit, overlap, f"{doc}:train")
                continue
            head, tail = split_by_position(sents, count_tokens, cfg.val_fraction)
            add_training_text(head, doc)
            val += chunk_sentences(tail, count_tokens, limit, overlap, f"{doc}:val")
    if cfg.max_chunks:
        train, val, heldout = train[: cfg.max_chunks], val[: cfg.max_chunks], heldout[: cfg.max_chunks]
    if not val:
        raise TuneragError("the validation side is empty; add documents or raise --val-fraction")
    stats = {"documents": len(paths), "documents_skipped": [str(p) for p, _ in skipped], "split": split, "chunk_tokens": limit, "chunk_overlap": overlap,
             "lines_dropped_by_pattern": dropped_lines, "documents_without_text": len(empty),
             "max_chunk_tokens": max(count_tokens(c.text) for c in train + val)}
    return train, val, heldout, stats


# --------------------------------------------------------------------------- queries

def ict_queries(chunks: list[Chunk], cfg: PrepareConfig) -> dict[str, tuple[list[str], str]]:
    return {c.id: ict_pairs(c, cfg.questions_per_chunk, cfg.seed) for c in chunks}


class QuestionCache:
    """Raw LLM outputs by key, in a JSONL file that grows by one flushed line per finished chunk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.outputs: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.outputs[row["key"]] = row["output"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by an interrupted run: that chunk is generated again

    def add(self, rows: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for key, output in rows.items():
                f.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")
            f.flush()
        self.outputs.update(rows)


def generation_batches(keys: list[str], cached: set[str], batch_size: int) -> list[list[int]]:
    """Indices of the batches to generate: the full list cut in order into `batch_size` batches, less
    those fully cached. Batched greedy decoding with left padding is not batch-invariant (a row's
    output can change with its batch-mates), so batches never depend on what is cached."""
    batches = [list(range(b, min(b + batch_size, len(keys)))) for b in range(0, len(keys), batch_size)]
    return [batch for batch in batches if any(keys[i] not in cached for i in batch)]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return plain_question_prompt(messages)  # a base model without a chat template


def write_questions(contexts: list[str], cfg: PrepareConfig) -> tuple[list[list[str]], dict]:
    """One question (or none, when the output does not parse) per context, written by cfg.llm: prompts
    generated in batches and cached per prompt, so a rerun resumes. Returns the questions per context
    and the generation stats."""
    import torch
    from tqdm.auto import tqdm

    from tunerag.models import load_llm, model_identity, pick_dtype, resolve_llm

    resolved = resolve_llm(cfg.llm)
    dtype = pick_dtype(cfg.llm_dtype) or "float32"  # float32 on a CUDA box, as before
    model, tokenizer = load_llm(cfg.llm, dtype=getattr(torch, dtype))
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every row ends where generation starts
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint = model_identity(resolved)  # retraining into the same folder invalidates the cache
    # a bfloat16 model writes other words now and then: its own cache entries (float32's keys are unchanged)
    settings = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "seed": cfg.seed if cfg.temperature > 0 else None}
    settings = json.dumps(settings | ({"dtype": dtype} if dtype != "float32" else {}))
    prompts = [render_prompt(tokenizer, question_messages(context, cfg.seed)) for context in contexts]
    keys = [hashlib.sha256("\x1f".join([fingerprint, prompt, settings]).encode()).hexdigest() for prompt in prompts]
    cache = QuestionCache(cfg.cache or tunerag_home() / "embeddings" / "question_cache.jsonl")
    batches = generation_batches(keys, set(cache.outputs), cfg.batch_size)
    todo = [i for batch in batches for i in batch]
    new = sum(k not in cache.outputs for k in keys)
    prompt_tokens = sum(len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"]) for i in todo)
    logger.info("LLM questions: %d prompts, %d cached, %d to generate (%d batches of up to %d, incl. %d "
                "cached prompts that share a batch with new ones) with %s in %s: about %d prompt tokens + up to %d new "
                "tokens (cache: %s)", len(keys), len(keys) - new, len(todo), len(batches), cfg.batch_size,
                len(todo) - new, cfg.llm, dtype, prompt_tokens, len(todo) * cfg.max_new_tokens, cache.path)

    def generate(batch: list[int]) -> None:
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        if cfg.temperature > 0:  # seeded by the batch's content, so a resumed run draws the same
            torch.manual_seed(stable_rng(cfg.seed, *(keys[i] for i in batch)).getrandbits(63))
        with torch.inference_mode():
            generated = model.generate(
                **enc, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                temperature=cfg.temperature if cfg.temperature > 0 else None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        cache.add({keys[i]: t for i, t in zip(batch, texts) if keys[i] not in cache.outputs})

    # The second batch, timed, gives the estimate before the long loop starts: the first also pays for
    # building the kernels (3.5 s against 1.9 s for 8 prompts in bfloat16 here: an estimate 1.7x too long).
    started = time.perf_counter()
    timed = batches[:2]
    if timed:
        logger.info("timing the first %d batch(es) (%d prompts)...", len(timed), sum(map(len, timed)))
        seconds = []
        for batch in timed:
            t = time.perf_counter()
            generate(batch)
            seconds.append(time.perf_counter() - t)
        logger.info("first batch: %.1f s%s; estimate %.0f s for the other %d batches (rough: a batch whose rows all "
                    "end early is faster, a longer prompt slower)", seconds[0],
                    f" (warm-up), second {seconds[-1]:.1f} s" if len(seconds) > 1 else "",
                    seconds[-1] * (len(batches) - len(timed)), len(batches) - len(timed))
    with tqdm(total=len(todo), initial=sum(map(len, timed)), desc="generating questions", unit="prompt",
              disable=len(batches) <= len(timed)) as bar:
        for batch in batches[len(timed):]:
            generate(batch)
            bar.update(len(batch))
    totals = {"kept": 0, "not_question": 0, "too_short": 0, "duplicate": 0, "extra": 0}
    questions = []
    for key in keys:
        parsed, counts = parse_questions(cache.outputs[key], 1)
        for k, v in counts.items():
            totals[k] += v
        questions.append(parsed)
    stats = {"prompts": len(keys), "generated": len(todo), "from_cache": len(keys) - len(todo),
             "generation_seconds": round(time.perf_counter() - started, 1), "parsed": totals}
    logger.info("generated %d prompts in %.1f s", len(todo), stats["generation_seconds"])
    return questions, stats


def llm_queries(chunks: list[Chunk], cfg: PrepareConfig) -> tuple[dict[str, tuple[list[str], str]], dict]:
    """Questions for each chunk from cfg.llm: one prompt per picked sentence (`question_contexts`);
    the passage is the whole chunk."""
    owners, contexts = [], []  # one entry per prompt, in chunk order
    for c in chunks:
        for context in question_contexts(c, cfg.questions_per_chunk, cfg.seed):
            owners.append(c)
            contexts.append(context)
    written, stats = write_questions(contexts, cfg)
    questions: dict[str, list[str]] = {c.id: [] for c in chunks}
    for owner, parsed in zip(owners, written):
        if parsed and normalise_question(parsed[0]) in map(normalise_question, questions[owner.id]):
            stats["parsed"]["kept"] -= 1  # two sentences of one chunk gave the same question
            stats["parsed"]["duplicate"] += 1
            continue
        questions[owner.id] += parsed
    return {c.id: (questions[c.id], c.text) for c in chunks}, stats


def sentence_questions(chunks: list[Chunk], cfg: PrepareConfig) -> tuple[list[tuple[Chunk, str, str]], dict]:
    """(chunk, sentence, question) for up to cfg.questions_per_chunk picked sentences of each chunk:
    cfg.llm writes a question about the sentence (read with the one before it), so the sentence is
    the question's evidence. Sentences whose output did not parse as a question are left out (counted
    in the stats)."""
    picked = [(c, i) for c in chunks for i in pick_sentences(c, cfg.questions_per_chunk, cfg.seed)]
    contexts = [" ".join(c.sentences[max(0, i - 1): i + 1]) for c, i in picked]
    written, stats = write_questions(contexts, cfg)
    return [(c, c.sentences[i], parsed[0]) for (c, i), parsed in zip(picked, written) if parsed], stats


def roundtrip_filter(queries: dict[str, tuple[list[str], str]], chunks: list[Chunk], embedder: str,
                     top_k: int, drop_first: bool = False) -> tuple[dict[str, tuple[list[str], str]], int]:
    """(queries, dropped): keep a question only if `embedder` ranks its own chunk in the top `top_k`
    of `chunks` (round-trip consistency, as in Promptagator): drops questions that the chunk does
    not answer or that fit any chunk; `drop_first`: and those whose chunk it ranks first (easy pairs).
    Needs more than `top_k` chunks; else nothing is dropped."""
    from sentence_transformers.util import semantic_search

    from tunerag.models import load_embedder

    flat = [(c.id, q) for c in chunks for q in queries[c.id][0]]
    if not flat or len(chunks) <= top_k:
        return queries, 0
    model = load_embedder(embedder)
    corpus = model.encode([c.text for c in chunks], convert_to_tensor=True, normalize_embeddings=True,
                          show_progress_bar=False)
    asked = model.encode([q for _, q in flat], convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    hits = semantic_search(asked, corpus, top_k=top_k)
    ids = [c.id for c in chunks]
    kept = {c.id: [] for c in chunks}
    for (cid, question), top in zip(flat, hits):
        if cid in {ids[h["corpus_id"]] for h in top} and not (drop_first and ids[top[0]["corpus_id"]] == cid):
            kept[cid].append(question)
    out = queries | {cid: (qs, queries[cid][1]) for cid, qs in kept.items()}
    return out, len(flat) - sum(map(len, kept.values()))


def add_query_styles(queries: dict[str, tuple[list[str], str]], chunks: list[Chunk],
                     styles: list[str]) -> tuple[dict[str, tuple[list[str], str]], int]:
    """(queries, variants added): each of `chunks`' questions followed by its `styles` variants
    (embeddings.data.styled_queries; "dated" takes the year from the chunk's file name), then, with
    "definition", what is asked of the terms its own sentences define."""
    out, added = dict(queries), 0
    for c in chunks:
        questions, passage = queries[c.id]
        styled = styled_queries(questions, styles, document_year(c.doc))
        if "definition" in styles:
            styled += [q for i in c.own for q in definition_queries(c.sentences[i]) if q not in styled]
        added += len(styled) - len(questions)
        out[c.id] = (styled, passage)
    return out, added


# --------------------------------------------------------------------------- main

def build_pairs(chunks: list[Chunk], queries: dict[str, tuple[list[str], str]]) -> tuple[Pairs, int]:
    """(pairs, chunks that gave no query); such chunks still join the corpus as distractors."""
    pairs, empty = Pairs(), 0
    for c in chunks:
        qs, passage = queries[c.id]
        empty += not qs
        pairs.add(c.id, passage, qs)
    return pairs, empty


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


OUTPUTS = ("train.json", "val.json", "heldout.json", "prepare_stats.json")

# Run facts, not data facts: they differ between a fresh and a resumed run of the same inputs.
RUN_ONLY = {"seconds", "generated", "from_cache", "generation_seconds"}


def data_stats(stats: dict) -> dict:
    """`stats` less RUN_ONLY keys (at any depth): what prepare_stats.json holds."""
    return {k: data_stats(v) if isinstance(v, dict) else v for k, v in stats.items() if k not in RUN_ONLY}


@contextmanager
def staging_folder(out: Path):
    """A temp folder beside `out`, made before the long work so a bad --out fails at once (what killed
    runs left there is removed first); on leaving without an error it replaces `out` whole."""
    if out.exists() and not out.is_dir():
        raise TuneragError(f"--out {str(out)!r} is a file; pass a folder")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= set(OUTPUTS):
        raise TuneragError(f"--out {str(out)!r} holds files other than {', '.join(OUTPUTS)}; pick a new or empty "
                           "folder (it is replaced whole)")
    try:
        stage = temp_folder(out)
    except OSError as e:
        raise TuneragError(f"cannot write --out {str(out)!r}: {e.strerror or e}") from None
    try:
        yield stage
        try:
            replace_folder(stage, out)
        except OSError as e:
            raise TuneragError(f"cannot replace --out {str(out)!r}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def main(cfg: PrepareConfig) -> dict:
    logger.info("prepare: %s", config_dict(cfg))
    started = time.perf_counter()
    with staging_folder(cfg.out) as stage:
        stats, train, val, heldout = make_pairs(cfg)
        try:
            write_json_atomic(stage / "train.json", train.to_json())
            write_json_atomic(stage / "val.json", val.to_json())
            if heldout is not None and heldout.queries:
                write_json_atomic(stage / "heldout.json", heldout.to_json())
            write_json_atomic(stage / "prepare_stats.json", data_stats(stats))
        except OSError as e:
            raise TuneragError(f"cannot write --out {str(cfg.out)!r}: {e.strerror or e}") from None
    stats["seconds"] = round(time.perf_counter() - started, 1)
    logger.info("wrote %s (%d queries, %d passages) and %s (%d queries, %d passages) in %.1f s", cfg.out / "train.json",
                len(train.queries), len(train.corpus), cfg.out / "val.json", len(val.queries), len(val.corpus),
                stats["seconds"])
    return stats


DATASET_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_qa_dataset(spec: str, split: str) -> list[dict]:
    """The rows of a Q/A data set: a local file or folder, or a hub id, through `datasets`."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from tunerag.models import hub_offline

    datasets.disable_progress_bars()  # a local read is instant; a download is the hub's business
    path = Path(spec).expanduser()
    instead = "pass a local data set folder (datasets' save_to_disk or parquet/csv/json files), a .parquet/.csv/.json file, or --qa-file"
    try:
        if path.is_file():
            builder = DATASET_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise TuneragError(f"--qa-dataset {spec!r}: unsupported file type {path.suffix!r}; use "
                                   f"{', '.join(DATASET_FILE_BUILDERS)}")
            data = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise TuneragError(f"--qa-dataset {spec!r} has no split {split!r} (--qa-split); it has {', '.join(data)}")
                data = data[split]
        elif path.exists() or spec.startswith((".", "/", "~")):
            if not path.exists():
                raise TuneragError(f"--qa-dataset {spec!r} does not exist; {instead}")
            data = datasets.load_dataset(str(path), split=split)
        else:
            data = datasets.load_dataset(spec, split=split)
    except TuneragError:
        raise
    except (DatasetNotFoundError, ConnectionError, FileNotFoundError) as e:
        why = ("it is not in the local cache and the hub is unreachable (HF_HUB_OFFLINE=1)" if hub_offline()
               else f"it could not be loaded ({first_line(e)})")
        raise TuneragError(f"--qa-dataset {spec!r}: {why}; {instead}") from None
    except ValueError as e:  # e.g. an unknown split
        raise TuneragError(f"--qa-dataset {spec!r}: {first_line(e)}") from None
    return data.to_list()


def make_pairs(cfg: PrepareConfig) -> tuple[dict, Pairs, Pairs, Pairs | None]:
    """(stats, train pairs, val pairs, heldout pairs or None) from cfg.qa_file, cfg.qa_dataset or cfg.docs.
    A Q/A set has no held-out text: its heldout is None."""
    columns = {"question_column": cfg.question_column, "answer_column": cfg.answer_column,
               "answer_template": cfg.answer_template}
    if cfg.qa_file is not None or cfg.qa_dataset is not None:
        if cfg.qa_file is not None:
            source, qa, skipped = "qa_file", *read_qa_file(cfg.qa_file, **columns)
        else:
            records = load_qa_dataset(cfg.qa_dataset, cfg.qa_split)
            qa = qa_pairs(records, f"--qa-dataset {cfg.qa_dataset!r}", **columns)
            source, skipped = "qa_dataset", len(records) - len(qa)
        if skipped:
            logger.warning("%d record(s) of %s skipped: empty question or answer", skipped, cfg.qa_file or cfg.qa_dataset)
        train, val = qa_to_pairs(qa, cfg.val_fraction, cfg.seed)
        heldout = None
        stats = {"source": source, "records": len(qa) + skipped, "records_skipped": skipped}
    else:
        train_chunks, val_chunks, heldout_chunks, stats = document_chunks(cfg)
        chunks = train_chunks + val_chunks + heldout_chunks
        logger.info("%d chunks (%d train, %d val, %d held out), at most %d tokens each (split by %s)", len(chunks),
                    len(train_chunks), len(val_chunks), len(heldout_chunks), stats["max_chunk_tokens"], stats["split"])
        if cfg.generator == "ict":
            queries = ict_queries(chunks, cfg)
            if cfg.check_generator == "llm":  # question-shaped queries where the model is checked
                checks, stats["llm"] = llm_queries(val_chunks + heldout_chunks, cfg)
                queries.update(checks)
            else:
                logger.info("note: val.json and heldout.json hold ICT sentences, so finetune checks the model against "
                            "sentences, not questions; --check-generator llm checks it with the LLM's questions")
        else:
            queries, stats["llm"] = llm_queries(chunks, cfg)
            parsed = stats["llm"]["parsed"]
            dropped = sum(v for k, v in parsed.items() if k != "kept")
            logger.info("parsed %d questions from %d chunks; dropped %d lines (%s)", parsed["kept"], len(chunks),
                        dropped, ", ".join(f"{k} {v}" for k, v in parsed.items() if k != "kept"))
            if cfg.roundtrip_top_k:
                queries, stats["llm"]["roundtrip_dropped"] = roundtrip_filter(
                    queries, train_chunks, cfg.embedder, cfg.roundtrip_top_k, cfg.drop_easy)
                logger.info("round-trip filter: dropped %d of %d training questions whose chunk %s does not rank in "
                            "the top %d%s", stats["llm"]["roundtrip_dropped"],
                            sum(len(queries[c.id][0]) for c in train_chunks) + stats["llm"]["roundtrip_dropped"],
                            cfg.embedder, cfg.roundtrip_top_k, " or ranks first (--drop-easy)" if cfg.drop_easy else "")
            if cfg.query_styles:  # after the filter: a variant stands or falls with its question
                queries, stats["llm"]["styled_added"] = add_query_styles(queries, train_chunks, cfg.query_styles)
                logger.info("query styles %s: %d training queries added", "+".join(cfg.query_styles),
                            stats["llm"]["styled_added"])
        train, empty_train = build_pairs(train_chunks, queries)
        val, empty_val = build_pairs(val_chunks, queries)
        heldout, empty_heldout = build_pairs(heldout_chunks, queries)
        empty = empty_train + empty_val + empty_heldout
        stats.update(source="documents", generator=cfg.generator, chunks_train=len(train_chunks),
                     chunks_val=len(val_chunks), chunks_heldout=len(heldout_chunks), chunks_without_query=empty,
                     heldout_queries=len(heldout.queries))
        if empty:
            logger.warning("%d of %d chunks gave no usable query (kept in the corpus as distractors)", empty, len(chunks))
    if not train.queries or not val.queries:
        side = "train" if not train.queries else "val"
        raise TuneragError(f"no usable queries on the {side} side (see the counts above); "
                           "try --generator ict, another --llm, or more documents")
    stats.update(train_queries=len(train.queries), train_passages=len(train.corpus),
                 val_queries=len(val.queries), val_passages=len(val.corpus), config=config_dict(cfg))
    return stats, train, val, heldout


if __name__ == "__main__":
    run_cli(main, PrepareConfig)
