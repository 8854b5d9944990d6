"""Local tools for the example agent: a safe calculator, a lookup over shipped documents,
and the parser for the one-line tool calls the action role writes.

Everything here is plain Python with no server and no network, so the agent's tool path
is deterministic and testable on its own. The calculator walks the expression's AST and
accepts only numbers and arithmetic operators: nothing is evaluated with `eval`.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lragent_sglang import data_path

logger = logging.getLogger(__name__)

DEFAULT_DOCS_DIR = data_path("docs")

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
# Bounds that keep a hostile expression (9**9**9, a 10k-digit literal) from hanging us.
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e100
MAX_EXPRESSION_CHARS = 200


class ToolError(ValueError):
    """A tool call that cannot run; the message is shown to the model as the tool output."""


def calculate(expression: str) -> float | int:
    """Evaluate an arithmetic expression (+ - * / // % ** and parentheses) safely."""
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from exc
    value = _eval_node(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _eval_node(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise ToolError("division by zero") from exc
        if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return value
    raise ToolError(f"unsupported element {type(node).__name__} in the expression")


_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from has have how in is it its many much of "
    "on or that the this to was what when where which who why with".split()
)


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


@dataclass(frozen=True)
class Document:
    name: str
    title: str
    body: str


class DocumentStore:
    """Keyword lookup over a folder of short Markdown fact files (`data/docs/*.md`).

    Scoring is term overlap with the title counted twice: enough for a dozen documents,
    and predictable in tests.
    """

    def __init__(self, docs_dir: Path = DEFAULT_DOCS_DIR) -> None:
        self.docs: list[Document] = []
        for path in sorted(Path(docs_dir).glob("*.md")):
            lines = path.read_text().strip().splitlines()
            title = lines[0].lstrip("# ").strip() if lines else path.stem
            body = " ".join(line.strip() for line in lines[1:] if line.strip())
            self.docs.append(Document(path.stem, title, body))
        if not self.docs:
            raise FileNotFoundError(f"no *.md documents in {docs_dir}")
        logger.debug("loaded %d documents from %s", len(self.docs), docs_dir)

    def search(self, query: str) -> Document | None:
        """The best-matching document, or None when no term matches."""
        terms = _terms(query)
        best, best_score = None, 0
        for doc in self.docs:
            score = 2 * len(terms & _terms(doc.title)) + len(terms & _terms(doc.body))
            if score > best_score:
                best, best_score = doc, score
        return best

    def lookup(self, query: str, max_chars: int = 320) -> str:
        if not query.strip():
            raise ToolError("empty lookup query")
        doc = self.search(query)
        if doc is None:
            raise ToolError(f"no document matches {query!r}")
        body = doc.body if len(doc.body) <= max_chars else doc.body[: max_chars - 3] + "..."
        return f"{doc.title}: {body}"


@dataclass(frozen=True)
class ToolCall:
    tool: str
    argument: str

    def __str__(self) -> str:
        return f"{self.tool}({self.argument})"


TOOL_ALIASES = {
    "calculator": "calculator", "calc": "calculator", "calculate": "calculator",
    "lookup": "lookup", "search": "lookup", "look_up": "lookup",
}
# `TOOL: calculator(3 * 14)`; the prefix and the closing parenthesis are optional, the
# tool name is matched case-insensitively anywhere in the text.
_CALL = re.compile(
    r"\b(?P<tool>" + "|".join(sorted(TOOL_ALIASES, key=len, reverse=True)) + r")\s*"
    r"(?:\(\s*(?P<paren>[^()\n]*(?:\([^()\n]*\)[^()\n]*)*)\)|[:=]\s*(?P<colon>[^\n]+))",
    re.IGNORECASE,
)


def parse_tool_call(text: str) -> ToolCall | None:
    """The first well-formed tool call in `text`, or None (the agent then falls back)."""
    for match in _CALL.finditer(text):
        argument = (match.group("paren") or match.group("colon") or "").strip().strip("\"'`")
        if argument:
            return ToolCall(TOOL_ALIASES[match.group("tool").lower()], argument)
    return None


class Toolbox:
    """The agent's tools by name; `run` turns every failure into a `ToolError`."""

    def __init__(self, docs: DocumentStore | None = None) -> None:
        self.docs = docs or DocumentStore()

    def run(self, call: ToolCall) -> str:
        if call.tool == "calculator":
            return str(calculate(call.argument))
        if call.tool == "lookup":
            return self.docs.lookup(call.argument)
        raise ToolError(f"unknown tool {call.tool!r}")
