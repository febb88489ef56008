"""Where the KL penalty to the reference model goes: decided here, once, from the algorithm config.

beta * KL(pi_theta || pi_ref) is either a term of the loss at every token (DeepSeekMath; `loss_beta` is
beta and the loss gets the reference log-probs) or subtracted from each completion's reward before the
advantages (kl_penalty: reward; `completion_kl` gives sum_t KL_t per completion from pi_old's log-probs,
and the loss gets beta 0). beta 0 is neither, and no reference model exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.algo.advantages import sequence_kl


@dataclass(frozen=True)
class KLPenalty:
    beta: float
    estimator: str  # k1, k2 or k3 (grpo.algo.loss.kl_per_token)
    in_reward: bool  # True: in the reward; False: in the loss

    @classmethod
    def from_config(cls, algorithm_cfg) -> "KLPenalty":
        return cls(algorithm_cfg.beta, algorithm_cfg.kl_estimator,
                   algorithm_cfg.beta > 0 and algorithm_cfg.kl_penalty == "reward")

    @property
    def loss_beta(self) -> float:
        """The beta of the loss's per-token KL term (0 when the KL is in the reward)."""
        return 0.0 if self.in_reward else self.beta

    def needs_old_logprobs(self, num_iterations: int) -> bool:
        """pi_old must be computed before the update: several updates per batch, or a KL-shaped reward."""
        return num_iterations > 1 or self.in_reward

    def completion_kl(self, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """KL_i = sum_t KL_{i,t} per completion, [N, T] -> [N] on the CPU; with in_reward the rewards become
        r_i - beta * KL_i. Example: k1, log-probs [-1, -1] under pi_old, [-2, -2] under pi_ref, mask [1, 1]:
        KL = 2 (beta 0.1 takes 0.2 off the reward)."""
        return sequence_kl(old_logprobs, ref_logprobs, mask, self.estimator).cpu()
