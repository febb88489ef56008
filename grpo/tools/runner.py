"""Runs the tool calls of a rollout turn: outside the training process, in parallel, with a time limit.

Calls run in worker processes (grpo.scoring.pool.WorkerPool, the reward workers' machinery: a call past
`timeout` seconds has its worker killed and replaced, a worker that dies is replaced, nothing hangs), or in this
process when `workers` is 0 (no time limit). Every failure (unreadable call, unknown tool, wrong arguments, the
tool raising, a timeout) becomes the text the model reads as that call's result, and is counted:
`counts` holds per tool name `calls` and `errors` since the last `take_counts()`.
"""

from __future__ import annotations

from collections import Counter

from grpo.scoring.pool import WorkerPool
from grpo.tools.calls import Call
from grpo.tools.registry import Tool, resolve_tool


class ToolRunner:
    def __init__(self, specs, workers: int, timeout: float, max_result_chars: int = 4000):
        self.tools: list[Tool] = [resolve_tool(s) for s in specs]
        names = [t.name for t in self.tools]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tools: the names {duplicates} are used twice; give each entry its own `name`")
        self.by_name = {t.name: i for i, t in enumerate(self.tools)}
        self.timeout, self.max_result_chars = timeout, max_result_chars
        self.pool = (WorkerPool(specs, workers, timeout, resolve=resolve_tool, kind="tools",
                                inline="rollout.tool_workers=0") if workers > 0 else None)
        self.counts: Counter = self._zero()

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools]

    def run(self, calls: list[Call]) -> list[str]:
        """The result text of each call, in order (each truncated to max_result_chars)."""
        results: list[str | None] = [None] * len(calls)
        tasks, owners = [], []
        for i, call in enumerate(calls):
            if call.error is not None:
                self.counts["invalid/calls"] += 1
                results[i] = f"error: {call.error}"
            elif call.name not in self.by_name:
                self.counts["invalid/calls"] += 1
                results[i] = f"error: there is no tool named {call.name!r}; the tools are {sorted(self.by_name)}"
            else:
                tasks.append((self.by_name[call.name], [call.arguments], [{}]))
                owners.append(i)
        outcomes = (self.pool.run(tasks) if self.pool is not None
                    else [[("ok", self.tools[index].fn(args[0]))] for index, args, _ in tasks])
        for i, (index, _, _), outcome in zip(owners, tasks, outcomes):
            name = self.tools[index].name
            kind, payload = outcome[0]
            if kind == "ok":  # the tool ran: its own ("ok" | "error", text)
                kind, payload = payload
            else:  # the worker was killed (timeout) or died
                payload = (f"the tool did not answer within {self.timeout:g} s and was stopped"
                           if "timed out" in payload else "the tool's process died")
            self.counts[f"{name}/calls"] += 1
            if kind != "ok":
                self.counts[f"{name}/errors"] += 1
                payload = f"error: {payload}"
            results[i] = _truncate(payload, self.max_result_chars)
        return results

    def _zero(self) -> Counter:
        """Every count at 0, so every process reports the same keys."""
        return Counter({key: 0 for t in self.tools for key in (f"{t.name}/calls", f"{t.name}/errors")}
                       | {"invalid/calls": 0})

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call, every key present."""
        counts, self.counts = dict(self.counts), self._zero()
        return counts

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def total_calls(counts: dict[str, float]) -> float:
    """Calls made, valid or not, in counts as take_counts gives them (keys may carry a prefix, as in
    Rollouts.tool_counts): the sum of every `<tool>/calls` count, `invalid/calls` included."""
    return sum(v for key, v in counts.items() if key.endswith("/calls"))


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[result truncated at {limit} characters]"
