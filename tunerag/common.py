"""Pieces every tunerag command shares: the user-facing error type, the cache folder, and the
dataclass-to-argparse mapping behind each `python -m ...` command.

Each command has one config dataclass; its fields are the command's flags (`max_new_tokens` is
`--max-new-tokens`, `--max_new_tokens` works too). Field metadata carries `help`, and optionally
`positional=True`, `aliases=["-q"]` and `choices`. A `list[...]` field is a repeatable flag.

Why not `transformers.HfArgumentParser`: it has no positional arguments (`embeddings.prepare DOCS...`),
turns a list field into one `nargs="+"` flag (so `--file a --file b` keeps only `b`), and a bool
into `--flag [BOOL]` plus `--no_flag`; each would change a documented command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

C = TypeVar("C")


def _not_actionable(record: logging.LogRecord) -> bool:
    # bitsandbytes on an AVX512-BF16 CPU tries `kernels.get_kernel("kernels-community/...")`, a hub
    # download of a compiled kernel, at every 4-bit load; `kernels` is not installed, so nothing is
    # fetched and its own CPU kernel runs: the warning asks the user for something we do not want.
    return "from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_actionable)


class TuneragError(Exception):
    """A failure the user can fix; commands print its one-line message, never a traceback."""


def first_line(e: BaseException) -> str:
    """An exception as one short line for a user-facing message (its type when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON (paths and other objects as strings) to a temp file beside `path` and rename it in, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tunerag_home() -> Path:
    """Cache for converted models and generated data: $TUNERAG_HOME, default ~/.cache/tunerag."""
    return Path(os.environ.get("TUNERAG_HOME") or "~/.cache/tunerag").expanduser()


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser(config_cls: type, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose flags are the fields of `config_cls` (defaults live only there).

    Each flag is listed once in --help, in its `--kebab-case` spelling; `--snake_case` is accepted
    too (see `parse_config`), and a bool flag that defaults to False also takes `--no-FLAG`.
    """
    doc = (config_cls.__doc__ or "").strip()
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        tp = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        flag = f"--{f.name.replace('_', '-')}"
        origin = typing.get_origin(tp)
        if origin is list:
            item = _unwrap_optional(typing.get_args(tp)[0])
            kwargs["type"] = item
            if meta.get("positional"):
                kwargs["nargs"] = "*" if has_default else "+"
            else:
                kwargs["action"] = "append"
            default = None  # filled from the dataclass default in parse_config
        elif tp is bool and default is False:
            kwargs["action"] = "store_true"
            parser.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(typing.get_args(tp)[0])
        else:
            kwargs["type"] = tp
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            parser.add_argument(f.name, metavar=meta.get("metavar", f.name.upper()), **kwargs)
            continue
        if not has_default:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, *meta.get("aliases", []), dest=f.name, **kwargs)
    return parser


def kebab_flags(argv: list[str], config_cls: type) -> list[str]:
    """`--max_new_tokens 8` -> `--max-new-tokens 8` for the fields of `config_cls` (both spellings work)."""
    names = {f"--{f.name}" for f in dataclasses.fields(config_cls) if "_" in f.name}
    names |= {f"--no-{n[2:]}" for n in names} | {f"--no_{n[2:]}" for n in names}
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        flag, eq, value = arg.partition("=")
        out.append(f"--{flag[2:].replace('_', '-')}{eq}{value}" if flag in names else arg)
    return out


def parse_config(config_cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Parse `argv` into `config_cls`; a bad value (from `__post_init__`) is a usage error, exit 2."""
    parser = build_parser(config_cls, prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = vars(parser.parse_args(kebab_flags(argv, config_cls)))
    for f in dataclasses.fields(config_cls):  # unset repeatable flags keep the dataclass default
        if f.name in ns and ns[f.name] is None and f.default_factory is not dataclasses.MISSING:
            ns[f.name] = f.default_factory()
    try:
        return config_cls(**ns)
    except (ValueError, TuneragError) as e:
        parser.error(str(e))


def run_cli(main: Callable[[C], Any], config_cls: type[C], argv: list[str] | None = None,
            prog: str | None = None) -> Any:
    """The `__main__` of every command: parse flags, run, and turn known failures into one line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if prog is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        prog = f"python -m {spec.name}" if spec else None
    cfg = parse_config(config_cls, argv, prog=prog)
    try:
        return main(cfg)
    except TuneragError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a path that cannot be written or read: say which, without a traceback
        if os.environ.get("TUNERAG_DEBUG"):
            raise
        where = f" {str(e.filename)!r}" if e.filename else ""
        print(f"error: {e.strerror or e}{where} (set TUNERAG_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
