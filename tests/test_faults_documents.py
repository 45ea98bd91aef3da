"""Faults a new user hit with documents, on real files written here: a binary tail after 8 KB of text,
a text file renamed .pdf (two pypdf warnings before our error), one bad file stopping a whole folder;
and the documents analysts have: EDGAR-style HTML, .docx, and PDFs whose page numbers we keep."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_pdf as pdf

from tunerag.documents import (
    SUPPORTED_SUFFIXES,
    DocumentError,
    find_documents,
    read_document,
    read_documents,
    read_pages,
)

REPO = Path(__file__).resolve().parent.parent
TEXT = "Total revenue grew 12% to $4.2 billion. Net interest margin widened to 3.1%.\n"


def docx(path: Path) -> Path:
    import docx as python_docx

    d = python_docx.Document()
    d.add_heading("Annual report 2025", 1)
    d.add_paragraph("Revenue grew 12% to $4.2 billion.")
    table = d.add_table(rows=3, cols=3)
    for r, row in enumerate([["Metric", "2025", "2024"], ["CET1 ratio", "13.2%", "12.9%"]]):
        for c, text in enumerate(row):
            table.cell(r, c).text = text
    table.cell(2, 0).merge(table.cell(2, 2)).text = "Ratios under Basel III."
    d.add_paragraph("The board declared a dividend of $0.52 per share.")
    d.save(str(path))
    return path


EDGAR = """<!DOCTYPE html>
<html><head><meta charset="windows-1252"><title>10-K</title>
<style>td {{ font-size: 10pt }}</style><script>window.track = "x";</script></head>
<body><ix:header><ix:hidden><ix:nonNumeric name="dei:EntityCentralIndexKey">0000123456</ix:nonNumeric>
</ix:hidden></ix:header>
<div><p style="font-weight:bold">Item 7. Management&#8217;s Discussion</p>
<p>Total revenue was <span>$4.2&nbsp;billion</span>, up 12%, driven by<br>higher net interest income.</p>
<table>
<tr><td><b>(in millions)</b></td><td></td><td>2025</td><td></td><td>2024</td></tr>
<tr><td>Net interest income</td><td>$</td><td>3,120</td><td>$</td><td>2,870</td></tr>
<tr><td>Provision for credit losses</td><td>(</td><td>215</td><td>)</td><td>(</td><td>180</td><td>)</td></tr>
<tr><td>Efficiency ratio</td><td></td><td>55.1</td><td>%</td><td>57.4</td><td>%</td></tr>
</table>
<ul><li>Deposits rose {eur}5 billion.</li><li>Loans were flat.</li></ul></div></body></html>
"""


# --- binary tails, fake PDFs -------------------------------------------------------------------


def test_nul_bytes_after_the_first_8_kb_are_binary(tmp_path):
    path = tmp_path / "export.txt"
    path.write_bytes(TEXT.encode() * 200 + b"\x00\x00\x01\x02tail")  # 15 KB of text, then a binary blob
    with pytest.raises(DocumentError, match=rf"looks binary \(a NUL byte at offset {len(TEXT) * 200:,}\)") as err:
        read_document(path)
    assert "\n" not in str(err.value) and "export.txt" in str(err.value)


def test_a_text_file_renamed_pdf_is_one_line_without_pypdf_warnings(tmp_path, caplog):
    fake = tmp_path / "report.pdf"
    fake.write_text(TEXT)
    caplog.set_level(logging.WARNING)
    with pytest.raises(DocumentError, match=r"is not a PDF \(no %PDF- header; a text file renamed .pdf\?\)"):
        read_document(fake)
    assert caplog.records == []
    # and through the command, as the user ran it: one line on stderr, nothing else
    done = subprocess.run([sys.executable, "-m", "embeddings.prepare", str(fake), "--generator", "ict",
                           "--out", str(tmp_path / "pairs")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("prepare: {")]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "report.pdf" in lines[0], \
        done.stderr


def test_a_broken_pdf_with_a_header_is_quiet_too(tmp_path, caplog):
    (tmp_path / "cut.pdf").write_bytes(pdf(tmp_path / "whole.pdf", [TEXT]).read_bytes()[:200])
    caplog.set_level(logging.WARNING)
    with pytest.raises(DocumentError, match="is not a readable PDF"):
        read_document(tmp_path / "cut.pdf")
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]


# --- a folder with bad files --------------------------------------------------------------------


@pytest.fixture()
def mixed(tmp_path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXT)
    (folder / "sub" / "b.md").write_text(TEXT.replace("12%", "9%"))
    (folder / "empty.txt").write_text("\n")
    (folder / "renamed.pdf").write_text(TEXT)
    (folder / "sub" / "blob.txt").write_bytes(TEXT.encode() * 120 + b"\0")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n")  # not a document type: ignored, as before
    return folder


def test_bad_files_in_a_folder_are_skipped_with_one_warning(mixed, caplog):
    caplog.set_level(logging.WARNING)
    docs, skipped = read_documents([mixed])
    assert [p.name for p, _ in docs] == ["a.txt", "b.md"] and docs[0][1] == TEXT
    assert {p.name: why for p, why in skipped} == {
        "empty.txt": "is empty", "renamed.pdf": "is not a PDF (no %PDF- header; a text file renamed .pdf?)",
        "blob.txt": f"looks binary (a NUL byte at offset {len(TEXT) * 120:,}), not text; pass .txt, .md, .pdf, .html or .docx documents"}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("skipped 3 of 5 files found in folders (") and "--strict" in warnings[0]
    assert all(name in warnings[0] for name in ("empty.txt", "renamed.pdf", "blob.txt"))


def test_strict_a_named_bad_file_and_nothing_usable_are_errors(mixed, tmp_path):
    with pytest.raises(DocumentError, match="empty.txt' is empty"):
        read_documents([mixed], strict=True)
    with pytest.raises(DocumentError, match="renamed.pdf' is not a PDF"):
        read_documents([mixed / "a.txt", mixed / "renamed.pdf"])  # named explicitly: the user meant it
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.txt").write_text("")
    (only_bad / "y.pdf").write_text("not a pdf")
    with pytest.raises(DocumentError, match=r"none of the 2 files could be used") as err:
        read_documents([only_bad])
    assert "\n" not in str(err.value)


def test_prepare_skips_bad_folder_files_unless_strict(mixed, tmp_path, caplog):
    from embeddings.config import PrepareConfig
    from embeddings.prepare import main
    from tunerag.common import TuneragError, parse_config

    for f in ("a.txt", "sub/b.md"):  # enough text for a train/val split by document
        (mixed / f).write_text(TEXT * 6)
    caplog.set_level(logging.WARNING)
    stats = main(PrepareConfig(docs=[mixed], out=tmp_path / "pairs", generator="ict", chunk_tokens=40, chunk_overlap=0))
    assert stats["documents"] == 2 and sorted(Path(p).name for p in stats["documents_skipped"]) == \
        ["blob.txt", "empty.txt", "renamed.pdf"]
    assert sum("skipped 3 of 5 files" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(TuneragError, match="is empty|is not a PDF|looks binary"):
        main(PrepareConfig(docs=[mixed], out=tmp_path / "strict", generator="ict", strict=True))
    assert not (tmp_path / "strict").exists()
    assert parse_config(PrepareConfig, ["docs/", "--strict"]).strict is True


# --- HTML, docx, pages --------------------------------------------------------------------------


def test_edgar_style_html_reads_as_lines_and_table_rows(tmp_path):
    page = tmp_path / "10k.htm"
    page.write_bytes(EDGAR.format(eur="\u20ac").encode("cp1252"))  # the page's own charset, as EDGAR serves it
    text = read_document(page)
    assert text.splitlines() == [
        "Item 7. Management\u2019s Discussion",
        "Total revenue was $4.2 billion, up 12%, driven by",
        "higher net interest income.",
        "(in millions) | 2025 | 2024",
        "Net interest income | $3,120 | $2,870",
        "Provision for credit losses | (215) | (180)",
        "Efficiency ratio | 55.1% | 57.4%",
        "Deposits rose \u20ac5 billion.",
        "Loans were flat.",
    ]
    assert read_pages(page) == [(None, text)]
    (tmp_path / "a.html").write_text(EDGAR.format(eur="&euro;"))
    assert find_documents([tmp_path]) == [tmp_path / "10k.htm", tmp_path / "a.html"]


def test_bad_html_is_one_line(tmp_path):
    (tmp_path / "scripts.html").write_text("<html><head><script>var a = 1;</script></head><body> </body></html>")
    with pytest.raises(DocumentError, match="scripts.html' is empty"):
        read_document(tmp_path / "scripts.html")
    (tmp_path / "blob.html").write_bytes(b"<html>\x00\x01\x02\x03")
    with pytest.raises(DocumentError, match="looks binary"):
        read_document(tmp_path / "blob.html")


def test_docx_paragraphs_and_table_rows_in_order(tmp_path):
    text = read_document(docx(tmp_path / "report.docx"))
    assert text.splitlines() == ["Annual report 2025", "Revenue grew 12% to $4.2 billion.", "Metric | 2025 | 2024",
                                 "CET1 ratio | 13.2% | 12.9%", "Ratios under Basel III.",
                                 "The board declared a dividend of $0.52 per share."]


@pytest.mark.parametrize("case", ["not a zip", "truncated", "zip without a document"])
def test_a_corrupt_docx_is_one_line(tmp_path, case):
    import zipfile

    bad = tmp_path / "bad.docx"
    if case == "not a zip":
        bad.write_text(TEXT)
    elif case == "truncated":
        bad.write_bytes(docx(tmp_path / "whole.docx").read_bytes()[:3000])
    else:
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("notes.txt", TEXT)
    with pytest.raises(DocumentError, match=r"bad.docx' is not a readable .docx \(") as err:
        read_document(bad)
    assert "\n" not in str(err.value)


def test_pdf_pages_keep_their_numbers(tmp_path):
    path = pdf(tmp_path / "r.pdf", ["Revenue grew 12 percent.", None, "The CET1 ratio was 13.2 percent."])
    pages = read_pages(path)
    assert [n for n, _ in pages] == [1, 3]
    assert "Revenue grew 12 percent." in pages[0][1] and "CET1 ratio was 13.2 percent." in pages[1][1]
    text = read_document(path)  # unchanged: all pages joined
    assert text.index("Revenue") < text.index("CET1") and text.count("\n\n") == 2
    with pytest.raises(DocumentError, match="no text layer"):
        read_pages(pdf(tmp_path / "scan.pdf", [None, None]))
    assert read_pages(tmp_path / "r.pdf") == pages


def test_supported_types_are_listed_in_errors(tmp_path):
    assert {".html", ".htm", ".docx", ".pdf", ".txt", ".md"} <= SUPPORTED_SUFFIXES
    (tmp_path / "deck.pptx").write_bytes(b"PK")
    with pytest.raises(DocumentError, match=r"use .txt, .md, .pdf, .html or .docx"):
        find_documents([tmp_path / "deck.pptx"])
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DocumentError, match=r"has no .txt, .md, .pdf, .html or .docx files"):
        find_documents([tmp_path / "imgs"])
