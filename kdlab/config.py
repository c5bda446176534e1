"""The runs of the lab, each a frozen dataclass with every hyperparameter named.

A run is a recipe (fine-tune from ImageNet or train from scratch) plus a method
(cross-entropy, logit KD, feature KD). `make_config(name, **overrides)` is the only
way to build one, so the CLI, the notebook and the tests agree on the defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdlab.errors import KdlabError

TEACHER_RUN = "teacher_resnet50"
# The 45k/5k split is the lab's contract: drawn with this seed whatever the training seed. A run
# trained with this seed keeps the original lab's checkpoint names; other seeds add `_seed<N>`.
SPLIT_SEED = DEFAULT_SEED = 42


@dataclass(frozen=True)
class RunConfig:
    run: str
    arch: str                    # torchvision name: "resnet50" (teacher) or "resnet18" (student)
    method: str                  # key of kdlab.methods.METHODS
    weights: str                 # "imagenet" or "none"
    epochs: int
    lr: float                    # peak learning rate for `batch_size`
    weight_decay: float
    batch_size: int = 512
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    image_size: int = 128        # CIFAR's 32 px upsampled on the device (README: "Input resolution")
    temperature: float = 4.0     # logit KD
    alpha: float = 0.9           # logit KD: weight of the distillation term
    hint_layer: str = "layer3"   # feature KD: the ResNet stage whose output is matched
    hint_weight: float = 1.0     # feature KD: weight of the hint MSE next to CE
    label_smoothing: float = 0.0  # on the cross-entropy term only, never on the distilled targets
    ema_decay: float = 0.99      # per step; validation, selection and test use the averaged weights
    flip_tta: bool = True        # evaluate on the mean logits of each image and its mirror
    val_per_class: int = 500
    limit_train: int = 0         # 0 = the whole 45,000-image train split
    seed: int = DEFAULT_SEED     # training seed: initialisation, batch order, augmentation
    split_seed: int = SPLIT_SEED
    smoke: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.method != "ce"

    @property
    def run_id(self) -> str:
        return run_id(self.run, self.seed)


def run_id(run: str, seed: int = DEFAULT_SEED) -> str:
    """The name of a run's files: the original lab's name for the default seed, else `<run>_seed<N>`."""
    return run if seed == DEFAULT_SEED else f"{run}_seed{seed}"


# Fine-tuning from ImageNet (the teacher and the pretrained students), at batch 512:
# - peak LR 0.05, an eighth of the from-scratch rate: the ImageNet features start near a good
#   solution and large steps would wash them out; the 1-epoch warmup shields them while the new
#   10-class head is still random.
# - 6 epochs (about 520 steps on 45,000 images): a pretrained ResNet gets most of its CIFAR-10
#   accuracy in a few epochs. A budget for one Colab session, far shorter than BiT's schedule
#   (Kolesnikov et al. 2020: 10,000 steps at this dataset size).
# - weight decay 5e-5, a tenth of the scratch value: decay pulls every weight towards zero, away
#   from the pretrained values, and a short schedule needs little regularisation.
# - BatchNorm adapts: running statistics and affine parameters train with the rest (the model is
#   in train mode), since upsampled CIFAR is not distributed like ImageNet; batch 512 keeps the
#   batch statistics steady. A teacher that distils is frozen, statistics included.
# - 128 px (RunConfig.image_size): the four stages then see 32/16/8/4 px maps, as a CIFAR ResNet
#   does at 32 px, with the ImageNet stem used as trained; BiT's fine-tuning size for CIFAR too.
# - evaluated as every run is: weight average (EMA) and flip TTA, on validation and test.
FINETUNE = dict(weights="imagenet", epochs=6, lr=0.05, weight_decay=5e-5)
# From scratch: peak LR 0.4 for batch 512, twice Goyal et al.'s linear rule (0.1 per 256 images):
# the scratch student reached 0.8853 at 0.4 against 0.8706 at 0.2 (results/ablation-lr-resolution,
# one seed, H200); the usual CIFAR decay.
SCRATCH = dict(weights="none", epochs=20, lr=0.4, weight_decay=5e-4)
# A teacher from scratch needs a longer schedule than the students to be worth distilling; it is
# trained once for every student and seed.
SCRATCH_TEACHER_EPOCHS = 40
# Label smoothing on the students' cross-entropy term: off. The paired ablation
# (results/ablation-recipe, H200, scratch baseline, seed 42) chose it on validation: 0.8954
# without, 0.8944 with 0.1, a difference well inside one seed's noise. Never on the teacher,
# whose smoothed outputs distil worse (Mueller et al., 2019, "When does label smoothing help?"):
# `--label-smoothing` reaches the students alone (kdlab.lab.Lab).
STUDENT = dict(arch="resnet18", label_smoothing=0.0)

RUNS = {
    "teacher_resnet50":               dict(arch="resnet50", method="ce", **FINETUNE),
    "student_pretrained_baseline":    dict(STUDENT, method="ce", **FINETUNE),
    "student_pretrained_kd_logits":   dict(STUDENT, method="kd_logits", **FINETUNE),
    "student_pretrained_kd_features": dict(STUDENT, method="kd_features", **FINETUNE),
    "student_scratch_baseline":       dict(STUDENT, method="ce", **SCRATCH),
    "student_scratch_kd_scores":      dict(STUDENT, method="kd_logits", **SCRATCH),
    "student_scratch_kd_features":    dict(STUDENT, method="kd_features", **SCRATCH),
}
# The six runs of the original lab; `run all` trains these.
LAB_RUNS = list(RUNS)[:6]
# How charts and the report's prose name each run.
RUN_LABELS = {
    "teacher_resnet50": "ResNet50 teacher",
    "student_pretrained_baseline": "ResNet18 pretrained",
    "student_pretrained_kd_logits": "ResNet18 pretrained + logit KD",
    "student_pretrained_kd_features": "ResNet18 pretrained + feature KD",
    "student_scratch_baseline": "ResNet18 scratch",
    "student_scratch_kd_scores": "ResNet18 scratch + logit KD",
    "student_scratch_kd_features": "ResNet18 scratch + feature KD",
}

# Smoke mode: synthetic data (800 train, 200 val, 200 test images), random weights, 16 px,
# two short epochs. Proves the whole pipeline end to end on any CPU in under a minute; its
# numbers are never results. 16 px is the smallest input the validation allows; the pipeline
# does the same work at any size.
SMOKE = dict(weights="none", epochs=2, batch_size=64, image_size=16, val_per_class=20,
             lr=0.05, warmup_epochs=0.5)

# The settings each method reads, beyond those every run has; the teacher (cross-entropy) reads none.
METHOD_SETTINGS = {"ce": (), "kd_logits": ("temperature", "alpha"), "kd_features": ("hint_layer", "hint_weight")}
KD_SETTINGS = tuple(setting for settings in METHOD_SETTINGS.values() for setting in settings)

OVERRIDABLE = ("weights", "epochs", "batch_size", "lr", "image_size", "temperature",
               "alpha", "hint_layer", "hint_weight", "label_smoothing", "ema_decay", "flip_tta",
               "limit_train", "seed")


def baseline_of(run: str) -> str | None:
    """The cross-entropy run a distillation run is measured against: same network, same start."""
    recipe = RUNS[run]
    if recipe["method"] == "ce":
        return None
    return next(name for name, other in RUNS.items() if other["method"] == "ce"
                and (other["arch"], other["weights"]) == (recipe["arch"], recipe["weights"]))


def make_config(run: str, smoke: bool = False, **overrides) -> RunConfig:
    """The config of `run`: its recipe, then smoke settings, then the overrides that are not None.

    `weights` only overrides runs that start from ImageNet: a scratch run is scratch by name.
    """
    if run not in RUNS:
        raise KdlabError(f"unknown run {run}; valid runs: {', '.join(RUNS)} (or 'all')")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise KdlabError(f"cannot override {sorted(unknown)}; overridable: {', '.join(OVERRIDABLE)}")
    fields = dict(RUNS[run], run=run, smoke=smoke)
    if fields["weights"] == "none":
        overrides.pop("weights", None)
    elif overrides.get("weights") == "none":
        fields.update(SCRATCH)  # no ImageNet start: a fine-tuning LR would under-train
    if run == TEACHER_RUN and fields["weights"] == "none":
        fields["epochs"] = SCRATCH_TEACHER_EPOCHS
    if smoke:
        fields.update(SMOKE)
    fields.update(overrides)
    return validate(RunConfig(**fields))


def validate(cfg: RunConfig) -> RunConfig:
    problems = []
    if cfg.weights not in ("imagenet", "none"):
        problems.append(f"weights must be 'imagenet' or 'none', got {cfg.weights!r}")
    if cfg.epochs < 1:
        problems.append(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        problems.append(f"batch size must be positive, got {cfg.batch_size}")
    if cfg.image_size < 16:
        problems.append(f"image size must be at least 16 px, got {cfg.image_size}")
    if not cfg.lr > 0:
        problems.append(f"learning rate must be positive, got {cfg.lr}")
    if not cfg.temperature > 0:
        problems.append(f"temperature must be positive, got {cfg.temperature}")
    if not 0 <= cfg.alpha <= 1:
        problems.append(f"alpha must be in [0, 1], got {cfg.alpha}")
    if cfg.hint_layer not in ("layer1", "layer2", "layer3", "layer4"):
        problems.append(f"hint layer must be one of layer1..layer4, got {cfg.hint_layer!r}")
    if not 0 <= cfg.label_smoothing < 1:
        problems.append(f"label smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if not 0 < cfg.ema_decay < 1:
        problems.append(f"EMA decay must be in (0, 1), got {cfg.ema_decay}")
    for name in ("seed", "split_seed"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{name.replace('_', ' ')} must be a non-negative integer, got {value!r}")
    if cfg.limit_train < 0 or 0 < cfg.limit_train < 10:
        problems.append(f"limit-train must be 0 (no limit) or at least 10 (one image per class), "
                        f"got {cfg.limit_train}")
    if problems:
        raise KdlabError("; ".join(problems))
    return cfg


def run_label(run: str, results: dict[str, dict]) -> str:
    """A run's name on the charts and in the report, true to its start (`results`: results files
    by run): a run of the ImageNet recipe started from random weights (`--weights none`, or a
    smoke run) is never called pretrained."""
    label = RUN_LABELS[run]
    if RUNS[run]["weights"] == "imagenet" and results.get(run, {}).get("weights") == "none":
        return label.replace("pretrained", "random start") if "pretrained" in label else f"{label} (scratch)"
    return label


def config_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_differences(stored: dict, requested: RunConfig) -> list[str]:
    """Fields whose stored value differs from the requested one, as 'field: stored -> requested'."""
    wanted = config_dict(requested)
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k, '<absent>')!r} -> {wanted.get(k, '<absent>')!r}"
            for k in keys if stored.get(k) != wanted.get(k)]
