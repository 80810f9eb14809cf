"""Datum enumeration, ids and hashes, and input checks: exact datum lists, table-driven."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from datumflow.broker.messages import DatumInput, FileRef, ObjectSource
from datumflow.errors import PermanentError, SpecError
from datumflow.pfs.datums import (
    Leaf,
    check_input,
    datum_hash,
    datum_id,
    enumerate_datums,
    match_files,
)
from datumflow.pfs.glob import compile_glob
from datumflow.spec import Input, input_leaves, input_name, load_spec

# A datum, summarised: one (input name, root, paths) per input.
Part = tuple[str, str, tuple[str, ...]]


def refs(paths: list[str]) -> list[FileRef]:
    return [FileRef(path=p, size=len(p), hash="h" + p) for p in sorted(paths)]


def make_input(tree: dict[str, Any]) -> Input:
    return msgspec.convert(tree, Input)


def pfs(repo: str, glob: str, **fields: Any) -> dict[str, Any]:
    return {"pfs": {"repo": repo, "glob": glob, **fields}}


def run(tree: dict[str, Any], files: dict[str, list[str]]) -> list[list[Part]]:
    """Enumerate `tree` with `files[input name]` as each leaf's commit."""
    inp = make_input(tree)
    leaves = [
        Leaf(
            name=input_name(p),
            repo=p.repo,
            branch=p.branch,
            commit="c-" + p.repo,
            files=refs(files[input_name(p)]),
        )
        for p in input_leaves(inp)
    ]
    return [
        [(d.name, d.root, tuple(f.path for f in d.files)) for d in datum]
        for datum in enumerate_datums(inp, leaves)
    ]


def files_datums(name: str, paths: list[str]) -> list[list[Part]]:
    """One datum per file."""
    return [[(name, p, (p,))] for p in paths]


# ------------------------------------------------------------------------- the documentation's

TEST_TREE = [
    "/nope1.txt",
    "/test1.txt",
    "/foo-1/nope2.txt",
    "/foo-1/test2.txt",
    "/foo-2/foo-2_1/nope3.txt",
    "/foo-2/foo-2_1/test3.txt",
    "/foo-2/foo-2_1/anothertest.txt",
]

STATES = [
    "/California/la.json",
    "/California/sf.json",
    "/Colorado/denver.json",
    "/Washington/seattle.json",
    "/Washington/spokane.json",
]
CA = ("/California/la.json", "/California/sf.json")
CO = ("/Colorado/denver.json",)
WA = ("/Washington/seattle.json", "/Washington/spokane.json")

A_FILES = ["/1.txt", "/2.txt", "/3.txt"]
B_FILES = ["/4.txt", "/5.txt", "/6.txt"]

READINGS = [f"/ID1234/file{i}.txt" for i in range(1, 6)]
PARAMETERS = [f"/file{i}.txt" for i in range(1, 9)]

LIPID = [
    f"/LIPID-patientID{p}-labID{lab}.txt"
    for p, lab in zip([1, 2, 1, 3, 1, 2], [1, 1, 2, 3, 3, 3], strict=True)
]


def _joined(outer: tuple[int, ...]) -> list[list[Part]]:
    matched = [
        [
            ("readings", f"/ID1234/file{i}.txt", (f"/ID1234/file{i}.txt",)),
            ("parameters", f"/file{i}.txt", (f"/file{i}.txt",)),
        ]
        for i in range(1, 6)
    ]
    alone = [[("parameters", f"/file{i}.txt", (f"/file{i}.txt",))] for i in outer]
    return matched + alone


def _readings_join(*, outer_readings: bool = False, outer_parameters: bool = False) -> dict:
    return {
        "join": [
            pfs("readings", "/*/(*).txt", join_on="$1", outer_join=outer_readings),
            pfs("parameters", "/(*).txt", join_on="$1", outer_join=outer_parameters),
        ]
    }


