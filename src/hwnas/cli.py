"""The ``search`` (alias ``hwnas``) command line: run, compare, profile, show, export, finetune, eval, bench.

Bad input ends with one line on stderr and a non-zero exit (2; 3 for an impossible budget;
130 when interrupted), never a traceback. ``HWNAS_DEBUG=1`` shows tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hwnas.errors import HwnasError

BENCHES = ("tokens", "prune", "kernels", "models", "windows", "scaling", "joint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="search", description="Hardware-aware compression search for ViTs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="search a space; write a study directory")
    run.add_argument("space", nargs="?", help="space YAML file or preset name (default: the embedded digits DeiT)")
    run.add_argument("--budget", help="hard limits, e.g. latency=5ms,energy=20mJ,accuracy_drop=1%%")
    run.add_argument("--objectives", help="metrics to optimise (default accuracy,latency; fidelity for accuracy "
                                          "when the images have no labels; latency_vs_dense for latency when the "
                                          "space measures versus_dense, as the default space does)")
    run.add_argument("--optimizer", help="nsga2 (pymoo, default) | optuna-nsga2 | optuna-tpe | "
                                          "evolution (SparseViT) | random | lpvit (LPViT's allocation)")
    run.add_argument("--trials", type=int, help="finished trials the study should hold (default 32)")
    run.add_argument("--population", type=int, help="population size of the evolutionary optimizers")
    run.add_argument("--workers", type=int, help="Ray evaluator actors (default 1; 0 evaluates in-process)")
    run.add_argument("--trial-timeout", type=float, metavar="SECONDS",
                     help="replace a worker whose evaluation runs longer, and retry it (default 900; 0: no limit)")
    run.add_argument("--retries", type=int, help="retries of an evaluation whose worker crashed, hung or ran out "
                                                 "of memory, each on another worker (default 2)")
    run.add_argument("--ray-address", help="join an existing Ray cluster instead of starting a local one")
    run.add_argument("--device", help="cpu (default) or cuda[:i]")
    run.add_argument("--hwprofile", metavar="NAME|FILE", help="hardware profile to predict latency/energy on "
                     "(shipped: h100, h200, a100, cpu; or `search profile -o FILE`); predicted only when it is "
                     "not this machine")
    run.add_argument("--out", help="new study directory (default runs/study-TIMESTAMP)")
    run.add_argument("--resume", metavar="DIR", help="continue the study in DIR to its trial count")
    run.add_argument("--seed", type=int, help="random seed (default 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    compare = commands.add_parser("compare", help="search once per hardware profile; compare the fronts")
    compare.add_argument("space", nargs="?", help="space YAML file or preset name (default: the embedded digits DeiT)")
    compare.add_argument("--hwprofile", action="append", required=True, metavar="NAME|FILE",
                         help="a profile to compare (give two or more): shipped h100/h200/a100/cpu or a YAML file")
    compare.add_argument("--trials", type=int, default=16, help="trials per profile (default 16)")
    compare.add_argument("--budget", default="", help="the same limits on every profile, e.g. latency=5ms "
                         "(default: each device's fastest point within 1%% of dense accuracy)")
    compare.add_argument("--optimizer", default="nsga2")
    compare.add_argument("--workers", type=int, default=1)
    compare.add_argument("--device", default="cpu", help="where this machine measures (default cpu)")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--out", required=True, help="directory of the per-profile studies and the comparison")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")

    ablate = commands.add_parser("ablate", help="search each technique of a space alone and all jointly; "
                                                "compare the fronts")
    ablate.add_argument("space", nargs="?", help="space YAML file or preset name with two or more techniques "
                        "(default: the embedded digits DeiT: block sparsity and token keep)")
    ablate.add_argument("--trials", type=int, default=24,
                        help="trials per technique's study (default 24); the joint study runs their sum")
    ablate.add_argument("--rounds", type=int, default=15,
                        help="rounds of side-by-side timing of the front models, one call each (default 15)")
    ablate.add_argument("--optimizer", default="nsga2")
    ablate.add_argument("--workers", type=int, default=1)
    ablate.add_argument("--device", default="cpu")
    ablate.add_argument("--seed", type=int, default=0)
    ablate.add_argument("--out", required=True, help="directory of the per-technique studies and the comparison")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bar")

    profile = commands.add_parser("profile", help="measure this machine into a hardware profile YAML")
    profile.add_argument("-o", "--output", required=True, help="profile file to write (.yaml)")
    profile.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    profile.add_argument("--name", help="profile name (default cpu-measured / cuda-measured)")
    profile.add_argument("--quick", action="store_true", help="fewer points and repeats")
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")

    show = commands.add_parser("show", help="print the Pareto front of a study")
    show.add_argument("dir")

    export = commands.add_parser("export", help="export one point of a study as a deployable model")
    export.add_argument("dir")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument("--pick", help="best front point by latency (default; the side-by-side ratio to dense "
                       "where measured) | accuracy | energy | fidelity")
    export.add_argument("-o", "--output", required=True, help="output directory")

    finetune = commands.add_parser("finetune", help="recover an export's accuracy by two-level distillation")
    finetune.add_argument("dir", help="an export (search export ... -o DIR)")
    finetune.add_argument("-o", "--output", required=True, help="new export directory")
    finetune.add_argument("--epochs", type=int, help="training epochs (default 20)")
    finetune.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-4)")
    finetune.add_argument("--data", help="timm models: an ImageFolder to train on (default: the space's images)")
    finetune.add_argument("--labels", default="none", help="for --data DIR: none | folder | imagenet")
    finetune.add_argument("--max-images", type=int, help="for --data DIR: read at most N images (a seeded random "
                                                         "subset; all are held in memory)")
    finetune.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("eval", help="re-measure an exported model")
    evaluate.add_argument("dir")
    evaluate.add_argument("--data", help="default, or an ImageFolder directory")
    evaluate.add_argument("--labels", default="none", help="for --data DIR: none | folder | imagenet")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--energy", action="store_true", help="also measure energy (NVML or RAPL)")
    evaluate.add_argument("--threads", type=int, help="CPU threads (default: as many as the study measured with)")
    evaluate.add_argument("--no-versus-dense", dest="versus_dense", action="store_false",
                          help="do not time the dense model beside the export (no latency_ms_vs_dense; half the time)")

    bench = commands.add_parser("bench", help="run a benchmark; write its JSON")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument("--json", required=True, help="output file")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--quick", action="store_true", help="fewer cases and repeats (smoke run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a scheduler's kill (SIGTERM) stops a command as Ctrl-C does: what finished is kept, and one line says so
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return COMMANDS[args.command](args)
    except HwnasError as exc:
        _say(f"search: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("search: interrupted")
        return 130
    except Exception as exc:  # an internal error: one line unless debugging
        if os.environ.get("HWNAS_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.filename is not None:  # a path that cannot be read or written
            _say(f"search: error: {exc.filename}: {exc.strerror}")
            return 2
        _say(f"search: internal error: {type(exc).__name__}: {exc} (set HWNAS_DEBUG=1 for the traceback)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _console(stderr: bool = False) -> Console:
    """A console of the terminal's width, or 160 columns when piped to a file or a log."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


