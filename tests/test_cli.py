"""Bad input at the command line ends in one message naming what is wrong and exit 2, never a traceback;
options and overrides go in any order; commands that run on one process say so under a multi-process launch."""

import json
import socket
import subprocess
import sys

import pytest

from grpo.commands.cli import main

from conftest import ROOT

QUICKSTART = str(ROOT / "configs/quickstart.yaml")


def test_a_row_without_its_answer_names_file_and_row(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n"
                    + json.dumps({"question": "What is 2 + 2?"}) + "\n")
    assert main(["train", QUICKSTART, f"model.name_or_path={tiny_model_dir}", f"data.path={data}", "eval.path=null",
                 f"train.output_dir={tmp_path / 'run'}", "logging.wandb=disabled"]) == 2
    err = capsys.readouterr().err
    assert f"error: {data}: 1 rows lack a value" in err and "row 1" in err and "Traceback" not in err


def test_a_missing_data_file_stops_before_any_model_loads(tmp_path, capsys):
    assert main(["train", QUICKSTART, "data.path=/nonexistent.jsonl", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.path: file /nonexistent.jsonl does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "config.yaml").exists()


def test_a_model_that_is_neither_local_nor_reachable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as good as an unreachable hub, and the same answer everywhere
    assert main(["train", QUICKSTART, "model.name_or_path=nobody/no-such-model", "eval.path=null",
                 f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path 'nobody/no-such-model' is not a folder under" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):  # --debug shows the traceback
        main(["train", QUICKSTART, "model.name_or_path=nobody/no-such-model", "eval.path=null",
              f"train.output_dir={tmp_path}", "--debug"])


def test_overrides_after_options(tiny_model_dir, capsys):
    assert main(["eval", QUICKSTART, "--checkpoint", str(tiny_model_dir), f"eval.path={ROOT / 'data/arithmetic/test.jsonl'}",
                 "eval.num_prompts=2", "scoring.workers=0", "train.mixed_precision=fp32"]) == 0
    assert json.loads(capsys.readouterr().out)["eval/accuracy"] >= 0.0
    with pytest.raises(SystemExit):
        main(["eval", QUICKSTART, "--checkpoint", str(tiny_model_dir), "--nonsense"])


@pytest.mark.parametrize("command", ["eval", "generate", "sft"])
def test_one_process_commands_refuse_a_multi_process_launch(command, tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           port, "-m", "grpo", command, QUICKSTART, f"model.name_or_path={tiny_model_dir}",
                           f"train.output_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert f"grpo {command} runs on one process, but this is one of 2 (WORLD_SIZE=2)" in done.stderr
    assert "/grpo/" not in "".join(line for line in done.stderr.splitlines() if 'File "' in line)  # only the
    # launcher's own traceback (torchrun reports its failed children with one)
    assert not any(tmp_path.iterdir()), "a process wrote output"
