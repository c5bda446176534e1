"""`python -m kdlab`: the lab headless. Errors a user can cause print one line and exit 2."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kdlab.config import DEFAULT_SEED, EVAL_BATCH_SIZE, LAB_RUNS, RUNS, SPLIT_SEED, TEACHER_RUN, SpeedLevers, run_id
from kdlab.errors import KdlabError
from kdlab.folders import writable_folder
from kdlab.registry import METHODS, all_settings, setting_owners
from kdlab.results import (CKPT_DIR, DEFAULT_BENCHMARK, SMOKE_CKPT_DIR, RunPaths, default_ckpt_dir,
                           read_results_file, run_status, seeds_in)
from kdlab.sweep import GRID_HELP

RECIPE = " (default: the run's recipe, kdlab/config.py)"
# The optional packages of `deploy` (requirements-deploy.txt); the rest of the lab runs without them.
DEPLOY_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The data, device and recipe options of `run` and `sweep`."""
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default: data)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="default: auto, a GPU if there is one")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast precision (default: auto: bf16 on GPUs that have it, fp16 with a loss "
                             "scaler on older ones such as the T4, fp32 on a CPU); not part of a run's config, "
                             "so a run may resume in another")
    parser.add_argument("--weights", choices=["imagenet", "none"],
                        help="start of the pretrained runs and the teacher (scratch runs are always 'none')" + RECIPE)
    parser.add_argument("--epochs", type=int, help="epochs of every run named (and of the teacher)" + RECIPE)
    parser.add_argument("--teacher-epochs", type=int, help="epochs of the teacher alone" + RECIPE)
    parser.add_argument("--teacher-weights", metavar="DIR",
                        help="distil from kept teacher weights (a folder with manifest.json, such as "
                             "checkpoints/reference/teacher_resnet50) instead of training a teacher; they are "
                             "checked by sha256 and against the teacher's config")
    parser.add_argument("--batch-size", type=int, help="images per optimizer step" + RECIPE)
    parser.add_argument("--lr", type=float, help="peak learning rate" + RECIPE)
    parser.add_argument("--image-size", type=int,
                        help="input resolution (CIFAR is upsampled on the device)" + RECIPE)
    parser.add_argument("--limit-train", type=int,
                        help="train on a stratified subset of N images (default: the whole train split)")
    parser.add_argument("--label-smoothing", type=float, help="on the cross-entropy term" + RECIPE)
    parser.add_argument("--ema-decay", type=float, help="per-step decay of the weight average (default 0.99)")
    parser.add_argument("--no-flip-tta", dest="flip_tta", action="store_false", default=None,
                        help="evaluate on one view instead of the mean of each image and its mirror")
    levers = parser.add_argument_group("speed levers", "the same steps, faster where they pay (benchmarks/"
                                       "throughput.py measures each); like --precision, not part of a run's config")
    levers.add_argument("--fused-sgd", action="store_true", help="the SGD update in one fused kernel")
    levers.add_argument("--compile-step", action="store_true",
                        help="torch.compile the training forward (mode reduce-overhead: CUDA graphs); the first "
                             "steps pay the compilation")
    levers.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, metavar="N",
                        help=f"images per evaluation batch (default {EVAL_BATCH_SIZE})")
    add_method_settings(parser)


def speed_levers(args) -> SpeedLevers:
    return SpeedLevers(fused_sgd=args.fused_sgd, compile_step=args.compile_step, eval_batch_size=args.eval_batch_size)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like kdlab's own, and the method settings named
    when an option is unknown."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message += f"; the method settings are {', '.join(flag(name) for name in all_settings())}"
        self.exit(2, f"kdlab: error: {message}\n")


def flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def add_method_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per method setting of kdlab.registry, typed by its default, its help per method."""
    group = parser.add_argument_group("method settings", "each applies to the runs named whose method has it")
    for name, field in all_settings().items():
        if field.metadata.get("fixed"):   # recorded in the config, not set (a registered loss's code)
            continue
        meanings = {}   # methods that share a setting's meaning and default share one line of help
        for method, owned in setting_owners(name).items():
            default = "+".join(owned.default) if isinstance(owned.default, tuple) else owned.default
            meanings.setdefault(f"{owned.metadata['help']} (default {default})", []).append(METHODS[method].name)
        help = "; ".join(f"{' and '.join(names)}: {meaning}" for meaning, names in meanings.items())
        kind = type(field.default)
        if kind is tuple:
            group.add_argument(flag(name), nargs="+", metavar="STAGE", help=help)
        else:
            group.add_argument(flag(name), type=kind, help=help)


def method_settings(args) -> dict:
    """The method settings given on the command line, by name."""
    return {name: tuple(value) if isinstance(value, list) else value
            for name in all_settings() if (value := getattr(args, name, None)) is not None}


def training_overrides(args) -> dict:
    """The recipe options and method settings given on the command line (None: the run's recipe)."""
    return dict(weights=args.weights, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, image_size=args.image_size, label_smoothing=args.label_smoothing,
                ema_decay=args.ema_decay, flip_tta=args.flip_tta, limit_train=args.limit_train,
                **method_settings(args))


def check_settings_apply(settings: dict, names: list[str]) -> None:
    """A method setting given for runs none of whose methods has it is a mistake, not a no-op."""
    methods = {RUNS[name].method for name in names if name in RUNS}
    for name in settings:
        owners = setting_owners(name)
        if methods and not methods & set(owners):
            raise KdlabError(f"{flag(name)} is a setting of {' and '.join(METHODS[m].name for m in owners)}, "
                             f"which none of the runs named uses ({', '.join(names)})")


def check_teacher_epochs(args) -> None:
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        raise KdlabError(f"teacher epochs must be at least 1, got {args.teacher_epochs}")


def add_methods_option(parser: argparse.ArgumentParser) -> None:
    """--methods, read by load_method_files before the parser is built; declared for --help."""
    parser.add_argument("--methods", action="append", default=argparse.SUPPRESS, metavar="FILE.py",
                        help="a Python file that registers methods of your own (kdlab.methods.register_method), "
                             "run before the command, so that their runs train, draw and report like the lab's "
                             "(docs/methods.md); once per file")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m kdlab", description=__doc__)
    add_methods_option(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="train-or-load runs (a KD run trains its teacher first if needed)",
                         epilog="Each run's settings and why: kdlab/config.py, docs/recipe.md.")
    run.add_argument("runs", nargs="+", metavar="RUN", help=f"'all' or any of: {', '.join(RUNS)}")
    run.add_argument("--ckpt-dir", help=f"default: {CKPT_DIR}, or {SMOKE_CKPT_DIR} with --smoke")
    run.add_argument("--last-dir", help="where each run's <run>_last.pt, rewritten after every epoch, goes "
                                        "(default: --ckpt-dir); a local disk when --ckpt-dir is on a drive "
                                        "that fails under frequent writes")
    add_training_options(run)
    run.add_argument("--seed", type=int, nargs="+", metavar="SEED",
                     help=f"training seed(s): each run named is trained once per seed (default {DEFAULT_SEED}, "
                          f"which keeps the original lab's file names; the 45k/5k split is always drawn "
                          f"with seed {SPLIT_SEED})")
    run.add_argument("--retrain", action="store_true", help="ignore and replace existing checkpoints")
    run.add_argument("--smoke", action="store_true",
                     help=f"synthetic data, random weights, tiny budget: checks the pipeline, no results "
                          f"(saved in {SMOKE_CKPT_DIR} unless --ckpt-dir says otherwise)")
    run.add_argument("--results-dir", help="also copy each run's results JSON here")
    run.add_argument("--live-curves", action="store_true",
                     help="write each epoch as TensorBoard scalars into <ckpt-dir>/tensorboard/<run> while it trains "
                          "(needs tensorboard; `tensorboard --logdir <ckpt-dir>/tensorboard` draws them)")

    sweep = sub.add_parser("sweep", help="runs x seeds x settings as trials, on Ray or one after another",
                           epilog="Each trial is train-or-load in <out>/trials/<run>/<settings>/: run the same "
                                  "command again to resume. docs/sweeps.md has the cluster commands.")
    sweep.add_argument("runs", nargs="+", metavar="RUN", help=f"students, any of: {', '.join(list(RUNS)[1:])}")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[DEFAULT_SEED], metavar="SEED",
                       help=f"training seeds, a trial each (default {DEFAULT_SEED})")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a setting and its values, e.g. temperature=1,2,4 (repeat for more settings); it "
                            "multiplies only the runs that read it: " + GRID_HELP)
    sweep.add_argument("--out", required=True, help="the sweep's folder: teacher/, trials/, sweep.json")
    sweep.add_argument("--engine", choices=["ray", "processes", "serial"], default="ray",
                       help="ray (default): every trial a Ray task; processes: worker processes of this machine, "
                            "packed on its GPUs as Ray does, without Ray; serial: in this process, one after another")
    sweep.add_argument("--address", help="Ray cluster to join: the HEAD:PORT that `ray start --head` prints, "
                                         "with RAY_AUTH_MODE=token and the head's token (docs/sweeps.md); "
                                         "default: start a local Ray on this machine")
    sweep.add_argument("--gpus-per-trial", type=float,
                       help="GPUs each trial reserves (engines ray and processes); 0.25 packs four on a GPU "
                            "(default: 1 where there are GPUs, else 0)")
    sweep.add_argument("--cpus-per-trial", type=int, default=1,
                       help="CPUs each trial reserves, and its torch threads (default 1)")
    sweep.add_argument("--smoke", action="store_true",
                       help="synthetic data, random weights, tiny budget: checks the pipeline, no results")
    add_training_options(sweep)

    status = sub.add_parser("status", help="one line per run: trained / resumable / missing / damaged")
    status.add_argument("--ckpt-dir", help=f"default: {CKPT_DIR}, or {SMOKE_CKPT_DIR} with --smoke")
    status.add_argument("--smoke", action="store_true", help="the smoke runs' default folder")

    report = sub.add_parser("report", help="write the report's generated/*.tex from results files, then build the PDF "
                                           "(into my_report/; the committed reference: --report-dir report)")
    report.add_argument("--results", default="results/reference",
                        help="folder of <run>_results.json, such as a checkpoint folder (default: results/reference)")
    report.add_argument("--figures", default="figures",
                        help="folder of the figures and efficiency.json, read only (default: figures, the reference's)")
    report.add_argument("--report-dir", default="my_report",
                        help="folder the report is written to, made if missing: KD_LAB.tex (copied from "
                             "report/), generated/*.tex and KD_LAB.pdf (default: my_report, never the committed "
                             "report/ unless named)")
    report.add_argument("--runs", nargs="+", metavar="RUN",
                        help="runs the report expects, those without a results file marked missing (default: "
                             "the six of `run all` when the results hold a run fine-tuned from ImageNet, else "
                             "the teacher and the from-scratch students; other runs appear when they have results)")
    report.add_argument("--benchmark", default=DEFAULT_BENCHMARK, metavar="JSON",
                        help="a benchmarks/throughput.py results file for the speed section")
    report.add_argument("--budget-baselines", metavar="DIR",
                        help="the budget-matched baselines of the results (results/ablation-budget for the "
                             "reference): logit KD against the baseline at equal training time and epochs")
    report.add_argument("--deploy", metavar="JSON",
                        help="a deploy.json of `python -m kdlab deploy` for the section on deploying the student "
                             "(CPU latency, int8); without one the section says it was not measured")
    report.add_argument("--draft", action="store_true",
                        help="accept smoke or CPU results; every page then says DRAFT")
    report.add_argument("--no-pdf", action="store_true", help="write the generated .tex only")
    report.add_argument("--pdf-required", action="store_true", help="fail when latexmk is not installed")
    figures = sub.add_parser("figures", help="every figure and the efficiency table, from results files")
    figures.add_argument("--ckpt-dir", default="checkpoints",
                         help="folder of <run>_results.json and <run>_best.pt (sizes on disk)")
    figures.add_argument("--results-dir", help="read the results files here instead of --ckpt-dir")
    figures.add_argument("--out", default="my_figures",
                         help="folder the figures are written to (default: my_figures, never the committed "
                              "figures/ unless named)")
    figures.add_argument("--sweep", metavar="DIR",
                         help="draw sweep.png from a sweep's folder instead: accuracy against each swept setting")
    figures.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="where latency and throughput are measured")
    figures.add_argument("--budget-baselines", metavar="DIR",
                         help="also draw the budget-matched baselines in DIR beside the test accuracies "
                              "(results/ablation-budget for the reference)")
    figures.add_argument("--efficiency-from", metavar="FOLDER",
                         help="reuse the efficiency.json measured in FOLDER (on a GPU, say) instead of measuring here")
    figures.add_argument("--deploy", metavar="JSON",
                         help="a deploy.json of `python -m kdlab deploy`: the efficiency table gains each run's "
                              "CPU latency per deployed variant, and deploy.png is drawn")
    deploy = sub.add_parser("deploy", help="export runs to ONNX, quantize them to int8 with ONNX Runtime, and "
                                           "measure each on this CPU (needs requirements-deploy.txt)",
                            epilog="What is written and how it is measured: docs/deploy.md.")
    deploy.add_argument("runs", nargs="*", metavar="RUN",
                        help="runs to deploy (default: every run with a best checkpoint in --ckpt-dir)")
    deploy.add_argument("--ckpt-dir", help=f"the runs' checkpoint folder (default: {CKPT_DIR}, or "
                                           f"{SMOKE_CKPT_DIR} with --smoke)")
    deploy.add_argument("--smoke", action="store_true", help="the smoke runs' default folder; their numbers "
                                                             "are a pipeline check, never results")
    deploy.add_argument("--kept", metavar="DIR", help="deploy the weights kept in DIR (<DIR>/<run>/manifest.json, "
                                                      "such as checkpoints/reference) instead of --ckpt-dir's "
                                                      "checkpoints; their parts are checked by sha256")
    deploy.add_argument("--out", required=True,
                        help="folder of <run>.onnx, <run>_int8.onnx, deploy.json and deploy.png, made if missing")
    deploy.add_argument("--data-dir", default="data",
                        help="folder holding cifar-10-batches-py/, for the test accuracy and the calibration "
                             "images (default: data; smoke runs use their synthetic data)")
    deploy.add_argument("--threads", type=int,
                        help="CPU threads of PyTorch and ONNX Runtime alike (default: PyTorch's, one per core)")
    for command in (run, status, report, figures, deploy):
        add_methods_option(command)
    return parser


