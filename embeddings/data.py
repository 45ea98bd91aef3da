"""Pure data transforms for `embeddings`: cleaning, chunking, ICT pairs, question parsing, splits, and
the LlamaIndex `EmbeddingQAFinetuneDataset` layout. Nothing here builds a model; I/O is limited to
the two small file readers at the end (`load_pairs`, `read_qa_file`), which turn bad files into one line.

The pairs layout (what LlamaIndex's `generate_qa_embedding_pairs` writes and reads):
    {"queries": {qid: text}, "corpus": {cid: text}, "relevant_docs": {qid: [cid, ...]}, "mode": "text"}
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunerag.common import TuneragError, stable_rng


class PairsError(TuneragError):
    """A pairs or Q/A file that cannot be used."""


# --------------------------------------------------------------------------- cleaning and chunking

def clean_text(text: str, drop_patterns: list[str] = ()) -> tuple[list[str], int]:
    """(paragraph lines with whitespace collapsed, number of lines dropped by `drop_patterns`)."""
    compiled = [re.compile(p) for p in drop_patterns]
    lines, dropped = [], 0
    for line in text.splitlines():
        if compiled and any(p.search(line) for p in compiled):
            dropped += 1
            continue
        line = " ".join(line.split())
        if line:
            lines.append(line)
    return lines, dropped


# A sentence ends at . ! ? (optionally closed by a quote or bracket) before whitespace and a capital,
# digit, quote or bracket; "$8.64 billion" and "U.S. dollars" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[$])")


def split_sentences(lines: list[str]) -> list[str]:
    """Sentences of cleaned lines; a line (a heading, a list item) never runs into the next one."""
    return [s.strip() for line in lines for s in _SENTENCE_END.split(line) if s.strip()]


def split_long(sentence: str, count_tokens: Callable[[str], int], limit: int) -> list[str]:
    """Pieces of a sentence longer than `limit` tokens, cut at word boundaries."""
    words, pieces, current = sentence.split(), [], []
    for word in words:
        if current and count_tokens(" ".join(current + [word])) > limit:
            pieces.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        pieces.append(" ".join(current))
    return pieces


@dataclass
class Chunk:
    doc: str            # the document it came from (for the split by document)
    index: int          # position within the document
    text: str
    sentences: list[str] = field(default_factory=list)
    own: list[int] = field(default_factory=list)  # indices into `sentences` not shared with a neighbour chunk

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}"


def chunk_sentences(sentences: list[str], count_tokens: Callable[[str], int], chunk_tokens: int,
                    overlap_tokens: int, doc: str = "doc") -> list[Chunk]:
    """Pack whole sentences into chunks of at most `chunk_tokens` tokens (as `count_tokens` counts
    them, without special tokens), repeating up to `overlap_tokens` tokens of trailing sentences
    at the start of the next chunk. Sentences longer than a chunk are cut at word boundaries."""
    units: list[str] = []
    for s in sentences:
        units += [s] if count_tokens(s) <= chunk_tokens else split_long(s, count_tokens, chunk_tokens)
    sizes = [count_tokens(u) for u in units]
    spans: list[tuple[int, int]] = []  # [start, end) unit indices
    start = 0
    while start < len(units):
        end, total = start, 0
        while end < len(units) and total + sizes[end] <= chunk_tokens:
            total += sizes[end]
            end += 1
        end = max(end, start + 1)
        # Joining can merge tokens differently from the sum (BPE tokenizers): shrink until it fits.
        while end - start > 1 and count_tokens(" ".join(units[start:end])) > chunk_tokens:
            end -= 1
        spans.append((start, end))
        if end >= len(units):
            break
        back, carried = end, 0
        while back - 1 > start and carried + sizes[back - 1] <= overlap_tokens:
            back -= 1
            carried += sizes[back]
        start = back
    chunks = []
    for i, (s, e) in enumerate(spans):
        shared = set()
        if i > 0:
            shared |= set(range(s, min(e, spans[i - 1][1])))
        if i + 1 < len(spans):
            shared |= set(range(max(s, spans[i + 1][0]), e))
        chunks.append(Chunk(doc, i, " ".join(units[s:e]), units[s:e], [j - s for j in range(s, e) if j not in shared]))
    return chunks


def split_by_position(sentences: list[str], count_tokens: Callable[[str], int], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train sentences, val sentences): the last `val_fraction` of the text, by tokens, is val.
    Splitting before chunking keeps overlapping chunks from straddling the two sides."""
    sizes = [count_tokens(s) for s in sentences]
    target, total, cut = sum(sizes) * (1 - val_fraction), 0, len(sentences)
    for i, n in enumerate(sizes):
        if total >= target:
            cut = i
            break
        total += n
    cut = min(max(cut, 1), len(sentences) - 1)
    return sentences[:cut], sentences[cut:]


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train docs, val docs): a seeded shuffle, at least one document on each side."""
    order = sorted(docs)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


# --------------------------------------------------------------------------- queries

def pick_sentences(chunk: Chunk, n: int, seed: int, min_words: int = 5) -> list[int]:
    """Indices of up to `n` sentences of at least `min_words` words that the chunk does not share with
    a neighbour (so no other passage holds them verbatim), drawn by `seed` and the chunk's text."""
    eligible = [i for i in chunk.own if len(chunk.sentences[i].split()) >= min_words]
    return sorted(stable_rng(seed, chunk.text).sample(eligible, min(n, len(eligible))))


