"""rag.abbreviations: definitions found in documents, and questions spelled out for retrieval."""

from rag.abbreviations import FINANCE, abbreviations_in, defined_in, initials_match, spelled_out, written_apart


def test_definitions_are_found_and_cut_to_their_initials():
    text = ("The Company's net stable funding ratio (NSFR) was 116%. It held high-quality liquid assets (HQLA) "
            "of $18.4 billion, and its return on average tangible common equity (ROTCE) was 11.8%. "
            "Revenue (in millions) rose. The Board of Directors (Chair) met. Net charge-offs (NCOs) fell.")
    found = defined_in([text])
    assert found["NSFR"] == "net stable funding ratio"
    assert found["HQLA"] == "high quality liquid assets"
    assert found["ROTCE"] == "return on average tangible common equity"  # "average" skipped by the initials
    assert found["NCO"] == "net charge offs"  # the plural's s is not a letter of it
    assert "Chair" not in found and "in" not in found  # initials that do not spell it, lower-case words


def test_a_long_hyphenated_run_is_read_in_bounded_work(monkeypatch):
    """The words before "(AB)" are looked back over in a bounded window, not all 2,000 of them: the
    work per definition does not grow with the text (counted, not timed)."""
    import rag.abbreviations as abbreviations

    calls = []
    real = abbreviations.initials_match
    monkeypatch.setattr(abbreviations, "initials_match",
                        lambda words, abbr: calls.append(len(words)) or real(words, abbr))
    assert defined_in(["x" + "-ab" * 2000 + " (AB) " + "a-b " * 2000]) == {}  # "ab ab (AB)": no first-word match
    assert calls and len(calls) <= abbreviations.MAX_LONG_WORDS and max(calls) <= abbreviations.MAX_LONG_WORDS


def test_initials():
    assert initials_match(["liquidity", "coverage", "ratio"], "LCR")
    assert initials_match(["common", "equity", "tier", "1"], "CET1")
    assert not initials_match(["board", "of", "directors"], "BOX")
    assert not initials_match(["net", "loss", "of", "the", "company"], "NL")  # the last word must give the last letter


def test_questions_are_spelled_out_once():
    assert spelled_out("Halvorsen Ridge ROA for 2023?") == "Halvorsen Ridge ROA for 2023? (ROA: return on assets)"
    # the documents' own definition wins over the list; a plural counts; a long form already there is not repeated
    assert spelled_out("NSFR and NPLs in Q4?", {"NSFR": "net stable funding ratio"}) == \
        "NSFR and NPLs in Q4? (NSFR: net stable funding ratio; NPL: nonperforming loans; Q4: fourth quarter)"
    assert spelled_out("What was the net stable funding ratio (NSFR)?") == "What was the net stable funding ratio (NSFR)?"
    assert spelled_out("What was revenue in 2025?") == "What was revenue in 2025?"
    assert spelled_out("A cut of 25 bps") == "A cut of 25 bps (bps: basis points)"
    assert all(long == long.lower() for long in FINANCE.values())  # compared with the lower-cased question
    # every abbreviation the question holds, long form in it or not (the sentence scorer matches long forms)
    assert abbreviations_in("The net stable funding ratio (NSFR) and NPLs?") == {
        "NSFR": "net stable funding ratio", "NPL": "nonperforming loans"}


def test_an_abbreviation_written_only_in_its_definition_is_not_written_apart():
    texts = ["Net stable funding ratio (NSFR): The ratio of available to required stable funding.",
             "Common equity tier 1 (CET1): Capital of the highest quality.", "The CET1 ratio was 10.5%.",
             "Value at risk (VaR) is measured daily; average VaR was $5.3 million.", "Our NSFRX program grew."]
    defined = defined_in(texts)
    assert set(defined) == {"NSFR", "CET1", "VaR"}
    # NSFR appears only as "(NSFR)" ("NSFRX" is another word): BM25 must search its long form too
    assert written_apart(texts, defined) == ["CET1", "VaR"]
