"""Sweeps: runs x seeds x settings as trials, each one train-or-load in its own folder.

    python -m kdlab sweep student_scratch_baseline student_scratch_kd_scores --seeds 42 43 \\
        --grid temperature=1,2,4,8 --grid alpha=0.5,0.9 --out sweeps/t-alpha

A trial is one run at one seed with one value of each swept setting that its method reads
(kdlab.config.METHOD_SETTINGS): a temperature multiplies the logit-KD runs, never the
baseline, which trains once per seed. Each trial is `Lab.run` in its own checkpoint folder,
DIR/trials/<run>/<setting=value,...>/, so running the same sweep again loads the finished
trials, resumes the interrupted ones from their last epoch and trains the rest. The teacher
is trained once, before the students, in DIR/teacher, and every KD trial loads it from there.

Engines. `ray` runs every trial as a Ray task: Ray core, not Ray Tune. A trial is already a
function with its own checkpoints, resumption and results file (the lab's train-or-load), and
the grid is fixed in advance: Tune's searchers, schedulers, trial checkpoints and reporting
would duplicate what the lab does, while a task with `num_gpus=0.25` is all the packing and
a `ray.wait` loop all the progress this needs. The same code runs on a laptop (a local Ray,
started here), on every GPU of one machine, and on a cluster (`--address HEAD:6379`). `processes`
packs the trials on one machine's GPUs as Ray does, in worker processes, without Ray (a GPU
machine without it: the 64 MiB a Ray wheel takes cannot always be installed). `serial` runs
the same trials in this process, one after the other.

A trial that fails (an error, or its process or its node killed) is recorded with its error
and its log file; the others go on, and the command exits non-zero. DIR/sweep.json lists every
trial, and where each was trained: host, Ray node and device.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdlab.config import DEFAULT_SEED, METHOD_SETTINGS, RUNS, TEACHER_RUN, SpeedLevers, make_config, run_id
from kdlab.errors import KdlabError
from kdlab.folders import writable_folder
from kdlab.results import read_kept_manifest

# The settings a grid may sweep: those of the students alone. A setting that the teacher trains
# with too (lr, epochs, image size) would need a teacher per value; sweep it with one --out
# folder per value instead.
GRID_TYPES = {"temperature": float, "alpha": float, "hint_layer": str, "hint_weight": float,
              "label_smoothing": float}
# label_smoothing is read by every student, whatever its method.
EVERY_METHOD = ("label_smoothing",)
GRID_HELP = "; ".join([*(f"{', '.join(keys)}: {method} runs" for method, keys in METHOD_SETTINGS.items() if keys),
                       f"{', '.join(EVERY_METHOD)}: every run"])
SWEEP_FILE = "sweep.json"
# How long the head may take to accept a connection before --address is called unreachable.
CONNECT_TIMEOUT_S = 5
# Attempts, a second apart, at the head's GCS once it accepts connections (Ray's default: 20).
GCS_ATTEMPTS, GCS_ATTEMPTS_VARIABLE = 5, "RAY_gcs_server_port_wait_time_s"
UNREACHABLE = ("nothing answers at --address {address} ({reason}): start the cluster's head with `ray start "
               "--head --port 6379` and give the HOST:6379 it prints; docs/sweeps.md has the commands. "
               "Without --address the sweep starts a Ray on this machine.")
AUTH_REFUSED = ("the Ray cluster at --address {address} refused this process: it has Ray's token "
                "authentication on, and this process has no token, or not the head's. Run the sweep with "
                "RAY_AUTH_MODE=token and the head's token (its ~/.ray/auth_token copied to this machine, or "
                "named by RAY_AUTH_TOKEN_PATH, or its text in RAY_AUTH_TOKEN); docs/sweeps.md.")
INSTALL_RAY = ("--engine ray needs Ray, which is not installed here: `pip install -r requirements-sweep.txt` "
               "(on every node of a cluster), or run the same trials without it with --engine serial.")


@dataclass(frozen=True)
class Trial:
    run: str
    seed: int
    settings: tuple[tuple[str, object], ...] = ()   # (setting, value), in the grid's order

    @property
    def folder(self) -> str:
        """The trial's checkpoint folder, relative to the sweep's; the seeds of a run and
        settings share it (their files are named by seed)."""
        if self.run == TEACHER_RUN:
            return "teacher"
        named = ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in self.settings)
        return f"trials/{self.run}/{named or 'recipe'}"

    @property
    def log_file(self) -> str:
        return f"{self.folder}/{run_id(self.run, self.seed)}.log"

    @property
    def results_file(self) -> str:
        return f"{self.folder}/{run_id(self.run, self.seed)}_results.json"

    def describe(self) -> str:
        return " ".join([self.run, f"seed {self.seed}", *(f"{key}={value}" for key, value in self.settings)])

    @classmethod
    def of(cls, record: dict) -> "Trial":
        """The trial a sweep.json record describes."""
        return cls(record["run"], record["seed"], tuple(record["settings"].items()))


@dataclass
class SweepOptions:
    """What every trial shares: the sweep's folder and the lab's options."""
    out: Path
    data_dir: str = "data"
    device: str = "auto"
    smoke: bool = False
    teacher_epochs: int | None = None
    cpus_per_trial: int = 1
    precision: str = "auto"                          # kdlab.train.check_precision
    speed: SpeedLevers = field(default_factory=SpeedLevers)
    overrides: dict = field(default_factory=dict)   # for every run (kdlab.config.OVERRIDABLE)
    teacher_weights: str | None = None               # kept teacher weights: no teacher trains (kdlab.kept)


def parse_grid(specs: list[str]) -> dict[str, list]:
    """{setting: values} from `KEY=V1,V2,...` strings."""
    grid = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if key not in GRID_TYPES:
            raise KdlabError(f"cannot sweep {key!r} (from --grid {spec}); a grid may sweep "
                             f"{', '.join(GRID_TYPES)}. Settings the teacher trains with too (lr, epochs, "
                             f"image size, ...) apply to the whole sweep: set them with their option, "
                             f"one --out folder per value.")
        if key in grid:
            raise KdlabError(f"--grid {key} is given twice; give all its values once: {key}=V1,V2")
        try:
            parsed = [GRID_TYPES[key](value.strip()) for value in values.split(",") if value.strip()]
        except ValueError:
            raise KdlabError(f"--grid {spec}: every value of {key} must be a number") from None
        if not parsed:
            raise KdlabError(f"--grid {spec} has no values; write it {key}=V1,V2")
        grid[key] = list(dict.fromkeys(parsed))
    return grid


def settings_read_by(run: str) -> tuple[str, ...]:
    return METHOD_SETTINGS[RUNS[run].method] + EVERY_METHOD


def expand_trials(runs: list[str], seeds: list[int], grid: dict[str, list]) -> list[Trial]:
    """Every (run, seed, values of the swept settings the run reads); checked before anything trains."""
    for run in runs:
        if run not in RUNS:
            raise KdlabError(f"unknown run {run}; valid runs: {', '.join(r for r in RUNS if r != TEACHER_RUN)}")
        if run == TEACHER_RUN:
            raise KdlabError(f"a sweep trains the teacher once, in <out>/teacher, for all its students: "
                             f"name the students to sweep, not {TEACHER_RUN}")
    trials = []
    for run in dict.fromkeys(runs):
        keys = [key for key in grid if key in settings_read_by(run)]
        for values in itertools.product(*(grid[key] for key in keys)):
            trials += [Trial(run, seed, tuple(zip(keys, values))) for seed in dict.fromkeys(seeds)]
    return trials


def trial_config(trial: Trial, options: SweepOptions):
    return make_config(trial.run, smoke=options.smoke,
                       **dict(options.overrides, **dict(trial.settings), seed=trial.seed))


def run_trial(trial: Trial, options: SweepOptions, ray_node_id: str | None = None) -> dict:
    """Train-or-load one trial in its folder, its log in a file there; never raises for a
    failed trial: the record says what happened. Runs in a Ray worker (on the node
    `ray_node_id`) or in this process."""
    import torch

    from kdlab.lab import Lab

    torch.set_num_threads(options.cpus_per_trial)
    folder = options.out / trial.folder
    folder.mkdir(parents=True, exist_ok=True)
    node = dict(host=socket.gethostname(), ray_node_id=ray_node_id)
    record = dict(trial_record(trial), status="failed", error=None)
    with open(options.out / trial.log_file, "a") as log_file:
        def log(message: str) -> None:
            print(message, file=log_file, flush=True)

        on_node = f" on Ray node {ray_node_id}" if ray_node_id else ""
        log(f"--- {trial.describe()}: {datetime.datetime.now().isoformat(timespec='seconds')} "
            f"on {node['host']}{on_node}")
        try:
            lab = Lab(folder, options.data_dir, options.device, smoke=options.smoke,
                      teacher_epochs=options.teacher_epochs, teacher_dir=options.out / "teacher",
                      teacher_weights=options.teacher_weights,
                      progress=False, log=log, precision=options.precision, speed=options.speed,
                      **dict(options.overrides, **dict(trial.settings)))
            trained = lab.run(trial.run, seed=trial.seed)
        except Exception as err:   # this trial failed; the sweep goes on with the others
            traceback.print_exc(file=log_file)
            record["error"] = str(err) if isinstance(err, KdlabError) else f"{type(err).__name__}: {err}"
            return record
    r = trained.results
    # A loaded trial was trained elsewhere, or earlier: run_sweep names its node from the last sweep.json.
    where = node if trained.trained else dict(host=None, ray_node_id=None)
    return dict(record, status="trained" if trained.trained else "loaded", test_acc=r["test_acc"],
                best_val_acc=r["best_val_acc"], wall_seconds=r["wall_seconds"],
                trained_on=dict(where, device=r["device"], device_name=r["device_name"]))


def run_ray_trial(trial: Trial, options: SweepOptions) -> dict:
    """run_trial as a Ray task: its record names the Ray node it ran on."""
    import ray

    return run_trial(trial, options, ray.get_runtime_context().get_node_id())


def trial_record(trial: Trial) -> dict:
    return dict(run=trial.run, seed=trial.seed, settings=dict(trial.settings), folder=trial.folder,
                results=trial.results_file, log=trial.log_file)


def failed_record(trial: Trial, error: str) -> dict:
    return dict(trial_record(trial), status="failed", error=error)


# ----------------------------------------------------------------------------- engines

class SerialEngine:
    """The trials in this process, one after another."""
    name = "serial"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def run(self, trials: list[Trial], options: SweepOptions, on_finished) -> None:
        for trial in trials:
            on_finished(run_trial(trial, options))


@dataclass
class ProcessEngine:
    """Every trial in a worker process of this machine, `1 / gpus_per_trial` workers on each GPU
    (without GPUs, or with `gpus_per_trial` 0, one worker per `cpus_per_trial` CPUs, on the CPU):
    the packing of the Ray engine on one machine, without Ray. Workers are spawned, not forked
    (a forked CUDA context is unusable), and each sees one GPU. A worker that dies (killed, out
    of memory) ends the pool: the trials not finished are reported failed, and running the sweep
    again resumes them."""
    gpus_per_trial: float | None = None   # None: one trial per GPU where there are GPUs, else none
    cpus_per_trial: int = 1
    name = "processes"

    def __enter__(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        gpus = torch.cuda.device_count()
        share = self.gpus_per_trial if self.gpus_per_trial is not None else (1 if gpus else 0)
        if share > 0 and gpus:
            slots = [str(gpu) for gpu in range(gpus) for _ in range(max(1, int(1 / share + 1e-9)))]
        else:
            slots = [""] * max(1, (os.cpu_count() or 1) // self.cpus_per_trial)
        context = multiprocessing.get_context("spawn")
        devices = context.Queue()
        for slot in slots:
            devices.put(slot)
        self.workers = len(slots)
        self.pool = ProcessPoolExecutor(len(slots), mp_context=context, initializer=take_device,
                                        initargs=(devices,))
        return self

    def __exit__(self, *exc_info) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, trials: list[Trial], options: SweepOptions, on_finished) -> None:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        pending = {self.pool.submit(run_trial, trial, options): trial for trial in trials}
        for future in as_completed(pending):
            try:
                record = future.result()
            except BrokenProcessPool as err:   # a worker died: this trial's, or another's
                record = failed_record(pending[future], f"its worker process died ({err})")
            on_finished(record)


def take_device(devices) -> None:
    """A worker's start: the GPU it trains on ("" for none), set before torch is imported."""
    os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()


