"""The package's own code, as the notebook shows it beside each formula: read from the source at
run time (inspect.getsource), never a copy, so what a student reads is what trains."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def where(obj) -> str:
    """'kdlab/losses.py, line 12': the file (relative to the repository where it is in it) and line."""
    path = Path(inspect.getsourcefile(obj)).resolve()
    shown = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    return f"{shown}, line {inspect.getsourcelines(obj)[1]}"


def source_markdown(*objects) -> str:
    """Markdown of each function's, method's or class's source, each under the place it is read from."""
    return "\n\n".join(f"`{obj.__qualname__}` ({where(obj)}):\n\n```python\n"
                       f"{textwrap.dedent(inspect.getsource(obj)).rstrip()}\n```" for obj in objects)
