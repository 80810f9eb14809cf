"""The console in a real browser: Debian's headless Chromium, driven by Playwright, on a running
`datumflow up` whose job has one failing datum and slow ones. The DAG renders, the job's page
updates while the job runs (without a reload), the failed datum shows its error and its log (that
view is saved as docs/console.png, which the README shows), and the rerun button reruns it."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from datumflow.runtime.status import read_console_url
from tests.helpers import Cluster, create_pipeline, put_files, wait_until

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "console.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WORDS = {f"/{w}.txt": w.encode() for w in ["alpha", "bravo", "charlie", "delta", "bad", "zulu"]}
# One datum at a time, a fraction of a second each; zulu.txt waits for the test to open the gate,
# so the job is surely running when its page is first shown.
SLOW = (
    'for f in /pfs/words/*; do n=$(basename "$f"); echo "reading $n"; sleep 0.3;'
    ' if [ "$n" = zulu.txt ]; then while [ ! -e "$GATE" ]; do sleep 0.1; done; fi;'
    ' if [ "$n" = bad.txt ]; then echo "cannot spell $n: no vowels left" >&2; exit 7; fi;'
    ' tr a-z A-Z < "$f" > "/pfs/out/$n"; done'
)

needs_chromium = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason="chromium is not installed (Debian's package: apt-get install chromium)",
)


@needs_chromium
def test_console_in_a_browser(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    cluster = make_cluster(DATUMFLOW_CONSOLE_ADDRESS="127.0.0.1:0")
    gate = tmp_path / "gate"
    asyncio.run(put_files(cluster, "words", WORDS))
    create_pipeline(
        cluster,
        tmp_path,
        {
            "pipeline": {"name": "shout"},
            "input": {"pfs": {"repo": "words", "glob": "/*"}},
            "transform": {"cmd": ["sh", "-c", SLOW], "env": {"GATE": str(gate)}},
            "parallelism_spec": {"constant": 1},
            "datum_tries": 1,
        },
    )
    wait_until(lambda: read_console_url(cluster.home), timeout=30, what="the console's URL")
    url = read_console_url(cluster.home)

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            # The DAG: a node for the repo and one for the pipeline, joined by an edge.
            expect(page.locator('[data-node="words"][data-kind="repo"]')).to_be_visible()
            expect(page.locator('[data-node="shout"][data-kind="pipeline"]')).to_be_visible()
            expect(page.locator("#dag path.edge")).to_have_count(1)
            assert "token=" not in page.url  # taken out of the address bar

            page.locator('[data-node="shout"]').click()
            # The pipeline's page lists its job as soon as it is planned (it polls).
            page.locator("tr[data-job]").first.click()
            expect(page.locator("#count-total")).to_have_text("6")
            expect(page.locator("h1 .state")).to_have_text("running")  # held by zulu.txt
            # Marks this document: a reload would lose it.
            page.evaluate("window.__sameDocument = true")
            before = page.locator("#count-processed").inner_text()
            gate.touch()
            page.wait_for_function(
                "(before) => document.querySelector('#count-processed')?.textContent !== before",
                arg=before,
            )
            expect(page.locator("h1 .state")).to_have_text("failure", timeout=30_000)
            assert page.evaluate("window.__sameDocument") is True
            expect(page.locator("#count-failed")).to_have_text("1")
            expect(page.locator("#count-processed")).to_have_text("5")

            # The failed datum comes first; opened, it shows its error and its log.
            failed = page.locator("tr[data-datum]").first
            expect(failed).to_have_attribute("data-state", "failed")
            failed.click()
            expect(page.locator(".datum-error")).to_contain_text("7")
            expect(page.locator(".datum-log")).to_contain_text("cannot spell bad.txt")
            expect(page.locator(".datum-log")).to_contain_text("reading bad.txt")
            expect(page.locator(".detail")).to_contain_text("/bad.txt")
            page.screenshot(path=str(SCREENSHOT), full_page=False)

            # The one action: rerun the failed datum. The page goes to the new job, where the
            # five done datums are carried over (skipped) and bad.txt runs, and fails, again.
            failed_job = page.url.split("/")[-1]
            page.locator("#rerun").click()
            page.wait_for_function(
                "(old) => !location.hash.endsWith(old) && location.hash.startsWith('#/job/')",
                arg=failed_job,
            )
            expect(page.locator("#count-skipped")).to_have_text("5")
            expect(page.locator("h1 .state")).to_have_text("failure", timeout=30_000)
            expect(page.locator("#count-failed")).to_have_text("1")
            assert page.evaluate("window.__sameDocument") is True

            # The workers chart and the input repo's commits.
            page.locator('[data-nav="workers"]').click()
            expect(page.locator('[data-chart="shout"] svg path.running')).to_have_count(1)
            page.goto(url.split("?")[0] + "#/repo/words")
            expect(page.locator("tr[data-commit]")).to_have_count(1)
        finally:
            browser.close()
