"""embeddings.prepare end to end: real MiniLM tokenizer, ICT, the LLM generator on a tiny random
Mistral (junk output: parsing and counting) and on the embedded SmolLM2, and the bad-input list."""

import json
import subprocess
import sys

import pytest

from embeddings import prepare
from embeddings.config import PrepareConfig
from embeddings.data import Chunk, clean_text, document_year, load_pairs, split_sentences, styled_queries
from embeddings.prepare import generation_batches, main
from tunerag.common import TuneragError, parse_config

REPORT = """QUARTERLY REPORT

Revenue grew to 4.2 billion dollars in the quarter, driven by higher net interest income. Net interest margin widened to 3.1% as deposit costs stabilised. Fee income from wealth management rose 8% on higher assets under management.

Credit quality stayed strong across the loan book. Net charge-offs were 0.31% of average loans, below the industry average. The allowance for credit losses covered 1.4% of loans at quarter end.

Confidential - do not distribute.
The bank repurchased 2.5 million shares during the quarter. The board declared a quarterly dividend of 0.52 dollars per share. Management expects expenses to stay flat next year.
"""


@pytest.fixture()
def two_docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "q1.txt").write_text(REPORT)
    (folder / "q2.md").write_text(REPORT.replace("quarter", "half year").replace("4.2", "8.9"))
    return folder


def test_ict_on_the_sample_document(tmp_path, sample_doc, minilm_path):
    stats = main(PrepareConfig(docs=[sample_doc], out=tmp_path / "a", generator="ict"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["heldout.json", "prepare_stats.json", "train.json", "val.json"]
    train, val = load_pairs(tmp_path / "a" / "train.json"), load_pairs(tmp_path / "a" / "val.json")
    heldout = load_pairs(tmp_path / "a" / "heldout.json")
    assert stats["split"] == "position" and stats["max_chunk_tokens"] <= 128
    assert len(train.corpus) > 3 * len(val.corpus) > 0 and len(train.queries) > 50 and len(heldout.queries) > 5
    assert not set(train.corpus) & set(val.corpus) and not set(train.corpus) & set(heldout.corpus)
    assert all(cid.startswith("finance_report.txt:train#") for cid in train.corpus)
    # no leak by text: no validation or held-out sentence (passage or query) is in any training passage or query
    train_text = "\n".join([*train.corpus.values(), *train.queries.values()])
    for side in (val, heldout):
        side_sentences = [s for t in [*side.corpus.values(), *side.queries.values()] for s in split_sentences(clean_text(t)[0])]
        assert len(side_sentences) > 10
        assert [s for s in side_sentences if len(s.split()) >= 4 and s in train_text] == []
    # ICT: the query sentence is in the document but not in its passage
    qid, query = next(iter(train.queries.items()))
    assert query in " ".join(sample_doc.read_text().split()) and query not in train.corpus[train.relevant_docs[qid][0]]
    # deterministic for a seed, different for another
    main(PrepareConfig(docs=[sample_doc], out=tmp_path / "b", generator="ict"))
    main(PrepareConfig(docs=[sample_doc], out=tmp_path / "c", generator="ict", seed=7))
    text = lambda d: (tmp_path / d / "train.json").read_text()  # noqa: E731
    assert text("a") == text("b") != text("c")


def test_split_by_document_and_drop_pattern(two_docs, tmp_path):
    stats = main(PrepareConfig(docs=[two_docs], out=tmp_path / "out", generator="ict", questions_per_chunk=1,
                               chunk_tokens=40, chunk_overlap=0, drop_pattern=["(?i)confidential"]))
    assert stats["split"] == "document" and stats["lines_dropped_by_pattern"] == 2
    train, val = load_pairs(tmp_path / "out" / "train.json"), load_pairs(tmp_path / "out" / "val.json")
    train_docs = {cid.split("#")[0] for cid in train.corpus}
    val_docs = {cid.split("#")[0] for cid in val.corpus}
    assert len(train_docs) == len(val_docs) == 1 and train_docs != val_docs
    assert not any("Confidential" in t for t in [*train.corpus.values(), *train.queries.values()])


def test_out_is_replaced_whole_and_stats_are_reproducible(two_docs, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    cfg = PrepareConfig(docs=[two_docs], out=out, generator="ict", chunk_tokens=40, chunk_overlap=0)
    stats = main(cfg)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    heldout = ["heldout.json"] if stats["heldout_queries"] else []  # these short documents may give none
    assert sorted(first) == [*heldout, "prepare_stats.json", "train.json", "val.json"] and "seconds" in stats
    assert "seconds" not in json.loads(first["prepare_stats.json"])
    main(cfg)  # same inputs, same bytes: scripts/pipeline.py's hash of the folder does not change
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # a run cut after train.json leaves the previous complete set, not a new train.json beside an old val.json
    real_write = prepare.write_json_atomic

    def cut_at_val(path, data):
        if path.name == "val.json":
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(prepare, "write_json_atomic", cut_at_val)
    with pytest.raises(KeyboardInterrupt):
        main(PrepareConfig(docs=[two_docs], out=out, generator="ict", chunk_tokens=40, chunk_overlap=0, seed=7))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "pairs"]  # no temp folder left
    monkeypatch.undo()
    # a bad --out is one line naming it, before any work
    (tmp_path / "a_file").write_text("x")
    for bad, why in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "cannot write --out"),
                     (two_docs, "holds files other than")):
        with pytest.raises(TuneragError, match=why) as e:
            main(PrepareConfig(docs=[two_docs], out=bad, generator="ict"))
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert (two_docs / "q1.txt").exists() and (tmp_path / "a_file").read_text() == "x"


