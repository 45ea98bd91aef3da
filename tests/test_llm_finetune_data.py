"""Data and config of llm_finetune: chat-template examples with a response-only loss, loaders, presets."""

import json

import pytest

from llm_finetune.config import PRESETS, MergeConfig, TrainConfig
from llm_finetune.data import (
    IGNORE_INDEX,
    DataError,
    build_example,
    build_examples,
    ensure_pad_token,
    load_rows,
    make_collator,
    split_train_val,
    to_messages,
)
from tunerag.samples import SAMPLE_INSTRUCTIONS

ROW = {"instruction": "What is net debt?", "input": "Debt 1,200; cash 80.", "output": "Net debt is 1,120."}


@pytest.fixture(scope="module")
def mistral_tok(tiny_mistral):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_mistral)
    ensure_pad_token(tok)
    return tok


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def learned(tok, example):
    return tok.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_to_messages_alpaca_and_chat():
    assert to_messages(ROW) == [
        {"role": "user", "content": "What is net debt?\n\nDebt 1,200; cash 80."},
        {"role": "assistant", "content": "Net debt is 1,120."},
    ]
    assert to_messages({"instruction": "Q?", "input": "", "output": "A."})[0]["content"] == "Q?"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert to_messages(chat) == chat["messages"]
    with pytest.raises(ValueError, match="output"):
        to_messages({"instruction": "Q?", "output": " "})
    with pytest.raises(ValueError, match="assistant"):
        to_messages({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]})


def test_mistral_labels_are_exactly_the_response_plus_eos(mistral_tok):
    example = build_example(mistral_tok, to_messages(ROW), max_length=512)
    assert mistral_tok.decode(example["input_ids"]).startswith("<s>[INST] What is net debt?")
    assert example["input_ids"].count(mistral_tok.bos_token_id) == 1  # the template's BOS, no second one
    assert learned(mistral_tok, example) == "Net debt is 1,120.</s>"
    assert example["labels"][-1] == mistral_tok.eos_token_id
    n_masked = example["labels"].count(IGNORE_INDEX)
    assert mistral_tok.decode(example["input_ids"][:n_masked]).endswith("[/INST]")


def test_smollm2_chatml_labels_keep_eos_although_pad_is_eos(smollm2_tok):
    assert smollm2_tok.pad_token_id == smollm2_tok.eos_token_id  # the trap: labels from input_ids != pad
    example = build_example(smollm2_tok, to_messages(ROW), max_length=512)
    assert learned(smollm2_tok, example) == "Net debt is 1,120.<|im_end|>"  # ChatML's trailing newline cut
    short = build_example(smollm2_tok, to_messages({"instruction": "Q", "output": "A"}), max_length=512)
    batch = make_collator(smollm2_tok)([example, short])
    labels = batch["labels"][1].tolist()
    assert labels.count(smollm2_tok.eos_token_id) == 1  # padding (== EOS id) is -100, the real EOS is kept
    assert labels[len(short["labels"]) - 1] == smollm2_tok.eos_token_id
    assert all(t == IGNORE_INDEX for t in labels[len(short["labels"]):])
    assert batch["attention_mask"][1].sum().item() == len(short["input_ids"])


def test_too_long_and_bad_rows_are_counted_not_silent(mistral_tok, caplog):
    rows = [ROW, {"instruction": "x " * 400, "output": "y"}, {"instruction": "no output"}]
    assert build_example(mistral_tok, to_messages(rows[1]), max_length=64) is None
    examples = build_examples(mistral_tok, rows, max_length=64)
    assert len(examples) == 1
    assert "dropped 1 of 3" in caplog.text and "malformed" in caplog.text
    with pytest.raises(DataError, match="no usable training examples"):
        build_examples(mistral_tok, rows[1:], max_length=64)


def test_load_rows_json_jsonl_csv_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ROW]))
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n")
    (tmp_path / "a.csv").write_text("instruction,input,output\nWhat is net debt?,,\"Debt less cash, 1,120.\"\n")
    assert load_rows(str(tmp_path / "a.json")) == [ROW]
    assert len(load_rows(str(tmp_path / "a.jsonl"))) == 2
    assert load_rows(str(tmp_path / "a.csv"))[0]["output"] == "Debt less cash, 1,120."
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="could not be parsed"):
        load_rows(str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match="hub"):  # tests run with HF_HUB_OFFLINE=1
        load_rows("nobody/no-such-dataset")


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=1)
    assert len(val) == 10 and sorted(train + val) == items
    assert split_train_val(items, 0.1, seed=1) == (train, val)
    assert len(split_train_val(items, 7, seed=1)[1]) == 7


def test_presets_config_file_and_flags_precedence(tmp_path):
    default = TrainConfig()
    assert default.base_model == "mistralai/Mistral-7B-Instruct-v0.1" and default.data == ["gbharti/finance-alpaca"]
    assert (default.lora_r, default.lora_alpha, default.lora_dropout, default.lr) == (16, 4, 0.05, 1e-4)
    assert default.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"] and default.train_head
    assert default.max_length == 1024 and default.epochs == 1 and default.max_steps == -1
    smol = TrainConfig(preset="smollm2-cpu")
    assert smol.base_model == "smollm2" and smol.data == [str(SAMPLE_INSTRUCTIONS)] and smol.out == "runs/smollm2-cpu"
    (tmp_path / "c.yaml").write_text("preset: smollm2-cpu\nmax-length: 99\nlr: 0.5\n")
    cfg = TrainConfig(config=str(tmp_path / "c.yaml"), lr=0.25)
    assert (cfg.base_model, cfg.max_length, cfg.lr, cfg.batch_size) == ("smollm2", 99, 0.25, PRESETS["smollm2-cpu"]["batch_size"])
    (tmp_path / "bad.json").write_text(json.dumps({"max_lenght": 3}))
    with pytest.raises(ValueError, match="max_lenght"):
        TrainConfig(config=str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="--val-size"):
        TrainConfig(val_size=0)


def test_cli_help_and_usage_errors(capsys):
    from tunerag.common import parse_config

    for cls in (TrainConfig, MergeConfig):
        with pytest.raises(SystemExit) as e:
            parse_config(cls, ["-h"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--preset" in text and "--resume" in text and "--overwrite" in text and "--dtype" in text
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--batch-size", "0"])
    assert e.value.code == 2
    cfg = parse_config(TrainConfig, ["--preset", "smollm2-cpu", "--lora-targets", "q_proj", "--lora-targets", "v_proj",
                                     "--no-train-head", "--max-steps", "3"])
    assert cfg.lora_targets == ["q_proj", "v_proj"] and cfg.train_head is False and cfg.max_steps == 3
