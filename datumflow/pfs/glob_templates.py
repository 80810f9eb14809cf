"""Capture templates (`join_on`, `group_by`): `$1` or `${1}` names a capture, `$0` the whole path,
`$$` a `$`.

Owns parsing a template, checking it against the groups a glob has, and filling it from a match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from datumflow.errors import SpecError

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
