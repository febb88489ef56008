"""Typed, frozen run configuration: the only module that reads YAML.

A config file plus dotted `a.b=c` overrides becomes one `Config` made of frozen dataclasses, one per
section. Every field has a default and a docstring under it (printed by `grpo validate --doc`). Loading
checks everything at once and raises `ConfigError` listing every problem with its fix: unknown keys (with the
nearest valid key), wrong types, impossible combinations, and reward rules that do not resolve. It loads no
model and knows nothing of training.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from grpo.errors import UserError


class ConfigError(UserError):
    """Every problem found in a config, each with where it is and how to fix it."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the config:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    """Rank of each adapter (the update of a weight W is (alpha / r) * B A with B [out, r], A [r, in])."""
    alpha: float = 32.0
    """Scale numerator: the adapter's update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapters' input; only 0 for now (the trained log-probs must be those sampled)."""
    target_modules: Union[str, list] = "all-linear"
    """Layers that get adapters: `all-linear` (every linear layer but the output head) or module names such
    as [q_proj, k_proj, v_proj, o_proj]."""
    merged_generation: bool = True
    """The built-in engine decodes with the adapters merged into the weights (faster: plain linear layers;
    holds a copy of the adapted layers' weights while it generates, restored exactly after). false: decode
    through the adapters, no copy."""


@dataclass(frozen=True)
class MTPConfig:
    layers: int = 1
    """MTP modules (prediction depth); DeepSeek-V3 uses 1, the only depth implemented."""
    weight: float = 0.3
    """lambda: `grpo sft` minimises the SFT loss + lambda x the MTP loss (DeepSeek-V3: 0.3, later 0.1). In GRPO the
    module alone learns its cross-entropy on the sampled completions (the policy's update is unchanged);
    0 freezes it there."""
    lr: Optional[float] = None
    """Learning rate of the MTP module's weights (its parameter group in `grpo sft`, its own AdamW in GRPO);
    null uses optim.lr. A fresh module learns faster than the model it drafts for may change."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    """A local Hugging Face folder, a hub id, a `.gguf` file, or the built-in `smollm2-135m-instruct`."""
    gguf_file: Optional[str] = None
    """File name of a GGUF model inside `name_or_path` when that is a folder or hub id holding several files."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. Keep float32 weights and set train.mixed_precision=bf16 for bf16 compute."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust the repo."""
    attn_implementation: Optional[str] = "sdpa"
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`); null lets it choose."""
    lora: Optional[LoraConfig] = None
    """Train LoRA adapters (peft) instead of all weights: {r, alpha, dropout, target_modules}; `{}` takes the
    defaults; null is full fine-tuning. The reference model is then the base model (adapters off)."""
    mtp: Optional[MTPConfig] = None
    """DeepSeek-V3's multi-token prediction module (grpo.modeling.mtp): {layers, weight, lr}; `{}` takes the
    defaults. Loaded from the model folder's mtp.safetensors when there is one, else initialised; trained by
    `grpo sft` and kept in step during GRPO; drafts rollout tokens with rollout.speculative=mtp."""


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/arithmetic/train.jsonl"
    """Training prompts: a local .jsonl/.json/.parquet/.csv file, a folder of them, or a hub dataset name."""
    split: str = "train"
    """Split to read from `path`."""
    prompt_column: str = "question"
    """Column holding the question text."""
    answer_column: str = "answer"
    """Column holding the gold answer that reward rules compare against (GSM8K's `... #### 18` works)."""
    template: Literal["chat", "r1_zero", "plain"] = "chat"
    """`chat`: the tokenizer's chat template; `r1_zero`: the DeepSeek-R1-Zero prompt; `plain`: `prompt_format` as is."""
    prompt_format: str = "{question}"
    """Text of the user turn; `{question}` is replaced by the prompt column, other `{column}`s by their row values."""
    system_prompt: Optional[str] = None
    """System message for the chat template; null keeps the tokenizer's default."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are an error (see `drop_long_prompts`)."""
    drop_long_prompts: bool = False
    """Drop over-long prompts (and count them) instead of stopping with an error."""
    drop_incomplete_rows: bool = False
    """Drop rows with an empty prompt or answer (and count them) instead of stopping with an error."""
    shuffle: bool = True
    """Shuffle prompts each epoch with the run's seed."""
    max_samples: Optional[int] = None
    """Use only the first N rows (before shuffling); null uses all."""


@dataclass(frozen=True)
class RolloutConfig:
    num_generations: int = 8
    """G: completions sampled per prompt; advantages are normalised within each group of G."""
    max_completion_length: int = 64
    """Most new tokens per completion; longer ones are cut and flagged truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs in the loss use logits divided by it too."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables)."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""
    speculative: Literal["none", "mtp"] = "none"
    """Built-in engine: `mtp` drafts the token after next with the model's MTP module (model.mtp) and verifies it
    with speculative sampling: the same distribution, up to 2 tokens per forward (docs/performance.md measures
    when that is faster)."""
    engine: Literal["builtin", "vllm"] = "builtin"
    """Who samples: the built-in KV-cached decoding loop, or vLLM colocated in each training process (needs the
    `vllm` extra; docs/performance.md compares them)."""
    vllm_kv_cache_gib: float = 1.0
    """engine vllm: memory for vLLM's KV cache, per process (without a bound it takes most of the machine)."""
    vllm_enforce_eager: bool = True
    """engine vllm: skip graph compilation (start-up in seconds instead of minutes; slower decoding)."""
    max_turns: int = 4
    """With `tools`: the most model turns in one completion (a tool call in the last one is not run)."""
    tool_format: Literal["auto", "template", "plain"] = "auto"
    """With `tools`: how calls and results are written: the chat template's tool messages (`template`), or
    <tool_call>/<tool_response> tags inside the assistant's turn (`plain`); auto: template when it has tools."""
    tool_workers: int = 2
    """With `tools`: worker processes that run tool calls in parallel; 0 runs them here (no time limit)."""
    tool_timeout: float = 10.0
    """With `tools`: seconds a call may run; past it its worker is killed and the model reads an error."""
    max_tool_result_chars: int = 2000
    """With `tools`: a result longer than this is cut (and says so) before it is tokenized."""


@dataclass(frozen=True)
class RewardSpec:
    fn: str = "accuracy"
    """A built-in rule from `rewards/` (see `grpo rewards`), `path/to/file.py:func`, or `package.module:func`."""
    weight: float = 1.0
    """Weight of this rule in the total reward (a weighted sum)."""
    name: Optional[str] = None
    """Name used in logs (`reward/<name>`); defaults to the function name."""
    kwargs: dict = field(default_factory=dict)
    """Keyword arguments passed to the rule; checked against its signature."""

    @property
    def label(self) -> str:
        return self.name or self.fn.rsplit(":", 1)[-1]


@dataclass(frozen=True)
class ToolSpec:
    fn: str = "calculator"
    """A built-in tool (`calculator`, `python`), `path/to/file.py:func`, or `package.module:func`: a function
    of keyword arguments returning text; its docstring's first paragraph and Args section describe it to the model."""
    name: Optional[str] = None
    """The name the model calls it by; defaults to the function name."""
    kwargs: dict = field(default_factory=dict)
    """Options bound to the function (not shown to the model), e.g. {timeout: 5} for `python`."""


@dataclass(frozen=True)
class ScoringConfig:
    workers: int = 2
    """Worker processes that run reward rules in parallel; 0 runs them in the training process (no timeouts)."""
    timeout: float = 10.0
    """Seconds a rule may spend on one completion; past it the worker is killed and the sample is an error."""
    max_error_fraction: float = 0.5
    """Stop the run when a rule fails on more than this fraction of its samples over `error_window` steps."""
    error_window: int = 10
    """Steps over which the error fraction is measured."""
    canary: bool = True
    """At start-up, check that each rule scores its declared correct sample above its wrong one."""
    probe_rows: int = 16
    """Training rows the reward-hack probe scores at start-up (grpo.scoring.probe; a table, and a warning for each
    gaming pattern that earns more than half of what gold answers earn); 0 skips it."""


@dataclass(frozen=True)
class AlgorithmConfig:
    beta: float = 0.04
    """KL penalty coefficient to the frozen reference policy; 0 loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator per token (Schulman's k1, k2, k3); DeepSeekMath uses k3."""
    epsilon: float = 0.2
    """Clip range: ratios outside [1 - epsilon, 1 + epsilon_high] stop contributing gradient."""
    epsilon_high: Optional[float] = None
    """Upper clip range (DAPO's clip-higher uses 0.28); null means `epsilon`."""
    loss_type: str = "grpo"
    """Token aggregation and policy term, a name registered in grpo.algo.loss.LOSS_TYPES (grpo, bnpo, dapo, cispo,
    dr_grpo): grpo = mean per completion then over completions; cispo = MiniMax-M1's truncated, detached
    importance weight times the log-prob (needs epsilon_high); see docs/algorithms.md."""
    baseline: Literal["mean", "rloo"] = "mean"
    """What a reward is centred by: its group's mean (GRPO) or the mean of the group's other rewards (RLOO)."""
    scale_rewards: Literal["group", "batch", "centred_batch", "none"] = "group"
    """Divide centred rewards by the group std, the batch std, the std of all centred rewards
    (REINFORCE++-baseline), or nothing (Dr. GRPO)."""
    num_iterations: int = 1
    """mu: optimizer updates per rollout batch; pi_old is captured once before them."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO) or one per completion from the mean token log-ratio (GSPO)."""
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "none"
    """Rollout/training mismatch correction with rho = pi_old / pi_rollout (the trainer's log-probs against the
    sampler's, per token or as exp of the mean per completion): truncate weights each token's policy loss by
    min(rho, cap); mask drops tokens (or whole completions) with rho outside [1/cap, cap]. See
    docs/algorithms.md."""
    rollout_correction_cap: float = 2.0
    """C of rollout_correction: the truncation cap and the mask bounds [1/C, C]; above 1."""
    top_entropy_quantile: float = 0.0
    """Train the policy term on high-entropy tokens only ("80/20"): tokens whose entropy is below this quantile
    of the batch's token entropies contribute no policy gradient (0.8 keeps the top 20%); 0 keeps all."""
    off_policy_mask_threshold: Optional[float] = None
    """DeepSeek-V3.2's off-policy sequence masking: completions with a negative advantage whose mean
    log-ratio old - current exceeds this contribute no policy gradient; null disables."""
    kl_is_correction: bool = False
    """DeepSeek-V3.2's importance-corrected KL: each token's KL estimate times pi_theta / pi_old, differentiated,
    so the KL term's gradient is that of KL(pi_theta || pi_ref) (k3 alone gives that of KL(pi_ref || pi_theta))."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """Where beta * KL goes: a term of the loss per token, or subtracted from each completion's reward."""
    ref_reset_every: int = 0
    """Copy the current policy into the reference model every N steps (0: never)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts until the batch is full."""
    max_sampling_rounds: int = 4
    """Most rollout rounds per step with dynamic_sampling; a step trains on what it has after them."""
    truncated_completions: Literal["keep", "mask", "penalize"] = "keep"
    """Completions cut at max_completion_length: train on them, leave them out of the loss, or apply
    DAPO's soft overlong penalty to their reward (see overlong_buffer)."""
    overlong_buffer: int = 0
    """penalize: completions within this many tokens of max_completion_length lose reward linearly, up to
    overlong_penalty at the limit (DAPO's soft overlong punishment); 0 penalises only truncated ones."""
    overlong_penalty: float = 1.0
    """penalize: the reward lost by a completion that reaches max_completion_length."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to `lr` over this many optimizer steps."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/grpo"
    """Folder for config.yaml, metrics.jsonl, checkpoints and the final model."""
    max_steps: int = 100
    """Training steps; each step samples `prompts_per_step` prompts x G completions."""
    time_limit: float = 0.0
    """Seconds of training steps (evaluations and loading not counted) after which the run ends as if
    max_steps were reached: final evaluation, final model. 0: no limit. For equal-time comparisons."""
    prompts_per_step: int = 8
    """B: prompts per step, so B * G completions per step."""
    micro_batch_size: int = 16
    """Completions per forward/backward pass; gradients accumulate to one update per step."""
    seed: int = 42
    """Seed for data order, sampling and initialisation."""
    mixed_precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Compute precision (autocast) for generation and training; bf16 pays on GPUs and CPUs with AVX-512 BF16
    (elsewhere a CPU emulates it, slower than fp32). auto: bf16 where the hardware computes it natively
    (a bf16-capable GPU, a CPU with AVX-512 BF16 or AMX), else fp32. fp16 needs a GPU."""
    share_prompt: bool = True
    """Run each group's prompt through the model once and let its G completions attend to it (exact)."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input in the training forward and recompute the layer in the backward
    (grpo.modeling.checkpointing): far less activation memory for about one more forward pass; same values."""
    save_every: int = 0
    """Write output_dir/checkpoint-<step> every N steps (0: only the final model)."""
    keep_last_n: int = 0
    """Keep only the newest N checkpoints (0 keeps all); older ones are removed after a new one is complete."""
    max_nonfinite_steps: int = 3
    """A NaN/inf loss or gradient skips its update; this many in a row stop the run with a dump of the rollouts."""
    cpu: bool = False
    """Stay on the CPU even when a GPU is present."""
    onednn_linear: bool = True
    """CPU only: passes without gradient (generation, reference and pi_old log-probs, evaluation) run linear
    layers through oneDNN with weights packed once per step (equal to rounding; about 2x faster decoding).
    Installed by the backend where every process holds whole weights (not under FSDP or ZeRO-3)."""
    reuse_host_memory: bool = True
    """CPU only: glibc malloc keeps freed large blocks for reuse instead of returning them to the kernel, so
    each micro-batch's tensors do not page-fault in again (`grpo.backend.allocator`; process-wide)."""


@dataclass(frozen=True)
class SFTConfig:
    response_column: str = "response"
    """`grpo sft`: column holding the target response; the loss covers its tokens (and the EOS) only."""
    batch_size: int = 16
    """`grpo sft`: examples per optimizer step, accumulated in micro-batches of train.micro_batch_size."""
    max_length: int = 1024
    """`grpo sft`: prompt + response tokens longer than this are cut from the end of the response."""
    packing: bool = False
    """`grpo sft`: pack several short examples into one row of up to max_length tokens; each attends only
    to itself (block-diagonal causal mask, positions restarting), so the loss equals the unpacked one."""


@dataclass(frozen=True)
class GenerateConfig:
    num_samples: int = 8
    """`grpo generate`: k completions sampled per prompt."""
    keep: Literal["threshold", "best", "all_passing"] = "threshold"
    """Which samples pass: `threshold` the first `max_per_prompt` scoring >= threshold; `best` the highest
    scoring one if it reaches threshold; `all_passing` every distinct one reaching threshold."""
    threshold: float = 1.0
    """Minimum total reward for a sample to pass."""
    max_per_prompt: int = 1
    """Most samples kept per prompt (`threshold`); `best` keeps one, `all_passing` all."""
    output: str = "generated.jsonl"
    """Dataset written under train.output_dir: prompt, completion, rewards, model, sampling settings."""
    prompts_per_batch: int = 8
    """Prompts generated for at once."""


@dataclass(frozen=True)
class MoEConfig:
    bias_update_speed: float = 0.0
    """DeepSeek-V3's auxiliary-loss-free load balancing during RL: after each update, every router's selection
    bias moves against its experts' load, b_e += speed * sign(mean load - load_e) (0: left alone)."""
    routing_replay: bool = False
    """Train each completion token through the experts it was routed to while decoding (needs share_prompt)."""


@dataclass(frozen=True)
class DistillConfig:
    teacher: Optional[str] = None
    """`grpo distill`: the teacher model that generates (folder, hub id, .gguf); the student is `model`."""


@dataclass(frozen=True)
class EvalConfig:
    path: Optional[str] = None
    """Held-out prompts (same columns and template as `data`); null skips evaluation."""
    split: str = "train"
    """Split to read from `path`."""
    num_prompts: int = 100
    """Evaluate on the first N rows of `path`."""
    every: int = 0
    """Also evaluate every N steps (0: only before and after training)."""
    batch_size: int = 64
    """Prompts per greedy generation batch."""
    reward: str = "accuracy"
    """Reward rule (by its log name) whose mean is reported as eval accuracy."""
    pass_k: int = 0
    """Also sample k completions per prompt and report eval/pass@k (0: greedy pass@1 only)."""


@dataclass(frozen=True)
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto`: online when a wandb API key is configured, offline otherwise (sync later with `wandb sync`)."""
    project: str = "grpo"
    """wandb project."""
    run_name: Optional[str] = None
    """wandb run name; defaults to the output folder's name."""
    tags: list = field(default_factory=list)
    """wandb tags."""
    log_every: int = 1
    """Print a console line every N steps (metrics.jsonl gets every step)."""
    completions_every: int = 1
    """Every N steps write one group (prompt, G completions, rewards, advantages) to completions.jsonl and
    to the wandb table `completions` (0: never)."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: tuple = (RewardSpec(fn="accuracy"),)
    tools: tuple = ()
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def completions_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.num_generations

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rewards"] = [dataclasses.asdict(r) for r in self.rewards]
        d["tools"] = [dataclasses.asdict(t) for t in self.tools]
        return d


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)
                             if f.name not in ("rewards", "tools")}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe() -> str:
    """Every section and field with its type, default and doc, for `grpo validate --doc`."""
    out = []
    for section, cls in [*SECTIONS.items(), ("model.lora", LoraConfig), ("model.mtp", MTPConfig), ("rewards[]", RewardSpec), ("tools[]", ToolSpec)]:
        out.append(f"{section}:")
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  {f.name} ({_type_name(hints[f.name])}, default {default!r})\n      {docs.get(f.name, '')}")
    return "\n".join(out)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (safe_load), apply `a.b=c` overrides, and build a validated `Config` whose local
    inputs (data files and their columns, a local model folder) exist."""
    source = str(path) if path else "<defaults>"
    cfg = _config_from_raw(_read_yaml(path) if path is not None else {}, overrides, source)
    problems = check_inputs(cfg, Path(path).read_text() if path is not None else "")
    if problems:
        raise ConfigError(source, problems)
    return cfg


_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def looks_local(name_or_path: str) -> bool:
    """A filesystem path rather than a hub id (`org/name`): absolute, relative with ./ or ../, ~, or deeper
    than one slash."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1


def check_inputs(cfg: Config, config_text: str = "") -> list[str]:
    """Cheap checks of what a run will read, without loading it: local data files exist and their first row has
    the configured columns; a local model folder exists. `config_text` (the YAML, comments included) lets a
    missing model be matched to the command in the config's header that makes it."""
    problems = []
    for key, path, columns in [("data.path", cfg.data.path, (cfg.data.prompt_column, cfg.data.answer_column)),
                               ("eval.path", cfg.eval.path, (cfg.data.prompt_column, cfg.data.answer_column))]:
        if path is None or Path(path).suffix not in _DATA_SUFFIXES:
            continue  # a hub dataset or folder: checked when it loads
        if not Path(path).is_file():
            problems.append(f"{key}: file {path} does not exist (relative paths start at {Path.cwd()})")
            continue
        try:
            first = _first_row_columns(Path(path))
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        missing = [c for c in columns if first is not None and c not in first]
        if missing:
            problems.append(f"{key}: the first row of {path} has no column {', '.join(map(repr, missing))} (it has "
                            f"{sorted(first)}); set data.prompt_column / data.answer_column to the right names")
    name = cfg.model.name_or_path
    makers = [line.lstrip("# ").strip() for line in config_text.splitlines()
              if line.lstrip().startswith("#") and "python " in line and name in line]
    local = looks_local(name) or name.endswith(".gguf") or makers
    if local and not Path(name).expanduser().exists():
        fix = f"make it first: {makers[0]}" if makers else "point it at a model folder, a .gguf file or a hub id"
        problems.append(f"model.name_or_path: {name} does not exist (under {Path.cwd()}); {fix}")
    return problems


def _first_row_columns(path: Path) -> set[str] | None:
    """Column names of the first row of a .jsonl or .csv file; None where that takes more than a line to know."""
    import csv
    import json

    if path.suffix not in (".jsonl", ".csv"):
        return None
    with open(path, newline="") as f:
        if path.suffix == ".csv":
            return set(next(csv.reader(f), []))
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the first row of {path} is not JSON ({e.msg}); each line is one JSON "
                                     "object") from None
                return set(row) if isinstance(row, dict) else set()
    return set()


def _read_yaml(path: str | Path) -> dict:
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, [f"cannot read the file: {e.strerror}"]) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML ({getattr(e, 'problem', e)}); fix the syntax"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections (model:, data:, ...)"])
    return raw


def _config_from_raw(raw: dict, overrides, source: str) -> Config:
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    cfg = _build(raw, problems)
    problems += _check_combinations(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


PIPELINE_RUNS = ("sft", "train", "generate", "eval")


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: a command run with its own config, under train.output_dir/<name>."""

    name: str
    run: str  # sft | train | generate | eval
    config: Config
    model_from: Optional[str] = None  # an earlier stage whose final model this stage starts from
    data_from: Optional[str] = None  # an earlier generate stage whose dataset this stage trains on


DISTILL_STAGES = [
    {"name": "teacher", "run": "generate"},  # model.name_or_path set to distill.teacher below
    {"name": "student", "run": "sft", "data": "teacher"},
    {"name": "student_eval", "run": "eval", "model": "student"},
]


def load_pipeline(path: str | Path, overrides: list[str] = (), distill: bool = False) -> list[Stage]:
    """A pipeline file: the usual sections (shared by every stage) plus `stages:`, a list of
    {name, run, model: <earlier stage>, data: <earlier generate stage>, set: {dotted.key: value}}.
    `overrides` apply to every stage, before its `set`; `stages.<name>.<section>.<key>=value` applies to that
    stage only, after its `set`.

    distill=True ignores `stages:` and runs DISTILL_STAGES: the teacher (distill.teacher) generates and
    filters, the student (model) is fine-tuned on what was kept, then evaluated on eval.path."""
    import copy

    source = str(path)
    raw = _read_yaml(path)
    entries = raw.pop("stages", None)
    if distill:
        teacher = (raw.get("distill") or {}).get("teacher")
        teacher = next((o.split("=", 1)[1] for o in overrides if o.startswith("distill.teacher=")), teacher)
        if not teacher:
            raise ConfigError(source, ["distill.teacher: name the teacher model (a folder, hub id or .gguf)"])
        entries = copy.deepcopy(DISTILL_STAGES)
        entries[0]["set"] = {"model.name_or_path": teacher, "model.gguf_file": None}
    if not isinstance(entries, list) or not entries:
        raise ConfigError(source, ["stages: expected a list such as `- {name: cold_start, run: sft}`"])
    per_stage: dict[str, list[str]] = {}  # stages.<name>.<section>.<key>=value: after that stage's `set`
    for item in [o for o in overrides if o.startswith("stages.")]:
        name, _, rest = item.removeprefix("stages.").partition(".")
        per_stage.setdefault(name, []).append(rest)
    overrides = [o for o in overrides if not o.startswith("stages.")]
    base = _config_from_raw(copy.deepcopy(raw), overrides, source)
    root = Path(base.train.output_dir)
    stages, problems, runs = [], [], {}
    unknown_stages = sorted(set(per_stage) - {e.get("name") for e in entries if isinstance(e, dict)})
    if unknown_stages:
        problems.append(f"stages.{unknown_stages[0]}: no stage has that name; override a stage's setting as "
                        "stages.<stage name>.<section>.<key>=value")
    for i, entry in enumerate(entries):
        where = f"stages[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or entry.get("run") not in PIPELINE_RUNS:
            problems.append(f"{where}: needs a `name` and `run: one of {list(PIPELINE_RUNS)}`")
            continue
        unknown = set(entry) - {"name", "run", "model", "data", "set"}
        if unknown:
            problems.append(_unknown(f"{where}.{sorted(unknown)[0]}", [f"{where}.{k}" for k in ("name", "run", "model", "data", "set")]))
        name, settings = entry["name"], dict(entry.get("set") or {})
        if name in runs:
            problems.append(f"{where}: a stage named {name!r} already exists")
        stage_overrides = [f"train.output_dir={root / name}"]
        model_from, data_from = entry.get("model"), entry.get("data")
        if model_from is not None:
            if model_from not in runs or runs[model_from] not in ("sft", "train"):
                problems.append(f"{where}.model: {model_from!r} is not an earlier sft or train stage ({list(runs)})")
            stage_overrides.append(f"model.name_or_path={root / str(model_from) / 'final'}")
        if data_from is not None:
            if runs.get(data_from) != "generate":
                problems.append(f"{where}.data: {data_from!r} is not an earlier generate stage")
            stage_overrides += [f"data.path={root / str(data_from) / base.generate.output}", "sft.response_column=completion"]
        stage_overrides += [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                            for k, v in settings.items()] + per_stage.get(name, [])
        try:
            config = _config_from_raw(copy.deepcopy(raw), [*overrides, *stage_overrides], f"{source} {where}")
        except ConfigError as e:
            problems += [f"{where} ({name}): {p}" for p in e.problems]
            continue
        runs[name] = entry["run"]
        stages.append(Stage(name, entry["run"], config, model_from, data_from))
    if problems:
        raise ConfigError(source, problems)
    return stages


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        problems.append(f"override {item!r}: write overrides as section.key=value, e.g. train.max_steps=5")
        return
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            problems.append(f"override {item!r}: {p} is not a section")
            return
    try:
        node[leaf] = yaml.safe_load(value) if value else None
    except yaml.YAMLError:  # not YAML (e.g. a template with braces): keep the text; field types are checked later
        node[leaf] = value


def _build(raw: dict, problems: list[str]) -> Config:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "rewards":
            kwargs["rewards"] = _build_rewards(value, problems)
        elif key == "tools":
            kwargs["tools"] = _build_tools(value, problems)
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a mapping of fields, got {type(value).__name__}")
                continue
            kwargs[key] = _build_section(key, SECTIONS[key], value, problems)
        elif key == "stages":
            problems.append("stages: this is a pipeline file; run it with `grpo pipeline FILE` (or `grpo distill FILE`)")
        else:
            problems.append(_unknown(key, [*SECTIONS, "rewards", "tools"]))
    return Config(**kwargs)  # built from the valid fields, so combinations are checked even beside other problems


def _build_rewards(value: Any, problems: list[str]) -> tuple:
    if not isinstance(value, list) or not value:
        problems.append("rewards: expected a non-empty list such as `- {fn: accuracy, weight: 1.0}`")
        return ()
    specs = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            entry = {"fn": entry}
        if not isinstance(entry, dict):
            problems.append(f"rewards[{i}]: expected a mapping like {{fn: accuracy, weight: 1.0}}")
            continue
        if "fn" not in entry:
            problems.append(f"rewards[{i}]: missing `fn`; name a built-in rule (see `grpo rewards`) or file.py:func")
            continue
        specs.append(_build_section(f"rewards[{i}]", RewardSpec, entry, problems))
    labels = [s.label for s in specs]
    for dup in sorted({x for x in labels if labels.count(x) > 1}):
        problems.append(f"rewards: two rules are logged as {dup!r}; give one a distinct `name:`")
    return tuple(specs)


def _build_tools(value: Any, problems: list[str]) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append("tools: expected a list such as `- {fn: calculator}`")
        return ()
    specs = []
    for i, entry in enumerate(value):
        entry = {"fn": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "fn" not in entry:
            problems.append(f"tools[{i}]: expected a mapping like {{fn: calculator}} (a built-in tool or file.py:func)")
            continue
        specs.append(_build_section(f"tools[{i}]", ToolSpec, entry, problems))
    return tuple(specs)


def _build_section(where: str, cls: type, values: dict, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    good = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(_unknown(f"{where}.{key}", [f"{where}.{f}" for f in fields]))
            continue
        section = _nested_section(hints[key])
        if section is not None and isinstance(value, dict):
            good[key] = _build_section(f"{where}.{key}", section, value, problems)
            continue
        ok, value = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}")
            continue
        good[key] = value
    return cls(**good)


def _nested_section(tp: Any) -> type | None:
    """The dataclass a field holds (Optional[LoraConfig] -> LoraConfig), or None."""
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def _unknown(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'?" if near else "valid keys: " + ", ".join(sorted(valid))
    return f"{key}: unknown key; {hint}"


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is not type(None):
                ok, v = _coerce(value, arg)
                if ok:
                    return True, v
        return False, value
    if origin is Literal:
        return value in args, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if isinstance(value, (int, float)) else value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        return isinstance(value, list), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _check_combinations(cfg: Config) -> list[str]:
    from grpo.algo.loss import LOSS_TYPES
    from grpo.scoring.rules import resolve_rule  # rules resolve at load time so `grpo validate` catches them

    p = []
    r, t, a, o, e = cfg.rollout, cfg.train, cfg.algorithm, cfg.optim, cfg.eval
    if r.num_generations < 2:
        p.append(f"rollout.num_generations: is {r.num_generations}; GRPO needs at least 2 completions per group")
    if t.prompts_per_step < 1:
        p.append("train.prompts_per_step: must be at least 1")
    if t.micro_batch_size < 1:
        p.append("train.micro_batch_size: must be at least 1")
    elif t.prompts_per_step >= 1 and cfg.completions_per_step % t.micro_batch_size:
        p.append(
            f"train.micro_batch_size: {t.micro_batch_size} does not divide the {cfg.completions_per_step} completions "
            f"per step (prompts_per_step {t.prompts_per_step} x num_generations {r.num_generations}); "
            f"use a divisor such as {_largest_divisor(cfg.completions_per_step, t.micro_batch_size)}"
        )
    if t.max_steps < 0:
        p.append("train.max_steps: must be >= 0")
    if t.time_limit < 0:
        p.append("train.time_limit: must be >= 0 seconds (0: no limit)")
    if r.max_completion_length < 1:
        p.append("rollout.max_completion_length: must be at least 1")
    if r.temperature <= 0:
        p.append("rollout.temperature: must be > 0 (GRPO samples; greedy decoding gives identical completions)")
    if not 0 < r.top_p <= 1:
        p.append("rollout.top_p: must be in (0, 1]")
    if a.beta < 0:
        p.append("algorithm.beta: must be >= 0")
    if not 0 <= a.epsilon < 1:
        p.append("algorithm.epsilon: must be in [0, 1)")
    if r.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        p.append("rollout.engine: vllm is not installed in this environment; build one with `make setup-vllm` and "
                 "run .venv-vllm/bin/grpo (README, Sampling with vLLM), or set rollout.engine=builtin")
    if a.rollout_correction_cap <= 1:
        p.append("algorithm.rollout_correction_cap: must be above 1 (the mask keeps ratios in [1/cap, cap])")
    if a.epsilon_high is not None and a.epsilon_high < 0:
        p.append("algorithm.epsilon_high: must be >= 0")
    if a.num_iterations < 1:
        p.append("algorithm.num_iterations: must be at least 1")
    if a.loss_type not in LOSS_TYPES:
        p.append(f"algorithm.loss_type: {a.loss_type!r} is not a registered loss type; use one of "
                 f"{', '.join(LOSS_TYPES)} (or register one in grpo/algo/loss.py)")
    elif LOSS_TYPES[a.loss_type].needs_epsilon_high and a.epsilon_high is None:
        p.append(f"algorithm.epsilon_high: loss_type {a.loss_type} truncates its importance weight at "
                 f"1 + epsilon_high; set it (configs/cispo.yaml uses 5.0, ScaleRL's value)")
    if not 0 <= a.top_entropy_quantile < 1:
        p.append("algorithm.top_entropy_quantile: must be in [0, 1) (0.8 keeps the 20% highest-entropy tokens)")
    if a.off_policy_mask_threshold is not None and a.off_policy_mask_threshold < 0:
        p.append("algorithm.off_policy_mask_threshold: must be >= 0, or null to disable")
    if a.baseline == "rloo" and r.num_generations < 2:
        p.append("algorithm.baseline: rloo needs rollout.num_generations >= 2")
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        if lora.r < 1 or lora.alpha <= 0:
            p.append("model.lora: r must be at least 1 and alpha above 0")
        if lora.dropout != 0:
            p.append("model.lora.dropout: only 0 is supported: the policy is trained on the log-probs it sampled "
                     "with, and dropout would change them")
        if not lora.target_modules:
            p.append("model.lora.target_modules: name the layers (or all-linear)")
        if a.ref_reset_every:
            p.append("algorithm.ref_reset_every: with model.lora the reference is the base model (adapters off); "
                     "it cannot be reset")
    if cfg.model.mtp is not None:
        m = cfg.model.mtp
        if m.layers != 1:
            p.append(f"model.mtp.layers: {m.layers}; only depth 1 (DeepSeek-V3's) is implemented")
        if m.weight < 0 or (m.lr is not None and m.lr <= 0):
            p.append("model.mtp: weight must be >= 0 and lr above 0 (or null for optim.lr)")
        if cfg.model.lora is not None:
            p.append("model.mtp: not with model.lora yet (the MTP block trains whole); drop one of them")
        if t.gradient_checkpointing:
            p.append("model.mtp: not with train.gradient_checkpointing yet; set it to false")
        if cfg.sft.packing:
            p.append("model.mtp: not with sft.packing (the MTP sequence would cross packed examples); set it to false")
    if r.speculative == "mtp":
        if cfg.model.mtp is None:
            p.append("rollout.speculative: mtp drafts with the model's MTP module; set model.mtp (e.g. `{}`)")
        if r.engine != "builtin" or cfg.tools or cfg.moe.routing_replay:
            p.append("rollout.speculative: mtp runs in the built-in engine's single-turn decoding; set "
                     "rollout.engine=builtin, no tools, moe.routing_replay=false")
    if a.kl_penalty == "reward" and a.beta == 0:
        p.append("algorithm.kl_penalty: 'reward' needs algorithm.beta > 0")
    if a.ref_reset_every and a.beta == 0:
        p.append("algorithm.ref_reset_every: there is no reference model when algorithm.beta is 0")
    if a.max_sampling_rounds < 1:
        p.append("algorithm.max_sampling_rounds: must be at least 1")
    if not 0 <= a.overlong_buffer < r.max_completion_length:
        p.append(f"algorithm.overlong_buffer: must be in [0, rollout.max_completion_length={r.max_completion_length})")
    if o.lr <= 0:
        p.append("optim.lr: must be > 0")
    if cfg.scoring.workers < 0 or cfg.scoring.timeout <= 0 or cfg.scoring.error_window < 1:
        p.append("scoring: workers must be >= 0, timeout > 0 and error_window >= 1")
    if cfg.scoring.probe_rows < 0:
        p.append("scoring.probe_rows: must be >= 0 (0 skips the reward-hack probe)")
    if cfg.moe.routing_replay and t.gradient_checkpointing:
        p.append("moe.routing_replay: does not follow recomputed layers yet; set train.gradient_checkpointing=false")
    if cfg.moe.routing_replay and not t.share_prompt:
        p.append("moe.routing_replay: needs train.share_prompt=true (replay follows the shared-prompt pass)")
    if cfg.data.max_prompt_length < 1:
        p.append("data.max_prompt_length: must be at least 1")
    if "{question}" not in cfg.data.prompt_format:
        p.append("data.prompt_format: must contain {question}, where the prompt column goes")
    for i, spec in enumerate(cfg.rewards):
        try:
            resolve_rule(spec)
        except ValueError as err:
            p.append(f"rewards[{i}] ({spec.fn}): {err}")
    if cfg.tools:
        from grpo.tools.registry import resolve_tool

        names = []
        for i, spec in enumerate(cfg.tools):
            try:
                names.append(resolve_tool(spec).name)
            except ValueError as err:
                p.append(f"tools[{i}] ({spec.fn}): {err}")
        for dup in sorted({n for n in names if names.count(n) > 1}):
            p.append(f"tools: two tools are named {dup!r}; give one a distinct `name:`")
        if r.engine != "builtin":
            p.append("tools: multi-turn rollouts run in the built-in engine for now; set rollout.engine=builtin")
        if cfg.moe.routing_replay:
            p.append("tools: moe.routing_replay does not follow multi-turn rollouts yet; set moe.routing_replay=false")
        if r.max_turns < 1 or r.tool_workers < 0 or r.tool_timeout <= 0 or r.max_tool_result_chars < 1:
            p.append("rollout: max_turns must be >= 1, tool_workers >= 0, tool_timeout > 0, max_tool_result_chars >= 1")
    if e.path is not None and cfg.rewards and e.reward not in [s.label for s in cfg.rewards]:
        p.append(f"eval.reward: {e.reward!r} is not one of the configured rewards {[s.label for s in cfg.rewards]}")
    if e.num_prompts < 1 or e.batch_size < 1:
        p.append("eval.num_prompts and eval.batch_size: must be at least 1")
    return p


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


# Fields whose change makes a checkpoint mean something else; others (logging, max_steps, eval, ...) may change.
RESUME_FIXED = ["model.name_or_path", "model.gguf_file", "model.dtype", "model.lora", "model.mtp", "data.path", "data.split",
                "data.prompt_column", "data.answer_column", "data.template", "data.prompt_format", "data.system_prompt",
                "data.max_samples", "data.shuffle", "rollout.num_generations", "train.prompts_per_step", "train.seed",
                "algorithm.beta", "algorithm.num_iterations", "algorithm.ref_reset_every"]


def check_resume(saved: dict, cfg: Config, source: str) -> list[str]:
    """Changes between a checkpoint's config and `cfg`: raises ConfigError for fields in RESUME_FIXED,
    returns a line for each harmless change."""
    now = cfg.to_dict()
    problems, changes = [], []
    for section, fields in now.items():
        if not isinstance(fields, dict):
            if saved.get(section, [] if fields == [] else None) != fields:  # (checkpoints from before `tools`)
                changes.append(f"{section}: {saved.get(section)!r} -> {fields!r}")
            continue
        for key, value in fields.items():
            before = saved.get(section, {}).get(key)
            if before == value:
                continue
            line = f"{section}.{key}: {before!r} in the checkpoint, {value!r} now"
            if f"{section}.{key}" in RESUME_FIXED:
                problems.append(line + "; this changes what the checkpoint means: start a new output_dir instead")
            else:
                changes.append(line)
    if problems:
        raise ConfigError(source, problems)
    return changes
