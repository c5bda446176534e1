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

from kdlab.lab_time import GPU_NAMES, estimate  # noqa: E402


def main(path: str) -> None:
    e = estimate(Path(path))
    print(f"six-run lab at default epochs: {e['flops'] / 1e15:.1f} PFLOP of training steps")
    print(f"on {e['device_name']} (measured step rates): {e['measured_s']:.0f} s of training steps")
    for chip, minutes in e["minutes"].items():
        print(f"on a {GPU_NAMES[chip]} at {e['share']:.1%} of its dense fp16/bf16 peak: {minutes:.0f} min of training steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a benchmarks/throughput.py results file measured on a GPU")
    main(parser.parse_args().results)
