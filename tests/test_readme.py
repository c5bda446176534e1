"""The README's results table is the one the committed results files give, never retyped."""
import re
from pathlib import Path

import pytest

from kdlab.figures import format_ablation_table, format_evaluation_table, format_results_table
from kdlab.results import load_ablation, load_seed_results

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("block, make", [
    ("reference", lambda: format_results_table(load_seed_results(REPO / "results" / "reference"))),
    ("evaluation", lambda: format_evaluation_table(load_seed_results(REPO / "results" / "reference"))),
    ("ablation", lambda: format_ablation_table(load_ablation(REPO / "results" / "ablation-recipe"))),
])
def test_readme_results_tables_match_the_results_files(block, make):
    readme = (REPO / "README.md").read_text()
    table = re.search(rf"<!-- results:{block} -->\n(.*?)\n<!-- /results:{block} -->", readme, re.S)
    assert table, f"README lost its {block} block"
    assert table.group(1) == make()


def test_readme_commands_are_the_ones_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    for command in ("pip install -q -r requirements-dev.txt", "python -m pytest"):
        assert command in readme and command in ci