def command_run(args) -> None:
    from kdlab.checkpoints import write_json
    from kdlab.lab import Lab  # imports torch: keep `--help` and `report` quick

    names = list(LAB_RUNS) if args.runs == ["all"] else args.runs
    check_settings_apply(method_settings(args), names)
    check_teacher_epochs(args)
    lab = Lab(args.ckpt_dir, args.data_dir, args.device, smoke=args.smoke, teacher_epochs=args.teacher_epochs,
              precision=args.precision, speed=speed_levers(args), last_dir=args.last_dir,
              teacher_weights=args.teacher_weights, live_curves=args.live_curves, **training_overrides(args))
    trials = [(name, seed) for seed in args.seed or [DEFAULT_SEED] for name in names]
    for name, seed in trials:
        lab.config(name, seed)  # every name's settings are checked before anything trains
    if args.teacher_weights:
        lab.run(TEACHER_RUN)    # so are the kept teacher's parts and config
    if args.results_dir:
        writable_folder(args.results_dir, "--results-dir")
    start = time.perf_counter()
    rows = []
    for name, seed in trials:
        trained = lab.run(name, retrain=args.retrain, seed=seed)
        rows.append((run_id(name, seed), "trained" if trained.trained else "loaded", trained.results))
        if args.results_dir:
            write_json(RunPaths(Path(args.results_dir), name, seed).results, trained.results)
    print(f"\n{'run':38} {'':8} {'best val':>8} {'test':>8} {'train s':>8}")
    for name, how, r in rows:
        print(f"{name:38} {how:8} {r['best_val_acc']:8.4f} {r['test_acc']:8.4f} {r['wall_seconds']:8.1f}")
    smoke = " (smoke run: synthetic data, not results)" if args.smoke else ""
    print(f"done in {time.perf_counter() - start:.1f}s on {lab.device}{smoke}")


