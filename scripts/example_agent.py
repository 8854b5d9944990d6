"""Example agent: plan -> action -> reflect on one shared trajectory, with local tools.

Each role runs in a fork of the shared trajectory bound to its own LoRA adapter
(`fork_roles`), and its result is joined back into the trajectory (`join_roles`), so every
role reads everything written before it: the case LRAgent's KV sharing is made for. The
action role writes one tool call (`TOOL: calculator(3 * 14)` or `TOOL: lookup(words)`);
this script parses it, runs the tool (a safe calculator, a lookup over `data/docs/`) and
appends the tool output to the trajectory. The reflect role comments and then selects
`done` or `continue`.

A small model with random role adapters writes poor text, so the loop never depends on
it: a malformed or failing tool call is replaced by a fallback call derived from the
question, and `--max-steps` bounds the loop. Every role and the tool run each step.

    python scripts/example_agent.py                       # starts a server (SmolLM2 + roles)
    python scripts/example_agent.py --scheme non-shared   # the same with another scheme
    python scripts/example_agent.py --url http://127.0.0.1:30000   # a running server
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.interpreter import ProgramState

from lragent_sglang.agents.frontend import LRAgentEndpoint, Runtime, fork_roles, join_roles
from lragent_sglang.agents.tools import (
    DEFAULT_DOCS_DIR,
    DocumentStore,
    ToolCall,
    Toolbox,
    ToolError,
    parse_tool_call,
)
from lragent_sglang.scheme import DEFAULT_SCHEME, Scheme

logger = logging.getLogger("example_agent")

SYSTEM = (
    "You are a team of three agents solving a question together. The planner writes a "
    "short plan, the actor calls exactly one tool, the reflector checks the result. "
    "Tools: calculator(arithmetic expression) and lookup(search words) over a small "
    "collection of fact sheets."
)
PLAN_PROMPT = "Planner: in one sentence, what should the next step be?"
ACTION_PROMPT = (
    "Actor: reply with exactly one tool call on one line, for example "
    "TOOL: calculator(14 * 3) or TOOL: lookup(price of a pen)."
)
REFLECT_PROMPT = "Reflector: is the question answered? Say why in one sentence."
VERDICTS = ("done", "continue")
QUESTIONS = (
    "How much do 14 pens cost at the stationery shop?",
    "What is (17 * 23) + 4?",
    "How tall is the Eiffel Tower?",
)
# An arithmetic expression in a question: numbers joined by at least one operator.
_ARITHMETIC = re.compile(r"[-(]*\d[\d.,]*(?:\s*[-+*/x×^]\s*[(]*\d[\d.,]*\)*)+\)*")


@dataclass
class Turn:
    """One role's request: SGLang's token counts for it, and what it wrote."""

    step: int
    role: str
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    seconds: float


@dataclass
class ToolRun:
    step: int
    call: ToolCall
    output: str
    ok: bool
    fallback: bool


@dataclass
class AgentResult:
    question: str
    answer: str
    trajectory: str = ""
    turns: list[Turn] = field(default_factory=list)
    tool_runs: list[ToolRun] = field(default_factory=list)


def fallback_call(question: str, tool_runs: list[ToolRun]) -> ToolCall:
    """A deterministic tool call for when the action role's one is unusable: the
    question's arithmetic if it has any, else a lookup of the question."""
    match = _ARITHMETIC.search(question)
    if match and not any(r.ok and r.call.tool == "calculator" for r in tool_runs):
        return ToolCall("calculator", match.group(0).replace("x", "*"))
    return ToolCall("lookup", question)


def run_tool(toolbox: Toolbox, step: int, written: str, question: str,
             tool_runs: list[ToolRun]) -> ToolRun:
    """Run the action role's tool call, or the fallback when it is malformed or fails."""
    call = parse_tool_call(written)
    if call is not None:
        try:
            return ToolRun(step, call, toolbox.run(call), ok=True, fallback=False)
        except ToolError as exc:
            logger.info("step %d: tool call %s failed (%s); using the fallback", step, call, exc)
    else:
        logger.info("step %d: no tool call in %r; using the fallback", step, written)
    call = fallback_call(question, tool_runs)
    try:
        return ToolRun(step, call, toolbox.run(call), ok=True, fallback=True)
    except ToolError as exc:
        return ToolRun(step, call, f"error: {exc}", ok=False, fallback=True)


def _turn(state: ProgramState, var: str, step: int, role: str, started: float) -> Turn:
    meta = state.get_meta_info(var) or {}
    return Turn(step, role, str(state[var]).strip(), meta.get("prompt_tokens", 0),
                meta.get("cached_tokens", 0), meta.get("completion_tokens", 0),
                time.monotonic() - started)


