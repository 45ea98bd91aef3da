"""The durable index, with the real MiniLM and a real Chroma store on disk."""

from __future__ import annotations

import json
import shutil

import pytest

from rag import index
from rag.embedder import load_embeddings
from rag.metrics import recall_at_k
from rag.retrieve import make_retriever
from tunerag.models import model_identity

CHUNK, OVERLAP = 254, 50
RECALL_AT_4_FLOOR = 0.78  # measured 0.818 (54 of 66) with MiniLM, 254/50-token chunks


@pytest.fixture(scope="module")
def minilm():
    embeddings, resolved = load_embeddings("minilm")
    return embeddings, resolved


@pytest.fixture(scope="module")
def splitter(minilm):
    return index.make_splitter(minilm[0].tokenizer, CHUNK, OVERLAP)


def open_minilm_store(folder, minilm):
    embeddings, resolved = minilm
    name = index.collection_name("minilm", model_identity(resolved), CHUNK, OVERLAP)
    return index.open_store(index.open_client(folder), name, embeddings)


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, minilm, splitter, sample_doc):
    """The sample report indexed once: (store, docs, first report)."""
    docs = index.load_documents([sample_doc])
    store = open_minilm_store(tmp_path_factory.mktemp("store"), minilm)
    return store, docs, index.sync_index(store, docs, splitter, show_progress=False)


def test_chunk_size_is_capped_at_what_minilm_reads(minilm, caplog):
    limit = index.embedder_max_tokens(minilm[0])
    assert limit == 254  # max_seq_length 256 minus [CLS] and [SEP]
    with caplog.at_level("INFO"):
        assert index.capped_chunk_size(512, limit) == 254
    assert "capped at 254" in caplog.text
    assert index.capped_chunk_size(128, limit) == 128


def test_chunks_keep_the_original_text_within_the_token_limit(sample_store, minilm, sample_doc):
    store, docs, _ = sample_store
    got = store._collection.get(include=["documents", "metadatas"])
    text = sample_doc.read_text()
    tokenizer = minilm[0].tokenizer
    for chunk, meta in zip(got["documents"], got["metadatas"]):
        assert text[meta["start_index"]:meta["start_index"] + len(chunk)] == chunk  # cased, unaltered
        assert len(tokenizer.tokenize(chunk)) <= CHUNK
    assert sorted(m["chunk"] for m in got["metadatas"]) == list(range(len(got["ids"])))


def test_rerun_reuses_vectors_without_re_embedding(sample_store, splitter, tmp_path, minilm, caplog):
    store, docs, first = sample_store
    assert first.embedded == first.chunks == store._collection.count() > 20
    with caplog.at_level("INFO"):
        again = index.sync_index(store, index.load_documents([docs[0].metadata["source"]]), splitter)
    assert (again.embedded, again.reused, again.removed) == (0, first.chunks, 0)
    assert store._collection.count() == first.chunks  # no duplicates
    assert "reusing the stored vectors" in caplog.text


def test_vectors_survive_a_new_client(sample_store, minilm, splitter):
    store, docs, first = sample_store
    folder = store._client.get_settings().persist_directory
    reopened = open_minilm_store(folder, minilm)
    report = index.sync_index(reopened, docs, splitter)
    assert report.embedded == 0 and reopened._collection.count() == first.chunks


def test_a_changed_file_re_indexes_just_that_file(tmp_path, minilm, splitter, sample_doc):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text(sample_doc.read_text()[:6000])  # a few chunks of the report keep this test quick
    b.write_text("# Branches\n\nThe group runs 312 branches in eleven states.\n")
    store = open_minilm_store(tmp_path / "db", minilm)
    first = index.sync_index(store, index.load_documents([a, b]), splitter)
    old_a = store._collection.get(where={"source": str(a.resolve())}, include=[])["ids"]
    a.write_text(a.read_text().replace("$415 million", "$420 million"))
    second = index.sync_index(store, index.load_documents([a, b]), splitter)
    assert second.removed == len(old_a)
    assert second.embedded == len(old_a)  # all of a's chunks (new ids), none of b's
    assert second.reused == 1 and store._collection.count() == first.chunks
    new_a = store._collection.get(where={"source": str(a.resolve())}, include=["documents"])
    assert not set(old_a) & set(new_a["ids"]) and any("$420 million" in d for d in new_a["documents"])


def test_reindex_rebuilds_the_collection(tmp_path, minilm, splitter, sample_doc):
    store = open_minilm_store(tmp_path / "db", minilm)
    (tmp_path / "a.txt").write_text(sample_doc.read_text()[:4000])
    docs = index.load_documents([tmp_path / "a.txt"])
    first = index.sync_index(store, docs, splitter)
    rebuilt = index.sync_index(store, docs, splitter, reindex=True)
    assert rebuilt.embedded == first.chunks and store._collection.count() == first.chunks


def test_files_with_the_same_text_keep_their_own_chunks(tmp_path, minilm, splitter, sample_doc):
    text = sample_doc.read_text()[:3000]
    a, b = tmp_path / "a.txt", tmp_path / "copy" / "a.txt"
    b.parent.mkdir()
    a.write_text(text)
    b.write_text(text)
    store = open_minilm_store(tmp_path / "db", minilm)
    docs = index.load_documents([a, b])
    first = index.sync_index(store, docs, splitter)
    per_file = first.chunks // 2

    def ids_of(path):
        return store._collection.get(where={"source": str(path.resolve())}, include=[])["ids"]

    assert first.embedded == first.chunks == store._collection.count() and len(ids_of(a)) == per_file
    assert not set(ids_of(a)) & set(ids_of(b))
    hits = make_retriever(store, None, 3, [str(b.resolve())], mode="dense").invoke("net interest income")
    assert hits and {d.metadata["source"] for d in hits} == {str(b.resolve())}
    kept = ids_of(a)
    b.write_text(text.replace("2025", "2026"))  # editing one copy leaves the other's vectors alone
    second = index.sync_index(store, index.load_documents([a, b]), splitter)
    assert ids_of(a) == kept and second.reused == per_file and second.removed == per_file
    assert store._collection.count() == first.chunks