DOC_CASES = [
    pytest.param(
        pfs("data", "/**test*.txt"),
        {"data": TEST_TREE},
        files_datums(
            "data",
            [
                "/foo-1/test2.txt",
                "/foo-2/foo-2_1/anothertest.txt",
                "/foo-2/foo-2_1/test3.txt",
                "/test1.txt",
            ],
        ),
        id="globstar-test-files",
    ),
    pytest.param(
        pfs("states", "/"),
        {"states": STATES},
        [[("states", "/", tuple(sorted(STATES)))]],
        id="states-root",
    ),
    pytest.param(
        pfs("states", "/*"),
        {"states": STATES},
        [
            [("states", "/California/", CA)],
            [("states", "/Colorado/", CO)],
            [("states", "/Washington/", WA)],
        ],
        id="states-star",
    ),
    pytest.param(
        pfs("states", "/C*"),
        {"states": STATES},
        [[("states", "/California/", CA)], [("states", "/Colorado/", CO)]],
        id="states-C-star",
    ),
    pytest.param(
        pfs("states", "/*/*"),
        {"states": STATES},
        files_datums("states", sorted(STATES)),
        id="states-star-star",
    ),
    pytest.param(
        {"union": [pfs("A", "/*"), pfs("B", "/*")]},
        {"A": A_FILES, "B": B_FILES},
        files_datums("A", A_FILES) + files_datums("B", B_FILES),
        id="union-6",
    ),
    pytest.param(
        {"cross": [pfs("A", "/*"), pfs("B", "/*")]},
        {"A": A_FILES, "B": B_FILES},
        [[("A", a, (a,)), ("B", b, (b,))] for a in A_FILES for b in B_FILES],
        id="cross-9",
    ),
    pytest.param(
        _readings_join(),
        {"readings": READINGS, "parameters": PARAMETERS},
        _joined(()),
        id="join-5",
    ),
    pytest.param(
        _readings_join(outer_parameters=True),
        {"readings": READINGS, "parameters": PARAMETERS},
        _joined((6, 7, 8)),
        id="join-outer-parameters-8",
    ),
    pytest.param(
        {"group": [pfs("labs", "/*-(*)-lab*.txt", group_by="$1")]},
        {"labs": LIPID},
        [
            [
                ("labs", p, (p,))
                for p in [
                    "/LIPID-patientID1-labID1.txt",
                    "/LIPID-patientID1-labID2.txt",
                    "/LIPID-patientID1-labID3.txt",
                ]
            ],
            [
                ("labs", p, (p,))
                for p in ["/LIPID-patientID2-labID1.txt", "/LIPID-patientID2-labID3.txt"]
            ],
            [("labs", "/LIPID-patientID3-labID3.txt", ("/LIPID-patientID3-labID3.txt",))],
        ],
        id="group-lipid-3-2-1",
    ),
]


@pytest.mark.parametrize(("tree", "files", "expected"), DOC_CASES)
def test_documentation_examples(
    tree: dict, files: dict[str, list[str]], expected: list[list[Part]]
) -> None:
    assert run(tree, files) == expected


# ------------------------------------------------------------------------- one input

NESTED = ["/a/b/c.txt", "/a/d.txt", "/e.txt"]

SINGLE_CASES = [
    pytest.param(
        "/**",
        NESTED,
        [
            ("/a/", ("/a/b/c.txt", "/a/d.txt")),
            ("/a/b/", ("/a/b/c.txt",)),
            ("/a/b/c.txt", ("/a/b/c.txt",)),
            ("/a/d.txt", ("/a/d.txt",)),
            ("/e.txt", ("/e.txt",)),
        ],
        id="globstar-dirs-and-files",
    ),
    pytest.param(
        "/*", NESTED, [("/a/", ("/a/b/c.txt", "/a/d.txt")), ("/e.txt", ("/e.txt",))], id="star"
    ),
    pytest.param(
        "/*/*", NESTED, [("/a/b/", ("/a/b/c.txt",)), ("/a/d.txt", ("/a/d.txt",))], id="star-star"
    ),
    pytest.param("/a/b", NESTED, [("/a/b/", ("/a/b/c.txt",))], id="one-directory"),
    pytest.param("/a/b/", NESTED, [("/a/b/", ("/a/b/c.txt",))], id="trailing-slash"),
    pytest.param("a/b", NESTED, [("/a/b/", ("/a/b/c.txt",))], id="no-leading-slash"),
    pytest.param("", NESTED, [("/", tuple(NESTED))], id="empty-glob-is-root"),
    pytest.param("/*.txt", NESTED, [("/e.txt", ("/e.txt",))], id="files-only"),
    pytest.param("/nothing", NESTED, [], id="no-match"),
    pytest.param("/*", [], [], id="empty-commit"),
    pytest.param("/", [], [], id="empty-commit-root"),
    pytest.param(
        # "-" sorts before "/", so /a-c.txt comes before the directory /a: roots keep that order.
        "/*",
        ["/a-c.txt", "/a/x", "/a/y/z", "/a0"],
        [("/a-c.txt", ("/a-c.txt",)), ("/a/", ("/a/x", "/a/y/z")), ("/a0", ("/a0",))],
        id="sorted-subtree-order",
    ),
    pytest.param(
        "/**/*.txt",
        ["/x/a.txt/inner", "/x/b.txt"],
        [("/x/a.txt/", ("/x/a.txt/inner",)), ("/x/b.txt", ("/x/b.txt",))],
        id="directory-named-like-a-file",
    ),
    pytest.param(
        "/d*/**",
        ["/d1/a/b", "/d1/c", "/e/f"],
        [
            ("/d1/a/", ("/d1/a/b",)),
            ("/d1/a/b", ("/d1/a/b",)),
            ("/d1/c", ("/d1/c",)),
        ],
        id="nested-matched-directories",
    ),
]


