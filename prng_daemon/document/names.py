"""File names as the daemon shows and stores them: names come from whoever can write a file.

A name may hold newlines, ANSI escapes, bidi overrides or bytes that are not UTF-8 (Python keeps
those as lone surrogates). `printable` is what every human-readable output uses; `utf8_name` is
what goes into the ledger, which stores text.
"""

from __future__ import annotations

__all__ = ["printable", "utf8_name"]


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by os.fsdecode as a surrogate
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def printable(text: str, *, newlines: bool = False) -> str:
    """`text` with every non-printable character written as a Python escape (`\\n`, `\\x1b`,
    `\\u202e`, `\\xff` for an undecodable byte): safe on a terminal, one line per value.

    `newlines=True` keeps line breaks (a traceback), escaping everything else.
    """
    if text.isprintable():
        return text
    if newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def utf8_name(name: str) -> str:
    """`name` as valid UTF-8 text: itself, unless it holds bytes that are not UTF-8, which are
    written as `\\xNN` (so the ledger can store it and `status` can show it)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