def test_generation_batches_do_not_depend_on_the_cache():
    keys = [f"k{i}" for i in range(7)]
    assert generation_batches(keys, set(), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    # k0-k3 cached (a run cut inside the second batch): the first batch is skipped, the second made whole
    assert generation_batches(keys, {"k0", "k1", "k2", "k3"}, 3) == [[3, 4, 5], [6]]
    assert generation_batches(keys, set(keys), 3) == []


def test_qa_file_becomes_pairs(tmp_path, sample_qa):
    stats = main(PrepareConfig(qa_file=sample_qa, out=tmp_path / "qa"))
    assert stats["source"] == "qa_file" and stats["train_queries"] + stats["val_queries"] == 66
    val = load_pairs(tmp_path / "qa" / "val.json")
    assert "$415 million" in load_pairs(tmp_path / "qa" / "train.json").corpus.values() or "$415 million" in val.corpus.values()


def test_llm_junk_is_counted_and_nothing_half_written(tiny_mistral, two_docs, tmp_path, caplog):
    cache = tmp_path / "cache.jsonl"
    cfg = PrepareConfig(docs=[two_docs], out=tmp_path / "out", llm=str(tiny_mistral), chunk_tokens=40, chunk_overlap=0,
                        max_chunks=1, questions_per_chunk=1, max_new_tokens=12, cache=cache, heldout_fraction=0)
    caplog.set_level("INFO")
    with pytest.raises(TuneragError, match="no usable queries on the train side") as e:
        main(cfg)  # random weights write no questions
    assert "\n" not in str(e.value)
    assert "gave no usable query" in caplog.text and "dropped" in caplog.text
    assert not (tmp_path / "out" / "train.json").exists()
    lines = cache.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["output"] for line in lines)
    caplog.clear()
    with pytest.raises(TuneragError):
        main(cfg)
    assert "2 cached, 0 to generate" in caplog.text and cache.read_text().splitlines() == lines  # resumed, not redone


def test_resumed_generation_equals_an_uninterrupted_one(tiny_mistral, sample_doc, tmp_path, caplog):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    cfg = PrepareConfig(docs=[sample_doc], out=tmp_path / "out", llm=str(tiny_mistral), chunk_tokens=40, chunk_overlap=0,
                        max_chunks=3, questions_per_chunk=1, batch_size=2, max_new_tokens=8, cache=full, heldout_fraction=0)
    caplog.set_level("INFO")
    with pytest.raises(TuneragError):  # random weights: no questions, but every output is cached
        main(cfg)
    lines = full.read_text().splitlines()
    assert len(lines) == 6
    # the estimate comes from the second batch (the first warms up), before the third runs
    estimate = next(r for r in caplog.records if "first batch:" in r.getMessage())
    assert "(warm-up), second" in estimate.getMessage() and "other 1 batches" in estimate.getMessage()
    cut.write_text("\n".join(lines[:3]) + "\n")  # interrupted inside the second batch
    caplog.clear()
    cfg.cache = cut
    with pytest.raises(TuneragError):
        main(cfg)
    assert "3 cached, 4 to generate (2 batches of up to 2, incl. 1 cached" in caplog.text
    rows = lambda p: {r["key"]: r["output"] for r in map(json.loads, p.read_text().splitlines())}  # noqa: E731
    assert rows(cut) == rows(full) and len(cut.read_text().splitlines()) == 6


