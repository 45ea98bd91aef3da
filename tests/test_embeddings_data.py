"""Pure data transforms of `embeddings.data`: literals in, literals out (plus the real MiniLM tokenizer)."""

import json

import pytest

from embeddings.data import (
    QUESTION_SHOTS,
    Chunk,
    PairsError,
    chunk_sentences,
    clean_text,
    dated_query,
    definition_queries,
    document_year,
    ict_pairs,
    keyword_query,
    load_pairs,
    pairs_from_json,
    parse_questions,
    plain_question_prompt,
    qa_to_pairs,
    question_contexts,
    question_messages,
    read_qa_file,
    split_by_position,
    split_documents,
    split_sentences,
    styled_queries,
)
from tunerag.common import write_json_atomic


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="session")
def minilm_count(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_clean_text_collapses_whitespace_and_drops_matching_lines():
    text = "ANNUAL   REPORT\n\n  Revenue rose\t12%.  \nPage 3 of 40\nThis is not investment advice.\n"
    lines, dropped = clean_text(text, [r"^Page \d+ of \d+$", r"(?i)investment advice"])
    assert lines == ["ANNUAL REPORT", "Revenue rose 12%."]
    assert dropped == 2


def test_split_sentences_keeps_numbers_and_headings_whole():
    lines = ["RISK FACTORS", "Revenue reached $8.64 billion. Net income rose 7%! Did margins hold? Yes."]
    assert split_sentences(lines) == ["RISK FACTORS", "Revenue reached $8.64 billion.", "Net income rose 7%!",
                                      "Did margins hold?", "Yes."]


def test_chunks_fit_the_limit_overlap_and_mark_own_sentences():
    sentences = [f"Sentence {i} has exactly six words." for i in range(10)]  # 6 "tokens" each
    chunks = chunk_sentences(sentences, words, chunk_tokens=20, overlap_tokens=6)
    assert all(words(c.text) <= 20 for c in chunks)
    assert [c.sentences for c in chunks][:2] == [sentences[0:3], sentences[2:5]]  # one sentence of overlap
    assert chunks[0].own == [0, 1] and chunks[1].own == [1]
    assert " ".join(dict.fromkeys(s for c in chunks for s in c.sentences)) == " ".join(sentences)  # nothing lost


def test_a_sentence_longer_than_a_chunk_is_cut_at_words():
    long = " ".join(f"w{i}" for i in range(45))
    chunks = chunk_sentences([long], words, chunk_tokens=20, overlap_tokens=0)
    assert [words(c.text) for c in chunks] == [20, 20, 5]


def test_no_chunk_exceeds_what_minilm_reads(sample_doc, minilm_count):
    lines, _ = clean_text(sample_doc.read_text())
    chunks = chunk_sentences(split_sentences(lines), minilm_count, chunk_tokens=254, overlap_tokens=32)
    assert len(chunks) > 20
    assert max(minilm_count(c.text) for c in chunks) <= 254  # + [CLS] [SEP] = 256, MiniLM's max_seq_length
    assert min(minilm_count(c.text) for c in chunks[:-1]) > 150  # packed, not one sentence per chunk


def test_split_by_position_puts_the_tail_in_val():
    sentences = [f"s{i} a b c" for i in range(10)]
    train, val = split_by_position(sentences, words, 0.2)
    assert train == sentences[:8] and val == sentences[8:]


def test_split_documents_is_seeded_and_disjoint():
    docs = [f"d{i}.txt" for i in range(10)]
    train, val = split_documents(docs, 0.2, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == docs
    assert split_documents(docs, 0.2, seed=1) == (train, val)


def test_ict_takes_own_sentences_out_of_the_passage():
    sentences = ["Revenue rose to 8.6 billion dollars.", "Net income rose to 2.1 billion dollars.",
                 "The board raised the dividend by ten percent.", "Hi."]
    chunk = Chunk("doc", 0, " ".join(sentences), sentences, own=[0, 1, 2, 3])
    queries, passage = ict_pairs(chunk, 2, seed=7)
    assert len(queries) == 2 and "Hi." not in queries  # too short to be a query
    assert all(q in sentences and q not in passage for q in queries)
    assert ict_pairs(chunk, 2, seed=7) == (queries, passage)  # deterministic for a seed
    shared = Chunk("doc", 1, " ".join(sentences), sentences, own=[])
    assert ict_pairs(shared, 2, seed=7) == ([], shared.text)


def test_llm_prompts_ask_one_question_per_picked_sentence_after_two_examples():
    sentences = ["The bank sold its leasing unit.", "It received $415 million in cash for the unit.",
                 "The board raised the dividend by ten percent.", "Hi."]
    chunk = Chunk("doc", 0, " ".join(sentences), sentences, own=[0, 1, 2, 3])
    contexts = question_contexts(chunk, 2, seed=7)
    assert len(contexts) == 2 and question_contexts(chunk, 2, seed=7) == contexts
    # each context ends with a picked sentence and starts with the one before it (what "It" refers to)
    for context in contexts:
        i = next(i for i, s in enumerate(sentences) if context.endswith(s))
        assert i < 3 and context == " ".join(sentences[max(0, i - 1): i + 1])
    assert question_contexts(chunk, 9, seed=7) == [sentences[0], " ".join(sentences[:2]), " ".join(sentences[1:3])]
    shared = Chunk("doc", 1, chunk.text, sentences, own=[])
    assert question_contexts(shared, 2, seed=7) == [chunk.text]  # no sentence of its own: the whole chunk
    messages = question_messages(contexts[0], seed=7)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert contexts[0] in messages[-1]["content"] and "one question" in messages[-1]["content"]
    assert {m["content"] for m in messages[1:4:2]} <= {q for _, q in QUESTION_SHOTS}
    plain = plain_question_prompt(messages)
    assert plain.endswith("Question:") and plain.count("Question: ") == 2 and contexts[0] in plain


def test_parse_questions_handles_numbering_bullets_and_junk():
    output = """Here are two questions:

1. What was total revenue in 2025?
2) what was total revenue in 2025 ?
- How much did the bank pay for Bayline Capital?
Question 3: Why? 
Q4: Which rating did the senior notes receive? 5. Who is the CEO of the group?
The answer is 8.64 billion."""
    questions, counts = parse_questions(output, n=3)
    assert questions == ["What was total revenue in 2025?", "How much did the bank pay for Bayline Capital?",
                         "Which rating did the senior notes receive?"]
    assert counts == {"kept": 3, "not_question": 2, "too_short": 1, "duplicate": 1, "extra": 1}


def test_parse_questions_of_pure_junk_keeps_nothing():
    assert parse_questions("Question: What is the answer to the question: What is", 2)[0] == []
    assert parse_questions("", 2) == ([], {"kept": 0, "not_question": 0, "too_short": 0, "duplicate": 0, "extra": 0})


def test_query_styles_say_the_question_as_keywords_and_with_its_documents_year():
    assert keyword_query("What was the CET1 ratio at the end of the year?") == "CET1 ratio end year"
    assert keyword_query("How much did the bank pay for Bayline Capital, in $ millions?") == "much bank pay Bayline Capital $ millions"
    assert keyword_query("What is it?") is None  # nothing left to search for
    assert dated_query("What was the CET1 ratio at the end of the year?", "2024") == "What was the CET1 ratio at the end of 2024?"
    assert dated_query("What drove the fiscal year's expenses?", "2024") == "What drove 2024's expenses?"
    assert dated_query("What was net income in 2023?", "2024") is None  # a year is said already
    assert [document_year(n) for n in ("halvorsen_ridge_2024_annual_report.txt:train", "deck_2023_vs_2024.pdf",
                                       "credit_policy.txt", "reports/2024/q3.txt", "scan_120245.txt")] == [
        "2024", None, None, None, None]
    question = "What was the CET1 ratio at the end of the year?"
    assert styled_queries([question], ["keyword", "dated"], "2024") == [
        question, "CET1 ratio end year", "What was the CET1 ratio at the end of 2024?"]
    assert styled_queries([question], ["dated"], None) == [question]  # no year known: no dated variant
    assert styled_queries([question], ["definition"], "2024") == [question]  # made from sentences, not questions
    assert styled_queries(["What was net income in 2024?"], ["dated", "keyword"], "2024") == [
        "What was net income in 2024?", "net income 2024"]


def test_definition_queries_ask_what_a_quoted_defined_term_means():
    assert definition_queries("2.2 'Customer Due Diligence' or 'CDD' means the measures taken to identify a customer.") == [
        "What does Customer Due Diligence mean?", "What is CDD?"]
    assert definition_queries('An "event of default" with respect to a series of notes means any of the following:') == [
        "What does event of default mean?"]
    assert definition_queries("\u201cTreasury Rate\u201d is defined as the yield on the determination date.") == [
        "What does Treasury Rate mean?"]
    for sentence in ("The CET1 ratio means a lot to us.", "2.1 In this policy the following terms have the meanings below.",
                     "For these purposes, a retail investor means a person who is a retail client."):
        assert definition_queries(sentence) == []  # no quoted term defined


GOOD = {"queries": {"q1": "What was revenue?"}, "corpus": {"c1": "Revenue was $8.64 billion.", "c2": "Other."},
        "relevant_docs": {"q1": ["c1"]}, "mode": "text"}


def test_pairs_round_trip_through_the_llamaindex_layout(tmp_path):
    write_json_atomic(tmp_path / "p.json", GOOD)
    pairs = load_pairs(tmp_path / "p.json")
    assert pairs.to_json() == GOOD
    assert pairs.anchor_positive() == (["What was revenue?"], ["Revenue was $8.64 billion."])
    assert pairs.ir_dicts()[2] == {"q1": {"c1"}}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temp file left behind


@pytest.mark.parametrize("data, message", [
    ([1, 2], "is not a JSON object with 'queries'"),
    ({"queries": {}, "corpus": {}}, "is not a JSON object with 'queries'"),
    ({**GOOD, "corpus": ["a"]}, "'corpus' must be an object"),
    ({**GOOD, "queries": {"q1": 3}}, "'queries' entries are not non-empty strings"),
    ({**GOOD, "relevant_docs": {"q1": []}}, "must be a non-empty list"),
    ({**GOOD, "relevant_docs": {"q9": ["c1"]}}, "keys are not in its queries"),
    ({**GOOD, "relevant_docs": {"q1": ["c1", "c7"]}}, "1 relevant corpus ids are not in its corpus (first: 'c7')"),
])
def test_bad_pairs_files_give_one_line(data, message):
    with pytest.raises(PairsError, match=None) as e:
        pairs_from_json(data, "val.json")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_pairs_names_missing_and_broken_files(tmp_path):
    with pytest.raises(PairsError, match="does not exist; make it with"):
        load_pairs(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PairsError, match="is not valid JSON"):
        load_pairs(tmp_path / "bad.json")


def test_read_qa_file_json_jsonl_csv(tmp_path):
    rows = [{"question": "What was revenue?", "answer": "$8.64 billion"},
            {"question": "How large was revenue?", "answer": "$8.64 billion"},
            {"question": "Who bought the leasing arm?", "answer": "Bayline Capital"},
            {"question": "", "answer": "skipped"}]
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "qa.csv").write_text("Question,Answer\n" + "\n".join(f'"{r["question"]}","{r["answer"]}"' for r in rows))
    for name in ("qa.json", "qa.jsonl", "qa.csv"):
        qa, skipped = read_qa_file(tmp_path / name)
        assert len(qa) == 3 and skipped == 1, name
    train, val = qa_to_pairs(qa, 0.5, seed=0)
    assert len(train.corpus) == 1 and len(val.corpus) == 1  # two distinct answers, one per side
    assert sorted(train.corpus.values()) + sorted(val.corpus.values()) != []
    both = {**train.queries, **val.queries}
    assert len(both) == 3 and not set(train.corpus) & set(val.corpus)


def test_qa_file_without_the_columns_says_which_it_found(tmp_path):
    (tmp_path / "qa.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(PairsError, match=r"needs a question column .* found \['completion', 'prompt'\]"):
        read_qa_file(tmp_path / "qa.csv")


def test_csv_row_with_extra_fields_is_one_clear_error(tmp_path):
    # an unquoted comma in an answer: DictReader files the extra field under a None key
    (tmp_path / "qa.csv").write_text("question,answer\nWhat was revenue?,$8.64 billion\nWho bought it?,Bayline, a lessor\n")
    with pytest.raises(PairsError, match=r"line 3 has more fields than its header \(2\); quote values") as e:
        read_qa_file(tmp_path / "qa.csv")
    assert "\n" not in str(e.value)
    (tmp_path / "ok.csv").write_text('question,answer\nWho bought it?,"Bayline, a lessor"\n')
    assert read_qa_file(tmp_path / "ok.csv") == ([("Who bought it?", "Bayline, a lessor")], 0)
