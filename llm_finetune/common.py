"""Pieces every tunerag command shares: the user-facing error type, the cache folder, and the
dataclass-to-argparse mapping behind each `python -m ...` command.

Each command has one config dataclass; its fields are the command's flags (`max_new_tokens` is
`--max-new-tokens`, `--max_new_tokens` works too). Field metadata carries `help`, and optionally
`positional=True`, `aliases=["-q"]` and `choices`. A `list[...]` field is a repeatable flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

C = TypeVar("C")


class TuneragError(Exception):
    """A failure the user can fix; commands print its one-line message, never a traceback."""


def first_line(e: BaseException) -> str:
    """An exception as one short line for a user-facing message (its type when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


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
    """An argparse parser whose flags are the fields of `config_cls` (defaults live only there)."""
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
        origin = typing.get_origin(tp)
        if origin is list:
            item = _unwrap_optional(typing.get_args(tp)[0])
            kwargs["type"] = item
            if meta.get("positional"):
                kwargs["nargs"] = "*" if has_default else "+"
            else:
                kwargs["action"] = "append"
            default = None  # filled from the dataclass default below
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
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        names += meta.get("aliases", [])
        if not has_default:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(*names, dest=f.name, **kwargs)
    return parser


def parse_config(config_cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Parse `argv` into `config_cls`; a bad value (from `__post_init__`) is a usage error, exit 2."""
    parser = build_parser(config_cls, prog)
    ns = vars(parser.parse_args(argv))
    for f in dataclasses.fields(config_cls):  # unset repeatable flags keep the dataclass default
        if f.name in ns and ns[f.name] is None and f.default_factory is not dataclasses.MISSING:
            ns[f.name] = f.default_factory()
    try:
        return config_cls(**ns)
    except (ValueError, TuneragError) as e:
        parser.error(str(e))


def run_cli(main: Callable[[C], Any], config_cls: type[C], argv: list[str] | None = None) -> Any:
    """The `__main__` of every command: parse flags, run, and turn known failures into one line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
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
