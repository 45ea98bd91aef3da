"""Instruction data for QLoRA: rows in, chat messages, then token ids with a response-only loss.

`load_rows` is the only function here that touches disk or the hub; the rest are pure so tests can
pass them literals. Every example is rendered with the tokenizer's OWN chat template (Mistral's
`<s>[INST] ... [/INST]`, SmolLM2's ChatML), the prompt tokens are masked to -100 and the target ends
with EOS, which stays in the labels: the model must learn to stop.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Any

from tunerag.common import TuneragError, first_line

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ALPACA_COLUMNS = ("instruction", "output")


class DataError(TuneragError):
    """A data set that cannot be read or has no usable rows."""


def load_rows(source: str, flag: str = "--data") -> list[dict[str, Any]]:
    """Rows of a local .json/.jsonl/.csv file, or of the train split of a hub data set id; errors name `flag`."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        try:
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            elif suffix == ".json":
                rows = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(rows, dict) and isinstance(rows.get("data"), list):
                    rows = rows["data"]
            elif suffix == ".csv":
                with path.open(newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            else:
                raise DataError(f"{flag} {source!r}: unknown file type {suffix!r}; use .json, .jsonl or .csv")
        except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{flag} {source!r} could not be parsed: {str(e).splitlines()[0]}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{flag} {source!r} must hold a list of objects (one per example)")
    elif path.exists() or suffix in {".json", ".jsonl", ".csv"} or source.startswith((".", "/", "~")):
        raise DataError(f"{flag} {source!r} does not exist (or is not a file)")
    else:
        rows = _load_hub_rows(source, flag)
    if not rows:
        raise DataError(f"{flag} {source!r} has no rows")
    return rows


def _load_hub_rows(name: str, flag: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split="train").to_list()
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no train split: all one line for the user
        raise DataError(f"{flag} {name!r} is not a local file and could not be loaded from the hub ({first_line(e)}); "
                        "pass a local .json/.jsonl/.csv file") from None


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A chat (`messages`) row as is, or an alpaca row as one user turn and one assistant turn."""
    if "messages" in row:
        messages = row["messages"]
        if (not isinstance(messages, list) or len(messages) < 2
                or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError("`messages` must be a list of at least two {role, content} turns")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last of `messages` must be the assistant's answer (the training target)")
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]
    missing = [c for c in ALPACA_COLUMNS if not str(row.get(c) or "").strip()]
    if missing:
        raise ValueError(f"row has no {' or '.join(missing)} (expected instruction/input/output or messages)")
    prompt = str(row["instruction"]).strip()
    if str(row.get("input") or "").strip():
        prompt += "\n\n" + str(row["input"]).strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"]).strip()}]


def build_example(tokenizer, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels for one conversation; only the last assistant turn (plus EOS) is learned.

    The prompt is the conversation without its answer, rendered with `add_generation_prompt=True`;
    its tokens must be a prefix of the full conversation's tokens, or the mask would be misplaced.
    Templates render their own BOS, hence `add_special_tokens=False`. Whatever a template puts after
    the EOS (ChatML's newline) is cut, and an EOS is appended where a template has none.
    Returns None when the example is longer than `max_length`.
    """
    eos = tokenizer.eos_token_id
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently inside the full conversation; "
                         "the response-only loss mask cannot be placed")
    response_ids = full_ids[len(prompt_ids):]
    if eos in response_ids:
        response_ids = response_ids[: len(response_ids) - response_ids[::-1].index(eos)]
    else:
        response_ids = response_ids + [eos]
    if len(response_ids) < 2:
        raise ValueError("the assistant answer is empty")
    input_ids = prompt_ids + response_ids
    if len(input_ids) > max_length:
        return None
    return {"input_ids": input_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def build_examples(tokenizer, rows: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Examples for all rows; bad rows and over-long ones are skipped and counted, never silently."""
    examples, too_long, bad = [], 0, []
    for i, row in enumerate(rows):
        try:
            example = build_example(tokenizer, to_messages(row), max_length)
        except ValueError as e:
            bad.append(f"row {i}: {e}")
            continue
        if example is None:
            too_long += 1
        else:
            examples.append(example)
    if bad:
        logger.warning("skipped %d malformed row(s); first: %s", len(bad), bad[0])
    if too_long:
        logger.warning("dropped %d of %d example(s) longer than --max-length %d tokens", too_long, len(rows), max_length)
    if not examples:
        first = f" (first problem: {bad[0]})" if bad else f" (all longer than --max-length {max_length})" if too_long else ""
        raise DataError(f"no usable training examples in {len(rows)} row(s){first}")
    return examples


def split_train_val(examples: list, val_size: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first `val_size` (a fraction < 1, else a count) held out."""
    if len(examples) < 2:
        raise DataError("need at least 2 examples to hold out a validation split")
    n_val = int(round(val_size * len(examples))) if val_size < 1 else int(val_size)
    n_val = max(1, min(n_val, len(examples) - 1))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def split_rows(rows: list[dict[str, Any]], val_size: float, seed: int) -> tuple[list, list]:
    """(train, val) of one source: its own `split` column where it has one (rag.raft splits by document,
    so no validation passage is trained on), else a seeded draw of `val_size`."""
    if any("split" in r for r in rows):
        train, val = [r for r in rows if r.get("split") != "val"], [r for r in rows if r.get("split") == "val"]
        if train and val:
            return train, val
    return split_train_val(rows, val_size, seed)


def mix_sources(parts: list[list], weights: list[float] | None, seed: int, limit: int | None = None) -> list:
    """The rows of several sources in the shares `weights` (normalised): the largest mix that repeats
    no row, shuffled; all rows of all sources when `weights` is None. At most `limit` rows."""
    rng = random.Random(seed)
    if weights is None:
        mixed = [row for part in parts for row in part]
    else:
        shares = [w / sum(weights) for w in weights]
        size = min(len(part) / share for part, share in zip(parts, shares) if share > 0)
        mixed = [row for part, share in zip(parts, shares) for row in rng.sample(part, min(len(part), round(share * size)))]
    rng.shuffle(mixed)
    return mixed[:limit] if limit is not None else mixed


def ensure_pad_token(tokenizer) -> None:
    """Mistral ships no pad token; padding positions are masked by attention_mask and -100 labels,
    so any id works: UNK where there is one (keeps EOS unambiguous), else EOS."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token


def make_collator(tokenizer):
    """Pads input_ids with the pad token and labels with -100. Labels are never derived from
    `input_ids != pad`: SmolLM2's pad IS its EOS, and that would mask every EOS out of the loss."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
