"""The LCEL chain's logic with langchain-core's fakes and a real tokenizer (the Mistral v0.1 one)."""

from __future__ import annotations

import copy
import json

import pytest

from rag.chain import ANSWER_STYLE, INSTRUCTIONS, build_chain, count_tokens, fit_prompt, render_prompt
from rag.metrics import answer_matches, chunk_answers, recall_at_k
from tunerag.common import TuneragError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PASSAGES = [
    "At December 31, 2025 our CET1 ratio was 11.4%, up from 11.0% a year earlier.",
    "Net income rose 13.0% to $2.117 billion, compared with $1.874 billion in the prior year.",
    "The board of directors has 13 members, 11 of whom are independent.",
    "We sold our equipment leasing subsidiary to Bayline Capital in April 2025 for $415 million.",
]


@pytest.fixture(scope="module")
def mistral_tokenizer(tiny_mistral):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mistral)


@pytest.fixture(scope="module")
def chatml_tokenizer(mistral_tokenizer):
    tokenizer = copy.deepcopy(mistral_tokenizer)
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def retriever():
    from langchain_core.documents import Document
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    docs = [Document(page_content=p, metadata={"source": "report.txt", "chunk": i}) for i, p in enumerate(PASSAGES)]
    store = InMemoryVectorStore.from_documents(docs, DeterministicFakeEmbedding(size=16))
    return store.as_retriever(search_kwargs={"k": 3})


def docs(*texts):
    from langchain_core.documents import Document

    return [Document(page_content=t) for t in texts]


def test_invoke_has_the_retrievalqa_interface(retriever, chatml_tokenizer):
    from langchain_core.language_models import FakeListLLM

    chain = build_chain(retriever, FakeListLLM(responses=["  11.4%\n"]), chatml_tokenizer, max_prompt_tokens=2048)
    out = chain.invoke({"query": "What was the CET1 ratio?"})
    assert set(out) == {"query", "result", "source_documents"}
    assert out["query"] == "What was the CET1 ratio?"
    assert out["result"].strip() == "11.4%"
    assert len(out["source_documents"]) == 3
    assert out["source_documents"] == retriever.invoke("What was the CET1 ratio?")


def test_stream_yields_the_same_keys(retriever, chatml_tokenizer):
    from langchain_core.language_models import FakeStreamingListLLM

    chain = build_chain(retriever, FakeStreamingListLLM(responses=["11.4%"]), chatml_tokenizer)
    chunks = list(chain.stream({"query": "CET1?"}))
    assert "source_documents" in chunks[0]
    assert "".join(c.get("result", "") for c in chunks) == "11.4%"
    assert sum("result" in c for c in chunks) > 1  # token by token, not one block


def test_prompt_uses_system_role_when_the_template_has_one(chatml_tokenizer):
    prompt = render_prompt(chatml_tokenizer, docs(PASSAGES[0]), "What was the CET1 ratio?")
    assert prompt.startswith(f"<|im_start|>system\n{INSTRUCTIONS}<|im_end|>")
    assert "[1] At December 31, 2025 our CET1 ratio was 11.4%" in prompt
    assert prompt.endswith(f"Question: What was the CET1 ratio?\n{ANSWER_STYLE}<|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_mistral_v01_template_gets_the_instructions_in_the_user_turn(mistral_tokenizer):
    prompt = render_prompt(mistral_tokenizer, docs(PASSAGES[0]), "What was the CET1 ratio?")
    assert prompt.startswith(f"<s>[INST] {INSTRUCTIONS}\n\nQuestion: What was the CET1 ratio?\n\nPassages:\n[1] ")
    assert prompt.endswith(f"Question: What was the CET1 ratio?\n{ANSWER_STYLE} [/INST]")
    ids = mistral_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(mistral_tokenizer.bos_token_id) == 1  # the template's <s>, not doubled


def test_fit_drops_the_lowest_ranked_passages_first(mistral_tokenizer):
    ranked = docs(*PASSAGES)
    full = count_tokens(mistral_tokenizer, render_prompt(mistral_tokenizer, ranked, "CET1?"))
    two = count_tokens(mistral_tokenizer, render_prompt(mistral_tokenizer, ranked[:2], "CET1?"))
    prompt, kept = fit_prompt(mistral_tokenizer, ranked, "CET1?", max_prompt_tokens=two)
    assert kept == ranked[:2] and two < full
    assert prompt.count("Question: CET1?") == 2 and PASSAGES[2] not in prompt
    prompt, kept = fit_prompt(mistral_tokenizer, ranked, "CET1?", max_prompt_tokens=full)
    assert kept == ranked


def test_a_question_that_cannot_fit_is_an_error_not_a_cut(mistral_tokenizer):
    question = "What was the CET1 ratio at the end of the year? " * 40
    with pytest.raises(TuneragError, match="the question alone needs"):
        fit_prompt(mistral_tokenizer, docs(*PASSAGES), question, max_prompt_tokens=200)


def test_chunk_answers_accepts_a_passage_cut_at_a_chunk_boundary():
    passage = "At December 31, 2025 our CET1 ratio was 11.4%, up from 11.0% a year earlier."
    assert chunk_answers("Capital.\n" + passage.replace(" ", "\n ", 3), passage, "11.4%")
    assert chunk_answers("Capital. At December 31, 2025 our CET1 ratio was 11.4%, up", passage, "11.4%")
    assert not chunk_answers("Capital. At December 31, 2025 our CET1", passage, "11.4%")  # no answer span
    assert not chunk_answers("The CET1 ratio was 11.4%.", passage, "11.4%")  # answer, but not the passage
    items = [{"passage": passage, "answer": "11.4%"}, {"passage": PASSAGES[2], "answer": "13"}]
    assert recall_at_k([[passage], ["unrelated"]], items) == 0.5


def test_answer_matches_normalises_money_and_percent():
    assert answer_matches("The group has 21400 colleagues.", "21,400")
    assert answer_matches("It was $ 415 million.", "$415 million")
    assert answer_matches("CET1 was 11.4 %", "11.4%")
    assert not answer_matches("CET1 was 11.0%", "11.4%")


# ---- the real pipeline over the tiny random Mistral ----

@pytest.fixture(scope="module")
def tiny_llm(tiny_mistral, mistral_tokenizer):
    from transformers import AutoModelForCausalLM

    from rag.chain import make_llm

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    llm, _ = make_llm(model, mistral_tokenizer, max_new_tokens=2)
    return model, llm


def test_the_model_sees_the_templates_bos_once(tiny_llm, mistral_tokenizer):
    model, llm = tiny_llm
    fed = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"][0].tolist()),
                                           with_kwargs=True)
    prompt = render_prompt(mistral_tokenizer, docs(PASSAGES[0]), "What was the CET1 ratio?")
    assert prompt.startswith("<s>[INST]")  # the Mistral v0.1 template writes its own BOS
    try:
        for run in (llm.invoke, lambda p: "".join(llm.stream(p))):
            fed.clear()
            run(prompt)
            bos = mistral_tokenizer.bos_token_id
            assert fed[0][0] == bos and fed[0][1] != bos and fed[0].count(bos) == 1
            assert len(fed[0]) == count_tokens(mistral_tokenizer, prompt)  # what fit_prompt measured
    finally:
        hook.remove()


