"""Evidence-first context for small LLMs, and the evidence and citations of an answer.

A 135M model reads 1,000 tokens of passages badly and the right sentence or two well. So
(`--context sentences`) each retrieved chunk is cut into units - sentences, and table rows or other
long runs cut to at most MAX_UNIT_WORDS words, a heading or caption read on over what follows it
(passage_units), a table row read after its column headings (table_headers) - every unit is scored against
the question (cosine of the embedder with the question's abbreviations spelled out, plus the share of the
question's BM25 terms it holds - an abbreviation held by its long form too - plus a little for holding the
kind of answer asked for: a figure, or a name or a definition (asks_for); a sentence that states a better
table row's figure takes the row's place: score_units), and the best units are kept up to a token
budget, in document order within their chunk. A passage in the prompt is then one chunk's kept units;
`[n]` numbers passages in rank order. The retriever re-ranks its top chunks by the same score of their best
sentence (chunk_scores, from its stored sentence vectors).

After the answer, `evidence` is the unit of those passages that best supports it (the answer's numbers
and words, then the question; a unit holding a figure and the question's abbreviations spelled out count,
as for the extractive answer), with its source, page and character offsets in the document; and
`citations` are the passage numbers the answer cites as `[n]`, or else the evidence's passage.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rag.abbreviations import abbreviations_in, defined_in, spelled_out
from rag.retrieve import FRAGMENT_WORDS, NAME, YEAR, bm25_tokens, split_units

# Weight of the question-term share against the embedder's cosine. Picking one sentence (the extractive
# answer, the evidence): the best sentence of the hybrid top 4 held the answer for 0.611 of the tuning
# halves' questions (mean of sample, long, policy) at 0.5, 0.627 at 1.5, 0.633 at 2.0, 0.627 at 3.0.
# The LLM's context is chosen by the same score (with FIGURE_WEIGHT and the question spelled out): on the
# first 80 questions of the long corpus's tuning half SmolLM2's answer held the figure for 0.212 with
# the old context score (weight 0.5, no figure weight) and 0.275 with this one (160 tokens each; rag.cli's
# --context-tokens 40 then made it 0.388, see README).
LEXICAL_WEIGHT = 2.0
# A figure in a unit, against the question: most questions about a filing ask for one (a heading or an
# introduction sentence otherwise wins on the question's words). Picking one sentence of the hybrid top 4
# (tuning halves; with the question's abbreviations spelled out for the cosine): sample / long / policy
# 0.606 / 0.551 / 0.741 before, 0.606 / 0.593 / 0.765 at 0.2 and 0.606 / 0.593 / 0.788 at 0.3 (FINANCE's
# abbreviations only), 0.606 / 0.593 / 0.800 at 0.3 as built (scripts/bench_rag.py --split tune).
FIGURE_WEIGHT = 0.3
# What a question asks for, when not a figure: a name ("Who ...?") or a definition ("How does the policy define
# a Connected Group?", or any question that names the glossary: "What does the 2025 glossary say notable items
# include?"), and how a unit that gives a definition reads ("'Structuring' means ...", a glossary's
# "Net stable funding ratio (NSFR): The ratio of ...").
WHO = re.compile(r"^\W*(?:who|whom|whose)\b", re.IGNORECASE)
DEFINE = re.compile(r"\bdefine[sd]?\b|\bdefinition\b|\bwhat does\b.*\bmean\b|\bmeaning of\b|\bglossary\b",
                    re.IGNORECASE)
DEFINES = re.compile(r"\bmeans\b|\bis defined as\b|\brefers to\b|^[^:|]{3,80}:\s", re.IGNORECASE)
CITATION = re.compile(r"\[(\d{1,2})\]")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# A number that labels rather than measures: a clause's own number at the start of its line ("13.3 A breach
# of any limit..."), a reference ("Table 16", "Note 7", "Item 7A", "section 4.2") or a grade on a scale
# ("Risk Grade 6", "Tier 2 Models", "Stage 1"). Such a unit holds no figure (a caption or a clause that
# mentions a table otherwise took the figure weight from the row that answers).
LABEL = re.compile(r"^\s*\(?\d+(?:\.\d+)*[.)]?(?=\s)|\b(?:tables?|notes?|items?|parts?|sections?|articles?|"
                   r"clauses?|chapters?|schedules?|appendix|exhibits?|figures?|pages?|paragraphs?|stages?|tiers?|"
                   r"levels?|grades?)\s+\d+(?:\.\d+)*[A-Za-z]?\b", re.IGNORECASE)
# A figure as written: "1,233", "$1.23 billion", "9.6%" (value, scale word or "%")
FIGURE = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*(%|billion|million|thousand)?", re.IGNORECASE)
SCALES = {"": 1, "thousand": 1e3, "million": 1e6, "billion": 1e9}
TABLE_SCALES = (1, 1e3, 1e6)  # a table's figures are in units, thousands or millions ("(Dollars in millions)")
CELL = " | "  # how tunerag.documents writes a table row's cells


@dataclass
class Unit:
    doc: int  # index of its passage in the retrieved list
    start: int  # character offsets in the passage text
    end: int
    text: str
    score: float = 0.0
    title: str = ""  # its document's title (rag.index.document_title): the year or filing the unit is from
    head: str = ""  # a fragment's own words, which it is scored on (read_as); `text` runs on over the next unit
    header: str = ""  # a table row's column headings (the first row of its table in the passage)

    @property
    def own(self) -> str:
        """The unit's own words: a fragment's (`head`), else its text."""
        return self.head or self.text

    @property
    def read_as(self) -> str:
        """What the question is matched against: a table row after its column headings, else `own`."""
        return f"{self.header} {self.own}" if self.header else self.own


def lexical_overlap(question_terms: set[str], unit_terms: set[str] | list[str]) -> float:
    return len(question_terms & set(unit_terms)) / len(question_terms) if question_terms else 0.0


def abbreviation_terms(question: str, defined: dict[str, str]) -> dict[str, set[str]]:
    """{BM25 term of an abbreviation in `question`: its long form's terms} ("nsfr": {"net", "stabl", "fund",
    "ratio"}); `defined`: the documents' own abbreviations (rag.abbreviations.defined_in)."""
    found = abbreviations_in(question, defined)
    if not found:
        return {}
    return {short[0]: set(long) for short, long in zip(bm25_tokens(list(found)), bm25_tokens(list(found.values())))
            if short and long}


