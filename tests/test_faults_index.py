"""Indexing faults with real processes and real big files: a document of more chunks than one SQLite
statement can name, and several runs creating the same new store at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunerag.documents import MAX_DOCUMENT_BYTES

SENTENCE = "Net interest income rose to {n} million dollars in quarter {q} of the year. "


@pytest.mark.slow
def test_a_40_mb_document_indexes_in_batches(tmp_path, tiny_bert):
    """Over 32,766 chunks: one collection.get(ids=...) of them all fails in Chroma's SQLite ("too many
    SQL variables"); batched lookups, deletes and adds index it, and a re-run finds every chunk."""
    big = tmp_path / "big.txt"
    with big.open("w") as f:
        para = 0
        while f.tell() < 40 * 2**20:
            f.write("".join(SENTENCE.format(n=para * 7 + i, q=i) for i in range(12)) + "\n\n")
            para += 1
    assert MAX_DOCUMENT_BYTES >= big.stat().st_size
    argv = [sys.executable, "-m", "rag.cli", "--file", str(big), "--embeddings", str(tiny_bert), "--persist-dir",
            str(tmp_path / "db"), "--chunk-overlap", "0", "--retrieve-only", "-q", "quarter 3",
            "--retriever", "hybrid", "--sentence-weight", "0"]  # 400,000 sentence vectors would double its minutes
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(argv, capture_output=True, text=True, timeout=1500, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "chunking big.txt (40 MB)" in first.stderr  # said before the minutes of splitting
    indexed = int(first.stderr.split("indexed ")[1].split()[0])
    assert indexed > 32_766
    # every chunk is in the store once: the batched lookup of all ids (one lookup of them all failed)
    import chromadb

    collection = chromadb.PersistentClient(path=str(tmp_path / "db")).list_collections()[0]
    from rag.index import batches

    ids = [i for batch in batches(collection.get(include=[])["ids"]) for i in batch]
    assert len(ids) == len(set(ids)) == indexed
    assert sum(len(collection.get(ids=batch, include=[])["ids"]) for batch in batches(ids)) == indexed


def test_runs_started_together_on_a_new_store_all_succeed(tmp_path, tiny_bert, sample_doc):
    """Real processes started at the same moment on a new --persist-dir, many times: each answers, and
    no message tells the user to delete a healthy index."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for attempt in range(6):
        store = tmp_path / f"db{attempt}"
        argv = [sys.executable, "-m", "rag.cli", "--file", str(sample_doc), "--embeddings", str(tiny_bert),
                "--persist-dir", str(store), "--retrieve-only", "-q", "CET1 ratio"]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(3)]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            assert "delete" not in err and "[1]" in out