def test_a_plain_prompt_carries_the_bos_the_tokenizer_would_add(mistral_tokenizer):
    plain = copy.deepcopy(mistral_tokenizer)
    plain.chat_template = None
    prompt = render_prompt(plain, docs(PASSAGES[0]), "CET1?")
    assert prompt.startswith(f"<s>{INSTRUCTIONS}")
    assert plain(prompt, add_special_tokens=False)["input_ids"].count(plain.bos_token_id) == 1


# ---- follow-up questions ----

def test_a_followup_is_searched_for_with_the_question_before_it():
    from rag.chain import retrieval_query

    history = [("What was the CET1 ratio in 2025?", "11.4%")]
    assert retrieval_query("And in 2024?", history) == "What was the CET1 ratio in 2025? And in 2024?"
    standalone = "What was the loan-to-deposit ratio at the end of 2025?"
    assert retrieval_query(standalone, history) == standalone
    assert retrieval_query("And in 2024?", []) == "And in 2024?"


def test_history_goes_into_the_prompt_while_there_is_room(chatml_tokenizer):
    history = [("What was the CET1 ratio in 2025?", "The CET1 ratio was 11.4% [1].")]
    prompt, kept = fit_prompt(chatml_tokenizer, docs(PASSAGES[0]), "And in 2024?", 4096, history)
    assert "<|im_start|>user\nWhat was the CET1 ratio in 2025?<|im_end|>" in prompt
    assert "<|im_start|>assistant\nThe CET1 ratio was 11.4% [1].<|im_end|>" in prompt and len(kept) == 1
    without = render_prompt(chatml_tokenizer, docs(PASSAGES[0]), "And in 2024?")
    tight = count_tokens(chatml_tokenizer, without)  # room for the passage, not for the history too
    prompt, kept = fit_prompt(chatml_tokenizer, docs(PASSAGES[0]), "And in 2024?", tight, history)
    assert prompt == without and len(kept) == 1


def test_followup_set_answers_are_in_the_report(sample_doc):
    from tunerag.samples import sample_path

    items = json.loads(sample_path("finance_followups.json").read_text())
    text = sample_doc.read_text(encoding="utf-8")
    assert len(items) >= 20
    for it in items:
        assert it["answer"] in it["passage"] and it["passage"] in text and it["split"] in {"tune", "heldout"}


