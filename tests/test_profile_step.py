"""scripts/profile_step.py: a training run with its phases profiled after the warm-up step."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_profile_step_reports_each_phase_of_the_steps_after_the_first(tiny_model_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/profile_step.py"), str(ROOT / "configs/quickstart.yaml"),
         f"model.name_or_path={tiny_model_dir}", "data.max_samples=16", "eval.path=null", "logging.wandb=disabled",
         "scoring.probe_rows=0", "scoring.workers=0", "rollout.num_generations=4", "rollout.max_completion_length=4",
         "train.prompts_per_step=2", "train.micro_batch_size=4", "train.max_steps=3", "algorithm.beta=0.04",
         f"train.output_dir={tmp_path}", "--ops", "--rows", "5"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    for phase in ("rollout", "reference", "update"):
        match = re.search(rf"=== {phase}: ([0-9.]+), ([0-9.]+) s per step", done.stdout)
        assert match, f"no timings of steps 2 and 3 for {phase}:\n{done.stdout[-2000:]}"
        assert all(float(s) > 0 for s in match.groups())
    assert done.stdout.count("Self CPU time total") == 3  # one operator table per phase (no GPU: CPU only)
    assert "accumulate_gradients" in done.stdout  # cProfile's cumulative view of the update