@pytest.mark.parametrize(("glob", "paths", "expected"), SINGLE_CASES)
def test_single_input(glob: str, paths: list[str], expected: list[tuple]) -> None:
    assert run(pfs("in", glob), {"in": paths}) == [[("in", r, f)] for r, f in expected]


def test_datum_inputs_carry_the_leaf() -> None:
    inp = make_input(pfs("images", "/*", name="pics", branch="dev"))
    leaf = Leaf(name="pics", repo="images", branch="dev", commit="abc", files=refs(["/x.png"]))
    assert list(enumerate_datums(inp, [leaf])) == [
        [
            DatumInput(
                name="pics",
                repo="images",
                branch="dev",
                commit="abc",
                files=[FileRef(path="/x.png", size=6, hash="h/x.png")],
                root="/x.png",
            )
        ]
    ]


def test_match_files_captures() -> None:
    got = list(match_files(compile_glob("/(*)/(*).json"), refs(STATES)))
    assert [(m.root, m.captures) for m in got] == [
        ("/California/la.json", ["/California/la.json", "California", "la"]),
        ("/California/sf.json", ["/California/sf.json", "California", "sf"]),
        ("/Colorado/denver.json", ["/Colorado/denver.json", "Colorado", "denver"]),
        ("/Washington/seattle.json", ["/Washington/seattle.json", "Washington", "seattle"]),
        ("/Washington/spokane.json", ["/Washington/spokane.json", "Washington", "spokane"]),
    ]
    # A directory's captures are taken from its path without the trailing slash.
    got = list(match_files(compile_glob("/(C*)"), refs(STATES)))
    assert [(m.root, m.captures) for m in got] == [
        ("/California/", ["/California", "California"]),
        ("/Colorado/", ["/Colorado", "Colorado"]),
    ]


@pytest.mark.parametrize(
    "paths",
    [["/b", "/a"], ["/a", "/a"], ["/a/b", "/a"], ["relative"]],
    ids=["unsorted", "repeated", "parent-after-child", "relative"],
)
def test_files_must_be_sorted_and_absolute(paths: list[str]) -> None:
    files = [FileRef(path=p) for p in paths]
    with pytest.raises(PermanentError):
        list(match_files(compile_glob("/**"), files))


class CountingFiles:
    """A one-shot generator of many files that records how far it was read."""

    def __init__(self, paths: Iterator[str]) -> None:
        self.paths = paths
        self.consumed = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[FileRef]:
        for path in self.paths:
            self.consumed += 1
            yield FileRef(path=path, hash="h")
        self.exhausted = True


def test_single_input_streams_a_large_generator() -> None:
    total = 200_000
    files = CountingFiles(f"/f{i:07d}" for i in range(total))
    inp = make_input(pfs("big", "/*"))
    datums = enumerate_datums(
        inp, [Leaf(name="big", repo="big", branch="m", commit="c", files=files)]
    )
    first = next(datums)
    assert first[0].root == "/f0000000"
    assert files.consumed == 1
    assert not files.exhausted
    # Reading on stays in step with the generator, and every file comes out once.
    for _ in range(999):
        next(datums)
    assert files.consumed == 1000
    assert sum(1 for _ in datums) == total - 1000
    assert files.exhausted


