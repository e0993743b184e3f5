"""The web page's server side (`tinysft ui`), through FastAPI's TestClient on a run of the tiny model:
the page and its files, both sides answering through the serve API, votes (file, tally, torn lines),
the export (read back by `tinysft data check`), the report endpoints, and the API key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("httpx")
KEY = "ui-key-456"
HI = [{"role": "user", "content": "What is 2 plus 2?"}]





@pytest.fixture(scope="module")
def loaded(ui_run: Path):
    from tinysft.models.load import load_run

    return load_run(ui_run, log=lambda m: None)


@pytest.fixture(scope="module")
def loaded2(ui_run: Path):
    """A second copy, as `tinysft ui RUN` loads: each side's serve app owns one."""
    from tinysft.models.load import load_run

    return load_run(ui_run, log=lambda m: None)


@pytest.fixture
def runs(loaded, loaded2, tmp_path: Path, monkeypatch):
    """Both copies, with this test's tmp folder as their run folder (votes and report go there);
    the served tuned model is then named after that folder."""
    for run in (loaded, loaded2):
        monkeypatch.setattr(run, "run_dir", tmp_path)
    return loaded, loaded2


def make_client(loaded: Any, api_key: str | None = None, second: Any = None, pair: str = "base-tuned"):
    from fastapi.testclient import TestClient

    from tinysft.serve import ServeLimits
    from tinysft.ui import create_ui_app

    app = create_ui_app(loaded, second, pair=pair, api_key=api_key, limits=ServeLimits(max_tokens=32),  # type: ignore[arg-type]
                        log=lambda m: None)
    return TestClient(app)


@pytest.fixture
def client(runs):
    """An open (no key) page over the tiny run, its votes kept in this test's tmp folder."""
    with make_client(runs[0], second=runs[1]) as c:
        yield c


