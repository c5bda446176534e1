"""How long the six-run lab takes: estimated from a committed benchmark, never guessed.

The step rates of each step kind were measured on one GPU (benchmarks/throughput.py). On that
GPU, the lab's training steps take epochs x 45,000 images at those rates; on another, its FLOPs
at the lowest share of peak measured there (the teacher step's), on that GPU's dense fp16/bf16
peak. Training steps only: validation, checkpoint writes, the data download and the first
epoch's cuDNN search come on top, and another GPU may reach another share of its peak. No torch:
the notebook's GPU cell and `python -m kdlab.docs` read it at once.
"""
from __future__ import annotations

import re
from pathlib import Path

from kdlab.config import LAB_RUNS, make_config, step_kind
from kdlab.results import DEFAULT_BENCHMARK, load_benchmark

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 45_000
# Dense bf16/fp16 tensor-core peaks in TFLOP/s from the vendor datasheets (H100/H200: the SXM
# parts; a PCIe H100 peaks lower). benchmarks/throughput.py measures shares of peak against them.
PEAK_TFLOPS = {"T4": 65, "A100": 312, "H100": 989, "H200": 989}
# The GPUs a student meets on Colab and elsewhere, as the estimates name them.
GPU_NAMES = {"T4": "T4 (Colab's free GPU)", "A100": "A100", "H100": "H100 (SXM)", "H200": "H200"}


def peak_tflops(device_name: str) -> float | None:
    """The peak of the GPU a device name (torch.cuda.get_device_name) names, or None if not known."""
    return next((peak for chip, peak in PEAK_TFLOPS.items() if re.search(rf"\b{chip}\b", device_name)), None)


def estimate(path: Path = REPO / DEFAULT_BENCHMARK) -> dict:
    """The six-run lab's training steps at default epochs: their FLOPs, the seconds at the measured
    rates on the benchmark's GPU, the share of peak used, and minutes by GPU (PEAK_TFLOPS)."""
    bench = load_benchmark(Path(path))
    rows = {r["step"]: r for r in bench["rows"]}
    share = min(r["kdlab"]["peak_share"] for r in rows.values())
    measured_s = flops = 0.0
    for run in LAB_RUNS:
        cfg = make_config(run)
        row = rows[step_kind(cfg)]
        measured_s += cfg.epochs * TRAIN_IMAGES / row["kdlab"]["images_per_s"]
        flops += cfg.epochs * TRAIN_IMAGES * row["flops_per_image"]
    return dict(source=Path(path).resolve().relative_to(REPO).as_posix() if Path(path).resolve().is_relative_to(REPO)
                else str(path), device_name=bench["device_name"], flops=flops, measured_s=measured_s, share=share,
                minutes={chip: flops / (peak * 1e12 * share) / 60 for chip, peak in PEAK_TFLOPS.items()})


def source_sentence(e: dict) -> str:
    return (f"from `{e['source']}`: the step rates measured on the {e['device_name']}, scaled to "
            f"each GPU's dense fp16/bf16 peak at the same {e['share']:.1%} share of it")


def time_table(e: dict | None = None) -> str:
    """The lab's time on each GPU, as a markdown table with its source (the README's and Colab page's block)."""
    e = e or estimate()
    rows = "\n".join(f"| {GPU_NAMES[chip]} | about {minutes:.0f} min |" for chip, minutes in e["minutes"].items()
                     if chip != "H200")
    return (f"| GPU | the six runs' training steps |\n|---|---:|\n{rows}\n\n"
            f"Estimates, not measurements, {source_sentence(e)}. Validation after every epoch, checkpoint "
            f"writes (to Drive on Colab), the data download and set-up come on top, and a GPU may reach "
            f"another share of its peak than the {e['device_name']} did.")


def estimate_line(device_name: str, e: dict | None = None) -> str:
    """One line for the notebook's GPU cell: the lab's training steps on this GPU, and their source."""
    e = e or estimate()
    peak = peak_tflops(device_name)
    if peak is None:
        known = ", ".join(PEAK_TFLOPS)
        return (f"The lab's time on a {device_name} is not estimated here (its peak is not known to kdlab, only "
                f"those of {known}); each run's log gives its own after its first epoch.")
    minutes = e["flops"] / (peak * 1e12 * e["share"]) / 60
    return (f"The six runs' training steps: about {minutes:.0f} min on this {device_name}, an estimate "
            f"{source_sentence(e)}; "
            f"validation and checkpoint writes come on top. Each run's log gives its own after its first epoch.")
