"""The glob matcher and capture templates, table-driven."""

from __future__ import annotations

import pytest

from datumflow.errors import SpecError
from datumflow.pfs.glob import (
    _build,
    check_template,
    clean_pattern,
    compile_glob,
    expand_template,
)


@pytest.mark.parametrize(
    ("pattern", "cleaned"),
    [
        ("", "/"),
        ("/", "/"),
        ("*", "/*"),
        ("a/*.txt", "/a/*.txt"),
        ("/a/", "/a"),
        ("/a/*/", "/a/*"),
        ("//", "/"),
    ],
)
def test_clean_pattern(pattern: str, cleaned: str) -> None:
    assert clean_pattern(pattern) == cleaned
    assert compile_glob(pattern).pattern == cleaned


# (glob, path, captures or None). Captures: [0] is the whole path.
MATCHES = [
    # The root: only "/" matches it, and "/" matches nothing else.
    ("/", "/", ["/"]),
    ("", "/", ["/"]),
    ("/", "/a", None),
    ("/*", "/", None),
    ("/**", "/", None),
    # * stays within a segment.
    ("/*", "/a", ["/a"]),
    ("/*", "/a.txt", ["/a.txt"]),
    ("/*", "/a/b", None),
    ("/*.txt", "/a.txt", ["/a.txt"]),
    ("/*.txt", "/a.csv", None),
    ("/*/*", "/a/b", ["/a/b"]),
    ("/*/*", "/a", None),
    ("/*/*", "/a/b/c", None),
    # ** crosses "/", and may be empty.
    ("/**", "/a/b/c", ["/a/b/c"]),
    ("/**.txt", "/a/b/c.txt", ["/a/b/c.txt"]),
    ("/**test*.txt", "/test1.txt", ["/test1.txt"]),
    ("/**test*.txt", "/foo-2/foo-2_1/anothertest.txt", ["/foo-2/foo-2_1/anothertest.txt"]),
    ("/**test*.txt", "/foo-2/foo-2_1/nope3.txt", None),
    ("/a/**/z", "/a/b/c/z", ["/a/b/c/z"]),
    ("/a/**/z", "/a/z", None),
    # ? is one character, never "/".
    ("/?.txt", "/a.txt", ["/a.txt"]),
    ("/?.txt", "/ab.txt", None),
    ("/a?b", "/a/b", None),
    # Classes.
    ("/[abc].txt", "/b.txt", ["/b.txt"]),
    ("/[abc].txt", "/d.txt", None),
    ("/[!abc].txt", "/d.txt", ["/d.txt"]),
    ("/[!abc].txt", "/a.txt", None),
    ("/[^abc].txt", "/d.txt", ["/d.txt"]),
    ("/[a-c]", "/b", ["/b"]),
    ("/[a-c]", "/d", None),
    ("/[0-9][0-9]", "/42", ["/42"]),
    ("/[-a]", "/-", ["/-"]),
    ("/[a-]", "/-", ["/-"]),
    ("/[]a]", "/]", ["/]"]),
    ("/a[!x]b", "/a/b", None),
    ("/a[!-0]b", "/a/b", None),
    ("/a[.-0]b", "/a/b", None),
    ("/[*]", "/*", ["/*"]),
    ("/[*]", "/a", None),
    # Braces: alternatives, not captured.
    ("/{a,b}.txt", "/a.txt", ["/a.txt"]),
    ("/{a,b}.txt", "/b.txt", ["/b.txt"]),
    ("/{a,b}.txt", "/c.txt", None),
    ("/{a,}x", "/x", ["/x"]),
    ("/{a,{b,c}d}", "/cd", ["/cd"]),
    ("/{*.txt,*.csv}", "/x.csv", ["/x.csv"]),
    ("/a,b", "/a,b", ["/a,b"]),
    # Escapes and characters that are special only before "(".
    (r"/\*", "/*", ["/*"]),
    (r"/\*", "/a", None),
    (r"/\[x\]", "/[x]", ["/[x]"]),
    ("/a+b@c!d", "/a+b@c!d", ["/a+b@c!d"]),
    ("/a.b", "/axb", None),
    ("/a|b", "/a|b", ["/a|b"]),
    ("/$x^", "/$x^", ["/$x^"]),
    # The documentation's capture examples, on /foo/bar-123/ABC.txt.
    ("/(*)", "/foo", ["/foo", "foo"]),
    ("/*/bar-(*)", "/foo/bar-123", ["/foo/bar-123", "123"]),
    ("/(*)/*/(??)*.txt", "/foo/bar-123/ABC.txt", ["/foo/bar-123/ABC.txt", "foo", "AB"]),
    ("/*/(bar-(123))/*", "/foo/bar-123/ABC.txt", ["/foo/bar-123/ABC.txt", "bar-123", "123"]),
    # Plain groups with alternatives.
    ("/(a|b)", "/b", ["/b", "b"]),
    ("/(a|b)", "/c", None),
    ("/(a,b)", "/a,b", ["/a,b", "a,b"]),
    ("/()x", "/x", ["/x", ""]),
    # Extglob.
    ("/@(a|bc).txt", "/bc.txt", ["/bc.txt", "bc"]),
    ("/@(a|bc).txt", "/abc.txt", None),
    ("/?(a|b)x", "/x", ["/x", ""]),
    ("/?(a|b)x", "/ax", ["/ax", "a"]),
    ("/?(a|b)x", "/abx", None),
    ("/*(ab|c)x", "/x", ["/x", ""]),
    ("/*(ab|c)x", "/abcabx", ["/abcabx", "abcab"]),
    ("/*(ab|c)x", "/abbx", None),
    ("/+(ab|c)x", "/x", None),
    ("/+(ab|c)x", "/cabx", ["/cabx", "cab"]),
    ("/!(*.txt)", "/a.csv", ["/a.csv", "a.csv"]),
    ("/!(*.txt)", "/a.txt", None),
    ("/!(a|b)", "/c", ["/c", "c"]),
    ("/!(a|b)", "/a", None),
    ("/!(a|b)", "/ab", ["/ab", "ab"]),
    ("/!(a)/x", "/b/x", ["/b/x", "b"]),
    ("/!(a)/x", "/a/x", None),
    ("/!(a)/x", "/b/c/x", None),
    ("/!(foo).txt", "/foo.txt", None),
    ("/!(foo).txt", "/bar.txt", ["/bar.txt", "bar"]),
    ("/data/!(skip*)/(*)", "/data/keep/f", ["/data/keep/f", "keep", "f"]),
    ("/data/!(skip*)/(*)", "/data/skip1/f", None),
    # Groups inside !(…) are numbered but capture nothing.
    ("/!((a))(*)", "/b", ["/b", "b", "", ""]),
    # A group that takes no part captures "".
    ("/(a)|(b)", "/(a)|(b)", None),
    ("/@((a)|(b))", "/b", ["/b", "b", "", "b"]),
    # Nesting, numbered by opening parenthesis.
    ("/((a)(b))(c)", "/abc", ["/abc", "ab", "a", "b", "c"]),
    ("/{x,(y)}(z)", "/yz", ["/yz", "y", "z"]),
    ("/{x,(y)}(z)", "/xz", ["/xz", "", "z"]),
    ("/*(a|!(b))c", "/ac", ["/ac", "a", ""]),
    ("/*(a|!(b))c", "/bc", None),
    # Paths are cleaned like globs: a directory may be given as "/dir/".
    ("/C*", "/California/", ["/California"]),
    ("/C*", "California", ["/California"]),
    # Names with newlines or regex metacharacters are plain text.
    ("/*", "/a\nb", ["/a\nb"]),
    ("/**", "/a\n/b", ["/a\n/b"]),
    ("/(.*)", "/x", None),
    ("/(.*)", "/.anything", ["/.anything", ".anything"]),
]