def has_figure(text: str) -> bool:
    """Whether `text` holds a number other than a bare year or a label (LABEL)."""
    return any(not YEAR.fullmatch(n) for n in NUMBER.findall(LABEL.sub(" ", text)))


def figures(text: str) -> list[tuple[float, int, str]]:
    """(value, decimals written, "%" or scale word or "") of each figure in `text`, bare years left out."""
    out = []
    for whole, fraction, unit in FIGURE.findall(text):
        if not fraction and not unit and YEAR.fullmatch(whole):
            continue
        out.append((float(whole.replace(",", "") + fraction), len(fraction) - 1 if fraction else 0, unit.lower()))
    return out


def has_new_name(text: str, question: str, common: set[str]) -> bool:
    """Whether `text` holds a proper name (NAME) the question does not: one whose words are never written in
    lower case in the passages (`common`), so "Rosalind Okonjo" counts and a title or defined term ("Chief
    Credit Officer", "Material Exception") does not."""
    return any(name not in question and all(w.lower() not in common for w in re.findall(r"[A-Za-z]+", name))
               for name in NAME.findall(text))


def asks_for(question: str) -> str:
    """What kind of answer `question` wants: "name" (Who ...?), "definition" (How does it define ...?) or
    "figure" (the rest: most questions about a filing ask for one)."""
    return "name" if WHO.match(question) else "definition" if DEFINE.search(question) else "figure"


