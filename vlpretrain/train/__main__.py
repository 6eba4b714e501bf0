"""``accelerate launch -m vlpretrain.train [--config FILE] [--resume auto] [key.sub=value ...]``.

With no config it runs the embedded default, ``vlpretrain/configs/demo.yaml`` (shipped inside the
package; the repository's ``configs/demo.yaml`` links to it): a small model on synthetic shards it
generates on first use under the working directory, then evaluation and an export, then a summary
of where everything is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlpretrain.config import ConfigError, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"  # package data (pyproject.toml)


def default_config() -> Path:
    """The embedded demo config, shipped inside the package (any install, editable or not)."""
    if not DEMO.is_file():
        raise ConfigError(f"no --config given and the packaged demo config {DEMO} is missing (an install without "
                          "its package data?); reinstall vlpretrain or pass --config FILE.")
    return DEMO


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpretrain train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="experiment YAML (default: the packaged demo config)")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint folder (same as train.resume=...)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlpretrain.train.loop import TrainingStopped, train

    try:
        path = args.config or default_config()
        overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
        cfg = load_config(path, overrides)
        summary = train(cfg)
    except ConfigError as exc:
        print(f"vlpretrain train: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"vlpretrain train: stopped: {exc}", file=sys.stderr)
        return 3
    if summary.get("stopped_by"):
        print(f"stopped by {summary['stopped_by']} after step {summary['steps']}; checkpoint: {summary['checkpoint']}"
              f" (continue with --resume auto)")
        return 0
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    run = Path(summary["run_dir"])
    ev = summary.get("eval") or {}
    figures = {k: round(v, 4) for k, v in ev.items() if isinstance(v, float)}
    print("\n== vlpretrain: done ==")
    print(f"steps {summary['steps']}, samples {summary['samples_seen']}, {summary['wall_time_s']:.0f} s "
          f"({summary['samples_per_s']:.1f} samples/s)")
    if figures:
        print(f"validation: {json.dumps(figures)}")
    for cap in ev.get("captions", [])[:3]:
        print(f"  caption: {cap['generated']!r}  (reference: {cap['reference']!r})")
    print(f"metrics:    {run / 'metrics.jsonl'}   plots: {', '.join(summary.get('plots', []))}")
    print(f"checkpoint: {summary['checkpoint']}")
    if summary.get("export"):
        print(f"model:      {summary['export']}  (VLModel.from_pretrained / VLProcessor.from_pretrained)")
    print(f"summary:    {run / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
