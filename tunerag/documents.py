"""Finding and reading the user's documents (txt, md, pdf, html, docx), with one clear error per bad file.

Shared by `embeddings.prepare` and `rag.cli`, so a file reads the same in training and in use.
`read_documents(paths, strict)` is the entry point for a command's DOCS: a bad file met while walking
a folder is skipped and listed in one warning line (unless `strict`); a bad file named explicitly, or
no usable file at all, is an error. `read_pages` keeps a PDF's page numbers for callers that cite them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from tunerag.common import TuneragError, first_line

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".docx"}
SUPPORTED = ".txt, .md, .pdf, .html or .docx"  # for messages
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024  # a bigger file is almost surely not a document: say so, don't OOM
# HTML elements whose text is not the document's: code, styling, and inline XBRL's hidden facts block
HTML_DROP = ("script", "style", "noscript", "template", "head", "ix:header")
HTML_BLOCKS = ("p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section", "article",
               "blockquote", "pre", "dt", "dd", "caption", "ul", "ol", "header", "footer", "center", "hr")


class DocumentError(TuneragError):
    """A document that cannot be used: missing, empty, binary, unreadable, too large.

    `reason` is the message without the file name, for lists of skipped files."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def _bad(path: Path | str, reason: str) -> DocumentError:
    return DocumentError(f"{str(path)!r} {reason}", reason)


def _walk(folder: Path) -> list[Path]:
    inside = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not inside:
        raise DocumentError(f"folder {str(folder)!r} has no {SUPPORTED} files")
    return inside


def _named(paths: list[Path]) -> dict[Path, bool]:
    """Each file behind `paths`, in order, mapped to whether it was named explicitly (not walked)."""
    found: dict[Path, bool] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise DocumentError(f"{str(path)!r} does not exist")
        if path.is_dir():
            for p in _walk(path):
                found.setdefault(p, False)
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DocumentError(f"{str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; use {SUPPORTED}")
        else:
            found[path] = True
    return found


def find_documents(paths: list[Path]) -> list[Path]:
    """The files behind `paths`: files as given, folders walked (sorted; hidden entries skipped)."""
    return list(_named(paths))


def read_documents(paths: list[Path], strict: bool = False,
                   max_bytes: int = MAX_DOCUMENT_BYTES) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(documents as (path, text), skipped as (path, reason)) for the files and folders in `paths`.

    A bad file found by walking a folder is skipped, with one warning line listing every skipped
    file; with `strict` it is an error. A bad file named explicitly is always an error, and so is
    having no usable file at all.
    """
    docs, skipped = [], []
    for path, explicit in _named(paths).items():
        try:
            docs.append((path, read_document(path, max_bytes)))
        except DocumentError as e:
            if explicit or strict:
                raise
            skipped.append((path, e.reason))
    if skipped:
        listed = "; ".join(f"{p.name}: {why}" for p, why in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        logger.warning("skipped %d of %d files found in folders (%s%s); pass --strict to stop at a bad file instead",
                       len(skipped), len(skipped) + len(docs), listed, more)
    if not docs:
        raise DocumentError(f"none of the {len(skipped)} files could be used ({skipped[0][0]}: {skipped[0][1]}"
                            f"{'; ...' if len(skipped) > 1 else ''}); pass {SUPPORTED} documents with text")
    return docs, skipped


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text from bytes; invalid bytes become U+FFFD with a warning that counts them."""
    nul = data.find(b"\0")  # memchr over the whole file: a binary tail after 8 KB of text is still binary
    if nul >= 0:
        raise _bad(name, f"looks binary (a NUL byte at offset {nul:,}), not text; pass {SUPPORTED} documents")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        logger.warning("%s is not valid UTF-8: %d undecodable byte(s) replaced with U+FFFD",
                       name, text.count("\ufffd"))
        return text


@contextmanager
def _quiet(logger_name: str):
    """A library's warnings about a file we either read or reject in one line of our own."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def pdf_pages(path: Path) -> list[str]:
    """The text of every page of a PDF ('' for a page without text); an error when no page has text."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})") from None
    if b"%PDF-" not in head:  # readers accept the header anywhere in the first 1024 bytes
        raise _bad(path, "is not a PDF (no %PDF- header; a text file renamed .pdf?)")
    try:
        with _quiet("pypdf"):
            reader = PdfReader(path)
            pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, OSError, KeyError, TypeError) as e:
        raise _bad(path, f"is not a readable PDF ({e})") from None
    if not any(p.strip() for p in pages):
        raise _bad(path, "has no text layer (a scanned PDF?); run OCR on it first")
    return pages


