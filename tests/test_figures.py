"""No hand-typed figure: every measured number in README.md and docs/ is checked against its JSON.

A figure typed into prose or a table carries an HTML comment right after it
(`docs/bench.md`, "Figures in the docs"):

    q4c is 3.46x<!-- fig: capacity.json [bytes_per_token/fp16] / [bytes_per_token/q4c] --> smaller than fp16

names the committed JSON under bench_results/ and an arithmetic expression
(+ - * / and parentheses) over `[key/path]` values of that file (list items
by index). The number before the comment must equal the expression rounded to
the digits shown. A line whose numbers are not measured here (a goal, a
format's definition, a published figure) ends with
`<!-- figures: not measured, <why> -->`. Anything else that looks measured (a
number with a unit such as %, x, ms, s, MiB, or with two or more decimals)
outside code, comments and the generated benchmark block fails the test.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench_results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NUMBER = r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?"
FIG = re.compile(rf"(?P<num>{NUMBER})[^\d<>\n]{{0,12}}?<!-- fig: (?P<file>[\w.-]+\.json) (?P<expr>.+?) -->")
NOT_MEASURED = re.compile(r"<!-- figures: not measured, \S.*?-->\s*$")
UNITS = r"%|x\b|ms\b|s\b|MiB\b|GiB\b|KiB\b|MB\b|GB\b|MB/s\b|GFLOP/s\b|tok/s\b|B/token\b"
VERSIONED = "".join(f"(?<!{re.escape(name)} )" for name in ("MLX", "Python", "mlx-lm", "llama.cpp", "OpenBLAS"))  # "MLX 0.32"
LOOKS_MEASURED = re.compile(rf"(?<![\w.:/])(?<![A-Za-z_]-){VERSIONED}(?:\d+(?:,\d{{3}})*(?:\.\d+)?\s?(?:{UNITS})|\d+\.\d{{2,}}(?![\d.+]))")  # nor 0.32.4, 3.11+
GENERATED = re.compile(r"<!-- bench:begin.*?<!-- bench:end -->", re.S)
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
HIDDEN = [re.compile(r"`[^`\n]*`"), re.compile(r"<!--.*?-->", re.S), re.compile(r"\]\([^)]*\)")]


def value(data, path: str) -> float:
    for key in path.split("/"):
        data = data[int(key)] if isinstance(data, list) else data[key]
    if not isinstance(data, (int, float)):
        raise ValueError(f"[{path}] is {type(data).__name__}, not a number")
    return float(data)


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(data: dict, expr: str) -> float:
    """`[a/b] / [c/d] * 100`: the paths' values from `data`, then + - * / only."""
    values = []

    def take(m):
        values.append(value(data, m.group(1)))
        return f"v{len(values) - 1}"

    tree = ast.parse(re.sub(r"\[([^\]]+)\]", take, expr), mode="eval")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Name) and re.fullmatch(r"v\d+", node.id):
            return values[int(node.id[1:])]
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        raise ValueError(f"not allowed in a figure's expression: {ast.dump(node)}")

    return ev(tree)


def shown(text: str) -> tuple[float, int]:
    """A figure as typed -> (value, decimals shown)."""
    digits = text.replace(",", "").lstrip("+")
    return float(digits), len(digits.split(".")[1]) if "." in digits else 0


def figures(text: str) -> list[tuple[int, str, str, str]]:
    """(line, typed number, json file, expression) of every annotated figure."""
    return [(text.count("\n", 0, m.start()) + 1, m["num"], m["file"], m["expr"].strip()) for m in FIG.finditer(text)]


def mismatches(text: str, results: Path = RESULTS) -> list[str]:
    out = []
    for line, num, file, expr in figures(text):
        try:
            want = evaluate(json.loads((results / file).read_text()), expr)
        except (OSError, KeyError, IndexError, ValueError, SyntaxError, ZeroDivisionError) as e:
            out.append(f"line {line}: {num} <- {file} {expr}: {type(e).__name__}: {e}")
            continue
        got, decimals = shown(num)
        if abs(got - want) > 0.5 * 10**-decimals + 1e-9 * abs(want):
            out.append(f"line {line}: typed {num}, but {file} {expr} = {want:.{decimals + 2}f}")
    return out


