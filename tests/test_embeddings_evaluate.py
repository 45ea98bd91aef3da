"""embeddings.evaluate: metrics known by hand (mocked encode, part 5 of STYLE.md) and agreement with
sentence-transformers' own InformationRetrievalEvaluator on the real MiniLM."""

import json
import math
from unittest.mock import Mock

import pytest
import torch

from embeddings.config import EvaluateConfig
from embeddings.data import Pairs
from embeddings.evaluate import METRICS, format_table, main, score
from tunerag.common import write_json_atomic

# Five finance passages, one-hot embeddings; each query's vector puts its passage at a chosen rank.
CORPUS = {
    "d0": "Total revenue reached $8.64 billion in 2025.",
    "d1": "Net income attributable to the group rose to $2.117 billion.",
    "d2": "The equipment leasing subsidiary was sold to Bayline Capital for $415 million.",
    "d3": "Brokered deposits fell to 2.1% of total deposits.",
    "d4": "The common equity tier 1 ratio ended the year at 11.8%.",
}
QUERIES = {  # query: (relevant passage, embedding) -> rank of the relevant passage
    "What was total revenue in 2025?": ("d0", [1, 0, 0, 0, 0]),                     # rank 1
    "How much net income did the group earn?": ("d1", [0, 1, 0, 0, 0]),             # rank 1
    "Who bought the leasing business?": ("d2", [0, 0, 0.5, 0.9, 0]),                # rank 2
    "How reliant is the bank on brokered deposits?": ("d3", [0.9, 0.7, 0, 0.5, 0]),  # rank 3
    "What was the CET1 ratio?": ("d4", [0.9, 0.8, 0.7, 0.6, 0.1]),                  # rank 5
}


def hand_pairs() -> Pairs:
    pairs = Pairs(corpus=dict(CORPUS))
    for i, (q, (doc, _)) in enumerate(QUERIES.items()):
        pairs.queries[f"q{i}"] = q
        pairs.relevant_docs[f"q{i}"] = [doc]
    return pairs


def mock_model():
    from sentence_transformers import SentenceTransformer

    vectors = {**{q: v for q, (_, v) in QUERIES.items()},
               **{text: [float(i == j) for j in range(5)] for i, text in enumerate(CORPUS.values())}}

    def encode(texts, **kwargs):
        return torch.tensor([vectors[t] for t in texts], dtype=torch.float32)

    model = Mock(spec=SentenceTransformer)
    model.encode_query.side_effect = encode
    model.encode_document.side_effect = encode
    model.model_card_data = Mock()
    return model


def test_metrics_known_by_hand():
    ranks = [1, 1, 2, 3, 5]
    metrics = score(mock_model(), hand_pairs())
    assert metrics["accuracy@1"] == pytest.approx(2 / 5)
    assert metrics["accuracy@3"] == pytest.approx(4 / 5)
    assert metrics["accuracy@5"] == metrics["accuracy@10"] == pytest.approx(1.0)
    assert metrics["mrr@10"] == pytest.approx(sum(1 / r for r in ranks) / 5)           # 0.6067
    assert metrics["map@100"] == pytest.approx(sum(1 / r for r in ranks) / 5)          # one relevant passage each
    assert metrics["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in ranks) / 5)  # 0.7036


def test_numbers_are_the_library_evaluators_own(minilm_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    model = SentenceTransformer(str(minilm_path), device="cpu")
    pairs = hand_pairs()
    ours = score(model, pairs)
    queries, corpus, relevant = pairs.ir_dicts()
    theirs = InformationRetrievalEvaluator(queries, corpus, relevant, name="lib", write_csv=False)(model)
    assert set(ours) == set(METRICS)
    for m in METRICS:
        assert ours[m] == pytest.approx(theirs[f"lib_cosine_{m}"], abs=1e-6), m
    assert ours["accuracy@1"] >= 0.6  # MiniLM finds most of these easy passages first


def test_main_prints_table_and_json(tmp_path, minilm_path, capsys):
    write_json_atomic(tmp_path / "val.json", hand_pairs().to_json())
    results = main(EvaluateConfig(data=tmp_path / "val.json", model=["minilm", str(minilm_path)], json=True))
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["metrics"] == results and printed["queries"] == 5 and printed["passages"] == 5
    assert results["minilm"] == pytest.approx(results[str(minilm_path)])  # the same model twice
    assert "ndcg@10" in err and "minilm" in err


def test_format_table_has_one_row_per_metric():
    table = format_table({"base": dict.fromkeys(METRICS, 0.5), "tuned": dict.fromkeys(METRICS, 0.75)})
    lines = table.splitlines()
    assert len(lines) == 2 + len(METRICS)
    assert lines[0].split() == ["metric", "|", "base", "|", "tuned"]
    assert "0.5000" in lines[2] and "0.7500" in lines[2]


def test_bad_data_is_one_line(tmp_path):
    from embeddings.data import PairsError

    data = hand_pairs().to_json()
    data["relevant_docs"]["q0"] = ["d9"]
    write_json_atomic(tmp_path / "val.json", data)
    with pytest.raises(PairsError, match="not in its corpus"):
        main(EvaluateConfig(data=tmp_path / "val.json"))


def test_help_lists_every_flag(capsys):
    from tunerag.common import parse_config

    with pytest.raises(SystemExit):
        parse_config(EvaluateConfig, ["-h"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--data", "--model", "--json", "--batch-size"))
    cfg = parse_config(EvaluateConfig, ["--data", "v.json", "--model", "a", "--model", "b"])
    assert cfg.model == ["a", "b"]
