"""The ``greenprop`` command line: train, compare, check GradSamp's GGD hypothesis, list what exists."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from greenprop.errors import GreenpropError
from greenprop.train.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig

# (flag, TrainConfig field, argparse kwargs); defaults live in TrainConfig only.
_TRAIN_OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "--model",
        "model",
        {
            "help": "zoo model: mlp, cnn, resnet18, resnet18-narrow, resnet18-gn, mixer, vit; minilm (text); "
            "ddpm-unet (diffusion: trains noise prediction, see docs/diffusion.md)"
        },
    ),
    ("--dataset", "dataset", {"help": "fashion-mnist, digits, or rotten-tomatoes (text, for minilm)"}),
    (
        "--method",
        "method",
        {"help": "method spec, e.g. baseline or ssprop:keep=0.6 (see `greenprop methods`)"},
    ),
    ("--epochs", "epochs", {"type": int}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--lr", "lr", {"type": float, "help": "peak learning rate"}),
    (
        "--optimizer",
        "optimizer",
        {"help": f"{', '.join(OPTIMIZERS)}, options after ':' (sgd:nesterov=true; see `greenprop methods`)"},
    ),
    ("--momentum", "momentum", {"type": float, "help": "SGD momentum (unless --optimizer sgd:momentum=...)"}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--lr-schedule", "lr_schedule", {"choices": LR_SCHEDULES}),
    ("--step-size", "step_size", {"type": int, "help": "epochs between LR drops (step schedule)"}),
    ("--gamma", "gamma", {"type": float, "help": "LR drop factor (step schedule)"}),
    ("--label-smoothing", "label_smoothing", {"type": float}),
    ("--seed", "seed", {"type": int}),
    (
        "--deterministic",
        "deterministic",
        {"action": "store_true", "help": "torch.use_deterministic_algorithms(True)"},
    ),
    ("--subset", "subset", {"type": int, "help": "number of training examples"}),
    ("--test-subset", "test_subset", {"type": int, "help": "number of test examples"}),
    ("--data-dir", "data_dir", {"help": "folder with the dataset files"}),
    ("--width", "width", {"type": int, "help": "model width override"}),
    ("--dropout", "dropout", {"type": float}),
    (
        "--channels-last",
        "channels_last",
        {"action": "store_true", "help": "NHWC memory layout (baseline and methods alike)"},
    ),
    (
        "--tuned",
        "tuned",
        {
            "action": "store_true",
            "help": "runtime settings that make dense training cheaper, for baseline and methods alike "
            "(recorded in metrics.json's environment): --channels-last, one thread per physical core, "
            "and on Linux the glibc malloc tunables of docs/benchmarks.md, for which greenprop "
            "re-executes itself once with GLIBC_TUNABLES set (same arguments and exit code)",
        },
    ),
    ("--compile", "compile", {"action": "store_true", "help": "torch.compile the model"}),
    (
        "--trim-padding",
        "trim_padding",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "text data: cut each batch to its longest sequence (dynamic padding), so the "
            "dense step skips the columns that are padding in every row; same outputs, FLOPs "
            "counted per batch length (--no-trim-padding: a preset's fixed length)",
        },
    ),
    (
        "--group-by-length",
        "group_by_length",
        {
            "action": argparse.BooleanOptionalAction,
            "help": "text data: put snippets of similar length in the same training batch (the Hugging "
            "Face Trainer's group_by_length: shuffled by seed and epoch, sorted by length within "
            "megabatches of 50 batches); with --trim-padding a batch then carries little padding",
        },
    ),
    (
        "--watts",
        "watts",
        {
            "type": float,
            "help": "average power draw, to ESTIMATE energy when no RAPL/NVML counter is readable",
        },
    ),
    ("--flops-samples", "flops_samples", {"type": int, "help": "samples per FLOP count"}),
    ("--eval-batch-size", "eval_batch_size", {"type": int}),
    ("--device", "device", {"help": "auto, cpu, cuda, cuda:1, ..."}),
    (
        "--diffusion-steps",
        "diffusion_steps",
        {"type": int, "help": "ddpm-unet: T of the linear beta schedule"},
    ),
    (
        "--score-every",
        "score_every",
        {
            "type": int,
            "help": "ddpm-unet: FD and a sample grid after every K-th epoch and the last "
            "(unset: the last only; 0: never)",
        },
    ),
    ("--score-samples", "score_samples", {"type": int, "help": "ddpm-unet: samples drawn per score"}),
    (
        "--fd-cache",
        "fd_cache",
        {"help": "ddpm-unet: folder caching the FD classifier (unset: the output folder's parent)"},
    ),
]


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    group = parser.add_argument_group("training options")
    for flag, dest, kwargs in _TRAIN_OPTIONS:
        help_text = kwargs.pop("help", "")
        kwargs = {**kwargs, "help": f"{help_text} (default: {defaults[dest]})".strip()}
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **kwargs)
    group.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress bars or per-epoch lines",
    )


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    known = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in known}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="greenprop",
        description="Train with less backpropagation and measure what it saves.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train one configuration",
        description="Train one configuration; writes OUT/metrics.json and OUT/checkpoint.pt every epoch.",
    )
    _add_train_options(train)
    train.add_argument("--out", type=Path, help="output folder (default: runs/<model>-<method>-seed<N>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    train.add_argument(
        "--strategy",
        help="GradSamp shorthand: --strategy pe:5 means --method gradsamp:strategy=pe:5 "
        "(only with --method gradsamp[:...] or no --method)",
    )
    train.add_argument(
        "--nproc",
        type=int,
        help="data-parallel training in N processes on this machine (DDP, torch's elastic launcher; "
        "--batch-size is the total over them); under torchrun, leave it out",
    )
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a DDP collective waits for the other processes before failing (default: 300)",
    )

    compare = sub.add_parser(
        "compare",
        help="baseline vs methods, several seeds, Table-2 report",
        description="Run a baseline and methods on the same model, data and "
        "seeds; print a table and write CSV/JSON/Markdown/plots.",
    )
    compare.add_argument("--preset", help="named preset (see `greenprop presets`), e.g. demo")
    compare.add_argument("--methods", nargs="+", help="method specs (default: the preset's, or baseline)")
    compare.add_argument("--seeds", nargs="+", type=int, help="seeds (default: the preset's, or 0)")
    _add_train_options(compare)
    compare.add_argument("--out", type=Path, help="output folder (default: runs/compare-<preset|model>)")
    compare.add_argument("--overwrite", action="store_true", help="rerun runs already in --out")
    compare.add_argument(
        "--frontier-budgets",
        nargs="+",
        type=float,
        metavar="FRACTION",
        help="budgets of the dense frontier as fractions of the epochs (default: 0.25 0.5 0.75); "
        "each is the baseline retrained for that share of the epochs with its own full LR schedule",
    )
    compare.add_argument(
        "--no-frontier",
        action="store_true",
        help="leave out the dense frontier (no 'dense at the same FLOPs/time' columns)",
    )

    check = sub.add_parser(
        "ggd-check",
        help="test GradSamp's GGD hypothesis on a run's epoch updates (paper Figs. 2-3)",
        description="Train one configuration and, for chosen epochs, fit a Generalized Gaussian to "
        "every parameter tensor's update theta(k) - theta(k-1) and run a KS test; writes "
        "OUT/ggd_check.{csv,json,md} and OUT/ggd_hist_epoch<k>.png (the run itself in OUT/run).",
    )
    _add_train_options(check)
    check.add_argument(
        "--check-epochs", nargs="+", type=int, help="1-based epochs to check (default: first, middle, last)"
    )
    check.add_argument("--layers", nargs="+", help="parameter names or glob patterns (default: all)")
    check.add_argument("--max-layers", type=int, help="check at most this many tensors (model order)")
    check.add_argument("--alpha", type=float, default=0.05, help="KS significance level (default: 0.05)")
    check.add_argument(
        "--fit", choices=("moments", "mle"), default="moments", help="GGD estimator (default: moments)"
    )
    check.add_argument("--log-y", action="store_true", help="log-scale density axes in the histograms")
    check.add_argument(
        "--out", type=Path, help="output folder (default: runs/ggd-check-<model>-<method>-seed<N>)"
    )
    check.add_argument("--overwrite", action="store_true", help="replace results already in --out")

    score = sub.add_parser(
        "score-diffusion",
        help="score saved ddpm-unet runs: FD (greenprop CNN features) and sample grids",
        description="Sample the kept models of finished diffusion runs (the last epoch from "
        "checkpoint.pt, earlier scored epochs from model_epoch<N>.pt) and write FD, its real-data "
        "floor and a PNG grid into each run's metrics.json, as an in-run score would; epochs already "
        "scored with the same --samples are kept (rerun to go on after an interruption).",
    )
    score.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders (with metrics.json)"
    )
    score.add_argument(
        "--samples", type=int, help="images sampled per score (default: the run's --score-samples)"
    )
    score.add_argument("--epochs", nargs="+", type=int, help="1-based epochs to score (default: the last)")
    score.add_argument("--fd-cache", type=Path, help="FD classifier folder (default: the run's own)")
    advise = sub.add_parser(
        "advise",
        help="which method pays on this machine: time each layer, probe each method, recommend",
        description="Time the dense step and each ssProp-convertible layer's backward (dense and at "
        "each keep) side by side, run a short probe of each method, time VCAS at the ratios its "
        "probe reached, and print the configuration predicted to save the most wall time, with its "
        "predicted FLOPs and time saving for a run of --epochs (see docs/advise.md). Progress goes "
        "to stderr.",
    )
    _add_train_options(advise)
    advise.add_argument(
        "--keeps", nargs="+", type=float, help="ssProp keeps to time, in (0, 1) (default: 0.8 0.6 0.4 0.2)"
    )
    advise.add_argument(
        "--repeats", type=int, default=10, help="side-by-side rounds per timing (default: 10)"
    )
    advise.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    advise.add_argument(
        "--probe-subset", type=int, default=512, help="training examples of each probe (default: 512)"
    )
    advise.add_argument("--probe-epochs", type=int, default=3, help="epochs of each probe (default: 3)")
    advise.add_argument(
        "--max-drop",
        type=float,
        default=0.4,
        help="ssProp: largest mean fraction of output-channel gradients dropped (default: 0.4, the paper's "
        "headline)",
    )
    advise.add_argument(
        "--predict",
        nargs="+",
        metavar="SPEC",
        help="also predict these method specs (gradsamp, ssprop, vcas, gradsamp;ssprop|vcas)",
    )
    advise.add_argument("--json", type=Path, help="also write the measurements and advice here")

    sub.add_parser("methods", help="list the methods and their options")
    sub.add_parser("presets", help="list the compare presets")
    _add_fl_parser(sub)
    return parser


def _add_fl_parser(sub: argparse._SubParsersAction) -> None:
    from greenprop.fl.cli import add_parser

    add_parser(sub)


def _with_strategy(method: str | None, strategy: str) -> str:
    """``--strategy X`` is sugar for ``gradsamp:strategy=X`` (merged into a gradsamp --method)."""
    from greenprop.methods import MethodSpec, parse_method

    spec = parse_method(method or "gradsamp")
    if spec.name != "gradsamp":
        raise GreenpropError(f"--strategy is a GradSamp option but --method is {method!r}")
    if "strategy" in spec.options:
        raise GreenpropError(f"--strategy {strategy} and a strategy in --method {method!r}: give it once")
    return MethodSpec("gradsamp", {**spec.options, "strategy": strategy.strip()}).label


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from greenprop.train import launch
    from greenprop.train.distributed import process_group, world_from_env
    from greenprop.train.setup import resolve_device

    overrides = _config_overrides(args)
    if args.strategy is not None:
        overrides["method"] = _with_strategy(overrides.get("method"), args.strategy)
    config = TrainConfig(**overrides)
    if args.nproc is not None and not launch.launched_worker():
        if world_from_env() is not None:
            raise GreenpropError("--nproc inside torchrun: torchrun already started the processes")
        if args.nproc < 1 or config.batch_size % args.nproc:
            raise GreenpropError(
                f"--nproc {args.nproc} must be a positive divisor of batch_size={config.batch_size} "
                "(the total batch, split over the processes)"
            )
        if args.nproc > 1:
            return launch.launch(argv, args.nproc)
    if launch.launched_worker():
        launch.die_with_launcher()
    if not _finite_positive(args.dist_timeout):
        raise GreenpropError(f"--dist-timeout {args.dist_timeout!r} must be a positive number of seconds")
    with process_group(resolve_device(config.device), args.dist_timeout):
        _train(args, config)
    return 0


def _finite_positive(value: float) -> bool:
    return value > 0 and value != float("inf")


def _train(args: argparse.Namespace, config: TrainConfig) -> None:
    from greenprop.train.trainer import Trainer

    out = args.out or Path("runs") / f"{_slug(config.model)}-{_slug(config.method)}-seed{config.seed}"
    trainer = Trainer(config, out, resume=args.resume, overwrite=args.overwrite)
    world = trainer.parallel.world_size
    if trainer.config.progress:  # off on every rank but 0
        processes = f", {world} processes" if world > 1 else ""
        print(
            f"training {config.model} on {config.dataset} with {config.method} "
            f"({trainer.steps_per_epoch} steps/epoch{processes}) -> {out}"
        )
    metrics = trainer.fit()
    if not trainer.parallel.is_main:
        return
    s = metrics["summary"]
    print(
        f"done: {trainer.task.describe_summary(s)}  "
        f"FLOPs fwd {_fmt(s['flops']['forward'], 1e12, 'TFLOP')}  "
        f"bwd {_fmt(s['flops']['backward'], 1e12, 'TFLOP')}  "
        f"train time {_fmt(s['time']['train'], 1, 's')}  "
        f"energy {_fmt(s['energy'], 1, 'J')} [{s['energy']['kind']}]"
    )
    print(f"metrics: {out / 'metrics.json'}  checkpoint: {out / 'checkpoint.pt'}")


def _cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from greenprop.experiments.compare import run_compare
    from greenprop.experiments.frontier import (
        DEFAULT_FRACTIONS,
        compare_with_frontier,
        frontier_metrics,
        frontier_text,
    )
    from greenprop.experiments.load_check import load_notes
    from greenprop.experiments.presets import get_preset
    from greenprop.experiments.report import aggregate, format_table, task_metrics, tuning_line, write_report

    preset = get_preset(args.preset) if args.preset else None
    base = dict(preset.config) if preset else {}
    base.update(_config_overrides(args))
    config = TrainConfig(**base)
    methods = args.methods or (list(preset.methods) if preset else ["baseline"])
    seeds = args.seeds or (list(preset.seeds) if preset else [0])
    out = args.out or Path("runs") / f"compare-{_slug(args.preset or config.model)}"
    if args.no_frontier and args.frontier_budgets:
        raise GreenpropError("--no-frontier and --frontier-budgets contradict each other; pass one")
    frontier = () if args.no_frontier else tuple(args.frontier_budgets or DEFAULT_FRACTIONS)
    results = run_compare(config, methods, seeds, out, overwrite=args.overwrite, frontier=frontier)
    command = "greenprop " + shlex.join(argv)
    title = f"greenprop compare: {args.preset or config.model}{' (--tuned)' if config.tuned else ''}"
    paths = write_report(results, out, title=title, command=command)
    rows = aggregate(results)
    print()
    print(format_table(rows, metrics=task_metrics(results)))
    print(tuning_line(results))
    print("\n".join(load_notes(rows)))
    print()
    frontier_rows = compare_with_frontier(results)
    if frontier_rows:
        print("Against the dense frontier (dense training at the method's FLOPs / time):")
        print("\n".join(frontier_text(frontier_rows, frontier_metrics(results), markdown=False)))
    print("report: " + "  ".join(str(p) for p in paths.values()))


def _cmd_ggd_check(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from greenprop.experiments.ggd_check import ggd_check, summary_lines
    from greenprop.gradsamp.check import format_rows

    config = TrainConfig(**_config_overrides(args))
    name = f"ggd-check-{_slug(config.model)}-{_slug(config.method)}-seed{config.seed}"
    out = args.out or Path("runs") / name
    result = ggd_check(
        config,
        out,
        epochs_to_check=args.check_epochs,
        layers=args.layers,
        max_layers=args.max_layers,
        alpha=args.alpha,
        fit_method=args.fit,
        progress=config.progress,
        log_y=args.log_y,
        overwrite=args.overwrite,
        command="greenprop " + shlex.join(argv),
    )
    print()
    if len(result.rows) <= 40:
        print(format_rows(result.rows))
    else:
        worst = sorted(result.rows, key=lambda r: r.p)[:10]
        print(f"{len(result.rows)} rows (all in {result.paths['csv']}); the 10 lowest p-values:")
        print(format_rows(worst))
    print()
    print("\n".join(summary_lines(result)))
    print("report: " + "  ".join(str(p) for p in result.paths.values()))


def _cmd_score_diffusion(args: argparse.Namespace) -> None:
    from greenprop.diffusion.rescore import describe, score_saved_run

    for run_dir in args.runs:
        for result in score_saved_run(
            run_dir, samples=args.samples, epochs=args.epochs, fd_cache=args.fd_cache
        ):
            print(describe(run_dir, result), flush=True)


def _cmd_advise(args: argparse.Namespace, argv: Sequence[str]) -> None:
    import json
    from dataclasses import fields as dataclass_fields

    from greenprop.advise import AdviseOptions, format_advice, run_advise, to_json
    from greenprop.advise.recommend import check_predictable, predict_spec
    from greenprop.advise.run import DEFAULT_KEEPS, environment_line, stderr_progress

    if "method" in vars(args):
        raise GreenpropError(f"advise tries every method itself; drop --method {args.method}")
    config = TrainConfig(**_config_overrides(args))
    chosen = {f.name: getattr(args, f.name) for f in dataclass_fields(AdviseOptions) if f.name != "keeps"}
    options = AdviseOptions(keeps=tuple(args.keeps or DEFAULT_KEEPS), **chosen)
    for spec in args.predict or ():  # bad specs fail before the minutes of measuring
        check_predictable(spec, options.keeps)
    measurements, advice = run_advise(config, options, progress=stderr_progress if config.progress else None)
    predictions = [predict_spec(measurements, spec) for spec in args.predict or ()]
    width = f" (width {config.width})" if config.width is not None else ""
    title = f"greenprop advise: {config.model}{width} on {config.dataset}, batch {config.batch_size}"
    environment = environment_line(config)
    text = format_advice(
        measurements,
        advice,
        title=title,
        environment=environment,
        keeps=options.keeps,
        predictions=predictions,
    )
    print(text)
    print(f"\ncommand: greenprop {shlex.join(argv)}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(measurements, advice, predictions), indent=2) + "\n")


def _cmd_methods() -> None:
    from greenprop.methods import available_methods, get_method
    from greenprop.options import FALSE_WORDS, TRUE_WORDS
    from greenprop.train.optimizers import optimizer_help

    for name in available_methods():
        method = get_method(name)
        print(f"{name}: {method.help}")
        for option, help_text in method.options.items():
            print(f"    {option}: {help_text}")
    print(
        f"\noptions go after the name: NAME:key=value,key=value; yes/no options read "
        f"{'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}; lists join with + (layers=conv+linear)"
    )
    print("\noptimizers (--optimizer NAME:key=value,...; lr and weight decay are --lr, --weight-decay):")
    for name, options in optimizer_help().items():
        print(f"  {name}")
        for option, help_text in options.items():
            print(f"    {option}: {help_text}")


def _cmd_presets() -> None:
    from greenprop.experiments.presets import PRESETS

    for name, preset in PRESETS.items():
        print(f"{name}: {preset.description}")
        print(f"    methods: {' '.join(preset.methods)}; seeds: {' '.join(map(str, preset.seeds))}")


def _slug(text: str) -> str:
    from greenprop.experiments.compare import run_dir_name

    return run_dir_name(text)


def _fmt(quantity: dict[str, Any] | None, scale: float, unit: str) -> str:
    from greenprop.metering import Quantity

    if quantity is None:
        return "n/a"
    return Quantity.from_dict(quantity).format(scale, unit, digits=4)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI. Called as the program (``argv`` None), ``--tuned`` may re-execute the process
    (:func:`greenprop.train.tuning.reexec_tuned`); called with ``argv``, it never replaces its caller."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if as_program and getattr(args, "tuned", False):
        from greenprop.train.tuning import reexec_tuned

        reexec_tuned(argv)
    from greenprop.train.signals import signal_number, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            code = _dispatch(args, argv)
            sys.stdout.flush()  # a reader that went away shows here, not in Python's exit
            return code
    except BrokenPipeError:
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    except GreenpropError as err:
        if not _handed_to_launcher(str(err)):
            print(f"greenprop: error: {_rank_prefix()}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        what = str(err) or "interrupted; what was saved is kept (continue with --resume)"
        print(f"greenprop: {what}", file=sys.stderr)
        code = 128 + signal_number(err)
        if as_program and args.command == "fl":
            _exit_now(code)
        return code


def _exit_now(code: int) -> None:
    """Exit without the interpreter's finalization.

    After an interrupted federated run, threads that Ray and gRPC leave behind can crash
    the finalization: CI saw SIGSEGV (exit -11) after the clean "interrupted ... Ray
    stopped" line, instead of 130. Everything is saved and Ray is stopped by then, so
    flushing the streams is all the exit still has to do.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "train":
        return _cmd_train(args, argv)
    elif args.command == "compare":
        _cmd_compare(args, argv)
    elif args.command == "ggd-check":
        _cmd_ggd_check(args, argv)
    elif args.command == "score-diffusion":
        _cmd_score_diffusion(args)
    elif args.command == "advise":
        _cmd_advise(args, argv)
    elif args.command == "methods":
        _cmd_methods()
    elif args.command == "presets":
        _cmd_presets()
    elif args.command == "fl":
        from greenprop.fl.cli import run_command

        run_command(args)
    return 0


def _stdout_to_devnull() -> None:
    """The reader of stdout is gone (``greenprop presets | head``): end quietly, with the exit
    status of a command stopped by SIGPIPE, as shell tools do. Output still buffered would
    raise again when Python flushes at exit, so stdout now writes to the null device
    (the recipe in Python's ``signal`` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. captured by a test)
        pass


def _handed_to_launcher(message: str) -> bool:
    from greenprop.train.launch import report_worker_error

    return report_worker_error(message)


def _rank_prefix() -> str:
    """Under torchrun every rank reports; name the rank unless it is 0."""
    import os

    rank = os.environ.get("RANK")
    return f"(rank {rank}) " if rank not in (None, "0") and "WORLD_SIZE" in os.environ else ""


if __name__ == "__main__":
    sys.exit(main())
