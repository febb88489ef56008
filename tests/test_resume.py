"""Checkpoints that resume exactly: SIGKILL at any point, a crash during a save, SIGTERM, changed configs."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from grpo.commands.cli import main
from grpo.config import ConfigError, load_config
from grpo.trainer import train

from conftest import ROOT

STEPS = 30


@pytest.fixture(scope="module")
def base_args(tiny_model_dir, length_rule):
    rules = length_rule
    return [
        str(ROOT / "configs/quickstart.yaml"),
        f"model.name_or_path={tiny_model_dir}", f"data.path={ROOT / 'data/arithmetic/train.jsonl'}",
        "data.max_samples=64", "eval.path=null", f"rewards=[{{fn: '{rules}:length_reward'}}]",
        "rollout.num_generations=4", "rollout.max_completion_length=8", "train.prompts_per_step=2",
        "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.save_every=1", "optim.lr=1e-2",
        "logging.wandb=disabled", "train.mixed_precision=fp32", "scoring.workers=0", "algorithm.beta=0.04",
    ]


def cfg_for(args, out):
    return load_config(args[0], [*args[1:], f"train.output_dir={out}"])


def weights(folder):
    return load_file(folder / "model.safetensors")


def steady_metrics(out):
    """metrics.jsonl without the timings, which differ from run to run (start-up is in a run's first record)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "startup/")) and k != "step_time"}
            for r in records]


@pytest.fixture(scope="module")
def reference_run(base_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(cfg_for(base_args, out))
    return out


def assert_same_run(out, reference_run):
    a, b = weights(out / "final"), weights(reference_run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    assert steady_metrics(out) == steady_metrics(reference_run)


def test_same_seed_gives_identical_metrics(base_args, reference_run, tmp_path):
    train(cfg_for(base_args, tmp_path))
    assert_same_run(tmp_path, reference_run)


def launch(args, out):
    return subprocess.Popen([sys.executable, "-m", "grpo", "train", *args, f"train.output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sigkill_then_resume_is_bit_identical(base_args, reference_run, tmp_path):
    process = launch(base_args, tmp_path)
    wait_for(tmp_path / "checkpoint-3", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "final").exists(), "the run finished before it could be killed"
    killed_at = int((tmp_path / "latest").read_text().split("-")[1])
    assert killed_at < STEPS
    assert main(["train", *base_args, f"train.output_dir={tmp_path}", "--resume"]) == 0
    assert_same_run(tmp_path, reference_run)


def test_crash_during_a_save_then_resume_is_bit_identical(base_args, reference_run, tmp_path, monkeypatch):
    import grpo.io.checkpoint

    real_save, calls = grpo.io.checkpoint.torch.save, []

    def crash_on_fifth(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 5:  # model and tokenizer of checkpoint-5 are written, its trainer state is not
            raise SystemExit("killed during save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(grpo.io.checkpoint.torch, "save", crash_on_fifth)
    with pytest.raises(SystemExit):
        train(cfg_for(base_args, tmp_path))
    monkeypatch.setattr(grpo.io.checkpoint.torch, "save", real_save)
    assert (tmp_path / "checkpoint-5.tmp").is_dir() and not (tmp_path / "checkpoint-5").exists()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-4"
    train(cfg_for(base_args, tmp_path), resume=True)
    assert not (tmp_path / "checkpoint-5.tmp").exists()
    assert_same_run(tmp_path, reference_run)


def test_sigterm_saves_and_exits_cleanly(base_args, reference_run, tmp_path):
    process = launch(base_args, tmp_path)
    wait_for(tmp_path / "checkpoint-2", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM: finishing this step" in output and "grpo train CONFIG --resume" in output
    stopped = int((tmp_path / "latest").read_text().split("-")[1])
    last_logged = steady_metrics(tmp_path)[-1]["step"]
    assert stopped == last_logged  # the step in flight was finished and saved
    assert main(["train", *base_args, f"train.output_dir={tmp_path}", "--resume"]) == 0
    assert_same_run(tmp_path, reference_run)


def test_resume_refuses_changes_of_meaning_and_allows_harmless_ones(base_args, reference_run, tmp_path, capsys):
    checkpoint = reference_run / "checkpoint-3"
    with pytest.raises(ConfigError, match=r"rollout.num_generations: 4 in the checkpoint, 2 now; this changes"):
        train(load_config(base_args[0], [*base_args[1:], f"train.output_dir={tmp_path}", "rollout.num_generations=2",
                                         "train.micro_batch_size=2"]), resume=str(checkpoint))
    assert main(["train", *base_args, f"train.output_dir={tmp_path}", "train.max_steps=4", "logging.log_every=2",
                 "--resume", str(checkpoint)]) == 0
    printed = capsys.readouterr().out
    assert "resume: train.max_steps: 30 in the checkpoint, 4 now" in printed
    assert [r["step"] for r in steady_metrics(tmp_path)] == [4]


def test_keep_last_n_prunes_only_complete_older_checkpoints(base_args, tmp_path):
    train(cfg_for([*base_args, "train.max_steps=5", "train.keep_last_n=2"], tmp_path))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    state = torch.load(tmp_path / "checkpoint-5" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 5 and "optimizer" in state and "rng" in state


def test_nonfinite_losses_skip_updates_then_stop_with_a_dump(base_args, tiny_model_dir, tmp_path, monkeypatch):
    import grpo.algo.update

    real_loss = grpo.algo.update.policy_loss

    def nan_loss(*a, **k):
        loss, metrics = real_loss(*a, **k)
        return loss * float("nan"), metrics

    monkeypatch.setattr(grpo.algo.update, "policy_loss", nan_loss)
    with pytest.raises(RuntimeError, match=r"step 3: the loss or gradient was not finite for 3 steps in a row"):
        train(cfg_for([*base_args, "train.max_steps=5"], tmp_path))
    records = steady_metrics(tmp_path)
    assert [r["skipped_update"] for r in records] == [1.0, 1.0, 1.0]
    assert len((tmp_path / "nonfinite-step-3.jsonl").read_text().splitlines()) == 8
    before = weights(tiny_model_dir)
    after = weights(tmp_path / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in after)  # skipped updates never touched the weights