def ask(client: Any, side: dict[str, str], messages: list[dict[str, str]], **kw: Any) -> str:
    """One side's answer, streamed through the serve API exactly as the page asks for it."""
    body = {"model": side["model"], "messages": messages, "stream": True, "temperature": 0, "max_tokens": 8, **kw}
    text = ""
    with client.stream("POST", f"{side['url']}/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def vote_body(pick: str, answers: dict[str, str] | None = None, shown: dict[str, str] | None = None) -> dict[str, Any]:
    return {"history": {"reference": HI, "candidate": HI},
            "answers": answers or {"reference": "Four.", "candidate": "Certainly! 2 plus 2 is 4."},
            "shown": shown or {"A": "candidate", "B": "reference"}, "pick": pick,
            "settings": {"temperature": 0.7, "max_tokens": 32}}


def test_page_and_its_files_are_served_from_the_package(client) -> None:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
        assert client.get(src).status_code == 200, src
    assert "http" not in re.sub(r"http://www\.w3\.org/2000/svg", "", client.get("/ui/app.js").text)  # no CDN
    assert client.get("/ui/../../etc/passwd").status_code == 404
    assert client.get("/ui/index.py").status_code == 404


def test_both_sides_answer_through_the_serve_api_like_the_adapter_switch(client, loaded) -> None:
    from tinysft.evaluate.generate import adapter_state, generate

    sides = client.get("/ui/api/config").json()["sides"]
    assert sides["reference"]["model"] == "base" and sides["candidate"]["url"] == "/b/v1"
    for key, tuned in (("reference", False), ("candidate", True)):
        with adapter_state(loaded.model, tuned):
            expected = generate(loaded.model, loaded.tokenizer, [HI], max_new_tokens=8)[0]
        assert ask(client, sides[key], HI).strip() == expected


def test_votes_are_appended_and_tallied_with_a_wilson_interval(client, tmp_path: Path) -> None:
    picks = ["A", "A", "B", "tie", "both_bad", "A"]  # A shows the candidate: 3 wins, 1 loss
    for pick in picks:
        r = client.post("/ui/api/votes", json=vote_body(pick))
        assert r.status_code == 200, r.text
    lines = (tmp_path / "votes.jsonl").read_text().splitlines()
    assert len(lines) == len(picks)
    first = json.loads(lines[0])
    assert first["winner"] == "candidate" and first["pick"] == "A" and first["shown"]["A"] == "candidate"
    assert first["answers"]["candidate"].startswith("Certainly") and first["settings"]["max_tokens"] == 32
    assert first["models"]["reference"].startswith("base @ ") and first["time"].endswith("Z")
    t = client.get("/ui/api/votes").json()
    assert (t["wins"], t["losses"], t["ties"], t["both_bad"], t["decided"], t["votes"]) == (3, 1, 1, 1, 4, 6)
    assert t["win_rate"] == 0.75
    lo, hi = t["ci95"]
    assert lo == pytest.approx(0.3006, abs=1e-3) and hi == pytest.approx(0.9544, abs=1e-3)  # Wilson, z=1.96


def test_wilson_interval_known_values() -> None:
    from tinysft.votes import wilson_interval

    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def test_a_torn_last_line_is_skipped_and_the_next_vote_survives(client, tmp_path: Path) -> None:
    client.post("/ui/api/votes", json=vote_body("A"))
    votes = tmp_path / "votes.jsonl"
    with votes.open("a") as f:
        f.write('{"time": "2026-01-01T00:00:00Z", "winner": "cand')  # a crash mid-write
    assert client.get("/ui/api/votes").json()["votes"] == 1
    assert client.post("/ui/api/votes", json=vote_body("B")).status_code == 200
    t = client.get("/ui/api/votes").json()
    assert (t["wins"], t["losses"], t["votes"]) == (1, 1, 2)
    assert len(votes.read_text().splitlines()) == 3  # the torn line stays on its own line


@pytest.mark.parametrize("body", [
    {},
    {"pick": "C"},
    {"shown": {"A": "candidate", "B": "candidate"}},
    {"shown": {"A": "candidate"}},
    {"history": {"reference": [], "candidate": HI}},
    {"history": {"reference": [{"role": "assistant", "content": "x"}], "candidate": HI}},
    {"history": {"reference": [{"role": "wizard", "content": "x"}], "candidate": HI}},
    {"answers": {"reference": "x"}},
    {"settings": {"temperature": float("nan"), "max_tokens": 3}},
    {"settings": {"temperature": 3, "max_tokens": 3}},
    {"settings": {"temperature": 1, "max_tokens": 0}},
    {"surprise": 1},
    "not an object",
])
def test_bad_votes_get_400_and_nothing_is_written(client, tmp_path: Path, body: Any) -> None:
    full = {**vote_body("A"), **body} if isinstance(body, dict) and body else body
    # json.dumps, not httpx's json=: it writes NaN as the bare literal a hand-made request can send
    r = client.post("/ui/api/votes", content=json.dumps(full), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    assert not (tmp_path / "votes.jsonl").exists()
    r = client.post("/ui/api/votes", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_export_writes_rows_that_data_check_and_train_accept(client, tmp_path: Path, ui_run: Path,
                                                            tiny_model_dir: Path) -> None:
    from tinysft.cli import app

    client.post("/ui/api/votes", json=vote_body("A"))  # candidate preferred
    client.post("/ui/api/votes", json=vote_body("A", shown={"A": "reference", "B": "candidate"}))  # reference
    client.post("/ui/api/votes", json=vote_body("tie"))  # not a row
    client.post("/ui/api/votes", json=vote_body("B", answers={"reference": "Same.", "candidate": "Same."}))  # no signal
    r = client.get("/ui/api/votes/export")
    assert r.status_code == 200 and r.headers["x-rows"] == "2" and r.headers["x-skipped"] == "1"
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert [row["messages"][-1]["content"] for row in rows] == ["Certainly! 2 plus 2 is 4.", "Four."]
    assert [row["rejected"] for row in rows] == ["Four.", "Certainly! 2 plus 2 is 4."]
    assert rows[0]["messages"][:-1] == HI and rows[0]["messages"][-1]["role"] == "assistant"

    out = tmp_path / "export" / "votes-train.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["votes", "export", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == r.text
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code == 0, result.output
    # ...and `train` learns from them with its preference term (the rejected answers are used).
    trained = tmp_path / "from-votes"
    result = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(out), "--out", str(trained),
                                 "--set", "train.preference_weight=0.1", "--set", "train.epochs=1",
                                 "--set", "train.batch_size=2", "--set", "lora.r=4", "--set", "data.max_length=64"])
    assert result.exit_code == 0, result.output
    assert (trained / "adapter" / "adapter_config.json").is_file()
    # Never overwritten; no votes / no run: a clean error, exit 1.
    before = out.read_text()
    result = runner.invoke(app, ["votes", "export", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output and out.read_text() == before
    for run, msg in ((tmp_path / "nope", "no such run folder"), (ui_run, "no votes yet")):
        result = runner.invoke(app, ["votes", "export", str(run), "--out", str(tmp_path / "x.jsonl")])
        assert result.exit_code == 1 and msg in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_export_of_only_ties_is_an_error(client, tmp_path: Path) -> None:
    from tinysft.cli import app

    client.post("/ui/api/votes", json=vote_body("tie"))
    result = CliRunner().invoke(app, ["votes", "export", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and "no decided votes" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_report_and_metrics_endpoints(client, tmp_path: Path) -> None:
    r = client.get("/ui/api/report")
    assert r.status_code == 404 and "tinysft eval" in r.json()["error"]["message"]
    (tmp_path / "report.json").write_text(json.dumps({"title": "t", "metrics": {"base": {}, "tuned": {}}}))
    assert client.get("/ui/api/report").json()["title"] == "t"
    (tmp_path / "report.json").write_text("{cut")
    assert client.get("/ui/api/report").status_code == 409
    assert client.get("/ui/api/report?run=1").status_code == 400
    assert client.get("/ui/api/report?run=x").status_code == 400
    # A run still training: metrics.jsonl grows, its last line may be half-written.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n{"step": 2, "loss": 3.1, "eval_loss": 3.3}\n{"st')
    m = client.get("/ui/api/metrics").json()
    assert m["history"] == [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.1, "eval_loss": 3.3}]
    assert m["finished"] is False


def test_two_runs_compare_run_a_with_run_b(runs) -> None:
    with make_client(runs[0], second=runs[1], pair="runs") as c:
        cfg = c.get("/ui/api/config").json()
        assert cfg["sides"]["reference"]["label"].startswith("run A") and cfg["sides"]["candidate"]["url"] == "/b/v1"
        assert cfg["sides"]["reference"]["model"] != "base"
        assert c.post("/ui/api/votes", json=vote_body("B")).json()["tally"]["losses"] == 1
        assert c.get("/ui/api/report?run=1").status_code == 404  # run 1 exists (no report yet)


def test_api_key_protects_the_page_and_every_endpoint(runs, tmp_path: Path) -> None:
    with make_client(runs[0], api_key=KEY, second=runs[1]) as c:
        gets = ["/", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/api/config", "/ui/api/votes",
                "/ui/api/votes/export", "/ui/api/report", "/ui/api/metrics", "/v1/models", "/b/v1/models"]
        for path in gets:
            r = c.get(path, follow_redirects=False)
            assert r.status_code == 401, path
            assert "API key" in r.text and "function" not in r.text  # the login form, not the page's code
        for path in ("/ui/api/votes", "/v1/chat/completions", "/b/v1/chat/completions"):
            body = vote_body("A") if "votes" in path else {"model": "base", "messages": HI, "max_tokens": 2}
            assert c.post(path, json=body).status_code == 401, path
            assert c.post(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert not (tmp_path / "votes.jsonl").exists()
        assert c.get("/health").status_code == 200

        # The key as a Bearer header works everywhere.
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/ui/api/config", headers=auth).status_code == 200
        assert c.post("/b/v1/chat/completions", headers=auth,
                      json={"model": tmp_path.name, "messages": HI, "max_tokens": 2}).status_code == 200

        # The page's login: a wrong key gets the form again; the right one a session cookie (not the key).
        r = c.post("/ui/login", data={"key": "wrong"}, follow_redirects=False)
        assert r.status_code == 401 and "not the key" in r.text and "set-cookie" not in r.headers
        r = c.post("/ui/login", data={"key": KEY}, follow_redirects=False)
        assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        assert KEY not in r.headers["set-cookie"]
        assert c.get("/ui/").status_code == 200  # the client keeps the cookie
        sides = c.get("/ui/api/config").json()["sides"]
        assert ask(c, sides["candidate"], HI, max_tokens=2) is not None
        assert c.post("/ui/api/votes", json=vote_body("A")).status_code == 200
        c.cookies.clear()
        assert c.get("/ui/api/votes").status_code == 401
        r = c.get(f"/ui/?key={KEY}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/" and "set-cookie" in r.headers


def test_cross_site_writes_and_foreign_hosts_are_refused(runs, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tinysft.ui import create_ui_app, loopback_hosts

    loaded = runs[0]
    with make_client(loaded) as c:  # no key: a web page elsewhere must still not add votes
        r = c.post("/ui/api/votes", json=vote_body("A"), headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and not (tmp_path / "votes.jsonl").exists()
        assert c.post("/ui/api/votes", json=vote_body("A"), headers={"Origin": "http://testserver"}).status_code == 200
    app = create_ui_app(loaded, None, allowed_hosts=loopback_hosts("127.0.0.1"), log=lambda m: None)
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/ui/api/config").status_code == 200
        assert c.get("/ui/api/config", headers={"Host": "attacker.example:8000"}).status_code == 403


@pytest.mark.parametrize(("args", "message"), [
    (["ui"], "Missing argument"),
    (["ui", "a", "b", "c"], "one run (base vs tuned) or two"),
    (["ui", "no-such-run"], "not a tinysft run directory"),
    (["ui", ".", "--api-key", ""], "--api-key is empty"),
    (["ui", ".", "--port", "0"], "--port"),
    (["votes", "export", "."], "--out"),
])
def test_cli_ui_refuses_bad_arguments_cleanly(args: list[str], message: str) -> None:
    from tinysft.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output


def test_tally_counts_only_the_pair_on_screen(client, tmp_path: Path) -> None:
    # A vote of another comparison (say, run A vs run B) in the same file is not this pair's.
    other = {"time": "2026-01-01T00:00:00Z", "models": {"reference": "v1 @ v1", "candidate": "v2 @ v2"},
             "winner": "candidate", "pick": "A"}
    (tmp_path / "votes.jsonl").write_text(json.dumps(other) + "\n")
    assert client.post("/ui/api/votes", json=vote_body("B")).json()["tally"]["votes"] == 1
    t = client.get("/ui/api/votes").json()
    assert (t["wins"], t["losses"]) == (0, 1)
