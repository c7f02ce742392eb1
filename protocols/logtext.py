"""Text from outside (a user name, a client's address, a backend's output),
made safe to put in a log line.

A log line is one record: in the journal each ``\\n`` starts an entry of its
own, and a terminal showing the classic log obeys ``\\r``, ANSI/OSC escapes
and the other controls. So every C0 and C1 control, DEL, the Unicode line
and paragraph separators and the bidirectional overrides (which reorder
what a reader sees) are written as Python's ``repr`` would write them
(``\\n``, ``\\x1b``, ``\\u2028``): still readable, never a line break or an
escape. Backslashes are left alone (a Windows ``DOMAIN\\user`` stays
readable); escaping twice changes nothing.
"""

from __future__ import annotations

import re

#: C0 controls, DEL, C1 controls; U+2028/U+2029; the bidi embeddings,
#: overrides and isolates (U+202A-U+202E, U+2066-U+2069).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escaped(text: str) -> str:
    """``text`` with every character that could break or forge a log line
    written as its ``repr``-style escape."""
    return _UNSAFE.sub(_escape, text)


def has_unsafe(text: str) -> bool:
    """Whether ``escaped`` would change ``text``."""
    return _UNSAFE.search(text) is not None
