"""FSDP2 under the trainer: ``fully_shard`` on an explicit device mesh, the same path on CPUs and GPUs.

Many processes: FSDP2
- The accelerate config decides: ``distributed_type: FSDP`` with ``fsdp_config.fsdp_version: 2``
  (configs/accelerate/fsdp-cpu-2.yaml, fsdp-8gpu.yaml). ``accelerate launch`` then starts the
  processes (torchrun) and passes ``ACCELERATE_USE_FSDP=true`` and ``FSDP_*`` settings in the
  environment; :func:`fsdp_from_launcher` reads them.
- What Accelerate 1.16 does with them: on GPUs its state becomes ``DistributedType.FSDP`` and
  ``prepare`` would shard the model (read in accelerate/state.py; no GPU ran it here). Under
  ``MULTI_CPU`` (``ACCELERATE_USE_CPU=true``, gloo) it ignores the FSDP plugin and wraps the model in
  DDP: its state switches to FSDP for MULTI_GPU/NPU/XPU/... only (checked with a 2-process launch of
  ``distributed_type: FSDP, use_cpu: true``: ``DistributedType.MULTI_CPU``
  and a ``DistributedDataParallel`` module). So that CPUs and GPUs run one code path, the trainer takes
  the FSDP request out of the environment before creating its Accelerator (whose state is then the
  plain MULTI_GPU / MULTI_CPU one, used for the process group, autocast, reductions and gradient-norm
  clipping) and shards here: :func:`shard` calls ``fully_shard`` on every module whose class is named in
  ``fsdp_transformer_layer_cls_to_wrap`` (default ``Block``: the backbone's blocks, and the MAE
  decoder's timm blocks; the EMA teacher's backbone is a copy of the student's, so its blocks too), then
  on the modules the ObjectiveSet names (``shard_units()``: the teacher's backbone and heads, so that
  the teacher's remaining weights are gathered only while it runs, not with the root's from step 0),
  then on the root (the ObjectiveSet: embeddings, heads, objective parameters such as the 1-element
  logit scale), over ``init_device_mesh(device.type, (world,))`` (gloo on CPU,
  NCCL on GPU). The model is not passed to ``accelerator.prepare``; the optimiser (built on the
  sharded DTensor parameters) and scheduler are.
- On a CPU ``accelerate launch`` needs ``ACCELERATE_USE_CPU=true`` to start a process group at all
  (without it each process believes it is alone); ``vlpretrain train --accelerate-config FILE`` sets it
  when the file says ``use_cpu: true``, and :func:`check_world` refuses a launch whose processes do not
  see each other.
- Numerics: parameters stay fp32 and sharded; ``train.precision=bf16`` is autocast around forward and
  backward as without FSDP (no FSDP ``MixedPrecisionPolicy``), so FSDP changes no rounding point
  (fp16 is refused: its loss scaler decides per process).
  Gradients are reduce-scattered as means (as DDP averages). Accelerate's ``clip_grad_norm_`` takes
  the total norm across shards (DTensor-aware), fused AdamW's ``found_inf`` skip works on DTensors,
  exact accumulation turns gradient sync off with ``set_requires_gradient_sync(False)`` and unshards
  the root for the coupled loss it computes outside the forward (:mod:`vlpretrain.train.accumulate`).
- Checkpoint format under FSDP: ``step_N/sharded/`` is a ``torch.distributed.checkpoint`` folder
  (``.metadata`` + one ``__R_0.distcp`` per rank) whose tensor keys are ``ObjectiveSet.state_dict()``
  names (``model.<VLModel key>``, ``objectives.<name>.<param>``) and ``optimizer.*`` for the optimiser
  state (keyed by the same names); ``scheduler.bin`` and ``rng_state_rank<R>.json`` sit beside it.
  DCP reshards on load, so a run saved with N processes resumes with M, under FSDP or without it (a
  plain single process, or DDP, loads the full tensors). :func:`read_sharded_weights` consolidates the
  weights in one process without a process group (export, eval, ``train.init_from``). A checkpoint saved
  without FSDP (Accelerate's ``model.safetensors``, ``optimizer.bin``) resumes under FSDP too:
  :func:`load_unsharded` gives every rank the full tensors, of which it keeps its shard.
- Measured (tests/test_fsdp.py, 2 CPU processes, debug model, 4 steps, fp32): FSDP2 with 2 micro-batches
  per rank vs one process on the doubled batch, losses equal to 1e-5 and weights to 8.5e-7; FSDP2 vs DDP
  with the same random draws (MAE masks), weights to 2.8e-7. Not run here: torch.compile over the
  sharded module, and NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlpretrain.config import ConfigError

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint
OPTIMIZER_KEY = "optimizer"  # DCP keys of the optimiser state start with this (weights never do)
_TRUE = ("true", "1", "yes")


@dataclass
class FsdpSettings:
    """What the accelerate config's ``fsdp_config`` asks for, as far as this path honours it."""

    reshard_after_forward: bool = True
    wrap: tuple[str, ...] = ("Block",)  # class names sharded as units of their own, before the root


