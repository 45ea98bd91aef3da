"""Finding and reading the user's documents (txt, md, pdf), with one clear error per bad file.

Shared by `embeddings.prepare` and `rag.cli`, so a file reads the same in training and in use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tunerag.common import TuneragError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | {".pdf"}
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024  # a bigger file is almost surely not a document: say so, don't OOM


class DocumentError(TuneragError):
    """A document that cannot be used: missing, empty, binary, unreadable, too large."""


def find_documents(paths: list[Path]) -> list[Path]:
    """The files behind `paths`: files as given, folders walked (sorted; hidden entries skipped)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise DocumentError(f"{str(path)!r} does not exist")
        if path.is_dir():
            inside = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not inside:
                raise DocumentError(f"folder {str(path)!r} has no .txt, .md or .pdf files")
            found += inside
        elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DocumentError(f"{str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; use .txt, .md or .pdf")
        else:
            found.append(path)
    return list(dict.fromkeys(found))


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 text from bytes; invalid bytes become U+FFFD with a warning that counts them."""
    if b"\0" in data[:8192]:
        raise DocumentError(f"{name!r} looks binary (NUL bytes), not text; pass a .txt, .md or .pdf document")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        logger.warning("%s is not valid UTF-8: %d undecodable byte(s) replaced with U+FFFD",
                       name, text.count("\ufffd"))
        return text


def read_pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, OSError) as e:
        raise DocumentError(f"{str(path)!r} is not a readable PDF ({e})") from None
    text = "\n\n".join(pages)
    if not text.strip():
        raise DocumentError(f"{str(path)!r} has no text layer (a scanned PDF?); run OCR on it first")
    return text


def read_document(path: Path, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The text of one txt/md/pdf file, or a DocumentError that says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise DocumentError(f"{str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise DocumentError(f"{str(path)!r} is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit; split it")
    if path.suffix.lower() == ".pdf":
        text = read_pdf(path)
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DocumentError(f"{str(path)!r} cannot be read ({e.strerror})") from None
        text = decode_text(data, str(path))
    if not text.strip():
        raise DocumentError(f"{str(path)!r} is empty")
    return text
