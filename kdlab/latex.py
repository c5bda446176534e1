"""Text for the generated report and pages: LaTeX escaping, numbers as the prose writes them, tables
(LaTeX for the report, Markdown for the pages and the figures folder).

Pure string functions, no knowledge of runs or results (kdlab.report holds those).
"""
from __future__ import annotations

import re

TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex(text) -> str:
    """Any value as LaTeX text, its special characters escaped ('--' stays two hyphens)."""
    return re.sub("-(?=-)", "-{}", "".join(TEX_SPECIALS.get(ch, ch) for ch in str(text)))


def tt(text) -> str:
    """Typewriter text that may break after an underscore: run names are long."""
    return rf"\texttt{{{tex(text)}}}".replace(r"\_", r"\_\allowbreak{}")


def num(value: float) -> str:
    """A config number as LaTeX: '0.2', '512', or '$5\\times10^{-5}$' where Python writes '5e-05'."""
    text = f"{value:g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return rf"${mantissa}\times10^{{{int(exponent)}}}$"


def pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


def acc_text(acc: float) -> str:
    return rf"{pct(acc)}\%"


def agreeing(n: int, one: str, many: str) -> str:
    """The word that agrees with `n` things: agreeing(1, 'has', 'have') is 'has', agreeing(3, 'it', 'them') 'them'."""
    return one if n == 1 else many


def count(n: int, noun: str) -> str:
    """'1 epoch', '20 epochs', '1,000 images'."""
    return f"{n:,} {agreeing(n, noun, noun + 's')}"


def probability_text(p: float) -> str:
    """A probability as the prose writes it: '37\\%', '2.4\\%', '0.03\\%', 'under 0.01\\%'."""
    percent = 100 * p
    if percent < 0.01:
        return r"under 0.01\%"
    return rf"{percent:.{0 if percent >= 10 else 1 if percent >= 1 else 2}f}\%"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def enumerate_text(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def compare(a: float, b: float) -> str:
    """How `a` stands to `b` (accuracies as fractions): '1.23 points above', 'level with'."""
    diff = 100 * (a - b)
    if f"{abs(diff):.2f}" == "0.00":
        return "level with"
    return f"{abs(diff):.2f} points {'above' if diff > 0 else 'below'}"


def times(reference: float, value: float, less: str, more: str) -> str:
    """How `value` stands to `reference` as a factor: '2.10 times fewer', '1.30 times more'."""
    if value <= reference:
        return f"{reference / value:.2f} times {less}"
    return f"{value / reference:.2f} times {more}"


def table(label: str, caption: str, columns: str, header: list[str], rows: list[str]) -> str:
    """A booktabs table, small enough for the page; `header` is one or more lines of cells."""
    return "\n".join([
        r"\begin{table}[tbp]", r"\centering\footnotesize", r"\setlength{\tabcolsep}{3.5pt}",
        rf"\caption{{{caption}}}", rf"\label{{{label}}}", rf"\begin{{tabular}}{{@{{}}{columns}@{{}}}}",
        r"\toprule", *header, r"\midrule", *rows, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def markdown_table(header: list[str], rows: list[list], align: str = "") -> str:
    """A markdown table; `align` has one letter per column, `r` for right-aligned numbers."""
    align = align or "l" * len(header)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), rule] + [line(r) for r in rows])
