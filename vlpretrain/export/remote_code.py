"""The modelling code of an ``hf`` export, generated from vlpretrain's own source files.

``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` imports ``modeling_vlpretrain.py`` from the
folder, and transformers copies every file it reaches through relative imports (``from .x import``).
So each source module the model and processor need is written as one flat file, its
``from vlpretrain.a.b import`` lines rewritten to ``from .<flat name> import``. Modules that also hold
training-only code (``tokenizer.py``) contribute only the named definitions, with just
the imports those definitions use. Nothing is hand-copied: a change to the model is exported as is.
An import of a vlpretrain module that is not part of the export is an error at export time.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path

# (file written into the export, source module, top-level names taken from it; None: the whole module)
REMOTE_MODULES: list[tuple[str, str, tuple[str, ...] | None]] = [
    ("vl_errors.py", "vlpretrain.errors", None),
    ("vl_config.py", "vlpretrain.models.config", None),
    ("vl_attention.py", "vlpretrain.layers.attention", None),
    ("vl_mlp.py", "vlpretrain.layers.mlp", None),
    ("vl_draws.py", "vlpretrain.layers.draws", None),
    ("vl_losses.py", "vlpretrain.models.losses", None),
    ("vl_heads.py", "vlpretrain.models.heads", None),
    ("vl_backbone.py", "vlpretrain.models.backbone", None),
    ("vl_generation.py", "vlpretrain.models.generation", None),
    ("modeling_vlpretrain.py", "vlpretrain.models.modeling", None),
    ("vl_images.py", "vlpretrain.data.images", None),
    ("vl_tokenizer.py", "vlpretrain.data.tokenizer", ("SPECIAL_TOKENS", "SPECIAL_IDS", "load_tokenizer",
                                                      "encode_captions")),
    ("image_processing_vlpretrain.py", "vlpretrain.data.image_processor", None),
    ("processing_vlpretrain.py", "vlpretrain.data.processor", None),
]
# the auto classes (and so the pipelines: image-text-to-text, image-feature-extraction) that load the export
AUTO_MAP = {"AutoConfig": "modeling_vlpretrain.VLConfig", "AutoModel": "modeling_vlpretrain.VLModel",
            "AutoModelForImageTextToText": "modeling_vlpretrain.VLModel",
            "AutoProcessor": "processing_vlpretrain.VLProcessor",
            "AutoImageProcessor": "image_processing_vlpretrain.VLImageProcessor"}
_FLAT_NAME = {module: file[:-3] for file, module, _ in REMOTE_MODULES}
_IMPORT = re.compile(r"^(\s*)from (vlpretrain(?:\.\w+)*) import ", re.MULTILINE)


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def _segment(lines: list[str], node: ast.stmt) -> str:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[first - 1:node.end_lineno])


def select_source(source: str, names: tuple[str, ...]) -> str:
    """The module docstring, ``from __future__`` imports, the top-level definitions called ``names``
    and the top-level imports they use, in their original order."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    wanted = [n for n in tree.body if _bound_names(n) & set(names)]
    found = set().union(*(_bound_names(n) for n in wanted))
    if found != set(names):
        raise RuntimeError(f"remote code: {sorted(set(names) - found)} not found at the top level of the module.")
    used = {n.id for node in wanted for n in ast.walk(node) if isinstance(n, ast.Name)}
    used |= {n.value.id for node in wanted for n in ast.walk(node)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    parts = []
    for node in tree.body:
        is_doc = node is tree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        is_used_import = isinstance(node, (ast.Import, ast.ImportFrom)) and _bound_names(node) & used
        if is_doc or is_future or is_used_import or node in wanted:
            parts.append(_segment(lines, node))
    return "\n\n".join(parts) + "\n"


def rewrite_imports(source: str, origin: str) -> str:
    """``from vlpretrain.x.y import`` -> ``from .<flat name> import``; other vlpretrain imports are errors."""

    def replace(match: re.Match) -> str:
        module = match.group(2)
        if module not in _FLAT_NAME:
            raise RuntimeError(f"remote code: {origin} imports {module}, which is not part of the export; add it "
                               "to REMOTE_MODULES in vlpretrain/export/remote_code.py or drop the import.")
        return f"{match.group(1)}from .{_FLAT_NAME[module]} import "

    out = _IMPORT.sub(replace, source)
    leftover = re.search(r"^\s*import vlpretrain\b", out, re.MULTILINE)
    if leftover:
        raise RuntimeError(f"remote code: {origin} has `{leftover.group(0).strip()}`; use `from vlpretrain.x import`.")
    return out


def map_processor_to_remote_code(out_dir: str | Path) -> None:
    """Name the remote classes in ``processor_config.json`` (top level and its nested image processor):
    ``AutoProcessor`` / ``AutoImageProcessor`` read ``auto_map`` there, not in ``config.json``, once the
    file names a ``processor_class`` / ``image_processor_type``."""
    path = Path(out_dir) / "processor_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
    config["image_processor"]["auto_map"] = {"AutoImageProcessor": AUTO_MAP["AutoImageProcessor"]}
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_remote_code(out_dir: str | Path) -> list[Path]:
    """Write the modelling and processing files into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    written = []
    for file, module, names in REMOTE_MODULES:
        source_file = Path(inspect.getfile(importlib.import_module(module)))
        source = source_file.read_text()
        if names is not None:
            source = select_source(source, names)
        header = (f"# Generated from vlpretrain's {module.replace('.', '/')}.py by `vlpretrain export --format hf`;"
                  " edit the source, not this copy.\n")
        (out_dir / file).write_text(header + rewrite_imports(source, module))
        written.append(out_dir / file)
    return written