def test_two_embedders_fill_two_collections_in_one_store(tmp_path, sample_doc, tiny_bert):
    from rag.cli import Answerer
    from rag.config import RagConfig

    doc = tmp_path / "report.txt"
    doc.write_text(sample_doc.read_text()[:6000])
    folder = tmp_path / "db"
    reports = {}
    for spec in ("minilm", str(tiny_bert)):
        cfg = RagConfig(file=[doc], question="-", embeddings=spec, persist_dir=folder, retrieve_only=True)
        reports[spec] = Answerer(cfg, 0.0).report
    assert reports["minilm"].collection != reports[str(tiny_bert)].collection
    client = index.open_client(folder)
    counts = {c.name: c.count() for c in client.list_collections()}
    assert counts == {r.collection: r.chunks for r in reports.values()}
    for report in reports.values():  # each embedded all of its chunks: nothing shared or reused
        assert report.embedded == report.chunks > 1 and report.reused == 0


def test_different_embedders_and_chunkings_get_different_collections(tmp_path, minilm):
    _, resolved = minilm
    copy = tmp_path / "tuned"
    shutil.copytree(resolved, copy)  # same weights at another path: treated as another model, never shared
    names = {
        index.collection_name("minilm", model_identity(resolved), 254, 50),
        index.collection_name(str(copy), model_identity(str(copy)), 254, 50),
        index.collection_name("minilm", model_identity(resolved), 128, 50),
        index.collection_name("minilm", model_identity(resolved), 254, 20),
    }
    assert len(names) == 4
    (copy / "model.safetensors").write_bytes(b"retrained")  # a re-trained model in the same folder
    assert index.collection_name(str(copy), model_identity(str(copy)), 254, 50) not in names
    for name in names:
        assert 3 <= len(name) <= 63 and name[0].isalnum() and name[-1].isalnum()


def test_retrieval_is_limited_to_the_files_asked_about(tmp_path, minilm, splitter, sample_doc):
    other, report = tmp_path / "other.txt", tmp_path / "report.txt"
    other.write_text("The CET1 ratio of Example Bank was 9.9% at year end.")
    text = sample_doc.read_text()
    start = text.index("CET1")  # a slice of the report that also speaks of CET1 keeps this test quick
    report.write_text(text[max(0, start - 1500):start + 1500])
    store = open_minilm_store(tmp_path / "db", minilm)
    docs = index.load_documents([report, other])
    index.sync_index(store, docs, splitter)
    only_other = make_retriever(store, None, 3, [docs[1].metadata["source"]], mode="dense")
    hits = only_other.invoke("What was the CET1 ratio?")
    assert [d.page_content for d in hits] == [other.read_text()]
    assert -1.0 <= hits[0].metadata["score"] <= 1.0


def test_recall_at_4_on_the_sample_questions(sample_store, sample_qa, minilm, monkeypatch):
    store, docs, _ = sample_store
    items = json.loads(sample_qa.read_text())
    # The questions' real MiniLM vectors in one batch: encoded one at a time they cost ~8x on 2 busy cores.
    embeddings = minilm[0]
    questions = [item["question"] for item in items]
    vectors = dict(zip(questions, embeddings.embed_documents(questions)))
    single = type(embeddings).embed_query
    monkeypatch.setattr(type(embeddings), "embed_query", lambda self, text: vectors.get(text) or single(self, text))
    retriever = make_retriever(store, None, 4, [docs[0].metadata["source"]], mode="dense")
    hits = [retriever.invoke(item["question"]) for item in items]
    scores = [d.metadata["score"] for d in hits[0]]
    assert scores == sorted(scores, reverse=True)
    assert recall_at_k([[d.page_content for d in h] for h in hits], items) >= RECALL_AT_4_FLOOR


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(index.StoreError, match=f"{str(tmp_path)!r} is not a tunerag index"):
        index.open_client(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written into it


def test_a_store_another_run_is_creating_is_not_called_foreign(tmp_path, monkeypatch):
    """The interleaving CI hit with three runs on one new folder: this run sees no marker, then the other
    run writes its marker and Chroma's files before this one lists the folder."""
    other = tmp_path / "db"
    index.open_client(other)  # what the other run leaves once it is done
    folder = tmp_path / "new"
    folder.mkdir()
    listing = type(folder).iterdir

    def other_run_finishes_first(path):
        if path == folder and not (folder / index.STORE_MARKER).exists():
            for made in other.iterdir():
                if made.is_file():
                    shutil.copy(made, folder / made.name)
        return listing(path)

    monkeypatch.setattr(type(folder), "iterdir", other_run_finishes_first)
    index.open_client(folder).list_collections()


def test_another_tools_chroma_store_is_refused(tmp_path):
    import chromadb

    chromadb.PersistentClient(path=str(tmp_path / "theirs")).get_or_create_collection("langchain")
    with pytest.raises(index.StoreError, match="holds a Chroma store that tunerag did not create"):
        index.open_client(tmp_path / "theirs")


def test_a_corrupt_store_names_its_folder(tmp_path):
    folder = tmp_path / "db"
    index.open_client(folder)
    (folder / "chroma.sqlite3").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(index.StoreError, match=f"the index in {str(folder)!r} cannot be opened"):
        index.open_client(folder)
