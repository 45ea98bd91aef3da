"""The RetrievalQA behaviour as an LCEL chain (RetrievalQA itself is deprecated, in langchain-classic).

    chain = build_chain(retriever, llm, tokenizer, max_prompt_tokens=2048)
    chain.invoke({"query": "What was the CET1 ratio?"})
    # -> {"query": ..., "result": "11.4%", "source_documents": [Document, ...]}

retrieve the passages -> fit them into the LLM's chat-templated prompt (lowest-ranked dropped first
when the context window is short; the question is never cut) -> generate. `source_documents` are the
passages the LLM actually saw. `chain.stream(...)` yields the same keys, the answer token by token.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from tunerag.common import TuneragError

logger = logging.getLogger(__name__)

INSTRUCTIONS = (
    "You answer questions about the user's documents. Use only the numbered passages given with the "
    "question, and quote figures exactly as they are written there. If the passages do not contain the "
    "answer, say that you don't know; do not guess."
)


# What a grounded model (rag.raft) is trained to say when the passages hold no answer; any "don't know"
# wording counts as one (is_no_answer).
NO_ANSWER = "I don't know: the passages do not say."
NO_ANSWER_WORDING = re.compile(r"\b(?:don'?t|do not|cannot|can'?t) (?:know|find|answer|say)|\bnot (?:contain|say|mention|"
                               r"provide|state|include|specif)|\bno (?:information|mention|answer)", re.I)


def is_no_answer(text: str) -> bool:
    return bool(NO_ANSWER_WORDING.search(text))


# Measured on the tuning half of the sample questions (SmolLM2-135M, sentences context): asked to copy
# the answering sentence it quotes the right figure for 0.27 of questions, asked for "one short
# sentence" 0.18; one worked example before the question made both worse (0.12).
ANSWER_STYLE = "Answer by copying, word for word, the sentence of the passages that answers the question."


# Where the passages begin and end in a user message (quotes_of reads them back out of the prompt)
PASSAGES_HEADING = "\nPassages:\n"
QUESTION_AGAIN = "\n\nQuestion: "


def user_message(passages: list[Any], question: str) -> str:
    context = "\n\n".join(f"[{i}] {doc.page_content.strip()}" for i, doc in enumerate(passages, 1)) or "(no passages)"
    # The question before and after the passages, and a length hint: a 135M model loses a question
    # asked only once at the top of ~1,000 tokens, and rambles without the hint.
    question = question.strip()
    return f"Question: {question}\n{PASSAGES_HEADING}{context}{QUESTION_AGAIN}{question}\n{ANSWER_STYLE}"


FOLLOWUP_START = ("and ", "what about", "how about", "what of", "also", "then", "same ", "its ", "it ", "they ",
                  "their ", "that ", "those ", "there ", "this ")


def is_followup(question: str) -> bool:
    """A question that leans on the one before: short, or opening like "And ...", "What about ...", "Its ..."."""
    q = question.strip().lower()
    return len(q.split()) <= 6 or q.startswith(FOLLOWUP_START)


def retrieval_query(question: str, history: list[tuple[str, str]]) -> str:
    """What the retriever searches for: a follow-up question joined to the question before it ("And in
    2024?" after "What was the CET1 ratio in 2025?"); any other question as it is."""
    if history and is_followup(question):
        return f"{history[-1][0]} {question}"
    return question


def search_text(inputs: dict) -> str:
    """What a chain's retriever searches for: the inputs' "retrieval_query" (retrieval_query's join of a
    follow-up to the question before it) where the caller set one, else the question."""
    return inputs.get("retrieval_query") or inputs["query"]


def retrieved(retriever, inputs: dict) -> list:
    """The passages for a chain's inputs: the ones the caller retrieved (rag.cli's support check), else the
    retriever's for `search_text`."""
    docs = inputs.get("source_documents")
    return docs if docs is not None else retriever.invoke(search_text(inputs))


def history_messages(history: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def has_system_role(tokenizer) -> bool:
    from jinja2.exceptions import TemplateError

    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return True


def prompt_messages(tokenizer, passages: list[Any], question: str, history: list[tuple[str, str]] = ()) -> list[dict]:
    """The chat turns of the prompt: the instructions as the system turn, or at the top of the first user
    turn for a template without a system role (Mistral-7B-Instruct v0.1 raises on one). rag.raft writes
    its training examples with these very turns."""
    turns = [*history_messages(list(history)), {"role": "user", "content": user_message(passages, question)}]
    if has_system_role(tokenizer):
        return [{"role": "system", "content": INSTRUCTIONS}, *turns]
    turns[0] = {"role": "user", "content": f"{INSTRUCTIONS}\n\n{turns[0]['content']}"}
    return turns


def render_prompt(tokenizer, passages: list[Any], question: str, history: list[tuple[str, str]] = ()) -> str:
    """The prompt text through the LLM's own chat template (the one llm_finetune trained with); a
    tokenizer with no template gets a plain-text prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{default_prefix(tokenizer)}{INSTRUCTIONS}\n\n{user_message(passages, question)}\nAnswer:"
    return tokenizer.apply_chat_template(prompt_messages(tokenizer, passages, question, history), tokenize=False,
                                         add_generation_prompt=True)


def default_prefix(tokenizer) -> str:
    """The BOS text the tokenizer would add itself ("" if none): the local LLM tokenizes prompts without
    special tokens, so a plain-text prompt carries its BOS in the text, as a chat template does."""
    ids = tokenizer("x")["input_ids"]
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token if bos is not None and ids and ids[0] == bos else ""


def count_tokens(tokenizer, text: str) -> int:
    # Exactly what the local LLM feeds the model: it tokenizes with add_special_tokens=False,
    # because the rendered prompt already holds its special tokens (e.g. Mistral's <s>).
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer, passages: list[Any], question: str, max_prompt_tokens: int,
               history: list[tuple[str, str]] = ()) -> tuple[str, list[Any]]:
    """(prompt, the passages in it): as many of the best-ranked passages as fit in `max_prompt_tokens`,
    with the conversation so far before them while there is room for it (passages come first)."""
    for n in range(len(passages), -1, -1):
        for turns in ([list(history), []] if history else [[]]):
            prompt = render_prompt(tokenizer, passages[:n], question, turns)
            size = count_tokens(tokenizer, prompt)
            if size <= max_prompt_tokens:
                break
        if size <= max_prompt_tokens:
            if n < len(passages):
                logger.info("note: %d of %d passages dropped to fit the LLM's context (%d prompt tokens at most)",
                            len(passages) - n, len(passages), max_prompt_tokens)
            return prompt, passages[:n]
    raise TuneragError(f"the question alone needs {size} prompt tokens, more than the {max_prompt_tokens} this LLM "
                       "has room for; ask a shorter question or lower --max-new-tokens")


def build_prompt_step(retriever, tokenizer, max_prompt_tokens: int, select=None):
    """{"query"} -> {"query", "prompt", "source_documents"}: retrieval, the optional `select(question,
    docs) -> docs` (rag.context's evidence-first cut), and prompt fitting. A follow-up is searched for
    with the question before it (`retrieval_query`); passages the caller already retrieved for it come
    in as "source_documents"."""
    from langchain_core.runnables import RunnableLambda

    def fit(inputs: dict) -> dict:
        search = search_text(inputs)
        docs = retrieved(retriever, inputs)
        if select is not None:
            docs = select(search, docs)
        prompt, kept = fit_prompt(tokenizer, docs, inputs["query"], max_prompt_tokens, inputs.get("history") or [])
        return {"query": inputs["query"], "prompt": prompt, "source_documents": kept}

    return RunnableLambda(fit, name="fit_prompt")


def build_chain(retriever, llm, tokenizer, max_prompt_tokens: int = 2048, select=None):
    """The chain described in the module docstring; `retriever` maps a question to Documents and
    `llm` is any LangChain LLM that maps a prompt string to text.

    Every step runs in the calling thread (a RunnableLambda, then a generator), not in the thread pool
    that RunnablePassthrough.assign streams through: torch work in a second thread brings a second
    OpenMP team, which halves decoding speed on a 2-core CPU (see rag.local_llm)."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableGenerator
    from langchain_core.runnables.utils import AddableDict

    write = llm | StrOutputParser()

    def answer(fitted_stream):
        for fitted in fitted_stream:  # one item: the fitted prompt and its passages
            yield AddableDict(query=fitted["query"], source_documents=fitted["source_documents"], result="")
            for text in write.stream(fitted["prompt"]):
                yield AddableDict(result=text)

    return build_prompt_step(retriever, tokenizer, max_prompt_tokens, select) | RunnableGenerator(answer, name="answer")


# ---- the local LLM ----

def context_window(model, tokenizer) -> int:
    sizes = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sizes = [s for s in sizes if isinstance(s, int) and 0 < s < 1_000_000]
    return min(sizes) if sizes else 2048


class StopFlag:
    """Ends an answer at its next token once set: Ctrl-C in the session stops the answer, a client
    that leaves rag.serve stops its answer, and a remote answer's stream ends. The writing loop
    (rag.local_llm.LocalLLM, rag.remote) checks `event` before every token, so a thread other than the
    one writing can stop it. `running` is held by whichever thread writes an answer, for the whole answer."""

    def __init__(self):
        self.event = threading.Event()
        self.running = threading.Lock()

    def ready_for_next(self) -> None:
        """Wait until a stopped answer has ended, then let the next one run: cleared any earlier, the
        flag would let that answer run on beside the next one."""
        if not self.running.acquire(blocking=False):
            logger.info("waiting for the stopped answer to end")
            self.running.acquire()
        try:
            self.event.clear()
        finally:
            self.running.release()


def keep_only(scores, token_ids: list[int]):
    """`scores` with every token but `token_ids` set to -inf, in place (a logits processor's last step)."""
    saved = scores[:, token_ids].clone()
    scores[:, :] = float("-inf")
    scores[:, token_ids] = saved
    return scores


class NumberGuard:
    """A logits processor that lets the LLM write only figures that are in its prompt: while it is
    writing a number, the next digit or separator must keep that number a prefix of a number in the
    passages (or the question), and a number may end only where one of those ends. A 135M model that
    has read "an increase of 6.8%" otherwise writes "8.8%". Other text is left free. It needs a tokenizer
    that writes digits as single tokens (SmolLM2, Llama, Mistral do); for one that does not, it is off."""

    NUMBER_AT_END = re.compile(r"\d+(?:[.,]\d+)*[.,]?$")
    NUMBER = re.compile(r"\d+(?:[.,]\d+)*")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.char_ids = {c: vocab[c] for c in "0123456789.," if c in vocab}
        self.digit_ids = [i for c, i in self.char_ids.items() if c.isdigit()]
        # every other token holding a digit: masked inside a number, so digits come one at a time
        self.multi_digit = [i for tok, i in vocab.items() if len(tok) > 1 and not tok.isalpha() and any(map(str.isdigit, tok))]
        self.enabled = len(self.char_ids) == 12
        self.prompt_len: int | None = None
        self.numbers: set[str] = set()
        self.prefixes: set[str] = set()

    def reset(self) -> None:
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        if not self.enabled or input_ids.shape[0] != 1:
            return scores
        if self.prompt_len is None or input_ids.shape[1] < self.prompt_len:
            self.prompt_len = input_ids.shape[1]
            prompt = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
            self.numbers = set(self.NUMBER.findall(prompt))
            self.prefixes = {n[:i] for n in self.numbers for i in range(1, len(n) + 1)}
        text = self.tokenizer.decode(input_ids[0, self.prompt_len:], skip_special_tokens=True)
        match = self.NUMBER_AT_END.search(text)
        current = match.group() if match and (match.start() == 0 or not text[match.start() - 1].isalnum()) else ""
        if current and current[-1] in ".," and current[:-1] in self.numbers and current not in self.prefixes:
            # "in 2025." / "$5.31," : the number ended and a sentence or clause goes on; a digit here
            # would glue on a figure that is not in the prompt
            scores[:, self.digit_ids + self.multi_digit] = float("-inf")
            return scores
        if not current:  # a number may start only as one of the prompt's; "." and "," end sentences and clauses
            scores[:, [self.char_ids[c] for c in "0123456789" if c not in self.prefixes]] = float("-inf")
            return scores
        allowed = {c for c in "0123456789.," if current + c in self.prefixes}
        if current in self.numbers:
            allowed |= {".", ","}  # the figure is complete: punctuation may follow it
        elif allowed:  # mid-number: it must go on to a real one
            return keep_only(scores, [self.char_ids[c] for c in allowed])
        scores[:, [i for c, i in self.char_ids.items() if c not in allowed] + self.multi_digit] = float("-inf")
        return scores


class QuoteGuard:
    """A logits processor that makes the answer a quote (--answer quote): one sentence or table row of the
    prompt's passages (rag.retrieve.whole_units: a heading or list number joined to the line after it),
    word for word and whole, then its passage's "[n]" or not (quotes_of). The LLM still chooses which,
    greedily, token by token among the quotes that begin with what it has written so far, and the answer
    ends where that quote ends. SmolLM2-135M asked to copy the answering sentence otherwise often repeats
    the question or writes "The answer is:" (tuning halves, mean of three corpora: its own words held the
    expected figure for 0.44 of questions, its quotes for 0.65; README). "I don't know" is not among the
    quotes: offered one, SmolLM2 chose it for 15 of the sample report's 33 tuning questions; rag.cli declines
    before the LLM instead (--unknown-names, --min-support). `begin(prompt)` reads the quotes out of each new
    prompt (rag.local_llm.LocalLLM calls it)."""

    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.quotes: list[list[int]] = []
        self.prompt_len: int | None = None

    def begin(self, prompt: str) -> None:
        self.quotes = [self.tokenizer(quote, add_special_tokens=False)["input_ids"] for quote in quotes_of(prompt)]
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] != 1 or not self.quotes:
            return scores
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        written = input_ids[0, self.prompt_len:].tolist()
        going_on = [q for q in self.quotes if q[:len(written)] == written]
        allowed = {q[len(written)] for q in going_on if len(q) > len(written)}
        if not allowed or any(len(q) == len(written) for q in going_on):
            allowed |= set(self.eos_token_ids)
        return keep_only(scores, sorted(allowed))


PASSAGE_START = re.compile(r"^\[(\d+)\] ", re.M)


def quotes_of(prompt: str) -> list[str]:
    """What --answer quote may answer from `prompt` (user_message's layout): each sentence or table row of
    its passages (rag.retrieve.whole_units: a heading or list number joined to the line after it), alone or
    with its passage's citation ("... 2022. [2]", rag.raft's target); NO_ANSWER alone when the passages hold
    no sentence; none for a prompt without passages. A passage that is one fragment ("PART II.") gives no
    quote: SmolLM2 chose such short lines (their few tokens are likely), and a heading is never an answer."""
    from rag.retrieve import FRAGMENT_WORDS, whole_units

    start, end = prompt.rfind(PASSAGES_HEADING), prompt.rfind(QUESTION_AGAIN)
    if start < 0 or end < start:
        return []
    region = prompt[start + len(PASSAGES_HEADING):end]
    marks = list(PASSAGE_START.finditer(region))
    quotes = []
    for mark, after in zip(marks, marks[1:] + [None]):
        text = region[mark.end():after.start() if after else len(region)]
        for sentence in (" ".join(text[s:e].split()) for s, e in whole_units(text)):
            if len(sentence.split()) >= FRAGMENT_WORDS:
                quotes += [sentence, f"{sentence} [{mark.group(1)}]"]
    return quotes or [NO_ANSWER]


def make_llm(model, tokenizer, *, max_new_tokens: int = 256, temperature: float = 0.0, decode_threads: int = 0,
             grounded_numbers: bool = True, prefill_model=None, lookup_tokens: int = 10, quote: bool = False):
    """(LocalLLM over `model`, its StopFlag). `decode_threads` > 0: torch threads while writing the answer
    (the prompt is read with all of them); 0 keeps torch's count. `grounded_numbers`: the NumberGuard, so
    every figure in an answer is one of the prompt's. `quote`: the QuoteGuard instead, so the answer is one
    of the passages' sentences. `prefill_model`, `lookup_tokens`: see LocalLLM."""
    from rag.local_llm import LocalLLM

    eos_ids = []
    for ids in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id):
        eos_ids += [i for i in (ids if isinstance(ids, list) else [ids]) if i is not None and i not in eos_ids]
    if not eos_ids:
        raise TuneragError("the LLM has no end-of-sequence token (tokenizer, generation config or model config)")
    stop = StopFlag()
    processors = [QuoteGuard(tokenizer, eos_ids)] if quote else [NumberGuard(tokenizer)] if grounded_numbers else []
    llm = LocalLLM(model=model, tokenizer=tokenizer, processors=processors, max_new_tokens=max_new_tokens,
                   temperature=temperature, eos_token_ids=eos_ids, stop=stop, decode_threads=decode_threads,
                   prefill_model=prefill_model, lookup_tokens=lookup_tokens)
    return llm, stop
