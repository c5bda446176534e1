"""The tables and the chart of a benchmarks/throughput.py results file, from the JSON alone.

Measuring needs torch and a device (benchmarks/throughput.py); rendering what was measured does
not: docs/performance.md's generated blocks (kdlab.docs), the tables the script prints when it
ends (the same Markdown) and the chart read the results file and nothing else, so they run where
torch is not installed.

    python -m kdlab.benchmark_tables benchmarks/results/cpu-quick.json                # Markdown tables
    python -m kdlab.benchmark_tables benchmarks/results/h200-full-compile.json --plot figures/throughput.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlab.errors import KdlabError
from kdlab.latex import markdown_table
from kdlab.results import STEP_DESCRIPTIONS, load_benchmark

# The families the time breakdown sorts the profiled operators into (throughput.measure_breakdown),
# each with its column heading.
DATA = "data (crop, flip, normalise, resize)"
OTHER = "other (ReLU, residual adds, pooling, loss, casts)"
FAMILY_COLUMNS = {"convolution and matmul": "conv+mm", "batch norm": "BN", DATA: "data",
                  "optimizer": "optim", OTHER: "other"}


def breakdown_rows(report: dict) -> list[list[str]]:
    """The time breakdown as a header and one row of cells per step kind."""
    rows = [["step", *FAMILY_COLUMNS.values(), "busy", "conv TFLOP/s", "conv % peak"]]
    for part in report.get("breakdown") or []:
        if "error" in part:
            rows.append([part["step"], f"failed: {part['error'][:60]}", *[""] * (len(rows[0]) - 2)])
            continue
        rows.append([part["step"], *(f"{part['shares'][family]:.0%}" for family in FAMILY_COLUMNS),
                     f"{part['busy_share']:.0%}" if part["busy_share"] else "-",
                     f"{part['conv_tflops']:.3g}" if part["conv_tflops"] else "-",
                     f"{part['conv_peak_share']:.1%}" if part["conv_peak_share"] else "-"])
    return rows


def sweep_rows(report: dict) -> list[list[str]]:
    """The batch sweep as a header and one row of cells per (step kind, batch size)."""
    rows = [["step", "batch", "kdlab img/s", "TFLOP/s", "% peak", "peak GiB"]]
    for sweep in report.get("batch_sweep") or []:
        for point in sweep["points"]:
            batch = f"{point['batch_size']}" + (" (lab)" if point["batch_size"] == sweep["lab_batch_size"] else "")
            if "error" in point:
                rows.append([sweep["step"], batch, point["error"][:60], "", "", ""])
                continue
            rows.append([sweep["step"], batch, f"{point['images_per_s']:,.0f}", f"{point['tflops']:.3g}",
                         f"{point['peak_share']:.1%}" if point["peak_share"] else "-",
                         f"{point['peak_memory_gib']:.1f}" if point["peak_memory_gib"] else "-"])
    return rows


def numbers_table(rows: list[list[str]]) -> str:
    """A header and rows of cells as Markdown, the first column a name and the others numbers."""
    return markdown_table(rows[0], rows[1:], "l" + "r" * (len(rows[0]) - 1))


def breakdown_note(report: dict) -> str:
    timed_on = "cuda kernels" if report["device"] == "cuda" else "cpu operators"
    return (f"shares of the operators' own time per step ({timed_on}); busy (CUDA) = the kernel time per "
            "step / the unprofiled step time; conv = the step's FLOPs over the convolution and matmul time alone")


def skipped_steps_note(result: dict) -> str:
    """What fused SGD's check after skipped fp16 steps found (fused_sgd_agreement), if it ran."""
    check = result.get("skipped_steps_check")
    if check is None:
        return ""
    if check["agrees"]:
        return "; the same update as the default SGD after skipped fp16 steps"
    return (f"; NOT the default SGD's update after skipped fp16 steps (largest weight difference "
            f"{check['max_weight_difference']:.3g}): do not use it in fp16")


