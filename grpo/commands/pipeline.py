"""`grpo pipeline CONFIG`: run DeepSeek-R1-style stages (sft -> train -> generate -> sft -> ...) in order,
each starting from an earlier stage's model or data. A finished stage leaves a DONE file and is not run again
on restart; an unfinished train or sft stage continues from its latest checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from grpo.io.checkpoint import latest_checkpoint
from grpo.config import Stage, to_yaml

DONE = "DONE"


def run_stage(stage: Stage) -> dict:
    """Run one stage; its summary. An eval stage also writes its first greedy completions to eval_samples.json."""
    from grpo.commands.evaluate import evaluate_checkpoint
    from grpo.commands.rejection import generate_dataset
    from grpo.commands.sft import sft
    from grpo.trainer import train

    out = Path(stage.config.train.output_dir)
    resume = out.is_dir() and (out / "latest").is_file() and latest_checkpoint(out) is not None
    if stage.run == "train":
        return train(stage.config, resume=resume)
    if stage.run == "sft":
        return sft(stage.config, resume=resume)
    if stage.run == "generate":
        return {"dataset": str(generate_dataset(stage.config))}
    evaluation = evaluate_checkpoint(stage.config, None)
    (out / "eval_samples.json").write_text(json.dumps(evaluation.samples, indent=1))
    return evaluation.metrics


def run_pipeline(stages: list[Stage]) -> dict[str, dict]:
    results = {}
    for i, stage in enumerate(stages, 1):
        out = Path(stage.config.train.output_dir)
        if (out / DONE).is_file():
            print(f"stage {i}/{len(stages)} {stage.name} ({stage.run}): done before, skipped")
            results[stage.name] = json.loads((out / DONE).read_text())
            continue
        print(f"stage {i}/{len(stages)} {stage.name} ({stage.run}) -> {out}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stage_config.yaml").write_text(to_yaml(stage.config))
        started = time.perf_counter()
        summary = {k: v for k, v in run_stage(stage).items() if isinstance(v, (int, float, str))}
        summary["seconds"] = time.perf_counter() - started
        (out / DONE).write_text(json.dumps(summary))
        results[stage.name] = summary
    return results
