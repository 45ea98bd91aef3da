"""Reading user documents: every kind of bad file gets its own clear error."""

import logging

import pytest
from conftest import write_pdf

from tunerag.documents import DocumentError, find_documents, read_document


def test_folder_is_walked_sorted_and_filtered(tmp_path):
    (tmp_path / "b.md").write_text("# B")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("A")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden.txt").write_text("secret")
    assert find_documents([tmp_path]) == [tmp_path / "b.md", tmp_path / "sub" / "a.txt"]


def test_pdf_text_layer_is_extracted(tmp_path):
    text = read_document(write_pdf(tmp_path / "r.pdf", ["Net interest margin was 3.42 percent."]))
    assert "Net interest margin was 3.42 percent." in text


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"  \n", "is empty"),
    ("blob.txt", b"\x00\x01\x02ELF", "looks binary"),
    ("bad.pdf", b"%PDF-1.4 garbage", "not a readable PDF"),
])
def test_bad_files_get_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DocumentError, match=message) as err:
        read_document(tmp_path / name)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_scanned_pdf_without_text_says_so(tmp_path):
    with pytest.raises(DocumentError, match="no text layer"):
        read_document(write_pdf(tmp_path / "scan.pdf", [None]))


def test_missing_unsupported_and_huge(tmp_path):
    with pytest.raises(DocumentError, match="does not exist"):
        find_documents([tmp_path / "nope.txt"])
    (tmp_path / "deck.pptx").write_bytes(b"PK")
    with pytest.raises(DocumentError, match="unsupported file type '.pptx'"):
        find_documents([tmp_path / "deck.pptx"])
    (tmp_path / "big.txt").write_text("x" * 2048)
    with pytest.raises(DocumentError, match="over the"):
        read_document(tmp_path / "big.txt", max_bytes=1024)


def test_non_utf8_is_decoded_with_a_counted_warning(tmp_path, caplog):
    (tmp_path / "latin1.txt").write_bytes("Bilanz für 2025: 12 € Gewinn".encode("latin-1", errors="replace"))
    with caplog.at_level(logging.WARNING):
        text = read_document(tmp_path / "latin1.txt")
    assert "Bilanz f\ufffdr 2025" in text
    assert "not valid UTF-8" in caplog.text and "1 undecodable" in caplog.text
