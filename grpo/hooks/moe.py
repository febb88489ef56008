"""Routing statistics of mixture-of-experts models (DeepSeekMoE and the like), read with forward hooks.

A router is any submodule whose output holds an integer tensor of chosen experts [tokens, k] beside a float
tensor of router logits [tokens, E] (transformers' DeepseekV3TopkRouter returns (logits, weights, indices)).
Statistics cover every token the model processed while recording (prompt, completion and padding positions
of the training forward). The functions know nothing of training; `MoEHook` joins them to the training step
at its hook points (grpo.hooks.base). Dense models have no routers: no hook is installed, no metrics.
"""

from __future__ import annotations

import contextlib
import time

import torch

from grpo.hooks.base import StepHook
from grpo.modeling.logprobs import causal_lm, rollout_logprobs


def routing_metrics(topk_indices: torch.Tensor, router_logits: torch.Tensor, num_experts: int) -> dict[str, float]:
    """Expert load and router entropy for one layer's routing decisions.

    load_e = (times expert e was chosen) / (tokens * k); imbalance = max_e load_e / mean_e load_e (1 when
    uniform, E when one expert takes everything); router entropy = mean over tokens of the entropy of the
    router's distribution over experts, softmax(router_logits), in nats (log E at most).
    Example: 2 tokens choosing experts [[0, 1], [0, 2]] of 4 -> load [0.5, 0.25, 0.25, 0], imbalance 2.
    """
    counts = torch.bincount(topk_indices.reshape(-1), minlength=num_experts).float()
    load = counts / counts.sum().clamp(min=1)
    probs = torch.softmax(router_logits.float(), dim=-1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(dim=-1).mean()
    return {"load_imbalance": (load.max() / load.mean()).item(), "router_entropy": entropy.item(),
            "max_load": load.max().item(), **{f"load/{e}": load[e].item() for e in range(num_experts)}}


class RouterProbe:
    """Collects the routing decisions of every router in `model` while `recording()` is active."""

    def __init__(self, model):
        self.routers = {name: module for name, module in model.named_modules() if _is_router(module)}
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @contextlib.contextmanager
    def recording(self):
        self._records = {name: [] for name in self.routers}
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.routers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str):
        def record(module, inputs, output):
            logits, indices = _split_router_output(output)
            if indices is not None:
                self._records[name].append((indices.detach().reshape(-1, indices.shape[-1]),
                                            logits.detach().reshape(-1, logits.shape[-1])))
        return record

    def loads(self) -> dict[str, torch.Tensor]:
        """Per router, the fraction of choices that went to each expert [E] over the recorded calls."""
        out = {}
        for name, records in self._records.items():
            if records:
                num_experts = records[0][1].shape[-1]
                counts = torch.bincount(torch.cat([r[0].reshape(-1) for r in records]), minlength=num_experts).float()
                out[name] = counts / counts.sum().clamp(min=1)
        return out

    def calls(self) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per router, the (chosen experts [tokens, k], router logits [tokens, E]) of each forward call."""
        return self._records

    def metrics(self) -> dict[str, float]:
        """moe/<metric> averaged over layers, and moe/layer<i>/<metric> per router layer, including the
        fraction of choices per expert, moe/layer<i>/load/<e>."""
        out, per_layer = {}, []
        for i, (name, records) in enumerate(self._records.items()):
            if not records:
                continue
            indices = torch.cat([r[0] for r in records])
            logits = torch.cat([r[1] for r in records])
            m = routing_metrics(indices, logits, logits.shape[-1])
            per_layer.append(m)
            out.update({f"moe/layer{i}/{k}": v for k, v in m.items()})
        for key in ("load_imbalance", "router_entropy", "max_load"):
            if per_layer:
                out[f"moe/{key}"] = sum(m[key] for m in per_layer) / len(per_layer)
        return out


def _split_router_output(output):
    if not isinstance(output, tuple):
        return None, None
    indices = next((t for t in output if torch.is_tensor(t) and not t.is_floating_point()), None)
    logits = next((t for t in output if torch.is_tensor(t) and t.is_floating_point()), None)
    return logits, indices


def _is_router(module) -> bool:
    return type(module).__name__.endswith(("TopkRouter", "Router")) and hasattr(module, "weight")


def routing_drift(decode_routes: torch.Tensor, train_routes: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of completion tokens whose chosen experts (as a set) differ between two passes of the same
    policy: routes [N, T', k] (-1 where a pass did not route that token), mask [N, T'] of tokens to compare.
    Example: token 0 chose {1, 3} in both passes, token 1 chose {1, 2} then {2, 4} -> drift 0.5.
    """
    a, b = decode_routes.sort(dim=-1).values, train_routes.sort(dim=-1).values
    valid = mask.bool() & (a >= 0).all(dim=-1) & (b >= 0).all(dim=-1)
    if not valid.any():
        return float("nan")
    return ((a != b).any(dim=-1) & valid).sum().item() / valid.sum().item()


