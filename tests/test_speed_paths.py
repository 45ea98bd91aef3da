"""Both CPU paths, the old (float32, torch's threads throughout) and the fast one (bfloat16 where the CPU
has bfloat16 matrix instructions, one decode thread for a small LLM), give the same answers on tiny
models. No timings here: the speed figures come from scripts/bench_speed.py."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from tunerag import models
from tunerag.common import TuneragError


def test_pick_dtype_follows_the_cpu_and_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: set())
    assert models.pick_dtype("auto") == "float32"  # no AMX/AVX512-BF16: today's path, emulated bf16 is slower
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: {"amx_bf16"})
    assert models.pick_dtype("auto") == "bfloat16"
    assert models.pick_dtype("float32") == "float32" and models.pick_dtype("bfloat16") == "bfloat16"
    with pytest.raises(TuneragError, match="--dtype 'float16' is not one of"):
        models.pick_dtype("float16")
    # the LLM: float32 writes, a bfloat16 copy reads the prompt, where bfloat16 is fast
    assert models.llm_dtypes("auto") == ("float32", "bfloat16")
    assert models.llm_dtypes("bfloat16") == ("bfloat16", None) and models.llm_dtypes("float32") == ("float32", None)
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: set())
    assert models.llm_dtypes("auto") == ("float32", None)


def test_cpu_flags_are_read():
    assert models.cpu_bf16_flags() <= {"amx_bf16", "avx512_bf16"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedder_dtype_paths_agree(tiny_bert, dtype):
    from rag import index

    reference = models.load_embedder(str(tiny_bert))
    model = models.load_embedder(str(tiny_bert), dtype=dtype)
    assert model[0].auto_model.dtype == getattr(torch, dtype)
    texts = ["Net interest income rose 8.8% to $2.94 billion.", "The CET1 ratio was 11.4% at year end."]
    a = reference.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    b = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True).float()
    assert (a * b).sum(1).min() > 0.99

    from rag.embedder import load_embeddings

    embeddings, _ = load_embeddings(str(tiny_bert), dtype=dtype)
    assert embeddings.dtype == getattr(torch, dtype)
    assert len(embeddings.embed_query("revenue growth")) == 16


def greedy(llm, prompt: str) -> str:
    return "".join(llm.stream(prompt))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_local_llm_writes_what_generate_writes(tiny_mistral, dtype):
    from transformers import LogitsProcessorList

    from rag.chain import NumberGuard, make_llm

    model, tokenizer = models.load_llm(str(tiny_mistral), dtype=dtype)
    llm, _ = make_llm(model, tokenizer, max_new_tokens=16)
    for prompt in ("<s>[INST] What was the CET1 ratio in 2025? [/INST]", "<s>[INST] Revenue rose 6.8% to $8.64 billion. [/INST]"):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  logits_processor=LogitsProcessorList([NumberGuard(tokenizer)]),
                                  pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        expected = expected[expected != tokenizer.eos_token_id]
        assert greedy(llm, prompt) == tokenizer.decode(expected, skip_special_tokens=True)


def test_lookup_guesses_are_what_followed_the_last_two_tokens_before():
    from rag.local_llm import lookup_guesses

    ids = torch.tensor([5, 6, 7, 8, 9, 1, 5, 6])
    assert lookup_guesses(ids, 3, 10).tolist() == [7, 8, 9]  # "5 6" came before: what followed it
    assert lookup_guesses(ids, 3, 2).tolist() == [7, 8]  # no more than the answer may still write
    assert lookup_guesses(torch.tensor([1, 2, 1, 2, 3, 4, 1, 2]), 2, 10).tolist() == [3, 4]  # the latest place
    assert lookup_guesses(torch.tensor([4, 7, 3, 7]), 5, 10).tolist() == [3, 7]  # one token when two never repeat
    assert lookup_guesses(torch.tensor([1, 2, 3]), 5, 10).tolist() == []
    assert lookup_guesses(ids, 0, 10).tolist() == [] and lookup_guesses(torch.tensor([3]), 4, 10).tolist() == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prompt_lookup_writes_the_same_answer_in_fewer_passes(tiny_mistral, dtype):
    """The guesses checked in one pass change nothing in the answer, NumberGuard included; on a prompt the
    answer repeats (the tiny random model loops), passes take several tokens and there are fewer of them."""
    from rag.chain import make_llm

    model, tokenizer = models.load_llm(str(tiny_mistral), dtype=dtype)
    one_at_a_time, _ = make_llm(model, tokenizer, max_new_tokens=40, lookup_tokens=0)
    looked_up, _ = make_llm(model, tokenizer, max_new_tokens=40, lookup_tokens=10)
    prompts = ["<s>[INST] What was the CET1 ratio in 2025? [/INST]",
               "<s>[INST] Revenue rose 6.8% to $8.64 billion in 2025; revenue rose 6.8% in 2025. [/INST]"]
    passes = {}
    for name, llm in (("one", one_at_a_time), ("lookup", looked_up)):
        answers, calls = [], []  # calls: the tokens of each pass over the answer (the prompt's pass left out)
        for prompt in prompts:
            sizes = []
            hook = model.register_forward_pre_hook(lambda mod, args, kwargs: sizes.append(kwargs["input_ids"].shape[1]),
                                                   with_kwargs=True)
            try:
                answers.append(list(map(int, llm.token_ids(prompt))))
            finally:
                hook.remove()
            calls += sizes[1:]
        passes[name] = (answers, calls)
    assert passes["lookup"][0] == passes["one"][0]
    assert all(len(answer) > 20 for answer in passes["one"][0])
    assert max(passes["one"][1]) == 1 and max(passes["lookup"][1]) > 1
    assert len(passes["lookup"][1]) < len(passes["one"][1])


def test_a_set_stop_flag_ends_the_answer_at_the_next_token(tiny_mistral):
    """What Ctrl-C in a session and a web client that leaves do (from another thread in rag.serve)."""
    from rag.chain import make_llm

    model, tokenizer = models.load_llm(str(tiny_mistral), dtype="float32")
    llm, stop = make_llm(model, tokenizer, max_new_tokens=12, grounded_numbers=False)
    prompt = "<s>[INST] What was the CET1 ratio? [/INST]"
    whole = list(llm.token_ids(prompt))
    assert len(whole) >= 3  # the tiny random model writes on to max_new_tokens (or nearly)
    written = []
    for token in llm.token_ids(prompt):
        written.append(token)
        stop.event.set()
    assert len(written) == 1 and torch.equal(written[0], whole[0])
    stop.ready_for_next()  # the next answer runs whole again
    assert len(list(llm.token_ids(prompt))) == len(whole)


def test_a_bfloat16_reader_hands_its_cache_to_the_float32_writer(tiny_mistral):
    from rag.chain import make_llm

    model, tokenizer = models.load_llm(str(tiny_mistral), dtype="float32")
    reader = models.prefill_copy(model, "bfloat16")
    assert reader.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert models.prefill_copy(model, None) is None
    llm, _ = make_llm(model, tokenizer, max_new_tokens=8, prefill_model=reader, lookup_tokens=0)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, name=name: calls.append((name, kwargs["input_ids"].shape[1])),
                                         with_kwargs=True) for name, m in (("reader", reader), ("writer", model))]
    try:
        text = llm.invoke("<s>[INST] What was the CET1 ratio in 2025? [/INST]")
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0][0] == "reader" and calls[0][1] > 1  # the prompt, read once by the copy
    assert all(name == "writer" and n == 1 for name, n in calls[1:])  # then one token at a time
    assert isinstance(text, str)
    # with prompt lookup (the default) the writer checks guesses from the handed-over cache: the same answer
    looked_up, _ = make_llm(model, tokenizer, max_new_tokens=8, prefill_model=reader)
    assert looked_up.invoke("<s>[INST] What was the CET1 ratio in 2025? [/INST]") == text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_threads_give_the_same_greedy_answer_and_restore_threads(tiny_mistral, dtype, monkeypatch):
    from rag.chain import make_llm

    model, tokenizer = models.load_llm(str(tiny_mistral), dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    threads = torch.get_num_threads()
    old, _ = make_llm(model, tokenizer, max_new_tokens=12)
    new, _ = make_llm(model, tokenizer, max_new_tokens=12, decode_threads=1)
    calls = []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_num_threads(n))[1])
    prompt = "<s>[INST] What was the CET1 ratio? [/INST]"
    expected = greedy(old, prompt)
    assert 1 not in calls or threads == 1
    assert greedy(new, prompt) == expected
    assert new.invoke(prompt) == old.invoke(prompt)
    assert threads == 1 or 1 in calls  # the switch happened, after the prompt was read
    assert calls[-1] == threads and torch.get_num_threads() == threads  # and was undone


def test_rag_cli_runs_both_paths(tmp_path, sample_doc, tiny_mistral):
    from rag.cli import main
    from rag.config import RagConfig

    answers = {}
    for dtype, threads in (("float32", 0), ("auto", 1)):
        out = main(RagConfig(file=[sample_doc], question="What was total revenue in 2025?", llm=str(tiny_mistral),
                             persist_dir=tmp_path / "db", max_new_tokens=6, dtype=dtype, decode_threads=threads,
                             json=True))
        answers[dtype] = out
    assert answers["auto"]["source_documents"] and answers["float32"]["source_documents"]
    if models.pick_dtype("auto") == "float32":  # no bfloat16 hardware: the same path exactly
        assert answers["auto"]["result"] == answers["float32"]["result"]


def test_bench_speed_help():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_speed.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--parts" in run.stdout and "--new-dtype" in run.stdout
