"""Blind votes from the web page: the votes file, the tally, and votes turned into training rows.

The votes file is ``RUN/votes.jsonl``, append-only, one JSON object per vote:

    {"time": "2026-12-07T04:10:00Z", "models": {"reference": "base @ polite", "candidate": "polite @ polite"},
     "history": {"reference": [messages...], "candidate": [messages...]},   # what each side was asked
     "answers": {"reference": "...", "candidate": "..."}, "shown": {"A": "candidate", "B": "reference"},
     "pick": "A" | "B" | "tie" | "both_bad", "winner": "candidate" | "reference" | "tie" | "both_bad",
     "settings": {"temperature": 0.7, "max_tokens": 128}}

"reference" is the base model (or the first run when two are compared), "candidate" the tuned
model (or the second run). Each side keeps its own conversation, so the histories can differ after
the first turn. A vote is one ``write`` of one line; a line cut short (a crash mid-write) is skipped
on read and the next vote starts on a fresh line, so no other vote is lost.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

VOTES_FILE = "votes.jsonl"
SIDES = ("reference", "candidate")
Pick = Literal["A", "B", "tie", "both_bad"]
_append_lock = threading.Lock()  # votes from concurrent requests of one server never interleave


class VotesError(ValueError):
    """A votes file or an export that cannot be used; the message says why and what to do."""


def votes_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / VOTES_FILE


def read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file that is appended to while read: lines that do not parse
    (one cut short by a crash, or still being written) are skipped. A missing file is empty."""
    if not path.is_file():
        return []
    rows = []
    with path.open("rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_votes(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable vote of a run, oldest first."""
    return [v for v in read_jsonl_tolerant(votes_path(run_dir)) if v.get("winner") in (*SIDES, "tie", "both_bad")]


def append_vote(run_dir: str | Path, vote: dict[str, Any]) -> None:
    """Append one vote as one line. If the file's last line was cut short, the vote starts on a new
    line, so the damaged line stays one unreadable line and the new vote stays whole."""
    path = votes_path(run_dir)
    line = json.dumps(vote, ensure_ascii=False) + "\n"
    with _append_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with path.open("rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = "\n" + line
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def make_vote(models: dict[str, str], history: dict[str, list[dict[str, str]]], answers: dict[str, str],
              shown: dict[str, str], pick: Pick, settings: dict[str, Any]) -> dict[str, Any]:
    """The record of one vote; ``winner`` resolves the blind pick ("A"/"B") to the side it showed."""
    if sorted(shown) != ["A", "B"] or sorted(shown.values()) != sorted(SIDES):
        raise VotesError('shown must map "A" and "B" to "reference" and "candidate", one each.')
    winner = shown[pick] if pick in ("A", "B") else pick
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": models, "history": history,
            "answers": answers, "shown": shown, "pick": pick, "winner": winner, "settings": settings}


# ---- tally ---------------------------------------------------------------------------------------
def wilson_interval(wins: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a win rate ``wins / n`` (None when n is 0).

    Unlike the normal approximation it stays inside [0, 1] and is sensible for small n and for
    rates of 0 or 1, which a handful of votes often gives.
    """
    if n <= 0:
        return None
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    wins: int  # the candidate (tuned) was picked
    losses: int  # the reference (base) was picked
    ties: int
    both_bad: int
    win_rate: float | None  # wins / (wins + losses); ties and both-bad are not decided
    ci95: tuple[float, float] | None  # Wilson interval of win_rate

    @property
    def decided(self) -> int:
        return self.wins + self.losses

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decided": self.decided, "votes": self.decided + self.ties + self.both_bad}


def tally(votes: list[dict[str, Any]], models: dict[str, str] | None = None) -> Tally:
    """Count votes (only those between ``models``, when given: a file can hold votes of several pairs)."""
    counts = {"candidate": 0, "reference": 0, "tie": 0, "both_bad": 0}
    for v in votes:
        if models is None or v.get("models") == models:
            counts[v["winner"]] += 1
    wins, losses = counts["candidate"], counts["reference"]
    n = wins + losses
    return Tally(wins, losses, counts["tie"], counts["both_bad"], wins / n if n else None, wilson_interval(wins, n))


# ---- export --------------------------------------------------------------------------------------
def training_rows(votes: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Decided votes as training rows, and how many decided votes were skipped.

    A row is the winner's conversation ending with its answer as the assistant turn, and the
    loser's answer as ``rejected`` (the format `tinysft train` reads for its preference term).
    Skipped: a vote whose answers are equal (no preference to learn) or where either is blank.
    """
    rows, skipped = [], 0
    for v in votes:
        winner = v.get("winner")
        if winner not in SIDES:
            continue
        loser = "reference" if winner == "candidate" else "candidate"
        answers, history = v.get("answers") or {}, (v.get("history") or {}).get(winner)
        chosen, rejected = answers.get(winner), answers.get(loser)
        if (not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip()
                or not rejected.strip() or chosen.strip() == rejected.strip() or not _valid_history(history)):
            skipped += 1
            continue
        rows.append({"messages": [*history, {"role": "assistant", "content": chosen}], "rejected": rejected,
                     "voted_at": v.get("time")})
    return rows, skipped


def _valid_history(history: Any) -> bool:
    return (isinstance(history, list) and bool(history)
            and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in history)
            and history[-1]["role"] == "user")


def export_votes(run_dir: str | Path, out: str | Path) -> tuple[int, int]:
    """Write a run's decided votes to ``out`` as training rows (JSONL); return (rows, skipped).

    Refuses, writing nothing, when there is no decided vote, or when ``out`` exists (it is never
    overwritten) or is the votes file itself.
    """
    from tinysft.files import atomic_write_text

    run, out = Path(run_dir), Path(out)
    if not run.is_dir():
        raise VotesError(f"{run}: no such run folder — pass the folder you opened with `tinysft ui`.")
    source = votes_path(run)
    if not source.is_file():
        raise VotesError(f"{source}: no votes yet — open `tinysft ui {run}`, turn on blind mode and vote.")
    if out.exists():
        raise VotesError(f"{out} already exists; choose another --out (tinysft does not overwrite it).")
    rows, skipped = training_rows(read_votes(run))
    if not rows:
        raise VotesError(f"{source}: no decided votes to export ({skipped} skipped: equal or blank answers); "
                         "votes for A or B become rows, ties and both-bad do not.")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows), skipped
