"""Tool calls in a model's text, and the text of their results, in one of two layouts.

A call is `<tool_call>{"name": NAME, "arguments": {...}}</tool_call>` (Hermes/Qwen style) in both layouts:
- `template`: the tokenizer's chat template defines tools (it renders a `tools` list and `tool` messages, as
  Qwen2.5's and Hermes' do). Prompts list the tools through the template; a result is rendered by the template
  as a `tool` message after the assistant's call, followed by the assistant's next generation prompt.
- `plain`: for templates without tools (SmolLM2's): the tools and the call syntax are described in the system
  message, and each result is written right after the call, inside the same assistant turn:
  `<tool_response>RESULT</tool_response>`, then the model goes on.
`auto` takes `template` when the chat template mentions tools, else `plain`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
CALL_END = "</tool_call>"
PLAIN_INSTRUCTIONS = (
    "You can use tools. To call one, write <tool_call>{{\"name\": TOOL, \"arguments\": {{...}}}}</tool_call> "
    "and stop; its result comes back as <tool_response>RESULT</tool_response>, then you continue.\n"
    "Tools:\n{tools}")


@dataclass(frozen=True)
class ToolPrompt:
    """What prompts tell the model about its tools: their schemas, in a layout (`template` or `plain`)."""

    schemas: tuple
    layout: str


def tool_prompt(cfg, tokenizer) -> ToolPrompt | None:
    """The ToolPrompt of a config's `tools` (None without tools)."""
    if not cfg.tools:
        return None
    from grpo.tools.registry import resolve_tool

    return ToolPrompt(tuple(resolve_tool(s).schema for s in cfg.tools), resolve_layout(cfg.rollout.tool_format, tokenizer))


@dataclass(frozen=True)
class Call:
    name: str | None
    arguments: object
    error: str | None = None  # why the call could not be read (shown to the model as its result)


def parse_calls(text: str) -> list[Call]:
    """Every `<tool_call>...</tool_call>` in `text`, in order."""
    calls = []
    for body in CALL.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as e:
            calls.append(Call(None, None, f"the tool call is not valid JSON ({e.msg}): {body.strip()[:200]}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(Call(None, None, 'a tool call is {"name": TOOL, "arguments": {...}}'))
            continue
        calls.append(Call(obj["name"], obj.get("arguments", {})))
    return calls


def ends_with_call(text: str) -> bool:
    return text.rstrip().endswith(CALL_END)


def resolve_layout(layout: str, tokenizer) -> str:
    """`template` or `plain` for rollout.tool_format `layout` (auto: template when the chat template has tools)."""
    if layout != "auto":
        return layout
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else json.dumps(template)
    return "template" if "tools" in template and "tool" in template.replace("tools", "") else "plain"


def plain_system_text(schemas: list[dict]) -> str:
    """The system-message text of the plain layout: the call syntax and one JSON line per tool."""
    return PLAIN_INSTRUCTIONS.format(tools="\n".join(json.dumps(s["function"]) for s in schemas))


def result_text(results: list[str], layout: str, tokenizer) -> str:
    """The text that follows a turn ending in calls: their results, and whatever lets the model go on."""
    if layout == "plain":
        return "".join(f"\n<tool_response>\n{r}\n</tool_response>\n" for r in results)
    placeholder = "<tool_call>\n{}\n</tool_call>"
    messages = [{"role": "user", "content": "."}, {"role": "assistant", "content": placeholder},
                *({"role": "tool", "content": r} for r in results)]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rendered[rendered.rindex(placeholder) + len(placeholder):]