@pytest.mark.parametrize(("pattern", "path", "captures"), MATCHES)
def test_match(pattern: str, path: str, captures: list[str] | None) -> None:
    assert compile_glob(pattern).match(path) == captures


@pytest.mark.parametrize(("pattern", "path", "captures"), MATCHES)
def test_fallback_matcher_agrees(pattern: str, path: str, captures: list[str] | None) -> None:
    glob = _build(pattern, always_program=True)
    assert glob.program is not None
    assert glob.match(path) == captures


@pytest.mark.parametrize(
    ("pattern", "uses_program"),
    [
        ("/*", False),
        ("/*/*.txt", False),
        ("/(*)/@(a|b)/?(x)", False),
        ("/!(*.txt)", False),
        ("/+([0-9])", True),
        ("/*(a|b)", True),
        ("/*a*a*a*b", True),
        ("/**/**/**/**", True),
    ],
)
def test_which_matcher(pattern: str, uses_program: bool) -> None:
    assert (compile_glob(pattern).program is not None) is uses_program


LONG = "a" * 400


@pytest.mark.parametrize(
    ("pattern", "failing", "matching"),
    [
        # Python's re would take longer than any test timeout on the failing paths.
        ("/+(a|aa)x", f"/{LONG}", f"/{LONG}x"),
        ("/*(*)x", f"/{LONG}", f"/{LONG}x"),
        ("/*(a*)x", f"/{LONG}", f"/{LONG}x"),
        ("/*a*a*a*a*a*b", f"/{LONG}", f"/{LONG}b"),
        ("/**a**a**a**a**b", "/" + "a/" * 200, "/" + "a/" * 200 + "b"),
    ],
)
def test_pathological_globs_take_bounded_time(pattern: str, failing: str, matching: str) -> None:
    glob = compile_glob(pattern)
    assert glob.match(failing) is None
    # The repeated group, where there is one, captures the whole run of "a"s.
    assert glob.match(matching) == ([matching, LONG] if glob.groups else [matching])


