"""`grpo` command line: train, validate, rewards."""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys
from pathlib import Path

from grpo.config import describe, load_config, to_yaml
from grpo.errors import UserError

USAGE_EXAMPLES = """examples:
  grpo train configs/quickstart.yaml
  grpo train configs/quickstart.yaml train.max_steps=5 rollout.num_generations=4
  grpo validate configs/r1_zero_gsm8k.yaml
  grpo validate --doc          # every config field with its type, default and meaning
  grpo rewards                 # the built-in reward rules
  grpo rewards --probe configs/quickstart.yaml   # what completions that game the rules would earn
  grpo eval configs/quickstart.yaml --checkpoint runs/quickstart/final
  grpo report runs/quickstart  # PNG curves and an HTML summary
"""


def main(argv: list[str] | None = None) -> int:
    """The command line. Errors in the user's input (grpo.errors.UserError: config, data, reward file, model
    path) print one message and return 2; --debug or GRPO_DEBUG=1 shows their traceback."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra  # overrides after an option (`--checkpoint DIR key=value`)
    try:
        return _run(args, parser)
    except UserError as e:
        if args.debug or os.environ.get("GRPO_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="GRPO training for language models.",
                                     epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("train", "train a policy with GRPO"),
                            ("validate", "check a config and its input files; loads no model, but imports "
                                         "(runs) the reward files it names"),
                            ("eval", "evaluate a model or checkpoint on eval.path"),
                            ("sft", "supervised fine-tuning on prompt/response data"),
                            ("generate", "rejection sampling: sample, score, keep the passing samples"),
                            ("pipeline", "run a config's stages: (sft, train, generate, eval) in order"),
                            ("distill", "teacher generates and filters, student is fine-tuned and evaluated")]:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", nargs="?", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=5")
        if name == "validate":
            p.add_argument("--doc", action="store_true", help="print every config field with its doc and exit")
        elif name in ("eval", "generate"):
            p.add_argument("--checkpoint", help="a saved model folder (checkpoint-<step> or final); default: model.*")
        elif name in ("train", "sft"):
            p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                           help="continue from the latest checkpoint in train.output_dir, or from CHECKPOINT")
    rewards_parser = sub.add_parser("rewards", help="list the built-in reward rules, or probe a config's rules for hacks")
    rewards_parser.add_argument("--probe", metavar="CONFIG",
                                help="score completions that game the config's rules (restated question, copied "
                                     "numbers, empty tags, ...) beside its gold answers; exit 1 when one is flagged")
    rewards_parser.add_argument("overrides", nargs="*", help="dotted overrides for --probe's config")
    report = sub.add_parser("report", help="plot a run's curves and write an HTML summary")
    report.add_argument("output_dir", help="the run's train.output_dir")
    for p in [*sub.choices.values()]:
        p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    return parser


ONE_PROCESS = ("eval", "generate", "sft")


def _run(args, parser) -> int:
    if args.command == "rewards" and args.probe:
        return _probe(args.probe, args.overrides)
    if args.command == "rewards":
        import rewards

        for name, fn in sorted(rewards.BUILTINS.items()):
            doc = (inspect.getdoc(fn) or "").splitlines()[0]
            print(f"{name:<12} {fn.__name__}{inspect.signature(fn)}\n             {doc}")
        return 0
    if args.command == "report":
        from grpo.io.report import write_report

        try:
            print(f"report written to {write_report(args.output_dir)}")
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "validate" and args.doc:
        print(describe())
        return 0
    if args.config is None:
        parser.error(f"{args.command} needs a config file, e.g. grpo {args.command} configs/quickstart.yaml")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.command in ONE_PROCESS and world > 1:
        raise UserError(f"grpo {args.command} runs on one process, but this is one of {world} (WORLD_SIZE={world}): "
                        f"run it without accelerate launch / torchrun; only grpo train is data-parallel")
    if args.command in ("pipeline", "distill"):
        from grpo.config import load_pipeline
        from grpo.commands.pipeline import run_pipeline

        stages = load_pipeline(args.config, args.overrides, distill=args.command == "distill")
        for name, summary in run_pipeline(stages).items():
            print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
        return 0
    if isinstance(getattr(args, "resume", None), str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume a.b=c`: a flag followed by an override
        args.resume = True
    cfg = load_config(args.config, args.overrides)
    if args.command == "validate":
        print(to_yaml(cfg), end="")
        print(f"{args.config}: valid ({cfg.completions_per_step} completions per step, "
              f"{len(cfg.rewards)} reward rules)", file=sys.stderr)
        return 0
    if args.command == "eval":
        import json

        from grpo.commands.evaluate import evaluate_checkpoint
        from grpo.evaluate import format_samples

        evaluation = evaluate_checkpoint(cfg, args.checkpoint)
        print(f"greedy completions ({cfg.eval.reward} score):\n"
              + format_samples({args.checkpoint or cfg.model.name_or_path: evaluation.samples}), file=sys.stderr)
        print(json.dumps(evaluation.metrics, indent=2))
        return 0
    if args.command == "generate":
        from grpo.commands.rejection import generate_dataset

        generate_dataset(cfg, args.checkpoint)
        return 0
    if args.command == "sft":
        from grpo.commands.sft import sft

        sft(cfg, resume=args.resume)
        return 0
    from grpo.trainer import train  # heavy imports only when training

    import torch.distributed as dist

    try:
        train(cfg, resume=args.resume)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no process tears its process group down while another still talks to it
    except BaseException as e:
        if world > 1:  # the launcher stops the other processes when this one exits
            print(f"rank {os.environ.get('RANK', 0)} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            # Free the DDP reducer and any gloo work it still holds while the interpreter is whole: gloo's C++
            # threads releasing tensors during interpreter teardown abort the process ("terminate called
            # without an active exception").
            gc.collect()
            dist.destroy_process_group()
    return 0


def _probe(config: str, overrides: list[str]) -> int:
    """`grpo rewards --probe CONFIG`: the reward-hack probe on the config's first scoring.probe_rows rows."""
    from grpo.data import load_examples
    from grpo.modeling.loading import load_tokenizer
    from grpo.scoring.probe import probe_report
    from grpo.scoring.scorer import Scorer
    from grpo.tools.calls import tool_prompt

    cfg = load_config(config, overrides)
    tokenizer = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data.path, cfg.data.split, max(cfg.scoring.probe_rows, 1), cfg.data, tokenizer,
                                tool_prompt(cfg, tokenizer))
    scorer = Scorer(cfg.rewards, cfg.scoring)
    try:
        report, flagged = probe_report(scorer, examples, tokenizer, cfg.data.path)
    finally:
        scorer.close()
    print(report)
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
