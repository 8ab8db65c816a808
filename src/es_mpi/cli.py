"""es-mpi train | resume | replay | eval | doctor | inspect | plot | export | pretrain | ...

Exit codes (README, "Exit codes"): 0 done (final/ written), 1 a failure at run time (the
whole MPI job is aborted), 2 bad input or a broken launch (nothing started, nothing
overwritten), 3 replay found a checksum mismatch, 75 stopped before the last iteration by a
signal, the time limit or the job's end, checkpoint written (resume continues it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

EXIT_FAILURE, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED = 1, 2, 3, 75


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="es-mpi", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="start a new run")
    t.add_argument("--config", type=Path, help="YAML config (defaults apply to what it omits)")
    t.add_argument("--run-dir", type=Path, help="directory of the run (created; required)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set es.sigma=0.002 (repeatable)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing run dir")
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars (= --set runtime.tensorboard=true)",
    )
    t.add_argument("--help-config", action="store_true", help="list every config field and exit")

    r = sub.add_parser("resume", help="continue a run from its log (iteration counter continues)")
    r.add_argument("--run-dir", type=Path, required=True)
    r.add_argument("--iterations", type=int, help="total iterations the run should reach")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a field that does not alter results, e.g. "
        "runtime.time_limit_minutes=50 (repeatable)",
    )

    rp = sub.add_parser("replay", help="rebuild weights from base model + log, check checksums")
    rp.add_argument("--run-dir", type=Path, required=True)
    rp.add_argument("--out", type=Path, required=True, help="HF directory to write")

    e = sub.add_parser("eval", help="held-out accuracy/reward of a model (rank-parallel)")
    e.add_argument("--model", type=Path, required=True, help="HF directory, e.g. RUN_DIR/final")
    e.add_argument("--task", help="shortcut for --set task.name=TASK")
    e.add_argument("--config", type=Path, help="YAML config for the task settings")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser(
        "doctor", help="per rank: MPI library, world size vs launcher, device, torch build"
    )
    for command in (t, r, rp, e, d):
        command.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            help="shortcut for --set runtime.device=... (cuda: one GPU per rank)",
        )

    i = sub.add_parser("inspect", help="summary of a run")
    i.add_argument("--run-dir", type=Path, required=True)
    i.add_argument("--json", action="store_true", help="machine-readable output")

    pl = sub.add_parser("plot", help="PNG of train reward, held-out score and KL of runs")
    pl.add_argument(
        "--run-dir", type=Path, action="append", required=True, help="repeat to compare runs"
    )
    pl.add_argument("--out", type=Path, help="PNG file (default: FIRST_RUN_DIR/plot.png)")

    x = sub.add_parser("export", help="weights at a logged iteration as an HF directory")
    x.add_argument("--run-dir", type=Path, required=True)
    x.add_argument("--iteration", type=int, required=True, help="iterations done (0: the base)")
    x.add_argument("--out", type=Path, required=True, help="HF directory to write")
    x.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")

    g = sub.add_parser("grpo", help="GRPO baseline (TRL) on a config's model and task, 1 process")
    g.add_argument("--config", type=Path, help="YAML config (its grpo section sets GRPO)")
    g.add_argument("--out", type=Path, required=True, help="directory for grpo.json")
    g.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    g.add_argument("--eval-seconds", type=float, default=30.0, help="held-out every S seconds")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    pt = sub.add_parser("pretrain", help="pretrain the tiny base model on generated Countdown")
    _pretrain_arguments(pt)

    m = sub.add_parser(
        "init-model", help="build a tiny random model: char Llama, or a chat fixture"
    )
    m.add_argument("--out", type=Path, required=True)
    m.add_argument(
        "--family",
        choices=FAMILIES,
        default="char",
        help="char: Llama + char tokenizer; qwen2/llama3/gemma3: chat fixture (its own sizes)",
    )
    m.add_argument("--hidden", type=int, default=128)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--seed", type=int, default=0)
    return p


FAMILIES = ("char", "qwen2", "llama3", "gemma3")


def _pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per PretrainArgs field, its default taken from there (one place)."""
    from .pretrain import PretrainArgs

    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(PretrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":
            parser.add_argument(flag, type=Path, required=True)
        elif f.type == "bool":
            parser.add_argument(flag, action="store_true")
        else:
            choices = FAMILIES if f.name == "family" else None
            kind = kinds[f.type]
            parser.add_argument(
                flag, type=kind, default=f.default, choices=choices, help="default: %(default)s"
            )


def _help_config() -> None:
    from .config_load import describe_fields

    for name, default, doc in describe_fields():
        print(f"{name} = {default!r}\n    {doc}")


def _run(args: argparse.Namespace, comm) -> None:
    from .config_load import load_config

    # The config is checked before the heavy imports, so bad input fails in a fraction of a second.
    cfg = None
    if getattr(args, "device", None) and args.command != "replay":
        args.set.append(f"runtime.device={args.device}")
    if args.command == "train":
        tensorboard = ["runtime.tensorboard=true"] if args.tensorboard else []
        cfg = load_config(args.config, [*args.set, *tensorboard])
    elif args.command == "eval":
        task = [f"task.name={args.task}"] if args.task else []
        cfg = load_config(args.config, [*args.set, *task, f"model.path={args.model}"])
    from . import session

    if args.command == "eval":
        score = session.evaluate_model(cfg, comm)
        if comm.is_main:
            result = {
                "model": str(args.model),
                "task": cfg.task.name,
                "prompts": cfg.task.test_size,
                **vars(score),
            }
            print(
                json.dumps(result)
                if args.json
                else f"{args.model}: {cfg.task.name} held-out accuracy {100 * score.accuracy:.1f}% "
                f"reward {score.reward:.4f} ({cfg.task.test_size} prompts, {comm.size} ranks)"
            )
    elif args.command == "train":
        session.start_run(cfg, args.run_dir, args.overwrite, comm)
    elif args.command == "resume":
        session.resume_run(args.run_dir, args.iterations, comm, args.set)
    elif args.command == "replay":
        session.replay_run(args.run_dir, args.out, comm, args.device)


def _inspect(args: argparse.Namespace) -> None:
    from .summary import run_summary

    summary = run_summary(args.run_dir)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list):
            value = "; ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        print(f"{key:<{width}}  {value}")


