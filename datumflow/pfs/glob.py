"""Pachyderm's glob syntax, compiled to a Python regular expression, with capture groups.

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
from collections.abc import Sequence

import msgspec

from datumflow.errors import SpecError

_EXTGLOB = "@*+?!"


class _Lit(msgspec.Struct):
    text: str


class _Star(msgspec.Struct):
    crosses: bool
    """`**`: the run may hold `/`."""


class _One(msgspec.Struct):
    pass


class _Class(msgspec.Struct):
    regex: str


class _Alt(msgspec.Struct):
    kind: str
    """`{` for braces (not captured), `(` for a plain group, or the extglob operator."""
    number: int
    branches: list[list[_Node]]


_Node = _Lit | _Star | _One | _Class | _Alt


class Glob(msgspec.Struct, frozen=True, kw_only=True):
    """A compiled glob. Build it with `compile_glob`."""

    pattern: str
    """The cleaned glob: absolute, no trailing `/` (except the root glob `/` itself)."""
    groups: int
    """Number of capture groups, i.e. the highest `$n` a template may name."""
    regex: re.Pattern[str]
    program: tuple[tuple, ...] | None
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
            slots = _run(self.program, path, 0, 0, 2 * (self.groups + 1), {})
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
    parser = _Parser(cleaned)
    nodes = parser.parse()
    captured = [False] * (parser.groups + 1)
    ir = ("cat", (_meaning_seq(nodes, rest=_END, capture=True, captured=captured), _END))
    try:
        regex = re.compile(_to_regex(ir), re.DOTALL)
    except re.error as exc:  # pragma: no cover - the parser should have refused it first
        raise SpecError(f"glob {cleaned!r}: cannot be compiled ({exc})") from None
    return Glob(
        pattern=cleaned,
        groups=parser.groups,
        regex=regex,
        program=_assemble(ir) if always_program or _needs_program(ir) else None,
        captured=tuple(captured),
    )


class _Parser:
    """Recursive descent over the cleaned glob; counts groups in order of opening parenthesis."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pos = 0
        self.groups = 0

    def fail(self, what: str) -> SpecError:
        return SpecError(f"glob {self.pattern!r}: {what}")

    def parse(self) -> list[_Node]:
        # At the top level no closer is expected: _seq reports a stray one, or reads to the end.
        return self._seq(closers="")

    def _seq(self, closers: str) -> list[_Node]:
        """Nodes up to the end or to one of `closers` (left unconsumed); any other closer is stray."""
        p = self.pattern
        nodes: list[_Node] = []
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
                nodes.append(_Star(crosses=crosses))
            elif ch == "?":
                self.pos += 1
                nodes.append(_One())
            elif ch == "\\":
                if not nxt:
                    raise self.fail("ends with a lone '\\' (escape what?)")
                self.pos += 2
                nodes.append(_Lit(nxt))
            else:
                self.pos += 1
                nodes.append(_Lit(ch))
        return nodes

    def _alternatives(self, *, open_at: int, sep: str, close: str) -> list[list[_Node]]:
        branches: list[list[_Node]] = []
        while True:
            branches.append(self._seq(closers=sep + close))
            if self.pos >= len(self.pattern):
                opener = self.pattern[open_at]
                raise self.fail(f"{opener!r} at position {open_at} is never closed")
            ch = self.pattern[self.pos]
            self.pos += 1
            if ch == close:
                return branches

    def _group(self, kind: str) -> _Alt:
        open_at = self.pos  # at the "("
        self.pos += 1
        self.groups += 1
        number = self.groups
        branches = self._alternatives(open_at=open_at, sep="|", close=")")
        return _Alt(kind=kind, number=number, branches=branches)

    def _braces(self) -> _Alt:
        open_at = self.pos
        self.pos += 1
        branches = self._alternatives(open_at=open_at, sep=",", close="}")
        return _Alt(kind="{", number=0, branches=branches)

    def _class(self) -> _Class:
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
            return _Class(f"[^/{members}]")
        return _Class(f"(?!/)[{members}]")

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


