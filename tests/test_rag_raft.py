"""rag.raft: grounded fine-tuning data built with rag's own retriever and prompt code, and the
multi-source training mix of llm_finetune.train."""

import json

import pytest
from langchain_core.documents import Document

from llm_finetune.data import build_examples, mix_sources, split_rows
from rag.chain import NO_ANSWER, is_no_answer
from rag.raft import (RaftConfig, answering_unit, covers, foreign_questions, holds, is_part, main, place_gold,
                      target_unit)


def test_target_unit_is_the_longest_shown_piece_of_the_evidence():
    evidence = "Net interest income rose 6% to $5.71 billion in 2025, the highest in our history."
    shown = [Document(page_content="Other text. Fees fell.", metadata={"units": [(0, 11, "Other text."), (12, 22, "Fees fell.")]}),
             Document(page_content="Net interest income rose 6% to $5.71 billion in 2025, the highest in our history.",
                      metadata={"units": [(0, 80, "Net interest income rose 6% to $5.71 billion in 2025,"),
                                          (0, 80, "Net interest income rose 6% to $5.71 billion in 2025, the highest in our history.")]})]
    assert target_unit(shown, evidence) == (2, evidence)
    assert target_unit(shown[:1], evidence) is None
    assert holds("A  NET interest\nincome rose", "net interest income")


def test_answering_unit_finds_the_same_fact_in_other_words():
    evidence = "Net interest income rose 6% to $5.71 billion in 2025, the highest in our history."
    highlights = "Highlights: net interest income $5.71 billion (+6%)."
    shown = [Document(page_content="Fees fell in 2025."), Document(page_content=highlights)]
    assert answering_unit(shown, evidence, None) == (2, highlights)  # every figure of the evidence (not the year)
    assert answering_unit(shown[:1], evidence, None) is None  # the year alone is no figure
    assert answering_unit(shown, "The bank grew in 2025.", None) is None  # an evidence without figures: unknown
    assert answering_unit(shown, evidence, "$5.71 billion") == (2, highlights)  # a known answer decides
    assert answering_unit(shown, evidence, "$9.99 billion") is None


def test_foreign_questions_are_tune_halves_of_corpora_not_given():
    from tunerag.samples import corpus_files, corpus_questions

    assert covers(corpus_files("long")[0] / "meridian_rating_methodology.txt", "long")  # a file inside
    assert covers(corpus_files("long")[0].parent, "long")  # a folder above
    assert not covers(corpus_files("sample")[0], "long")
    cfg = RaftConfig(docs=corpus_files("long"), seed=3)
    picked = foreign_questions(cfg, 40)
    asked = {q for q, _, _ in picked}
    tune = {i["question"] for c in ("sample", "policy") for i in corpus_questions(c, "tune")}
    assert len(picked) == 40 and asked <= tune  # never the held-out halves, never the given corpus
    assert picked == foreign_questions(cfg, 40) and {s for _, _, s in picked} <= {"train", "val"}
    assert len(foreign_questions(RaftConfig(docs=[corpus_files(c)[0] for c in ("sample", "long", "policy")]), 5)) == 0


def test_place_gold_puts_the_answering_chunk_among_the_distractors():
    import random

    docs = [Document(page_content=f"d{i}", id=str(i)) for i in range(4)]
    gold = Document(page_content="gold", id="g")
    placed = place_gold(docs, gold, 4, random.Random(0))
    assert len(placed) == 4 and "g" in [d.id for d in placed] and docs[3] not in placed
    assert place_gold(docs, docs[2], 4, random.Random(0)) == docs  # already retrieved: unchanged
    spots = {[d.id for d in place_gold(docs, gold, 4, random.Random(s))].index("g") for s in range(30)}
    assert spots == {0, 1, 2, 3}


def test_mix_sources_keeps_the_shares_and_repeats_no_row():
    grounded, instructions = [{"g": i} for i in range(40)], [{"i": i} for i in range(100)]
    mixed = mix_sources([grounded, instructions], [4, 1], seed=0)
    assert len(mixed) == 50 and sum("g" in r for r in mixed) == 40
    assert len({json.dumps(r) for r in mixed}) == len(mixed)
    assert mix_sources([grounded, instructions], None, seed=0, limit=7) == mix_sources([grounded, instructions], None, seed=0)[:7]
    assert len(mix_sources([grounded, instructions], None, seed=0)) == 140