def fsdp_from_launcher(precision: str = "no") -> FsdpSettings | None:
    """The FSDP settings ``accelerate launch`` passed (``distributed_type: FSDP``), or None.
    ``precision``: the run's ``train.precision`` (fp16's loss scaling is not supported under FSDP).

    Takes the request out of the environment, so the Accelerator created next keeps the plain
    multi-process state on GPUs as on CPUs and :func:`shard` applies FSDP2 (one code path). Settings
    this path does not implement are refused with the fix, before anything is written."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() not in _TRUE:
        return None
    where = "the accelerate config's fsdp_config"
    if precision == "fp16":  # torch's GradScaler decides a step's skip per rank: shards could diverge
        raise ConfigError("train.precision=fp16 is not supported under FSDP (its loss scaler skips steps per "
                          "process); use train.precision=bf16, which needs no loss scaling.")
    if env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(f"{where} asks for FSDP version {env.get('FSDP_VERSION', '1')}; vlpretrain trains with FSDP2 "
                          f"only: set fsdp_version: 2 (see configs/accelerate/fsdp-8gpu.yaml).")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in ("true", "false"):
        raise ConfigError(f"{where}: fsdp_reshard_after_forward={reshard!r} is an FSDP1 sharding strategy; FSDP2 takes "
                          f"true (free gathered blocks after their forward) or false.")
    refused = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params: true (CPU offload) is not supported; set it to false",
               "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing: true is not how vlpretrain "
                                                "checkpoints activations; set it to false and use "
                                                "train.grad_checkpointing=true"}
    for name, why in refused.items():
        if env.get(name, "false").lower() in _TRUE:
            raise ConfigError(f"{where}: {why}.")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ConfigError(f"{where}: fsdp_auto_wrap_policy={policy} is not supported; use TRANSFORMER_BASED_WRAP "
                          f"with fsdp_transformer_layer_cls_to_wrap: Block (or NO_WRAP: one unit for everything).")
    if env.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT") != "SHARDED_STATE_DICT":
        raise ConfigError(f"{where}: fsdp_state_dict_type={env['FSDP_STATE_DICT_TYPE']}; checkpoints under FSDP are "
                          f"always sharded (torch.distributed.checkpoint): set SHARDED_STATE_DICT. `vlpretrain export` "
                          f"consolidates them.")
    wrap = tuple(n.strip() for n in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "Block").split(",") if n.strip())
    env["ACCELERATE_USE_FSDP"] = "false"  # Accelerate's state stays MULTI_GPU / MULTI_CPU: we shard
    return FsdpSettings(reshard_after_forward=reshard == "true", wrap=() if policy == "NO_WRAP" else wrap)


def check_world(accelerator) -> None:
    """A clear error when the launcher started several processes that do not form one process group
    (``accelerate launch`` on a CPU without ``ACCELERATE_USE_CPU=true``: each process trains alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"the launcher started {launched} processes, but this one sees {accelerator.num_processes}: "
                          f"they do not form one process group. On CPUs set ACCELERATE_USE_CPU=true (vlpretrain train "
                          f"--accelerate-config sets it when the file says use_cpu: true).")


def shard(module: nn.Module, device: torch.device, settings: FsdpSettings) -> nn.Module:
    """``fully_shard`` every sub-module whose class is named in ``settings.wrap``, then ``module`` itself,
    over a 1-D mesh of every process on ``device``'s type. ``module`` is sharded in place (its
    parameters become DTensors) and returned."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1 and not dist.is_initialized():
        raise ConfigError("FSDP was requested but no process group exists; start the run with accelerate launch "
                          "(vlpretrain train --accelerate-config configs/accelerate/fsdp-cpu-2.yaml).")
    mesh = init_device_mesh(device.type, (world,))  # explicit: the default mesh takes the accelerator's type
    module.to(device)
    units = [m for m in module.modules() if m is not module and type(m).__name__ in settings.wrap]
    if settings.wrap:  # the module's own units (the EMA teacher's backbone and heads), after the blocks inside them
        units += [m for m in getattr(module, "shard_units", list)() if m not in units]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    return module


def fsdp_root(module: Any):
    """The FSDP2 root inside ``module`` (itself, or under a torch.compile wrapper), or None."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(module, "_orig_mod", module)
    return inner if isinstance(inner, FSDPModule) else None


def is_sharded(module: Any) -> bool:
    return fsdp_root(module) is not None


