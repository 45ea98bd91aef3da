"""embeddings.finetune: a few steps on a tiny random BERT (the real MiniLM tokenizer), the output
folder, the model card and metrics, every loss option, and bad input before any training."""

import json

import pytest

from embeddings.config import FinetuneConfig
from embeddings.data import Pairs, chunk_sentences, clean_text, ict_pairs, load_pairs, split_sentences
from embeddings.finetune import main
from tunerag.common import TuneragError, parse_config, write_json_atomic


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory, sample_doc):
    """ICT pairs from the sample document: 24 train chunks, 6 val chunks, 6 held-out chunks (word counts
    stand in for tokens); heldout.json beside train.json is found by embeddings.finetune itself."""
    folder = tmp_path_factory.mktemp("pairs")
    lines, _ = clean_text(sample_doc.read_text())
    chunks = chunk_sentences(split_sentences(lines), lambda t: len(t.split()), 60, 0)[:36]
    sides = {"train": Pairs(), "val": Pairs(), "heldout": Pairs()}
    for c in chunks:
        queries, passage = ict_pairs(c, 2, seed=0)
        sides["train" if c.index < 24 else "val" if c.index < 30 else "heldout"].add(c.id, passage, queries)
    for name, pairs in sides.items():
        write_json_atomic(folder / f"{name}.json", pairs.to_json())
    return folder / "train.json", folder / "val.json"


