"""The sample data shipped inside the package (tunerag/data), found wherever tunerag is installed.

    finance_report.txt   the 2025 annual report of the fictional Northwind Harbor Financial Group
    finance_qa.json      66 questions about it with exact answers and passages
    finance_alpaca.json  578 finance instructions in the alpaca layout
    long/                three annual reports, a rating methodology and a bond prospectus, with questions
    policy/              four bank policies (credit, AML/KYC, model risk, liquidity), with questions
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path


def sample_path(name: str = "") -> Path:
    """Path of a shipped sample file or folder, e.g. sample_path("finance_report.txt")."""
    return Path(str(files("tunerag").joinpath("data", *filter(None, name.split("/")))))


SAMPLE_REPORT = sample_path("finance_report.txt")
SAMPLE_QA = sample_path("finance_qa.json")
SAMPLE_INSTRUCTIONS = sample_path("finance_alpaca.json")
# The question sets of each shipped corpus; every question has a "split": "tune" (to choose defaults)
# or "heldout" (to report), and answers with a verbatim `passage` of its document.
CORPORA = {
    "sample": (["finance_report.txt"], ["finance_qa.json"]),
    "long": (["long"], ["long/annual_reports_qa.json", "long/methodology_prospectus_qa.json"]),
    "policy": (["policy"], ["policy/policy_qa.json"]),
}


def corpus_files(corpus: str) -> list[Path]:
    return [sample_path(name) for name in CORPORA[corpus][0]]


def corpus_questions(corpus: str, split: str = "all") -> list[dict]:
    """The questions of a shipped corpus, optionally one half: "tune", "heldout" or "all"."""
    import json

    items = [item for name in CORPORA[corpus][1] for item in json.loads(sample_path(name).read_text(encoding="utf-8"))]
    return [item for item in items if split == "all" or item.get("split") == split]


@dataclass
class SamplesConfig:
    """tunerag samples [NAME...]: print the paths of the shipped sample files (all when no NAME),
    e.g. tunerag ask --file "$(tunerag samples finance_report.txt)" -q "..." """

    names: list[str] = field(default_factory=list, metadata={
        "positional": True, "metavar": "NAME", "help": "File names under the sample folder, e.g. finance_report.txt."})


def main(cfg: SamplesConfig) -> list[Path]:
    from tunerag.common import TuneragError

    root = sample_path()
    shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix in {".txt", ".json"})
    paths = []
    for name in cfg.names or shipped:
        if name not in shipped:
            raise TuneragError(f"no sample named {name!r}; the shipped samples are: {', '.join(shipped)}")
        paths.append(root / name)
    print("\n".join(map(str, paths)))
    return paths
