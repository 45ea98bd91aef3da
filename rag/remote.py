"""Servers for when one machine is not enough: the Chroma store and the LLM behind rag.cli and rag.serve.

    python -m rag.cli --file doc.txt --chroma-url http://store:8000 --chroma-header 'Authorization: Bearer T'
    python -m rag.cli --file doc.txt --llm-url http://gpu:8000/v1 [--llm-model NAME]

- --chroma-url: `chromadb.HttpClient` in place of the store folder, with the same chunk ids, deduplication
  and per-embedder collections. A folder carries tunerag's marker as a file; a collection on a server
  carries it in its metadata ({"tunerag_store": 1}), so a collection of that name that tunerag did not
  create is refused, not written into. The BM25 index is a local cache, $TUNERAG_HOME/bm25/HOST_PORT/
  COLLECTION, rebuilt from the collection whenever the chunk ids differ.
- --llm-url: any OpenAI-compatible /v1 server (vLLM, TGI, llama.cpp's server, Ollama) through
  langchain-openai's ChatOpenAI. The chat path: the system instructions and rag.chain.user_message go as
  chat messages and the server applies its model's own template, which every such server does.

Chroma's server has no authentication of its own (1.5.x): put it behind a TLS proxy that checks a
token, and send that token with --chroma-header. The LLM server's key, if it has one, comes from
$TUNERAG_LLM_API_KEY (kept out of the process list), as does a header's value written `$NAME`.
"""

from __future__ import annotations

import logging
import os
import re
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from tunerag.common import TuneragError, first_line, tunerag_home

logger = logging.getLogger(__name__)

MARKER_KEY = "tunerag_store"  # the collection metadata key that says tunerag created it
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)
CONNECT_TIMEOUT_S = 10.0


# ---- flags (pure: RagConfig checks them before anything loads) ----

def check_url(flag: str, url: str) -> str:
    """`url` without a trailing slash, or a one-line error naming `flag`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{flag} {url!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000)")
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"{flag} {url!r} has a port that is not a number") from None
    return url.strip().rstrip("/")


def parse_headers(lines: list[str], environ: dict | None = None) -> dict[str, str]:
    """['Name: value', ...] -> {Name: value}; a value written `$VAR` is read from the environment."""
    environ = os.environ if environ is None else environ
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not HEADER_NAME.match(name):
            raise ValueError(f"--chroma-header {line!r} is not 'Name: value' (e.g. 'Authorization: Bearer TOKEN')")
        if value.startswith("$") and re.fullmatch(r"\$\w+", value):
            if value[1:] not in environ:
                raise ValueError(f"--chroma-header {name}: ${value[1:]} is not set in the environment")
            value = environ[value[1:]]
        headers[name] = value
    return headers


def host_port(url: str) -> str:
    """'http://store.lan:8000/x' -> 'store.lan_8000': the cache folder of one server's BM25 indexes."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{parts.hostname}_{port}")


