"""The tool registry: a configured `tools:` entry -> a callable tool with the schema the model is shown.

Entries name tools like reward rules: a built-in (`calculator`, `python`), `path/to/file.py:func` or
`package.module:func`, with `kwargs` bound (and hidden from the model) and an optional `name`. A tool's schema
(OpenAI/Hermes function format) comes from its signature and its docstring: the first paragraph describes it,
the `Args:` section its arguments. Calling a tool checks the model's arguments against the signature and turns
any failure into text the model reads. Imports no torch (tools run in worker processes).
"""

from __future__ import annotations

import inspect
import re
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Callable

from grpo.tools.builtin import BUILTIN_TOOLS, ToolError

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_ARG_LINE = re.compile(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


@dataclass(frozen=True)
class Tool:
    """A resolved tool, in the shape the worker pool runs (`fn(arguments, example)`, not batched, no canary)."""

    name: str
    call: Callable  # the configured function with its kwargs bound: call(**arguments) -> text
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}
    ref: str
    batched: bool = False
    canary: None = None

    def fn(self, arguments, example: dict | None = None) -> tuple[str, str]:
        """("ok" or "error", the text the model reads) for a call with `arguments`; never raises."""
        return run_call(self, arguments)


def resolve_tool(spec) -> Tool:
    """The Tool for one ToolSpec (fn, name, kwargs). Raises ValueError saying what to fix."""
    from grpo.scoring.rules import load_function

    fn = load_function(spec.fn, BUILTIN_TOOLS, kind="tool")
    signature = inspect.signature(fn)
    unknown = sorted(set(spec.kwargs) - set(signature.parameters))
    if unknown:
        raise ValueError(f"tool {spec.fn}: kwargs {unknown} are not parameters of {fn.__name__}{signature}")
    name = spec.name or fn.__name__
    return Tool(name=name, call=partial(fn, **spec.kwargs) if spec.kwargs else fn,
                schema=tool_schema(fn, name, bound=set(spec.kwargs)), ref=spec.fn)


def tool_schema(fn: Callable, name: str, bound: set[str] = frozenset()) -> dict:
    """The function schema of `fn` without its `bound` parameters: description from the docstring's first
    paragraph, argument types from annotations, argument descriptions from its `Args:` section."""
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    described, in_args = {}, False
    for line in (inspect.getdoc(fn) or "").splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if in_args:
            match = _ARG_LINE.match("  " + line) if line.startswith("    ") else None
            if match:
                described[match.group(1)] = match.group(2).strip()
            elif line and not line.startswith(" "):
                in_args = False
    hints = inspect.get_annotations(fn, eval_str=True) if not isinstance(fn, partial) else {}
    properties, required = {}, []
    for pname, param in inspect.signature(fn).parameters.items():
        if pname in bound or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = {"type": _JSON_TYPES.get(hints.get(pname), "string")}
        if pname in described:
            prop["description"] = described[pname]
        properties[pname] = prop
        if param.default is param.empty:
            required.append(pname)
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


def invoke(tool: Tool, arguments) -> str:
    """Call `tool` with the model's `arguments` (a dict; a bare string goes to its one required argument).
    Wrong arguments raise ToolError naming them."""
    params = tool.schema["function"]["parameters"]
    if isinstance(arguments, str) and len(params["required"]) == 1:
        arguments = {params["required"][0]: arguments}
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name} takes an object of arguments {sorted(params['properties'])}, "
                        f"not {type(arguments).__name__}")
    unknown = sorted(set(arguments) - set(params["properties"]))
    missing = [p for p in params["required"] if p not in arguments]
    if unknown or missing:
        raise ToolError(f"{tool.name} takes arguments {sorted(params['properties'])}"
                        + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
    return str(tool.call(**arguments))


def run_call(tool: Tool, arguments) -> tuple[str, str]:
    """("ok", text) or ("error", text for the model): a ToolError's message, or the last line of any other
    exception's traceback. Never raises."""
    try:
        return "ok", invoke(tool, arguments)
    except ToolError as e:
        return "error", str(e)
    except Exception:  # the tool's own failure is the model's observation and is counted, never hidden
        return "error", traceback.format_exc().strip().splitlines()[-1]
