r"""AUTOMATIC1111's prompt editing and alternation: which text a prompt is at each denoising step.

- `[from:to:when]` is `from` up to step `when`, then `to`; `[to:when]` adds `to` after `when`; `[from::when]`
  removes `from` after it. `when` without a point is a step number; with a point (`0.25`, `1.5`) a fraction of
  the steps. In the hires fix's second pass the numbers count on from the first pass: step `when` - steps, or
  (`when` - 1) x the second pass's steps (so `[a:b:0.5]` is `b` all through the second pass, `[a:b:1.5]` switches
  half way through it).
- `[a|b|c]` alternates every step: a, b, c, a, ... (an empty option is no text).
- They nest, in each other and in emphasis: `a [(red:1.2)|blue] [cat:[dog:fox:12]:5]`.
- `a cat AND a dog :0.5` (composable diffusion, `composable`): parts, each with its weight, guided together; each part
  has its own schedule.

The grammar is AUTOMATIC1111's (modules/prompt_parser.py, a lark grammar); this is a hand-written parser for the
same language, with its outcomes: a bracket that opens no valid construct is text (`a [unbalanced`), and a prompt
that does not parse at all (a `|` outside an alternation, a lone backslash at its end) is one text for every step.
A schedule is AUTOMATIC1111's: `[(end_at_step, text), ...]`, and denoising step i (counted from 0, one per model
call, restarting with the hires fix's second pass) runs the first entry whose end_at_step >= i
(`text_at`). Escaped brackets (`\[`) are text, as in emphasis.

Checked against AUTOMATIC1111's own grammar in lark on 40,000 random prompts of brackets, colons, bars and numbers
(an ad-hoc run, not a test: lark is not a dependency): the same schedules, but for a few constructs closed right
against stray brackets (`([a:b:5])]`, `[a:b:5]][c`), where lark's Earley parser resolves the ambiguity to plain text
and this parser reads the construct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPECIAL = frozenset("\\[]():|")
_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")  # lark's SIGNED_NUMBER, then "]"


@dataclass(frozen=True)
class Edit:
    """[before:after:when] (before None: [after:when])."""

    before: tuple | None
    after: tuple
    when: str  # the number as written: a point makes it a fraction


@dataclass(frozen=True)
class Alternate:
    """[a|b|...]: option (step - 1) % len at step (from 1)."""

    options: tuple


class _Fail(Exception):
    """This construct does not parse here."""


def parse(text: str) -> tuple | None:
    """`text` as a tuple of strings, Edits and Alternates; None where it does not parse (then it is one text)."""
    try:
        return _top(text)
    except _Fail:
        return None


def edits(text: str) -> bool:
    """Whether `text` holds prompt editing or alternation (a construct that parses)."""
    return any(not isinstance(node, str) for node in parse(text) or ())


def _top(text: str) -> tuple:
    """AUTOMATIC1111's start rule: prompts, and between them brackets and colons that open nothing (text)."""
    nodes: list = []
    i = 0
    while i < len(text):
        part, i = _prompt(text, i, top=True)
        nodes += part
        if i < len(text):
            if text[i] == "|":  # a bar outside an alternation: the grammar has no place for it
                raise _Fail
            nodes.append(text[i])  # a stray bracket or colon
            i += 1
    return _merged(nodes)


def _prompt(text: str, i: int, top: bool = False) -> tuple[list, int]:
    """Text, emphasis, edits and alternations from i, up to a character that ends a prompt (]):| or the end). At the
    top a bracket that opens nothing valid ends it (the caller keeps it as text); inside a construct, it fails."""
    nodes: list = []
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text) or text[i + 1] == "\n":  # the grammar's escape is a backslash and any character
                raise _Fail
            nodes.append(text[i:i + 2])
            i += 2
        elif char not in _SPECIAL:
            end = i + 1
            while end < len(text) and text[end] not in _SPECIAL:
                end += 1
            nodes.append(text[i:end])
            i = end
        elif char in "([":
            try:
                part, i = (_round if char == "(" else _square)(text, i)
            except _Fail:
                if top:
                    return nodes, i
                raise
            nodes += part
        else:
            break
    return nodes, i


def _round(text: str, i: int) -> tuple[list, int]:
    """(prompt) or (prompt:prompt): emphasis, kept as written (its inside may hold edits)."""
    first, i = _prompt(text, i + 1)
    if i < len(text) and text[i] == ")":
        return ["(", *first, ")"], i + 1
    if i < len(text) and text[i] == ":":
        second, i = _prompt(text, i + 1)
        if i < len(text) and text[i] == ")":
            return ["(", *first, ":", *second, ")"], i + 1
    raise _Fail


