"""Write the shipped role dataset lragent_sglang/data/roles/train.jsonl (deterministic: same file every run).

Each question gives three examples, one per role of the example agent, on one shared
trajectory: plan (a short plan naming the tool), action (one tool call in the
`TOOL: calculator(...)` / `TOOL: lookup(...)` form the agent parses) and reflect (checks
the tool output and gives the final answer). Questions are arithmetic word problems and
look-ups of facts from data/docs; the facts are copied here so that the data does not
change when those documents do. The system message and the role instructions live in
`lragent_sglang.agents.models`, where the example agent reads them too.

Usage: python scripts/make_role_data.py [--out lragent_sglang/data/roles/train.jsonl] [--seed 0] [--arithmetic 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from lragent_sglang import data_path
from lragent_sglang.agents.models import ROLE_INSTRUCTIONS as INSTRUCTIONS
from lragent_sglang.agents.models import ROLE_SYSTEM as SYSTEM

logger = logging.getLogger(__name__)

ITEMS = (("pen", "pens"), ("notebook", "notebooks"), ("apple", "apples"), ("ticket", "tickets"),
         ("book", "books"), ("cup", "cups"), ("lamp", "lamps"), ("card", "cards"))
# (question, lookup query, tool output, answer): facts from data/docs/*.md.
LOOKUPS = (
    ("How long is the Amazon River?", "Amazon River length", "Amazon River: about 6,400 kilometres long.", "about 6,400 kilometres"),
    ("When was the Eiffel Tower finished?", "Eiffel Tower finished", "Eiffel Tower: finished in 1889 for the World's Fair.", "1889"),
    ("How tall is the Eiffel Tower?", "Eiffel Tower height", "Eiffel Tower: 330 metres tall including its antennas.", "330 metres"),
    ("How many steps does the Eiffel Tower have?", "Eiffel Tower steps", "Eiffel Tower: 1,665 steps from the ground to the top floor.", "1,665"),
    ("How long is the Great Wall of China?", "Great Wall of China length", "Great Wall of China: about 21,196 kilometres long including all its branches.", "about 21,196 kilometres"),
    ("How far is the Moon from the Earth?", "Moon distance", "Moon: average distance of 384,400 kilometres.", "about 384,400 kilometres"),
    ("How long does one orbit of the Moon take?", "Moon orbit", "Moon: one orbit takes about 27.3 days.", "about 27.3 days"),
    ("What is the diameter of the Moon?", "Moon diameter", "Moon: its diameter is 3,474 kilometres.", "3,474 kilometres"),
    ("How high is Mount Everest?", "Mount Everest height", "Mount Everest: 8,849 metres above sea level.", "8,849 metres"),
    ("When was Mount Everest first climbed?", "Mount Everest first climbed", "Mount Everest: first climbed in 1953 by Tenzing Norgay and Edmund Hillary.", "1953"),
    ("What is the capital of France?", "capital of France", "Paris: Paris is the capital of France.", "Paris"),
    ("Which river flows through Paris?", "Paris river", "Paris: the river Seine flows through the city.", "the Seine"),
    ("How much does a notebook cost at the stationery shop?", "stationery shop notebook price", "Stationery shop prices: a notebook costs 5 dollars.", "5 dollars"),
    ("Who created the Python programming language?", "Python creator", "Python programming language: created by Guido van Rossum.", "Guido van Rossum"),
    ("When did Python 3.0 come out?", "Python 3.0 release", "Python programming language: Python 3.0 came out in 2008.", "2008"),
    ("How fast does light travel in a vacuum?", "speed of light", "Speed of light: 299,792 kilometres per second.", "299,792 kilometres per second"),
    ("How long does sunlight take to reach the Earth?", "sunlight time to Earth", "Speed of light: about 8 minutes and 20 seconds (500 seconds).", "about 500 seconds"),
    ("At what temperature does water boil?", "water boiling point", "Water: boils at 100 degrees Celsius at sea-level pressure.", "100 degrees Celsius"),
    ("What is the mass of one litre of water?", "water mass litre", "Water: one litre has a mass of about 1 kilogram.", "about 1 kilogram"),
    ("What does LoRA stand for?", "LoRA", "LoRA: low-rank adaptation.", "low-rank adaptation"),
)


def _arithmetic(rng: random.Random) -> tuple[str, str, str, int]:
    """(question, expression, plan step, answer) of one word problem."""
    kind = rng.choice(("buy", "buy_two", "share", "left"))
    (one, many), price, count = rng.choice(ITEMS), rng.randint(2, 12), rng.randint(3, 25)
    if kind == "buy":
        return (f"A shop sells {many} at {price} dollars each. How much do {count} {many} cost?",
                f"{count} * {price}", f"multiply {count} {many} by {price} dollars", count * price)
    if kind == "buy_two":
        (one2, many2), price2, count2 = rng.choice([i for i in ITEMS if i[0] != one]), rng.randint(2, 9), rng.randint(2, 9)
        return (f"A {one} costs {price} dollars and a {one2} costs {price2} dollars. "
                f"How much do {count} {many} and {count2} {many2} cost together?",
                f"{count} * {price} + {count2} * {price2}",
                "multiply each count by its price and add the two totals", count * price + count2 * price2)
    if kind == "share":
        people = rng.randint(2, 9)
        total = people * rng.randint(2, 15)
        return (f"{total} {many} are shared equally among {people} friends. How many does each friend get?",
                f"{total} / {people}", f"divide {total} {many} by {people} friends", total // people)
    start, sold = rng.randint(30, 120), rng.randint(3, 29)
    return (f"A store has {start} {many} and sells {sold} of them. How many {many} are left?",
            f"{start} - {sold}", f"subtract the {sold} sold {many} from {start}", start - sold)


def _records(question: str, plan: str, call: str, output: str, reflect: str) -> list[dict[str, str]]:
    """The three role examples of one question; each prompt is the trajectory so far."""
    context = f"Question: {question}"
    plan_prompt = f"{context}\n{INSTRUCTIONS['plan']}"
    action_prompt = f"{context}\nPlan: {plan}\n{INSTRUCTIONS['action']}"
    reflect_prompt = f"{context}\nPlan: {plan}\nAction: {call}\nTool output: {output}\n{INSTRUCTIONS['reflect']}"
    return [
        {"role": "plan", "system": SYSTEM, "prompt": plan_prompt, "completion": plan},
        {"role": "action", "system": SYSTEM, "prompt": action_prompt, "completion": call},
        {"role": "reflect", "system": SYSTEM, "prompt": reflect_prompt, "completion": reflect},
    ]


def make_records(seed: int = 0, arithmetic: int = 30) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(arithmetic):
        question, expr, step, answer = _arithmetic(rng)
        plan = f"1. Use the calculator to {step}. 2. Check the result and give the answer."
        call = f"TOOL: calculator({expr})"
        reflect = f"Yes: the calculator computed {expr} = {answer}, which answers the question. Final answer: {answer}."
        records += _records(question, plan, call, str(answer), reflect)
    for question, query, output, answer in LOOKUPS:
        plan = f"1. Look up {query} in the documents. 2. Read the fact and give the answer."
        call = f"TOOL: lookup({query})"
        reflect = f"Yes: the document says it directly. Final answer: {answer}."
        records += _records(question, plan, call, output, reflect)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=data_path("roles", "train.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arithmetic", type=int, default=30, help="arithmetic questions (plus %d look-ups)" % len(LOOKUPS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = make_records(args.seed, args.arithmetic)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    logger.info("wrote %d examples (%d questions x 3 roles) to %s", len(records), len(records) // 3, args.out)


if __name__ == "__main__":
    main()
