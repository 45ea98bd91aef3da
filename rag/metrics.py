"""How retrieval and answers are scored against data/finance_qa.json (tests and scripts/bench_rag.py).

A retrieved chunk *answers* an item when it holds the item's whole `passage`, or, because a chunk
boundary can cut the passage, when it holds the `answer` span and the first or the last half of
the passage (compared after collapsing whitespace). recall@k is the share of questions with at least
one answering chunk among the top k.

An answer *matches* when it contains the expected `answer` string, case-insensitive, after
normalising whitespace, thousands separators and the spacing around "$" and "%".
"""

from __future__ import annotations

import re


def squash(text: str) -> str:
    return " ".join(text.split())


def chunk_answers(chunk: str, passage: str, answer: str) -> bool:
    chunk, passage = squash(chunk), squash(passage)
    if passage in chunk:
        return True
    half = len(passage) // 2
    return squash(answer) in chunk and (passage[: len(passage) - half] in chunk or passage[half:] in chunk)


def recall_at_k(retrieved: list[list[str]], items: list[dict]) -> float:
    """Share of items whose retrieved chunk texts include one that answers them."""
    hits = sum(any(chunk_answers(c, it["passage"], it["answer"]) for c in chunks) for chunks, it in zip(retrieved, items))
    return hits / len(items) if items else 0.0


def normalise_answer(text: str) -> str:
    text = squash(text).lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 21,400 -> 21400
    text = re.sub(r"\$\s+", "$", text)
    return re.sub(r"\s+%", "%", text)


def answer_matches(answer: str, expected: str) -> bool:
    return normalise_answer(expected) in normalise_answer(answer)
