"""python -m rag.cli --file doc.txt [-q "question"] [--questions FILE] [--retrieve-only] [--json] [--timings]

Retrieval QA over your documents: index them once into a persistent Chroma store, then answer one
question (-q), a file of questions (--questions, JSON lines), or open an interactive session.
Models default to the embedded MiniLM embedder and SmolLM2 LLM; pass your tuned ones with
--embeddings (from embeddings.finetune) and --llm (from llm_finetune.merge).

Heavy libraries (torch, transformers, langchain, chromadb) are imported inside functions, so
`--help` and flag errors answer at once.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rag.chain import NO_ANSWER, is_no_answer, retrieval_query, retrieved, search_text
from rag.config import RagConfig
from rag.context import best_unit, chunk_scores, citations, evidence_passages, evidence_record, support
from rag.retrieve import make_retriever, open_bm25
from tunerag.common import TuneragError, first_line, run_cli, tunerag_home

logger = logging.getLogger(__name__)

HELP = ("/sources shows the passages behind the last answer; /new starts a new conversation; /quit or Ctrl-D "
        "leaves; Ctrl-C stops an answer.")
HISTORY_TURNS = 3  # earlier (question, answer) pairs a follow-up is read with


def quiet_libraries() -> None:
    """Our INFO lines stay; the libraries' INFO chatter and weight-loading bars do not."""
    # (bm25s sets its own logger to DEBUG when imported: rag.retrieve.import_bm25s quiets it after that)
    for name in ("bitsandbytes", "sentence_transformers", "transformers", "chromadb", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_questions(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise TuneragError(f"--questions {str(path)!r} cannot be read ({e.strerror})") from None
    questions = [line.strip() for line in lines if line.strip()]
    if not questions:
        raise TuneragError(f"--questions {str(path)!r} has no questions (one question a line)")
    return questions


def to_json(out: dict) -> dict:
    """The --json shape (see the README): the answer, the passages it cites, its evidence sentence,
    and the passages the LLM read, numbered as in the prompt."""
    return {"query": out["query"], "result": out["result"], "citations": out.get("citations", []),
            "evidence": out.get("evidence"), "source_documents": [
                {"text": d.page_content, "source": d.metadata.get("source"), "page": d.metadata.get("page"),
                 "chunk": d.metadata.get("chunk"), "score": d.metadata.get("score"),
                 "found_by": d.metadata.get("found_by")} for d in out["source_documents"]]}


def format_sources(docs: list[Any]) -> str:
    if not docs:
        return "(no passages)"
    lines = []
    for i, d in enumerate(docs, 1):
        text = " ".join(d.page_content.split())
        page = f" page {d.metadata['page']}" if d.metadata.get("page") is not None else ""
        found = "+".join(d.metadata.get("found_by") or [])
        lines.append(f"[{i}] {Path(d.metadata.get('source', '?')).name}{page} chunk {d.metadata.get('chunk')} "
                     f"(score {d.metadata.get('score')}{', ' + found if found else ''}): "
                     f"{text[:300]}{'...' if len(text) > 300 else ''}")
    return "\n".join(lines)


def format_evidence(evidence: dict | None) -> str:
    if not evidence:
        return "Evidence: (none)"
    page = f", page {evidence['page']}" if evidence.get("page") is not None else ""
    return (f"Evidence [{evidence['passage']}] ({Path(evidence['source'] or '?').name}{page}, "
            f"characters {evidence['start']}-{evidence['end']}): {evidence['text']}")


def ask(chain, question: str, out: dict, on_token: Callable[[str], None] | None = None, stop=None,
        history: list[tuple[str, str]] = (), docs: list | None = None) -> dict:
    """Stream one answer into `out` ({"query", "result", "source_documents"}) and return the seconds
    to retrieval and to the first token. `out` is filled as it goes, so an answer stopped with
    Ctrl-C still has its passages. `stop` is the LLM's StopFlag (rag.chain.make_llm), if there is one;
    `docs`: the passages, already retrieved for the question."""
    if stop is not None:
        stop.ready_for_next()
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    out.update(query=question, result="", source_documents=[])
    inputs = {"query": question, "retrieval_query": retrieval_query(question, list(history)), "history": list(history)}
    stream = chain.stream(inputs if docs is None else inputs | {"source_documents": docs})
    finished = False
    try:
        for chunk in stream:
            if "source_documents" in chunk:
                out["source_documents"] = chunk["source_documents"]
                marks.setdefault("retrieve", time.perf_counter() - t0)
            if "unit" in chunk:  # the extractive answer's sentence, with its offsets
                out["unit"] = chunk["unit"]
            if chunk.get("result"):
                marks.setdefault("first_token", time.perf_counter() - t0)
                out["result"] += chunk["result"]
                if on_token:
                    on_token(chunk["result"])
        finished = True
    finally:
        if not finished and stop is not None:
            stop.event.set()  # a remote answer's thread, or a server's, ends at its next token
        stream.close()  # on Ctrl-C: closes the chain's stream: the LLM ends at once
    out["result"] = out["result"].strip()
    return marks


class Answerer:
    """Everything loaded once: the index, the retriever and (unless --retrieve-only) the chain.

    `models` is a cache of loaded models shared by several Answerers (rag.serve builds a new one over
    the new file list after an upload): the embedder and the LLM are loaded on first use only."""

    def __init__(self, cfg: RagConfig, t_start: float, models: dict | None = None):
        from rag import index, remote
        from tunerag.models import model_identity

        self.cfg = cfg
        self.models = models if models is not None else {}
        self.timings: dict[str, float] = {}
        # The cheap checks (documents, store folder) come before any model loads.
        docs = index.load_documents(cfg.file, cfg.strict)
        client = index.open_client(cfg.persist_dir, cfg.chroma_url, cfg.chroma_header)
        t = time.perf_counter()
        quiet_libraries()
        from rag.embedder import load_embeddings

        embeddings, resolved = self.loaded(("embedder", cfg.embeddings, cfg.dtype, cfg.embed_backend),
                                           lambda: load_embeddings(cfg.embeddings, cfg.dtype, cfg.embed_backend))
        self.timings["load_embedder"] = time.perf_counter() - t
        t = time.perf_counter()
        size = index.capped_chunk_size(cfg.chunk_size, index.embedder_max_tokens(embeddings))
        overlap = cfg.chunk_overlap if cfg.chunk_overlap < size else size // 2
        if overlap != cfg.chunk_overlap:
            logger.info("note: --chunk-overlap %d lowered to %d, half the capped chunk size", cfg.chunk_overlap, overlap)
        name = index.collection_name(cfg.embeddings, model_identity(resolved), size, overlap)
        store = index.open_store(client, name, embeddings,
                                 metadata={"embedder": resolved, "chunk_size": size, "chunk_overlap": overlap},
                                 persist_dir=cfg.persist_dir)
        splitter = index.make_splitter(embeddings.tokenizer, size, overlap)
        # --chroma-url: no store folder here; the lock (writers on this machine) and BM25 go to a local cache.
        local = remote.cache_folder(cfg.chroma_url) if cfg.chroma_url else Path(cfg.persist_dir)
        with index.store_lock(local):  # one writer at a time; queries need no lock
            self.report = index.sync_index(store, docs, splitter, reindex=cfg.reindex)
            bm25 = None
            if cfg.retriever != "dense":
                changed = bool(cfg.reindex or self.report.embedded or self.report.removed)
                sentences = cfg.retriever == "hybrid" and (cfg.sentence_weight > 0 or cfg.rerank_weight > 0)
                bm25 = open_bm25(store._collection, local / name if cfg.chroma_url else local / "bm25" / name,
                                 changed=changed, embed=embeddings.embed_documents if sentences else None)
        self.embeddings = embeddings
        self.embed = last_call_kept(embeddings.embed_documents)
        self.bm25 = bm25
        self.retriever = make_retriever(store, bm25, cfg.k, sorted({d.metadata["source"] for d in docs}),
                                        mode=cfg.retriever, bm25_weight=cfg.bm25_weight, fetch_k=cfg.fetch_k,
                                        year_weight=cfg.year_weight, sentence_weight=cfg.sentence_weight,
                                        rerank_weight=cfg.rerank_weight, chunk_scores=chunk_scores,
                                        year_copies=cfg.year_copies,
                                        abbreviations=cfg.abbreviations)
        self.files = sorted({Path(d.metadata["source"]).name for d in docs})
        self.timings["index"] = time.perf_counter() - t
        self.stop = None
        if cfg.retrieve_only:
            self.chain = self.retrieval_chain()
        elif cfg.answer == "extractive":
            self.chain = self.extractive_chain()
        else:
            t = time.perf_counter()
            self.chain = self.answer_chain()
            self.timings["load_llm"] = time.perf_counter() - t
        self.timings["ready"] = time.perf_counter() - t_start

    def loaded(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key not in self.models:
            self.models[key] = load()
        return self.models[key]

    def retrieval_chain(self):
        from langchain_core.runnables import RunnableLambda

        return RunnableLambda(lambda x: {**x, "source_documents": self.retriever.invoke(search_text(x))})

    def extractive_chain(self):
        """{"query"} -> the best-matching sentence of the retrieved passages as the answer (no LLM)."""
        from langchain_core.runnables import RunnableLambda

        def answer(inputs: dict) -> dict:
            docs = retrieved(self.retriever, inputs)
            unit = best_unit(inputs["query"], docs, self.embed)
            return {"query": inputs["query"], "source_documents": docs, "result": unit.text if unit else "",
                    "unit": unit}

        return RunnableLambda(answer, name="extractive")

    def answer_chain(self):
        from rag.chain import build_chain, context_window, count_tokens, make_llm
        from tunerag.models import LLM_INSTEAD, load_llm

        cfg = self.cfg
        if cfg.llm_url is not None:  # an OpenAI-compatible server writes the answers: no LLM loads here
            from rag.remote import remote_answer_chain

            chain, self.stop = remote_answer_chain(cfg, self.retriever, self.embeddings, self.embed)
            return chain
        from tunerag.models import llm_dtypes, prefill_copy

        weights, reader = llm_dtypes(cfg.dtype)
        try:
            # from_pretrained's "auto" is the checkpoint's dtype (float32 for SmolLM2); --dtype auto on a CPU
            # with AMX/AVX512-BF16 reads the prompt with a bfloat16 copy (~3x faster) and writes in float32
            model, tokenizer = self.loaded(("llm", cfg.llm, weights), lambda: load_llm(cfg.llm, dtype=weights or "auto"))
        except (OSError, ValueError, KeyError) as e:
            raise TuneragError(f"LLM {cfg.llm!r} could not be loaded ({first_line(e)}); pass {LLM_INSTEAD}") from None
        prefill_model = self.loaded(("llm-reader", cfg.llm, reader), lambda: prefill_copy(model, reader))
        if cfg.temperature > 0:
            from transformers import set_seed

            set_seed(cfg.seed)
        self.model, self.tokenizer = model, tokenizer
        llm, self.stop = make_llm(model, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                  decode_threads=cfg.decode_threads, prefill_model=prefill_model,
                                  lookup_tokens=cfg.lookup_tokens, quote=cfg.answer == "quote")
        window = context_window(model, tokenizer)
        if window <= cfg.max_new_tokens + 64:
            raise TuneragError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in this LLM's "
                               f"{window}-token context; lower it")
        select = None
        if cfg.context == "sentences":
            def select(question: str, docs: list) -> list:
                return evidence_passages(question, docs, self.embed, lambda text: count_tokens(tokenizer, text),
                                         cfg.context_tokens)
        return build_chain(self.retriever, llm, tokenizer, max_prompt_tokens=window - cfg.max_new_tokens, select=select)

    def ask(self, question: str, out: dict, on_token: Callable[[str], None] | None = None,
            history: list[tuple[str, str]] = ()) -> dict:
        """Answer `question` into `out`; `history` is the conversation so far as (question, answer) pairs."""
        if not question.strip():
            raise TuneragError("the question is empty; ask something about the document")
        unknown = self.unknown_names(question)
        if unknown:
            names = " or ".join(dict.fromkeys(unknown))
            return self.decline(question, f"I don't know: the documents never mention {names}.", out, on_token, history)
        docs, checked_s = None, 0.0
        if self.cfg.min_support > 0 and not self.cfg.retrieve_only:
            t0 = time.perf_counter()
            search = retrieval_query(question.strip(), list(history))
            docs = self.retriever.invoke(search)
            best = best_unit(search, docs, self.embed)
            checked_s = time.perf_counter() - t0
            if best is None or best.score < self.cfg.min_support:
                return self.decline(question, NO_ANSWER, out, on_token, history, docs, checked_s)
        marks = ask(self.chain, question.strip(), out, on_token, self.stop, history, docs)
        marks = {name: seconds + checked_s for name, seconds in marks.items()}  # timed from the question, as ever
        if self.cfg.retrieve_only:
            out["result"] = None
            return marks
        docs = out["source_documents"]
        unit = out.pop("unit", None)
        if unit is None and is_no_answer(out["result"]):  # "I don't know": no sentence supports it
            out["evidence"], out["citations"] = None, []
            return marks
        unit = unit or support(out["result"], out["query"], docs, self.embed)
        out["evidence"] = evidence_record(unit, docs)
        out["citations"] = citations(out["result"], len(docs), out["evidence"])
        return marks

    def unknown_names(self, question: str) -> list[str]:
        """--unknown-names decline: the names of `question` that no indexed chunk has (Bm25Index.unknown_names)."""
        if self.cfg.unknown_names != "decline" or self.cfg.retrieve_only or self.bm25 is None:
            return []
        return self.bm25.unknown_names(question, set(self.retriever.sources))

    def decline(self, question: str, result: str, out: dict, on_token, history, docs: list | None = None,
                retrieve_s: float = 0.0) -> dict:
        """`result` ("I don't know: ...") as the answer, without the LLM: the question names something the
        documents never mention, or no retrieved sentence supports an answer (--min-support). The passages
        the retriever finds are still shown."""
        t0 = time.perf_counter() - retrieve_s
        if docs is None:
            docs = self.retriever.invoke(retrieval_query(question.strip(), list(history)))
        marks = {"retrieve": time.perf_counter() - t0}
        out.update(query=question.strip(), source_documents=docs, result=result, evidence=None, citations=[])
        if on_token:
            on_token(result)
        marks["first_token"] = time.perf_counter() - t0
        return marks


def last_call_kept(embed: Callable[[list[str]], list[list[float]]]) -> Callable[[list[str]], list[list[float]]]:
    """`embed` that answers a repeat of its last call from memory: the support check and the context cut
    score the same sentences of the same passages against the same question."""
    last = functools.lru_cache(maxsize=1)(lambda texts: embed(list(texts)))
    return lambda texts: last(tuple(texts))


def print_timings(timings: dict[str, float]) -> None:
    print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()), file=sys.stderr)


