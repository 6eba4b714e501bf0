"""What each entry point imports, read from ``sys.modules`` of a fresh interpreter: the model stands
alone (no trainer, objectives or OmegaConf behind it), and ``import vlpretrain`` / ``vlpretrain --help``
load nothing heavy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_helpers import run_python

import vlpretrain
from vlpretrain.cli import COMMANDS, build_parser

PACKAGE = Path(vlpretrain.__file__).parent
# (accelerate is not listed: transformers' PreTrainedModel imports it)
TRAINER_SIDE = ("vlpretrain.objectives", "vlpretrain.train", "vlpretrain.data", "vlpretrain.eval", "vlpretrain.export",
                "vlpretrain.config", "omegaconf", "timm")


def _loaded_after(code: str) -> list[str]:
    """Names in sys.modules after running ``code`` in a fresh interpreter."""
    out = run_python(code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules(folder: str) -> list[str]:
    return sorted(f"vlpretrain.{folder}.{p.stem}" for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__")


def test_the_model_and_its_layers_import_nothing_from_the_trainer():
    models = _modules("models") + _modules("layers")
    assert "vlpretrain.models.modeling" in models and "vlpretrain.layers.mlp" in models
    loaded = _loaded_after("from vlpretrain import VLModel\n"  # registered with the auto classes on the way
                           "from transformers import AutoConfig\n"
                           "assert type(AutoConfig.for_model('vlpretrain')) is VLModel.config_class\n"
                           + "\n".join(f"import {m}" for m in models))
    assert set(models) <= set(loaded)
    assert [m for m in loaded if m.startswith(TRAINER_SIDE)] == []


def test_import_vlpretrain_loads_neither_torch_nor_omegaconf_until_a_class_is_used():
    loaded = _loaded_after("import vlpretrain")
    assert [m for m in loaded if m.startswith(("torch", "omegaconf", "transformers", "vlpretrain."))] == []


def test_help_lists_every_command_without_importing_them():
    code = ("import contextlib, io\nfrom vlpretrain.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
            "print(json.dumps(buf.getvalue()))\nimport json")
    out = run_python("import json\n" + code + "\nimport sys\nprint(json.dumps(sorted(sys.modules)))")
    assert out.returncode == 0, out.stderr
    help_text, loaded = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert all(name in help_text for name in [*COMMANDS, "config", "train"])
    assert [m for m in loaded if m.startswith(("torch", "omegaconf", "transformers", "PIL"))] == []


def test_the_listed_summaries_are_the_commands_own():
    """COMMANDS' one-liners (shown by --help) match the help each module's add_cli gives its command."""
    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    own = {action.dest: action.help for action in sub._choices_actions}
    assert {name: summary for name, (_, summary) in COMMANDS.items()} == {name: own[name] for name in COMMANDS}
