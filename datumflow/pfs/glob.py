"""Pachyderm's glob syntax, compiled to a Python regular expression, with capture groups.

Owns `Glob`, a compiled glob, and matching a path with it to its captures. The parts: the parser
in `glob_syntax`, the meaning and the `re` form in `glob_compile`, the bounded matcher in
`glob_program`, capture templates in `glob_templates` (re-exported here).

Syntax: `*` any run of characters except `/`; `**` any run, `/` included; `?` one character except
`/`; `[abc]`, `[!abc]` (or `[^abc]`), `[a-c]`; `{a,b}` alternatives; `\\x` a literal `x`; and the
extglob groups `@(a|b)` one of, `?(a|b)` at most one, `*(a|b)` any number, `+(a|b)` at least one,
`!(a|b)` anything but, and plain `(a|b)`. Every parenthesised group, extglob or plain, is a capture
group, numbered by its opening parenthesis; a repeated group captures its whole run.

`!(x)` matches what `*` matches, at a place where `x` followed by the rest of the glob does not
match the rest of the path. Python's `re` cannot express the exact complement, and this reading is the
one users expect (`/!(*.txt)` is every top-level name not ending in `.txt`).

A glob is user input and the planner must not hang on it: Python's backtracking `re` takes
exponential time on some (`/+(a|aa)x` against a long run of `a`s). Globs with repeated groups or many
`*` go to a small matcher of our own whose time is bounded; the rest use `re`, which is faster.

Templates (`join_on`, `group_by`) name captures: `$1` or `${1}`, `$0` the whole path, `$$` a `$`.
"""

from __future__ import annotations

import functools
import re

import msgspec

from datumflow.errors import SpecError
from datumflow.pfs.glob_compile import END, IR, meaning_seq, needs_program, to_regex
from datumflow.pfs.glob_program import Program, assemble, run
from datumflow.pfs.glob_syntax import Parser
from datumflow.pfs.glob_templates import check_template, expand_template

__all__ = ["Glob", "check_template", "clean_pattern", "compile_glob", "expand_template"]


class Glob(msgspec.Struct, frozen=True, kw_only=True):
    """A compiled glob. Build it with `compile_glob`."""

    pattern: str
    """The cleaned glob: absolute, no trailing `/` (except the root glob `/` itself)."""
    groups: int
    """Number of capture groups, i.e. the highest `$n` a template may name."""
    regex: re.Pattern[str]
    program: Program | None
    """The fallback matcher's program, for globs `re` could take too long on; else None."""
    captured: tuple[bool, ...]
    """Per group number (1-based, index 0 unused): whether the regex has it. Groups inside `!(…)`
    live in a lookahead and never capture anything."""

    @property
    def root_only(self) -> bool:
        return self.pattern == "/"

    def match(self, path: str) -> list[str] | None:
        """Captures of `path` (`[0]` is the whole path, then group 1, 2, …), or None.

        A group that took no part in the match captures "". The root has no name, so only the glob
        `/` matches it, and that glob matches nothing else.
        """
        path = clean_pattern(path)
        if path == "/":
            return ["/"] + [""] * self.groups if self.root_only else None
        if self.program is not None:
            slots = run(self.program, path, 0, 0, 2 * (self.groups + 1), {})
            if slots is None:
                return None
            return [path] + [
                path[slots[2 * n] : slots[2 * n + 1]] if slots[2 * n] >= 0 else ""
                for n in range(1, self.groups + 1)
            ]
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        return [m.group(0)] + [
            (m.group(f"g{n}") or "") if self.captured[n] else "" for n in range(1, self.groups + 1)
        ]


def clean_pattern(pattern: str) -> str:
    """`""` means `/`; a missing leading `/` is added and a trailing `/` dropped."""
    if not pattern.startswith("/"):
        pattern = "/" + pattern
    if len(pattern) > 1 and pattern.endswith("/"):
        pattern = pattern.rstrip("/") or "/"
    return pattern


@functools.lru_cache(maxsize=512)
def compile_glob(pattern: str) -> Glob:
    """Compile a glob; raises SpecError saying what is wrong and where. Cached: a Glob is immutable."""
    return _build(pattern, always_program=False)


def _build(pattern: str, *, always_program: bool) -> Glob:
    """`always_program` lets the tests check that both matchers agree."""
    cleaned = clean_pattern(pattern)
    parser = Parser(cleaned)
    nodes = parser.parse()
    captured = [False] * (parser.groups + 1)
    ir: IR = ("cat", (meaning_seq(nodes, rest=END, capture=True, captured=captured), END))
    try:
        regex = re.compile(to_regex(ir), re.DOTALL)
    except re.error as exc:  # pragma: no cover - the parser should have refused it first
        raise SpecError(f"glob {cleaned!r}: cannot be compiled ({exc})") from None
    return Glob(
        pattern=cleaned,
        groups=parser.groups,
        regex=regex,
        program=assemble(ir) if always_program or needs_program(ir) else None,
        captured=tuple(captured),
    )