def one_shot(answerer: Answerer, cfg: RagConfig, t_start: float) -> dict:
    out: dict = {}
    stream_text = not cfg.json and not cfg.retrieve_only
    marks = answerer.ask(cfg.question, out, on_token=(lambda s: print(s, end="", flush=True)) if stream_text else None)
    if cfg.json:
        print(json.dumps(to_json(out), ensure_ascii=False))
    elif cfg.retrieve_only:
        print(format_sources(out["source_documents"]))
    else:
        print()
        print(format_evidence(out.get("evidence")))
        print("\nSources:\n" + format_sources(out["source_documents"]))
    if cfg.timings:
        t = answerer.timings
        print_timings({**{k: t[k] for k in ("load_embedder", "index", "load_llm") if k in t},
                       "retrieve": marks.get("retrieve", 0.0),
                       **({"first_token_from_start": t["ready"] + marks["first_token"]} if "first_token" in marks else {}),
                       "total": time.perf_counter() - t_start})
    return out


def batch(answerer: Answerer, cfg: RagConfig, t_start: float) -> list[dict]:
    """One JSON line per question; a question that fails gets {"query", "error"} and the rest go on."""
    results, first, failed = [], None, 0
    questions = read_questions(cfg.questions)
    for question in questions:
        out: dict = {}
        try:
            marks = answerer.ask(question, out)
        except Exception as e:  # TuneragError (too long, timed out) or a library failure: this question only
            failed += 1
            error = str(e) if isinstance(e, TuneragError) else f"{type(e).__name__}: {e}"
            print(json.dumps({"query": question, "error": error}, ensure_ascii=False), flush=True)
            results.append({"query": question, "error": error})
            continue
        if first is None and "first_token" in marks:
            first = answerer.timings["ready"] + marks["first_token"]
        print(json.dumps(to_json(out), ensure_ascii=False), flush=True)
        results.append(out)
    if cfg.timings:
        print_timings({**answerer.timings, **({"first_token_from_start": first} if first else {}),
                       "total": time.perf_counter() - t_start})
    if failed:
        raise TuneragError(f"{failed} of {len(questions)} questions failed; their lines hold \"error\" instead of \"result\"")
    return results