def _check_writable(path: str) -> None:
    """Fail before minutes of measuring, not after, when the output file cannot be written."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise HwnasError(f"cannot write {path}: {path.parent} is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HwnasError(f"cannot write {path}: {exc.strerror}") from None
    if path.is_dir():
        raise HwnasError(f"cannot write {path}: it is a directory")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HwnasError(f"cannot write {path}: permission denied")


def _say(line: str) -> None:
    """One unwrapped line on stderr."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)


# ---- commands ---------------------------------------------------------------------------------
_FIXED_ON_RESUME = ("space", "budget", "objectives", "optimizer", "population", "seed", "hwprofile")


def cmd_run(args: argparse.Namespace) -> int:
    from hwnas.search.report import front_table
    from hwnas.search.runner import run_study
    from hwnas.search.study import RunSettings, StudyDir, read_pareto
    from hwnas.spaces import load_space

    if args.resume:
        fixed = [name for name in _FIXED_ON_RESUME if getattr(args, name) is not None]
        if fixed:
            raise HwnasError(f"--resume continues a study as it was defined; drop --{fixed[0].replace('_', '-')}")
        if args.out:
            raise HwnasError("--resume and --out are exclusive: a resumed study stays in its directory")
        study_dir = StudyDir.open(args.resume)
        for name in ("trials", "workers", "ray_address", "device", "trial_timeout", "retries"):
            if getattr(args, name) is not None:
                setattr(study_dir.settings, name, getattr(args, name))
        study_dir.save_settings()
    else:
        space = load_space(args.space)
        settings = RunSettings(**{k: getattr(args, k) for k in (
            "budget", "objectives", "optimizer", "trials", "population", "seed", "device", "workers", "ray_address",
            "trial_timeout", "retries")
            if getattr(args, k) is not None})
        if args.objectives is None:
            _default_objectives_for(space, settings)
        if args.hwprofile:
            _target_profile(settings, args.hwprofile)
        _validate(space, settings)
        out = args.out or f"runs/study-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        study_dir = StudyDir.create(out, space, settings)

    summary = run_study(study_dir, _console(stderr=True), progress=not args.no_progress)
    _console().print(front_table(read_pareto(study_dir.path)))
    console = _console(stderr=True)
    console.print(f"hypervolume {summary.hypervolume:.4f} · {len(summary.front)} Pareto point(s) · "
                  f"{study_dir.path}/pareto.json · {study_dir.path}/report.md", markup=False)
    if summary.front:
        console.print(f"export one: search export {study_dir.path} --pick latency -o OUT", markup=False)
    return 0