@pytest.mark.parametrize(
    ("pattern", "groups"),
    [
        ("/", 0),
        ("/*", 0),
        ("/{a,b}", 0),
        ("/(*)", 1),
        ("/*/(bar-(123))/*", 2),
        ("/@(a)*(b)+(c)?(d)!(e)(f)", 6),
        ("/!((a)(b))", 3),
    ],
)
def test_group_count(pattern: str, groups: int) -> None:
    assert compile_glob(pattern).groups == groups


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("/[abc", "glob '/[abc': '[' at position 1 is never closed"),
        ("/[]", "glob '/[]': '[' at position 1 is never closed"),
        ("/[!", "glob '/[!': '[' at position 1 is never closed"),
        ("/a]", "glob '/a]': ']' at position 2 has no matching opening bracket"),
        ("/(a", "glob '/(a': '(' at position 1 is never closed"),
        ("/@(a|b", "glob '/@(a|b': '(' at position 2 is never closed"),
        ("/a)", "glob '/a)': ')' at position 2 has no matching opening bracket"),
        ("/((a)", "glob '/((a)': '(' at position 1 is never closed"),
        ("/{a,b", "glob '/{a,b': '{' at position 1 is never closed"),
        ("/a}", "glob '/a}': '}' at position 2 has no matching opening bracket"),
        ("/{a)}", "glob '/{a)}': ')' at position 3 has no matching opening bracket"),
        ("/(a}", "glob '/(a}': '}' at position 3 has no matching opening bracket"),
        ("/[z-a]", "glob '/[z-a]': range z-a in '[' at position 1 is reversed"),
        ("/a\\", "glob '/a\\\\': ends with a lone '\\' (escape what?)"),
        ("/[a\\", "glob '/[a\\\\': ends with a lone '\\' (escape what?)"),
    ],
)
def test_bad_globs(pattern: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        compile_glob(pattern)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("template", "captures", "expected"),
    [
        ("", ["/x", "a"], ""),
        ("plain", ["/x", "a"], "plain"),
        ("$1", ["/x", "a"], "a"),
        ("${1}", ["/x", "a"], "a"),
        ("$0", ["/x", "a"], "/x"),
        ("$$", ["/x", "a"], "$"),
        ("$$1", ["/x", "a"], "$1"),
        ("${1}0", ["/x", "a"], "a0"),
        ("$2-$1", ["/x", "a", "b"], "b-a"),
        ("pre-${2}-$1-post", ["/x", "a", "b"], "pre-b-a-post"),
        ("$10", ["/x", *"abcdefghij"], "j"),
    ],
)
def test_expand_template(template: str, captures: list[str], expected: str) -> None:
    assert expand_template(template, captures) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("$2", "template '$2': $2 names a capture group the match does not have (it has 1)"),
        (
            "$x",
            "template '$x': '$' at position 0 must be followed by a group number ($1 or ${1})"
            " or by '$' for a literal '$'",
        ),
        (
            "a$",
            "template 'a$': '$' at position 1 must be followed by a group number ($1 or ${1})"
            " or by '$' for a literal '$'",
        ),
        (
            "${1",
            "template '${1': '$' at position 0 must be followed by a group number ($1 or"
            " ${1}) or by '$' for a literal '$'",
        ),
    ],
)
def test_expand_template_errors(template: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        expand_template(template, ["/x", "a"])
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("template", "groups"),
    [("", 0), ("$0", 0), ("$$", 0), ("$1", 1), ("${2}-$1", 2), ("lit", 0)],
)
def test_check_template_accepts(template: str, groups: int) -> None:
    check_template(template, groups, "input.pfs.join_on")


@pytest.mark.parametrize(
    ("template", "groups", "glob", "message"),
    [
        (
            "$2",
            1,
            "/(*).txt",
            "input.join[1].pfs.join_on: $2 names a capture group the glob '/(*).txt' does not have",
        ),
        (
            "${3}",
            2,
            "",
            "input.join[1].pfs.join_on: ${3} names a capture group the glob does not have"
            " (it has 2)",
        ),
        (
            "$1",
            0,
            "/*",
            "input.join[1].pfs.join_on: $1 names a capture group the glob '/*' does not have",
        ),
        (
            "$q",
            5,
            "/*",
            "input.join[1].pfs.join_on: template '$q': '$' at position 0 must be"
            " followed by a group number ($1 or ${1}) or by '$' for a literal '$'",
        ),
    ],
)
def test_check_template_rejects(template: str, groups: int, glob: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        check_template(template, groups, "input.join[1].pfs.join_on", glob=glob)
    assert str(info.value) == message