def test_directory_datums_stream_as_each_subtree_ends() -> None:
    paths = (f"/d{d:05d}/f{f}" for d in range(20_000) for f in range(10))
    files = CountingFiles(paths)
    inp = make_input(pfs("big", "/*"))
    datums = enumerate_datums(
        inp, [Leaf(name="big", repo="big", branch="m", commit="c", files=files)]
    )
    first = next(datums)
    assert first[0].root == "/d00000/"
    assert [f.path for f in first[0].files] == [f"/d00000/f{f}" for f in range(10)]
    # The first directory is known complete when the next one starts: 11 files read, not 200,000.
    assert files.consumed == 11
    assert not files.exhausted


def test_cross_streams_its_first_input() -> None:
    files = CountingFiles(f"/f{i:07d}" for i in range(100_000))
    inp = make_input({"cross": [pfs("big", "/*"), pfs("small", "/*")]})
    leaves = [
        Leaf(name="big", repo="big", branch="m", commit="c", files=files),
        Leaf(name="small", repo="small", branch="m", commit="c", files=refs(["/x", "/y"])),
    ]
    datums = enumerate_datums(inp, leaves)
    assert [[d.root for d in datum] for datum in (next(datums), next(datums))] == [
        ["/f0000000", "/x"],
        ["/f0000000", "/y"],
    ]
    assert files.consumed == 1


# ------------------------------------------------------------------------- combinators


def one(name: str, path: str) -> Part:
    return (name, path, (path,))


