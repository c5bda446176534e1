"""The dependency floors are true: each is at least the release that brought the newest API kdlab
uses from that package, and requirements.txt and pyproject.toml state the same floors.

The newest API of each package was checked against its wheels (present in the release named,
absent in the one before): torch.amp.GradScaler (2.2.2 no, 2.3.0 yes), FlopCounterMode (2.0.1
no, 2.1.0 yes), torch._foreach_lerp_ (1.13.1 no, 2.0.1 yes), Figure.get_layout_engine (3.5.3 no,
3.6.0 yes), tqdm.auto's fallback without ipywidgets (4.62.3 no, 4.63.0 yes). The floors
themselves, installed together, run the smoke lab (.ci/run, "Dependency floors").
"""
import ast
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# (package, the release that brought the API, the API, the file that uses it, text of that use)
NEEDS = [
    ("torch", "2.3", "torch.amp.GradScaler(device_type, ...)", "kdlab/train.py", "torch.amp.GradScaler("),
    ("torch", "2.1", "torch.utils.flop_counter.FlopCounterMode", "kdlab/measure.py",
     "from torch.utils.flop_counter import FlopCounterMode"),
    ("torch", "2.0", "torch._foreach_lerp_", "kdlab/train.py", "torch._foreach_lerp_("),
    ("torch", "1.13", "torch.load(weights_only=True)", "kdlab/checkpoints.py", "weights_only=True"),
    ("torch", "1.10", "torch.autocast(device_type, dtype=...)", "kdlab/train.py", "torch.autocast("),
    ("torch", "1.10", "F.cross_entropy(label_smoothing=...)", "kdlab/losses.py", "label_smoothing=label_smoothing"),
    ("torchvision", "0.13", "the weights enums (ResNet50_Weights) and weights=", "kdlab/models.py",
     "models.ResNet50_Weights"),
    ("numpy", "1.17", "PCG64.random_raw", "kdlab/data.py", "np.random.PCG64(seed).random_raw("),
    ("numpy", "1.17", "SeedSequence.generate_state", "kdlab/data.py", "np.random.SeedSequence("),
    ("numpy", "1.17", "default_rng", "kdlab/stats.py", "np.random.default_rng("),
    ("matplotlib", "3.6", "Figure.get_layout_engine().set(rect=...)", "kdlab/figures.py",
     "fig.get_layout_engine().set(rect="),
    ("matplotlib", "3.5", "the colormaps registry", "kdlab/figures.py", "from matplotlib import colormaps"),
    ("matplotlib", "3.5", 'Figure(layout="constrained")', "kdlab/figures.py", 'layout="constrained"'),
    ("matplotlib", "3.4", "Axes.bar_label", "kdlab/figures.py", "ax.bar_label("),
    ("tqdm", "4.63", "tqdm.auto falling back to text bars in a Jupyter kernel without ipywidgets",
     "kdlab/train.py", "from tqdm.auto import tqdm"),
]
# Each torchvision release is built for one torch release and requires it exactly.
TORCHVISION_FOR_TORCH = {Version("2.3"): Version("0.18")}


def floors_in(requirements: list[str]) -> dict[str, Version]:
    floors = {}
    for line in requirements:
        requirement = Requirement(line)
        (floor,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        floors[requirement.name] = floor
    return floors


def requirements_txt() -> dict[str, Version]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return floors_in([line for line in lines if line.strip() and not line.startswith("#")])


def pyproject() -> dict[str, Version]:
    listed = re.search(r"^dependencies = (\[.*\])$", (REPO / "pyproject.toml").read_text(), re.M)
    return floors_in(ast.literal_eval(listed.group(1)))


def test_requirements_txt_and_pyproject_state_the_same_floors():
    assert requirements_txt() == pyproject()
    assert set(requirements_txt()) == {package for package, *_ in NEEDS}


@pytest.mark.parametrize("package", sorted({package for package, *_ in NEEDS}))
def test_each_floor_has_every_api_kdlab_uses(package):
    floor = requirements_txt()[package]
    needs = [(Version(release), api) for name, release, api, *_ in NEEDS if name == package]
    release, api = max(needs)
    assert floor >= release, f"{package}>={floor} lacks {api}, which came in {release}"


def test_torchvision_floor_is_the_release_built_for_the_torch_floor():
    floors = requirements_txt()
    assert floors["torchvision"] == TORCHVISION_FOR_TORCH[floors["torch"]]


@pytest.mark.parametrize("package, release, api, path, use", NEEDS, ids=[api for _, _, api, _, _ in NEEDS])
def test_each_api_of_the_table_is_used_where_it_says(package, release, api, path, use):
    # An API the code no longer uses leaves the table, so it cannot hold a floor up for nothing.
    assert use in (REPO / path).read_text(), f"{path} no longer uses {api}: drop it from NEEDS"
