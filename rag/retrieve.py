"""Hybrid retrieval: BM25 over exactly the chunks of the Chroma collection, the dense side from Chroma,
fused by weighted reciprocal rank fusion (RRF).

Exact figures, years, defined terms and segment names are lexical, and a 254-token bi-encoder blurs
them; Chroma's own sparse search is Cloud-only in 1.5.x, so the lexical side is `bm25s` here. The BM25
index lives beside the store (`PERSIST_DIR/bm25/COLLECTION/`), keyed by the collection's chunk ids: it
is rebuilt whenever those ids change (a file added, changed or removed, `--reindex`) and whenever it is
missing, unreadable or built for other ids, with a note; it is never used stale. The same sentence
rows are embedded too (`sentence-vectors.npy` in that folder, reused for unchanged chunks), and a third
side ranks chunks by their best sentence's cosine with the question (--sentence-weight). With
--rerank-weight (off by default) the fused top 8 are fused once more with their ranking by their best
sentence's score as the extractive answer scores sentences, from those stored vectors (rag.context.chunk_scores).
For a question that names a year, a chunk of another year's report that only repeats one of that year's report
ranked above it goes after the rest (--year-copies, year_copies_last).

    retriever = make_retriever(store, open_bm25(collection, folder, embed=embeddings.embed_documents), k=4,
                               sources=files, bm25_weight=3.0, sentence_weight=2.0, year_weight=0.5,
                               year_copies="last", rerank_weight=1.0, chunk_scores=rag.context.chunk_scores)
    retriever.invoke("What was the CET1 ratio in 2024?")   # Documents, metadata["score"], ["found_by"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal

from rag.abbreviations import defined_in, spelled_out, written_apart
from rag.index import ID_BATCH, document_title
from tunerag.common import first_line, replace_folder, temp_folder

logger = logging.getLogger(__name__)

# Numbers keep their decimal point and separators ("11.8", "3,412"): bm25s' default pattern (\w\w+)
# splits "11.8%" into "11" and drops the "8".
TOKEN_PATTERN = r"(?u)\d+(?:[.,]\d+)*|\w+"
MAX_UNIT_WORDS = 40  # a table row or run-together line longer than this is cut into pieces
FRAGMENT_WORDS = 6  # a unit shorter than this ("PART II.", "Table 16: Net Charge-offs", "14.") reads with the next
# A sentence ends at . ! ? before a capital or a figure, but not after an abbreviation that a capital often
# follows ("U.S. Treasury", "9:00 a.m. Central Time", "Ms. Ekdahl", "No. 2"; each lookbehind is fixed-width),
# and not at ";": "Daniel Ferreira, age 46: Executive Vice President and Treasurer; Treasurer since August 1,
# 2023" keeps the name with the date (long corpus, tuning half, extractive answer 0.707 -> 0.719).
NOT_AN_END = "".join(rf"(?<!\b{re.escape(a)})" for a in ("U.S.", "U.K.", "a.m.", "p.m.", "No.", "Nos.", "Inc.", "Co.",
                                                           "Corp.", "Ltd.", "Mr.", "Ms.", "Mrs.", "Dr.", "St.", "vs.",
                                                           "e.g.", "i.e.", "N.A.", "L.P."))
SENTENCE_END = re.compile(rf"(?<=[.!?]){NOT_AN_END}\s+(?=[\"'(\[]?[A-Z0-9$])")
RRF_K = 60  # the constant of Cormack et al. (2009); ranks, not scores, are fused
BM25_META = "tunerag-bm25.json"
BM25_ROWS = "sentences-3"  # what one BM25 row is (2: abbreviations end no sentence, 3: nor ";"); others are rebuilt
BM25_FORMAT = 3  # 2: the documents' abbreviations are stored with the index; 3: and which they write apart
SENTENCE_VECTORS = "sentence-vectors.npy"
VECTOR_ROWS = "title: unit"  # what a sentence vector embeds; vectors stored of another layout are redone
VECTOR_BLOCK = 256  # sentences per embed call: a live progress bar
ROWS_PER_HIT = 10  # sentence rows fetched per chunk wanted: a chunk's sentences often rank together
RERANK_TOP = 8  # the fused chunks that --rerank-weight re-ranks by their best sentence's score
# Word overlap (Jaccard, numbers aside) at which a chunk of another year's report counts as a copy of one above it
# (year_copies_last): long corpus's tuning half, answer-in-top-4 0.958 without, 0.976 at 0.5-0.8, 0.970 at 0.85-0.9
COPY_OVERLAP = 0.65
YEAR = re.compile(r"(?<!\d)(?:19|20)\d\d(?!\d)")  # a year on its own, not inside a longer number
TITLE_YEAR = re.compile(r"(?<!\d)(?:19|20)\d\d")  # a file named for its date, "aapl-20240928", names 2024
# A name: capitalised words ("Halvorsen Ridge", "Basel") other than a sentence's first; all-capital
# abbreviations (CET1, EPS) are not names here, rag.abbreviations spells them out instead.
NAME = re.compile(r"(?<![.?!:]\s)(?<![.?!:])(?<!^)\b[A-Z][a-z]+(?:[ -][A-Z][a-z]+)*\b")


def import_bm25s():
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG on import ("Building index...")
    return bm25s


def bm25_tokens(texts: list[str], stem: bool = True) -> list[list[str]]:
    """Lower-cased word and number tokens, English stopwords removed, Snowball-stemmed when `stem`."""
    bm25s = import_bm25s()

    stemmer = None
    if stem:
        import Stemmer

        stemmer = Stemmer.Stemmer("english").stemWords
    return bm25s.tokenize(texts, token_pattern=TOKEN_PATTERN, stopwords="en", stemmer=stemmer,
                          return_ids=False, show_progress=False)


def split_units(text: str) -> list[tuple[int, int]]:
    """(start, end) of the sentences and lines of `text`; long runs are cut at " | " cell breaks or
    every MAX_UNIT_WORDS words. Pure; the spans cover the text's non-blank parts in order."""
    spans = []
    for line in re.finditer(r"[^\n]+", text):
        pos = line.start()
        for piece in SENTENCE_END.split(line.group()):
            start = text.index(piece, pos) if piece else pos
            pos = start + len(piece)
            spans += cut_long(text, start, pos)
    stripped = []
    for s, e in spans:
        piece = text[s:e]
        if piece.strip():
            s += len(piece) - len(piece.lstrip())
            stripped.append((s, s + len(piece.strip())))
    return stripped