def cache_folder(url: str) -> Path:
    """Where the BM25 indexes of collections on this server live (and the lock of their writers here)."""
    folder = tunerag_home() / "bm25" / host_port(url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TuneragError(f"the BM25 cache {str(folder)!r} cannot be created ({e.strerror or e}); "
                           "set TUNERAG_HOME to a folder you can write to") from None
    return folder


def quiet_http() -> None:
    """No INFO line per request from httpx (chromadb's client) and httpx2 (openai's); warnings stay."""
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ---- the store ----

def http_client(url: str, headers: list[str]):
    """A chromadb HttpClient on `url` (a path after the host is kept, for a proxy that serves Chroma under one)."""
    import chromadb
    from chromadb.config import Settings

    from rag.index import StoreError

    quiet_http()
    try:
        # The full URL as host: chromadb then keeps its scheme, port and path and adds /api/v2 itself.
        return chromadb.HttpClient(host=url, headers=parse_headers(headers) or None,
                                   settings=Settings(anonymized_telemetry=False))
    except Exception as e:  # ValueError "Could not connect", an auth error from the proxy, ...
        raise StoreError(f"the Chroma server at {url} cannot be reached ({first_line(e)}); start it with "
                         "`chroma run --path DIR --host HOST --port PORT`, or check --chroma-url and --chroma-header") from None


def is_remote(client) -> bool:
    return client.get_settings().chroma_api_impl == "chromadb.api.fastapi.FastAPI"


def where(client) -> str:
    """The store in words, for error messages: the server's URL or the folder."""
    settings = client.get_settings()
    return f"the Chroma server at {settings.chroma_server_host}" if is_remote(client) else \
        f"the index in {str(settings.persist_directory)!r}"


def check_marker(collection, url: str) -> None:
    """Refuse a collection that tunerag did not create (it has no tunerag_store in its metadata)."""
    from rag.index import StoreError

    if not (collection.metadata or {}).get(MARKER_KEY):
        raise StoreError(f"collection {collection.name!r} on the Chroma server at {url} was not created by tunerag "
                         "(no tunerag_store in its metadata); tunerag will not write into it: delete or rename it "
                         "there, or use another server")


# ---- the LLM ----

def chat_model(url: str, model: str | None, *, max_new_tokens: int, temperature: float, seed: int):
    """(ChatOpenAI on the server at `url`, the model name): the only one it serves when `model` is None."""
    from langchain_openai import ChatOpenAI
    from openai import APIError, OpenAI

    quiet_http()
    api_key = os.environ.get("TUNERAG_LLM_API_KEY") or "none"  # servers without --api-key ignore it
    try:
        served = [m.id for m in OpenAI(base_url=url, api_key=api_key, timeout=CONNECT_TIMEOUT_S, max_retries=1)
                  .models.list()]
    except APIError as e:
        raise TuneragError(f"the LLM server at {url} does not answer GET {url}/models ({first_line(e)}); "
                           "start it (e.g. `python -m vllm.entrypoints.openai.api_server --model M`), check --llm-url "
                           "(it ends in /v1 on most servers) and $TUNERAG_LLM_API_KEY") from None
    if model is None:
        if len(served) != 1:
            raise TuneragError(f"the LLM server at {url} serves {len(served)} models ({', '.join(served) or 'none'}); "
                               "name one with --llm-model")
        model = served[0]
    elif served and model not in served and f"{model}:latest" not in served:  # Ollama names "NAME:latest"
        raise TuneragError(f"--llm-model {model!r} is not served at {url}; it serves {', '.join(served)}")
    sampling = {"temperature": temperature, "seed": seed} if temperature > 0 else {"temperature": 0.0}
    return ChatOpenAI(base_url=url, api_key=api_key, model=model, max_tokens=max_new_tokens, streaming=True,
                      max_retries=1, **sampling), model


def chat_messages(passages: list[Any], question: str) -> list:
    """The prompt of rag.chain.render_prompt as chat messages; the server applies its model's template."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from rag.chain import INSTRUCTIONS, user_message

    return [SystemMessage(INSTRUCTIONS), HumanMessage(user_message(passages, question))]


def build_remote_chain(retriever, chat, stop, url: str, select: Callable | None = None):
    """rag.chain.build_chain's shape ({"query"} -> {"query", "result", "source_documents"}, streamed) with
    the answer from an OpenAI-compatible server. The server checks the prompt's length itself (one line
    when it is over); `stop.event` (a rag.chain.StopFlag) ends the answer at the next token."""
    from langchain_core.runnables import RunnableGenerator, RunnableLambda, RunnablePassthrough
    from openai import APIError

    from rag.chain import retrieved

    def prompt(inputs: dict) -> dict:
        docs = inputs["source_documents"]
        if select is not None:
            docs = select(inputs["query"], docs)
        return {"query": inputs["query"], "messages": chat_messages(docs, inputs["query"]), "source_documents": docs}

    def answer(messages_stream):
        for messages in messages_stream:  # one item: the prompt's messages
            tokens = chat.stream(messages)
            try:
                for chunk in tokens:
                    if stop.event.is_set():  # Ctrl-C, or the web client left
                        return
                    yield chunk.text
            except APIError as e:
                raise TuneragError(f"the LLM server at {url} failed ({first_line(e)})") from None
            finally:
                # Closes the HTTP response now, so the server ends the request (a stream that is only left
                # behind stays open and the server generates on to --max-new-tokens).
                tokens.close()

    generate = RunnablePassthrough.assign(result=itemgetter("messages") | RunnableGenerator(answer, name="remote_llm"))
    retrieve = RunnablePassthrough.assign(source_documents=lambda inputs: retrieved(retriever, inputs))
    return (retrieve | RunnableLambda(prompt, name="chat_prompt") | generate).pick(["query", "result", "source_documents"])


def remote_answer_chain(cfg, retriever, embeddings, embed=None):
    """(the chain, its StopFlag) for rag.cli.Answerer with --llm-url. The server's tokenizer is not here,
    so the embedder's counts the --context-tokens budget of the kept sentences (a budget, not a limit).
    `embed`: what scores the sentences (default: the embedder's embed_documents)."""
    from rag.chain import StopFlag, count_tokens
    from rag.context import evidence_passages

    chat, model = chat_model(cfg.llm_url, cfg.llm_model, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, seed=cfg.seed)
    logger.info("answers come from %s at %s", model, cfg.llm_url)
    select = None
    if cfg.context == "sentences":
        tokenizer = embeddings.tokenizer

        def select(question: str, docs: list) -> list:
            return evidence_passages(question, docs, embed or embeddings.embed_documents,
                                     lambda text: count_tokens(tokenizer, text), cfg.context_tokens)
    stop = StopFlag()  # set, it ends the stream at the next token
    return build_remote_chain(retriever, chat, stop, cfg.llm_url, select), stop