# ---------------------------------------------------------------------------------------- meaning

# What a glob means, before it becomes a `re` pattern or a program for the fallback matcher:
#   ("lit", text)  ("seg",) a run without "/"  ("any",) any run  ("one",) one char but "/"
#   ("class", regex)  ("cat", items)  ("alt", items)  ("rep", item, least)  ("opt", item)
#   ("group", number, item)  ("notahead", item)  ("end",) the end of the path
_IR = tuple
_END: _IR = ("end",)


def _has_negation(node: _Node) -> bool:
    if not isinstance(node, _Alt):
        return False
    return node.kind == "!" or any(_has_negation(n) for b in node.branches for n in b)


def _meaning_seq(
    nodes: Sequence[_Node], *, rest: _IR, capture: bool, captured: list[bool] | None
) -> _IR:
    """IR for `nodes`, where `rest` is whatever must follow them up to the end of the path: a
    `!(…)` needs it to know what it must not be followed by."""
    out = []
    for i, node in enumerate(nodes):
        after = rest
        if _has_negation(node):
            following = _meaning_seq(nodes[i + 1 :], rest=rest, capture=False, captured=None)
            after = ("cat", (following, rest))
        out.append(_meaning(node, rest=after, capture=capture, captured=captured))
    return ("cat", tuple(out))


def _meaning(node: _Node, *, rest: _IR, capture: bool, captured: list[bool] | None) -> _IR:
    if isinstance(node, _Lit):
        return ("lit", node.text)
    if isinstance(node, _Star):
        return ("any",) if node.crosses else ("seg",)
    if isinstance(node, _One):
        return ("one",)
    if isinstance(node, _Class):
        return ("class", node.regex)
    kind = node.kind
    inner: _IR
    if kind == "!":
        # The body sits in a lookahead, so nothing in it can capture.
        body = _alternation(node.branches, rest=rest, capture=False, captured=None)
        inner = ("cat", (("notahead", ("cat", (body, rest))), ("seg",)))
    elif kind in "*+":
        # Inside a repetition, what follows one round may be more rounds; those are read without
        # their negations (as `*`) to keep the meaning finite.
        loose = ("alt", tuple(_loose(b) for b in node.branches))
        after = ("cat", (("rep", loose, 0), rest))
        body = _alternation(node.branches, rest=after, capture=capture, captured=captured)
        inner = ("rep", body, 1 if kind == "+" else 0)
    else:
        body = _alternation(node.branches, rest=rest, capture=capture, captured=captured)
        inner = ("opt", body) if kind == "?" else body
    if kind != "{" and capture:
        assert captured is not None
        captured[node.number] = True
        return ("group", node.number, inner)
    return inner


def _alternation(
    branches: list[list[_Node]], *, rest: _IR, capture: bool, captured: list[bool] | None
) -> _IR:
    return (
        "alt",
        tuple(_meaning_seq(b, rest=rest, capture=capture, captured=captured) for b in branches),
    )


def _loose(nodes: Sequence[_Node]) -> _IR:
    """Non-capturing IR with every `!(…)` read as `*`."""
    out: list[_IR] = []
    for node in nodes:
        if not isinstance(node, _Alt):
            out.append(_meaning(node, rest=_END, capture=False, captured=None))
        elif node.kind == "!":
            out.append(("seg",))
        else:
            body = ("alt", tuple(_loose(b) for b in node.branches))
            if node.kind in "*+":
                body = ("rep", body, 1 if node.kind == "+" else 0)
            elif node.kind == "?":
                body = ("opt", body)
            out.append(body)
    return ("cat", tuple(out))