@sgl.function
def agent(s: ProgramState, question: str, max_steps: int, turn_tokens: int,
          toolbox: Toolbox, result: AgentResult) -> None:
    """The loop; `result` collects the turns and tool runs as they happen."""
    s += sgl.system(SYSTEM) + sgl.user(question)
    for step in range(1, max_steps + 1):
        started = time.monotonic()
        plan = fork_roles(s, ["plan"])
        plan += sgl.user(PLAN_PROMPT) + sgl.assistant(
            sgl.gen("plan", max_tokens=turn_tokens, temperature=0, stop="\n"))
        result.turns.append(_turn(plan["plan"], "plan", step, "plan", started))
        join_roles(s, plan, "plan")

        started = time.monotonic()
        action = fork_roles(s, ["action"])
        action += sgl.user(ACTION_PROMPT) + sgl.assistant(
            "TOOL: " + sgl.gen("call", max_tokens=turn_tokens, temperature=0, stop="\n"))
        result.turns.append(_turn(action["action"], "call", step, "action", started))
        written = "TOOL: " + action["action"]["call"]
        tool_run = run_tool(toolbox, step, written, question, result.tool_runs)
        result.tool_runs.append(tool_run)
        join_roles(s, action, "call", render=lambda role, text: sgl.assistant(f"[{role}] {written}"))
        s += sgl.user(f"[tool] {tool_run.call} -> {tool_run.output}")
        if tool_run.ok:
            result.answer = tool_run.output

        started = time.monotonic()
        reflect = fork_roles(s, ["reflect"])
        reflect += sgl.user(REFLECT_PROMPT) + sgl.assistant(
            sgl.gen("critique", max_tokens=turn_tokens, temperature=0, stop="\n")
            + "\nVerdict: " + sgl.select("verdict", list(VERDICTS)))
        result.turns.append(_turn(reflect["reflect"], "critique", step, "reflect", started))
        verdict = reflect["reflect"]["verdict"]
        join_roles(s, reflect, "critique", render=lambda role, text: sgl.assistant(
            f"[{role}] {text.strip()} Verdict: {verdict}"))
        if verdict == "done" and any(r.ok for r in result.tool_runs):
            break


def run_agent(question: str, endpoint: RuntimeEndpoint, max_steps: int = 3,
              max_new_tokens: int = 32, toolbox: Toolbox | None = None) -> AgentResult:
    """Answer one question on `endpoint` (an `LRAgentEndpoint`, so each role's adapter
    reaches the server)."""
    result = AgentResult(question=question, answer="")
    state = agent.run(question=question, max_steps=max_steps, turn_tokens=max_new_tokens,
                      toolbox=toolbox or Toolbox(), result=result, backend=endpoint)
    result.trajectory = state.text()
    if state.error() is not None:
        raise RuntimeError(f"agent program failed: {state.error()}") from state.error()
    return result


def print_result(result: AgentResult) -> None:
    print(f"\n=== {result.question}\n--- trajectory\n{result.trajectory}")
    print("--- tool runs")
    for run in result.tool_runs:
        origin = "fallback" if run.fallback else "model"
        print(f"step {run.step} [{origin}] {run.call} -> {run.output}")
    print("--- requests\nstep role     prompt  cached  generated  seconds")
    for t in result.turns:
        print(f"{t.step:4d} {t.role:8s} {t.prompt_tokens:6d}  {t.cached_tokens:6d}  "
              f"{t.completion_tokens:9d}  {t.seconds:7.1f}")
    prompt = sum(t.prompt_tokens for t in result.turns)
    cached = sum(t.cached_tokens for t in result.turns)
    print(f"prefix hit rate {cached / max(prompt, 1):.0%} ({cached} of {prompt} prompt tokens)")
    print(f"answer: {result.answer or '(none)'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--scheme", type=Scheme, choices=list(Scheme), default=DEFAULT_SCHEME,
                        help="scheme of the server started here (default: %(default)s)")
    parser.add_argument("--question", action="append",
                        help="a question (repeatable; default: three built-in ones)")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat-template", default="chatml",
                        help="SGLang chat template name (default: %(default)s, SmolLM2's)")
    parser.add_argument("--docs-dir", type=Path, default=DEFAULT_DOCS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.max_steps < 1:
        parser.error("--max-steps must be at least 1")

    toolbox = Toolbox(DocumentStore(args.docs_dir))
    with ExitStack() as stack:
        if args.url:
            endpoint = LRAgentEndpoint(args.url, chat_template_name=args.chat_template)
        else:
            print(f"starting the server (SmolLM2-135M, roles plan/action/reflect, "
                  f"scheme {args.scheme}); about 30 s on CPU ...", flush=True)
            runtime = stack.enter_context(
                Runtime.smollm2(scheme=args.scheme, chat_template_name=args.chat_template))
            endpoint = runtime.endpoint
        for question in args.question or QUESTIONS:
            print_result(run_agent(question, endpoint, args.max_steps, args.max_new_tokens, toolbox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