def ict_pairs(chunk: Chunk, n: int, seed: int, min_words: int = 5) -> tuple[list[str], str]:
    """Inverse cloze task: (query sentences, passage). Up to `n` sentences from `pick_sentences`
    become queries; the passage is the chunk without them. Needs at least one sentence left over;
    else ([], chunk text)."""
    picked = pick_sentences(chunk, min(n, len(chunk.sentences) - 1), seed, min_words)
    if not picked:
        return [], chunk.text
    passage = " ".join(s for i, s in enumerate(chunk.sentences) if i not in picked)
    return [chunk.sentences[i] for i in picked], passage


def question_contexts(chunk: Chunk, n: int, seed: int) -> list[str]:
    """What the LLM sees for each of a chunk's `n` questions: a sentence from `pick_sentences` with
    the sentence before it (for what "it" or "the ratio" refers to). One question per sentence keeps
    a small model's questions on different facts and answerable from the chunk; the whole chunk
    when no sentence qualifies."""
    picked = pick_sentences(chunk, n, seed)
    return [" ".join(chunk.sentences[max(0, i - 1): i + 1]) for i in picked] or [chunk.text]


QA_PROMPT = (
    "Context information is below.\n\n"
    "---------------------\n{context}\n---------------------\n\n"
    "Given the context information and not prior knowledge, write one question that the context answers. "
    "Write only the question."
)

# Worked examples shown before each request (two per prompt, drawn by the context): a 135M model
# copies a demonstrated question far better than it follows an instruction alone.
QUESTION_SHOTS = (
    ("Operating expenses rose 4% to $2.1 billion, driven by higher technology spending and wage inflation, "
     "partly offset by lower occupancy costs.", "What drove the increase in operating expenses?"),
    ("The Common Equity Tier 1 ratio was 11.8% at year end, well above the regulatory minimum of 7.0% "
     "including buffers.", "What was the CET1 ratio at the end of the year?"),
    ("Management expects loan growth in the low single digits next year as higher rates dampen mortgage demand.",
     "How much loan growth does management expect next year?"),
    ("The allowance for credit losses increased because of weaker conditions in commercial real estate, "
     "particularly office properties.", "Why did the allowance for credit losses go up?"),
)


def question_messages(context: str, seed: int) -> list[dict[str, str]]:
    """Chat messages asking for one question about `context` (LlamaIndex's QA prompt, one question),
    after two worked examples."""
    messages = []
    for shot_context, shot_question in stable_rng(seed, context).sample(QUESTION_SHOTS, 2):
        messages += [{"role": "user", "content": QA_PROMPT.format(context=shot_context)},
                     {"role": "assistant", "content": shot_question}]
    return messages + [{"role": "user", "content": QA_PROMPT.format(context=context)}]


def plain_question_prompt(messages: list[dict[str, str]]) -> str:
    """`question_messages` as plain text, for a base model without a chat template."""
    turns = [f"{m['content']}\n\n" if m["role"] == "user" else f"Question: {m['content']}\n\n" for m in messages]
    return "".join(turns) + "Question:"


_LIST_MARKER = re.compile(r"^\s*(?:(?:q(?:uestion)?\s*)?\d+\s*[.):\]-]|[-*\u2022>#]+|q(?:uestion)?\s*\d*\s*[:.])\s*", re.I)


