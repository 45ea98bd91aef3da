"""The shipped finance data: the document, its question set, and the instruction set."""

import json


def test_document_is_a_real_length(sample_doc):
    words = len(sample_doc.read_text(encoding="utf-8").split())
    assert 4000 <= words <= 8000


def test_every_answer_and_passage_is_in_the_document(sample_doc, sample_qa):
    doc = sample_doc.read_text(encoding="utf-8")
    qa = json.loads(sample_qa.read_text(encoding="utf-8"))
    assert len(qa) >= 40
    assert len({item["id"] for item in qa}) == len(qa)
    for item in qa:
        assert item["question"].strip().endswith("?") or len(item["question"].split()) > 3, item["id"]
        assert item["answer"] in item["passage"], item["id"]
        assert item["passage"] in doc, item["id"]


def test_instruction_set_has_alpaca_columns(sample_alpaca):
    rows = json.loads(sample_alpaca.read_text(encoding="utf-8"))
    assert len(rows) >= 300
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"].strip() and row["output"].strip()
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