def test_split_rows_honours_a_split_column():
    rows = [{"x": i, "split": "val" if i < 3 else "train"} for i in range(10)]
    train, val = split_rows(rows, 0.5, seed=0)
    assert [r["x"] for r in val] == [0, 1, 2] and len(train) == 7
    train, val = split_rows([{"x": i} for i in range(10)], 2, seed=0)  # no column: a seeded draw
    assert len(val) == 2 and len(train) == 8


def test_no_answer_wordings():
    assert is_no_answer(NO_ANSWER) and is_no_answer("The passages do not contain the answer.")
    assert not is_no_answer("Net interest income was $5.71 billion. [1]")


@pytest.fixture(scope="module")
def raft_run(tmp_path_factory, sample_doc):
    out = tmp_path_factory.mktemp("raft") / "rag_sft.jsonl"
    cfg = RaftConfig(docs=[sample_doc], out=out, questions=12, p_missing=0.25, p_foreign=0.2,
                     persist_dir=out.parent / "chroma")
    return cfg, main(cfg)


def test_rows_quote_a_shown_sentence_and_cite_its_passage(raft_run):
    from tunerag.samples import corpus_questions

    cfg, stats = raft_run
    rows = [json.loads(line) for line in cfg.out.read_text().splitlines()]
    assert len(rows) == stats["rows"] > 0 and stats["kinds"]["answer"] > 0 and {"train", "val"} <= {r["split"] for r in rows}
    for row in rows:
        system, user, answer = row["messages"]
        assert system["role"] == "system" and user["content"].startswith("Question: ")
        if row["kind"] == "answer":
            sentence, cite = answer["content"].rsplit(" [", 1)
            passage = user["content"].split(f"[{cite[:-1]}] ", 1)[1].split("\n\n")[0]
            assert " ".join(sentence.split()) in " ".join(passage.split()), row
        else:
            assert answer["content"] == NO_ANSWER
        if row["kind"] == "missing":
            assert not holds(user["content"], row["evidence"])
            assert answering_unit([Document(page_content=user["content"])], row["evidence"], None) is None
    foreign = [r for r in rows if r["kind"] == "foreign"]
    assert len(foreign) == stats["kinds"]["foreign"] > 0  # --p-foreign 0.2 of 12 questions, about other corpora
    other = {i["question"] for c in ("long", "policy") for i in corpus_questions(c, "tune")}
    assert all(r["messages"][1]["content"].split("\n", 1)[0].removeprefix("Question: ") in other for r in foreign)


def test_rows_are_the_prompt_rag_cli_sends(raft_run):
    """Training and use cannot drift apart: a row whose answering chunk was retrieved holds exactly the
    prompt that rag.cli's own chain renders for that question."""
    from rag.chain import build_prompt_step
    from rag.cli import Answerer
    from rag.config import RagConfig
    from rag.context import evidence_passages
    from rag.chain import count_tokens
    from tunerag.models import load_tokenizer, resolve_llm

    cfg, _ = raft_run
    rows = [json.loads(line) for line in cfg.out.read_text().splitlines()]
    row = next(r for r in rows if r["kind"] == "answer" and r["retrieved"])
    tokenizer = load_tokenizer(resolve_llm("smollm2"))
    answerer = Answerer(RagConfig(file=cfg.docs, retrieve_only=True, persist_dir=cfg.persist_dir), 0.0)
    select = lambda q, docs: evidence_passages(q, docs, answerer.embeddings.embed_documents,  # noqa: E731
                                               lambda t: count_tokens(tokenizer, t), cfg.context_tokens)
    question = row["messages"][1]["content"].split("\n", 1)[0].removeprefix("Question: ")
    step = build_prompt_step(answerer.retriever, tokenizer, 8000, select)
    prompt = step.invoke({"query": question})["prompt"]
    assert prompt == tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    examples = build_examples(tokenizer, rows, 1024)  # and llm_finetune reads every row
    assert len(examples) == len(rows)


def test_a_rerun_resumes_from_the_cache_and_writes_the_same_bytes(raft_run):
    cfg, stats = raft_run
    first = cfg.out.read_bytes()
    again = main(cfg)
    assert cfg.out.read_bytes() == first
    assert all(side["generated"] == 0 for side in again["documents"]["llm"].values())