def unannotated(text: str) -> list[str]:
    """Numbers that look measured, outside the generated block, code and comments, with no annotation."""
    out = []
    for block in (GENERATED, FENCED):  # blanked, line numbers kept
        text = block.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    code, prev = False, ""  # an indented code block: 4 spaces after a blank line, until a line that is not
    for i, line in enumerate(text.splitlines(), 1):
        code = line.startswith("    ") and (code or prev == "")
        prev = line.strip()
        if code or NOT_MEASURED.search(line):
            continue
        bare = FIG.sub("", line)
        for pattern in HIDDEN:
            bare = pattern.sub("", bare)
        out += [f"line {i}: {m.group(0)!r} in {line.strip()[:100]!r}" for m in LOOKS_MEASURED.finditer(bare)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_annotated_figure_equals_its_json(doc):
    assert not mismatches(doc.read_text()), "\n".join(mismatches(doc.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_measured_figure_is_left_unannotated(doc):
    bad = unannotated(doc.read_text())
    assert not bad, f"{doc.name}: annotate these with <!-- fig: FILE.json EXPR --> (or end the line with " \
                    "<!-- figures: not measured, why -->):\n" + "\n".join(bad)


def test_the_check_fails_on_a_figure_that_disagrees_with_its_json(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": {"b": 23040, "c": 6660}, "runs": [{"ms": 2532.1}], "k": {"4.0": 0.0505}}))
    good = ("size 3.46x<!-- fig: r.json [a/b] / [a/c] --> smaller; TTFT 2.53 s<!-- fig: r.json [runs/0/ms] / 1000 -->; "
            "KL 0.050<!-- fig: r.json [k/4.0] -->, 6,660 B<!-- fig: r.json [a/c] -->")
    assert len(figures(good)) == 4 and mismatches(good, tmp_path) == []
    assert mismatches("3.58x<!-- fig: r.json [a/b] / [a/c] -->", tmp_path) == ["line 1: typed 3.58, but r.json [a/b] / [a/c] = 3.4595"]
    assert mismatches("2.6 s<!-- fig: r.json [runs/0/ms] / 1000 -->", tmp_path)  # 2.532 measured, shown as 2.5
    assert mismatches("1.0<!-- fig: r.json [a/missing] -->", tmp_path)[0].startswith("line 1: 1.0 <- r.json [a/missing]: KeyError")
    assert mismatches("1<!-- fig: r.json __import__('os') -->", tmp_path)  # only paths, numbers and + - * /
    assert [x.split("'")[1] for x in unannotated("31-38 ms, 1.54-2.03x")] == ["38 ms", "1.54", "2.03x"]  # both ends of a range
    assert unannotated("a 3.46x gain, 54.7 s, +1.9% and 0.018") == [
        "line 1: '3.46x' in 'a 3.46x gain, 54.7 s, +1.9% and 0.018'", "line 1: '54.7 s' in 'a 3.46x gain, 54.7 s, +1.9% and 0.018'",
        "line 1: '1.9%' in 'a 3.46x gain, 54.7 s, +1.9% and 0.018'", "line 1: '0.018' in 'a 3.46x gain, 54.7 s, +1.9% and 0.018'"]
    assert unannotated("goal: under 3% at 4.5 bits <!-- figures: not measured, the goal and q4_0's format -->") == []
    assert unannotated("`0.25 s` in code, Python 3.11+, MLX 0.32.4, what MLX 0.32 builds, arXiv:2603.04428, q4_0, 256 tokens, 3.46x<!-- fig: r.json [a/b] -->") == []


def test_every_figure_of_the_readme_fails_when_typed_otherwise():
    """Each annotated README figure, its last digit changed, no longer matches its JSON."""
    text = (ROOT / "README.md").read_text()
    found = list(FIG.finditer(text))
    assert len(found) >= 20
    for m in found:
        num = m["num"]
        wrong = num[:-1] + str((int(num[-1]) + 5) % 10)
        assert mismatches(text[: m.start("num")] + wrong + text[m.end("num") :]), (num, m["expr"])
