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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config of a YAML file plus key=value overrides")
    p.add_argument("--config", default=None, help="experiment YAML file")
    p.add_argument("--keys", action="store_true", help="list every config key with its type and help")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=_cmd_config)

    from vlpretrain.data import synthetic, tokenizer, writer

    synthetic.add_cli(sub)
    writer.add_cli(sub)
    tokenizer.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlpretrain.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:  # bad input, not a bug
        print(f"vlpretrain {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
