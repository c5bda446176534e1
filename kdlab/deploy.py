"""Deploying trained runs on a CPU: export to ONNX, quantize to int8 with ONNX Runtime, and measure
each variant side by side (`python -m kdlab deploy`).

For each run, from its best checkpoint, the output folder gets:
  <run>.onnx        the best weights, exported by torch.onnx.export (its torch.export-based exporter,
                    opset OPSET), batch dimension dynamic; its logits checked against PyTorch's
  <run>_int8.onnx   static post-training quantization by ONNX Runtime, as its CPU examples do it:
                    quant_pre_process, then quantize_static in the QDQ format, int8 weights per
                    channel, uint8 activations calibrated on CALIBRATION_IMAGES training images
and, for every run together:
  deploy.json       each run in each variant of VARIANTS: file size, CPU latency at batch 1,
                    throughput at batch 64, test accuracy and agreement with PyTorch's predictions;
                    the weights measured (checkpoint, sha256, smoke or not) and the machine
  deploy.png        test accuracy against CPU latency (kdlab.figures.plot_deploy)
The networks take what kdlab.data.preprocess gives: normalised float images, upsampled to the run's
input size. Each image is evaluated once, on one view: a deployed prediction is one forward pass.
Every file is written in a temporary folder and moved in once all are made: a deploy that stops
leaves nothing half-written.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxscript  # noqa: F401  torch.onnx's exporter needs it: imported here, its absence stops deploy first
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from kdlab.checkpoints import load_checkpoint, write_json
from kdlab.config import DEFAULT_SEED, RUNS
from kdlab.data import limit_stratified, preprocess, split_train_val
from kdlab.errors import KdlabError
from kdlab.folders import no_empty_folders_left, writable_folder
from kdlab.lab import Lab
from kdlab.measure import TimingBudget, latency_and_throughput
from kdlab.models import build_model, load_weights
from kdlab.kept import load_kept
from kdlab.results import KEPT_MANIFEST, RunPaths

OPSET = 18
# The three ways a run is deployed, measured side by side, as deploy.json names them and as they are shown.
VARIANTS = {"pytorch_fp32": "PyTorch fp32 (eager)", "onnxruntime_fp32": "ONNX Runtime fp32",
            "onnxruntime_int8": "ONNX Runtime int8"}
# The exported model's logits on CHECK_IMAGES test images may differ from PyTorch's by float rounding
# alone: at most EXPORT_TOLERANCE times the largest logit (at least 1).
EXPORT_TOLERANCE = 1e-4
CHECK_IMAGES = 16
# Training images the int8 model's activation ranges are calibrated on, the same number of each class.
CALIBRATION_IMAGES = 300
BATCH = 64   # images per batch when predicting the test set and when calibrating
# Smoke weights are timed just enough to run the code; real weights long enough for a steady median.
TIMING = {"smoke": TimingBudget(warmup=1, latency_iters=3, throughput_batch=BATCH, throughput_iters=1),
          "cpu": TimingBudget(warmup=5, latency_iters=50, throughput_batch=BATCH, throughput_iters=5)}
# The CPU flags (/proc/cpuinfo) of the instructions that run int8 dot products fast.
INT8_FLAGS = ("avx_vnni", "avx512_vnni", "amx_int8")
SMOKE_NOTE = "smoke weights (synthetic data, a tiny budget): a check of the pipeline, not results"


@dataclass
class BestWeights:
    run: str
    checkpoint: Path         # a best checkpoint, or a folder of kept weights (kdlab.kept)
    config: dict
    model: torch.nn.Module   # fp32, eval mode, on the CPU
    test_acc: float          # as the run's results file states it (flip test-time augmentation if set)
    sha256: str              # of the checkpoint file, or of the kept weights' joined parts


def runs_with_weights(ckpt_dir: Path, kept: bool = False) -> list[str]:
    """The runs of the table with a best checkpoint in `ckpt_dir` at the default seed, or with kept
    weights (<ckpt_dir>/<run>/manifest.json) if `kept`."""
    return [run for run in RUNS
            if ((ckpt_dir / run / KEPT_MANIFEST) if kept else RunPaths(ckpt_dir, run).best).is_file()]


def load_best(ckpt_dir: Path, run: str) -> BestWeights:
    if run not in RUNS:
        raise KdlabError(f"unknown run {run}; valid runs: {', '.join(RUNS)}")
    path = RunPaths(ckpt_dir, run).best
    if not path.is_file():
        raise KdlabError(f"{run} has no best checkpoint in {ckpt_dir} ({path.name}): train it first "
                         f"(`python -m kdlab run {run} --ckpt-dir {ckpt_dir}`), or give the --ckpt-dir it "
                         f"was saved in.")
    state = load_checkpoint(path)
    model = build_model(state["config"]["arch"], "none")
    load_weights(model, state["modules"]["student"], path)
    return BestWeights(run, path, state["config"], model.eval(), state["results"]["test_acc"], sha256(path))


def load_kept_weights(kept_dir: Path, run: str) -> BestWeights:
    """A run's kept weights (<kept_dir>/<run>/, kdlab.kept: float16 parts checked by sha256), as float32."""
    if run not in RUNS:
        raise KdlabError(f"unknown run {run}; valid runs: {', '.join(RUNS)}")
    state, manifest = load_kept(kept_dir / run)
    model = build_model(manifest["config"]["arch"], "none")
    load_weights(model, state, kept_dir / run)
    return BestWeights(run, kept_dir / run, manifest["config"], model.eval(), manifest["test_acc"], manifest["sha256"])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibration_indices(train_labels: np.ndarray, config: dict) -> np.ndarray:
    """Indices into the 50,000 training images of the images the int8 model is calibrated on: drawn
    from the run's own training split (kdlab.data.split_train_val, then --limit-train if it had one),
    the same number of each class, never from validation or test."""
    train_idx, _ = split_train_val(train_labels, config["val_per_class"], config["split_seed"])
    if config["limit_train"]:
        train_idx = limit_stratified(train_idx, train_labels, config["limit_train"], config["split_seed"])
    return limit_stratified(train_idx, train_labels, min(CALIBRATION_IMAGES, len(train_idx)), config["split_seed"])


