"""The durable Chroma index behind `rag.cli`: documents -> token-sized chunks -> vectors on disk.

- A chunk's id is the sha256 of the file's resolved path, the sha256 of its text and the chunk's
  position, so indexing the same file again finds its vectors already stored and embeds nothing; a
  changed file gets new ids and its old ones go; two files with the same text never share chunks.
- The collection name is derived from the embedder's identity and the chunk settings, so two
  embedders (or two chunkings) never share vectors.
- The store folder carries a marker file; a folder without it (someone else's files, another tool's
  Chroma store) is refused rather than written into. On a --chroma-url server there is no folder: the
  marker is {"tunerag_store": 1} in each collection's metadata, and a collection without it is refused (rag.remote).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunerag.common import TuneragError, first_line
from tunerag.documents import read_documents, read_pages

logger = logging.getLogger(__name__)

STORE_MARKER = "tunerag-store.json"
EMBED_BATCH = 32  # chunks per add: small enough for a live chunks/s progress bar
SPLIT_BLOCK_CHARS = 1 << 20  # a bigger document is split block by block, with a progress bar
ID_BATCH = 5000  # ids per chromadb get/delete: its SQLite allows about 32,000 variables per statement


class StoreError(TuneragError):
    """A --persist-dir that is not a usable tunerag index."""


@dataclass
class IndexReport:
    collection: str
    files: int
    chunks: int
    embedded: int
    reused: int
    removed: int
    seconds: float


# ---- documents and chunks (pure apart from reading the files) ----

def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_documents(paths: list[Path], strict: bool = False) -> list[Any]:
    """One LangChain `Document` per file (folders walked; a bad file inside a folder is skipped with a
    warning unless `strict`), with source and content hash; a PDF also carries where each page starts,
    so its chunks get metadata["page"]."""
    from langchain_core.documents import Document

    docs = []
    for path, text in read_documents(paths, strict)[0]:
        meta = {"source": str(path.resolve()), "sha256": text_sha256(text), "title": document_title(path)}
        if path.suffix.lower() == ".pdf":
            meta["page_starts"], pos = [], 0
            for number, page in read_pages(path):
                found = text.find(page, pos)
                pos = found if found >= 0 else pos
                meta["page_starts"].append((pos, number))
        docs.append(Document(page_content=text, metadata=meta))
    return docs


def document_title(path: Path) -> str:
    """The file name as words ("halvorsen_ridge_2024_annual_report.txt" -> "halvorsen ridge 2024 annual
    report"): which filing, which year. Three annual reports share most sentences and differ in figures
    and in this, so it goes into each chunk's vector and BM25 terms (contextual chunk headers)."""
    return " ".join(re.split(r"[\W_]+", Path(path).stem)).strip()


def embed_text(chunk) -> str:
    """What the embedder reads for a chunk: its document's title line, then the chunk text."""
    title = chunk.metadata.get("title")
    return f"{title}\n{chunk.page_content}" if title else chunk.page_content


def page_of(start: int, page_starts: list[tuple[int, int]]) -> int | None:
    """The page number of the character at `start`, from (offset, page) pairs in order."""
    import bisect

    i = bisect.bisect_right([offset for offset, _ in page_starts], start) - 1
    return page_starts[max(i, 0)][1] if page_starts else None


def capped_chunk_size(requested: int, embedder_max_tokens: int | None) -> int:
    """The chunk size actually used: the embedder truncates anything longer, so cap it (with a note)."""
    if embedder_max_tokens and requested > embedder_max_tokens:
        logger.info("note: --chunk-size %d capped at %d tokens, the most this embedder reads", requested, embedder_max_tokens)
        return embedder_max_tokens
    return requested


def make_splitter(tokenizer, chunk_size: int, chunk_overlap: int):
    """A splitter that measures chunks in the embedder's own tokens but cuts at paragraph, line and
    word boundaries, so chunk text stays the original text (a token-window splitter decodes ids
    back, which lowercases everything for an uncased WordPiece model such as MiniLM)."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    return RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        tokenizer, chunk_size=chunk_size, chunk_overlap=min(chunk_overlap, chunk_size - 1), add_start_index=True
    )


def chunk_id(source: str, text_sha: str, position: int) -> str:
    return hashlib.sha256(f"{source}\0{text_sha}\0{position}".encode("utf-8")).hexdigest()


def text_blocks(text: str, size: int = SPLIT_BLOCK_CHARS) -> list[tuple[int, str]]:
    """(offset, block) pieces of about `size` characters cut at paragraph breaks: the splitter's progress
    on a big file can then be shown, and its work stays linear. One block for a normal document."""
    if len(text) <= size:
        return [(0, text)]
    blocks, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= size else text.rfind("\n\n", start + size // 2, start + size)
        if end <= start:
            end = min(len(text), start + size)
        blocks.append((start, text[start:end]))
        start = end
    return blocks


def split_document(doc, splitter) -> tuple[list[Any], list[str]]:
    """The chunks of one document, numbered, and their durable ids."""
    from langchain_core.documents import Document
    from tqdm.auto import tqdm

    blocks = text_blocks(doc.page_content)
    if len(blocks) >= 4:  # a big file: say what the next minutes are spent on, even without a progress bar
        logger.info("chunking %s (%.0f MB)...", Path(doc.metadata["source"]).name, len(doc.page_content) / 2**20)
    chunks = []
    for offset, block in tqdm(blocks, desc=f"chunking {Path(doc.metadata['source']).name}", unit="block",
                              disable=len(blocks) < 4 or None):
        meta = {k: v for k, v in doc.metadata.items() if k != "page_starts"}  # Chroma keeps scalars only
        for chunk in splitter.split_documents([Document(page_content=block, metadata=meta)]):
            chunk.metadata["start_index"] = chunk.metadata.get("start_index", 0) + offset
            if "page_starts" in doc.metadata:
                chunk.metadata["page"] = page_of(chunk.metadata["start_index"], doc.metadata["page_starts"])
            chunks.append(chunk)
    for position, chunk in enumerate(chunks):
        chunk.metadata["chunk"] = position
    source, sha = doc.metadata["source"], doc.metadata["sha256"]
    return chunks, [chunk_id(source, sha, position) for position in range(len(chunks))]


# ---- naming ----

def collection_name(embedder_spec: str, identity: str, chunk_size: int, chunk_overlap: int) -> str:
    """A Chroma collection name (3-63 chars of [a-zA-Z0-9._-], alphanumeric at both ends)."""
    # "titled": chunks are embedded with their document's title line (see embed_text); older stores
    # embedded the bare text, so they get a collection of their own instead of mixed vectors
    digest = hashlib.sha256(f"{identity}|{chunk_size}|{chunk_overlap}|titled".encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", Path(embedder_spec.rstrip("/")).name or "embedder").strip("-")[:24] or "embedder"
    return f"{slug}-c{chunk_size}o{chunk_overlap}-{digest}"


# ---- the store ----

def _write_marker(folder: Path) -> None:
    from importlib.metadata import version

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump({"tunerag_store": 1, "chromadb": version("chromadb")}, f)
    os.replace(tmp, folder / STORE_MARKER)


def open_client(persist_dir: Path, chroma_url: str | None = None, chroma_headers: list[str] | None = None):
    """A chromadb PersistentClient on `persist_dir`, created if missing; refuses foreign folders.
    With `chroma_url`, an HttpClient on that server instead (rag.remote; `persist_dir` is not used)."""
    if chroma_url is not None:
        from rag import remote

        return remote.http_client(chroma_url, chroma_headers or [])
    folder = Path(persist_dir)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"--persist-dir {str(folder)!r} is a file, not a folder; pass a folder for the index")
    if folder.is_dir() and not (folder / STORE_MARKER).is_file():
        foreign = None
        if (folder / "chroma.sqlite3").exists():
            foreign = (f"{str(folder)!r} holds a Chroma store that tunerag did not create; "
                       "pass another --persist-dir (tunerag will not write into it)")
        elif any(not p.name.startswith(".") for p in folder.iterdir()):
            foreign = (f"{str(folder)!r} is not a tunerag index (it holds other files); "
                       "pass an empty or new folder as --persist-dir")
        # tunerag writes its marker before any other file: if the marker is there now, the files just
        # seen are another run creating this store at the same moment, not a foreign folder
        if foreign and not (folder / STORE_MARKER).is_file():
            raise StoreError(foreign)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / STORE_MARKER).is_file():
            _write_marker(folder)
    except OSError as e:
        raise StoreError(f"--persist-dir {str(folder)!r} cannot be written ({e.strerror or e}); "
                         "pass a folder you can write to") from None
    import chromadb
    from chromadb.config import Settings

    try:
        # Two runs creating the same new store at once race on its SQLite schema ("table collections
        # already exists"): creation happens under a lock file, so the second one opens what the first made.
        with store_lock(folder):
            client = chromadb.PersistentClient(path=str(folder), settings=Settings(anonymized_telemetry=False))
            client.list_collections()  # a damaged database fails here, not half-way through indexing
    except Exception as e:  # chromadb raises many types (sqlite, Rust bindings)
        raise StoreError(f"the index in {str(folder)!r} cannot be opened ({first_line(e)}); {store_advice(folder)}") from None
    return client


def store_lock(folder: Path, timeout_s: float = 600):
    """An exclusive lock on the store folder (creation and indexing; queries need none)."""
    from filelock import FileLock

    return FileLock(str(folder / ".tunerag.lock"), timeout=timeout_s)


def store_advice(folder: Path) -> str:
    """What to do about a store that failed: "delete" only when SQLite says the file is damaged."""
    import sqlite3

    db = folder / "chroma.sqlite3"
    if not db.is_file():
        return "pass another --persist-dir, or check that folder's permissions"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as e:
        verdict = first_line(e)
    if verdict == "ok":
        return ("its database is intact (SQLite quick_check: ok): check that folder's permissions and free space, "
                "or whether another program holds it, and try again")
    return f"its database is damaged (SQLite: {verdict}); delete that folder to rebuild it, or pass another --persist-dir"


def embedder_max_tokens(embeddings) -> int | None:
    """Most tokens the embedder reads per text, minus the [CLS]/[SEP] it adds itself."""
    tokenizer = embeddings.tokenizer  # a rag.embedder.FolderEmbeddings
    special = tokenizer.num_special_tokens_to_add() if hasattr(tokenizer, "num_special_tokens_to_add") else 2
    return embeddings.max_seq_length - special if embeddings.max_seq_length else None


def open_store(client, name: str, embeddings, metadata: dict[str, Any] | None = None, persist_dir: Path | None = None):
    """The langchain-chroma store for one collection, cosine distance (scores = 1 - distance)."""
    from langchain_chroma import Chroma

    from rag import remote

    if remote.is_remote(client):  # no folder for the marker file: it goes into the collection's metadata
        url = client.get_settings().chroma_server_host
        try:
            store = Chroma(collection_name=name, embedding_function=embeddings, client=client,
                           collection_metadata={**(metadata or {}), remote.MARKER_KEY: 1},
                           collection_configuration={"hnsw": {"space": "cosine"}})
        except Exception as e:  # chromadb's errors, or httpx's when the server went away
            raise StoreError(f"collection {name!r} on the Chroma server at {url} cannot be opened ({first_line(e)}); "
                             "check that the server runs and --chroma-header") from None
        remote.check_marker(store._collection, url)  # an existing collection keeps its metadata: someone else's has none
        return store
    try:
        return Chroma(collection_name=name, embedding_function=embeddings, client=client,
                      collection_metadata=metadata or None, collection_configuration={"hnsw": {"space": "cosine"}})
    except Exception as e:
        advice = store_advice(Path(persist_dir)) if persist_dir is not None else "pass another --persist-dir"
        raise StoreError(f"collection {name!r} in {str(persist_dir)!r} cannot be opened ({first_line(e)}); {advice}") from None


@contextmanager
def writing_into(store):
    """A failed write into the store (a read-only folder, a full disk) as one line naming its folder."""
    import sqlite3

    import httpx
    from chromadb.errors import ChromaError

    try:
        yield
    except (OSError, sqlite3.Error, ChromaError, httpx.HTTPError) as e:  # httpx: a --chroma-url server gone away
        from rag import remote

        if remote.is_remote(store._client):
            raise StoreError(f"{remote.where(store._client)} cannot be written ({first_line(e)}); "
                             "check that it runs, its free space and --chroma-header") from None
        folder = store._client.get_settings().persist_directory
        raise StoreError(f"the index in {str(folder)!r} cannot be written ({first_line(e)}); "
                         "check that folder's permissions and free space, or pass another --persist-dir") from None


def batches(items: list, size: int = ID_BATCH) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def sync_index(store, docs: list[Any], splitter, *, reindex: bool = False, show_progress: bool | None = None) -> IndexReport:
    """Bring the collection up to date with `docs`: embed only chunks whose ids are not stored yet,
    and drop the chunks of an earlier version of each file. Returns counts for the caller to report."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if reindex:
        with writing_into(store):
            store.reset_collection()
        logger.info("--reindex: collection %s emptied", store._collection.name)
    collection = store._collection  # the raw chromadb collection: id lookups without embedding anything
    todo: list[tuple[Any, str]] = []
    total = reused = removed = 0
    for doc in docs:
        chunks, ids = split_document(doc, splitter)
        total += len(chunks)
        source, wanted = doc.metadata["source"], set(ids)
        stale = [i for i in collection.get(where={"source": source}, include=[])["ids"] if i not in wanted]
        if stale:
            with writing_into(store):
                for batch in batches(stale):
                    collection.delete(ids=batch)
            removed += len(stale)
            logger.info("%s changed since it was indexed: removed its %d old chunks", source, len(stale))
        stored = {i for batch in batches(ids) for i in collection.get(ids=batch, include=[])["ids"]}
        reused += len(stored)
        todo += [(chunk, i) for chunk, i in zip(chunks, ids) if i not in stored]
        if stored and len(stored) == len(ids):
            logger.info("%s: %d chunks already indexed; reusing the stored vectors (nothing re-embedded)",
                        Path(source).name, len(ids))
    if todo:
        with tqdm(total=len(todo), unit="chunk", desc="embedding", disable=None if show_progress is None else not show_progress) as bar:
            for start in range(0, len(todo), EMBED_BATCH):
                batch = todo[start:start + EMBED_BATCH]
                vectors = store.embeddings.embed_documents([embed_text(c) for c, _ in batch])
                with writing_into(store):  # the stored document is the chunk text as is; its vector has the title
                    collection.add(ids=[i for _, i in batch], embeddings=vectors,
                                   documents=[c.page_content for c, _ in batch], metadatas=[c.metadata for c, _ in batch])
                bar.update(len(batch))
    seconds = time.perf_counter() - t0
    report = IndexReport(collection.name, len(docs), total, len(todo), reused, removed, round(seconds, 3))
    if todo:
        logger.info("indexed %d new chunks in %.1f s (%.0f chunks/s) into collection %s",
                    len(todo), seconds, len(todo) / max(seconds, 1e-9), collection.name)
    return report