COMBINATOR_CASES = [
    pytest.param(
        {
            "cross": [
                {"union": [pfs("A", "/*"), pfs("B", "/*")]},
                {"union": [pfs("C", "/*"), pfs("D", "/*")]},
            ]
        },
        {"A": ["/a1", "/a2"], "B": ["/b1"], "C": ["/c1"], "D": ["/d1", "/d2"]},
        [
            [one(*ab), one(*cd)]
            for ab in [("A", "/a1"), ("A", "/a2"), ("B", "/b1")]
            for cd in [("C", "/c1"), ("D", "/d1"), ("D", "/d2")]
        ],
        id="cross-of-unions",
    ),
    pytest.param(
        {"union": [{"cross": [pfs("A", "/*"), pfs("B", "/*")]}, pfs("C", "/*")]},
        {"A": ["/a1", "/a2"], "B": ["/b1"], "C": ["/c1"]},
        [
            [one("A", "/a1"), one("B", "/b1")],
            [one("A", "/a2"), one("B", "/b1")],
            [one("C", "/c1")],
        ],
        id="union-of-cross",
    ),
    pytest.param(
        {"union": [pfs("A", "/*"), pfs("A", "/*/*", name="A")]},
        {"A": ["/x/y"]},
        [[("A", "/x/", ("/x/y",))], [one("A", "/x/y")]],
        id="union-repeats-a-name",
    ),
    pytest.param(
        {"cross": [pfs("A", "/*"), pfs("A", "/", name="whole")]},
        {"A": ["/1", "/2"], "whole": ["/1", "/2"]},
        [
            [one("A", "/1"), ("whole", "/", ("/1", "/2"))],
            [one("A", "/2"), ("whole", "/", ("/1", "/2"))],
        ],
        id="cross-one-repo-twice-by-name",
    ),
    pytest.param(
        {"cross": [pfs("A", "/*")]},
        {"A": ["/1", "/2"]},
        [[one("A", "/1")], [one("A", "/2")]],
        id="cross-of-one",
    ),
    pytest.param(
        {"cross": [pfs("A", "/*"), pfs("B", "/*"), pfs("C", "/*")]},
        {"A": ["/1", "/2"], "B": ["/3"], "C": ["/4", "/5"]},
        [[one("A", a), one("B", "/3"), one("C", c)] for a in ["/1", "/2"] for c in ["/4", "/5"]],
        id="cross-of-three",
    ),
    # Joins.
    pytest.param(
        _readings_join(outer_readings=True),
        {"readings": READINGS, "parameters": PARAMETERS},
        _joined(()),
        id="join-outer-readings-has-no-extra-keys",
    ),
    pytest.param(
        _readings_join(outer_readings=True, outer_parameters=True),
        {"readings": READINGS, "parameters": PARAMETERS},
        _joined((6, 7, 8)),
        id="join-outer-both",
    ),
    pytest.param(
        {
            "join": [
                pfs("L", "/(*).l", join_on="$1", outer_join=True),
                pfs("R", "/(*).r", join_on="$1"),
            ]
        },
        {"L": ["/a.l", "/b.l", "/x.l"], "R": ["/a.r", "/b.r", "/y.r"]},
        [
            [one("L", "/a.l"), one("R", "/a.r")],
            [one("L", "/b.l"), one("R", "/b.r")],
            [one("L", "/x.l")],
        ],
        id="join-left-outer",
    ),
    pytest.param(
        {
            "join": [
                pfs("L", "/(*).l", join_on="$1"),
                pfs("R", "/(*).r", join_on="$1", outer_join=True),
            ]
        },
        {"L": ["/a.l", "/b.l", "/x.l"], "R": ["/a.r", "/b.r", "/y.r"]},
        [
            [one("L", "/a.l"), one("R", "/a.r")],
            [one("L", "/b.l"), one("R", "/b.r")],
            [one("R", "/y.r")],
        ],
        id="join-right-outer",
    ),
    pytest.param(
        {
            "join": [
                pfs("L", "/(*).l", join_on="$1", outer_join=True),
                pfs("R", "/(*).r", join_on="$1", outer_join=True),
            ]
        },
        {"L": ["/a.l", "/x.l"], "R": ["/a.r", "/y.r"]},
        [
            [one("L", "/a.l"), one("R", "/a.r")],
            [one("L", "/x.l")],
            [one("R", "/y.r")],
        ],
        id="join-full-outer",
    ),
    pytest.param(
        # Key "a" lacks M: only the outer input's match is in its datum, not the inner L's.
        {
            "join": [
                pfs("L", "/(*).l", join_on="$1"),
                pfs("M", "/(*).m", join_on="$1"),
                pfs("R", "/(*).r", join_on="$1", outer_join=True),
            ]
        },
        {"L": ["/a.l", "/b.l", "/c.l"], "M": ["/b.m"], "R": ["/a.r", "/b.r"]},
        [
            [one("R", "/a.r")],
            [one("L", "/b.l"), one("M", "/b.m"), one("R", "/b.r")],
        ],
        id="join-three-outer-keeps-only-outer",
    ),
    pytest.param(
        {
            "join": [
                pfs("L", "/(*)-*", join_on="$1"),
                pfs("R", "/(*)", join_on="$1"),
            ]
        },
        {"L": ["/a-1", "/a-2", "/b-1"], "R": ["/a", "/b", "/c"]},
        [
            [one("L", "/a-1"), one("R", "/a")],
            [one("L", "/a-2"), one("R", "/a")],
            [one("L", "/b-1"), one("R", "/b")],
        ],
        id="join-many-to-one",
    ),
    pytest.param(
        {"join": [pfs("L", "/*"), pfs("R", "/*")]},
        {"L": ["/1", "/2"], "R": ["/3"]},
        [[one("L", "/1"), one("R", "/3")], [one("L", "/2"), one("R", "/3")]],
        id="join-without-join-on-is-cross",
    ),
    pytest.param(
        {"join": [pfs("L", "/(*)", join_on="$1"), pfs("R", "/(*)", join_on="$1")]},
        {"L": ["/1", "/2"], "R": []},
        [],
        id="join-inner-with-empty-input",
    ),
    pytest.param(
        {
            "join": [
                pfs("L", "/(*)", join_on="$1", outer_join=True),
                pfs("R", "/(*)", join_on="$1"),
            ]
        },
        {"L": ["/1", "/2"], "R": []},
        [[one("L", "/1")], [one("L", "/2")]],
        id="join-outer-with-empty-input",
    ),
    pytest.param(
        {
            "join": [
                pfs("L", "/(*).txt", join_on="x-$1"),
                pfs("R", "/*/(*)", join_on="x-${1}"),
            ]
        },
        {"L": ["/k.txt"], "R": ["/dir/k"]},
        [[one("L", "/k.txt"), one("R", "/dir/k")]],
        id="join-on-templates-with-text",
    ),
    pytest.param(
        # A cross under a join is keyed by its keyed part.
        {
            "join": [
                {"cross": [pfs("L", "/(*)", join_on="$1"), pfs("S", "/*")]},
                pfs("R", "/(*)", join_on="$1"),
            ]
        },
        {"L": ["/a", "/b"], "S": ["/s1", "/s2"], "R": ["/b"]},
        [
            [one("L", "/b"), one("S", "/s1"), one("R", "/b")],
            [one("L", "/b"), one("S", "/s2"), one("R", "/b")],
        ],
        id="join-of-cross",
    ),
    pytest.param(
        {
            "cross": [
                {"join": [pfs("L", "/(*)", join_on="$1"), pfs("R", "/(*)", join_on="$1")]},
                pfs("S", "/*"),
            ]
        },
        {"L": ["/a", "/b"], "R": ["/b", "/c"], "S": ["/s1", "/s2"]},
        [
            [one("L", "/b"), one("R", "/b"), one("S", "/s1")],
            [one("L", "/b"), one("R", "/b"), one("S", "/s2")],
        ],
        id="cross-of-join",
    ),
    # Groups.
    pytest.param(
        {
            "group": [
                pfs("A", "/(*)-*", group_by="$1"),
                pfs("B", "/*/(*)", group_by="$1"),
            ]
        },
        {"A": ["/p1-x", "/p2-x", "/p1-y"], "B": ["/d/p2", "/d/p3"]},
        [
            [one("A", "/p1-x"), one("A", "/p1-y")],
            [one("A", "/p2-x"), one("B", "/d/p2")],
            [one("B", "/d/p3")],
        ],
        id="group-two-inputs",
    ),
    pytest.param(
        {"group": [pfs("A", "/*")]},
        {"A": ["/1", "/2"]},
        [[one("A", "/1"), one("A", "/2")]],
        id="group-without-group-by-is-one-datum",
    ),
    pytest.param(
        {"group": [pfs("A", "/(*)", group_by="$1")]},
        {"A": []},
        [],
        id="group-empty",
    ),
    pytest.param(
        {
            "group": [
                {
                    "join": [
                        pfs("L", "/(*)-(*)", join_on="$2", group_by="$1"),
                        pfs("R", "/(*)", join_on="$1"),
                    ]
                }
            ]
        },
        {"L": ["/p1-a", "/p1-b", "/p2-a", "/p2-z"], "R": ["/a", "/b"]},
        [
            [one("L", "/p1-a"), one("R", "/a"), one("L", "/p1-b"), one("R", "/b")],
            [one("L", "/p2-a"), one("R", "/a")],
        ],
        id="group-of-join",
    ),
    pytest.param(
        {
            "join": [
                {"group": [pfs("L", "/(*)-*", group_by="$1", join_on="$1")]},
                pfs("R", "/(*)", join_on="$1"),
            ]
        },
        {"L": ["/p1-a", "/p1-b", "/p2-a"], "R": ["/p1"]},
        [[one("L", "/p1-a"), one("L", "/p1-b"), one("R", "/p1")]],
        id="join-of-group",
    ),
    pytest.param(
        {
            "group": [
                {"union": [pfs("A", "/(*)", group_by="$1"), pfs("B", "/(*)", group_by="$1")]},
                pfs("C", "/(*)", group_by="$1"),
            ]
        },
        {"A": ["/k"], "B": ["/k", "/m"], "C": ["/m"]},
        [[one("A", "/k"), one("B", "/k")], [one("B", "/m"), one("C", "/m")]],
        id="group-of-union",
    ),
    # Empty inputs.
    pytest.param(
        {"cross": [pfs("A", "/*"), pfs("B", "/*")]},
        {"A": ["/1"], "B": []},
        [],
        id="cross-with-empty-input",
    ),
    pytest.param(
        {"cross": [pfs("A", "/*"), pfs("B", "/*")]},
        {"A": [], "B": ["/1"]},
        [],
        id="cross-with-empty-first-input",
    ),
    pytest.param(
        {"union": [pfs("A", "/*"), pfs("B", "/*")]},
        {"A": [], "B": ["/1"]},
        [[one("B", "/1")]],
        id="union-with-empty-input",
    ),
]


