"""Estimate the six-run lab's training time at default epochs from a measured benchmark file.

    python benchmarks/estimate_lab_time.py benchmarks/results/h200-full-compile.json

Per run: epochs x 45,000 images at the measured images/s of its step kind (the GPU the file was
measured on), and, for another GPU, epochs x 45,000 x FLOPs per image at the lowest measured
share of peak (the teacher step's) of that GPU's dense fp16/bf16 peak. An estimate, not a
measurement: validation, checkpoints and set-up come on top, and another GPU may reach a
different share of its peak.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlab.config import LAB_RUNS, make_config, step_kind  # noqa: E402
from kdlab.results import load_benchmark  # noqa: E402

TRAIN_IMAGES = 45_000
T4_PEAK_TFLOPS = 65


def main(path: str) -> None:
    bench = load_benchmark(Path(path))
    rows = {r["step"]: r for r in bench["rows"]}
    share = min(r["kdlab"]["peak_share"] for r in rows.values())
    measured_s = flops = 0.0
    for run in LAB_RUNS:
        cfg = make_config(run)
        row, epochs = rows[step_kind(cfg)], cfg.epochs
        measured_s += epochs * TRAIN_IMAGES / row["kdlab"]["images_per_s"]
        flops += epochs * TRAIN_IMAGES * row["flops_per_image"]
    print(f"six-run lab at default epochs: {flops / 1e15:.1f} PFLOP of training steps")
    print(f"on {bench['device_name']} (measured step rates): {measured_s:.0f} s of training steps")
    print(f"on a T4 at {share:.1%} of its {T4_PEAK_TFLOPS} TFLOP/s fp16 peak: "
          f"{flops / (T4_PEAK_TFLOPS * 1e12 * share) / 60:.0f} min of training steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a benchmarks/throughput.py results file measured on a GPU")
    main(parser.parse_args().results)
