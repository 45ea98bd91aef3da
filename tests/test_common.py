"""The dataclass-to-flags mapping every command uses."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from tunerag.common import parse_config


@dataclass
class DemoConfig:
    """python -m demo DOCS... --out pairs/"""

    docs: list[Path] = field(metadata={"help": "files or folders", "positional": True})
    out: Path = field(default=Path("pairs"), metadata={"help": "output folder"})
    drop_pattern: list[str] = field(default_factory=list, metadata={"help": "regex, repeatable"})
    generator: Literal["llm", "ict"] = field(default="llm", metadata={"help": "query generator"})
    questions_per_chunk: int = field(default=2, metadata={"help": "questions per chunk"})
    question: str | None = field(default=None, metadata={"help": "one question", "aliases": ["-q"]})
    reindex: bool = field(default=False, metadata={"help": "rebuild"})

    def __post_init__(self):
        if self.questions_per_chunk < 1:
            raise ValueError(f"--questions-per-chunk must be >= 1, got {self.questions_per_chunk}")


def test_flags_map_to_fields():
    cfg = parse_config(DemoConfig, ["a.txt", "dir", "--drop-pattern", "^Disclaimer", "--drop_pattern", "x",
                                    "--generator", "ict", "-q", "What?", "--reindex", "--questions-per-chunk", "3"])
    assert cfg.docs == [Path("a.txt"), Path("dir")]
    assert cfg.drop_pattern == ["^Disclaimer", "x"]
    assert (cfg.generator, cfg.question, cfg.reindex, cfg.questions_per_chunk) == ("ict", "What?", True, 3)


def test_defaults_come_from_the_dataclass():
    cfg = parse_config(DemoConfig, ["a.txt"])
    assert cfg == DemoConfig(docs=[Path("a.txt")])


def test_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config(DemoConfig, ["a.txt", "--questions-per-chunk", "0"])
    assert exit_.value.code == 2
    assert "--questions-per-chunk must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["a.txt", "--generator", "gpt"])