def command_sweep(args) -> None:
    from kdlab.sweep import ProcessEngine, RayEngine, SerialEngine, SweepOptions, failures, parse_grid, run_sweep

    check_teacher_epochs(args)
    if args.cpus_per_trial < 1:
        raise KdlabError(f"--cpus-per-trial must be at least 1, got {args.cpus_per_trial}")
    if args.gpus_per_trial is not None and not 0 <= args.gpus_per_trial:
        raise KdlabError(f"--gpus-per-trial must be 0 or more, got {args.gpus_per_trial}")
    if args.address and args.engine != "ray":
        raise KdlabError(f"--address is for --engine ray; --engine {args.engine} runs on this machine")
    if args.gpus_per_trial and args.engine == "serial":
        raise KdlabError("--gpus-per-trial is for --engine ray or processes; --engine serial runs here, on --device")
    if args.engine == "processes" and (args.gpus_per_trial or 0) > 1:
        raise KdlabError(f"--engine processes gives a trial one GPU at most, got --gpus-per-trial "
                         f"{args.gpus_per_trial}; use --engine ray for trials of several GPUs")
    if not args.address:   # the trials run on this machine: check the precision against its device now
        from kdlab.lab import resolve_device
        from kdlab.train import check_precision

        check_precision(args.precision, resolve_device(args.device))
    # Absolute: Ray's workers do not run in this folder, nor, on a cluster, on this machine.
    options = SweepOptions(Path(args.out).resolve(), str(Path(args.data_dir).resolve()), args.device,
                           smoke=args.smoke, teacher_epochs=args.teacher_epochs, cpus_per_trial=args.cpus_per_trial,
                           precision=args.precision, speed=speed_levers(args), overrides=training_overrides(args),
                           teacher_weights=args.teacher_weights and str(Path(args.teacher_weights).resolve()))
    engine = {"ray": lambda: RayEngine(args.address, args.gpus_per_trial, args.cpus_per_trial),
              "processes": lambda: ProcessEngine(args.gpus_per_trial, args.cpus_per_trial),
              "serial": SerialEngine}[args.engine]()
    sweep = run_sweep(args.runs, args.seeds, parse_grid(args.grid), options, engine)
    failed = failures(sweep)
    smoke = " (smoke run: synthetic data, not results)" if args.smoke else ""
    print(f"sweep: {len(sweep['trials']) - len(failed)} of {len(sweep['trials'])} trials finished; "
          f"{Path(args.out) / 'sweep.json'} lists them{smoke}")
    if failed:
        raise KdlabError(f"{len(failed)} trial(s) failed, each named above and in sweep.json with its error "
                         f"and log file. Run the same command again to resume them: the finished trials "
                         f"are loaded, not trained again.")


