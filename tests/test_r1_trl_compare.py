"""scripts/r1_trl_compare.py keeps finished runs only for the SFT model and GRPO settings they were made with."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import load_script


@pytest.fixture
def compare(tmp_path, monkeypatch):
    module = load_script("r1_trl_compare")
    pipeline = tmp_path / "pipeline"
    (pipeline / "rl").mkdir(parents=True)
    (pipeline / "cold_start" / "final").mkdir(parents=True)
    (pipeline / "cold_start" / "final" / "model.safetensors").write_bytes(b"weights")
    (pipeline / "rl" / "stage_config.yaml").write_text(yaml.safe_dump(
        {"model": {"name_or_path": str(pipeline / "cold_start" / "final")}, "optim": {"lr": 1e-5},
         "train": {"output_dir": str(pipeline / "rl"), "seed": 42}}))
    monkeypatch.setattr(module, "PIPELINE", pipeline)
    runs = tmp_path / "runs"
    (runs / "grpo-0").mkdir(parents=True)
    (runs / "grpo-0" / "results.json").write_text(json.dumps({"reward": [0.5]}))
    return module, pipeline, runs


def test_runs_are_kept_and_refused_when_the_model_or_the_settings_change(compare):
    module, pipeline, runs = compare
    module.keep(runs)
    (runs / "grpo-0" / "results.json").unlink()  # from now on only the archive holds the run
    run = {"grpo-0": {"reward": [0.5], "sft_model_sha256": module.sft_model_hash()}}
    assert module.finished(runs) == run

    config = pipeline / "rl" / "stage_config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["train"]["output_dir"] = "elsewhere"  # paths do not count
    config.write_text(yaml.safe_dump(settings))
    assert module.finished(runs) == run

    settings["optim"]["lr"] = 2e-5
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(SystemExit, match="other GRPO settings"):
        module.finished(runs)
    settings["optim"]["lr"] = 1e-5
    config.write_text(yaml.safe_dump(settings))

    (pipeline / "cold_start" / "final" / "model.safetensors").write_bytes(b"other weights")
    module.sft_model_hash.cache_clear()
    with pytest.raises(SystemExit, match="another SFT model"):
        module.finished(runs)


def test_each_run_keeps_the_sft_build_it_started_from(compare):
    module, pipeline, runs = compare
    module.keep(runs)
    first = module.sft_model_hash()
    (pipeline / "cold_start" / "final" / "model.safetensors").write_bytes(b"the same model, rebuilt elsewhere")
    module.sft_model_hash.cache_clear()
    (runs / "grpo-0" / "results.json").unlink()
    (runs / "trl-1").mkdir()
    (runs / "trl-1" / "results.json").write_text(json.dumps({"reward": [0.25]}))
    with pytest.raises(SystemExit, match=f"another SFT model.*{first}"):
        module.finished(runs)
    module.SAME_SFT_AS.add(first)
    try:
        module.keep(runs)
        done = module.finished(runs)
    finally:
        module.SAME_SFT_AS.clear()
    assert done["grpo-0"] == {"reward": [0.5], "sft_model_sha256": first}
    assert done["trl-1"] == {"reward": [0.25], "sft_model_sha256": module.sft_model_hash()}


def test_rank_sum_p_by_hand():
    rank_sum_p = load_script("r1_trl_compare").rank_sum_p
    # ranks of a: 1, 2 -> W = 3, E[W] = 5; of the 6 picks of 2 ranks from 1-4 only {1, 2} and {3, 4} are as far
    assert rank_sum_p([1.0, 2.0], [3.0, 4.0]) == pytest.approx(2 / 6)
    # ties: a = [1, 2], b = [2, 3] -> mid-ranks 1, 2.5, 2.5, 4; W = 3.5, E[W] = 5; picks with |W' - 5| >= 1.5:
    # {1, 2.5} twice (3.5) and {2.5, 4} twice (6.5) of 6
    assert rank_sum_p([1.0, 2.0], [2.0, 3.0]) == pytest.approx(4 / 6)
    assert rank_sum_p([0.3, 0.3], [0.3, 0.3]) == 1.0
