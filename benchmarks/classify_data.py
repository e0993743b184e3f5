"""Public classification sets for the classification sweep and baselines, from registry packages.

Two sets of different kinds, neither written by this project, each as a balanced 100-row training
split and a disjoint 100-row test split (seed 0) of {"text", "label"} JSONL rows:

- ``movie-sentiment``: the 10,605 Rotten Tomatoes review snippets (Pang & Lee 2005) with the mean
  of 20 human sentiment ratings (-4..4) each, shipped in the vaderSentiment sdist (MIT licence) as
  additional_resources/hutto_ICWSM_2014.tar.gz (Hutto & Gilbert, ICWSM 2014). Label "positive" when
  the mean is >= 1, "negative" when <= -1; the 13% of snippets in between (mixed or neutral) are left
  out. Short movie-review sentences; not IMDB (kept for independent checks).
- ``chat-topics``: the English ChatterBot corpus (chatterbot-corpus wheel, BSD-3-Clause): the first
  utterance of each dialogue (duplicates dropped), labelled with its category file; the four
  categories with at least 50 distinct openings (ai, coding, psychology, trivia), 25 training + 25
  test rows each. Short user questions and remarks: a topic/intent task.

The files are fetched with ``pip download`` (no install) into a cache and the splits are written
under ``--out`` (default benchmarks/data/, not committed: run this script to make them).

    python benchmarks/classify_data.py            # -> benchmarks/data/{movie-sentiment,chat-topics}/{train,test}.jsonl
                                                  #    and movie-sentiment/test-large.jsonl (1,000 rows)
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "tinysft" / "bench-downloads"
PACKAGES = {"vader": ("vaderSentiment==3.3.2", True), "chatterbot": ("chatterbot-corpus==1.3.3", False)}
SETS = ("movie-sentiment", "chat-topics")


def download(key: str) -> Path:
    """The package file from PyPI (cached), without installing it."""
    spec, sdist = PACKAGES[key]
    folder = CACHE / key
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    if not files:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec]
        cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        subprocess.run(cmd, check=True)
        files = sorted(folder.glob("*"))
    return files[0]


def movie_sentiment() -> dict[str, list[str]]:
    """label -> texts, from the vaderSentiment sdist's human-rated movie-review snippets."""
    with tarfile.open(download("vader")) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_member).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        text = inner.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
    out: dict[str, list[str]] = {"negative": [], "positive": []}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        score, snippet = float(parts[1]), parts[2].strip()
        if score >= 1:
            out["positive"].append(snippet)
        elif score <= -1:
            out["negative"].append(snippet)
    return out


def chat_topics() -> dict[str, list[str]]:
    """label -> texts: first utterances of the ChatterBot corpus's four largest English categories."""
    import yaml

    out: dict[str, list[str]] = {}
    with zipfile.ZipFile(download("chatterbot")) as wheel:
        for name in ("ai", "coding", "psychology", "trivia"):
            data = yaml.safe_load(wheel.read(f"chatterbot_corpus/data/english/{name}.yml"))
            firsts = [str(c[0]).strip() for c in data["conversations"] if c and str(c[0]).strip()]
            out[name.replace("_", " ")] = list(dict.fromkeys(firsts))  # dedupe, keep order
    return out


def balanced_split(by_label: dict[str, list[str]], n_train: int, n_test: int, seed: int = 0
                   ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint, label-balanced train/test rows, shuffled with ``seed``."""
    rng = random.Random(seed)
    train, test = [], []
    per_train, per_test = n_train // len(by_label), n_test // len(by_label)
    for label in sorted(by_label):
        texts = list(by_label[label])
        rng.shuffle(texts)
        if len(texts) < per_train + per_test:
            raise SystemExit(f"{label}: only {len(texts)} texts, need {per_train + per_test}")
        train += [{"text": t, "label": label} for t in texts[:per_train]]
        test += [{"text": t, "label": label} for t in texts[per_train : per_train + per_test]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_sets(out: Path, n_train: int = 100, n_test: int = 100, n_large_test: int = 1000) -> dict[str, Path]:
    """Write every set's train.jsonl / test.jsonl under ``out``, and test-large.jsonl (``n_large_test``
    rows, disjoint from train, containing test.jsonl) where the set is big enough; returns set name -> folder."""
    folders = {}
    for name, make in (("movie-sentiment", movie_sentiment), ("chat-topics", chat_topics)):
        by_label = make()
        train, test = balanced_split(by_label, n_train, n_test)
        splits = [("train", train), ("test", test)]
        if all(len(v) >= (n_train + n_large_test) // len(by_label) for v in by_label.values()):
            large_train, large_test = balanced_split(by_label, n_train, n_large_test)
            assert large_train == train  # same seed and order: the same training rows
            splits.append(("test-large", large_test))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in splits:
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                  encoding="utf-8")
        folders[name] = folder
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    for name, folder in write_sets(args.out).items():
        print(f"{name}: {folder}/train.jsonl, {folder}/test.jsonl")


if __name__ == "__main__":
    main()