def command_status(args) -> None:
    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else default_ckpt_dir(args.smoke)
    if not ckpt_dir.is_dir():
        raise KdlabError(f"the checkpoint folder {ckpt_dir} does not exist: nothing was trained there. "
                         f"Train with `python -m kdlab run all`, or pass the --ckpt-dir the runs were "
                         f"saved in (`status --smoke` for the smoke runs' {SMOKE_CKPT_DIR}).")
    for name in RUNS:
        for seed in seeds_in(ckpt_dir, name) or [DEFAULT_SEED]:
            state = run_status(ckpt_dir, name, seed)
            line = f"{run_id(name, seed):38} {state:9}"
            paths = RunPaths(ckpt_dir, name, seed)
            if state == "damaged":
                line += f" {paths.best} is truncated or not a checkpoint: run it with --retrain, or delete it"
            elif state == "trained" and paths.results.is_file():
                try:   # one damaged file is that run's problem: the other lines still print
                    r = read_results_file(paths.results, name, seed)
                except KdlabError as err:
                    line += f" results file unusable: {err}"
                else:
                    line += f" best val {r['best_val_acc']:.4f}  test {r['test_acc']:.4f}"
                    line += "  (smoke)" if r.get("smoke") else ""
            print(line)


def command_report(args) -> None:
    from kdlab.report import make_report  # the report is a leaf: only this command reads it

    make_report(args.results, args.figures, args.report_dir, args.runs, draft=args.draft,
                pdf=not args.no_pdf, pdf_required=args.pdf_required, benchmark=args.benchmark,
                budget_dir=args.budget_baselines, deploy=args.deploy)