def setup_readline() -> Callable[[], None]:
    """Line editing and a persistent history ($TUNERAG_HOME/rag_history); returns the saver."""
    try:
        import readline
    except ImportError:  # not on every platform; input() still works without it
        return lambda: None
    history = tunerag_home() / "rag_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError as e:
            logger.warning("could not save the question history to %s (%s)", history, e.strerror)

    return save


def session(answerer: Answerer, cfg: RagConfig) -> None:
    save_history = setup_readline()
    print(f"Ask about {', '.join(answerer.files)} ({answerer.report.chunks} chunks). {HELP}", flush=True)
    last: dict = {"source_documents": []}
    history: list[tuple[str, str]] = []  # follow-ups ("And in 2024?") are read with the questions before them
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:  # Ctrl-D
                print()
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
                print()
                continue
            question = line.strip()
            if not question:
                continue
            if question in ("/quit", "/exit", "/q"):
                break
            if question == "/sources":
                print(format_sources(last["source_documents"]), flush=True)
                continue
            if question.startswith("/"):
                print(f"unknown command {question!r}. {HELP}", flush=True)
                continue
            if question == "/new":
                history.clear()
                print("new conversation: the next question is read on its own", flush=True)
                continue
            out: dict = {}
            try:
                answerer.ask(question, out, on_token=lambda s: print(s, end="", flush=True), history=history)
                if out.get("result"):
                    history[:] = [*history, (question, out["result"])][-HISTORY_TURNS:]
                print(format_sources(out["source_documents"]) if cfg.retrieve_only else "", flush=True)
            except KeyboardInterrupt:  # Answerer.ask has told the generation to stop
                print(" [stopped]", flush=True)
            except TuneragError as e:
                print(f"error: {e}", flush=True)
            except Exception as e:  # the session outlives one failed question; the message says why
                print(f"error: {type(e).__name__}: {e}", flush=True)
            if out.get("source_documents") is not None:
                last = out
    finally:
        save_history()


def main(cfg: RagConfig) -> Any:
    t_start = time.perf_counter()
    if cfg.question is not None and not cfg.question.strip():
        raise TuneragError("the question is empty; pass -q with something to ask about the document")
    if cfg.questions is not None:
        read_questions(cfg.questions)  # a bad questions file fails before any model loads
    # Loading makes millions of long-lived objects (torch, transformers, langchain, pydantic models): with
    # the cyclic GC off meanwhile, and skipped at exit (the OS frees it all), a one-shot run saves seconds
    # (scripts/bench_speed.py, part cli); frozen after loading, so the collections while answering skip them
    # (a full one over the loaded objects took ~0.25 s of a one-shot answer). Reference counting still frees
    # everything as usual.
    atexit.unregister(gc.freeze)  # once per process, however often main runs (tests, the pipeline)
    atexit.register(gc.freeze)
    gc.disable()
    try:
        answerer = Answerer(cfg, t_start)
    finally:
        gc.freeze()
        gc.enable()
    if cfg.question is not None:
        return one_shot(answerer, cfg, t_start)
    if cfg.questions is not None:
        return batch(answerer, cfg, t_start)
    return session(answerer, cfg)


if __name__ == "__main__":
    run_cli(main, RagConfig)