def test_evidence_cut_insert_puts_the_cut_sentence_into_the_context(raft_run):
    """--evidence-cut insert: a question skipped because the 40-token context kept other sentences becomes a
    row whose prompt shows its evidence sentence and whose answer quotes it; the other rows stay as they were."""
    from dataclasses import replace

    cfg, stats = raft_run
    inserted_cfg = replace(cfg, out=cfg.out.with_name("inserted.jsonl"), evidence_cut="insert")
    inserted_stats = main(inserted_cfg)
    kinds, inserted_kinds = stats["kinds"], inserted_stats["kinds"]
    assert kinds["evidence_cut"] > 0 and inserted_kinds["evidence_inserted"] > 0
    assert inserted_kinds["evidence_inserted"] + inserted_kinds["evidence_cut"] == kinds["evidence_cut"]
    rows = [json.loads(line) for line in inserted_cfg.out.read_text().splitlines()]
    before = [json.loads(line) for line in cfg.out.read_text().splitlines()]
    assert [r for r in rows if not r["inserted"]] == before
    for row in (r for r in rows if r["inserted"]):
        _, user, answer = row["messages"]
        sentence, cite = answer["content"].rsplit(" [", 1)
        passage = user["content"].split(f"[{cite[:-1]}] ", 1)[1].split("\n\n")[0]
        assert " ".join(sentence.split()) in " ".join(passage.split()) and is_part(row["evidence"], sentence), row


def test_qa_file_rows_without_passages_are_found_or_counted(tmp_path, sample_doc, sample_qa):
    items = json.loads(sample_qa.read_text())[:6]
    rows = [{"question": it["question"], "answer": it["answer"]} for it in items[:4]]
    rows += [{"question": "What colour is the moon?", "answer": "Zorblax-77"}, {"question": "", "answer": "x"}]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(rows))
    cfg = RaftConfig(docs=[sample_doc], out=tmp_path / "o.jsonl", qa_file=qa, questions=0, persist_dir=tmp_path / "db")
    stats = main(cfg)
    assert stats["qa_rows_skipped"] == 1 and stats["kinds"]["answer_not_found"] >= 1
    assert stats["rows"] == 5 - stats["kinds"]["answer_not_found"]


@pytest.mark.parametrize("kwargs, message", [
    ({"docs": []}, "give the documents"),
    ({"p_missing": 1.0}, "--p-missing"),
    ({"questions": 0}, "--questions must be > 0"),
    ({"out": "x.json"}, "must end in .jsonl"),
])
def test_bad_options_are_one_line_errors(kwargs, message, sample_doc):
    with pytest.raises(ValueError, match=message):
        RaftConfig(**({"docs": [sample_doc]} | kwargs))


def test_a_document_too_short_for_a_question_is_a_clear_error(tmp_path, capsys):
    from rag.raft import RaftConfig as Config
    from tunerag.common import run_cli

    doc = tmp_path / "tiny.txt"
    doc.write_text("Hello.")
    with pytest.raises(SystemExit) as stop:
        run_cli(main, Config, argv=[str(doc), "--out", str(tmp_path / "o.jsonl"), "--questions", "4",
                                    "--persist-dir", str(tmp_path / "db")])
    assert stop.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o.jsonl").exists()


def test_train_takes_several_sources_with_weights(tmp_path):
    from llm_finetune.config import TrainConfig
    from llm_finetune.train import training_rows

    grounded, instructions = tmp_path / "g.jsonl", tmp_path / "i.json"
    grounded.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
                                            "split": "val" if i < 4 else "train"}) + "\n" for i in range(40)))
    instructions.write_text(json.dumps([{"instruction": f"i{i}", "output": "o"} for i in range(100)]))
    cfg = TrainConfig(preset="smollm2-cpu", data=[str(grounded), str(instructions)], data_weight=[3, 1], out=str(tmp_path / "r"))
    train, val = training_rows(cfg)
    assert sum("messages" in r for r in train) == 36 and len(train) == 48  # 36 grounded : 12 instructions
    assert len(val) <= cfg.val_size and all(r.get("split") != "train" for r in val)
    with pytest.raises(ValueError, match="--data-weight"):
        TrainConfig(preset="smollm2-cpu", data=[str(grounded)], data_weight=[1, 1])
    assert TrainConfig(preset="smollm2-cpu").data == [TrainConfig(preset="smollm2-cpu").data[0]]  # a preset's one source