def test_smollm2_writes_questions_and_resumes_from_cache(smollm2_path, two_docs, tmp_path):
    cfg = PrepareConfig(docs=[two_docs], out=tmp_path / "a", chunk_tokens=40, chunk_overlap=0, max_chunks=1,
                        max_new_tokens=40, cache=tmp_path / "cache.jsonl", heldout_fraction=0)
    stats = main(cfg)
    llm = stats["llm"]
    assert llm["prompts"] == llm["generated"] == 4 and llm["parsed"]["kept"] >= 3  # 2 sentences x 2 chunks
    queries = list(load_pairs(tmp_path / "a" / "train.json").queries.values())
    assert queries and all(q.endswith("?") and len(q.split()) >= 3 for q in queries)
    cfg.out = tmp_path / "b"
    again = main(cfg)
    assert again["llm"]["generated"] == 0 and again["llm"]["from_cache"] == 4
    assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
    from dataclasses import replace

    # --query-styles: the same questions (from the cache) and their variants, on the training side only;
    # "dated" says the year of the file name
    dated = tmp_path / "dated"
    dated.mkdir()
    (dated / "fy_2024.txt").write_text((two_docs / "q1.txt").read_text())
    (dated / "fy_2023.md").write_text((two_docs / "q2.md").read_text())
    plain = main(replace(cfg, docs=[dated], out=tmp_path / "plain"))
    styled = main(replace(cfg, docs=[dated], out=tmp_path / "styled", query_styles=["keyword", "dated"]))
    assert plain["llm"]["generated"] == styled["llm"]["generated"] == 0
    asked, train = (load_pairs(tmp_path / name / "train.json") for name in ("plain", "styled"))
    year = document_year(next(iter(train.corpus)).split("#")[0])
    assert year in ("2023", "2024") and list(train.queries.values()) == styled_queries(
        list(asked.queries.values()), ["keyword", "dated"], year)
    assert styled["llm"]["styled_added"] == len(train.queries) - len(asked.queries) > 0
    assert any(year in q for q in train.queries.values())
    assert (tmp_path / "plain" / "val.json").read_text() == (tmp_path / "styled" / "val.json").read_text()
    # --llm-dtype auto wrote in bfloat16 where the CPU has it: float32 keeps cache entries of its own
    from tunerag.models import pick_dtype

    in_float32 = main(replace(cfg, out=tmp_path / "c", llm_dtype="float32"))
    assert in_float32["llm"]["generated"] == (0 if pick_dtype("auto") == "float32" else 4)


def test_ict_pairs_checked_with_llm_questions(smollm2_path, two_docs, tmp_path):
    """--check-generator llm: ICT trains, SmolLM2's questions choose the checkpoint and check the model."""
    cfg = PrepareConfig(docs=[two_docs], out=tmp_path / "a", generator="ict", check_generator="llm", chunk_tokens=40,
                        chunk_overlap=0, max_chunks=1, max_new_tokens=40, cache=tmp_path / "cache.jsonl")
    stats = main(cfg)
    assert stats["llm"]["prompts"] >= 2  # the val (and held-out) chunk only: the training chunk is ICT's
    train = load_pairs(tmp_path / "a" / "train.json")
    val = load_pairs(tmp_path / "a" / "val.json")
    assert all(not q.endswith("?") for q in train.queries.values())  # sentences cut from the chunk
    assert val.queries and all(q.endswith("?") for q in val.queries.values())


