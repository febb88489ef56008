"""Worker processes that run reward rules (or tools) with a wall-clock limit per task.

A rule that hangs (math-verify has inputs that never return) is killed when its task passes the time limit,
the task counts as an error, and a fresh worker takes the killed one's place. The limit counts from the moment
a worker starts the task, never from when it was queued: a worker first imports the rules and scores their
canary samples (warm), says it is ready, and only then takes work, so a worker's start-up (about a second, more
on a loaded machine) is never charged to a sample. Workers run rules in their
main thread, so math-verify's signal-based timeouts work there. Workers are daemons and also exit when the
parent's end of their pipe closes, so none outlive the run. What a worker runs is whatever `resolve` (a
module-level function, default `resolve_rule`) makes of each spec: an object with `fn`, `batched` and `canary`
(a Rule; grpo.tools.registry resolves tools to the same shape). Knows nothing of tensors.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
import traceback
from collections import deque
from multiprocessing.connection import wait

# One outcome per completion: ("ok", returned value) or ("error", traceback or reason).
Outcome = tuple


def run_task(rule, completions: list[str], examples: list[dict]) -> list[Outcome]:
    """Apply one rule to completions, catching its exceptions per sample (per batch for batched rules)."""
    if rule.batched:
        try:
            return [("ok", list(rule.fn(completions, examples)))]
        except Exception:  # a failing rule is reported per sample by the caller, never hidden
            return [("error", traceback.format_exc())] * len(completions)
    outcomes = []
    for completion, example in zip(completions, examples):
        try:
            outcomes.append(("ok", rule.fn(completion, example)))
        except Exception:
            outcomes.append(("error", traceback.format_exc()))
    return outcomes


def _worker(conn, specs, resolve) -> None:
    from grpo.scoring.rules import canary_samples, resolve_rule

    rules = [(resolve or resolve_rule)(s) for s in specs]
    for rule in rules:  # warm: imports and first-call caches (math-verify, sympy) before any timed task
        if rule.canary is not None:
            samples = canary_samples(rule)
            run_task(rule, [c for c, _ in samples], [e for _, e in samples])  # outcomes unused: the scorer
            # checks canaries itself and reports a failing one
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, rule_index, completions, examples = message
        conn.send(("start", task_id))
        conn.send(("done", task_id, run_task(rules[rule_index], completions, examples)))


class WorkerPool:
    """`workers` processes running tasks in parallel; `run(tasks)` returns each task's outcomes in order.
    The constructor returns once every worker is warm (`startup_limit` seconds at most). `kind` and `inline`
    name, in errors, what the workers run ("reward rules") and the setting that runs it in this process."""

    def __init__(self, specs, workers: int, timeout: float, startup_limit: float = 120.0, resolve=None,
                 kind: str = "reward rules", inline: str = "scoring.workers=0"):
        self.specs, self.timeout, self.startup_limit, self.resolve = list(specs), timeout, startup_limit, resolve
        self.kind, self.inline = kind, inline
        self._ctx = mp.get_context("spawn")  # no fork of a process holding torch threads
        self._workers = [self._start() for _ in range(workers)]
        self._ready: set[int] = set()
        deadline = time.monotonic() + startup_limit
        while len(self._ready) < len(self._workers):
            waiting = {self._workers[slot][1]: slot for slot in range(len(self._workers)) if slot not in self._ready}
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                raise RuntimeError(f"the worker processes for {self.kind} did not start within {startup_limit:g} s")
            for conn in ready:
                self._receive_ready(waiting[conn])

    def _start(self):
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker, args=(child, self.specs, self.resolve), daemon=True)
        process.start()
        child.close()
        return process, parent

    def _receive_ready(self, slot: int) -> None:
        try:
            message = self._workers[slot][1].recv()
        except (EOFError, OSError):
            raise RuntimeError(
                f"a worker process for {self.kind} died while importing them and running their canaries; run with "
                f"{self.inline} to see the error in this process. Workers are spawned: a script that starts a run "
                "must do so under `if __name__ == '__main__':`") from None
        assert message == ("ready",), message
        self._ready.add(slot)

    def run(self, tasks: list[tuple[int, list[str], list[dict]]]) -> list[list[Outcome]]:
        """tasks: (rule index, completions, examples). A task gets `timeout` seconds per completion it holds,
        counted from when its worker starts it."""
        results: list = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (task id, deadline; inf until it starts)
        while queue or busy:
            for slot in sorted(self._ready - set(busy)):
                if queue:
                    task_id = queue.popleft()
                    rule_index, completions, examples = tasks[task_id]
                    self._workers[slot][1].send((task_id, rule_index, completions, examples))
                    busy[slot] = (task_id, math.inf)
            warming = [slot for slot in range(len(self._workers)) if slot not in self._ready]
            conns = {self._workers[slot][1]: slot for slot in [*busy, *warming]}
            next_deadline = min([deadline for _, deadline in busy.values()] + [time.monotonic() + 1.0])
            for conn in wait(list(conns), timeout=max(0.0, next_deadline - time.monotonic())):
                slot = conns[conn]
                if slot not in self._ready:  # a replacement worker finished warming
                    self._receive_ready(slot)
                    continue
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the worker died (killed by the OS, crashed in C code)
                    message = ("done", busy[slot][0], None)
                    self._replace(slot)
                task_id = busy[slot][0]
                if message[0] == "start":
                    busy[slot] = (task_id, time.monotonic() + self.timeout * max(1, len(tasks[task_id][1])))
                    continue
                results[task_id] = message[2] or [("error", "the scoring worker process died")] * len(tasks[task_id][1])
                del busy[slot]
            now = time.monotonic()
            for slot, (task_id, deadline) in list(busy.items()):
                if now >= deadline:
                    self._replace(slot)
                    n = len(tasks[task_id][1])
                    results[task_id] = [("error", f"timed out after {self.timeout * max(1, n):g} s and was killed")] * n
                    del busy[slot]
        return results

    def _replace(self, slot: int) -> None:
        """Kill the worker in `slot` and start another, which takes work once it says it is warm."""
        process, conn = self._workers[slot]
        process.kill()
        process.join()
        conn.close()
        self._ready.discard(slot)
        self._workers[slot] = self._start()

    def close(self) -> None:
        for process, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process, conn in self._workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers = []
