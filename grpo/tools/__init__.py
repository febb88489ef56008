"""Tools a model calls during a rollout (calculator, a Python sandbox, user functions), and the sandbox that
code rewards use. Imports no torch."""
