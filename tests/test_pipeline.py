"""tunerag.pipeline end to end on a tiny slice: tiny embedder and LLM, a few chunks, a few steps."""

import json

import pytest

from tunerag.pipeline import STEPS, Manifest, PipelineConfig, heldout_items, main, step_key


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, sample_doc, sample_qa, sample_alpaca):
    folder = tmp_path_factory.mktemp("pipeline_inputs")
    docs = folder / "docs"
    docs.mkdir()
    text = sample_doc.read_text(encoding="utf-8")
    (docs / "report.txt").write_text(text[: len(text) // 3], encoding="utf-8")
    qa = [item for item in json.loads(sample_qa.read_text()) if item["passage"] in text[: len(text) // 3]][:3]
    (folder / "qa.json").write_text(json.dumps(qa))
    (folder / "alpaca.json").write_text(json.dumps(json.loads(sample_alpaca.read_text())[:24]))
    return docs, folder / "qa.json", folder / "alpaca.json"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_inputs, tiny_bert, tiny_mistral):
    docs, qa, alpaca = tiny_inputs
    cfg = PipelineConfig(docs=[docs], out=tmp_path_factory.mktemp("run") / "demo", questions=qa, instructions=alpaca,
                         embedder=str(tiny_bert), llm=str(tiny_mistral), max_chunks=6, emb_epochs=1,
                         llm_max_steps=2, rag_questions=2, max_new_tokens=4, raft_questions=6, question_llm="smollm2",
                         llm_data="both")
    return cfg, main(cfg)


def test_every_step_runs_and_the_report_holds_numbers(tiny_run):
    cfg, result = tiny_run
    steps = json.loads((cfg.out / "manifest.json").read_text())["steps"]
    assert list(steps) == list(STEPS)
    assert all(steps[s]["seconds"] >= 0 and steps[s]["key"] for s in STEPS)
    assert steps["llm_train"]["metrics"]["global_step"] == 2
    assert steps["llm_merge"]["metrics"]["max_abs_logit_diff"] < 1e-3
    configs = steps["rag_eval"]["metrics"]["configurations"]
    assert [c["config"] for c in configs] == ["base emb + base LLM", "tuned emb + base LLM",
                                              "base emb + merged LLM", "tuned emb + merged LLM"]
    asked = min(2, len(heldout_items(json.loads(cfg.questions.read_text()))))  # the held-out half only
    assert all(0 <= c["recall@4"] <= 1 and c["questions"] == asked for c in configs)
    report = (cfg.out / "report.md").read_text()
    for png in ("rag_configurations", "embedder_base_vs_tuned", "embedder_loss", "llm_loss"):
        assert (cfg.out / "plots" / f"{png}.png").stat().st_size > 5000
        assert f"plots/{png}.png" in report
    assert "| ndcg@10 |" in report and "Perplexity on the held-out examples" in report
    grounded = [json.loads(line) for line in (cfg.out / "grounded.jsonl").read_text().splitlines()]
    assert grounded and all(row["messages"][-1]["role"] == "assistant" for row in grounded)
    assert steps["llm_train"]["metrics"]["n_train"] > len([r for r in grounded if r["split"] == "train"])  # + instructions
    assert f"--embeddings {cfg.out / 'emb-tuned'} --llm {cfg.out / 'llm-merged'}" in report


def test_rerun_skips_complete_steps_and_force_redoes_one(tiny_run, caplog):
    import dataclasses
    import logging

    cfg, _ = tiny_run
    before = json.loads((cfg.out / "manifest.json").read_text())["steps"]
    with caplog.at_level(logging.INFO, logger="tunerag.pipeline"):
        main(dataclasses.replace(cfg, force=["rag_eval"]))
    after = json.loads((cfg.out / "manifest.json").read_text())["steps"]
    for step in STEPS[:-1]:
        assert after[step]["finished"] == before[step]["finished"], step
        assert f"[{step}] complete, inputs unchanged: skipped" in caplog.text
    assert "[rag_eval] running" in caplog.text


def test_changed_input_changes_the_step_key(tmp_path):
    (tmp_path / "a.txt").write_text("CET1 13.1%")
    key = step_key({"k": 4}, [tmp_path])
    assert step_key({"k": 4}, [tmp_path]) == key
    assert step_key({"k": 5}, [tmp_path]) != key
    (tmp_path / "a.txt").write_text("CET1 13.2%")
    assert step_key({"k": 4}, [tmp_path]) != key
    manifest = Manifest(tmp_path)
    manifest.record("prepare", key, [tmp_path / "a.txt"], 1.0, {})
    assert Manifest(tmp_path).is_complete("prepare", key, [tmp_path / "a.txt"])
    assert not Manifest(tmp_path).is_complete("prepare", key, [tmp_path / "gone"])


def test_bad_force_is_a_usage_error():
    with pytest.raises(ValueError, match="not a step"):
        PipelineConfig(force=["train"])


def test_force_all_redoes_every_step_from_scratch(tiny_run, caplog):
    import dataclasses
    import logging

    cfg, _ = tiny_run
    with caplog.at_level(logging.INFO, logger="tunerag.pipeline"):
        main(dataclasses.replace(cfg, force=["all"]))
    after = json.loads((cfg.out / "manifest.json").read_text())["steps"]
    assert all(f"[{s}] running" in caplog.text for s in STEPS) and "skipped" not in caplog.text
    assert after["llm_train"]["metrics"]["global_step"] == 2  # a fresh run, not a "resume" past the end
    assert (cfg.out / "llm-adapter" / ".pipeline_key").read_text() == after["llm_train"]["key"]


def test_training_resumes_only_a_run_of_the_same_inputs(tmp_path):
    from tunerag.pipeline import resumable

    folder = tmp_path / "adapter"
    has_checkpoint = lambda f: f / "checkpoints" if (f / "checkpoints").is_dir() else None  # noqa: E731
    assert not resumable(folder, "k1", has_checkpoint)  # nothing there: a fresh, stamped folder
    (folder / "checkpoints").mkdir()
    assert resumable(folder, "k1", has_checkpoint)
    assert not resumable(folder, "k1", has_checkpoint, allow=False)  # --force: start over
    assert not (folder / "checkpoints").exists()
    (folder / "checkpoints").mkdir()
    assert not resumable(folder, "k2", has_checkpoint)  # other inputs: never continue that run
    assert (folder / ".pipeline_key").read_text() == "k2" and not (folder / "checkpoints").exists()