def holds_answer_kind(kind: str, text: str, question: str, common: set[str]) -> bool:
    """Whether a unit's `text` holds an answer of `kind` (asks_for); `common`: see has_new_name."""
    if kind == "name":
        return has_new_name(text, question, common)
    if kind == "definition":
        return bool(DEFINES.search(LABEL.sub("", text)))
    return has_figure(text)


def restates(cell: tuple[float, int, str], said: tuple[float, int, str]) -> bool:
    """Whether a sentence's figure `said` ("$1.23 billion") is a table cell's figure (1,233 in a table in
    millions) at the sentence's precision. Three significant figures at least, so "2" never restates 2,000."""
    (value, _, cell_unit), (number, decimals, unit) = cell, said
    if "%" in (cell_unit, unit):
        return cell_unit == unit and value == number
    if cell_unit or len(f"{number:.{decimals}f}".replace(".", "").lstrip("0")) < 3:
        return value == number and decimals > 0
    scale = SCALES[unit]
    return any(scale >= t and round(value * t / scale, decimals) == number for t in TABLE_SCALES)


def prefer_sentences_to_rows(units: list[Unit]) -> None:
    """A sentence that states a figure of a better-scoring table row takes that row's score and a hair more.
    "Noninterest income was $1.23 billion in 2023" says what "Total noninterest income | 1,233 | 1,298"
    leaves to the column headings (which year, which unit), so it is the better evidence and the better
    context line. Long corpus, tuning half, best unit of the hybrid top 4: 0.635 -> 0.695 of questions,
    sample and policy unchanged."""
    rows = sorted((u for u in units if CELL in u.own), key=lambda u: -u.score)
    for row in rows:
        cells = figures(row.text)
        for unit in units:
            if CELL not in unit.own and unit.score <= row.score and any(
                    restates(cell, said) for said in figures(unit.own) for cell in cells):
                unit.score = row.score + 1e-6


@dataclass
class Asked:
    """What scoring a unit needs of the question (score_units, chunk_scores)."""

    question: str
    terms: set[str]  # its BM25 terms
    long_terms: dict[str, set[str]]  # its abbreviations' long forms' terms (abbreviation_terms)
    kind: str  # what it asks for (asks_for)
    common: set[str]  # for a "name" question: the words the passages write in lower case (has_new_name)

    @classmethod
    def of(cls, question: str, texts: list[str], defined: dict[str, str] | None) -> Asked:
        """`texts`: the passages' units; `defined`: the documents' abbreviations, or None for no long forms."""
        kind = asks_for(question)
        return cls(question, set(bm25_tokens([question])[0]),
                   abbreviation_terms(question, defined) if defined is not None else {}, kind,
                   {w for t in texts for w in re.findall(r"\b[a-z]+\b", t)} if kind == "name" else set())

    def score(self, cosine: float, terms: list[str] | set[str], own: str, lexical_weight: float,
              figure_weight: float) -> float:
        """cosine + lexical_weight * share of the question's terms among `terms` (an abbreviation of the
        question counts as held when `terms` hold all of its long form's) + figure_weight if `own` holds what the
        question asks for."""
        terms = set(terms)
        held = terms | {short for short, long in self.long_terms.items() if long <= terms}
        score = cosine + lexical_weight * lexical_overlap(self.terms, held)
        if figure_weight and holds_answer_kind(self.kind, own, self.question, self.common):
            score += figure_weight
        return score