def _to_regex(ir: _IR) -> str:
    tag = ir[0]
    if tag == "lit":
        return re.escape(ir[1])
    if tag in _FIXED_REGEX:
        return _FIXED_REGEX[tag]
    if tag == "class":
        return ir[1]
    if tag == "cat":
        return "".join(_to_regex(x) for x in ir[1])
    if tag == "alt":
        return "(?:" + "|".join(_to_regex(x) for x in ir[1]) + ")"
    if tag == "rep":
        return f"(?:{_to_regex(ir[1])})" + ("+" if ir[2] else "*")
    if tag == "opt":
        return f"(?:{_to_regex(ir[1])})?"
    if tag == "group":
        return f"(?P<g{ir[1]}>{_to_regex(ir[2])})"
    assert tag == "notahead", tag
    return f"(?!{_to_regex(ir[1])})"


_FIXED_REGEX = {"seg": "[^/]*", "any": ".*", "one": "[^/]", "end": r"\Z"}


def _needs_program(ir: _IR) -> bool:
    """Whether Python's backtracking `re` could take exponential (or high polynomial) time.

    A repetition whose rounds can split a run more than one way (`+(a|aa)`, `*(*)`) makes `re`
    explore every split; so do many unbounded runs in a row. Those globs go to the program, whose
    time is bounded by its length times the path's.
    """
    runs = 0
    stack = [ir]
    while stack:
        node = stack.pop()
        tag = node[0]
        if tag == "rep":
            return True
        if tag in ("seg", "any"):
            runs += 1
        elif tag in ("cat", "alt"):
            stack.extend(node[1])
        elif tag in ("opt", "notahead"):
            stack.append(node[1])
        elif tag == "group":
            stack.append(node[2])
    return runs > _MAX_RE_RUNS


_MAX_RE_RUNS = 3


# ---------------------------------------------------------------------------------------- program

# The fallback matcher: a backtracking machine that tries alternatives in the same order as `re`
# (so it captures the same), but remembers every (instruction, position) it has already tried. A
# state that failed once fails again (captures never change whether the rest matches), so each is
# tried once and the work is bounded by len(program) * len(path).
#   ("lit", text)  ("one",)  ("class", pattern)  ("run", crosses)  ("split", first, second)
#   ("jmp", to)  ("save", slot)  ("notahead", start)  ("end",)


def _assemble(ir: _IR) -> tuple[tuple, ...]:
    ops: list = []
    lookaheads: list[tuple[int, _IR]] = []

    def emit(node: _IR) -> None:
        tag = node[0]
        if tag == "lit":
            ops.append(("lit", node[1]))
        elif tag in ("seg", "any"):
            ops.append(("run", tag == "any"))
        elif tag == "one":
            ops.append(("one",))
        elif tag == "class":
            ops.append(("class", re.compile(node[1])))
        elif tag == "cat":
            for item in node[1]:
                emit(item)
        elif tag == "alt":
            jumps = []
            items = node[1]
            for item in items[:-1]:
                split = len(ops)
                ops.append(None)
                emit(item)
                jumps.append(len(ops))
                ops.append(None)
                ops[split] = ("split", split + 1, len(ops))
            if items:
                emit(items[-1])
            for jump in jumps:
                ops[jump] = ("jmp", len(ops))
        elif tag == "rep":
            top = len(ops)
            if node[2]:
                emit(node[1])
                ops.append(("split", top, len(ops) + 1))
            else:
                ops.append(None)
                emit(node[1])
                ops.append(("jmp", top))
                ops[top] = ("split", top + 1, len(ops))
        elif tag == "opt":
            split = len(ops)
            ops.append(None)
            emit(node[1])
            ops[split] = ("split", split + 1, len(ops))
        elif tag == "group":
            ops.append(("save", 2 * node[1]))
            emit(node[2])
            ops.append(("save", 2 * node[1] + 1))
        elif tag == "notahead":
            lookaheads.append((len(ops), node[1]))
            ops.append(None)
        else:
            ops.append(("end",))

    emit(ir)
    # Each lookahead's body goes after the main program; it ends with ("end",) like the glob.
    while lookaheads:
        at, body = lookaheads.pop()
        ops[at] = ("notahead", len(ops))
        emit(body)
    return tuple(ops)