def markdown(report: dict, source: str) -> str:
    """The tables of a results file in Markdown, labelled with where they came from (for docs/performance.md)."""
    b = report["budget"]
    label = f" ({report['note']})" if report.get("note") else ""
    speeds = [["step", "kdlab img/s", "naive img/s", "speedup", "kdlab TFLOP/s", "share of peak",
               "peak GiB (kdlab / naive)"]]
    for row in report["rows"]:
        k, n = row["kdlab"], row["naive"]
        memory = (f"{k['peak_memory_gib']:.1f} / {n['peak_memory_gib']:.1f}"
                  if k["peak_memory_gib"] and n["peak_memory_gib"] else "n/a")
        speeds.append([STEP_DESCRIPTIONS.get(row["step"], row["step"]), f"{k['images_per_s']:,.0f}",
                       f"{n['images_per_s']:,.0f}", f"{row['speedup']:.2f}x", f"{k['tflops']:.3g}",
                       f"{100 * k['peak_share']:.1f}%" if k["peak_share"] else "n/a", memory])
    s = report["scaling"]
    first, second = s["epochs"]
    lines = [f"Measured on {report['device_name']}{label}, torch {report['torch_version']}, {report['mode']} "
             f"mode: {report['image_size']} px, batch {report['batch_size']}, {b['warmup_steps']} warm-up + "
             f"{b['timed_steps']} timed steps (evaluation: batches of {b['eval_batch_size']}); from `{source}`.",
             "", numbers_table(speeds),
             "", f"Epoch time of the student CE step: {first['epoch_seconds']:.2f} s for {first['train_images']:,} "
                 f"images, {second['epoch_seconds']:.2f} s for {second['train_images']:,} (ratio {s['ratio']:.2f}; "
                 f"2.00 is linear)."]
    if report.get("breakdown"):
        lines += ["", "Where the step's time goes (torch.profiler): " + breakdown_note(report) + ".", "",
                  numbers_table(breakdown_rows(report))]
    if report.get("batch_sweep"):
        lines += ["", "Batch sweep of kdlab's path:", "", numbers_table(sweep_rows(report))]
    if report["fast_path"]:
        switches = [["fast-path switch (student CE step)", "img/s with", "img/s without", "speedup", "verdict"]]
        for name, result in report["fast_path"]["switches"].items():
            if "speedup" not in result:
                switches.append([name, "", "", "", result.get("skipped") or "failed: " + result["error"][:80]])
                continue
            verdict = result["verdict"]
            if name == "compile":
                verdict += f" (compiling: {result['compile_seconds']:.0f} s"
                verdict += (f", repaid after {result['break_even_steps']:.0f} steps)"
                            if result["break_even_steps"] else ")")
            switches.append([name, f"{result['on']['images_per_s']:,.0f}", f"{result['off']['images_per_s']:,.0f}",
                             f"{result['speedup']:.2f}x", verdict + skipped_steps_note(result)])
        lines += ["", markdown_table(switches[0], switches[1:], "lrrrl")]
    return "\n".join(lines)


def lab_time_table(report: dict) -> str:
    lab = report["lab_time"]
    lines = [f"the six-run lab on {report['device_name']} ({lab['precision']}"
             + (", trial sizes: the times mean nothing)" if lab["trial"] else ", default settings)")]
    lines += [f"  {run['run']:32} {run['epochs']:3d} epochs {run['seconds']:8.1f}s" for run in lab["runs"]]
    lines.append(f"  {'total':32} {'':10} {lab['total_seconds']:8.1f}s ({lab['total_seconds'] / 60:.1f} min; "
                 f"making the data took {lab['data_seconds']:.1f}s more)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdlab.benchmark_tables",
        description="print the tables of a benchmarks/throughput.py results file as Markdown (for "
                    "docs/performance.md), or draw its chart; measures nothing")
    parser.add_argument("results", help="a results JSON of benchmarks/throughput.py")
    parser.add_argument("--plot", metavar="PNG", help="draw the throughput chart (kdlab.figures.plot_throughput) here "
                                                      "instead")
    args = parser.parse_args(argv)
    try:
        bench = load_benchmark(Path(args.results))
        if bench is None:
            raise KdlabError(f"{args.results}: no such file (benchmarks/results/ holds the measured ones)")
        if args.plot:
            from kdlab.figures import plot_throughput   # matplotlib: only for the chart
            print(plot_throughput(bench, args.plot, args.results))
        else:
            print(markdown(bench, args.results))
    except KdlabError as err:
        print(f"benchmark_tables: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
