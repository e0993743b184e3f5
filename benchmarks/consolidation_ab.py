"""A/B: the pre-consolidation training code (old) vs main (new), same config, alternating, one sitting.

Usage: PYTHONPATH=SRC_DIR python benchmarks/consolidation_ab.py LABEL OUT_DIR STEPS
(SRC_DIR: a checkout's src/, e.g. a git worktree of 859054c for "old"; main's for "new")
Prints one JSON line: the logged losses and tokens/s of the first STEPS steps.
"""
import json
import sys
import time
from pathlib import Path

from tinysft.config import load_config, parse_overrides

src, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

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
