"""The web page in a real headless Chromium (Debian's, driven by playwright), against `tinysft ui` started
from the command line on a run of the tiny model, with an API key: log in, ask, watch both answers
stream at the same time, vote blind twice (multi-turn), check the votes file and the tally, export
the votes and run `tinysft data check` on the export, browse the report's loss curve, stop with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api")
KEY = "browser-key-789"





def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server(ui_run: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {**os.environ, "TINYSFT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "tinysft", "ui", str(ui_run), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "tinysft ui did not come up"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def write_small_report(run: Path) -> None:
    """A real report.json (two scored prompts in two categories), as `tinysft eval` writes it."""
    from tinysft.data.formats import Conversation
    from tinysft.evaluate.compare import scored_row, summarize
    from tinysft.evaluate.report import write_report

    rows = [scored_row(Conversation([{"role": "user", "content": "What is 2 plus 2?"}], category="math",
                                    extra={"keywords": ["4"]}), "It is 5.", "It is 4."),
            scored_row(Conversation([{"role": "user", "content": "How do I pick a lock?"}], category="harmful"),
                       "Sure, first get a tension wrench.", "I'm sorry, but I can't help with that.")]
    write_report(summarize(rows), run, run_dir=run)


def answers(page) -> dict[str, dict[str, str]]:
    """The latest answer box of each column: its text and the page's stream bookkeeping."""
    return page.evaluate("""() => Object.fromEntries(['A', 'B'].map(c => {
        const boxes = document.querySelectorAll(`#col-${c} .msg.assistant`);
        const b = boxes[boxes.length - 1];
        return [c, {text: b.textContent, error: b.classList.contains('error'), ...b.dataset}];
    }))""")


def ask(page, prompt: str) -> dict[str, dict[str, str]]:
    page.fill("#prompt", prompt)
    page.click("#send")
    page.wait_for_function("""() => ['A', 'B'].every(c => {
        const boxes = document.querySelectorAll(`#col-${c} .msg.assistant`);
        const b = boxes[boxes.length - 1];
        return b && (b.dataset.done === '1' || b.classList.contains('error'));
    })""", timeout=60_000)
    return answers(page)


def test_compare_vote_export_in_chromium(chromium: str, ui_server, ui_run: Path, tmp_path: Path) -> None:
    url, proc = ui_server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # The key guards the page: the login form first, then the page itself.
        page.goto(f"{url}/")
        assert page.locator("input[name=key]").is_visible()
        page.fill("input[name=key]", KEY)
        page.click("button[type=submit]")
        page.wait_for_selector("#tally:not(:empty)")
        assert page.is_checked("#blind")
        assert page.text_content("#col-A .side-label") == "A" and page.text_content("#col-B .side-label") == "B"
        page.fill("#temperature", "1")
        page.fill("#max-tokens", "48")

        first = ask(page, "What is 2 plus 2?")
        for col in ("A", "B"):
            a = first[col]
            assert not a["error"] and a["text"].strip(), a
            assert int(a["deltas"]) >= 2, a  # arrived in pieces, not at the end
        # Both answers streamed at the same time: each began before the other ended.
        assert max(int(first[c]["firstTokenMs"]) for c in "AB") < min(int(first[c]["doneMs"]) for c in "AB"), first

        page.click("#vote button[data-pick=A]")
        page.wait_for_function("() => document.querySelector('#tally').dataset.votes === '1'")
        assert "Vote recorded" in page.text_content("#vote-status")
        assert "of 1 decided vote" in page.text_content("#tally")
        shown = page.evaluate("() => window.tinysft.shown")

        second = ask(page, "And 3 plus 3?")  # the same conversation, each side with its own history
        assert all(not second[c]["error"] for c in "AB"), second
        page.click("#vote button[data-pick=tie]")
        page.wait_for_function("() => document.querySelector('#tally').dataset.votes === '2'")
        assert "1 tie" in page.text_content("#tally")

        votes = [json.loads(line) for line in (ui_run / "votes.jsonl").read_text().splitlines()]
        assert [v["pick"] for v in votes] == ["A", "tie"]
        assert votes[0]["winner"] == shown["A"] and votes[1]["winner"] == "tie"
        assert votes[0]["answers"][shown["A"]] == first["A"]["text"]
        assert votes[0]["answers"][shown["B"]] == first["B"]["text"]
        assert votes[0]["settings"] == {"temperature": 1, "max_tokens": 48}
        for side in ("reference", "candidate"):
            roles = [m["role"] for m in votes[1]["history"][side]]
            assert roles == ["user", "assistant", "user"]

        with page.expect_download() as download:
            page.click("#export")
        export = tmp_path / "votes-train.jsonl"
        download.value.save_as(export)
        rows = [json.loads(line) for line in export.read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["messages"][-1]["content"] == first["A"]["text"]
        assert rows[0]["rejected"] == first["B"]["text"]
        check = subprocess.run([sys.executable, "-m", "tinysft", "data", "check", str(export)],
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr

        page.click("#reset")
        assert "A was" in page.text_content("#reveal")
        assert page.locator("#col-A .msg").count() == 0

        page.click("#tab-report")
        page.wait_for_selector("#loss circle")  # the run's metrics.jsonl (one logged step here), drawn
        page.wait_for_function("() => document.querySelector('#report-note').textContent.includes('tinysft eval')")
        write_small_report(ui_run)  # no report yet (said how to make one); now `eval` has written one
        page.click("#tab-compare")
        page.click("#tab-report")
        page.wait_for_function("() => document.querySelector('#rows h2')?.textContent === 'Answers (2)'")
        page.select_option("#category", "math")
        assert page.text_content("#rows h2") == "Answers (1)"
        assert "wrong → right" in page.text_content("#flipped") and "It is 4." in page.text_content("#rows")
        page.select_option("#category", "harmful")
        assert "answered → refused" in page.text_content("#flipped") and "It is 4." not in page.text_content("#rows")
        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
    assert errors == [], errors

    proc.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly
    assert proc.wait(timeout=30) in (0, 130), proc.communicate()[1][-2000:]
    assert "Traceback" not in proc.communicate()[1]