@pytest.mark.parametrize(("tree", "files", "expected"), COMBINATOR_CASES)
def test_combinators(tree: dict, files: dict[str, list[str]], expected: list[list[Part]]) -> None:
    assert run(tree, files) == expected


def test_leaves_must_fit_the_spec() -> None:
    inp = make_input({"cross": [pfs("A", "/*"), pfs("B", "/*")]})
    a = Leaf(name="A", repo="A", branch="master", commit="c", files=[])
    b = Leaf(name="B", repo="B", branch="master", commit="c", files=[])
    with pytest.raises(ValueError, match="2 pfs inputs, 1 leaves"):
        list(enumerate_datums(inp, [a]))
    with pytest.raises(ValueError, match="leaf 'B' of repo 'B' given where the spec has input 'A'"):
        list(enumerate_datums(inp, [b, a]))


# ------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (
            {"join": [pfs("r", "/*/(*).txt", join_on="$1"), pfs("p", "/(*).txt", join_on="$2")]},
            "input.join[1].pfs.join_on: $2 names a capture group the glob '/(*).txt' does not have",
        ),
        (
            {"group": [pfs("r", "/*", group_by="${1}")]},
            "input.group[0].pfs.group_by: ${1} names a capture group the glob '/*' does not have",
        ),
        (
            pfs("r", "/[a"),
            "input.pfs.glob: glob '/[a': '[' at position 1 is never closed",
        ),
        (
            {"union": [pfs("a", "/*"), {"cross": [pfs("b", "/*"), pfs("c", "/(*")]}]},
            "input.union[1].cross[1].pfs.glob: glob '/(*': '(' at position 1 is never closed",
        ),
        (
            {"join": [pfs("r", "/(*)", join_on="$1"), pfs("p", "/(*)", join_on="key-$")]},
            "input.join[1].pfs.join_on: template 'key-$': '$' at position 4 must be followed by"
            " a group number ($1 or ${1}) or by '$' for a literal '$'",
        ),
    ],
)
def test_check_input_errors(tree: dict, message: str) -> None:
    inp = make_input(tree)
    with pytest.raises(SpecError) as info:
        check_input(inp)
    assert str(info.value) == message
    # Enumeration refuses the same input before reading any file.
    leaves = [
        Leaf(name=input_name(p), repo=p.repo, branch="master", commit="c", files=[])
        for p in input_leaves(inp)
    ]
    with pytest.raises(SpecError):
        list(enumerate_datums(inp, leaves))


