"""Spec text from a file's bytes or a caller's string, as valid Unicode or a located SpecError.

A file that is not UTF-8 is reported at the line and column of its first bad byte (the text
shown under the message has U+FFFD in place of the bad bytes). A caller's string may carry the
same damage: Python turns undecodable bytes of a command-line argument into lone surrogates
(U+DC80..U+DCFF), which could be neither hashed for the cache nor printed; they are reported the
same way. A file is read only up to what the size limit can accept (limits.MAX_SPEC_CHARS), so
that a huge file fails as quickly as a huge string.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from attnc.errors import SpecError
from attnc.frontends import limits

_SURROGATE = re.compile("[\ud800-\udfff]")
# A UTF-8 character is at most 4 bytes: this many bytes decode to more characters than the
# limit accepts, so reading stops there without changing the verdict.
_READ_BYTES = 4 * limits.MAX_SPEC_CHARS + 8


def read_file(path: Path, filename: str) -> str:
    """The text of the spec file at `path`, named `filename` in errors (an OSError when it
    cannot be read)."""
    with open(path, "rb") as f:
        data = f.read(_READ_BYTES)
        whole = not f.read(1)
    return decode(data, filename, final=whole)


def decode(data: bytes, filename: str, final: bool = True) -> str:
    """`data` as UTF-8; `final=False` when it is a prefix, whose last character may be cut."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as err:
        good = data[:err.start].decode("utf-8")  # everything before the first bad byte is valid
        shown = data.decode("utf-8", errors="replace")
        raise _bad(good, shown, filename, f"byte 0x{data[err.start]:02x}") from None


def check_text(text: str, filename: str) -> str:
    """`text` itself, when it holds no lone surrogate."""
    bad = _SURROGATE.search(text)
    if bad is None:
        return text
    shown = printable(text)
    char = ord(bad.group())
    # surrogateescape maps an undecodable byte B to U+DC00 + B
    what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
    raise _bad(text[:bad.start()], shown, filename, what)


def printable(text: str) -> str:
    """`text` with U+FFFD for each lone surrogate."""
    return _SURROGATE.sub("\ufffd", text)


def _bad(before: str, shown: str, filename: str, what: str) -> SpecError:
    """The error for a bad character right after the text `before`."""
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return SpecError(f"the spec is not valid UTF-8 text: {what}", source=shown,
                     filename=filename, line=line, column=column,
                     hint="save the file as UTF-8")