def _default_objectives_for(space, settings) -> None:
    """Images without labels cannot give accuracy: the default objectives then optimise fidelity instead.
    A space that times each candidate beside the dense model optimises that ratio, not milliseconds."""
    from hwnas.evaluators.data import has_labels
    from hwnas.search.objectives import latency_objective

    settings.objectives = settings.objectives.replace("latency", latency_objective(space.measure))
    if not has_labels(space.data):
        settings.objectives = settings.objectives.replace("accuracy", "fidelity")
        _say(f"search: the space's images have no labels: optimising {settings.objectives} "
             "(fidelity: KL divergence to the dense model's predictions)")


def _target_profile(settings, spec: str) -> None:
    """Put the profile into the settings; on absent hardware, latency and energy become predicted metrics."""
    from hwnas.hwprofiles.profile import load_profile

    profile = load_profile(spec)
    if not settings.target(profile):
        _say(f"search: {profile.describe()} is not this machine: latency and energy are predicted from its profile")


def _validate(space, settings, profiled: bool = False) -> None:
    """Fail fast, before any model is trained or Ray started, on settings that cannot work.

    ``profiled``: each study will target a hardware profile (compare), which decides what is measured here.
    """
    from hwnas.evaluators.data import check_data_spec, has_labels
    from hwnas.evaluators.evaluator import resolve_device
    from hwnas.hwprofiles.energy import energy_counter
    from hwnas.hwprofiles.latency import device_name
    from hwnas.models.registry import build_arch, is_builtin, load_checkpoint
    from hwnas.pruning.apply import check_space
    from hwnas.search.optimizers import OPTIMIZERS

    settings.parsed_objectives()
    settings.parsed_budget()
    if settings.optimizer not in OPTIMIZERS:
        raise HwnasError(f"unknown optimizer '{settings.optimizer}' (known: {', '.join(OPTIMIZERS)})")
    if settings.optimizer == "lpvit" and settings.hwprofile:
        raise HwnasError("lpvit fits its own cost model on measurements here; with --hwprofile use nsga2 or optuna-*")
    if settings.optimizer == "lpvit" and not any(d.transform == "block_sparsity" for d in space.dimensions):
        raise HwnasError(f"lpvit allocates block_sparsity variables; space '{space.name}' has none")
    if settings.trials < 1:
        raise HwnasError("--trials must be at least 1")
    if settings.workers < 0:
        raise HwnasError("--workers must be 0 (in-process) or more")
    cores = os.cpu_count() or 1
    if not settings.ray_address and settings.workers > cores:
        raise HwnasError(f"--workers {settings.workers}: this machine has {cores} cores and each worker times on "
                         f"its own; use --workers {cores} or fewer (or --ray-address for a cluster)")
    if settings.trial_timeout < 0 or settings.retries < 0:
        raise HwnasError("--trial-timeout and --retries must be 0 or more")
    if not settings.ray_address:  # on a cluster, the GPUs and counters of the workers' nodes are what count
        device = resolve_device(settings.device)
        if not profiled and settings.measures_energy() and energy_counter(device) is None:
            raise HwnasError(f"no energy counter on {device_name(device)} (NVML, or RAPL under /sys/class/powercap): "
                             "drop the energy objective/budget, or predict energy for a profiled device with --hwprofile")
    architecture = build_arch(space.model)
    if space.model.get("checkpoint"):  # a missing or mismatched file fails here, before the study exists
        load_checkpoint(architecture, space.model["checkpoint"])
    check_space(architecture, space)
    check_data_spec(space.data, space.model)
    if "accuracy" in settings.metrics_read() and not has_labels(space.data):
        raise HwnasError("accuracy (an objective, or the accuracy_drop budget) needs labelled data, and this space's "
                         "images have none (labels: none): use fidelity, or data: {imagefolder: DIR, labels: "
                         "folder|imagenet}")
    if not is_builtin(space.model["name"]) and not space.model.get("checkpoint"):
        _say(f"search: model {space.model['name']} has no checkpoint: its weights are random (seeded), so accuracy "
             "and fidelity describe no trained model; latency and energy do not depend on the values")
    if settings.hwprofile:  # the profile can price the space's dtype
        from hwnas.evaluators.evaluator import DEFAULT_MEASURE
        from hwnas.hwprofiles.predictor import predictor_for

        predictor_for(settings.hwprofile, {**DEFAULT_MEASURE, **space.measure}["dtype"])