def test_finetune_writes_a_loadable_model_with_card_and_metrics(tiny_bert, pair_files, tmp_path):
    from sentence_transformers import SentenceTransformer

    train, val = pair_files
    out = tmp_path / "tuned"
    metrics = main(FinetuneConfig(train=train, val=val, model=str(tiny_bert), out=out, epochs=2, batch_size=16,
                                  learning_rate=1e-3, eval_steps=2))
    assert {"README.md", "metrics.json", "run_config.json", "modules.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]  # no checkpoint or temp folder left
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["before"]["val_cosine_ndcg@10"] == metrics["before"]["val_cosine_ndcg@10"]
    assert saved["steps"] == 6 and saved["data"]["train_pairs"] == len(load_pairs(train).queries)
    # every evaluation logs eval_loss on the val pairs beside the evaluator's NDCG@10
    evals = [e for e in metrics["log_history"] if "eval_val_cosine_ndcg@10" in e]
    assert len(evals) == 3 and all(e["eval_loss"] > 0 for e in evals)
    # the best checkpoint was restored: "after" is the best validation NDCG@10 seen during training
    assert metrics["after"]["val_cosine_ndcg@10"] == pytest.approx(max(e["eval_val_cosine_ndcg@10"] for e in evals), abs=1e-6)
    assert len({round(e["eval_val_cosine_ndcg@10"], 6) for e in evals}) > 1  # else the check above proves nothing
    card = (out / "README.md").read_text()
    assert "tunerag fine-tuning record" in card and str(tiny_bert) in card and "| ndcg@10 |" in card
    model = SentenceTransformer(str(out))
    assert model.encode(["What was total revenue?"]).shape == (1, 16)


def test_loss_options_cached_and_matryoshka(tiny_bert, pair_files, tmp_path):
    train, val = pair_files
    metrics = main(FinetuneConfig(train=train, val=val, model=str(tiny_bert), out=tmp_path / "m", epochs=1,
                                  batch_size=8, cached_loss=True, mini_batch_size=4, matryoshka_dims=[16, 8]))
    assert metrics["steps"] >= 1
    assert json.loads((tmp_path / "m" / "run_config.json").read_text())["matryoshka_dims"] == [16, 8]
    with pytest.raises(TuneragError, match="exceed the model's 16 dimensions"):
        main(FinetuneConfig(train=train, val=val, model=str(tiny_bert), out=tmp_path / "n", matryoshka_dims=[32]))
    assert not (tmp_path / "n").exists()


def test_hard_negatives_mined_with_the_base_model(minilm_path, pair_files, tmp_path):
    train, val = pair_files
    metrics = main(FinetuneConfig(train=train, val=val, model=str(minilm_path), out=tmp_path / "m", epochs=0.3,
                                  batch_size=8, hard_negatives=1))
    assert 2 <= metrics["data"]["train_pairs"] <= len(load_pairs(train).queries)
    # a random model sees every passage as about equally close: (nearly) nothing passes the margin, and it
    # says so. Seeded here: the session's tiny_bert is drawn from whatever the global RNG state is then.
    import torch
    from tiny_models import save_tiny_bert

    torch.manual_seed(0)
    random_bert = save_tiny_bert(tmp_path / "random_bert", minilm_path)
    with pytest.raises(TuneragError, match=r"hard-negative mining kept [01] of \d+ pairs"):
        main(FinetuneConfig(train=train, val=val, model=str(random_bert), out=tmp_path / "n", hard_negatives=1))
    assert not (tmp_path / "n").exists()


def test_bad_inputs_fail_before_training(tiny_bert, pair_files, tmp_path):
    train, val = pair_files
    broken = json.loads(val.read_text())
    broken["relevant_docs"] = {q: ["nowhere#0"] for q in broken["relevant_docs"]}
    write_json_atomic(tmp_path / "bad_val.json", broken)
    with pytest.raises(TuneragError, match="relevant corpus ids are not in its corpus"):
        main(FinetuneConfig(train=train, val=tmp_path / "bad_val.json", model=str(tiny_bert), out=tmp_path / "o"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(TuneragError, match="LlamaIndex EmbeddingQAFinetuneDataset layout"):
        main(FinetuneConfig(train=tmp_path / "list.json", val=val, model=str(tiny_bert), out=tmp_path / "o"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(TuneragError, match="exists and is not empty"):
        main(FinetuneConfig(train=train, val=val, model=str(tiny_bert), out=tmp_path / "full"))
    with pytest.raises(TuneragError, match="does not exist"):
        main(FinetuneConfig(train=train, val=val, model=str(tmp_path / "no_model"), out=tmp_path / "o"))
    (tmp_path / "a_file").write_text("x")
    for bad, why in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "cannot write --out")):
        with pytest.raises(TuneragError, match=why) as e:
            main(FinetuneConfig(train=train, val=val, model=str(tiny_bert), out=bad))
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_bfloat16_autocast_trains_like_float32(tiny_bert, pair_files, tmp_path):
    train, val = pair_files
    losses = {}
    for dtype in ("float32", "bfloat16"):
        metrics = main(FinetuneConfig(train=train, val=val, model=str(tiny_bert), out=tmp_path / dtype, epochs=1,
                                      batch_size=8, seed=7, dtype=dtype))
        losses[dtype] = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert len(losses["float32"]) == len(losses["bfloat16"]) >= 1
    assert losses["float32"] != losses["bfloat16"]  # the autocast did run
    assert losses["float32"] == pytest.approx(losses["bfloat16"], abs=0.05)
    with pytest.raises(ValueError, match="--dtype 'float16'"):
        FinetuneConfig(train=train, val=val, dtype="float16")


def test_flags_parse_and_check():
    cfg = parse_config(FinetuneConfig, ["--train", "t.json", "--val", "v.json", "--matryoshka-dims", "384",
                                        "--matryoshka-dims", "64", "--cached-loss", "--hard-negatives", "2"])
    assert cfg.matryoshka_dims == [384, 64] and cfg.cached_loss and cfg.hard_negatives == 2
    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, ["--train", "t.json", "--val", "v.json", "--batch-size", "1"])


def test_a_fine_tune_that_does_not_beat_the_base_saves_the_base(minilm_path, pair_files, tmp_path):
    """Never worse than the base, by construction: a learning rate that wrecks MiniLM gives a checkpoint
    below the base on val and heldout, so --out gets the base's weights, and --require-gain refuses."""
    from sentence_transformers import SentenceTransformer

    train, val = pair_files
    settings = dict(train=train, val=val, model=str(minilm_path), epochs=1, batch_size=8, learning_rate=0.5)
    metrics = main(FinetuneConfig(**settings, out=tmp_path / "kept"))
    assert metrics["kept"] == "base" and set(metrics["checks"]) == {"val", "heldout"}
    assert metrics["checks"]["heldout"]["gain"] < 0 and not metrics["checks"]["heldout"]["beats_base"]
    base, saved = SentenceTransformer(str(minilm_path)), SentenceTransformer(str(tmp_path / "kept"))
    texts = ["What was the CET1 ratio?", "Net interest income rose 6%."]
    assert (base.encode(texts) == saved.encode(texts)).all()
    assert "these are the base model's weights, unchanged" in (tmp_path / "kept" / "README.md").read_text()
    with pytest.raises(TuneragError, match="does not beat the base beyond noise .*--require-gain"):
        main(FinetuneConfig(**settings, out=tmp_path / "refused", require_gain=True))
    assert not (tmp_path / "refused").exists()
    scores = json.loads((tmp_path / "refused.scores.json").read_text())
    assert scores["kept"] == "base" and scores["checks"]["val"]["queries"] == len(load_pairs(val).queries)


def test_per_query_ndcg_matches_the_evaluator(minilm_path, pair_files):
    from embeddings.finetune import ir_evaluator, per_query_ndcg
    from sentence_transformers import SentenceTransformer

    val = load_pairs(pair_files[1])
    model = SentenceTransformer(str(minilm_path))
    scores = per_query_ndcg(model, val)
    assert set(scores) == set(val.queries)
    assert sum(scores.values()) / len(scores) == pytest.approx(ir_evaluator(val)(model)["val_cosine_ndcg@10"], abs=1e-4)