@dataclass
class RayEngine:
    """Every trial a Ray task. Used as a context: a local Ray started on entering (unless one is
    running, or `address` names a cluster to join) is stopped on leaving."""
    address: str | None = None        # None: a local Ray, started here
    gpus_per_trial: float | None = None   # None: one GPU per trial where there are GPUs, else none
    cpus_per_trial: int = 1
    name = "ray"

    def __enter__(self):
        ray = import_ray()
        self.started_here = not ray.is_initialized()
        if self.started_here:
            start_ray(self.address)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.started_here:
            import_ray().shutdown()

    def run(self, trials: list[Trial], options: SweepOptions, on_finished) -> None:
        ray = import_ray()
        gpus = self.gpus_per_trial
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        # No retries: a trial whose process died is reported, and the next run of the sweep
        # resumes it from its last epoch.
        task = ray.remote(run_ray_trial).options(num_cpus=self.cpus_per_trial, num_gpus=gpus, max_retries=0)
        pending = {task.remote(trial, options): trial for trial in trials}
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(done)
            try:
                record = ray.get(done)
            except ray.exceptions.RayError as err:   # the worker died: killed, out of memory
                first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                record = failed_record(trial, f"{type(err).__name__}: {first_line.strip()}")
            on_finished(record)


def import_ray():
    try:
        import ray
    except ImportError:
        raise KdlabError(INSTALL_RAY) from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to the cluster at `address`, or start a local Ray (with `num_cpus` CPUs: default
    all of them). Workers import this copy of kdlab, shipped by Ray to every node."""
    ray = import_ray()
    import kdlab

    runtime_env = {"py_modules": [kdlab]}
    if address is None:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=False)
        return ray
    check_reachable(address)
    # The head answered, so its GCS is up: Ray's 20 attempts, a second apart, would only make a
    # refused token take 20 s to say so. Ray reads this variable while it connects (2.60).
    budget_set_here = GCS_ATTEMPTS_VARIABLE not in os.environ
    os.environ.setdefault(GCS_ATTEMPTS_VARIABLE, str(GCS_ATTEMPTS))
    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as err:
        raise KdlabError(join_failure(address, err)) from None
    finally:
        if budget_set_here:
            del os.environ[GCS_ATTEMPTS_VARIABLE]
    return ray


def check_reachable(address: str) -> None:
    """Say at once when nothing answers at `address`: ray.init retries for minutes first."""
    from ray._private.services import canonicalize_bootstrap_address

    try:   # `auto` and the host's name become the head's IP:port, as ray.init reads them
        gcs = address.split("://", 1)[1] if "://" in address else canonicalize_bootstrap_address(address)
        if gcs is None:   # `local`: ray.init starts a Ray here
            return
        host, port = gcs.rsplit(":", 1)
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:   # refused, timed out, unknown host; no cluster for `auto`
        reason = (str(err) or type(err).__name__).splitlines()[0].split(". ")[0]
        raise KdlabError(UNREACHABLE.format(address=address, reason=reason)) from None


def join_failure(address: str, err: Exception) -> str:
    """What to do when ray.init could not join the cluster at `address`, which answered."""
    causes, cause = [], err
    while cause is not None:   # the token's refusal is a cause of the ConnectionError, in its text
        causes.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__ or cause.__context__
    if any("AuthenticationError" in text or "InvalidAuthToken" in text for text in causes):
        return AUTH_REFUSED.format(address=address)
    first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (f"could not join a Ray cluster at --address {address} ({first_line.strip()}): give the head's "
            f"HOST:PORT as `ray start --head` printed it, and run the cluster's Ray and Python versions here; "
            f"docs/sweeps.md.")


# ----------------------------------------------------------------------------- the sweep

class Progress:
    """One line per finished trial: n of N, elapsed, an estimate of the time left."""

    def __init__(self, total: int, log=print):
        self.total, self.done, self.log = total, 0, log
        self.start = time.perf_counter()

    def finished(self, record: dict) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        if record["status"] == "failed":
            outcome = f"FAILED: {record['error']} (log: {record['log']})"
        else:
            outcome = f"{record['status']}, test {record['test_acc']:.4f}"
        self.log(f"[{self.done}/{self.total}] {Trial.of(record).describe()}: {outcome} | elapsed {elapsed:.0f}s, about {left:.0f}s left")


def run_sweep(runs: list[str], seeds: list[int], grid: dict[str, list], options: SweepOptions,
              engine: RayEngine | ProcessEngine | SerialEngine | None = None, log=print) -> dict:
    """Train-or-load every trial with `engine` (default: in this process) and write
    DIR/sweep.json; returns its contents. The trials are checked before the teacher trains."""
    trials = expand_trials(runs, seeds, grid)
    for trial in trials:
        trial_config(trial, options)
    writable_folder(options.out, "--out")
    uses_teacher = any(trial_config(trial, options).uses_teacher for trial in trials)
    teacher = Trial(TEACHER_RUN, DEFAULT_SEED)
    engine = engine or SerialEngine()
    sweep = dict(runs=list(runs), seeds=list(seeds), grid=grid, smoke=options.smoke, engine=engine.name,
                 options=dict(asdict(options), out=str(options.out)),
                 started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 teacher=None, trials=[])
    progress = Progress(len(trials) + uses_teacher, log)
    earlier = earlier_records(options.out)

    def finished(record: dict) -> None:
        if record["status"] == "loaded":   # trained by an earlier run of the sweep: its node is there
            trained_on = (earlier.get(Trial.of(record)) or {}).get("trained_on") or {}
            record["trained_on"].update(host=trained_on.get("host"), ray_node_id=trained_on.get("ray_node_id"))
        progress.finished(record)
        if record["run"] == TEACHER_RUN:
            sweep["teacher"] = record
        else:
            sweep["trials"].append(record)
        write_sweep(options.out, sweep)

    log(f"sweep: {len(trials)} trials of {len(dict.fromkeys(runs))} runs"
        + (" after the teacher" if uses_teacher else "") + f", in {options.out}")
    with engine:
        if uses_teacher and options.teacher_weights:   # kept weights: each trial loads them, none trains
            kept = read_kept_manifest(Path(options.teacher_weights))
            sweep["teacher"] = dict(trial_record(teacher), status="kept", kept_weights=options.teacher_weights,
                                    weights_sha256=kept["tensors_sha256"], test_acc=kept["test_acc"])
        elif uses_teacher:
            engine.run([teacher], options, finished)
            if sweep["teacher"]["status"] == "failed":
                taught = [t for t in trials if trial_config(t, options).uses_teacher]
                for trial in taught:
                    finished(failed_record(trial, f"not run: the teacher failed (log: {teacher.log_file})"))
                trials = [t for t in trials if t not in taught]
        engine.run(trials, options, finished)
    order = {trial: i for i, trial in enumerate(expand_trials(runs, seeds, grid))}
    sweep["trials"].sort(key=lambda record: order[Trial.of(record)])
    sweep["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_sweep(options.out, sweep)
    return sweep


def write_sweep(out: Path, sweep: dict) -> None:
    tmp = out / f"{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(sweep, indent=1))
    tmp.replace(out / SWEEP_FILE)


def earlier_records(out: Path) -> dict[Trial, dict]:
    """The records of the sweep.json already in `out`, by trial; none if there is none, or if it
    is damaged (the sweep rewrites it)."""
    try:
        sweep = json.loads((out / SWEEP_FILE).read_text())
        return {Trial.of(r): r for r in [sweep["teacher"], *sweep["trials"]] if r is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def describe_nodes(sweep: dict) -> str:
    """How many nodes trained the sweep's finished trials and teacher, and which: `2 nodes: vm
    (Ray node 1a2b3c4d), gpu-2 (Ray node 5e6f7a8b)`."""
    trained_on = [r.get("trained_on") or {} for r in [sweep["teacher"], *sweep["trials"]]
                  if r is not None and r["status"] not in ("failed", "kept")]   # kept weights trained elsewhere
    nodes = sorted({(w["host"], w["ray_node_id"] or "") for w in trained_on if w.get("host")})
    unknown = sum(not w.get("host") for w in trained_on)
    unrecorded = f"{unknown} trial(s) with no node recorded (trained by an older kdlab, or outside this sweep)"
    if not nodes:
        return f"an unknown number of nodes: {unrecorded}"
    names = ", ".join(host + (f" (Ray node {node_id[:8]})" if node_id else "") for host, node_id in nodes)
    return f"{len(nodes)} node{'' if len(nodes) == 1 else 's'}: {names}" + (f"; {unrecorded}" if unknown else "")


def failures(sweep: dict) -> list[dict]:
    return [r for r in [sweep["teacher"], *sweep["trials"]] if r is not None and r["status"] == "failed"]


def read_sweep(sweep_dir: str | Path) -> dict:
    """A sweep's sweep.json."""
    from kdlab.results import read_json

    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise KdlabError(f"{path} does not exist: point --sweep to the --out folder of `python -m kdlab sweep`.")
    return read_json(path, "run the sweep again: it rewrites the file, loading the finished trials.")


def load_sweep(sweep_dir: str | Path) -> tuple[dict, dict[str, list]]:
    """A sweep's sweep.json and the results of its finished trials: ({...}, {run: [(settings, results)]})."""
    from kdlab.results import read_results_file

    sweep_dir = Path(sweep_dir)
    sweep = read_sweep(sweep_dir)
    results: dict[str, list] = {}
    for record in sweep["trials"]:
        if record["status"] != "failed":
            r = read_results_file(sweep_dir / record["results"], record["run"], record["seed"])
            results.setdefault(record["run"], []).append((record["settings"], r))
    return sweep, results
