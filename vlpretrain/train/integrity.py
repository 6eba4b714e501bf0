"""What the trainer settles before it writes anything into ``run.dir``: the run's tokenizer, and whether a
resume can be honoured.

The run's tokenizer is the one its model is trained with: on resume the checkpoint's own (through
its manifest's processor pointer), with ``train.init_from`` the pretrained source's, else
``data.tokenizer``. A ``data.tokenizer`` that differs from the one kept is named in a note and not
used: the model's ids are the saved tokenizer's. The trainer writes that processor once into
``run.dir/processor`` after every check passed (:func:`save_run_processor`).

:func:`check_resume` refuses, with the reason and the fix, a resume whose checkpoint misses a file, whose
model shape or objective set (names, parameter shapes) differs from the config, or whose saved weights
do not match the objective set key by key.

``python -m vlpretrain.train.integrity CHECKPOINT --tokenizer DIR`` seals a checkpoint saved before
checkpoints carried manifests: it writes the run's processor folder (from DIR and the checkpoint's
config) and the manifest. Nothing falls back to ``data.tokenizer`` silently: such a checkpoint is refused
until it is sealed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from vlpretrain.config import ConfigError
from vlpretrain.data.processor import VLProcessor
from vlpretrain.data.tokenizer import load_tokenizer
from vlpretrain.train.sharding import OPTIMIZER_KEY
from vlpretrain.train.checkpoint import (
    CONFIG_FILE, MANIFEST, RUN_PROCESSOR, IncompleteCheckpoint, check_compatible, check_manifest,
    checkpoint_processor, complete_checkpoints, write_manifest)

SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id")


def tokenizer_difference(a, b) -> str | None:
    """How tokenizer ``b`` encodes differently from ``a`` (vocabulary or special ids); None when the same."""
    if a.get_vocab() != b.get_vocab():
        changed = sorted(set(a.get_vocab().items()) ^ set(b.get_vocab().items()), key=str)[:3]
        return f"{len(a)} vs {len(b)} tokens, e.g. {', '.join(f'{t!r}={i}' for t, i in changed)} differ"
    specials = [f"{n} {getattr(a, n)} vs {getattr(b, n)}" for n in SPECIAL_IDS if getattr(a, n) != getattr(b, n)]
    return "; ".join(specials) or None


def run_tokenizer(cfg, resume: Path | None, pretrained=None, note: Callable[[str], None] = print):
    """The tokenizer the run trains with (see the module doc). ``pretrained``: ``train.init_from``'s
    loaded source. ``data.tokenizer`` is read only to name a difference when it is not the one used."""
    if resume is None and pretrained is None:
        return load_tokenizer(cfg.data.tokenizer)
    if resume is not None:
        try:
            kept, where = load_tokenizer(checkpoint_processor(resume)), f"the checkpoint {resume}"
        except IncompleteCheckpoint as exc:
            raise ConfigError(f"cannot resume: {exc}") from None
    else:
        kept, where = pretrained.processor.tokenizer, f"train.init_from '{cfg.train.init_from}'"
    if Path(cfg.data.tokenizer).is_dir():
        difference = tokenizer_difference(kept, load_tokenizer(cfg.data.tokenizer))
        if difference:
            note(f"note: data.tokenizer '{cfg.data.tokenizer}' is not the tokenizer of {where} ({difference}); the "
                 f"run keeps training with the model's own tokenizer, saved in its processor folder.")
    return kept


def check_resume(resume: Path | None, cfg, objectives: torch.nn.Module) -> None:
    """Refuse a resume that cannot be honoured, before anything is written: a checkpoint missing a file,
    a different model shape, a different objective set, or saved weights that do not match ``objectives``
    (the :class:`ObjectiveSet` about to be trained) key by key."""
    if resume is None:
        return
    try:
        check_manifest(resume)
    except IncompleteCheckpoint as exc:
        raise ConfigError(f"cannot resume: {exc}") from None
    check_compatible(resume, cfg.model)
    _check_objective_set(resume, cfg, objectives)
    check_saved_weights(resume, objectives)


def _objective_shapes(entries, model_config) -> dict[str, tuple[int, ...]]:
    from vlpretrain.objectives import build_objectives

    with torch.device("meta"):  # shapes only: nothing allocated
        built = build_objectives(entries, model_config)
    return {f"{o.name}.{k}": tuple(v.shape) for o in built for k, v in o.state_dict().items()}


def _check_objective_set(resume: Path, cfg, objectives: torch.nn.Module) -> None:
    """The checkpoint's objectives (names, and each parameter's name and shape) against the config's."""
    from omegaconf import OmegaConf

    saved_entries = OmegaConf.to_container(OmegaConf.load(resume / CONFIG_FILE)).get("objectives", [])
    saved_names = sorted(e["name"] for e in saved_entries)
    names = sorted(e["name"] for e in cfg.objectives)
    fix = "Resume with the objectives it was trained with (or start a new run.dir, e.g. with train.init_from)."
    if saved_names != names:
        raise ConfigError(f"cannot resume from {resume}: a different objective set (checkpoint {saved_names}, config "
                          f"{names}). {fix}")
    model_config = objectives.model.config
    saved, now = _objective_shapes(saved_entries, model_config), _objective_shapes(cfg.objectives, model_config)
    diffs = sorted(f"objectives.{k}: checkpoint {saved.get(k)} != config {now.get(k)}"
                   for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diffs:
        raise ConfigError(f"cannot resume from {resume}: the objectives' parameters differ ({'; '.join(diffs)}). {fix}")




def saved_weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight checkpoint ``folder`` holds, read from file headers, no tensor loaded:
    ``model.safetensors`` (Accelerate's save) or the ``.metadata`` of a ``torch.distributed.checkpoint``
    folder (every key but the optimiser state's: ``model.*``, ``objectives.*`` and the EMA teacher's ``teacher.*``,
    full unsharded shapes). Empty when it holds neither."""
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    shapes: dict[str, tuple[int, ...]] = {}
    for metadata in sorted(folder.rglob(".metadata")):
        from torch.distributed.checkpoint import FileSystemReader

        for key, meta in FileSystemReader(str(metadata.parent)).read_metadata().state_dict_metadata.items():
            if not key.startswith(f"{OPTIMIZER_KEY}.") and hasattr(meta, "size"):
                shapes[key] = tuple(meta.size)
    return shapes


def check_saved_weights(folder: Path, objectives: torch.nn.Module) -> None:
    """Every saved weight's key and shape against the objective set (:func:`saved_weight_shapes`). A tied
    weight may be saved once: its aliases count as present when one of them is."""
    from vlpretrain.models.weights import WeightMismatch, weight_mismatch

    shapes = saved_weight_shapes(folder)
    if not shapes:
        raise IncompleteCheckpoint(f"cannot resume: checkpoint '{folder}' holds no weights (no model.safetensors "
                                   f"nor a torch.distributed.checkpoint .metadata). Pick a complete checkpoint.")
    saved = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    aliases: dict[int, list[str]] = {}
    for key, value in objectives.state_dict(keep_vars=True).items():
        aliases.setdefault(id(value), []).append(key)
    for keys in aliases.values():
        present = [k for k in keys if k in saved]
        for key in keys if present else []:
            saved.setdefault(key, saved[present[0]])
    missing, unexpected, wrong = weight_mismatch(objectives, saved)
    if missing or unexpected or wrong:
        parts = [f"{what} {', '.join(keys[:8])}" + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise WeightMismatch(f"cannot resume: the weights in '{folder}' do not match the model and objectives of "
                             f"the config: {'; '.join(parts)}. Resume with the config the run was trained with; "
                             f"nothing was loaded or written.")


def check_run_processor(run_dir: Path, resume: Path | None, processor: VLProcessor) -> None:
    """Refuse to replace ``run.dir/processor`` while checkpoints there still point to a different one
    (a resume from another run's checkpoint into this run.dir); and a resume whose image settings or
    context length differ from the processor it was trained with."""
    own = run_dir / RUN_PROCESSOR
    source = checkpoint_processor(resume) if resume is not None else None
    if source is not None:
        trained = VLProcessor.from_pretrained(source)
        saved, now = ({"context_length": p.context_length, "image": p.image_settings.to_dict()}
                      for p in (trained, processor))
        diffs = [f"{k}: trained {saved[k]} != config {v}" for k, v in now.items() if saved[k] != v]
        if diffs:
            raise ConfigError(f"cannot resume from {resume}: the processor differs from the one the run was trained "
                              f"with ({'; '.join(diffs)}; data.mean/std/max_image_pixels, model.image_size/"
                              f"max_text_len). Resume with the same settings, or start a new run.dir.")
    if source is None or not own.is_dir() or own.resolve() == source.resolve() or not complete_checkpoints(run_dir):
        return
    difference = tokenizer_difference(load_tokenizer(own), processor.tokenizer)
    if difference:
        raise ConfigError(f"run.dir '{run_dir}' holds checkpoints trained with another tokenizer than {resume}'s "
                          f"({difference}); resume into a new run.dir.")


def save_run_processor(run_dir: Path, processor: VLProcessor) -> Path:
    """``run.dir/processor`` (the main process, after every check): written aside, then renamed; kept
    as is when it already holds this tokenizer and these settings (a resumed run)."""
    out, tmp = run_dir / RUN_PROCESSOR, run_dir / f".{RUN_PROCESSOR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    processor.save_pretrained(tmp)
    if out.is_dir() and _same_files(out, tmp):
        shutil.rmtree(tmp)
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).is_file())


def seal_legacy_checkpoint(folder: Path, tokenizer_dir: Path) -> Path:
    """Give a checkpoint saved before manifests its run's processor (``tokenizer_dir`` + the settings of its
    config.yaml) and a manifest of the files it holds now. Refuses a checkpoint that already has one."""
    from omegaconf import OmegaConf

    from vlpretrain.config import ExperimentConfig

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        raise ConfigError(f"'{folder}' already has a {MANIFEST}; nothing to seal.")
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"'{folder}' has no {CONFIG_FILE}; pass a run's checkpoints/step_N folder.")
    cfg: ExperimentConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                                                                OmegaConf.load(folder / CONFIG_FILE)))
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer_dir}' has {len(tokenizer)} tokens, the checkpoint's model only "
                          f"{cfg.model.vocab_size}: it is not the tokenizer this checkpoint was trained with.")
    run_dir = folder.parent.parent
    processor_dir = run_dir / RUN_PROCESSOR
    if processor_dir.is_dir():
        difference = tokenizer_difference(load_tokenizer(processor_dir), tokenizer)
        if difference:
            raise ConfigError(f"'{processor_dir}' already holds another tokenizer ({difference}); seal this "
                              f"checkpoint with that one, or move the checkpoint into a run folder of its own.")
    else:
        save_run_processor(run_dir, VLProcessor.from_data_config(cfg.data, cfg.model.image_size,
                                                                 cfg.model.max_text_len, tokenizer))
    write_manifest(folder, processor_dir)
    return folder / MANIFEST


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'vlpretrain.train.integrity'}",
                                description="Seal a checkpoint saved before checkpoints carried a manifest: write "
                                            "its run's processor folder and its manifest.json.")
    p.add_argument("checkpoint", type=Path, help="a run's checkpoints/step_N folder")
    p.add_argument("--tokenizer", type=Path, required=True, help="the tokenizer folder the run was trained with")
    args = p.parse_args(argv)
    try:
        written = seal_legacy_checkpoint(args.checkpoint, args.tokenizer)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"seal: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

