"""The local transformers LLM behind rag.chain.make_llm (imported when an LLM is made: it loads torch)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TextStreamer, TopKLogitsWarper


def lookup_guesses(ids: torch.Tensor, n: int, limit: int) -> torch.Tensor:
    """Up to `n` guessed next tokens (at most `limit`): what followed the last place before the end where the
    text's last two tokens (else its last one) appeared, in the prompt or the answer so far; none if nowhere."""
    n = min(n, limit)
    for size in (2, 1):
        if n <= 0 or len(ids) <= size:
            break
        windows = ids[:-1].unfold(0, size, 1)  # every earlier run of `size` tokens (not the last one itself)
        starts = (windows == ids[-size:]).all(dim=1).nonzero()[:, 0]
        if len(starts):
            begin = int(starts[-1]) + size
            return ids[begin: begin + n]
    return ids[:0]


class TextPieces(TextStreamer):
    """transformers' streamer (it cuts the text where a word is whole), writing into a list."""

    def __init__(self, tokenizer, pieces: list[str]):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.pieces = pieces

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.pieces.append(text)


class LocalLLM(LLM):
    """The local transformers model as a LangChain LLM: greedy (or sampled) decoding over a KV cache, in
    the calling thread, `stream` yielding the text as it is written.

    Why not HuggingFacePipeline: its `stream` runs `generate` in a new thread for every answer, and a
    second thread calling torch brings a second OpenMP thread team; with more OpenMP threads than cores
    (2 here) libgomp stops spinning between operators, so each of the ~900 operators of a decode step
    waits for sleeping workers to wake. Measured on SmolLM2-135M, 48-token answers on the 2-core CPU:
    10.7 tokens/s through HuggingFacePipeline.stream, 21.9 with this loop, the same tokens
    (scripts/bench_speed.py). The loop is transformers' greedy search (float32 scores, argmax, the
    logits processors, end of sequence) with nothing else; sampling adds temperature and top-k 50, as
    `generate(do_sample=True)` does with its default generation config. A checkpoint's own generation
    settings (repetition_penalty, top_p, suppress_tokens, ...) are not applied: rag asks for greedy,
    grounded answers, and SmolLM2 and Mistral-Instruct set none of them.

    `prefill_model`: a bfloat16 copy that reads the prompt (3x faster than float32 with AMX), whose
    cache the float32 `model` then writes from (a bfloat16 matrix-vector product is slower than a
    float32 one here); None reads the prompt with `model`.

    `lookup_tokens` (greedy only): prompt lookup decoding, as `generate(prompt_lookup_num_tokens=...)` does it.
    After each token, up to that many tokens that followed the answer's last two tokens earlier in the text
    (a RAG answer quotes its passages) go into the next forward pass with it; the answer keeps the guesses
    greedy decoding picks itself and drops the rest from the cache. One pass over 11 tokens costs about
    what one over a single token does on a CPU (decoding reads every weight either way): SmolLM2 on 20
    long-corpus RAG prompts, 21.9 -> 42.3 tokens/s, every answer token for token the same (README)."""

    model: Any
    tokenizer: Any
    processors: list = []
    max_new_tokens: int = 256
    temperature: float = 0.0
    eos_token_ids: list[int]  # any of them ends the answer (the tokenizer's and the generation config's)
    stop: Any = None  # the StopFlag: held while an answer is written
    decode_threads: int = 0
    prefill_model: Any = None
    lookup_tokens: int = 10

    @property
    def _llm_type(self) -> str:
        return "tunerag-local"

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager=None, **kwargs: Any):
        if stop:
            raise ValueError("stop sequences are not supported by the local LLM")
        pieces: list[str] = []
        streamer = TextPieces(self.tokenizer, pieces)
        with self.stop.running if self.stop is not None else nullcontext():
            for processor in self.processors:  # a new answer: per-prompt state starts again
                getattr(processor, "reset", lambda: None)()
                getattr(processor, "begin", lambda prompt: None)(prompt)  # rag.chain.QuoteGuard reads the prompt
            for token in self.token_ids(prompt):
                streamer.put(token)
                yield from self.chunks(pieces, run_manager)
            streamer.end()
            yield from self.chunks(pieces, run_manager)

    @staticmethod
    def chunks(pieces: list[str], run_manager):
        while pieces:
            chunk = GenerationChunk(text=pieces.pop(0))
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def token_ids(self, prompt: str):
        """The answer's token ids (tensors of one id), one at a time, end of sequence not included."""
        processors = LogitsProcessorList(self.processors)
        if self.temperature > 0:
            processors += [TemperatureLogitsWarper(self.temperature), TopKLogitsWarper(50)]
        device = self.model.device
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        threads = torch.get_num_threads()
        try:
            # inference mode per step, not around the yields: the caller's code between tokens runs as usual
            with torch.inference_mode():
                reader = self.prefill_model or self.model
                cache = DynamicCache(config=self.model.config)
                # the last position as an index tensor, not `logits_to_keep=1`: that slice of the hidden states is
                # not contiguous, so torch's matmul copies the whole lm_head weight (70 ms in bfloat16) to multiply it
                last = torch.tensor([ids.shape[1] - 1], device=device)
                out = reader(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=last)
                if reader is not self.model:
                    for layer in cache.layers:  # the float32 model writes on from the bfloat16 reading
                        layer.keys, layer.values = layer.keys.to(self.model.dtype), layer.values.to(self.model.dtype)
            if self.decode_threads > 0:
                torch.set_num_threads(self.decode_threads)
            lookup = self.lookup_tokens if self.temperature == 0 else 0
            scores_rows = out.logits[:, -1:, :]  # a row of logits per position whose next token is to be chosen
            guesses = ids[0, :0]
            written = 0
            while True:
                for row in range(scores_rows.shape[1]):
                    if self.stop is not None and self.stop.event.is_set():
                        return  # Ctrl-C, a client that left: the answer ends here
                    with torch.inference_mode():
                        scores = processors(ids, scores_rows[:, row, :].to(dtype=torch.float32))
                        if self.temperature > 0:
                            token = torch.multinomial(scores.softmax(-1), num_samples=1)[:, 0]
                        else:
                            token = scores.argmax(-1)
                        ids = torch.cat([ids, token[:, None]], dim=1)
                    if token.item() in self.eos_token_ids:
                        return
                    yield token
                    written += 1
                    if written == self.max_new_tokens:
                        return
                    if row == len(guesses) or token.item() != guesses[row].item():
                        break  # the next row's logits followed a guess that was not the answer's token
                with torch.inference_mode():
                    # the cache holds every token the model was given: drop the guesses the answer did not keep
                    cache.crop(ids.shape[1] - 1 - cache.get_seq_length())
                    guesses = lookup_guesses(ids[0], lookup, self.max_new_tokens - written - 1)
                    out = self.model(input_ids=torch.cat([ids[:, -1], guesses])[None], cache=cache, use_cache=True)
                    scores_rows = out.logits
        finally:
            torch.set_num_threads(threads)
