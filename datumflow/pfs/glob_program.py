"""The bounded glob matcher: a backtracking machine whose time is bounded by program times path.

Owns the program form of a glob (assembled from the intermediate form of `glob_compile`) and
running it to the captures of a match; used for the globs on which Python's `re` could take
exponential time.
"""

from __future__ import annotations

import re
from typing import Literal, TypeAlias

from datumflow.pfs.glob_compile import IR

# The fallback matcher: a backtracking machine that tries alternatives in the same order as `re`
# (so it captures the same), but remembers every (instruction, position) it has already tried. A
# state that failed once fails again (captures never change whether the rest matches), so each is
# tried once and the work is bounded by len(program) * len(path).
#   ("lit", text)  ("one",)  ("class", pattern)  ("run", crosses)  ("split", first, second)
#   ("jmp", to)  ("save", slot)  ("notahead", start)  ("end",)
Op: TypeAlias = (
    tuple[Literal["lit"], str]
    | tuple[Literal["one"]]
    | tuple[Literal["class"], re.Pattern[str]]
    | tuple[Literal["run"], bool]
    | tuple[Literal["split"], int, int]
    | tuple[Literal["jmp"], int]
    | tuple[Literal["save"], int]
    | tuple[Literal["notahead"], int]
    | tuple[Literal["end"]]
)
Program: TypeAlias = tuple[Op, ...]
_HOLE: Op = ("jmp", -1)
"""A place kept for a split, jump or lookahead whose target is not known yet; always filled."""


def assemble(ir: IR) -> Program:
    ops: list[Op] = []
    lookaheads: list[tuple[int, IR]] = []

    # `node[0] == ...` rather than a `tag` variable: that is what lets the type checker narrow
    # `node` to the one tuple shape of that tag.
    def emit(node: IR) -> None:
        if node[0] == "lit":
            ops.append(("lit", node[1]))
        elif node[0] in ("seg", "any"):
            ops.append(("run", node[0] == "any"))
        elif node[0] == "one":
            ops.append(("one",))
        elif node[0] == "class":
            ops.append(("class", re.compile(node[1])))
        elif node[0] == "cat":
            for item in node[1]:
                emit(item)
        elif node[0] == "alt":
            jumps = []
            items = node[1]
            for item in items[:-1]:
                split = len(ops)
                ops.append(_HOLE)
                emit(item)
                jumps.append(len(ops))
                ops.append(_HOLE)
                ops[split] = ("split", split + 1, len(ops))
            if items:
                emit(items[-1])
            for jump in jumps:
                ops[jump] = ("jmp", len(ops))
        elif node[0] == "rep":
            top = len(ops)
            if node[2]:
                emit(node[1])
                ops.append(("split", top, len(ops) + 1))
            else:
                ops.append(_HOLE)
                emit(node[1])
                ops.append(("jmp", top))
                ops[top] = ("split", top + 1, len(ops))
        elif node[0] == "opt":
            split = len(ops)
            ops.append(_HOLE)
            emit(node[1])
            ops[split] = ("split", split + 1, len(ops))
        elif node[0] == "group":
            ops.append(("save", 2 * node[1]))
            emit(node[2])
            ops.append(("save", 2 * node[1] + 1))
        elif node[0] == "notahead":
            lookaheads.append((len(ops), node[1]))
            ops.append(_HOLE)
        else:
            ops.append(("end",))

    emit(ir)
    # Each lookahead's body goes after the main program; it ends with ("end",) like the glob.
    while lookaheads:
        at, body = lookaheads.pop()
        ops[at] = ("notahead", len(ops))
        emit(body)
    return tuple(ops)


def run(
    ops: Program,
    text: str,
    pc: int,
    pos: int,
    slots: int,
    seen_ahead: dict[tuple[int, int], bool],
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
            if op[0] == "lit":
                if not text.startswith(op[1], pos):
                    break
                pos += len(op[1])
            elif op[0] == "one":
                if pos >= end or text[pos] == "/":
                    break
                pos += 1
            elif op[0] == "class":
                if op[1].match(text, pos) is None:
                    break
                pos += 1
            elif op[0] == "run":
                stop = end if op[1] else text.find("/", pos)
                stop = end if stop < 0 else stop
                # Greedy: go on with the longest run; the shorter ones wait, shortest last.
                stack.extend((pc + 1, p, caps) for p in range(pos, stop))
                pos = stop
            elif op[0] == "split":
                stack.append((op[2], pos, caps))
                pc = op[1]
                continue
            elif op[0] == "jmp":
                pc = op[1]
                continue
            elif op[0] == "save":
                caps = (*caps[: op[1]], pos, *caps[op[1] + 1 :])
            elif op[0] == "notahead":
                key = (op[1], pos)
                if key not in seen_ahead:
                    seen_ahead[key] = run(ops, text, op[1], pos, 0, seen_ahead) is not None
                if seen_ahead[key]:
                    break
            elif pos == end:  # "end"
                return caps
            else:
                break
            pc += 1
    return None
