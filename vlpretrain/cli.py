"""The ``vlpretrain`` command: one subcommand per job, each defined next to the code it runs."""

from __future__ import annotations

import argparse
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from vlpretrain.config import describe, load_config, to_yaml

    if args.keys:
        print("\n".join(describe()))
        return 0
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    """``accelerate launch -m vlpretrain.train ...`` when an accelerate config applies (given, or the
    user's default one); otherwise the same single process runs right here, so SIGTERM/SIGINT reach
    the training loop directly (accelerate's single-process launcher does not forward them)."""
    import os
    import subprocess

    from accelerate.commands.config import default_config_file

    config = args.accelerate_config or (default_config_file if os.path.isfile(default_config_file) else None)
    if config is None or "LOCAL_RANK" in os.environ:  # nothing to launch, or already launched
        from vlpretrain.train.__main__ import main as train_main

        return train_main(args.train_args)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", config]
    cmd += ["-m", "vlpretrain.train", *args.train_args]
    return subprocess.call(cmd, env=_launch_env(config))


def _launch_env(config: str) -> dict[str, str]:
    """The launcher's environment. A config with ``use_cpu: true`` and several processes (DDP or FSDP
    on CPUs) needs ``ACCELERATE_USE_CPU=true`` in its processes: accelerate's multi-process launcher
    does not pass the file's use_cpu on, and without it each process trains alone."""
    import os

    from accelerate.commands.config.config_args import load_config_from_file

    env = dict(os.environ)
    if load_config_from_file(config).use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


# Subcommands defined next to the code they run: name -> (module whose add_cli(sub) adds it, the line
# `vlpretrain --help` shows). Only the module of the command being run is imported, so `--help` starts fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vlpretrain.data.synthetic", "write synthetic captioned shape scenes as train/ and val/ shards"),
    "export": ("vlpretrain.export.cli", "export a checkpoint or model folder (hf hub folder with remote code)"),
    "eval": ("vlpretrain.eval.suite", "evaluate a model folder or checkpoint on shards; JSON of all figures"),
    "make-shards": ("vlpretrain.data.writer", "pack images + captions into WebDataset shards"),
    "tokenizer": ("vlpretrain.data.tokenizer", "train a SentencePiece caption tokenizer, saved for AutoTokenizer"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; ``command`` (all when None) gets its full arguments."""
    import importlib

    parser = argparse.ArgumentParser(prog="vlpretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config of a YAML file plus key=value overrides")
    p.add_argument("--config", default=None, help="experiment YAML file")
    p.add_argument("--keys", action="store_true", help="list every config key with its type and help")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("train", help="train (accelerate launch -m vlpretrain.train); no arguments: the demo",
                       description="Arguments after the options go to vlpretrain.train: [--config FILE] "
                                   "[--resume auto] [key.sub=value ...].")
    p.add_argument("--accelerate-config", default=None, help="accelerate config file (configs/accelerate/*.yaml)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="--config FILE, --resume auto, key=value overrides")
    p.set_defaults(func=_cmd_train)

    for name, (module, summary) in COMMANDS.items():
        if command is None or command == name:
            importlib.import_module(module).add_cli(sub)
        else:
            sub.add_parser(name, help=summary)  # listed only: this run does not parse its arguments
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)  # the subcommand comes before its options
    parser = build_parser(first if first in COMMANDS else "")
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # everything not ours goes to vlpretrain.train
        args.train_args = extra + args.train_args
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from vlpretrain.errors import ConfigError

    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:  # bad input, not a bug
        print(f"vlpretrain {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
