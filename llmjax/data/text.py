"""Reading one data file as text: binary files are refused, other encodings are reported.

A file is text when it decodes as UTF-8 (a byte-order mark selects UTF-8 or UTF-16). A file that
starts like a known binary format, or has more than one control byte in a hundred (NUL, and the
other C0 codes that no text editor writes), is refused with a message saying what to pass instead.
Anything else is read: bytes that are not UTF-8 become U+FFFD, with one logged warning per file
that counts them, unless they are so many that the file is evidently in another encoding.
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path

from llmjax.errors import DataError

log = logging.getLogger(__name__)

# Formats people pass as data by mistake, by their first bytes.
_MAGIC = (
    (b"\x1f\x8b", "a gzip archive", "decompress it first"),
    (b"PK\x03\x04", "a zip archive", "extract its text files first"),
    (b"(\xb5/\xfd", "a zstd archive", "decompress it first"),
    (b"\xfd7zXZ\x00", "an xz archive", "decompress it first"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive", "extract its text files first"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", "pass text files instead"),
    (b"\xff\xd8\xff", "a JPEG image", "pass text files instead"),
    (b"GIF8", "a GIF image", "pass text files instead"),
    (b"%PDF-", "a PDF document", "extract its text first (e.g. pdftotext)"),
    (b"\x7fELF", "an executable", "pass text files instead"),
    (b"\x93NUMPY", "a NumPy array", "pass text files instead"),
)
# C0 controls that text does not contain: all but \t \n \v \f \r, ESC (terminal colours) and
# SUB (the old DOS end-of-file mark).
_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\v\f\r\x1a\x1b")
_SAMPLE = 1 << 16
# Above this share of undecodable characters a file is not "mostly UTF-8 with a few odd bytes"
# but text in another encoding, which would train on replacement characters.
_MAX_REPLACED = 0.2


def _binary_kind(raw: bytes) -> tuple[str, str] | None:
    """``(what it is, what to do)`` when ``raw`` is not text, else None."""
    for magic, what, fix in _MAGIC:
        if raw.startswith(magic):
            return what, fix
    sample = raw[:_SAMPLE]
    odd = sum(sample.count(b) for b in _CONTROL)
    if sample and odd * 100 > len(sample):
        nul = sample.count(0)
        why = f"{nul:,} NUL bytes" if nul else f"{odd:,} control bytes"
        return f"binary data ({why} in its first {len(sample):,} bytes)", "pass text files instead"
    return None


def decode(path: Path, raw: bytes) -> str:
    """The text of the file ``path`` whose bytes are ``raw``; see the module docstring."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DataError(
                f"data file {path} starts with a UTF-16 byte-order mark but is not UTF-16 "
                f"({e.reason} at byte {e.start}); save it as UTF-8"
            ) from e
    kind = _binary_kind(raw)
    if kind is not None:
        what, fix = kind
        raise DataError(
            f"data file {path} is {what}, not text; {fix} (--data takes UTF-8 text: .txt, .md, "
            "source files, or .jsonl with one JSON object per line)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8-sig", errors="replace")
    # U+FFFD that the file itself spells in UTF-8 is text, not a replacement.
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced > _MAX_REPLACED * max(len(text), 1):
        raise DataError(
            f"data file {path} is not UTF-8: {replaced:,} of its {len(text):,} characters are not "
            "valid UTF-8; convert it to UTF-8 (iconv -f ENCODING -t utf-8)"
        )
    log.warning(
        "data file %s is not valid UTF-8: %s characters were replaced by U+FFFD; convert it to "
        "UTF-8 to keep them (e.g. iconv -f cp1252 -t utf-8)",
        path,
        f"{replaced:,}",
    )
    return text


def read_text(path: Path) -> str:
    """The text of one data file, or a ``DataError`` that says why it cannot be used."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError as e:
        raise DataError(
            f"data file {path} is a directory, not a file; pass it as --data (or through "
            "llmjax.data.resolve_paths) to read the files inside"
        ) from e
    except OSError as e:
        raise DataError(
            f"cannot read data file {path} ({e.strerror or e}); make it readable or leave it out "
            "of --data"
        ) from e
    return decode(path, raw)
