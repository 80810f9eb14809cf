"""What a glob means: its nodes lowered to an intermediate form, then to a Python regular expression.

Owns the meaning of `!(…)` (what `*` matches, where the negated body followed by the rest of the
glob does not match), which groups can capture, the translation to `re`, and the decision whether
`re` could take too long on a glob (`needs_program`), in which case the bounded matcher of
`glob_program` runs it instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, TypeAlias

from datumflow.pfs.glob_syntax import Alt, Class, Lit, Node, One, Star

# What a glob means, before it becomes a `re` pattern or a program for the fallback matcher:
#   ("lit", text)  ("seg",) a run without "/"  ("any",) any run  ("one",) one char but "/"
#   ("class", regex)  ("cat", items)  ("alt", items)  ("rep", item, least)  ("opt", item)
#   ("group", number, item)  ("notahead", item)  ("end",) the end of the path
IR: TypeAlias = (
    tuple[Literal["lit"], str]
    | tuple[Literal["seg"]]
    | tuple[Literal["any"]]
    | tuple[Literal["one"]]
    | tuple[Literal["class"], str]
    | tuple[Literal["cat"], tuple["IR", ...]]
    | tuple[Literal["alt"], tuple["IR", ...]]
    | tuple[Literal["rep"], "IR", int]
    | tuple[Literal["opt"], "IR"]
    | tuple[Literal["group"], int, "IR"]
    | tuple[Literal["notahead"], "IR"]
    | tuple[Literal["end"]]
)
END: IR = ("end",)


def _has_negation(node: Node) -> bool:
    if not isinstance(node, Alt):
        return False
    return node.kind == "!" or any(_has_negation(n) for b in node.branches for n in b)


def meaning_seq(
    nodes: Sequence[Node], *, rest: IR, capture: bool, captured: list[bool] | None
) -> IR:
    """IR for `nodes`, where `rest` is whatever must follow them up to the end of the path: a
    `!(…)` needs it to know what it must not be followed by."""
    out: list[IR] = []
    for i, node in enumerate(nodes):
        after = rest
        if _has_negation(node):
            following = meaning_seq(nodes[i + 1 :], rest=rest, capture=False, captured=None)
            after = ("cat", (following, rest))
        out.append(_meaning(node, rest=after, capture=capture, captured=captured))
    return ("cat", tuple(out))


def _meaning(node: Node, *, rest: IR, capture: bool, captured: list[bool] | None) -> IR:
    if isinstance(node, Lit):
        return ("lit", node.text)
    if isinstance(node, Star):
        return ("any",) if node.crosses else ("seg",)
    if isinstance(node, One):
        return ("one",)
    if isinstance(node, Class):
        return ("class", node.regex)
    kind = node.kind
    inner: IR
    if kind == "!":
        # The body sits in a lookahead, so nothing in it can capture.
        body = _alternation(node.branches, rest=rest, capture=False, captured=None)
        inner = ("cat", (("notahead", ("cat", (body, rest))), ("seg",)))
    elif kind in "*+":
        # Inside a repetition, what follows one round may be more rounds; those are read without
        # their negations (as `*`) to keep the meaning finite.
        loose: IR = ("alt", tuple(_loose(b) for b in node.branches))
        after: IR = ("cat", (("rep", loose, 0), rest))
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
    branches: list[list[Node]], *, rest: IR, capture: bool, captured: list[bool] | None
) -> IR:
    return (
        "alt",
        tuple(meaning_seq(b, rest=rest, capture=capture, captured=captured) for b in branches),
    )


def _loose(nodes: Sequence[Node]) -> IR:
    """Non-capturing IR with every `!(…)` read as `*`."""
    out: list[IR] = []
    for node in nodes:
        if not isinstance(node, Alt):
            out.append(_meaning(node, rest=END, capture=False, captured=None))
        elif node.kind == "!":
            out.append(("seg",))
        else:
            body: IR = ("alt", tuple(_loose(b) for b in node.branches))
            if node.kind in "*+":
                body = ("rep", body, 1 if node.kind == "+" else 0)
            elif node.kind == "?":
                body = ("opt", body)
            out.append(body)
    return ("cat", tuple(out))


def to_regex(ir: IR) -> str:
    # `ir[0] == ...` rather than a `tag` variable: that is what lets the type checker narrow
    # `ir` to the one tuple shape of that tag.
    if ir[0] == "lit":
        return re.escape(ir[1])
    if ir[0] in _FIXED_REGEX:
        return _FIXED_REGEX[ir[0]]
    if ir[0] == "class":
        return ir[1]
    if ir[0] == "cat":
        return "".join(to_regex(x) for x in ir[1])
    if ir[0] == "alt":
        return "(?:" + "|".join(to_regex(x) for x in ir[1]) + ")"
    if ir[0] == "rep":
        return f"(?:{to_regex(ir[1])})" + ("+" if ir[2] else "*")
    if ir[0] == "opt":
        return f"(?:{to_regex(ir[1])})?"
    if ir[0] == "group":
        return f"(?P<g{ir[1]}>{to_regex(ir[2])})"
    assert ir[0] == "notahead", ir[0]
    return f"(?!{to_regex(ir[1])})"


_FIXED_REGEX = {"seg": "[^/]*", "any": ".*", "one": "[^/]", "end": r"\Z"}


def needs_program(ir: IR) -> bool:
    """Whether Python's backtracking `re` could take exponential (or high polynomial) time.

    A repetition whose rounds can split a run more than one way (`+(a|aa)`, `*(*)`) makes `re`
    explore every split; so do many unbounded runs in a row. Those globs go to the program, whose
    time is bounded by its length times the path's.
    """
    runs = 0
    stack = [ir]
    while stack:
        node = stack.pop()
        if node[0] == "rep":
            return True
        if node[0] in ("seg", "any"):
            runs += 1
        elif node[0] == "cat" or node[0] == "alt":
            stack.extend(node[1])
        elif node[0] == "opt" or node[0] == "notahead":
            stack.append(node[1])
        elif node[0] == "group":
            stack.append(node[2])
    return runs > _MAX_RE_RUNS


_MAX_RE_RUNS = 3