def score_units(question: str, units: list[Unit], embed: Callable[[list[str]], list[list[float]]],
                lexical_weight: float = LEXICAL_WEIGHT, figure_weight: float = 0.0, spell_out: bool = False) -> None:
    """Set each unit's score: cosine(question, unit) + lexical_weight * share of the question's terms in it
    + figure_weight if it holds what the question asks for (asks_for, holds_answer_kind). `spell_out`: the
    question's abbreviations are read as their long forms too (rag.abbreviations): the cosine is the spelled-out
    question's (as the dense retriever reads it), and a unit that holds all of a long form's terms holds the
    abbreviation ("The net interest margin widened to 3.42%" holds "NIM")."""
    defined = defined_in([u.text for u in units]) if spell_out else None
    vectors = embed([spelled_out(question, defined) if spell_out else question] + [u.read_as for u in units])
    q = vectors[0]
    asked = Asked.of(question, [u.text for u in units], defined)
    for unit, vec, terms in zip(units, vectors[1:], bm25_tokens([f"{u.title} {u.read_as}" for u in units])):
        unit.score = asked.score(sum(a * b for a, b in zip(q, vec)), terms, unit.own, lexical_weight, figure_weight)
    prefer_sentences_to_rows(units)


def chunk_scores(question: str, chunks: list[tuple[str, list[str], list[float]]],
                 defined: dict[str, str]) -> list[float]:
    """Each chunk's best sentence score, as the extractive answer scores sentences (score_units, with
    FIGURE_WEIGHT and long forms) but from cosines already known: the retriever's stored sentence vectors
    (rag.retrieve, --rerank-weight). `chunks`: (its document's title, its sentences, their cosines with the
    spelled-out question); `defined`: the documents' abbreviations."""
    texts = [row for _, rows, _ in chunks for row in rows]
    asked = Asked.of(question, texts, defined)
    terms = bm25_tokens([f"{title} {row}" for title, rows, _ in chunks for row in rows]) if texts else []
    best, start = [], 0
    for _, rows, cosines in chunks:
        mine, start = terms[start:start + len(rows)], start + len(rows)
        best.append(max((asked.score(cosine, row_terms, row, LEXICAL_WEIGHT, FIGURE_WEIGHT)
                         for row, cosine, row_terms in zip(rows, cosines, mine)), default=float("-inf")))
    return best


def table_headers(text: str) -> dict[int, str]:
    """{start of a table row's line: the first row of its table} for the rows after the first of each run of
    table lines (lines with CELL) in `text`."""
    headers, first, start = {}, None, 0
    for line in text.split("\n"):
        if CELL not in line:
            first = None
        elif first is None:
            first = line
        else:
            headers[start] = first
        start += len(line) + 1
    return headers


def passage_units(docs: list[Any]) -> list[Unit]:
    """The units of each passage; offsets are in the chunk's text (a cut-down passage lists its own). A
    fragment (fewer than FRAGMENT_WORDS words: a run-in heading "Launch of RidgeLink.", a table's caption) is
    scored on its own words and reads on over the unit after it, so what it introduces comes with it;
    scored on the joined words instead, a short sentence's neighbour out-scored the answer by their union
    (sample report, tuning half: 2 of 33 extractive answers lost)."""
    units = []
    for i, d in enumerate(docs):
        title = d.metadata.get("title", "")
        kept = d.metadata.get("units")
        if kept is not None:
            units += [Unit(i, s, e, text, title=title) for s, e, text in kept]
            continue
        spans = split_units(d.page_content)
        headers = table_headers(d.page_content)
        for n, (s, e) in enumerate(spans):
            head = d.page_content[s:e]
            header = headers.get(d.page_content.rfind("\n", 0, s) + 1, "")
            if len(head.split()) < FRAGMENT_WORDS and n + 1 < len(spans):
                units.append(Unit(i, s, spans[n + 1][1], d.page_content[s:spans[n + 1][1]], title=title, head=head,
                                  header=header))
            else:
                units.append(Unit(i, s, e, head, title=title, header=header))
    return units


