"""`datumflow next datum`: pachctl's spelling of datumflow.batching's client, for user code of a
pipeline with `transform.datum_batching`.

It pays for the CLI's start (typer and its modules, about 100 ms); in a loop over many datums,
`datumflow-next-datum` (the same client alone) or `next_datum()` from Python costs far less.
"""

from __future__ import annotations

import typer

from datumflow import batching


def next_datum(
    error: str = typer.Option(
        "", "--error", help="Report the datum in hand failed, with this message."
    ),
) -> None:
    """Report the datum in hand done (or failed) and wait for the next; exit 3 when none is left.

    Prints the next datum's variables as `export` lines for `eval`. Only for the user code of
    a pipeline with transform.datum_batching, which its worker runs.
    """
    code = batching.main(["--error", error] if error else [])
    if code:
        raise typer.Exit(code)