def test_roundtrip_filter_drops_questions_their_chunk_does_not_answer(minilm_path):
    texts = ["The bank sold its equipment leasing subsidiary to Bayline Capital for $415 million in cash.",
             "Net charge-offs were 0.31% of average loans, below the industry average of 0.45%.",
             "The board declared a quarterly dividend of 52 cents per share, up from 48 cents.",
             "The CET1 ratio ended the year at 11.8%, well above the regulatory minimum."]
    chunks = [Chunk("doc", i, t, [t], [0]) for i, t in enumerate(texts)]
    queries = {"doc#0": (["Who bought the equipment leasing subsidiary?", "What was the quarterly dividend per share?"],
                         texts[0]),
               "doc#1": (["How did net charge-offs compare with the industry?"], texts[1]),
               "doc#2": ([], texts[2]), "doc#3": (["What was the CET1 ratio at year end?"], texts[3])}
    kept, dropped = prepare.roundtrip_filter(queries, chunks, str(minilm_path), top_k=1)
    assert dropped == 1 and kept["doc#0"] == (["Who bought the equipment leasing subsidiary?"], texts[0])
    assert {cid: v for cid, v in kept.items() if cid != "doc#0"} == {cid: v for cid, v in queries.items() if cid != "doc#0"}
    assert prepare.roundtrip_filter(queries, chunks, str(minilm_path), top_k=4) == (queries, 0)  # too few chunks to rank
    # --drop-easy: a question whose own chunk ranks first is dropped too. The dividend question put on the
    # charge-off chunk ranks that chunk second (after the dividend one): kept; the others rank theirs first
    queries = {"doc#0": (["Who bought the equipment leasing subsidiary?"], texts[0]),
               "doc#1": (["How did net charge-offs compare with the industry?",
                          "What was the quarterly dividend per share?"], texts[1]),
               "doc#2": ([], texts[2]), "doc#3": (["What was the CET1 ratio at year end?"], texts[3])}
    kept, dropped = prepare.roundtrip_filter(queries, chunks, str(minilm_path), top_k=3, drop_first=True)
    assert dropped == 3 and kept["doc#1"] == (["What was the quarterly dividend per share?"], texts[1])
    assert kept["doc#0"][0] == kept["doc#3"][0] == []
    assert prepare.roundtrip_filter(queries, chunks, str(minilm_path), top_k=3)[1] == 0  # without it, all in the top 3


def test_query_styles_add_variants_and_definitions_to_the_given_chunks_only():
    defining = ["2.3 'Connected Group' means two or more Obligors linked by control.", "It is reviewed yearly."]
    chunks = [Chunk("policy_2024.txt", 0, " ".join(defining), defining, [0, 1]),
              Chunk("policy_2024.txt", 1, "Limits are set by the board.", ["Limits are set by the board."], [0])]
    queries = {"policy_2024.txt#0": (["What is a Connected Group?"], chunks[0].text),
               "policy_2024.txt#1": (["Who sets the limits?"], chunks[1].text)}
    styled, added = prepare.add_query_styles(queries, chunks[:1], ["keyword", "dated", "definition"])
    assert styled["policy_2024.txt#0"] == (["What is a Connected Group?", "Connected Group", "What is a Connected Group in 2024?",
                                            "What does Connected Group mean?"], chunks[0].text)
    assert added == 3 and styled["policy_2024.txt#1"] == queries["policy_2024.txt#1"]  # not a training chunk here


def test_bad_documents_are_one_line(tmp_path, caplog):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TuneragError, match="is empty"):
        main(PrepareConfig(docs=[tmp_path / "empty.txt"], out=tmp_path / "o", generator="ict"))
    with pytest.raises(TuneragError, match="does not exist"):
        main(PrepareConfig(docs=[tmp_path / "missing.pdf"], out=tmp_path / "o", generator="ict"))
    (tmp_path / "latin1.txt").write_bytes(REPORT.replace("Fee income", "Fee income \xe9").encode("latin-1"))
    stats = main(PrepareConfig(docs=[tmp_path / "latin1.txt"], out=tmp_path / "o", generator="ict", chunk_tokens=40,
                        chunk_overlap=0))
    assert "not valid UTF-8: 1 undecodable byte" in caplog.text and stats["train_queries"] > 0
    with pytest.raises(TuneragError, match="--drop-pattern leaves no text|no text left"):
        main(PrepareConfig(docs=[tmp_path / "latin1.txt"], out=tmp_path / "p", generator="ict", drop_pattern=["."]))
    assert not (tmp_path / "p").exists()


def test_cli_error_is_one_line_and_help_works(tmp_path):
    run = subprocess.run([sys.executable, "-m", "embeddings.prepare", str(tmp_path / "nope.txt"), "--generator", "ict",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "nope.txt" in run.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        parse_config(PrepareConfig, ["--chunk-overlap", "100", "x.txt"])
    with pytest.raises(SystemExit):
        parse_config(PrepareConfig, [])  # neither DOCS nor --qa-file
    with pytest.raises(SystemExit):
        parse_config(PrepareConfig, ["a.txt", "--generator", "ict", "--query-styles", "keyword"])  # styles of LLM questions
    cfg = parse_config(PrepareConfig, ["a.txt", "b/", "--drop-pattern", "^Page", "--drop-pattern", "Confidential"])
    assert [str(p) for p in cfg.docs] == ["a.txt", "b"] and cfg.drop_pattern == ["^Page", "Confidential"]