def decode_routes(calls: list[tuple[torch.Tensor, torch.Tensor]], decode_rows: list[torch.Tensor], N: int, T: int,
                  k: int) -> torch.Tensor:
    """[N, T, k] experts chosen for each completion token while decoding: call 0 is the prompt prefill,
    call 1 + t fed completion token t of rows decode_rows[t]; -1 where a token was never fed."""
    routes = torch.full((N, T, k), -1, dtype=torch.long)
    for t, rows in enumerate(decode_rows):
        if 1 + t < len(calls):
            routes[rows.cpu(), t] = calls[1 + t][0].cpu()
    return routes


@contextlib.contextmanager
def replay_routes(model, routes: dict[str, torch.Tensor] | None, rows: slice, completion_length: int):
    """Routing replay: while active, every router's second call (the completion pass of
    `shared_prefix_logprobs` over rollouts[rows]) chooses the experts recorded while decoding, where recorded.

    The mixing weights are recomputed for the replayed experts as DeepSeek-V3's router computes them:
    sigmoid(router logits) at the chosen experts, normalised when norm_topk_prob, times routed_scaling_factor.
    """
    routers = {name: module for name, module in model.named_modules() if routes and name in routes}
    calls = dict.fromkeys(routers, 0)

    def patched(name, router, original):
        def forward(hidden_states):
            logits, weights, indices = original(hidden_states)
            calls[name] += 1
            if calls[name] != 2:  # call 1 ran the prompts
                return logits, weights, indices
            replay = routes[name][rows, :completion_length - 1].reshape(-1, indices.shape[-1]).to(indices.device)
            indices = torch.where((replay >= 0).all(dim=-1, keepdim=True), replay, indices)
            weights = logits.sigmoid().gather(1, indices)
            if getattr(router, "norm_topk_prob", False):
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * getattr(router, "routed_scaling_factor", 1.0), indices
        return forward

    for name, router in routers.items():
        router.forward = patched(name, router, router.forward)
    try:
        yield
    finally:
        for router in routers.values():
            del router.forward  # back to the class's forward


def update_selection_bias(router, load: torch.Tensor, speed: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: b_e += speed * sign(mean(load) - load_e), on the bias the
    router adds to its scores for choosing experts only (not to the weights it mixes them with).
    Example: load [0.5, 0.3, 0.1, 0.1], speed 0.01 -> bias change [-0.01, -0.01, +0.01, +0.01]."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        raise ValueError(f"{type(router).__name__} has no selection bias (e_score_correction_bias) to update")
    with torch.no_grad():
        bias += speed * torch.sign(load.mean() - load).to(bias.device, bias.dtype)


class MoEHook(StepHook):
    """Mixture-of-experts routing in the training step: routing metrics of the training passes (moe/*),
    drift between the experts chosen while decoding and in a teacher-forced pass (moe/routing_drift),
    DeepSeek-V3's bias balancing (moe.bias_update_speed) and routing replay (moe.routing_replay)."""

    def __init__(self, cfg, backend):
        self.cfg, self.backend = cfg, backend
        self._decoding = self._training = None

    @contextlib.contextmanager
    def rollout(self, model):
        self._decoding = RouterProbe(model)
        with self._decoding.recording():
            yield

    def after_rollout(self, model, rollouts) -> dict[str, float]:
        if rollouts.decode_rows is None:  # multi-turn rollouts with tools do not record which rows each call fed
            return {}
        N, T = rollouts.completion_ids.shape
        rollouts.routes = {name: decode_routes(calls, rollouts.decode_rows, N, T, calls[0][0].shape[-1])
                           for name, calls in self._decoding.calls().items()}
        start = time.perf_counter()
        drift = self._routing_drift(model, rollouts)
        return {"moe/routing_drift": drift, "time/routing_drift": time.perf_counter() - start}

    def _routing_drift(self, model, rollouts) -> float:
        """Fraction of completion tokens whose experts differ between decoding and a teacher-forced pass of
        the same policy through the training path (shared prompt, one batch), averaged over MoE layers."""
        N, T = rollouts.completion_ids.shape
        if T < 2:
            return float("nan")
        training = RouterProbe(model)
        with torch.no_grad(), self.backend.autocast(), training.recording():
            rollout_logprobs(model, rollouts, slice(0, N), self.cfg.rollout.num_generations,
                             self.cfg.rollout.temperature)
        drifts = []
        for name, calls in training.calls().items():
            k = calls[1][0].shape[-1]  # call 0 ran the prompts, call 1 the completions
            trained = calls[1][0].reshape(N, T - 1, k).cpu()
            decoded = rollouts.routes[name][:, :T - 1]
            drifts.append(routing_drift(decoded, trained, rollouts.completion_mask[:, :T - 1].cpu()))
        return sum(drifts) / len(drifts)

    def micro_batch(self, policy, batch, rows: slice):
        routes = batch.routes if self.cfg.moe.routing_replay else None
        return replay_routes(causal_lm(policy), routes, rows, batch.completion_ids.shape[1])

    @contextlib.contextmanager
    def update(self, policy):
        self._training = RouterProbe(self.backend.accelerator.unwrap_model(policy))
        with self._training.recording():
            yield

    def after_step(self, skipped: bool) -> dict[str, float]:
        probe, speed = self._training, self.cfg.moe.bias_update_speed
        if speed and not skipped:
            for name, load in probe.loads().items():
                update_selection_bias(probe.routers[name], self.backend.mean_tensor(load), speed)
        return probe.metrics()
