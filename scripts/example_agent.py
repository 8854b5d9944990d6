"""Example agent: plan -> action -> reflect on one shared trajectory, with local tools.

The trajectory is one open user turn that every role reads: the question, then each
step's `Plan:`, `Action:`, `Tool output:` and `Reflection:` lines. Each role runs in a fork
of it bound to its own LoRA adapter (`fork_roles`), ends the turn with its instruction,
answers as the assistant, and its answer is joined back into the trajectory
(`join_roles`): the case LRAgent's KV sharing is made for, every role re-reading all that
was written before it. This is the prompt format the shipped SmolLM2 role adapters were
trained on (`lragent_sglang.agents.models`).

The action role writes one tool call (`TOOL: calculator(14 * 3)` or `TOOL: lookup(words)`);
the agent parses it and runs the tool (a safe calculator, a lookup over `data/docs/`).
When that output has no parsable tool call, or the call fails, the agent runs a fallback
call derived from the question instead (its arithmetic, else a lookup of the question),
shown as `[fallback]`, so the loop never depends on the model. The reflect role starts
its answer by choosing `Yes` or `No` (`sgl.select`) and says why; `No` starts another
step, up to `--max-steps`.

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
from sglang.lang.ir import SglExpr

from lragent_sglang.agents.frontend import LRAgentEndpoint, RoleForks, Runtime, fork_roles, join_roles
from lragent_sglang.agents.models import ROLE_INSTRUCTIONS, ROLE_SYSTEM
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

# The first two in forms the roles were trained on, but not in their data (other numbers,
# other wording); the third in neither.
QUESTIONS = (
    "A shop sells pens at 3 dollars each. How much do 14 pens cost?",
    "What is the height of Mount Everest?",
    "What is (17 * 23) + 4?",
)
VERDICTS = ("Yes", "No")
FALLBACK_NOTE = (
    "[fallback]: the action role's output had no parsable tool call (TOOL: calculator(...) "
    "or TOOL: lookup(...)) or its call failed, so the agent ran one derived from the "
    "question: its arithmetic for the calculator, else a lookup of the question."
)
_FINAL_ANSWER = re.compile(r"Final answer:\s*(.+?)\.?\s*$")
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


def _turn(state: ProgramState, var: str, step: int, role: str, started: float, text: str) -> Turn:
    meta = state.get_meta_info(var) or {}
    return Turn(step, role, text, meta.get("prompt_tokens", 0), meta.get("cached_tokens", 0),
                meta.get("completion_tokens", 0), time.monotonic() - started)


def ask(s: ProgramState, role: str, answer: SglExpr) -> RoleForks:
    """One branch of the trajectory on `role`'s adapter: the role's instruction ends the
    shared user turn and `answer` fills the assistant turn."""
    fork = fork_roles(s, [role])
    fork += ROLE_INSTRUCTIONS[role] + sgl.user_end() + sgl.assistant(answer)
    return fork


def final_answer(reflection: str) -> str | None:
    match = _FINAL_ANSWER.search(reflection)
    return match.group(1) if match else None


@sgl.function
def agent(s: ProgramState, question: str, max_steps: int, turn_tokens: int,
          toolbox: Toolbox, result: AgentResult) -> None:
    """The loop; `result` collects the turns and tool runs as they happen."""
    greedy = {"max_tokens": turn_tokens, "temperature": 0, "stop": "\n"}
    s += sgl.system(ROLE_SYSTEM) + sgl.user_begin() + f"Question: {question}\n"
    for step in range(1, max_steps + 1):
        started = time.monotonic()
        plan = ask(s, "plan", sgl.gen("plan", **greedy))
        text = plan["plan"]["plan"].strip()
        result.turns.append(_turn(plan["plan"], "plan", step, "plan", started, text))
        join_roles(s, plan, "plan", render=lambda role, _: f"Plan: {text}\n")

        started = time.monotonic()
        action = ask(s, "action", sgl.gen("call", **greedy))
        written = action["action"]["call"].strip()
        result.turns.append(_turn(action["action"], "call", step, "action", started, written))
        tool_run = run_tool(toolbox, step, written, question, result.tool_runs)
        result.tool_runs.append(tool_run)
        join_roles(s, action, "call", render=lambda role, _: (
            f"Action: TOOL: {tool_run.call}\nTool output: {tool_run.output}\n"))
        if tool_run.ok:
            result.answer = tool_run.output

        started = time.monotonic()
        reflect = ask(s, "reflect", sgl.select("verdict", list(VERDICTS)) + sgl.gen("why", **greedy))
        verdict = reflect["reflect"]["verdict"]
        text = verdict + reflect["reflect"]["why"].rstrip()
        result.turns.append(_turn(reflect["reflect"], "why", step, "reflect", started, text))
        join_roles(s, reflect, "why", render=lambda role, _: f"Reflection: {text}\n")
        result.answer = final_answer(text) or result.answer
        if verdict == "Yes" and tool_run.ok:
            break


def run_agent(question: str, endpoint: RuntimeEndpoint, max_steps: int = 3,
              max_new_tokens: int = 48, toolbox: Toolbox | None = None) -> AgentResult:
    """Answer one question on `endpoint` (an `LRAgentEndpoint`, so each role's adapter
    reaches the server)."""
    result = AgentResult(question=question, answer="")
    state = agent.run(question=question, max_steps=max_steps, turn_tokens=max_new_tokens,
                      toolbox=toolbox or Toolbox(), result=result, backend=endpoint)
    result.trajectory = state.text()
    if state.error() is not None:
        raise RuntimeError(f"agent program failed: {state.error()}") from state.error()
    return result


def print_result(result: AgentResult, trajectory: bool = False) -> None:
    print(f"\n=== {result.question}")
    if trajectory:
        print(f"--- trajectory (what the last role read)\n{result.trajectory}")
    print("--- what each role wrote (its own adapter)")
    runs = {run.step: run for run in result.tool_runs}
    for t in result.turns:
        print(f"step {t.step} {t.role:7s} | {t.text}")
        if t.role == "action":
            run = runs[t.step]
            origin = "fallback" if run.fallback else "model"
            print(f"       tool    | [{origin}] {run.call} -> {run.output}")
    if any(run.fallback for run in result.tool_runs):
        print(FALLBACK_NOTE)
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
    parser.add_argument("--max-new-tokens", type=int, default=48)
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
            print_result(run_agent(question, endpoint, args.max_steps, args.max_new_tokens, toolbox),
                         trajectory=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
