"""The objective registry: names -> :class:`Objective` classes, and YAML entries -> built objectives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlpretrain.errors import ConfigError, closest_hint
from vlpretrain.objectives.base import Objective, ObjectiveConfig
from vlpretrain.objectives.combine import ObjectiveSet

_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an :class:`Objective` subclass available under ``name``."""

    def add(cls: type[Objective]) -> type[Objective]:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"@register_objective('{name}') decorates {cls!r}, which is not an Objective subclass.")
        if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, ObjectiveConfig)):
            raise TypeError(f"objective '{name}': Config must be a dataclass deriving from ObjectiveConfig.")
        known = _REGISTRY.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"objective name '{name}' is already registered by {known.__module__}."
                             f"{known.__qualname__}; register {cls.__qualname__} under another name.")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_objectives() -> list[str]:
    """Registered objective names, sorted."""
    return sorted(_REGISTRY)


def objective_class(name: str) -> type[Objective]:
    """The class registered under ``name``, or a ConfigError listing the valid names."""
    if name not in _REGISTRY:
        hint = closest_hint(str(name), list(_REGISTRY)).replace("Valid keys", "Valid objectives")
        raise ConfigError(f"unknown objective '{name}'.{hint} Registered: {', '.join(available_objectives())}.")
    return _REGISTRY[name]


def parse_objective_entry(entry: Mapping[str, Any], where: str = "objectives[0]"
                          ) -> tuple[type[Objective], ObjectiveConfig]:
    """Validate one YAML entry against its objective's config dataclass: (class, config)."""
    if not isinstance(entry, Mapping) or "name" not in entry:
        raise ConfigError(f"{where}: each objective entry is a mapping with a 'name' key, e.g. "
                          f"{{name: contrastive, weight: 1.0}}; got {entry!r}.")
    keys = {k: v for k, v in dict(entry).items() if k != "name"}
    try:
        cls = objective_class(entry["name"])
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    where = f"{where} ({cls.name})"
    names = [f.name for f in dataclasses.fields(cls.Config)]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls.Config), OmegaConf.create(keys))
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        key = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "")
        raise ConfigError(f"{where}: unknown key '{key}'.{closest_hint(key, names + ['name'])}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{where}: invalid value for '{key}': {str(exc).splitlines()[0]}") from None
    cfg.validate(where)
    return cls, cfg


def validate_objective_entries(entries: Sequence[Mapping[str, Any]]) -> None:
    """Check a whole ``objectives`` list (names, keys, values, no duplicates) without building anything."""
    if not entries:
        raise ConfigError("objectives: the list is empty; configure at least one, e.g. {name: contrastive}.")
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        cls, _ = parse_objective_entry(entry, f"objectives[{i}]")
        if cls.name in seen:
            raise ConfigError(f"objectives[{i}]: '{cls.name}' is already configured at objectives[{seen[cls.name]}]; "
                              f"keep one entry per objective.")
        seen[cls.name] = i


def build_objectives(entries: Sequence[Mapping[str, Any]], model_config: Any) -> list[Objective]:
    """The objectives of a YAML ``objectives`` list, for a model with architecture ``model_config``."""
    validate_objective_entries(entries)
    built = []
    for i, entry in enumerate(entries):
        cls, cfg = parse_objective_entry(entry, f"objectives[{i}]")
        built.append(cls(cfg, model_config))
    return built


def build_objective_set(model: Any, entries: Sequence[Mapping[str, Any]], total_steps: int | None = None,
                        teacher: Any = None) -> ObjectiveSet:
    """The :class:`ObjectiveSet` (model + configured objectives) a trainer optimises; ``total_steps``
    (train.steps) resolves fractional starts, ``teacher`` (a TeacherConfig) configures the EMA teacher."""
    return ObjectiveSet(model, build_objectives(entries, model.config), total_steps, teacher)
