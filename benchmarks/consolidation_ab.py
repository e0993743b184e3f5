"""A/B: the pre-consolidation training code (old) vs main (new), same config, alternating, one sitting.

Usage: PYTHONPATH=SRC_DIR python benchmarks/consolidation_ab.py LABEL OUT_DIR STEPS
(SRC_DIR: a checkout's src/, e.g. a git worktree of 859054c for "old"; main's for "new")
Prints one JSON line: the logged losses and tokens/s of the first STEPS steps.
"""
import argparse
import json
import time
from pathlib import Path

from tinysft.config import load_config, parse_overrides

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("label", help='what this side is, printed back ("old", "new")')
parser.add_argument("out", type=Path, help="run directory to write")
parser.add_argument("steps", type=int, help="optimizer steps to time")
args = parser.parse_args()
src, out, steps = args.label, args.out, args.steps

try:
    from tinysft.training import train
except ImportError:
    from tinysft.train import train
cfg = load_config(Path(__file__).resolve().parents[1] / "examples/polite-helper/config.yaml", parse_overrides(["train.log_every=1", "train.threads=1"]))
t = time.time()
res = train(cfg, out, show_progress=False, log=lambda m: None, stop_after_steps=steps)
wall = time.time() - t
hist = [h for h in res.history if "loss" in h]
print(json.dumps({"src": src, "losses": [h["loss"] for h in hist], "tokens_per_s": hist[-1]["tokens_per_s"],
                  "pref": [h.get("preference_loss") for h in hist], "wall_s": round(wall, 1)}))