def _run(
    ops: tuple[tuple, ...], text: str, pc: int, pos: int, slots: int, seen_ahead: dict
) -> tuple[int, ...] | None:
    """Slots (start and end of each group, -1 when unset) of the first match from (pc, pos)."""
    tried: set[tuple[int, int]] = set()
    stack = [(pc, pos, (-1,) * slots)]
    end = len(text)
    while stack:
        pc, pos, caps = stack.pop()
        while (pc, pos) not in tried:
            tried.add((pc, pos))
            op = ops[pc]
            tag = op[0]
            if tag == "lit":
                if not text.startswith(op[1], pos):
                    break
                pos += len(op[1])
            elif tag == "one":
                if pos >= end or text[pos] == "/":
                    break
                pos += 1
            elif tag == "class":
                if op[1].match(text, pos) is None:
                    break
                pos += 1
            elif tag == "run":
                stop = end if op[1] else text.find("/", pos)
                stop = end if stop < 0 else stop
                # Greedy: go on with the longest run; the shorter ones wait, shortest last.
                stack.extend((pc + 1, p, caps) for p in range(pos, stop))
                pos = stop
            elif tag == "split":
                stack.append((op[2], pos, caps))
                pc = op[1]
                continue
            elif tag == "jmp":
                pc = op[1]
                continue
            elif tag == "save":
                caps = (*caps[: op[1]], pos, *caps[op[1] + 1 :])
            elif tag == "notahead":
                key = (op[1], pos)
                if key not in seen_ahead:
                    seen_ahead[key] = _run(ops, text, op[1], pos, 0, seen_ahead) is not None
                if seen_ahead[key]:
                    break
            elif pos == end:  # "end"
                return caps
            else:
                break
            pc += 1
    return None


# ---------------------------------------------------------------------------------------- templates

_TOKEN = re.compile(r"\$(?:(\$)|(\d+)|\{(\d+)\})")


def _template_tokens(template: str) -> list[tuple[str, int | None]]:
    """The template as (text, group) pairs: group None means literal text. Raises SpecError for a
    `$` that is neither `$$` nor a group reference, rather than guessing what was meant."""
    tokens: list[tuple[str, int | None]] = []
    pos = 0
    while pos < len(template):
        dollar = template.find("$", pos)
        if dollar < 0:
            tokens.append((template[pos:], None))
            break
        if dollar > pos:
            tokens.append((template[pos:dollar], None))
        m = _TOKEN.match(template, dollar)
        if m is None:
            raise SpecError(
                f"template {template!r}: '$' at position {dollar} must be followed by a group"
                " number ($1 or ${1}) or by '$' for a literal '$'"
            )
        if m.group(1):
            tokens.append(("$", None))
        else:
            tokens.append((m.group(0), int(m.group(2) or m.group(3))))
        pos = m.end()
    return tokens


def check_template(template: str, groups: int, where: str, *, glob: str = "") -> None:
    """Raise SpecError (prefixed with `where`) when `template` is malformed or names a group beyond
    `groups`."""
    try:
        tokens = _template_tokens(template)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    for text, group in tokens:
        if group is not None and group > groups:
            if glob:
                raise SpecError(
                    f"{where}: {text} names a capture group the glob {glob!r} does not have"
                )
            raise SpecError(
                f"{where}: {text} names a capture group the glob does not have (it has {groups})"
            )


def expand_template(template: str, captures: Sequence[str]) -> str:
    """Fill `template` from `captures` (as returned by `Glob.match`)."""
    out = []
    for text, group in _template_tokens(template):
        if group is None:
            out.append(text)
        elif group < len(captures):
            out.append(captures[group])
        else:
            raise SpecError(
                f"template {template!r}: {text} names a capture group the match does not have"
                f" (it has {len(captures) - 1})"
            )
    return "".join(out)