def test_check_input_accepts_a_good_input() -> None:
    check_input(
        make_input(
            {
                "group": [
                    {
                        "join": [
                            pfs("r", "/*/(*)-(*).txt", join_on="$2", group_by="$1"),
                            pfs("p", "/(*).txt", join_on="$1", outer_join=True),
                        ]
                    },
                    pfs("q", "", group_by="$0"),
                ]
            }
        )
    )


def _spec(inp: dict) -> str:
    return msgspec.json.encode(
        {"pipeline": {"name": "p"}, "transform": {"cmd": ["true"]}, "input": inp}
    ).decode()


@pytest.mark.parametrize(
    ("inp", "message"),
    [
        (
            {"cross": [pfs("A", "/*"), pfs("A", "/")]},
            "input.cross[1]: input name 'A' is already used in this cross",
        ),
        (
            {"join": [pfs("A", "/*"), pfs("B", "/*", name="A")]},
            "input.join[1]: input name 'A' is already used in this join",
        ),
        (
            {"group": [pfs("A", "/*"), pfs("A", "/*")]},
            "input.group[1]: input name 'A' is already used in this group",
        ),
        (
            {
                "cross": [
                    {"union": [pfs("A", "/*"), pfs("B", "/*")]},
                    {"union": [pfs("C", "/*"), pfs("A", "/*")]},
                ]
            },
            "input.cross[1]: input name 'A' is already used in this cross",
        ),
        (
            {"union": [pfs("X", "/*"), {"cross": [pfs("A", "/*"), pfs("A", "/*")]}]},
            "input.union[1].cross[1]: input name 'A' is already used in this cross",
        ),
        (pfs("out", "/*"), "input.pfs.name: the input name 'out' is reserved"),
        (pfs("A", "/*", name="out"), "input.pfs.name: the input name 'out' is reserved"),
    ],
)
def test_spec_refuses_duplicate_input_names(inp: dict, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(_spec(inp))
    # load_spec names the document first ("spec: "), then the field.
    assert str(info.value).startswith(f"spec: {message}")


@pytest.mark.parametrize(
    "inp",
    [
        {"union": [pfs("A", "/*"), pfs("A", "/*/*")]},
        {
            "union": [
                {"cross": [pfs("A", "/*"), pfs("B", "/*")]},
                {"cross": [pfs("A", "/"), pfs("C", "/")]},
            ]
        },
        {"cross": [pfs("A", "/*"), pfs("A", "/", name="A2")]},
    ],
)
def test_spec_accepts_names_that_never_meet(inp: dict) -> None:
    spec = load_spec(_spec(inp))
    check_input(spec.input)


# ------------------------------------------------------------------------- ids and hashes


def _di(name: str, root: str, files: list[FileRef], *, commit: str = "c1") -> DatumInput:
    return DatumInput(
        name=name, repo="repo-" + name, branch="master", commit=commit, files=files, root=root
    )


F1 = FileRef(path="/a/1", hash="h1")
F2 = FileRef(path="/a/2", hash="h2")


def test_datum_id_is_stable_across_commits_and_contents() -> None:
    base = datum_id([_di("A", "/a/", [F1, F2], commit="c1")])
    assert base == datum_id([_di("A", "/a/", [F1], commit="c2")])
    assert len(base) == 64 and int(base, 16) >= 0


@pytest.mark.parametrize(
    "other",
    [
        [_di("B", "/a/", [F1, F2])],
        [_di("A", "/b/", [F1, F2])],
        [DatumInput(name="A", repo="other", branch="master", commit="c1", files=[], root="/a/")],
        [DatumInput(name="A", repo="repo-A", branch="dev", commit="c1", files=[], root="/a/")],
        [_di("A", "/a/", [F1, F2]), _di("B", "/x", [])],
        [],
    ],
    ids=["name", "root", "repo", "branch", "more-inputs", "no-inputs"],
)
def test_datum_id_changes_with_what_names_the_datum(other: list[DatumInput]) -> None:
    assert datum_id([_di("A", "/a/", [F1, F2])]) != datum_id(other)


def test_datum_id_depends_on_input_order_and_is_unambiguous() -> None:
    a, b = _di("A", "/x", []), _di("B", "/y", [])
    assert datum_id([a, b]) != datum_id([b, a])
    # Concatenation cannot collide: ("ab", "c") and ("a", "bc") differ.
    assert datum_id([_di("ab", "c", [])]) != datum_id([_di("a", "bc", [])])


def test_datum_hash() -> None:
    inputs = [_di("A", "/a/", [F1, F2])]
    did = datum_id(inputs)
    base = datum_hash(did, inputs, "salt")
    assert len(base) == 64
    # Deterministic, and independent of the commit and of the order files are listed in.
    assert base == datum_hash(did, [_di("A", "/a/", [F2, F1], commit="c9")], "salt")
    changed = [
        datum_hash(did, [_di("A", "/a/", [F1, FileRef(path="/a/2", hash="h2-new")])], "salt"),
        datum_hash(did, [_di("A", "/a/", [F1])], "salt"),
        datum_hash(did, [_di("A", "/a/", [F1, FileRef(path="/a/3", hash="h2")])], "salt"),
        datum_hash(did, inputs, "other-salt"),
        datum_hash("0" * 64, inputs, "salt"),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_datum_hash_of_files_referenced_in_place() -> None:
    def ref(etag: str) -> FileRef:
        return FileRef(path="/k", source=ObjectSource(url="s3://b/k", etag=etag))

    old = [_di("A", "/k", [ref("e1")])]
    new = [_di("A", "/k", [ref("e2")])]
    did = datum_id(old)
    assert did == datum_id(new)
    assert datum_hash(did, old, "") != datum_hash(did, new, "")