def _square(text: str, i: int) -> tuple[list, int]:
    """[prompt] (emphasis), [a|b|...], [after:when] or [before:after:when]."""
    first, i = _prompt(text, i + 1)
    if i >= len(text):
        raise _Fail
    if text[i] == "]":
        return ["[", *first, "]"], i + 1
    if text[i] == "|":
        options = [_merged(first)]
        while i < len(text) and text[i] == "|":
            option, i = _prompt(text, i + 1)
            options.append(_merged(option))
        if i < len(text) and text[i] == "]":
            return [Alternate(tuple(options))], i + 1
        raise _Fail
    if text[i] == ":":
        if number := _NUMBER.match(text, i + 1):
            return [Edit(None, _merged(first), number.group(1))], number.end()
        second, i = _prompt(text, i + 1)
        if i < len(text) and text[i] == ":" and (number := _NUMBER.match(text, i + 1)):
            return [Edit(_merged(first), _merged(second), number.group(1))], number.end()
    raise _Fail


def _merged(nodes: list) -> tuple:
    """Adjacent strings joined."""
    out: list = []
    for node in nodes:
        if isinstance(node, str) and out and isinstance(out[-1], str):
            out[-1] += node
        else:
            out.append(node)
    return tuple(out)


def schedule(prompt: str, steps: int, hires_steps: int | None = None, old: bool = False) -> list[tuple[int, str]]:
    """AUTOMATIC1111's get_learned_conditioning_prompt_schedules for one prompt: [(end_at_step, text)], the steps
    ascending, the last `steps` (or `hires_steps`: the second pass's, its numbers counting on from `steps`).

    `old`: its use_old_scheduling ("Old prompt editing timelines", before 1.8): a number under 1 is a fraction of the
    steps, any other a step, and the hires fix's second pass runs the first pass's timeline again."""
    if hires_steps is None or old:
        int_offset, float_offset, total = 0, 0.0, steps
    else:
        int_offset, float_offset, total = steps, 1.0, hires_steps
    nodes = parse(prompt)
    if nodes is None:
        return [(total, prompt)]

    def when(number: str) -> int:
        value = float(number)
        if old:
            value = value * total if value < 1 else value
        else:
            value = (value - float_offset) * total if "." in number else value - int_offset
        return min(total, int(value))

    ends = {total}

    def collect(items: tuple) -> None:
        for node in items:
            if isinstance(node, Edit):
                if (step := when(node.when)) >= 1:
                    ends.add(step)
                collect(node.before or ())
                collect(node.after)
            elif isinstance(node, Alternate):
                ends.update(range(1, total + 1))
                for option in node.options:
                    collect(option)

    def at(step: int, items: tuple) -> str:
        out = []
        for node in items:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, Edit):
                out.append(at(step, node.before or ()) if step <= when(node.when) else at(step, node.after))
            else:
                out.append(at(step, node.options[(step - 1) % len(node.options)]))
        return "".join(out)

    collect(nodes)
    return [(step, at(step, nodes)) for step in sorted(ends)]


AND = re.compile(r"\bAND\b")  # composable diffusion's separator
_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")  # a part's trailing :weight


def composable(prompt: str) -> list[tuple[str, float]]:
    """AUTOMATIC1111's composable diffusion (get_multicond_prompt_list): the prompt's parts between ANDs, each with
    its trailing `:weight` (1 without one) taken off, as [(text, weight)]. A prompt of one part without a weight is
    itself, untouched."""
    parts = []
    for part in AND.split(prompt):
        if match := _WEIGHT.search(part):
            parts.append((part[:match.start()], float(match.group(1))))
        else:
            parts.append((part.rstrip(), 1.0))
    return [(prompt, 1.0)] if parts == [(prompt.rstrip(), 1.0)] else parts


def text_at(entries: list[tuple[int, str]] | tuple, step: int) -> int:
    """The entry a denoising step (from 0) runs: the first whose end_at_step >= step, else the first (as
    AUTOMATIC1111's reconstruct_cond_batch)."""
    for index, (end, _) in enumerate(entries):
        if step <= end:
            return index
    return 0


def leftover(text: str) -> str:
    """`text` with every edit and alternation taken out (each leaves "…"): what is left is read as plain text and
    emphasis, where an editing bracket that did not parse can be found."""
    nodes = parse(text)
    if nodes is None:
        return text
    return "".join(node if isinstance(node, str) else "…" for node in nodes)
