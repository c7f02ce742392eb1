"""Command lines as ogon splits them: WinPR's CommandLineToArgvA (FreeRDP
2.x, winpr/libwinpr/thread/argv.c), which ogon uses for every program it
starts from a property (``startwm``, ``stopwm``, ``startvc``, ``cmd``) and
for its own command lines (the X server's, the launcher's).

Windows rules, not a shell's: blanks and tabs separate arguments; only
double quotes group; a backslash is literal unless it precedes a double
quote (2n backslashes + ``"``: n backslashes and a grouping quote; 2n+1: n
backslashes and a literal quote). Single quotes are ordinary characters
(ogon's ``'<launcherdebugfile>'`` keeps them). Ported with WinPR's quirks:
a leading blank gives an empty first argument, and inside a quoted
argument every quote character is dropped, escaped ones included.
"""

from __future__ import annotations

_BLANKS = " \t"


def _escape_pass(line: str) -> tuple[str, set[int]]:
    """Resolve backslash runs before a double quote; returns the new line
    and the positions of quotes that are literal (escaped)."""
    if '\\"' not in line:
        return line, set()
    out: list[str] = []
    escaped: set[int] = set()
    i = 0
    while i < len(line):
        quote = line.find('\\"', i)
        if quote < 0:
            out.append(line[i:])
            break
        start = quote
        while start > i and line[start - 1] == "\\":
            start -= 1
        backslashes = quote + 1 - start
        out.append(line[i:start])
        out.append("\\" * (backslashes // 2))
        if backslashes % 2:
            escaped.add(sum(len(part) for part in out))
        out.append('"')
        i = quote + 2
    return "".join(out), escaped


def _span_not(line: str, start: int, stop_chars: str) -> int:
    """strcspn from ``start``: the index of the first of ``stop_chars``."""
    i = start
    while i < len(line) and line[i] not in stop_chars:
        i += 1
    return i


def command_line_to_argv(line: str) -> list[str]:
    """WinPR's CommandLineToArgvA of ``line``."""
    line, escaped = _escape_pass(line)
    args: list[str] = []
    p = 0
    while p < len(line):
        begin = p
        while True:
            p = _span_not(line, p, _BLANKS + '"')
            if p >= len(line) or line[p] != '"' or p not in escaped:
                break
            p += 1
        if p >= len(line) or line[p] != '"':
            args.append(line[begin:p])
        else:
            p += 1
            while True:
                p = _span_not(line, p, '"')
                if p >= len(line) or p not in escaped:
                    break
                p += 1
            if p < len(line):
                p += 1
                if p < len(line):
                    p = _span_not(line, p, _BLANKS)
            args.append("".join(c for c in line[begin:p] if c != '"'))
        while p < len(line) and line[p] in _BLANKS:
            p += 1
    return args