def read_pdf(path: Path) -> str:
    return "\n\n".join(pdf_pages(path))


def _cells(row) -> list[str]:
    """A table row's non-empty cells, with the '$' / '%' / ')' cells that filings split off a figure put back."""
    cells: list[str] = []
    pending = ""
    for cell in row:
        text = " ".join(cell.split())
        if not text:
            continue
        if text in {"$", "€", "£", "¥", "US$", "("}:
            pending += text
        elif cells and not pending and text in {")", "%", "%)", ")%"}:
            cells[-1] += text
        else:
            cells.append(pending + text)
            pending = ""
    if pending:
        cells.append(pending)
    return cells


def html_text(data: bytes) -> str:
    """Readable text of an HTML page: markup, scripts and styles dropped; each block element
    (paragraph, heading, list item) on its own line; each table row one line, cells joined by ' | '."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "lxml")  # bytes: the parser reads the page's own charset declaration
    for tag in soup.find_all(HTML_DROP):
        tag.decompose()
    for row in soup.find_all("tr"):
        cells = _cells(cell.get_text(" ") for cell in row.find_all(["td", "th"]) if cell.find_parent("tr") is row)
        row.clear()
        row.append(" | ".join(cells))
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for block in soup.find_all(HTML_BLOCKS):
        block.insert_before("\n")
        block.insert_after("\n")
    lines = (" ".join(line.split()) for line in soup.get_text().splitlines())
    return "\n".join(line for line in lines if line)


def read_html(path: Path, data: bytes) -> str:
    from bs4.builder import ParserRejectedMarkup

    nul = data.find(b"\0")
    if nul >= 0 and not data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 pages have NULs and a BOM
        raise _bad(path, f"looks binary (a NUL byte at offset {nul:,}), not HTML")
    try:
        return html_text(data)
    except (ParserRejectedMarkup, ValueError, LookupError) as e:
        raise _bad(path, f"is not readable HTML ({e})") from None


def docx_text(path: Path) -> str:
    """The paragraphs and table rows of a .docx body, in document order (one line each; cells ' | ')."""
    import docx
    from docx.table import Table

    lines = []
    for block in docx.Document(str(path)).iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                # a merged cell comes back once per grid column it spans: keep it once
                unique = {id(cell._tc): cell for cell in row.cells}.values()
                lines.append(" | ".join(_cells(cell.text for cell in unique)))
        else:
            lines.append(block.text)
    lines = (" ".join(line.split()) for line in lines)
    return "\n".join(line for line in lines if line)


def read_docx(path: Path) -> str:
    import zipfile

    from docx.opc.exceptions import OpcError
    from lxml.etree import LxmlError

    try:
        return docx_text(path)
    except (OpcError, zipfile.BadZipFile, KeyError, ValueError, LxmlError) as e:
        raise _bad(path, f"is not a readable .docx ({type(e).__name__}: {first_line(e)}); save it again from Word, "
                   "or as .pdf") from None


def _checked(path: Path, max_bytes: int) -> Path:
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "does not exist or is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise _bad(path, f"is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit; split it")
    return path


def read_document(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The text of one txt/md/pdf/html/docx file, or a DocumentError that says what is wrong with it."""
    path = _checked(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        text = read_pdf(path)
    elif suffix == ".docx":
        text = read_docx(path)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _bad(path, f"cannot be read ({e.strerror})") from None
        text = read_html(path, data) if suffix in HTML_SUFFIXES else decode_text(data, str(path))
    if not text.strip():
        raise _bad(path, "is empty" if suffix not in HTML_SUFFIXES | {".docx"} else "is empty (no text in it)")
    return text


def read_pages(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> list[tuple[int | None, str]]:
    """(page number, text) per page with text for a PDF (numbers from 1); [(None, text)] for other types."""
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        pages = pdf_pages(_checked(path, max_bytes))
        return [(number, text) for number, text in enumerate(pages, 1) if text.strip()]
    return [(None, read_document(path, max_bytes))]
