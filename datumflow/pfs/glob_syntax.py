"""The glob syntax: a recursive-descent parser from a glob's text to its nodes.

Owns what the glob language is (`*`, `**`, `?`, classes, `{a,b}`, escapes, the extglob groups and
plain `(a|b)` groups), how capture groups are numbered (by opening parenthesis), and the SpecError
that says what is wrong with a malformed glob and where.
"""

from __future__ import annotations

import re

import msgspec

from datumflow.errors import SpecError

_EXTGLOB = "@*+?!"


class Lit(msgspec.Struct):
    text: str


class Star(msgspec.Struct):
    crosses: bool
    """`**`: the run may hold `/`."""


class One(msgspec.Struct):
    pass


class Class(msgspec.Struct):
    regex: str


class Alt(msgspec.Struct):
    kind: str
    """`{` for braces (not captured), `(` for a plain group, or the extglob operator."""
    number: int
    branches: list[list[Node]]


Node = Lit | Star | One | Class | Alt


class Parser:
    """Recursive descent over the cleaned glob; counts groups in order of opening parenthesis."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pos = 0
        self.groups = 0

    def fail(self, what: str) -> SpecError:
        return SpecError(f"glob {self.pattern!r}: {what}")

    def parse(self) -> list[Node]:
        # At the top level no closer is expected: _seq reports a stray one, or reads to the end.
        return self._seq(closers="")

    def _seq(self, closers: str) -> list[Node]:
        """Nodes up to the end or to one of `closers` (left unconsumed); any other closer is stray."""
        p = self.pattern
        nodes: list[Node] = []
        while self.pos < len(p):
            ch = p[self.pos]
            nxt = p[self.pos + 1] if self.pos + 1 < len(p) else ""
            if ch in closers or ch in ")}]":
                if ch in closers:
                    return nodes
                raise self.fail(f"{ch!r} at position {self.pos} has no matching opening bracket")
            if ch in _EXTGLOB and nxt == "(":
                self.pos += 1
                nodes.append(self._group(ch))
            elif ch == "(":
                nodes.append(self._group("("))
            elif ch == "{":
                nodes.append(self._braces())
            elif ch == "[":
                nodes.append(self._class())
            elif ch == "*":
                crosses = nxt == "*"
                self.pos += 2 if crosses else 1
                nodes.append(Star(crosses=crosses))
            elif ch == "?":
                self.pos += 1
                nodes.append(One())
            elif ch == "\\":
                if not nxt:
                    raise self.fail("ends with a lone '\\' (escape what?)")
                self.pos += 2
                nodes.append(Lit(nxt))
            else:
                self.pos += 1
                nodes.append(Lit(ch))
        return nodes

    def _alternatives(self, *, open_at: int, sep: str, close: str) -> list[list[Node]]:
        branches: list[list[Node]] = []
        while True:
            branches.append(self._seq(closers=sep + close))
            if self.pos >= len(self.pattern):
                opener = self.pattern[open_at]
                raise self.fail(f"{opener!r} at position {open_at} is never closed")
            ch = self.pattern[self.pos]
            self.pos += 1
            if ch == close:
                return branches

    def _group(self, kind: str) -> Alt:
        open_at = self.pos  # at the "("
        self.pos += 1
        self.groups += 1
        number = self.groups
        branches = self._alternatives(open_at=open_at, sep="|", close=")")
        return Alt(kind=kind, number=number, branches=branches)

    def _braces(self) -> Alt:
        open_at = self.pos
        self.pos += 1
        branches = self._alternatives(open_at=open_at, sep=",", close="}")
        return Alt(kind="{", number=0, branches=branches)

    def _class(self) -> Class:
        p = self.pattern
        open_at = self.pos
        self.pos += 1
        negated = self.pos < len(p) and p[self.pos] in "!^"
        if negated:
            self.pos += 1
        items: list[str] = []
        first = True
        while True:
            if self.pos >= len(p):
                raise self.fail(f"'[' at position {open_at} is never closed")
            ch = p[self.pos]
            # A "]" first in the class is a member, as in shells: "[]a]".
            if ch == "]" and not first:
                self.pos += 1
                break
            first = False
            lo = self._class_char()
            if self.pos + 1 < len(p) and p[self.pos] == "-" and p[self.pos + 1] != "]":
                self.pos += 1
                hi = self._class_char()
                if hi < lo:
                    raise self.fail(f"range {lo}-{hi} in '[' at position {open_at} is reversed")
                items.append(f"{re.escape(lo)}-{re.escape(hi)}")
            else:
                items.append(re.escape(lo))
        members = "".join(items)
        # A class never matches "/": a glob segment cannot reach into the next one.
        if negated:
            return Class(f"[^/{members}]")
        return Class(f"(?!/)[{members}]")

    def _class_char(self) -> str:
        p = self.pattern
        ch = p[self.pos]
        if ch == "\\":
            if self.pos + 1 >= len(p):
                raise self.fail("ends with a lone '\\' (escape what?)")
            self.pos += 2
            return p[self.pos - 1]
        self.pos += 1
        return ch