def evidence_passages(question: str, docs: list[Any], embed, count_tokens: Callable[[str], int], budget_tokens: int,
                      lexical_weight: float = LEXICAL_WEIGHT, figure_weight: float = FIGURE_WEIGHT,
                      keep: Callable[[str], bool] | None = None) -> list[Any]:
    """The retrieved `docs` cut down to their best-scoring units (see the module docstring). Each
    returned Document keeps its metadata plus "units": [start, end, text] of its kept units in the chunk.
    `keep`: units it accepts are kept first, whatever their score (rag.raft's oracle sentence)."""
    from langchain_core.documents import Document

    units = passage_units(docs)
    if not units:
        return docs
    score_units(question, units, embed, lexical_weight, figure_weight, spell_out=True)
    kept: set[int] = set()
    used = 0
    for n in sorted(range(len(units)), key=lambda n: (not (keep and keep(units[n].text)), -units[n].score)):
        cost = count_tokens(units[n].text)
        if kept and used + cost > budget_tokens:
            continue
        kept.add(n)
        used += cost
    out = []
    for i, doc in enumerate(docs):
        mine, reach = [], -1
        for start, end, text in sorted((u.start, u.end, u.text) for u in (units[n] for n in kept) if u.doc == i):
            if end > reach:  # a fragment's unit runs on over the next one: that one is not kept twice
                mine.append((start, end, text))
                reach = end
        if not mine:
            continue
        best = max(units[n].score for n in kept if units[n].doc == i)
        out.append((best, Document(page_content=" ".join(text for _, _, text in mine), id=doc.id,
                                   metadata={**doc.metadata, "units": mine})))
    # passages in rank order of their best unit: the first passage holds the best evidence
    return [d for _, d in sorted(out, key=lambda pair: -pair[0])]


def best_unit(question: str, docs: list[Any], embed, lexical_weight: float = LEXICAL_WEIGHT,
              figure_weight: float = FIGURE_WEIGHT) -> Unit | None:
    """The unit of `docs` that best matches the question (the extractive answer)."""
    units = passage_units(docs)
    if not units:
        return None
    score_units(question, units, embed, lexical_weight, figure_weight, spell_out=True)
    return max(units, key=lambda u: u.score)


def support(answer: str, question: str, docs: list[Any], embed, lexical_weight: float = LEXICAL_WEIGHT,
            figure_weight: float = FIGURE_WEIGHT) -> Unit | None:
    """The unit of the passages that best supports `answer`: most of the answer's numbers, then of its
    words, then the best match for the question."""
    units = passage_units(docs)
    if not units:
        return None
    score_units(question, units, embed, lexical_weight, figure_weight, spell_out=True)
    numbers = set(NUMBER.findall(answer))
    a_terms = set(bm25_tokens([answer])[0])
    for unit, terms in zip(units, bm25_tokens([u.text for u in units])):
        unit.score += 2.0 * (len(numbers & set(NUMBER.findall(unit.text))) / len(numbers) if numbers else 0.0)
        unit.score += lexical_overlap(a_terms, terms)
    return max(units, key=lambda u: u.score)


def evidence_record(unit: Unit | None, docs: list[Any]) -> dict | None:
    """{"text", "passage", "source", "page", "chunk", "start", "end"}: start/end are character offsets in
    the document's text as read (all pages of a PDF joined), so document_text[start:end] == text."""
    if unit is None:
        return None
    meta = docs[unit.doc].metadata
    base = meta.get("start_index")
    offset = base if isinstance(base, int) else 0
    return {"text": unit.text, "passage": unit.doc + 1, "source": meta.get("source"), "page": meta.get("page"),
            "chunk": meta.get("chunk"), "start": offset + unit.start, "end": offset + unit.end}


def citations(answer: str, n_passages: int, evidence: dict | None) -> list[int]:
    """Passage numbers cited as [n] in the answer (valid ones, in order), or else the evidence's passage."""
    cited = list(dict.fromkeys(int(m) for m in CITATION.findall(answer) if 1 <= int(m) <= n_passages))
    if not cited and evidence is not None:
        cited = [evidence["passage"]]
    return cited