def _plot(args: argparse.Namespace) -> None:
    from .plot import plot_runs

    out = plot_runs(args.run_dir, args.out or args.run_dir[0] / "plot.png")
    print(f"plot written to {out}")


def _export(args: argparse.Namespace) -> None:
    from .session import export_run

    start = export_run(args.run_dir, args.iteration, args.out, args.dtype)
    print(
        f"weights after iteration {args.iteration} (checkpoint {start} + replay, checksum "
        f"verified) written to {args.out} in {args.dtype}"
    )


def _grpo(args: argparse.Namespace) -> None:
    from .config_load import load_config
    from .grpo import train_grpo

    cfg = load_config(args.config, args.set)
    curve = train_grpo(cfg, args.out, args.minutes, args.eval_seconds)
    first, last = curve.points[0], curve.points[-1]
    print(
        f"grpo: held-out accuracy {100 * first['accuracy']:.1f}% -> {100 * last['accuracy']:.1f}% "
        f"in {last['seconds']:.0f} s ({last['step']} steps, {last['completions']} completions); "
        f"curve in {args.out / 'grpo.json'}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train" and args.help_config:
        _help_config()
        return 0
    if args.command == "train" and args.run_dir is None:
        print(
            "es-mpi train: error: the following arguments are required: --run-dir", file=sys.stderr
        )
        return EXIT_USAGE
    from .config import ConfigError
    from .errors import Interrupted, ReplayMismatch, RunLogError

    if args.command == "init-model":
        if args.family == "char":
            from .tiny_model import build_tiny_llama

            out = build_tiny_llama(args.out, args.hidden, args.layers, args.heads, args.seed)
        else:
            from .chat_fixtures import build_fixture

            out = build_fixture(args.family, args.out, args.seed)
        print(f"tiny model written to {out}")
        return 0
    if args.command == "pretrain":
        from .pretrain import PretrainArgs, pretrain

        fields = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            pretrain(PretrainArgs(**{**fields, "out": str(args.out)}))
        except ConfigError as exc:
            print(f"es-mpi: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    # one process, no MPI
    offline = {"inspect": _inspect, "plot": _plot, "export": _export, "grpo": _grpo}
    if args.command in offline:
        try:
            offline[args.command](args)
        except (RunLogError, ConfigError) as exc:
            print(f"es-mpi: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ReplayMismatch as exc:
            print(f"es-mpi: error: {exc}", file=sys.stderr)
            return EXIT_MISMATCH
        return 0

    from .comm import Comm

    try:
        comm = Comm.world()
    except RuntimeError as exc:  # several ranks launched, but no loadable MPI library
        print(f"es-mpi: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    from .stopping import listen_for_stop_signals

    if args.command in ("train", "resume"):  # before the model load: a stop then is exit 75
        listen_for_stop_signals()
    from .launch import world_size_error  # the launcher's rank count (docs/clusters.md)

    launch_error = world_size_error(comm.size)
    if args.command == "doctor":
        from .doctor import doctor

        return 0 if doctor(comm, args.device or "auto") else EXIT_USAGE
    if launch_error:
        if comm.is_main or comm.size == 1:
            print(f"es-mpi: error: {launch_error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        _run(args, comm)
    except ConfigError as exc:  # raised on every rank alike, before collective work
        if comm.is_main:
            print(f"es-mpi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReplayMismatch as exc:
        if comm.is_main:  # every rank replays the same log and finds the same mismatch
            print(f"es-mpi: error: {exc}", file=sys.stderr)
        return EXIT_MISMATCH
    except Interrupted:  # every rank stopped after the same iteration; resumable
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - one failure stops all (invariant 6)
        _fail(comm, exc)
    return 0


def _fail(comm, exc: BaseException) -> None:
    """Print rank and reason, then abort every rank of the job (no rank left hanging)."""
    print(f"[es-mpi] rank {comm.rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    comm.abort(EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