def whole_units(text: str) -> list[tuple[int, int]]:
    """split_units with each unit shorter than FRAGMENT_WORDS words joined to the unit after it (the last to
    the one before): a run-in heading ("Launch of RidgeLink. In May 2024, we launched..."), a table's caption
    or a clause number reads with what it introduces. A text of fragments alone gives one span of them all."""
    spans: list[tuple[int, int]] = []
    pending = None
    for s, e in split_units(text):
        s = pending if pending is not None else s
        pending = s if len(text[s:e].split()) < FRAGMENT_WORDS else None
        if pending is None:
            spans.append((s, e))
    if pending is not None:
        end = len(text.rstrip())
        spans[-1:] = [(spans[-1][0], end)] if spans else [(pending, end)]
    return spans


def cut_long(text: str, start: int, end: int) -> list[tuple[int, int]]:
    words = list(re.finditer(r"\S+", text[start:end]))
    if len(words) <= MAX_UNIT_WORDS:
        return [(start, end)]
    pieces, first = [], 0
    while first < len(words):
        last = min(first + MAX_UNIT_WORDS, len(words))
        if last < len(words):  # prefer to end at a table cell break in the second half of the window
            for j in range(last - 1, first + MAX_UNIT_WORDS // 2, -1):
                if words[j].group() == "|":
                    last = j + 1
                    break
        pieces.append((start + words[first].start(), start + words[last - 1].end()))
        first = last
    return pieces


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def unit_vector(vector: list[float]):
    """`vector` as a float32 torch tensor scaled to norm 1 (a zero vector as it is): the stored sentence vectors are
    unit length, so their products with it are cosines."""
    import torch

    v = torch.tensor(vector, dtype=torch.float32)
    return v / (v.norm() or 1.0)


@dataclass
class Bm25Index:
    """A bm25s model over the sentences (rag.retrieve.split_units) of the collection's chunks, each
    row with its chunk's document title; `ids` and `sources` are each row's chunk id and source file.

    Sentence rows, not whole chunks: in a 254-token chunk of an annual report every row of a table
    mentions "net interest income" and "2024", so BM25's length normalisation cannot tell the one
    sentence that answers from the chunk around it (answer-in-top-4 on the long corpus's tuning half,
    hybrid: 0.754 with chunk rows, 0.808 with sentence rows; the sample report's: 0.939 both). The
    same holds for the embedder, so `vectors` holds each row's vector ("title: sentence") when asked."""

    model: Any
    ids: list[str]
    sources: list[str]
    stem: bool
    abbreviations: dict[str, str]  # defined in the chunks: {"NSFR": "net stable funding ratio"}
    vectors: Any = None  # each row's embedder vector (rows x dim, unit length), for the hybrid's sentence side
    written: frozenset[str] = frozenset()  # the abbreviations the chunks also write outside their definitions

    @cached_property
    def source_of(self) -> dict[str, str]:
        """{chunk id: its source file}."""
        return dict(zip(self.ids, self.sources))

    @cached_property
    def rows_of(self) -> dict[str, range]:
        """{chunk id: its rows} (a chunk's rows are consecutive, in the order of split_units)."""
        rows: dict[str, range] = {}
        for row, chunk_id in enumerate(self.ids):
            rows[chunk_id] = range(rows[chunk_id].start if chunk_id in rows else row, row + 1)
        return rows

    def row_cosines(self, chunk_ids: list[str], query_vector: list[float]) -> list[list[float]]:
        """The cosine of each stored sentence vector of each chunk (in row order) with the query."""
        import torch

        rows = [self.rows_of.get(i, range(0)) for i in chunk_ids]
        picked = torch.from_numpy(self.vectors[[r for chunk in rows for r in chunk]])
        cosines = (picked @ unit_vector(query_vector)).tolist()
        out, start = [], 0
        for chunk in rows:
            out.append(cosines[start:start + len(chunk)])
            start += len(chunk)
        return out

    def uses(self, word: str) -> bool:
        """Whether the indexed text has `word` (as BM25 tokenizes it); for an abbreviation the chunks define,
        whether they write it outside its definitions too (rag.abbreviations.written_apart)."""
        if word in self.abbreviations:
            return word in self.written
        tokens = bm25_tokens([word], self.stem)[0]
        vocab = getattr(self.model, "vocab_dict", None) or {}  # an empty index has none
        return bool(tokens) and all(t in vocab for t in tokens)

    def unknown_names(self, question: str, allowed_sources: set[str] | None = None) -> list[str]:
        """The names in `question` (NAME) with a word that no chunk of `allowed_sources` has: "What was
        Halvorsen Ridge's CET1 ratio?" asked of another bank's report gives ["Halvorsen Ridge"]."""
        vocab = getattr(self.model, "vocab_dict", None) or {}
        return [name for name in NAME.findall(question)
                if any(t not in vocab or not self.rows_with([t], 1, allowed_sources)[0]
                       for t in bm25_tokens([name], self.stem)[0])]

    def source_mask(self, allowed_sources: set[str] | None):
        """Per row, 1.0 when its source is one of `allowed_sources` (None: every row), else 0.0."""
        import numpy as np

        if allowed_sources is None:
            return None
        return np.fromiter((s in allowed_sources for s in self.sources), dtype=np.float32, count=len(self.sources))

    def rows_with(self, tokens: list[str], k: int, allowed_sources: set[str] | None) -> tuple[list[int], list[float]]:
        """(row numbers, BM25 scores) of the best `k` rows of `allowed_sources` with any of `tokens` (each one
        in the vocabulary)."""
        rows, scores = self.model.retrieve([tokens], k=min(k, len(self.ids)), show_progress=False,
                                           weight_mask=self.source_mask(allowed_sources), n_threads=1)
        kept = [(int(r), float(sc)) for r, sc in zip(rows[0], scores[0]) if sc > 0]
        return [r for r, _ in kept], [sc for _, sc in kept]

    def sentence_search(self, query_vector: list[float], k: int,
                        allowed_sources: set[str] | None = None) -> list[tuple[str, float]]:
        """(chunk id, cosine of its best sentence with the query) of the best `k` chunks of `allowed_sources`."""
        import numpy as np
        import torch

        if self.vectors is None or not self.ids:
            return []
        # torch's matmul, not numpy's: OpenBLAS's spinning threads would slow the next torch call (the
        # query's encoding) about 2x on a 2-core machine
        cosines = (torch.from_numpy(self.vectors) @ unit_vector(query_vector)).numpy()
        if allowed_sources is not None:
            cosines[self.source_mask(allowed_sources) == 0] = -np.inf
        best: dict[str, float] = {}
        for r in np.argsort(-cosines, kind="stable"):
            if len(best) == k or cosines[r] == -np.inf:
                break
            best.setdefault(self.ids[r], round(float(cosines[r]), 4))
        return list(best.items())

    def search(self, query: str, k: int, allowed_sources: set[str] | None = None) -> list[tuple[str, float]]:
        """(chunk id, BM25 score of its best sentence) of the best `k` chunks with any query term, from
        `allowed_sources` only."""
        vocab = self.model.vocab_dict
        tokens = [t for t in bm25_tokens([query], self.stem)[0] if t in vocab]
        if not tokens or not self.ids:
            return []  # no lexical overlap at all: the dense side still answers
        best: dict[str, float] = {}
        for r, s in zip(*self.rows_with(tokens, k * ROWS_PER_HIT, allowed_sources)):
            if self.ids[r] not in best:
                best[self.ids[r]] = s
        return list(best.items())[:k]


def all_chunks(collection, include: list[str]) -> dict[str, Any]:
    """Every id (and `include`d field) of a chromadb collection, fetched in batches."""
    out: dict[str, list] = {"ids": [], **{f: [] for f in include}}
    offset = 0
    while True:
        got = collection.get(include=include, limit=ID_BATCH, offset=offset)
        for key in out:
            out[key] += got[key]
        if len(got["ids"]) < ID_BATCH:
            return out
        offset += ID_BATCH


def sentence_vectors(rows: list[str], row_ids: list[str], embed: Callable[[list[str]], list[list[float]]],
                     previous: dict[str, Any]):
    """Each row's vector (unit length). A chunk id names its text, so the rows of a chunk in `previous`
    ({chunk id: its rows' vectors}, from the stored index) are reused and only new chunks are embedded."""
    from collections import Counter

    import numpy as np
    from tqdm.auto import tqdm

    counts = Counter(row_ids)
    reused = {i: iter(v) for i, v in previous.items() if len(v) == counts[i]}  # a chunk's rows, in order
    vectors: list[Any] = [next(reused[i]) if i in reused else None for i in row_ids]
    todo = [n for n, i in enumerate(row_ids) if i not in reused]
    t0 = time.perf_counter()
    with tqdm(total=len(todo), unit="sentence", desc="embedding sentences", disable=None if todo else True) as bar:
        for start in range(0, len(todo), VECTOR_BLOCK):
            block = todo[start:start + VECTOR_BLOCK]
            for n, vec in zip(block, embed([rows[n] for n in block])):
                vectors[n] = vec
            bar.update(len(block))
    if todo:
        logger.info("embedded %d new sentences in %.1f s for the sentence side and the re-ranking (--sentence-weight 0 "
                    "and --rerank-weight 0: none)", len(todo), time.perf_counter() - t0)
    matrix = np.asarray(vectors, dtype=np.float32).reshape(len(rows), -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def build_bm25(collection, stem: bool = True, embed: Callable[[list[str]], list[list[float]]] | None = None,
               previous: dict[str, Any] | None = None) -> Bm25Index:
    """The index of the collection's sentence rows; with `embed`, their vectors too (see sentence_vectors)."""
    bm25s = import_bm25s()

    chunks = all_chunks(collection, ["documents", "metadatas"])
    model = bm25s.BM25()
    rows, row_ids, row_sources, row_titles = [], [], [], []
    for chunk_id, text, meta in zip(chunks["ids"], chunks["documents"], chunks["metadatas"]):
        meta = meta or {}
        for start, end in split_units(text) or [(0, len(text))]:
            rows.append(text[start:end])
            row_titles.append(meta.get("title", ""))
            row_ids.append(chunk_id)
            row_sources.append(meta.get("source", ""))
    if rows:
        model.index(bm25_tokens([f"{t} {r}" for t, r in zip(row_titles, rows)], stem), show_progress=False)
    vectors = None
    if embed is not None:
        vectors = sentence_vectors([f"{t}: {r}" if t else r for t, r in zip(row_titles, rows)], row_ids, embed,
                                   previous or {})
    defined = defined_in(chunks["documents"])
    return Bm25Index(model, row_ids, row_sources, stem, defined, vectors,
                     frozenset(written_apart(chunks["documents"], defined)))


def save_bm25(index: Bm25Index, folder: Path) -> None:
    """Write the index into a temp folder beside `folder`, then swap it in: never half an index."""
    import numpy as np

    tmp = temp_folder(folder)
    try:
        if index.ids:
            index.model.save(str(tmp), show_progress=False)
        if index.vectors is not None:
            np.save(tmp / SENTENCE_VECTORS, index.vectors)
        chunk_ids = sorted(set(index.ids))
        meta = {"ids_sha256": ids_digest(chunk_ids), "chunk_ids": chunk_ids, "row_ids": index.ids,
                "sources": index.sources, "stem": index.stem, "rows": BM25_ROWS, "format": BM25_FORMAT,
                "abbreviations": index.abbreviations, "written": sorted(index.written),
                "vectors": VECTOR_ROWS if index.vectors is not None else None}
        (tmp / BM25_META).write_text(json.dumps(meta), encoding="utf-8")
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_bm25(folder: Path, expected_ids: list[str], stem: bool,
              vectors: bool = False) -> tuple[Bm25Index | None, str]:
    """(the stored index, "") when it matches the collection's ids and settings (and holds sentence
    vectors, when `vectors`), else (None, why not)."""
    import numpy as np

    bm25s = import_bm25s()

    meta_path = folder / BM25_META
    if not meta_path.is_file():
        return None, "missing"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("stem") != stem or meta.get("rows") != BM25_ROWS:
            return None, "built with other tokenizer settings"
        if meta.get("format") != BM25_FORMAT:
            return None, "stored by an older tunerag"
        if meta.get("ids_sha256") != ids_digest(expected_ids) or meta["chunk_ids"] != sorted(set(expected_ids)) \
                or set(meta["row_ids"]) != set(meta["chunk_ids"]):
            return None, "built for other chunks than the collection holds"
        model = bm25s.BM25.load(str(folder), show_progress=False) if meta["row_ids"] else bm25s.BM25()
        if meta["row_ids"] and model.scores["num_docs"] != len(meta["row_ids"]):
            return None, "damaged (row count differs from its ids)"
        matrix = None
        if vectors:
            if meta.get("vectors") != VECTOR_ROWS:
                return None, "stored without sentence vectors"
            matrix = np.load(folder / SENTENCE_VECTORS)
            if matrix.ndim != 2 or len(matrix) != len(meta["row_ids"]):
                return None, "damaged (sentence vectors differ from its rows)"
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same: rebuild it
        return None, f"unreadable ({first_line(e)})"
    return Bm25Index(model, meta["row_ids"], meta["sources"], stem, meta["abbreviations"], matrix,
                     frozenset(meta["written"])), ""


def stored_vectors(folder: Path) -> dict[str, Any]:
    """{chunk id: its rows' sentence vectors} of whatever index `folder` holds (for reuse), or {}."""
    import numpy as np

    try:
        meta = json.loads((folder / BM25_META).read_text(encoding="utf-8"))
        if meta.get("vectors") != VECTOR_ROWS or meta.get("rows") != BM25_ROWS:
            return {}
        matrix = np.load(folder / SENTENCE_VECTORS)
        if len(matrix) != len(meta["row_ids"]):
            return {}
    except Exception:  # noqa: BLE001 - nothing reusable: every sentence is embedded
        return {}
    rows: dict[str, list[int]] = {}
    for n, i in enumerate(meta["row_ids"]):
        rows.setdefault(i, []).append(n)
    return {i: matrix[ns] for i, ns in rows.items()}


def open_bm25(collection, folder: Path, stem: bool = True, changed: bool = False,
              embed: Callable[[list[str]], list[list[float]]] | None = None) -> Bm25Index:
    """The BM25 index of `collection`, stored in `folder`: loaded when it matches the collection's
    ids, rebuilt (with a note) when it does not or when the caller says the collection `changed`.
    With `embed` it holds the sentences' vectors too; only sentences of new chunks are embedded."""
    ids = all_chunks(collection, [])["ids"]
    index, why = (None, "") if changed else load_bm25(folder, ids, stem, vectors=embed is not None)
    if index is not None:
        return index
    if why not in ("", "missing"):  # a changed collection (the usual update) or a new index needs no note
        logger.info("note: BM25 index %s: %s; rebuilt", folder, why)
    index = build_bm25(collection, stem, embed, stored_vectors(folder) if embed is not None else None)
    try:
        save_bm25(index, folder)
    except OSError as e:  # a read-only store still answers, with an in-memory BM25 index
        logger.warning("the BM25 index could not be saved to %s (%s); using it in memory", folder, e.strerror or e)
    return index


# A question about what was expected for a year ("net charge-off guidance for 2026?") is answered by the report
# of the year before, which gives the outlook; unless the year names the report ("the 2024 report's outlook").
OUTLOOK = re.compile(r"\b(?:expect(?:s|ed)?|guidance|forecast)\b", re.IGNORECASE)
REPORT_YEAR = re.compile(r"(?:'s)?\s+(?:annual\s+)?(?:report|10-K|filing)\b", re.IGNORECASE)


def asked_years(query: str) -> set[str]:
    """The years whose report answers `query`: the years it names; for an outlook question, the year before
    each (OUTLOOK), unless the year names the report."""
    outlook = bool(OUTLOOK.search(query))
    return {str(int(m.group()) - 1) if outlook and not REPORT_YEAR.match(query, m.end()) else m.group()
            for m in YEAR.finditer(query)}


def year_ranking(query: str, fused: list[str], title_of: dict[str, str]) -> list[str]:
    """The `fused` ids (best first) of chunks whose document title names a year the question names: "the
    CET1 ratio in 2024" is most often answered by the 2024 report, whose sentences the 2023 and 2025
    reports repeat with other figures; for an outlook question, the year before (asked_years). Empty when the
    question names no year or no title has it."""
    years = asked_years(query)
    if not years:
        return []
    return [i for i in fused if years & set(TITLE_YEAR.findall(title_of.get(i, "")))]


def copy_words(text: str) -> set[str]:
    """The BM25 terms of `text` without its numbers: what two years' copies of a passage share."""
    return {t for t in bm25_tokens([text])[0] if not t[0].isdigit()}


def year_copies_last(ranked: list[str], years: set[str], read: Callable[[str], tuple[str, str] | None],
                     k: int) -> list[str]:
    """The first `k` of `ranked` (best first), a chunk that only repeats another year's passage put after the rest:
    one whose document's title names a year but none of `years` (asked_years), whose text names none of them
    either, and whose words (copy_words) overlap, by at least COPY_OVERLAP (Jaccard), those of a chunk kept above
    it from a document of one of `years`. "NSFR at December 31, 2023?" finds the 2023 report's glossary and
    then the 2024 and 2025 reports' copies of it, which push the sentence that answers out of the top 4.
    `read(id)`: (its document's title, its text), or None for a chunk no longer stored (left out); called only
    until k are kept."""
    kept, copies, words, title_years = [], [], {}, {}

    def words_of(i: str) -> set[str]:
        if i not in words:
            words[i] = copy_words(read(i)[1])
        return words[i]

    for i in ranked:
        if len(kept) == k:
            break
        got = read(i)
        if got is None:
            continue
        title, text = got
        title_years[i] = set(TITLE_YEAR.findall(title))
        if title_years[i] and not title_years[i] & years and not years & set(YEAR.findall(text)):
            mine = copy_words(text)
            if any(title_years[j] & years and jaccard(mine, words_of(j)) >= COPY_OVERLAP for j in kept):
                copies.append(i)
                continue
        kept.append(i)
    return (kept + copies)[:k]


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def rrf(rankings: dict[str, list[str]], weights: dict[str, float]) -> list[tuple[str, float, list[str]]]:
    """(id, fused score, sides that found it), best first: sum over sides of weight / (RRF_K + rank)."""
    fused: dict[str, float] = {}
    found: dict[str, list[str]] = {}
    for side, ranked in rankings.items():
        for rank, doc_id in enumerate(ranked, 1):
            fused[doc_id] = fused.get(doc_id, 0.0) + weights[side] / (RRF_K + rank)
            found.setdefault(doc_id, []).append(side)
    return sorted(((i, s, found[i]) for i, s in fused.items()), key=lambda t: -t[1])


def make_retriever(store, bm25: Bm25Index | None, k: int, sources: list[str], mode: str = "hybrid",
                   bm25_weight: float = 1.0, fetch_k: int = 80, abbreviations: bool = True,
                   year_weight: float = 0.0, sentence_weight: float = 0.0, rerank_weight: float = 0.0,
                   year_copies: Literal["last", "keep"] = "keep",
                   chunk_scores: Callable[[str, list[tuple[str, list[str], list[float]]], dict[str, str]], list[float]]
                   | None = None):
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import ConfigDict

    class HybridRetriever(BaseRetriever):
        """Top-k chunks of the given files. metadata["score"]: the cosine similarity (dense), the BM25
        score (bm25) or the fused RRF score (hybrid); "found_by": the sides that ranked it ("sentences": the
        embedder's cosine of its best sentence, Bm25Index.sentence_search; "year": its document's title names
        the question's year, year_ranking); for hybrid also "dense_score", "sentence_score" and "bm25_score"
        where that side found it. With `rerank_weight` (and `chunk_scores`, rag.context's, and stored sentence
        vectors) the fused top RERANK_TOP are fused once more, with a ranking of them by their best sentence's
        score ("unit_score"): the score that picks the extractive answer, from the stored vectors. With
        `year_copies="last"` a question that names a year gets year_copies_last's order."""

        model_config = ConfigDict(arbitrary_types_allowed=True)
        store: Any
        bm25: Any
        k: int
        sources: list[str]
        mode: Literal["hybrid", "dense", "bm25"]
        bm25_weight: float
        fetch_k: int
        abbreviations: bool
        year_weight: float
        sentence_weight: float
        rerank_weight: float
        year_copies: Literal["last", "keep"]
        chunk_scores: Any

        def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
            dense_query = lexical_query = query
            if self.abbreviations:  # "ROA" is searched for with "return on assets" too (rag.abbreviations)
                defined = self.bm25.abbreviations if self.bm25 is not None else None
                dense_query = spelled_out(query, defined)
                if self.bm25 is not None:  # BM25 matches an abbreviation the documents write as it is
                    lexical_query = spelled_out(query, defined, self.bm25.uses)
            allowed = set(self.sources)
            where = {"source": self.sources[0]} if len(self.sources) == 1 else {"source": {"$in": self.sources}}
            dense: dict[str, tuple[Document, float]] = {}
            by_sentence: list[tuple[str, float]] = []
            if self.mode != "bm25":
                # one query vector for the chunks (Chroma) and the sentences (stored beside BM25)
                query_vector = self.store.embeddings.embed_query(dense_query)
                hits = self.store.similarity_search_by_vector_with_relevance_scores(
                    query_vector, k=self.fetch_k if self.mode == "hybrid" else self.k, filter=where)
                for doc, distance in hits:
                    dense[doc.id] = (doc, round(1.0 - distance, 4))
                if self.mode == "hybrid" and self.sentence_weight > 0 and self.bm25 is not None:
                    by_sentence = self.bm25.sentence_search(query_vector, self.fetch_k, allowed)
            lexical = self.bm25.search(lexical_query, self.fetch_k if self.mode == "hybrid" else self.k, allowed) if self.mode != "dense" else []
            bm25_scores, sentence_scores = dict(lexical), dict(by_sentence)
            if self.mode == "dense":
                ranked = [(i, s, ["dense"]) for i, (_, s) in dense.items()]
            elif self.mode == "bm25":
                ranked = [(i, round(s, 4), ["bm25"]) for i, s in lexical]
            else:
                rankings = {"dense": list(dense), "bm25": [i for i, _ in lexical]}
                if by_sentence:
                    rankings["sentences"] = [i for i, _ in by_sentence]
                weights = {"dense": 1.0, "bm25": self.bm25_weight, "sentences": self.sentence_weight,
                           "year": self.year_weight}
                ranked = rrf(rankings, weights)
                if self.year_weight > 0:
                    sources = self.bm25.source_of if self.bm25 is not None else {}
                    titles = {i: document_title(sources[i]) for i, _, _ in ranked if i in sources}
                    titles |= {i: d.metadata.get("title", "") for i, (d, _) in dense.items()}
                    years = year_ranking(query, [i for i, _, _ in ranked], titles)
                    if years:
                        ranked = rrf({**rankings, "year": years}, weights)
            rerank = (self.mode == "hybrid" and self.rerank_weight > 0 and self.chunk_scores is not None
                      and self.bm25 is not None and self.bm25.vectors is not None)
            base_of = {i: doc for i, (doc, _) in dense.items()}

            def fetch(entries: list[tuple[str, float, list[str]]]) -> list[tuple[str, float, list[str]]]:
                """`entries` whose chunk is still in the store (a chunk found by BM25 alone is read from it)."""
                missing = [i for i, _, _ in entries if i not in base_of]
                if missing:
                    got = self.store._collection.get(ids=missing, include=["documents", "metadatas"])
                    base_of.update({i: Document(page_content=t, id=i, metadata=m or {})
                                    for i, t, m in zip(got["ids"], got["documents"], got["metadatas"])})
                return [r for r in entries if r[0] in base_of]

            cut = max(self.k, RERANK_TOP) if rerank else self.k
            top, rest = fetch(ranked[:cut]), ranked[cut:]
            unit_scores: dict[str, float] = {}
            if rerank and top:
                # only the top RERANK_TOP are scored, whatever --k: a longer list starts as a short one does, and
                # the rest follow them (fused alone, they score below any of them)
                head = [i for i, _, _ in top[:RERANK_TOP]]
                texts = [base_of[i].page_content for i in head]
                rows = [[text[a:b] for a, b in split_units(text) or [(0, len(text))]] for text in texts]
                titles = [base_of[i].metadata.get("title", "") for i in head]
                unit_scores = dict(zip(head, self.chunk_scores(
                    query, list(zip(titles, rows, self.bm25.row_cosines(head, query_vector))), self.bm25.abbreviations)))
                sides_of = {i: sides for i, _, sides in top}
                top = [(i, score, sides_of[i]) for i, score, _ in rrf(
                    {"fused": [i for i, _, _ in top], "units": sorted(head, key=lambda i: -unit_scores[i])},
                    {"fused": 1.0, "units": self.rerank_weight})]
            years = asked_years(query) if self.mode == "hybrid" and self.year_copies == "last" else set()
            if years:
                ranked = top + rest
                position = {r[0]: n for n, r in enumerate(ranked)}

                def read(i: str) -> tuple[str, str] | None:
                    if i not in base_of:  # past the top, the chunks are read from the store a batch at a time
                        fetch(ranked[position[i]: position[i] + self.k])
                    doc = base_of.get(i)
                    return None if doc is None else (doc.metadata.get("title", ""), doc.page_content)

                top = [ranked[position[i]] for i in year_copies_last([r[0] for r in ranked], years, read, self.k)]
            ranked = top[: self.k]
            out = []
            for doc_id, score, sides in ranked:
                base = base_of[doc_id]
                meta = {**base.metadata, "score": round(score, 6) if self.mode == "hybrid" else score, "found_by": sides}
                if self.mode == "hybrid":
                    if doc_id in dense:
                        meta["dense_score"] = dense[doc_id][1]
                    if doc_id in sentence_scores:
                        meta["sentence_score"] = sentence_scores[doc_id]
                    if doc_id in bm25_scores:
                        meta["bm25_score"] = round(bm25_scores[doc_id], 4)
                    if doc_id in unit_scores:
                        meta["unit_score"] = round(unit_scores[doc_id], 4)
                out.append(Document(page_content=base.page_content, id=doc_id, metadata=meta))
            return out

    return HybridRetriever(store=store, bm25=bm25, k=k, sources=sources, mode=mode, bm25_weight=bm25_weight,
                           fetch_k=max(fetch_k, k), abbreviations=abbreviations, year_weight=year_weight,
                           sentence_weight=sentence_weight, rerank_weight=rerank_weight, year_copies=year_copies,
                           chunk_scores=chunk_scores)