def network_input(images: torch.Tensor, image_size: int) -> np.ndarray:
    """uint8 CIFAR images as the exported network takes them: normalised, upsampled, NCHW float32."""
    return preprocess(images, image_size).contiguous().numpy()


class CalibrationImages(CalibrationDataReader):
    """ONNX Runtime's calibration reader over training images, one batch of network inputs at a time."""

    def __init__(self, images: torch.Tensor, image_size: int):
        self.batches = (network_input(images[i:i + BATCH], image_size) for i in range(0, len(images), BATCH))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch}


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    """The network as one ONNX file (weights inside), its batch dimension dynamic."""
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                      external_data=False, verbose=False)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: CalibrationDataReader) -> None:
    """Static int8 quantization. ONNX Runtime's pre-processing first (shape inference and graph
    optimisation, BatchNorm folded into the convolutions): quantized without it, the QDQ graph keeps
    operators ONNX Runtime cannot fuse, and runs slower than fp32."""
    prepared = fp32_path.with_name(f"{fp32_path.stem}_prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(int8_path), calibration, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()


def onnx_forward(path: Path, threads: int):
    """A function from a batch of network inputs to logits, by an ONNX Runtime session on the CPU."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def pytorch_forward(model: torch.nn.Module):
    """The same for PyTorch eager in fp32, channels-last as the lab evaluates."""
    model = model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()
    return forward


def predict(forward, images: torch.Tensor, image_size: int) -> np.ndarray:
    """The class each image is predicted, in batches of BATCH."""
    return np.concatenate([forward(network_input(images[i:i + BATCH], image_size)).argmax(1)
                           for i in range(0, len(images), BATCH)])


def state_dict_bytes(model: torch.nn.Module) -> int:
    """The size of the weights as PyTorch saves them (a checkpoint holds more: config, results)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def describe_cpu(threads: int) -> dict:
    """The CPU's model name, its cores, the threads used and its int8 instructions (INT8_FLAGS)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:   # not Linux: the name platform gives, flags unknown
        cpuinfo = ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    return dict(model=fields.get("model name") or platform.processor() or "unknown", cores=os.cpu_count(),
                threads=threads, int8_instructions=[flag for flag in INT8_FLAGS if flag in flags],
                flags_known=bool(flags), platform=platform.platform())


def deploy(runs: list[str] | None, ckpt_dir: str | Path, out_dir: str | Path, data_dir: str | Path = "data",
           threads: int | None = None, log=print, kept: bool = False) -> dict:
    """Export, quantize and measure `runs` (default: every run with a best checkpoint in `ckpt_dir`,
    or with `kept`, every run kept in it: checkpoints/reference); write the ONNX files, deploy.json
    and deploy.png into `out_dir`; return deploy.json's content."""
    from kdlab.figures import plot_deploy   # matplotlib: only once everything is measured

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    runs = runs or runs_with_weights(ckpt_dir, kept)
    if not runs:
        raise KdlabError(f"{ckpt_dir} holds no {'kept weights' if kept else '<run>_best.pt'}, so there is nothing "
                         f"to deploy; train the runs first (`python -m kdlab run all --ckpt-dir {ckpt_dir}`), or "
                         f"give the folder they were saved in.")
    load = load_kept_weights if kept else load_best
    weights = [load(ckpt_dir, run) for run in dict.fromkeys(runs)]   # every checkpoint read before any work
    smoke = {bool(w.config["smoke"]) for w in weights}
    if len(smoke) > 1:
        raise KdlabError(f"{', '.join(w.run for w in weights if w.config['smoke'])} are smoke runs and the "
                         f"others are not; one deploy.json measures either, not both. Deploy them apart.")
    smoke = smoke.pop()
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise KdlabError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    budget = TIMING["smoke" if smoke else "cpu"]

    with no_empty_folders_left(out_dir):
        writable_folder(out_dir, "--out")   # before the data is read: a wrong --out costs no wait
        data = Lab(data_dir=data_dir, device="cpu", smoke=smoke, log=log).data()
        work = Path(tempfile.mkdtemp(prefix=".deploy-", dir=out_dir))
        try:
            measured = {w.run: measure_run(w, data, work, threads, budget, log) for w in weights}
            deployment = dict(
                smoke=smoke, **({"note": SMOKE_NOTE} if smoke else {}),
                measured=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cpu=describe_cpu(threads),
                software=dict(torch=str(torch.__version__), onnx=onnx.__version__,
                              onnxruntime=onnxruntime.__version__),
                exporter=f"torch.onnx.export(dynamo=True), the torch.export-based exporter, opset {OPSET}, "
                         f"batch dimension dynamic",
                quantization=dict(tool="onnxruntime.quantization: quant_pre_process, then quantize_static",
                                  format="QDQ", weights="int8, per channel", activations="uint8, per tensor",
                                  calibration=f"MinMax over {CALIBRATION_IMAGES} images of each run's training "
                                              f"split (the same number of each class), never validation or test"),
                data=data.source, n_test=len(data.test_labels),
                evaluation="one view per image, fp32 or int8 as the variant says, on the CPU; the results "
                           "file's test accuracy (results_test_acc) may use flip test-time augmentation",
                timing=dict(asdict(budget), latency="median of latency_iters forwards at batch 1",
                            throughput=f"images per second over throughput_iters batches of {budget.throughput_batch}",
                            inputs="random values: cost does not depend on them"),
                variants=VARIANTS, runs=measured)
            write_json(work / "deploy.json", deployment)
            plot_deploy(deployment, work)
            for path in sorted(work.iterdir(), key=lambda p: p.name == "deploy.json"):   # deploy.json last
                os.replace(path, out_dir / path.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return deployment


def measure_run(w: BestWeights, data, work: Path, threads: int, budget: TimingBudget, log) -> dict:
    """One run: export and check, quantize, then each variant's size, latency, throughput and accuracy."""
    size = w.config["image_size"]
    fp32_path, int8_path = work / f"{w.run}.onnx", work / f"{w.run}_int8.onnx"
    log(f"{w.run}: exporting {w.checkpoint} to {fp32_path.name} (opset {OPSET})")
    export_onnx(w.model, size, fp32_path)
    forwards = {"pytorch_fp32": pytorch_forward(w.model), "onnxruntime_fp32": onnx_forward(fp32_path, threads)}
    check = network_input(data.test_images[:CHECK_IMAGES], size)
    expected = forwards["pytorch_fp32"](check)
    difference = float(np.abs(forwards["onnxruntime_fp32"](check) - expected).max())
    allowed = EXPORT_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if difference > allowed:
        raise KdlabError(f"the ONNX export of {w.run} gives logits up to {difference:.3g} away from PyTorch's "
                         f"(allowed {allowed:.3g}) on {CHECK_IMAGES} test images: the exporter of torch "
                         f"{torch.__version__} did not export this network faithfully. Nothing was written.")
    calibration = calibration_indices(data.train_labels.numpy(), w.config)
    log(f"{w.run}: quantizing to {int8_path.name} on {len(calibration)} training images")
    quantize_int8(fp32_path, int8_path, CalibrationImages(data.train_images[calibration], size))
    forwards["onnxruntime_int8"] = onnx_forward(int8_path, threads)
    sizes = {"pytorch_fp32": state_dict_bytes(w.model), "onnxruntime_fp32": fp32_path.stat().st_size,
             "onnxruntime_int8": int8_path.stat().st_size}
    files = {"pytorch_fp32": f"{w.checkpoint.name} (its state_dict)", "onnxruntime_fp32": fp32_path.name,
             "onnxruntime_int8": int8_path.name}
    labels = data.test_labels.numpy()
    rng = np.random.default_rng(0)
    variants, reference = {}, None
    for variant, forward in forwards.items():
        log(f"{w.run}: timing and testing {VARIANTS[variant]} on {threads} thread(s)")
        latency_ms, throughput = latency_and_throughput(
            forward, lambda n: rng.standard_normal((n, 3, size, size), dtype=np.float32), budget)
        predictions = predict(forward, data.test_images, size)
        reference = predictions if reference is None else reference   # PyTorch's, measured first
        variants[variant] = dict(file=files[variant], size_mb=sizes[variant] / 1e6, latency_ms=latency_ms,
                                 throughput_img_s=throughput, test_acc=float((predictions == labels).mean()),
                                 agreement_with_pytorch=float((predictions == reference).mean()))
    return dict(arch=w.config["arch"], weights=w.config["weights"], image_size=size, checkpoint=str(w.checkpoint),
                sha256=w.sha256, smoke=bool(w.config["smoke"]), seed=w.config.get("seed", DEFAULT_SEED),
                results_test_acc=w.test_acc,
                export_check=dict(images=f"the first {CHECK_IMAGES} test images", max_abs_difference=difference,
                                  tolerance=allowed),
                calibration_indices=calibration.tolist(), variants=variants)
