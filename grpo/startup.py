"""What a training run starts with, before its first step: the backend with the models placed, the
tokenizer, the prompts, the reward scorer (its canaries and the reward-hack probe checked), the rollout
engine and the step hooks. The run's derived sizes are printed once, and bad combinations are refused with
what to change. Knows nothing of the step itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from accelerate.utils import set_seed

from grpo.backend import Backend, Models, make_backend
from grpo.backend.accelerator import resolved_precision
from grpo.backend.cpu import install_cpu_kernels
from grpo.data import PromptSampler, load_examples
from grpo.hooks import Hooks, make_hooks
from grpo.modeling.loading import load_tokenizer
from grpo.rollout import RolloutEngine, make_engine
from grpo.scoring.probe import probe_report
from grpo.scoring.rules import user_code_digest
from grpo.scoring.scorer import Scorer
from grpo.tools.calls import tool_prompt


@dataclass
class Run:
    backend: Backend
    models: Models
    tokenizer: object
    sampler: PromptSampler  # the training prompts, in a resumable order
    eval_examples: list[dict]
    scorer: Scorer  # owns reward worker processes: close() it
    engine: RolloutEngine
    hooks: Hooks
    mtp: object | None  # model.mtp: the MTP module's hook (grpo.hooks.mtp.MTPHook), saved with the model
    startup_seconds: float  # start_run's wall time: models, data, reward checks, engine


def start_run(cfg) -> Run:
    """Seed, choose the backend, load tokenizer, data and models, check the reward rules."""
    started = time.perf_counter()
    set_seed(cfg.train.seed)
    backend = make_backend(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tools = tool_prompt(cfg, tokenizer)
    train_examples, dropped = load_examples(cfg.data.path, cfg.data.split, cfg.data.max_samples, cfg.data, tokenizer,
                                            tools)
    eval_examples = []
    if cfg.eval.path is not None:
        eval_examples, _ = load_examples(cfg.eval.path, cfg.eval.split, cfg.eval.num_prompts, cfg.data, tokenizer,
                                         tools)
    scorer = Scorer(cfg.rewards, cfg.scoring)
    try:
        if cfg.scoring.canary:
            scorer.check_canaries()
        if cfg.scoring.probe_rows and backend.is_main_process:
            print(probe_report(scorer, train_examples[:cfg.scoring.probe_rows], tokenizer, cfg.data.path)[0])
        models = backend.prepare(micro_batches=_micro_batches(cfg, backend.num_processes))
        mtp = _start_mtp(cfg, backend, models)
    except BaseException:
        scorer.close()
        raise
    hooks = make_hooks(models.model, cfg, backend, mtp)
    run = Run(backend, models, tokenizer, PromptSampler(train_examples, cfg.train.seed, cfg.data.shuffle),
              eval_examples, scorer, _start_engine(cfg, tokenizer, backend, mtp), hooks, mtp, startup_seconds=0.0)
    run.startup_seconds = time.perf_counter() - started
    _describe(cfg, backend, len(train_examples), dropped, len(eval_examples))
    return run


def _start_mtp(cfg, backend: Backend, models: Models):
    """model.mtp's module (saved beside the model, or new) and the hook that trains it; None without it."""
    if cfg.model.mtp is None:
        return None
    if backend.num_processes > 1:
        raise ValueError("model.mtp runs on one process for now; launch one process")
    from grpo.hooks.mtp import MTPHook
    from grpo.modeling.mtp import start_mtp

    module = start_mtp(cfg.model, models.model)
    if backend.device.type == "cpu" and cfg.train.onednn_linear:
        install_cpu_kernels(module)  # drafting runs without gradient, as decoding does
    return MTPHook(module, cfg, backend.device)


def _start_engine(cfg, tokenizer, backend: Backend, mtp=None) -> RolloutEngine:
    """The rollout engine, started from the policy's whole weights (collective when sharded); with
    rollout.speculative=mtp it drafts with the MTP module."""
    with backend.whole_model() as whole:
        engine = make_engine(cfg, whole, tokenizer, backend.autocast,
                             mtp=None if mtp is None or cfg.rollout.speculative != "mtp" else mtp.module)
    if engine.startup_seconds:
        backend.print(f"rollout engine {cfg.rollout.engine}: started in {engine.startup_seconds:.1f} s")
    return engine


def _micro_batches(cfg, W: int) -> int:
    """Micro-batches per process and step; refuses a batch that does not split into W processes."""
    B, G, mb = cfg.train.prompts_per_step, cfg.rollout.num_generations, cfg.train.micro_batch_size
    if B % W or (B // W * G) % mb:
        raise ValueError(f"train.prompts_per_step={B} must split into {W} processes of whole micro-batches "
                         f"({B // W} prompts x {G} completions each, micro_batch_size {mb}); "
                         f"use a multiple of {W} prompts per step")
    if W > 1 and cfg.algorithm.dynamic_sampling:
        raise ValueError("algorithm.dynamic_sampling runs on one process only for now; launch one process")
    return B // W * G // mb


def _describe(cfg, backend: Backend, num_train: int, dropped: dict, num_eval: int) -> None:
    if not backend.is_main_process:
        return
    B, G, N, W = cfg.train.prompts_per_step, cfg.rollout.num_generations, cfg.completions_per_step, backend.num_processes
    print(f"device {backend.device} x {W} processes, mixed precision {resolved_precision(cfg.train)}"
          f"{' (auto)' if cfg.train.mixed_precision == 'auto' else ''}; "
          f"{num_train} training prompts ({dropped['too_long']} over-long and "
          f"{dropped['incomplete']} incomplete rows dropped), {num_eval} eval prompts")
    print(f"per step: {B} prompts x {G} completions = {N} completions, up to "
          f"{N * cfg.rollout.max_completion_length} new tokens, {N // W // cfg.train.micro_batch_size} "
          f"micro-batches of {cfg.train.micro_batch_size} per process; {cfg.train.max_steps} steps")
    for spec in cfg.rewards:
        if (digest := user_code_digest(spec.fn)) is not None:
            print(f"reward {spec.label}: user code {spec.fn} sha256 {digest}")