def describe(module: Any, accelerator) -> dict[str, Any]:
    """For summary.json: how the run was distributed, and how many parameters were DTensors."""
    from torch.distributed.tensor import DTensor

    params = list(getattr(module, "_orig_mod", module).parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    return {"sharding": "fsdp2" if is_sharded(module) else "none", "accelerate": str(accelerator.distributed_type),
            "parameters": len(params), "dtensor_parameters": sharded}


@contextlib.contextmanager
def gradient_sync_off(module: Any):
    """FSDP2's ``no_sync``: gradients accumulate unsharded on each rank, reduce-scattered by the next
    backward run with sync on."""
    root = fsdp_root(module)
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


@contextlib.contextmanager
def full_root_parameters(module: Any):
    """The root's parameters gathered (plain tensors) for code run outside the forward, e.g. a coupled
    loss over cached embeddings that reads the logit scale; resharded afterwards. Sub-units (blocks)
    stay sharded. A no-op when ``module`` is not sharded."""
    root = fsdp_root(module)
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def gather_full_state(module: Any, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU of rank 0 (empty elsewhere), or with ``every_rank`` on
    every rank's device. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    return get_model_state_dict(fsdp_root(module), options=options)


# ----------------------------------------------------------------------------------------------
# checkpoints (torch.distributed.checkpoint)


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()


def save_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimiser into ``folder/sharded`` (every rank writes its shards; collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(module, optimizer)
    dcp.save({**weights, OPTIMIZER_KEY: optim}, checkpoint_id=str(folder / SHARDED_DIR))


def load_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimiser from ``folder/sharded``, resharded to ``module``'s layout (FSDP2 over any number
    of processes, or a plain module: full tensors). Every weight key must match: a :class:`WeightMismatch`
    names the missing, unexpected and wrong-shape keys before anything is loaded."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(module, optimizer)
    check_sharded_weights(folder, {k: tuple(v.shape) for k, v in weights.items()}, f"checkpoint '{folder}'")
    state = {**weights, OPTIMIZER_KEY: optim}
    alone = not (dist.is_available() and dist.is_initialized())  # a plain single process reads every shard
    dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR), no_dist=alone)
    set_state_dict(module, optimizer, model_state_dict=weights, optim_state_dict=state[OPTIMIZER_KEY])


def _weight_metadata(folder: Path) -> dict[str, Any]:
    """Key -> tensor metadata (global shape, dtype) of the weights (not the optimiser) in ``folder/sharded``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(Path(folder) / SHARDED_DIR)).read_metadata().state_dict_metadata
    return {k: v for k, v in meta.items()
            if isinstance(v, TensorStorageMetadata) and not k.startswith(f"{OPTIMIZER_KEY}.")}


def check_sharded_weights(folder: Path, expected: dict[str, tuple], source: str) -> None:
    """A :class:`WeightMismatch` naming every key of ``expected`` (name -> shape) that the sharded
    checkpoint lacks or holds in another shape, and every weight it holds beyond them."""
    check_weight_keys({k: tuple(v.size) for k, v in _weight_metadata(folder).items()}, expected, source)


def check_weight_keys(saved: dict[str, tuple], expected: dict[str, tuple], source: str) -> None:
    """A :class:`WeightMismatch` naming the missing, unexpected and wrong-shape keys of ``saved``
    (name -> shape) against ``expected``."""
    from vlpretrain.models.weights import WeightMismatch, _named

    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(f"{k} (saved {saved[k]}, model {expected[k]})" for k in expected if k in saved and saved[k] != expected[k])
    if missing or unexpected or shapes:
        parts = [f"missing {_named(missing)}" if missing else "", f"unexpected {_named(unexpected)}" if unexpected else "",
                 f"wrong shape {_named(shapes)}" if shapes else ""]
        raise WeightMismatch(f"the weights of {source} do not match the model and objectives they are loaded "
                             f"into: {'; '.join(p for p in parts if p)}. Resume with the config the run was trained "
                             f"with; nothing was loaded.")


def load_unsharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint saved without FSDP (Accelerate's ``model.safetensors`` and ``optimizer.bin``) into a
    sharded ``module`` and its optimiser: every rank reads the full tensors and keeps its shard. Weights
    a save left out because they are tied (the ``lm_head``) are taken from the weight they are tied to."""
    from accelerate.utils import load as accelerate_load  # torch.load(weights_only=True), numpy allowed
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    weights = load_file(str(folder / "model.safetensors"))
    for names in _tied_names(module):
        present = [n for n in names if n in weights]
        for name in names if present else ():
            weights.setdefault(name, weights[present[0]])
    check_weight_keys({k: tuple(v.shape) for k, v in weights.items()},
                      {k: tuple(v.shape) for k, v in fsdp_root(module).state_dict().items()}, f"checkpoint '{folder}'")
    saved = accelerate_load(folder / "optimizer.bin", map_location="cpu")
    name_of = {id(p): n for n, p in module.named_parameters()}
    order = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]  # the optimiser's indices
    if sum(len(g["params"]) for g in saved["param_groups"]) != len(order):
        raise ConfigError(f"{folder}/optimizer.bin holds {sum(len(g['params']) for g in saved['param_groups'])} "
                          f"parameters, this run's optimiser {len(order)}: resume with the config it was trained with.")
    optim = {"state": {order[i]: state for i, state in saved["state"].items()},
             "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(module, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True))


def _tied_names(module: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one parameter (e.g. the lm_head tied to the text embedding)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def read_sharded_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The full weights (no optimiser state) of a sharded checkpoint as CPU tensors, consolidated in this
    one process: no process group, no GPU (DCP reads every rank's file and reassembles each tensor)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in _weight_metadata(folder).items()}
    with warnings.catch_warnings():  # "no process group: loading in this process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR), no_dist=True)
    return state
