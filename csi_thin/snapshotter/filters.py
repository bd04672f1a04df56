"""containerd's filter syntax, as the Snapshots service's List (Walk) receives it.

A request carries filters; an item is returned when ANY of them matches, and a filter matches when
ALL of its comma-separated selectors do. A selector is `<fieldpath>[<op><value>]`:

    name==foo                 equality (the field must be present)
    parent!=""                inequality (an absent field counts as "")
    labels.l                  presence
    labels."a.b/c"~=^x[0-9]   regular expression (searched, not anchored)

Field path elements are [A-Za-z0-9_]+ or quoted; values are quoted or a run of printable
characters up to the next ',' or space. Quotes are `"..."` (backslash escapes), `/.../` or
`|...|` (a backslash escapes only the quote character: handy for regular expressions).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from csi_thin import errors

#: a field path -> (value, present)
Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]

_OPERATORS = ("==", "!=", "~=")
_QUOTES = '"/|'
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "0": "\0"}


@dataclasses.dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str = ""  # "" = presence
    value: str = ""

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return re.search(self.value, value) is not None


@dataclasses.dataclass(frozen=True)
class Filter:
    """Filters OR'ed, each a conjunction of selectors; no filter matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        return not self.alternatives or any(all(s.match(adaptor) for s in sel) for sel in self.alternatives)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> errors.InvalidArgument:
        return errors.InvalidArgument(f"filter {self.text!r}: {what} at position {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\" and self.pos < len(self.text):
                nxt = self.text[self.pos]
                self.pos += 1
                if quote == '"':
                    if nxt not in _ESCAPES:
                        raise self.error(f"unknown escape \\{nxt}")
                    out.append(_ESCAPES[nxt])
                else:  # /regexp/ and |regexp|: only the quote is escaped, the rest stays for re
                    out.append(nxt if nxt == quote else "\\" + nxt)
                continue
            out.append(c)
        raise self.error("unterminated quote")

    def field(self) -> str:
        if self.peek() in _QUOTES and self.peek():
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isascii() and (self.text[self.pos].isalnum() or self.text[self.pos] == "_")
        ):
            self.pos += 1
        if start == self.pos:
            raise self.error("expected a field name")
        return self.text[start : self.pos]

    def value(self) -> str:
        if self.peek() and self.peek() in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            if not self.text[self.pos].isprintable():
                raise self.error("unprintable character in a value")
            self.pos += 1
        if start == self.pos:
            raise self.error("expected a value")
        return self.text[start : self.pos]


def _selector(sc: _Scanner) -> Selector:
    sc.skip_space()
    path = [sc.field()]
    while sc.peek() == ".":
        sc.pos += 1
        path.append(sc.field())
    sc.skip_space()
    op = sc.text[sc.pos : sc.pos + 2]
    if op not in _OPERATORS:
        return Selector(tuple(path))
    sc.pos += 2
    sc.skip_space()
    value = sc.value()
    if op == "~=":
        try:
            re.compile(value)
        except re.error as exc:
            raise sc.error(f"bad regular expression {value!r} ({exc})") from None
    return Selector(tuple(path), op, value)


def parse(text: str) -> tuple[Selector, ...]:
    """One filter: its selectors."""
    sc = _Scanner(text)
    selectors = [_selector(sc)]
    sc.skip_space()
    while sc.peek() == ",":
        sc.pos += 1
        selectors.append(_selector(sc))
        sc.skip_space()
    if sc.pos != len(text):
        raise sc.error("unexpected text")
    return tuple(selectors)


def parse_all(texts: Sequence[str]) -> Filter:
    """The filters of one request; an empty filter matches everything, as in containerd."""
    return Filter(tuple(parse(t) if t.strip() else () for t in texts))
