"""Weights kept in the repository: a run's best weights as float16 parts with a sha256 manifest.

A folder of kept weights (checkpoints/reference/<run>/, checkpoints/README.md) holds
  manifest.json        the run, its config, the parts with their sizes and sha256, the sha256 of
                       the whole serialized state dict and of its tensors, and its test accuracy
  weights.fp16.partNN  the state dict (floating tensors in float16), serialized by torch.save and
                       cut into parts of at most PART_BYTES
Float16 halves the bytes (ResNet50: 47 MB), and parts of at most 15 MiB can come back from a
machine that returns files of at most 16 MiB. Loading joins the parts, checks every sha256 and
the config, and gives float32 tensors: a teacher loaded here distils exactly as it does on the
machine that kept it.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from kdlab.checkpoints import TrainedRun, atomic_write, write_json
from kdlab.config import RunConfig, config_dict, config_differences
from kdlab.errors import KdlabError
from kdlab.models import build_model, load_weights, tensors_sha256
from kdlab.results import KEPT_MANIFEST, KEPT_PART_PREFIX, read_kept_manifest

PART_BYTES = 15 * 2 ** 20


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in float16; integer ones (BatchNorm's step count) as they are."""
    return {name: (t.detach().cpu().half() if t.is_floating_point() else t.detach().cpu()).contiguous()
            for name, t in state.items()}


def float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in float32, as kept weights load: half's inverse, up to float16's rounding."""
    return {name: t.float() if t.is_floating_point() else t for name, t in state.items()}


def keep_weights(state: dict[str, torch.Tensor], cfg: RunConfig, folder: Path, **facts) -> dict:
    """Write `state` as float16 parts and a manifest into `folder` (`facts`, such as the test
    accuracy, go into the manifest); return the manifest. The manifest is written last: a folder
    without one is not kept weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEPT_MANIFEST).unlink(missing_ok=True)
    for stale in folder.glob(f"{KEPT_PART_PREFIX}*"):
        stale.unlink()
    kept = half(state)
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    data = buffer.getvalue()
    parts = []
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        chunk = data[start:start + PART_BYTES]
        name = f"{KEPT_PART_PREFIX}{index:02d}"
        atomic_write(folder / name, lambda tmp, chunk=chunk: tmp.write_bytes(chunk))
        parts.append(dict(name=name, bytes=len(chunk), sha256=hashlib.sha256(chunk).hexdigest()))
    manifest = dict(run=cfg.run, seed=cfg.seed, config=config_dict(cfg), parts=parts, bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(), tensors_sha256=tensors_sha256(kept),
                    dtype="float16", **facts)
    write_json(folder / KEPT_MANIFEST, manifest)
    return manifest


def load_kept(folder: Path, cfg: RunConfig | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The float32 state dict kept in `folder` and its manifest, every part and the whole checked
    by sha256, and the config against `cfg` if given. Anything off: a KdlabError naming it."""
    folder = Path(folder)
    manifest = read_kept_manifest(folder)
    if cfg is not None:
        differences = config_differences(manifest["config"], cfg)
        if differences:
            raise KdlabError(f"the weights in {folder} were trained with another config than this {cfg.run} "
                             f"({'; '.join(differences)}): run with the settings they were trained with "
                             f"(kept -> asked).")
    chunks = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.is_file():
            raise KdlabError(f"{path} is missing: the kept weights are incomplete; restore the folder from git.")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise KdlabError(f"{path} does not match its sha256 in {folder / KEPT_MANIFEST}: the part is damaged "
                             f"or altered; restore it from git.")
        chunks.append(chunk)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise KdlabError(f"the parts in {folder} join into other bytes than {KEPT_MANIFEST} names; restore the "
                         f"folder from git.")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return float32(state), manifest


def load_kept_run(folder: Path, cfg: RunConfig, device: torch.device, log=print) -> TrainedRun:
    """A run from its kept weights: the model in eval mode on `device`, and as results what its
    students record of it (run, seed, test accuracy, and the weights' sha256)."""
    state, manifest = load_kept(folder, cfg)
    model = build_model(cfg.arch, "none")
    load_weights(model, state, folder)
    results = dict(run=manifest["run"], seed=manifest["seed"], test_acc=manifest["test_acc"],
                   weights_sha256=manifest["tensors_sha256"])
    log(f"{cfg.run_id}: loaded the kept weights in {folder} (test accuracy {manifest['test_acc']:.4f}, "
        f"sha256 {manifest['tensors_sha256'][:12]})")
    return TrainedRun(model.to(device, memory_format=torch.channels_last).eval(), results, trained=False)
