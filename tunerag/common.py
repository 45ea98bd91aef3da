"""Pieces every tunerag command shares: the user-facing error type, the cache folder, output folders
replaced whole (`temp_folder` + `replace_folder`), and the dataclass-to-argparse mapping behind each
`python -m ...` command.

Each command has one config dataclass; its fields are the command's flags (`max_new_tokens` is
`--max-new-tokens`, `--max_new_tokens` works too). Field metadata carries `help`, and optionally
`positional=True`, `aliases=["-q"]` and `choices`. A `list[...]` field is a repeatable flag.

Why not `transformers.HfArgumentParser`: it has no positional arguments (`embeddings.prepare DOCS...`),
turns a list field into one `nargs="+"` flag (so `--file a --file b` keeps only `b`), and a bool
into `--flag [BOOL]` plus `--no_flag`; each would change a documented command line.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

C = TypeVar("C")
logger = logging.getLogger(__name__)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path`, flushed to disk, and rename it in, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    """write_text_atomic of JSON (paths and other objects as strings)."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1, default=str))


# --- folders replaced whole -------------------------------------------------------------------
# Every command that writes a folder (a merged model, a tuned embedder, a pairs set, the converted
# SmolLM2) builds it in a temp folder beside the target, `.NAME.tmp-PID@HOST.RANDOM`, and swaps it in
# with `replace_folder`. The PID and host in the name let a later run tell a dead run's leftovers
# (a killed merge leaves a whole model) from a live run's work, on this machine or another one
# sharing the disk.


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _owner_tag() -> str:
    return f"{os.getpid()}@{_host()}."


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):  # errors ignored: another new run may be removing it too
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` folders beside `target` left by killed runs on this host."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)@([A-Za-z0-9-]*)\.")
    if not target.parent.is_dir():
        return []
    removed, size = [], 0
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if not m or m[2] != _host() or _pid_alive(int(m[1])) or not p.is_dir() or p.is_symlink():
            continue
        size += _folder_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        logger.info("note: removed %d folder(s) left beside %s by killed runs (%s; %.0f MB)", len(removed), target,
                    ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else ""), size / 1e6)
    return removed


def temp_folder(target: Path) -> Path:
    """A new empty folder beside `target` to build its replacement in (stale ones are removed first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}", dir=target.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, or another libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`, replacing any folder there; at every instant `target`
    is either the old or the new complete folder (on Linux; elsewhere the gap is between two renames).

    `new` must be on the same filesystem as `target` (build it with `temp_folder(target)`). The old
    folder is moved to `.NAME.old-PID@HOST.*` and deleted; a kill during that delete leaves it for
    `remove_stale_temps`.
    """
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        try:
            os.rename(new, target)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.exists():
                raise  # else another process put a folder there meanwhile: replace it below
    old_holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{_owner_tag()}", dir=target.parent))
    old = old_holder / target.name
    if _exchange(new, target):
        os.rename(new, old)
    else:
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)  # put the previous folder back
            raise
    shutil.rmtree(old_holder, ignore_errors=True)


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


def stable_rng(seed: int, *parts: str) -> random.Random:
    """A Random seeded by `seed` and text, so a chunk's draw does not depend on the chunks before it."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))
