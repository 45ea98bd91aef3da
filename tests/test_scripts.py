"""The benchmark and sweep scripts start and explain their flags (they take minutes to run for real;
their numbers are in the README, with the command lines that produced them)."""

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.parametrize("script", ["bench_embeddings.py", "bench_embeddings_qa_pairs.py", "sweep_embeddings.py",
                                    "bench_llm_finetune.py", "bench_rag.py", "bench_offline_loop.py",
                                    "bench_gpl.py"])
def test_script_help(script):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout and "--" in run.stdout


def test_sweep_embeddings_says_which_grid_needs_corpora():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep_embeddings.py"), "--generator", "ict",
                          "--generator", "llm"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode != 0 and "pass one --generator per run" in run.stderr
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "sweep_embeddings.py"), "--corpus", "nowhere"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2 and "invalid choice" in run.stderr


def test_offline_loop_corpus_copies_rename_and_move_years_and_figures():
    sys.path.insert(0, str(REPO))
    from scripts.bench_offline_loop import variant

    text = ("HALVORSEN RIDGE BANCORP\nIn 2024 Halvorsen Ridge's CET1 ratio was 11.8% (Meridian: A-); "
            "see halvorsen_ridge_2024.txt.")
    assert variant(text, 0) == text
    assert variant(text, 1) == ("CASTELLAN BAY BANCORP\nIn 2028 Castellan Bay's CET1 ratio was 12.4% (Polaris: A-); "
                                "see castellan_bay_2028.txt.")


def test_gpl_mines_other_passages_as_negatives_for_each_question():
    """bench_gpl's triples: each training question with its own passage and others the base embedder
    ranks near it, never its own passage as a negative."""
    sys.path.insert(0, str(REPO))
    from embeddings.data import Pairs
    from scripts.bench_gpl import mined_triples
    from tunerag.models import MINILM, load_embedder

    pairs = Pairs()
    pairs.add("c1", "Net income rose to $2.1 billion in 2025.", ["What was net income in 2025?"])
    pairs.add("c2", "The CET1 ratio was 11.4% at year-end.", ["What was the CET1 ratio?", "CET1 at year end?"])
    pairs.add("c3", "Net income was $1.9 billion in 2024.", [])
    pairs.add("c4", "The branch network has 412 offices.", [])
    triples = mined_triples(load_embedder(MINILM), pairs, negatives=2, seed=0)
    assert len(triples) == 6 and all(neg != pos for _, pos, neg in triples)
    assert {pos for q, pos, _ in triples if "net income" in q} == {pairs.corpus["c1"]}
    assert triples == mined_triples(load_embedder(MINILM), pairs, negatives=2, seed=0)  # deterministic for a seed
