"""Abbreviations in questions, spelled out for retrieval: "Halvorsen Ridge ROA for 2023?" is searched
for as "Halvorsen Ridge ROA for 2023? (ROA: return on assets)".

Analysts write ROA, NSFR, HQLA; filings often spell them out ("Return on average assets was 0.86%"), and
neither BM25 nor a small bi-encoder links the two. The long forms come from the documents themselves
("the net stable funding ratio (NSFR)", found when the BM25 index is built) and, for the common ones a
filing may never define, from FINANCE: a list of standard finance and banking abbreviations written
from general usage, not from any question set. Pure functions.
"""

from __future__ import annotations

import re
from typing import Callable

FINANCE = {
    "ABS": "asset-backed securities", "ACL": "allowance for credit losses", "AFS": "available-for-sale securities",
    "ALCO": "asset-liability committee", "ALLL": "allowance for loan and lease losses", "AML": "anti-money laundering",
    "AOCI": "accumulated other comprehensive income", "AUM": "assets under management", "BVPS": "book value per share",
    "CCAR": "comprehensive capital analysis and review", "CDD": "customer due diligence",
    "CECL": "current expected credit losses", "CET1": "common equity tier 1", "CLO": "collateralized loan obligations",
    "COGS": "cost of goods sold", "CRE": "commercial real estate", "DPS": "dividends per share",
    "DSCR": "debt service coverage ratio", "DTA": "deferred tax assets", "EAD": "exposure at default",
    "EBIT": "earnings before interest and taxes",
    "EBITDA": "earnings before interest, taxes, depreciation and amortization", "ECL": "expected credit losses",
    "EDD": "enhanced due diligence", "EPS": "earnings per share", "EVE": "economic value of equity",
    "FCF": "free cash flow", "FX": "foreign exchange", "GAAP": "generally accepted accounting principles",
    "HQLA": "high-quality liquid assets", "HTM": "held-to-maturity securities",
    "IRRBB": "interest rate risk in the banking book", "KYC": "know your customer", "LCR": "liquidity coverage ratio",
    "LGD": "loss given default", "LTV": "loan-to-value", "MBS": "mortgage-backed securities",
    "MSR": "mortgage servicing rights", "NAV": "net asset value", "NCO": "net charge-offs",
    "NII": "net interest income", "NIM": "net interest margin", "NPA": "nonperforming assets",
    "NPL": "nonperforming loans", "NSFR": "net stable funding ratio", "OCI": "other comprehensive income",
    "PD": "probability of default", "PEP": "politically exposed person", "PPNR": "pre-provision net revenue",
    "ROA": "return on assets", "ROE": "return on equity", "ROTCE": "return on tangible common equity",
    "ROTE": "return on tangible equity", "RWA": "risk-weighted assets", "SAR": "suspicious activity report",
    "SCB": "stress capital buffer", "SG&A": "selling, general and administrative expenses",
    "SLR": "supplementary leverage ratio", "TBV": "tangible book value", "TBVPS": "tangible book value per share",
    "TLAC": "total loss-absorbing capacity", "VaR": "value at risk", "YoY": "year over year",
    "bps": "basis points", "bp": "basis points", "Q1": "first quarter", "Q2": "second quarter",
    "Q3": "third quarter", "Q4": "fourth quarter",
}

ABBREVIATION = r"[A-Z][A-Za-z0-9&]*[A-Z0-9]"
DEFINED = re.compile(r"\((" + ABBREVIATION + r")s?\)")  # "(NSFR)", "(NPLs)": the long form is the words before
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9']*")  # hyphens split words: "charge-offs" is two
QUERY_WORD = re.compile(r"[A-Za-z][A-Za-z0-9&]*")
MAX_LONG_WORDS = 8


def initials_match(words: list[str], abbreviation: str) -> bool:
    """Whether `words` spell `abbreviation` by their first characters: the first and the last word must
    give its first and last character, words in between may be skipped ("return on average assets" ->
    ROA, "common equity tier 1" -> CET1, "net stable funding ratio" -> NSFR)."""
    initials = [c.lower() for c in abbreviation if c.isalnum()]
    firsts = [w[0].lower() for w in words]
    if not firsts or firsts[0] != initials[0] or firsts[-1] != initials[-1]:
        return False
    i = len(initials) - 1
    for first in reversed(firsts):
        if i >= 0 and first == initials[i]:
            i -= 1
    return i < 0


def defined_in(texts: list[str]) -> dict[str, str]:
    """{abbreviation: long form} for every "long form (ABBR)" in `texts` whose words' first characters
    spell ABBR (the shortest such run of the words just before it). The first definition found wins."""
    found: dict[str, str] = {}
    for text in texts:
        for match in DEFINED.finditer(text):
            abbreviation = match.group(1)
            if abbreviation in found:
                continue
            words = WORD.findall(text[max(0, match.start() - 200):match.start()])[-MAX_LONG_WORDS:]
            size = len([c for c in abbreviation if c.isalnum()])
            for n in range(size, len(words) + 1):
                if initials_match(words[-n:], abbreviation):
                    found[abbreviation] = " ".join(words[-n:]).lower()
                    break
    return found


def written_apart(texts: list[str], abbreviations: dict[str, str]) -> list[str]:
    """The `abbreviations` that `texts` also write outside a "(ABBR)" definition ("the NSFR was 116%").
    One written only where it is defined (a glossary's "Net stable funding ratio (NSFR): ...") is searched
    for by its long form too, or BM25 ranks the glossary above the sentence that gives the figure."""
    words = {word for text in texts for word in re.findall(r"[A-Za-z0-9&]+", DEFINED.sub(" ", text))}
    return sorted(a for a in abbreviations if a in words or f"{a}s" in words)


def abbreviations_in(query: str, defined: dict[str, str] | None = None) -> dict[str, str]:
    """{abbreviation: long form} for each abbreviation in `query` that the documents define (`defined`) or
    FINANCE knows; plural "NPLs" counts as NPL."""
    known = {**FINANCE, **(defined or {})}
    found = {}
    for word in dict.fromkeys(QUERY_WORD.findall(query)):
        key = word if word in known else word[:-1] if word.endswith("s") and word[:-1] in known else None
        if key is not None:
            found[key] = known[key]
    return found


def spelled_out(query: str, defined: dict[str, str] | None = None, used: Callable[[str], bool] | None = None) -> str:
    """`query` with "(ABBR: long form)" appended for each abbreviation in it (abbreviations_in), unless the
    long form is already in the query or `used(ABBR)` says the documents write the abbreviation itself (then
    it matches as it is, and the long form's words only add noise)."""
    lowered = query.lower()
    notes = [f"{key}: {long}" for key, long in abbreviations_in(query, defined).items()
             if long not in lowered and not (used is not None and used(key))]
    return f"{query} ({'; '.join(notes)})" if notes else query
