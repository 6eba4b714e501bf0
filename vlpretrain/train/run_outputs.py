"""What a run hands out: the whole trained model (gathered under FSDP), its evaluations on data.val,
the exported HuggingFace folder and JSON files written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlpretrain.config import ExperimentConfig
from vlpretrain.data.processor import VLProcessor
from vlpretrain.eval.during_training import evaluate_val_shards
from vlpretrain.models.modeling import VLConfig, VLModel
from vlpretrain.models.weights import load_strict
from vlpretrain.train import sharding
from vlpretrain.train.metrics import MetricsLog
from vlpretrain.train.precision import low_precision_context


def _full_model(cfg: ExperimentConfig, accelerator, module, every_rank: bool = False) -> VLModel | None:
    """The trained VLModel whole, on the main process (None elsewhere; on every rank with ``every_rank``).
    Every rank must call this: under FSDP the shards are gathered into a fresh model (strictly); otherwise
    the wrapped model is unwrapped."""
    if not sharding.is_sharded(module):
        return accelerator.unwrap_model(module).model if accelerator.is_main_process or every_rank else None
    state = sharding.gather_full_state(module, every_rank)  # collective
    if not (accelerator.is_main_process or every_rank):
        return None
    model = VLModel(VLConfig.from_model_config(cfg.model))
    load_strict(model, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                "the gathered FSDP state of the trained model")
    return model.to(accelerator.device)


def _evaluate(cfg: ExperimentConfig, accelerator, module, processor, log: MetricsLog, step: int) -> dict:
    """Evaluation on data.val, every rank embedding its share (eval/during_training.py) with the whole model
    (under FSDP a replica gathered for it); the main process gets the figures and logs them as eval/*.
    Every rank must call this."""
    if not cfg.data.val:
        return {}
    captioning = any(entry["name"] == "captioning" for entry in cfg.objectives)
    with low_precision_context(accelerator, cfg.train.precision):
        results = evaluate_val_shards(
            _full_model(cfg, accelerator, module, every_rank=True), processor, cfg.data.val, max_samples=cfg.eval.max_samples,
            num_captions=cfg.eval.num_captions, max_new_tokens=cfg.eval.max_new_tokens, device=accelerator.device,
            captioning=captioning, rank=accelerator.process_index, world_size=accelerator.num_processes,
            num_workers=cfg.data.num_workers, pad_multiple=cfg.data.pad_multiple)
    if accelerator.is_main_process:
        figures = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}
        log.log(step, {**figures, "eval/captions": results.get("captions", [])})
        for cap in results.get("captions", []):
            accelerator.print(f"  [step {step}] {cap['generated']!r}  (reference: {cap['reference']!r})")
    return results


def _export(model: VLModel, processor: VLProcessor, run_dir: Path) -> Path:
    """The final model and its processor as one HuggingFace folder, written then renamed."""
    import shutil

    out, tmp = run_dir / "model", run_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _write_json(path: Path, obj: Any) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)
