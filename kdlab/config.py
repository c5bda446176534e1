"""The run table, and each run's config: a frozen dataclass with every hyperparameter named.

A run is a recipe (fine-tune from ImageNet or train from scratch) plus a method of
kdlab.registry with its settings. `make_config(name, **overrides)` is the only way to build
a config, so the CLI, the notebook and the tests agree on the defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdlab.errors import KdlabError
from kdlab.registry import METHODS, Settings, all_settings, setting_fields

# CIFAR-10's classes in its label order (here, not in kdlab.data: the report names them without torch).
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
TEACHER_RUN = "teacher_resnet50"
# The 45k/5k split is the lab's contract: drawn with this seed whatever the training seed. A run
# trained with this seed keeps the original lab's checkpoint names; other seeds add `_seed<N>`.
SPLIT_SEED = DEFAULT_SEED = 42


@dataclass(frozen=True)
class RunConfig:
    run: str
    arch: str                    # torchvision name: "resnet50" (teacher) or "resnet18" (student)
    method: str                  # key of kdlab.registry.METHODS
    weights: str                 # "imagenet" or "none"
    epochs: int
    lr: float                    # peak learning rate for `batch_size`
    weight_decay: float
    settings: Settings           # the method's own (kdlab.registry), e.g. LogitKDSettings(temperature=4.0, ...)
    batch_size: int = 512
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    image_size: int = 128        # CIFAR's 32 px upsampled on the device (docs/recipe.md: "Input resolution")
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
        return METHODS[self.method].uses_teacher

    @property
    def run_id(self) -> str:
        return run_id(self.run, self.seed)


# Images per evaluation batch (validation, test, the figures' predictions) unless a lever says otherwise.
EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class SpeedLevers:
    """Ways to run the same steps faster, each off (or at the default) unless asked for.

    Like the precision, runtime choices and not part of RunConfig: a checkpoint's config never
    differs by them, and a run may resume with others. Each gives the eager step's losses up to
    float rounding (tests/test_speed_levers.py); benchmarks/throughput.py measures each on and off.
    kdlab.train applies them, and falls back, with one log line, where one fails.
    """
    fused_sgd: bool = False      # torch.optim.SGD(fused=True): the update in one kernel; in fp16 the
    #                              scaler's inf check then stays on the device (no sync per step)
    compile_step: bool = False   # torch.compile of the training forward, mode "reduce-overhead": CUDA
    #                              graphs replay the fixed-shape step's hundreds of kernel launches
    eval_batch_size: int = EVAL_BATCH_SIZE

    def __post_init__(self):
        size = self.eval_batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise KdlabError(f"evaluation batch size must be a positive integer, got {self.eval_batch_size!r}")


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
RECIPES = {"pretrained": FINETUNE, "scratch": SCRATCH}
# A teacher from scratch needs a longer schedule than the students to be worth distilling; it is
# trained once for every student and seed.
SCRATCH_TEACHER_EPOCHS = 40
# Label smoothing on the students' cross-entropy term: off. The paired ablation
# (results/ablation-recipe, H200, scratch baseline, seed 42) chose it on validation: 0.8954
# without, 0.8944 with 0.1, a difference well inside one seed's noise. Never on the teacher,
# whose smoothed outputs distil worse (Mueller et al., 2019, "When does label smoothing help?"):
# `--label-smoothing` reaches the students alone (kdlab.lab.Lab).
STUDENT = dict(label_smoothing=0.0)
ARCH_NAMES = {"resnet50": "ResNet50", "resnet18": "ResNet18"}


@dataclass(frozen=True)
class Run:
    """One row of the run table: what trains, how it starts, and how the charts and report name it."""
    arch: str
    method: str
    start: str                           # "pretrained" (fine-tuned from ImageNet) or "scratch"
    in_lab: bool = True                  # one of the original lab's six, which `run all` trains
    # The original lab's CIFAR-10 test accuracy (its final comparison, quoted by issue 3): drawn
    # and tabled beside ours for comparison, never used as a result of this code.
    original_lab_test_acc: float | None = None

    @property
    def label(self) -> str:
        if self.arch == RUNS[TEACHER_RUN].arch:
            return f"{ARCH_NAMES[self.arch]} teacher"
        method = f" + {METHODS[self.method].name}" if self.method != "ce" else ""
        return f"{ARCH_NAMES[self.arch]} {STARTS[self.start]}{method}"


# The run table. The names are the checkpoint names of the original lab (kd_scores included) and
# never change; the charts colour the runs in this order.
RUNS = {
    "teacher_resnet50":               Run("resnet50", "ce", "pretrained", original_lab_test_acc=0.9297),
    "student_pretrained_baseline":    Run("resnet18", "ce", "pretrained", original_lab_test_acc=0.9213),
    "student_pretrained_kd_logits":   Run("resnet18", "kd_logits", "pretrained", original_lab_test_acc=0.9312),
    "student_pretrained_kd_features": Run("resnet18", "kd_features", "pretrained"),
    "student_scratch_baseline":       Run("resnet18", "ce", "scratch"),
    "student_scratch_kd_scores":      Run("resnet18", "kd_logits", "scratch"),
    "student_scratch_kd_features":    Run("resnet18", "kd_features", "scratch", in_lab=False),
    "student_scratch_dkd":            Run("resnet18", "dkd", "scratch", in_lab=False),
    "student_scratch_at":             Run("resnet18", "attention", "scratch", in_lab=False),
}
# `run all` trains these.
LAB_RUNS = [name for name, run in RUNS.items() if run.in_lab]
# How the charts and the report name each start, and the start of a run's initial weights.
STARTS = {"pretrained": "from ImageNet", "scratch": "from scratch"}
START_OF_WEIGHTS = {"imagenet": "pretrained", "none": "scratch"}


def expected_runs(present) -> list[str]:
    """The runs a folder of results is expected to hold, given the runs it holds (`present`).

    A folder with a student fine-tuned from ImageNet is the lab as `run all` and the notebook
    train it: its six runs. Any other is a lab without ImageNet weights (results/reference/):
    the teacher and the from-scratch students of `run all`. Runs outside `run all` (feature KD
    from scratch, decoupled KD, attention transfer) are never expected: they are reported when
    they have results, and never called missing.
    """
    if any(RUNS[run].start == "pretrained" for run in present if run in RUNS and run != TEACHER_RUN):
        return list(LAB_RUNS)
    return [TEACHER_RUN] + [run for run in LAB_RUNS if RUNS[run].start == "scratch"]


def run_of(method: str, start: str) -> str | None:
    """The student run of the table with this method and start, if there is one."""
    return next((name for name, run in RUNS.items() if name != TEACHER_RUN
                 and (run.method, run.start) == (method, start)), None)


def baseline_of(run: str) -> str | None:
    """The cross-entropy run a distillation run is measured against: same network, same start."""
    return None if RUNS[run].method == "ce" else run_of("ce", RUNS[run].start)


def kd_pairs() -> list[tuple[str, str]]:
    """(baseline, distilled run) for every distilled run of the table."""
    return [(baseline_of(name), name) for name, run in RUNS.items() if run.method != "ce"]


def run_label(run: str, results: dict[str, dict]) -> str:
    """A run's name on the charts and in the report, true to its start (`results`: results files
    by run): a run of the ImageNet recipe started from random weights (`--weights none`, or a
    smoke run) is never called pretrained."""
    label = RUNS[run].label
    if RUNS[run].start == "pretrained" and results.get(run, {}).get("weights") == "none":
        pretrained = STARTS["pretrained"]
        return (label.replace(pretrained, "random start") if pretrained in label
                else f"{label} ({STARTS['scratch']})")
    return label


# ----------------------------------------------------------------------------- benchmark step kinds
# What benchmarks/throughput.py times: the teacher's step, the student's CE step, one step per
# distillation method (named by the method) and evaluation.
TEACHER_STEP, STUDENT_STEP, EVALUATION_STEP = "teacher_ce", "student_ce", "evaluation"
# Files measured before the registry named two steps otherwise; they are read under the method's name.
LEGACY_STEP_NAMES = {"logit_kd": "kd_logits", "feature_kd": "kd_features"}


def step_runs() -> dict[str, str]:
    """Each step kind and the run whose config it takes. A step costs what its networks and its
    method cost, whatever the start, so the first run of the table with them serves."""
    first_of_method = {}
    for name, run in RUNS.items():
        if name != TEACHER_RUN:
            first_of_method.setdefault(run.method, name)
    student_ce = first_of_method.pop("ce")
    return {TEACHER_STEP: TEACHER_RUN, STUDENT_STEP: student_ce, **first_of_method, EVALUATION_STEP: student_ce}


def step_kind(cfg: RunConfig) -> str:
    """The training step kind that costs what a step of run `cfg` costs."""
    if cfg.method != "ce":
        return cfg.method
    return TEACHER_STEP if cfg.arch == RUNS[TEACHER_RUN].arch else STUDENT_STEP


# Smoke mode: synthetic data (800 train, 200 val, 200 test images), random weights, 16 px,
# two short epochs. Proves the whole pipeline end to end on any CPU in under a minute; its
# numbers are never results. 16 px is the smallest input the validation allows; the pipeline
# does the same work at any size.
SMOKE = dict(weights="none", epochs=2, batch_size=64, image_size=16, val_per_class=20,
             lr=0.05, warmup_epochs=0.5)

# The settings each method reads (kdlab.registry), beyond those every run has; the teacher
# (cross-entropy) reads none.
METHOD_SETTINGS = {key: tuple(f.name for f in setting_fields(key)) for key in METHODS}
KD_SETTINGS = tuple(all_settings())

OVERRIDABLE = ("weights", "epochs", "batch_size", "lr", "image_size", "label_smoothing", "ema_decay",
               "flip_tta", "limit_train", "seed")


def make_config(run: str, smoke: bool = False, **overrides) -> RunConfig:
    """The config of `run`: its recipe, then smoke settings, then the overrides that are not None.

    `weights` only overrides runs that start from ImageNet: a scratch run is scratch by name.
    A method setting (kdlab.registry) overrides the runs whose method has it, and no other.
    """
    if run not in RUNS:
        raise KdlabError(f"unknown run {run}; valid runs: {', '.join(RUNS)} (or 'all')")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    method = RUNS[run].method
    setting_names = set(all_settings())
    unknown = set(overrides) - set(OVERRIDABLE) - setting_names
    if unknown:
        raise KdlabError(f"cannot override {sorted(unknown)}; overridable: {', '.join(OVERRIDABLE)}, "
                         f"and the method settings {', '.join(sorted(setting_names))}")
    own = {f.name for f in setting_fields(method)}
    settings = METHODS[method].settings(**{k: v for k, v in overrides.items() if k in own})
    fields = dict(arch=RUNS[run].arch, method=method, **RECIPES[RUNS[run].start], run=run, smoke=smoke,
                  settings=settings)
    if fields["weights"] == "none":
        overrides.pop("weights", None)
    elif overrides.get("weights") == "none":
        fields.update(SCRATCH)  # no ImageNet start: a fine-tuning LR would under-train
    if run == TEACHER_RUN and fields["weights"] == "none":
        fields["epochs"] = SCRATCH_TEACHER_EPOCHS
    if run != TEACHER_RUN:
        fields.update(STUDENT)
    if smoke:
        fields.update(SMOKE)
    fields.update({k: v for k, v in overrides.items() if k in OVERRIDABLE})
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
    problems += cfg.settings.problems()
    if problems:
        raise KdlabError("; ".join(problems))
    return cfg


def config_dict(cfg: RunConfig) -> dict:
    """The config as one flat dict, the method's settings beside the recipe (as checkpoints store it)."""
    fields = dataclasses.asdict(cfg)
    settings = fields.pop("settings")
    return {**fields, **settings}


def config_differences(stored: dict, requested: RunConfig) -> list[str]:
    """Fields whose stored value differs from the requested one, as 'field: stored -> requested'.

    A field the stored config lacks was added after it was written: it counts as its default,
    the recipe that checkpoint was trained with. A stored field the config no longer has
    (before the registry, every run stored every method's settings) changes nothing.
    """
    wanted = config_dict(requested)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) + setting_fields(requested.method)
                if f.default is not dataclasses.MISSING}
    stored = {**defaults, **stored}
    return [f"{k}: {stored.get(k, '<absent>')!r} -> {v!r}" for k, v in sorted(wanted.items()) if stored.get(k) != v]