def cmd_compare(args: argparse.Namespace) -> int:
    from hwnas.search.compare import compare, comparison_tables, write_comparison
    from hwnas.search.objectives import parse_budget
    from hwnas.search.study import RunSettings
    from hwnas.spaces import load_space

    if len(args.hwprofile) < 2:
        raise HwnasError("compare needs two or more --hwprofile")
    if args.optimizer == "lpvit":
        raise HwnasError("lpvit fits its own cost model on measurements here; compare profiles with nsga2 or optuna-*")
    space = load_space(args.space)
    settings = RunSettings(budget=args.budget, optimizer=args.optimizer, trials=args.trials, seed=args.seed,
                           workers=args.workers, device=args.device)
    _default_objectives_for(space, settings)
    _validate(space, settings, profiled=True)
    results = compare(space, args.hwprofile, args.out, args.trials, args.budget, args.optimizer, args.seed,
                      args.workers, args.device, _console(stderr=True), progress=not args.no_progress)
    budget_set = bool(parse_budget(args.budget).limits)
    for table in comparison_tables(results, budget_set):
        _console().print(table)
    out = write_comparison(args.out, results, budget_set)
    _say(f"wrote {out}/compare.md, compare.json, compare.png and one study per profile")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from hwnas.search.ablate import ablate, ablation_table, beyond_union_table, write_ablation
    from hwnas.search.study import RunSettings
    from hwnas.spaces import load_space

    if args.rounds < 1:
        raise HwnasError("--rounds must be at least 1")
    if args.optimizer == "lpvit":
        raise HwnasError("lpvit allocates block sparsity only, so it cannot search the other techniques alone; "
                         "ablate with nsga2 or optuna-*")
    space = load_space(args.space)
    settings = RunSettings(optimizer=args.optimizer, trials=args.trials, seed=args.seed, workers=args.workers,
                           device=args.device)
    _default_objectives_for(space, settings)
    _validate(space, settings)
    ablation = ablate(space, args.out, settings, args.rounds, _console(stderr=True), progress=not args.no_progress)
    _console().print(ablation_table(ablation))
    _console().print(beyond_union_table(ablation))
    out = write_ablation(args.out, ablation, args.device)
    _say(f"wrote {out}/ablation.md, ablation.json, ablation.png and one study per technique")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from hwnas.evaluators.evaluator import resolve_device
    from hwnas.hwprofiles.measure_profile import measure_profile
    from hwnas.hwprofiles.profile import write_profile

    device = str(resolve_device(args.device))
    _check_writable(args.output)
    profile = measure_profile(device, args.name, quick=args.quick, progress=not args.no_progress)
    path = write_profile(profile, args.output)
    power = ", ".join(f"{k} {v:.0f} W" for k, v in profile.power_w.items()) or "no power counter"
    _console().print(f"{profile.device}: peak {', '.join(f'{d} {t:.3g} TFLOP/s' for d, t in profile.peak_tflops.items())}; "
                     f"bandwidth {profile.memory_bandwidth_gbs:.3g} GB/s; launch {profile.launch_overhead_us:.3g} µs; "
                     f"block-sparse efficiency {profile.block_sparse_efficiency:.2f}; {power} → {path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from hwnas.search.report import front_table, prediction_lines
    from hwnas.search.study import read_pareto

    document = read_pareto(args.dir)
    console = _console()
    console.print(front_table(document))
    console.print(f"{document['trials']['complete']} trials, {document['trials']['feasible']} feasible; "
                  f"budget {document['budget'] or 'none'}; hypervolume {document.get('hypervolume', 0):.4f}")
    for line in prediction_lines(document.get("predicted", {})):
        console.print(line, markup=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hwnas.export.exporter import export_model, read_manifest

    out = export_model(args.dir, args.output, trial=args.trial, pick=args.pick)
    manifest = read_manifest(out)
    _say(f"exported trial {manifest['trial']} to {out}/model.safetensors + hwnas.json; load it with hwnas.load('{out}')")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from hwnas.export.finetune import finetune_export

    summary = finetune_export(args.dir, args.output, epochs=args.epochs, progress=not args.no_progress,
                              data=args.data, labels=args.labels, lr=args.lr, device=args.device,
                              max_images=args.max_images)
    trained = f"({_counted(summary['epochs'], 'epoch')} on {summary['train_images']} images) · {args.output}"
    if summary["metric"] == "accuracy":
        _console().print(f"test accuracy: dense {summary['dense_accuracy']:.2%} · "
                         f"pruned {summary['accuracy_before']:.2%} → distilled {summary['accuracy_after']:.2%} {trained}")
    else:
        _console().print(f"test fidelity_kl to dense: pruned {summary['fidelity_kl_before']:.4g} "
                         f"→ distilled {summary['fidelity_kl_after']:.4g} {trained}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hwnas.export.remeasure import remeasure
    from hwnas.search.objectives import format_metric

    if args.threads is not None and args.threads < 1:
        raise HwnasError("--threads must be at least 1")
    recorded, measured, info = remeasure(args.dir, args.data, args.labels, args.device, args.energy, args.threads,
                                        args.versus_dense)
    threads = _counted(info["threads"], "thread")
    table = Table()
    for column in ("metric", "recorded by the study", "measured now"):
        table.add_column(column, justify="right")
    for metric in [*measured, *(m for m in recorded if m not in measured)]:  # then what only the study has
        if metric.endswith(("_min", "_max")):
            continue
        before, now = recorded.get(metric), measured.get(metric)
        table.add_row(metric, "-" if before is None else format_metric(metric, before),
                      "-" if now is None else format_metric(metric, now))
    console = _console()
    console.print(f"{args.dir} · {info['device']} (batch {info['batch_size']}, {threads})", markup=False)
    console.print(table)
    return 0


def _counted(count: int, noun: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    from hwnas.bench.record import bench_record, write_record
    from hwnas.models.digits import checkpoint_fingerprint

    _check_writable(args.json)
    module = importlib.import_module(f"hwnas.bench.{args.name}")
    results = module.run(device=args.device, quick=args.quick)
    checkpoints = {name: checkpoint_fingerprint(name) for name in getattr(module, "DIGITS_CHECKPOINTS", ())}
    path = write_record(bench_record(args.name, args.device, results, checkpoints), args.json)
    _console().print(module.summary(results))
    figure = f" and {module.plot(results, path.with_suffix('.png'))}" if hasattr(module, "plot") else ""
    _say(f"wrote {len(results)} measurements to {path}{figure}")
    return 0


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "ablate": cmd_ablate, "profile": cmd_profile, "show": cmd_show, "export": cmd_export, "finetune": cmd_finetune, "eval": cmd_eval,
            "bench": cmd_bench}


if __name__ == "__main__":
    sys.exit(main())