@pytest.mark.parametrize("which", ["smollm2", "mistral"])
def test_the_number_guard_keeps_figures_to_the_prompts_and_punctuation_free(which, smollm2_path, mistral_tokenizer):
    """The guard once masked "." and "," everywhere but inside a number: no answer could end its sentence
    (or put a comma after a figure), so every answer ran on to --max-new-tokens."""
    import torch
    from transformers import AutoTokenizer

    from rag.chain import NumberGuard

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path) if which == "smollm2" else mistral_tokenizer
    guard = NumberGuard(tokenizer)
    assert guard.enabled
    prompt = tokenizer("Passages: Revenue rose 6.8% to $8.64 billion in 2025. Question: revenue?",
                       add_special_tokens=False)["input_ids"]

    def allowed_after(answer: str) -> str:
        guard.reset()
        guard(torch.tensor([prompt]), torch.zeros(1, len(tokenizer)))  # the first call reads the prompt
        scores = guard(torch.tensor([prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]]),
                       torch.zeros(1, len(tokenizer)))
        return "".join(c for c, i in guard.char_ids.items() if scores[0, i] > float("-inf"))

    assert allowed_after("Revenue rose") == "268.,"  # free text: "." and ","; a figure starts as a prompt one
    assert allowed_after("Revenue rose 6") == "."  # only on to 6.8
    assert allowed_after("Revenue rose 8") == "."  # 8.64: a prefix of a prompt figure
    assert allowed_after("Revenue rose 6.8") == ".,"  # 6.8 is complete: punctuation, no digit (no 6.85)
    assert allowed_after("It was 8.64,") == ".,"  # a figure ended by a comma gets no digit glued on
    assert allowed_after("It rose in 2025.") == ".,"


# ---- --answer quote ----

def test_a_quote_is_one_of_the_passages_sentences_whole(mistral_tokenizer):
    from rag.chain import NO_ANSWER, quotes_of

    history = [("What was the CET1 ratio?", "The CET1 ratio was 11.4% [1].")]
    prompt = render_prompt(mistral_tokenizer, docs("PART II. " + PASSAGES[2] + " " + PASSAGES[0], PASSAGES[3],
                                                   "Liquidity risk."), "Who bought it?", history)
    quotes = quotes_of(prompt)
    # the heading goes with the sentence after it; a passage that is a heading alone gives no quote; the
    # history's answer is not a passage's; "I don't know" is not offered
    assert quotes == [f"PART II. {PASSAGES[2]}", f"PART II. {PASSAGES[2]} [1]", PASSAGES[0], f"{PASSAGES[0]} [1]",
                      PASSAGES[3], f"{PASSAGES[3]} [2]"]
    assert quotes_of(render_prompt(mistral_tokenizer, docs("14."), "Who?")) == [NO_ANSWER]  # nothing to quote
    assert quotes_of("<s>[INST] Revenue? [/INST]") == []  # no passages: nothing to hold the answer to


@pytest.mark.parametrize("lookup_tokens", [0, 10])
def test_the_quote_guard_makes_the_answer_a_whole_sentence_of_a_passage(tiny_mistral, mistral_tokenizer,
                                                                         lookup_tokens):
    """The tiny model is random: left alone it writes noise; steered, every answer is a quote, ended where
    the sentence (or its citation) ends."""
    from transformers import AutoModelForCausalLM

    from rag.chain import make_llm, quotes_of

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    free, _ = make_llm(model, mistral_tokenizer, max_new_tokens=60, grounded_numbers=False)
    quoting, _ = make_llm(model, mistral_tokenizer, max_new_tokens=60, quote=True, lookup_tokens=lookup_tokens)
    for question, passages in [("What was the CET1 ratio?", PASSAGES[:2]), ("Who bought the subsidiary?", PASSAGES[2:]),
                               ("Net income?", PASSAGES[1:2])]:
        prompt = render_prompt(mistral_tokenizer, docs(*passages), question)
        assert "".join(free.stream(prompt)).strip() not in quotes_of(prompt)
        assert "".join(quoting.stream(prompt)).strip() in quotes_of(prompt)


def test_the_quote_guard_allows_what_continues_a_quote_and_the_end_where_one_ends(mistral_tokenizer):
    import torch

    from rag.chain import QuoteGuard

    eos = mistral_tokenizer.eos_token_id
    guard = QuoteGuard(mistral_tokenizer, [eos])
    prompt = render_prompt(mistral_tokenizer, docs(PASSAGES[0]), "CET1?")
    guard.begin(prompt)
    prompt_ids = mistral_tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def allowed_after(answer: str) -> set[int]:
        written = mistral_tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
        if not written:
            guard.begin(prompt)
        scores = guard(torch.tensor([prompt_ids + written]), torch.zeros(1, len(mistral_tokenizer)))
        return set((scores[0] > float("-inf")).nonzero()[:, 0].tolist())

    def first_token(text: str) -> int:
        return mistral_tokenizer(text, add_special_tokens=False)["input_ids"][0]

    assert allowed_after("") == {first_token(PASSAGES[0])}
    assert allowed_after(PASSAGES[0]) == {eos, mistral_tokenizer(f"{PASSAGES[0]} [1]", add_special_tokens=False)[
        "input_ids"][len(mistral_tokenizer(PASSAGES[0], add_special_tokens=False)["input_ids"])]}
    assert allowed_after(f"{PASSAGES[0]} [1]") == {eos}
