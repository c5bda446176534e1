"""README.md and docs/*.md cannot drift from the code: generated blocks equal what `python -m
kdlab.docs` writes, every link and repository path resolves, every `python -m kdlab` command shown parses,
and the pages speak the lab's words."""
import ast
import dataclasses
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from kdlab import docs
from kdlab.cli import build_parser
from kdlab.config import RunConfig

PAGES = docs.pages()
TEXTS = {page.relative_to(REPO).as_posix(): page.read_text() for page in PAGES}
# Folders of the repository whose paths a page may name (checkpoints/, data/ and my_* are the user's).
TRACKED = ("kdlab", "tests", "scripts", "benchmarks", "results", "figures", "report", "notebook", "docs", ".ci")


def test_every_generated_block_is_what_the_code_and_results_say():
    assert docs.stale_blocks() == [], "run `python -m kdlab.docs`"


def test_the_docs_command_rewrites_a_stale_block_and_check_names_it(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("intro\n<!-- generated:runs -->\nan old table\n<!-- /generated:runs -->\nend\n")
    assert docs.stale_blocks(tmp_path) == ["docs/page.md: runs"]
    docs.write_docs(tmp_path, log=lambda _: None)
    assert page.read_text() == f"intro\n<!-- generated:runs -->\n{docs.runs_table()}\n<!-- /generated:runs -->\nend\n"
    assert docs.stale_blocks(tmp_path) == []


def test_the_recipe_table_documents_every_setting_of_a_run():
    structural = {"run", "arch", "method", "weights", "settings", "limit_train", "smoke"}
    assert set(docs.RECIPE_REASONS) == {f.name for f in dataclasses.fields(RunConfig)} - structural


@pytest.mark.parametrize("page", TEXTS)
def test_links_and_repository_paths_resolve(page):
    text = TEXTS[page]
    folder = (REPO / page).parent
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)
             if not re.match(r"[a-z]+:", target) and not target.startswith("#")]
    paths = [p.rstrip(".,:") for p in re.findall(rf"`((?:{'|'.join(map(re.escape, TRACKED))})/[^`\s]*)`", text)
             if not re.search(r"[<>*{}]|\.\.\.", p)]
    broken = [link for link in links if not (folder / link).exists()]
    broken += [path for path in paths if not (REPO / path).exists()]
    assert broken == []


def shown_commands(text: str) -> tuple[list[str], list[str]]:
    """The `python -m kdlab ...` commands of a page: those of its code blocks (continuation lines
    joined), which a reader pastes whole, and those named inline in the prose."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    pasted = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            pasted += [c[c.index("python -m kdlab "):] for c in re.split(r"&&|;|\|", line) if "python -m kdlab " in c]
    named = re.findall(r"`(python -m kdlab [^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return pasted, named


def subcommands() -> dict:
    [commands] = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    return commands.choices


@pytest.mark.parametrize("page", TEXTS)
def test_every_kdlab_command_shown_parses(page):
    """A command in a code block parses whole; one named in the prose names a subcommand and its flags."""
    pasted, named = shown_commands(TEXTS[page])
    for command in pasted:
        try:
            build_parser().parse_args(shlex.split(command)[3:])
        except SystemExit as exit:
            pytest.fail(f"{page}: `{command}` does not parse (exit {exit.code})")
    for command in named:
        words = shlex.split(command)[3:]
        sub = subcommands().get(words[0]) if words else None
        assert sub is not None, f"{page}: `{command}` names no subcommand"
        flags = {flag for action in sub._actions for flag in action.option_strings}
        unknown = [w.split("=")[0] for w in words[1:] if w.startswith("--") and w.split("=")[0] not in flags]
        assert unknown == [], f"{page}: `{command}`"


@pytest.mark.parametrize("page", TEXTS)
def test_pages_speak_the_labs_words(page):
    assert not re.search(r"\b(issues?|sessions?)\b", TEXTS[page], re.I), "the team's words, not the lab's"


def test_readme_commands_are_the_ones_ci_runs():
    readme, ci = TEXTS["README.md"], (REPO / ".ci" / "run").read_text()
    for command in ("pip install -q -r requirements-dev.txt", "python -m pytest"):
        assert command in readme and command in ci


def test_the_readme_is_one_screen_to_the_two_commands_and_at_most_150_lines():
    lines = TEXTS["README.md"].splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:50])
    for step in ("Colab", "Run all", "python -m kdlab run all", "python -m pytest"):
        assert step in first_screen
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", TEXTS["README.md"]))
    assert linked == {page.name for page in (REPO / "docs").glob("*.md")}, "every docs page linked from the README"


def test_every_flag_the_prose_names_is_an_option_of_the_command_line_or_the_scripts():
    """A flag named in backticks (`--lr`) is one that kdlab's parser or a script of the repository
    declares: a renamed or removed option cannot live on in the docs."""
    declared = {flag for sub in subcommands().values() for action in sub._actions for flag in action.option_strings}
    for script in ("scripts/reference_run.py", "benchmarks/throughput.py", "kdlab/benchmark_tables.py", "kdlab/docs.py"):
        declared |= set(re.findall(r'add_argument\("(--[a-z][a-z0-9-]*)', (REPO / script).read_text()))
    named = {page: set(re.findall(r"`(--[a-z][a-z0-9-]*)", text)) for page, text in TEXTS.items()}
    assert {page: flags - declared for page, flags in named.items() if flags - declared} == {}


def test_the_docs_generator_is_its_own_entry_point_and_the_cli_never_imports_it(capsys):
    # kdlab.docs reads the CLI's parser for docs/cli.md: the dependency runs one way.
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(ast.parse((REPO / "kdlab" / "cli.py").read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert "kdlab.docs" not in imported and "docs" not in subcommands()
    assert docs.main(["--check"]) == 0
    assert capsys.readouterr().out == "every generated block is up to date\n"


def test_the_docs_check_imports_no_torch():
    """Every block, the benchmark's tables and the figures' included, comes from files and code
    that need no torch: with torch made unimportable, the check still passes."""
    code = "import sys; sys.modules['torch'] = None\nfrom kdlab.docs import main\nsys.exit(main(['--check']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
