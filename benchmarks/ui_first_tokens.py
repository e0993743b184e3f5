"""Time from pressing Send on the web page to the first token of each of the two answers, measured in
a real headless Chromium (playwright driving Debian's chromium) against `tinysft ui RUN`.

Without --run, makes a run of the embedded model first (one optimizer step on four examples, so
the tuned side is a real adapter). For each prompt: a new conversation, send, wait for both answers;
the page records, per column, the milliseconds from sending to its first streamed token
(``performance.now()`` in the page, so the browser's own fetch and rendering are included). Runs
the default two-copy server, and with --one-copy also the one-copy server for comparison.
--screenshot saves the page, both answers shown and the vote bar up, e.g. for docs/ui.png.

    python benchmarks/ui_first_tokens.py --out benchmarks/results/ui_first_tokens.json --screenshot docs/ui.png

Run by hand; results depend on the machine (and on whatever else it runs at the time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from machine import cpu_model

PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "How do I reverse a list in Python?",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
    "Name three primary colours.",
    "Say hello in Spanish.",
    "Why is the sky blue?",
]
TRAIN_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"Certainly! {a} plus {b} is {a + b}."}]}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]
]


def make_run(folder: Path) -> Path:
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS))
    subprocess.run([sys.executable, "-m", "tinysft", "train", "--data", str(data), "--out", str(folder / "run"),
                    "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "lora.r=4",
                    "--set", "data.max_length=64"], check=True)
    return folder / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(run: Path, one_copy: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tinysft", "ui", str(run), "--port", str(port), *(["--one-copy"] if one_copy else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"tinysft ui exited: {proc.communicate()[1][-2000:]}")
        if time.time() > deadline:
            raise SystemExit("tinysft ui did not come up in 300 s")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)


def measure(browser: Any, url: str, prompts: list[str], max_tokens: int, screenshot: Path | None) -> list[dict]:
    page = browser.new_page(viewport={"width": 1280, "height": 820})
    page.goto(f"{url}/ui/")
    page.wait_for_selector("#tally:not(:empty)")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    results = []
    for i, prompt in enumerate(prompts):
        page.click("#reset")
        page.fill("#prompt", prompt)
        page.click("#send")
        page.wait_for_function("""() => ['A', 'B'].every(c => {
            const b = document.querySelector(`#col-${c} .msg.assistant`);
            return b && (b.dataset.done === '1' || b.classList.contains('error'));
        })""", timeout=300_000)
        row = page.evaluate("""() => Object.fromEntries(['A', 'B'].map(c => {
            const b = document.querySelector(`#col-${c} .msg.assistant`);
            return [c, {first_ms: Number(b.dataset.firstTokenMs), done_ms: Number(b.dataset.doneMs),
                        chars: b.textContent.length, error: b.classList.contains('error')}];
        }))""")
        row["prompt"] = prompt
        row["warmup"] = i == 0
        results.append(row)
    if screenshot:
        page.fill("#prompt", "")
        page.screenshot(path=str(screenshot))
    page.close()
    return results


def summary(rows: list[dict]) -> dict[str, Any]:
    timed = [r for r in rows if not r["warmup"] and not r["A"]["error"] and not r["B"]["error"]]
    both = [max(r["A"]["first_ms"], r["B"]["first_ms"]) for r in timed]  # until both answers have begun
    return {"prompts": len(timed), "both_first_ms_median": statistics.median(both) if both else None,
            "both_first_ms_max": max(both) if both else None,
            "done_ms_median": statistics.median(max(r["A"]["done_ms"], r["B"]["done_ms"]) for r in timed) if timed else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a run folder (default: make one of the embedded model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--one-copy", action="store_true", help="also measure `tinysft ui --one-copy`")
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    tmp = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    run = args.run or make_run(tmp)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
                           "load_before": os.getloadavg()[0], "max_tokens": args.max_tokens, "runs": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for one_copy in [False, True] if args.one_copy else [False]:
            proc, url = start_ui(run, one_copy)
            try:
                rows = measure(browser, url, PROMPTS, args.max_tokens, None if one_copy else args.screenshot)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
            name = "one copy" if one_copy else "two copies (default)"
            out["runs"][name] = {"summary": summary(rows), "rows": rows}
            print(f"{name}: {json.dumps(summary(rows))}", flush=True)
        browser.close()
    out["load_after"] = os.getloadavg()[0]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
