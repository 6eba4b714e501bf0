"""``vlpretrain export CHECKPOINT --out DIR [--format hf|clip|timm] [--push-to-hub REPO]``."""

from __future__ import annotations

import argparse

FORMATS = ("hf", "clip", "timm")


def export(checkpoint: str, out: str, fmt: str = "hf", push_to_hub: str | None = None,
           license: str = "apache-2.0") -> dict:
    """Export ``checkpoint`` (a checkpoints/step_N folder or a model folder) to ``out``; maybe upload it."""
    from vlpretrain.export.clip_format import export_clip
    from vlpretrain.export.hub import export_hf, push_to_hub as upload
    from vlpretrain.export.source import load_source
    from vlpretrain.export.timm_format import export_timm

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if push_to_hub and fmt != "hf":
        raise ValueError("--push-to-hub uploads the hf folder; use it with --format hf.")
    writers = {"hf": export_hf, "clip": export_clip, "timm": export_timm}
    written = writers[fmt](load_source(checkpoint), out, license)
    result = {"format": fmt, "out": str(written)}
    if push_to_hub:
        result["pushed"] = upload(written, push_to_hub)
    return result


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint or model folder (hf hub folder with remote code)")
    p.add_argument("checkpoint", help="a run's checkpoints/step_N folder or a model folder (run.dir/model)")
    p.add_argument("--out", required=True, help="output folder (replaced only once the export is complete)")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf (default: hub folder with remote code), "
                   "clip (native transformers CLIPModel folder, when expressible), "
                   "timm (the image tower as a timm VisionTransformer folder)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the hf folder to this hub repo "
                   "(token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--license", default="apache-2.0", help="licence field of the model card")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    result = export(args.checkpoint, args.out, args.format, args.push_to_hub, args.license)
    print(f"wrote {result['format']} export to {result['out']}"
          + (f"; pushed: {result['pushed']}" if "pushed" in result else ""))
    return 0
