"""The README's results table is the one the committed results files give, never retyped."""
import re
from pathlib import Path

from kdlab.figures import format_results_table
from kdlab.results import load_results

REPO = Path(__file__).resolve().parents[1]


def test_readme_results_table_matches_the_results_files():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- results:reference -->\n(.*?)\n<!-- /results:reference -->", readme, re.S)
    assert table, "README lost its results block"
    assert table.group(1) == format_results_table(load_results(REPO / "results" / "reference"))


def test_readme_commands_are_the_ones_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    for command in ("pip install -q -r requirements-dev.txt", "python -m pytest"):
        assert command in readme and command in ci