def command_figures(args) -> None:
    from kdlab.figures import make_all_figures, plot_sweep  # imports torch and matplotlib
    from kdlab.sweep import describe_nodes, read_sweep

    start = time.perf_counter()
    if args.sweep:
        path = plot_sweep(args.sweep, args.out)
        print(f"wrote {path}; the sweep was trained on {describe_nodes(read_sweep(args.sweep))}")
    else:
        make_all_figures(args.results_dir or args.ckpt_dir, args.out, ckpt_dir=args.ckpt_dir, device=args.device,
                         efficiency_from=args.efficiency_from, budget_dir=args.budget_baselines,
                         deploy=args.deploy)
    print(f"done in {time.perf_counter() - start:.1f}s")


def command_deploy(args) -> None:
    try:
        from kdlab.deploy import deploy
    except ImportError as err:
        if err.name not in DEPLOY_PACKAGES:
            raise
        raise KdlabError(f"deploy needs {err.name}, which is not installed: pip install -r "
                         f"requirements-deploy.txt (onnx, onnxscript, onnxruntime), then run it again.") from None
    if args.kept and (args.ckpt_dir or args.smoke):
        raise KdlabError("--kept names the weights to deploy: give it without --ckpt-dir and --smoke")
    ckpt_dir = Path(args.kept or args.ckpt_dir or default_ckpt_dir(args.smoke))
    deployment = deploy(args.runs, ckpt_dir, args.out, args.data_dir, args.threads, kept=bool(args.kept))
    print(f"\n{'run':30} {'variant':22} {'MB':>7} {'ms, batch 1':>11} {'img/s':>7} {'test acc':>8} {'agrees':>7}")
    for run, measured in deployment["runs"].items():
        for variant, v in measured["variants"].items():
            print(f"{run:30} {deployment['variants'][variant]:22} {v['size_mb']:7.1f} {v['latency_ms']:11.2f} "
                  f"{v['throughput_img_s']:7.0f} {v['test_acc']:8.4f} {v['agreement_with_pytorch']:7.4f}")
    cpu = deployment["cpu"]
    print(f"on {cpu['model']}, {cpu['threads']} thread(s), int8 instructions: "
          f"{', '.join(cpu['int8_instructions']) or 'none known'}; {deployment['exporter']}")
    print(f"wrote {Path(args.out) / 'deploy.json'}" + (f" ({deployment['note']})" if deployment["smoke"] else ""))


COMMANDS = {"run": command_run, "sweep": command_sweep, "status": command_status, "figures": command_figures,
            "report": command_report, "deploy": command_deploy}


def load_method_files(argv) -> None:
    """Run each --methods file, which registers its methods (before the parser is built, so that
    their runs and settings are known to it). A file that fails is one line, and exit 2."""
    import runpy

    before = argparse.ArgumentParser(add_help=False)
    before.add_argument("--methods", action="append", default=[])
    for path in before.parse_known_args(argv)[0].methods:
        if not Path(path).is_file():
            raise KdlabError(f"--methods {path}: no such file")
        try:
            runpy.run_path(path, run_name="kdlab_methods")
        except KdlabError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's file: its error in one line
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise KdlabError(f"--methods {path} failed: {type(err).__name__}: {detail}") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        load_method_files(argv)
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # the interrupted run has said what is saved (kdlab.lab.Lab.run)
        print("kdlab: interrupted.", file=sys.stderr)
        return 130
    return code or 0