def normalise_question(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def parse_questions(output: str, n: int, min_words: int = 3) -> tuple[list[str], dict[str, int]]:
    """Up to `n` questions from an LLM's free text, and counts of what was dropped.

    Handles numbering ("1.", "2)", "Q1:"), bullets, several questions on one line, blank lines and
    preambles ("Here are two questions:"). Dropped: `not_question` (no "?"), `too_short`,
    `duplicate` (same words, case and punctuation aside) and `extra` (beyond `n`)."""
    counts = {"kept": 0, "not_question": 0, "too_short": 0, "duplicate": 0, "extra": 0}
    questions, seen = [], set()
    for line in output.splitlines():
        line = line.strip().strip("*").strip()
        if not line:
            continue
        # "1. What is X? 2. What is Y?" on one line: cut after each question mark.
        for piece in re.split(r"(?<=\?)\s+", line):
            piece = _LIST_MARKER.sub("", piece).strip().strip('"').strip()
            if not piece:
                continue
            if "?" not in piece:
                counts["not_question"] += 1
                continue
            piece = piece[: piece.rindex("?") + 1].strip()
            if len(piece.split()) < min_words:
                counts["too_short"] += 1
                continue
            key = normalise_question(piece)
            if key in seen:
                counts["duplicate"] += 1
                continue
            seen.add(key)
            if len(questions) >= n:
                counts["extra"] += 1
                continue
            questions.append(piece)
    counts["kept"] = len(questions)
    return questions, counts


# --------------------------------------------------------------------------- query styles

# Question and function words a search-box query leaves out.
_FUNCTION_WORDS = frozenset("""
a an the of in on at for to from by with and or is are was were be been being what which who whom whose when
where why how does did do has have had its it this that these those as than there their they our we any each
""".split())
_WORD = re.compile(r"[A-Za-z0-9$][\w$%&/'.-]*")
_YEAR = re.compile(r"(?<!\d)(?:19|20)\d{2}(?!\d)")
_THE_YEAR = re.compile(r"\b(?:the|this|that) (?:fiscal |financial |reporting )?year\b", re.I)


def keyword_query(question: str) -> str | None:
    """`question` as the words a user types into a search box: less question and function words
    ("What was the CET1 ratio at the end of the year?" -> "CET1 ratio end year"); None under 2 words."""
    words = [w.rstrip(".,'") for w in _WORD.findall(question)]
    kept = [w for w in words if w and w.lower() not in _FUNCTION_WORDS]
    return " ".join(kept) if len(kept) >= 2 else None


def document_year(name: str) -> str | None:
    """The year a document is about, when its file name holds exactly one ("hr_2024_annual_report.txt")."""
    years = set(_YEAR.findall(Path(name).name))
    return years.pop() if len(years) == 1 else None


def dated_query(question: str, year: str) -> str | None:
    """`question` with `year` said ("... at the end of the year?" -> "... at the end of 2024?", else
    "... in 2024?"); None when it names a year already."""
    if _YEAR.search(question):
        return None
    said, n = _THE_YEAR.subn(year, question, count=1)
    return said if n else question.rstrip(" ?") + f" in {year}?"


# "2.3 'Connected Group' or 'CG' means ...", 'An "event of default" with respect to a series means ...'
_DEFINITION = re.compile(r"""^(?:[\d.]+\s+)?(?:(?:an?|the)\s+)?['"\u2018\u201c](?P<term>[^'"\u2019\u201d]{2,60})['"\u2019\u201d]"""
                         r"""(?:\s+or\s+['"\u2018\u201c](?P<abbr>[^'"\u2019\u201d]{2,20})['"\u2019\u201d])?"""
                         r"""(?:\s+[^.;:]{0,60}?)?\s+(?:means|is defined as|refers to)\b""", re.I)


def definition_queries(sentence: str) -> list[str]:
    """What a reader asks of a sentence that defines a quoted term: "What does Connected Group mean?"
    (and "What is CDD?" for its abbreviation); [] for any other sentence."""
    found = _DEFINITION.match(sentence.strip())
    if not found:
        return []
    return [f"What does {found['term']} mean?"] + ([f"What is {found['abbr']}?"] if found["abbr"] else [])


def styled_queries(questions: list[str], styles: list[str], year: str | None) -> list[str]:
    """`questions` followed by their variants in the question styles among `styles` ("keyword", "dated"),
    without repeats; other styles (definition) are not made from questions."""
    makers = {"keyword": keyword_query, "dated": lambda question: dated_query(question, year) if year else None}
    out = list(questions)
    for question in questions:
        for style in (s for s in styles if s in makers):
            variant = makers[style](question)
            if variant and normalise_question(variant) not in map(normalise_question, out):
                out.append(variant)
    return out


# --------------------------------------------------------------------------- the pairs layout

@dataclass
class Pairs:
    queries: dict[str, str] = field(default_factory=dict)
    corpus: dict[str, str] = field(default_factory=dict)
    relevant_docs: dict[str, list[str]] = field(default_factory=dict)

    def add(self, passage_id: str, passage: str, queries: list[str]) -> None:
        self.corpus[passage_id] = passage
        for i, q in enumerate(queries):
            qid = f"{passage_id}-q{i}"
            self.queries[qid] = q
            self.relevant_docs[qid] = [passage_id]

    def to_json(self) -> dict:
        return {"queries": self.queries, "corpus": self.corpus, "relevant_docs": self.relevant_docs, "mode": "text"}

    def anchor_positive(self) -> tuple[list[str], list[str]]:
        """(anchors, positives): one training pair per (query, relevant passage)."""
        anchors, positives = [], []
        for qid, cids in self.relevant_docs.items():
            for cid in cids:
                anchors.append(self.queries[qid])
                positives.append(self.corpus[cid])
        return anchors, positives

    def ir_dicts(self) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
        """(queries, corpus, relevant_docs as sets): what InformationRetrievalEvaluator takes."""
        return self.queries, self.corpus, {q: set(c) for q, c in self.relevant_docs.items()}


def pairs_from_json(data: object, name: str = "pairs file") -> Pairs:
    """Check the layout and ids; a PairsError says what is wrong, in one line."""
    expected = "a JSON object with 'queries', 'corpus' and 'relevant_docs' (the LlamaIndex EmbeddingQAFinetuneDataset layout)"
    if not isinstance(data, dict) or not all(k in data for k in ("queries", "corpus", "relevant_docs")):
        got = f"keys {sorted(data)[:6]}" if isinstance(data, dict) else type(data).__name__
        raise PairsError(f"{name} is not {expected}; got {got}")
    for key in ("queries", "corpus", "relevant_docs"):
        if not isinstance(data[key], dict):
            raise PairsError(f"{name}: '{key}' must be an object of id -> value, got {type(data[key]).__name__}")
    for key in ("queries", "corpus"):
        bad = [k for k, v in data[key].items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise PairsError(f"{name}: {len(bad)} '{key}' entries are not non-empty strings (first: {bad[0]!r})")
    relevant: dict[str, list[str]] = {}
    for qid, cids in data["relevant_docs"].items():
        cids = [cids] if isinstance(cids, str) else cids
        if not isinstance(cids, list) or not cids or not all(isinstance(c, str) for c in cids):
            raise PairsError(f"{name}: relevant_docs[{qid!r}] must be a non-empty list of corpus ids, got {cids!r}")
        relevant[qid] = cids
    unknown_q = [q for q in relevant if q not in data["queries"]]
    if unknown_q:
        raise PairsError(f"{name}: {len(unknown_q)} relevant_docs keys are not in its queries (first: {unknown_q[0]!r})")
    missing = sorted({c for cids in relevant.values() for c in cids if c not in data["corpus"]})
    if missing:
        raise PairsError(f"{name}: {len(missing)} relevant corpus ids are not in its corpus (first: {missing[0]!r}); "
                         "queries would have no correct answer to find")
    queries = {q: t for q, t in data["queries"].items() if q in relevant}
    if not queries:
        raise PairsError(f"{name} has no queries with relevant passages")
    return Pairs(queries, dict(data["corpus"]), relevant)


def load_pairs(path: Path) -> Pairs:
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"{str(path)!r} does not exist; make it with `python -m embeddings.prepare DOCS --out DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PairsError(f"{str(path)!r} is not valid JSON ({e})") from None
    return pairs_from_json(data, repr(str(path)))


# --------------------------------------------------------------------------- Q/A files

QUESTION_COLUMNS = ("question", "query", "instruction")
ANSWER_COLUMNS = ("answer", "response", "output")


def parse_qa_records(text: str, suffix: str, name: str) -> list[dict]:
    suffix = suffix.lower()
    try:
        if suffix == ".csv":
            reader, rows = csv.DictReader(io.StringIO(text)), []
            for row in reader:
                if None in row:  # DictReader files extra fields under None: usually an unquoted comma
                    raise PairsError(f"{name} line {reader.line_num} has more fields than its header "
                                     f"({len(reader.fieldnames)}); quote values that contain commas")
                rows.append(row)
            return rows
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (json.JSONDecodeError, csv.Error) as e:
        raise PairsError(f"{name} cannot be parsed as {suffix.lstrip('.').upper() or 'JSON'} ({e})") from None
    if isinstance(data, dict):  # {"data": [...]} or a column-oriented {"question": [...], "answer": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and all(isinstance(v, list) for v in data.values()):
            data = [dict(zip(data, row)) for row in zip(*data.values())]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PairsError(f"{name} must hold a list of records with question and answer fields")
    return data


def _column(columns: dict[str, str], wanted: str | None, candidates: tuple[str, ...], flag: str, name: str) -> str | None:
    """The record key for an explicitly named column (must exist) or the first candidate present."""
    if wanted is not None:
        if wanted not in columns.values() and wanted.lower() not in columns:
            raise PairsError(f"{name} has no column {wanted!r} ({flag}); its columns are {sorted(columns.values())}")
        return wanted if wanted in columns.values() else columns[wanted.lower()]
    return next((columns[c] for c in candidates if c in columns), None)


def qa_pairs(records: list[dict], name: str, question_column: str | None = None, answer_column: str | None = None,
             answer_template: str | None = None) -> list[tuple[str, str]]:
    """(question, answer) per usable record. Column names are matched case-insensitively; the answer is
    `answer_template` formatted with the record (e.g. "{topic} {message_2}") when one is given."""
    if not records:
        raise PairsError(f"{name} has no records")
    columns = {k.lower().strip(): k for k in records[0] if isinstance(k, str)}
    q_col = _column(columns, question_column, QUESTION_COLUMNS, "--question-column", name)
    if answer_template is not None:
        import string

        for field_name in {f for _, f, _, _ in string.Formatter().parse(answer_template) if f}:
            _column(columns, field_name, (), "--answer-template", name)
        a_col = None
    else:
        a_col = _column(columns, answer_column, ANSWER_COLUMNS, "--answer-column", name)
    if q_col is None or (a_col is None and answer_template is None):
        raise PairsError(f"{name} needs a question column ({'/'.join(QUESTION_COLUMNS)}) and an answer column "
                         f"({'/'.join(ANSWER_COLUMNS)}); found {sorted(columns.values())}; "
                         "name them with --question-column / --answer-column or --answer-template")
    out = []
    for r in records:
        q = r.get(q_col)
        if answer_template is not None:
            a = answer_template.format_map({k: "" if v is None else v for k, v in r.items()})
        else:
            a = r.get(a_col)
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            out.append((" ".join(q.split()), " ".join(a.split())))
    if not out:
        raise PairsError(f"{name} has no record with both a question and an answer")
    return out


def read_qa_file(path: Path, **columns: str | None) -> tuple[list[tuple[str, str]], int]:
    """((question, answer) pairs, records skipped for an empty question or answer); `columns` as `qa_pairs`."""
    from tunerag.documents import decode_text

    path = Path(path)
    if not path.is_file():
        raise PairsError(f"--qa-file {str(path)!r} does not exist")
    text = decode_text(path.read_bytes(), str(path))
    records = parse_qa_records(text, path.suffix, repr(str(path)))
    pairs = qa_pairs(records, repr(str(path)), **columns)
    return pairs, len(records) - len(pairs)


def qa_to_pairs(qa: list[tuple[str, str]], val_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """(train, val) from Q/A pairs: each distinct answer is a passage; passages (with all their
    questions) are split by a seeded shuffle, so a passage never lands on both sides."""
    by_answer: dict[str, list[str]] = {}
    for q, a in qa:
        by_answer.setdefault(a, [])
        if q not in by_answer[a]:
            by_answer[a].append(q)
    answers = list(by_answer)
    random.Random(seed).shuffle(answers)
    n_val = min(max(1, round(len(answers) * val_fraction)), len(answers) - 1) if len(answers) > 1 else 0
    train, val = Pairs(), Pairs()
    for i, a in enumerate(answers):
        pid = "p" + hashlib.sha256(a.encode()).hexdigest()[:12]
        (val if i < n_val else train).add(pid, a, by_answer[a])
    return train, val
