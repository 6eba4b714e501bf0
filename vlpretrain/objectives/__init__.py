"""Objectives: plug-ins that turn a batch into a loss, and the registry that names them.

The ``objectives`` section of an experiment is a list of entries, each ``name`` + ``weight`` + the
keys of that objective's own config dataclass::

    objectives:
      - {name: contrastive, weight: 1.0, loss: siglip}
      - {name: captioning, weight: 2.0}

Third-party code registers its own the same way the built-ins do::

    from vlpretrain.objectives import Objective, ObjectiveConfig, ObjectiveOutput, register_objective

    @register_objective("my_loss")
    class MyLoss(Objective):
        Config = MyLossConfig          # a dataclass deriving from ObjectiveConfig
        def forward(self, model, batch, shared) -> ObjectiveOutput: ...

and then names it in YAML once its module is imported. ``build_objective_set(model, entries)``
returns the :class:`ObjectiveSet` a trainer optimises.
"""

from vlpretrain.objectives.base import (
    NEEDS,
    CoupledObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    SharedFeatures,
)
from vlpretrain.objectives.combine import GradCache, ObjectiveSet, ObjectiveSetOutput
from vlpretrain.objectives.registry import (
    available_objectives,
    build_objective_set,
    build_objectives,
    objective_class,
    parse_objective_entry,
    register_objective,
    validate_objective_entries,
)

# the built-in objectives register themselves on import
from vlpretrain.objectives import (  # noqa: F401
    captioning, contrastive, masked_image, masked_prediction, masked_text, matching, self_distillation)

__all__ = [
    "NEEDS", "CoupledObjective", "GradCache", "Objective", "ObjectiveConfig", "ObjectiveOutput", "ObjectiveSet",
    "ObjectiveSetOutput", "SharedFeatures", "available_objectives", "build_objective_set", "build_objectives",
    "objective_class", "parse_objective_entry", "register_objective", "validate_objective_entries",
]
