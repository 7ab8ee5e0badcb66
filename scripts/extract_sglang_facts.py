"""Extract, as data, the facts about one SGLang release that our export must satisfy.

SGLang cannot be installed on CPU machines (it pins a CUDA torch), so the export stage
and the CPU tests check a bundle against this small JSON file instead of importing
sglang. The file is written from the release's own source, read as text (``ast``):

* ``model_architectures``: every ``EntryClass`` name under ``sglang/srt/models/`` (what
  ``ModelRegistry`` resolves a config's ``architectures[0]`` to);
* ``dllm_params``: the ``DLLM_PARAMS`` table of ``DllmConfig.from_server_args`` in
  ``sglang/srt/dllm/config.py`` (the only architectures served as dLLMs, their default
  block size and MASK id; non-literal values are kept as source text);
* ``dllm_algorithms``: the ``Algorithm = X`` classes under ``sglang/srt/dllm/algorithm/``;
* ``plugin_groups``: the entry-point group names of ``sglang/srt/plugins/__init__.py``;
* ``methods`` / ``fields``: the methods (with argument names) of the classes the plugin
  hooks or subclasses, and the dataclass fields of the batch objects it reads;
* the release's pins of torch and transformers (from the wheel's METADATA).

Usage (run again, and commit the output, when the pinned version changes)::

    pip download --no-deps sglang==0.5.21 -d /tmp/sglang_src
    cd /tmp/sglang_src && unzip -q sglang-0.5.21-*.whl
    python scripts/extract_sglang_facts.py /tmp/sglang_src \
        -o src/idlm/serving/sglang_facts.json
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

DLLM_CONFIG = "sglang/srt/dllm/config.py"
ALGORITHM_DIR = "sglang/srt/dllm/algorithm"
MODELS_DIR = "sglang/srt/models"
PLUGINS = "sglang/srt/plugins/__init__.py"
# Modules whose classes the plugin hooks or subclasses, and the batch objects it reads.
HOOKED_MODULES = ("sglang/srt/models/sdar.py", "sglang/srt/dllm/mixin/req.py",
                  "sglang/srt/dllm/mixin/scheduler.py", "sglang/srt/dllm/algorithm/base.py",
                  "sglang/srt/plugins/hook_registry.py")
FIELD_CLASSES = {"sglang/srt/model_executor/forward_batch_info.py": "ForwardBatch",
                 "sglang/srt/sampling/sampling_batch_info.py": "SamplingBatchInfo",
                 "sglang/srt/managers/utils.py": "GenerationBatchResult"}


def entry_class_names(source: str) -> list[str]:
    """Names assigned to ``EntryClass`` (a name or a list of names) in a model module."""
    names: list[str] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "EntryClass" for t in node.targets):
            values = node.value.elts if isinstance(node.value, ast.List | ast.Tuple) \
                else [node.value]
            names += [v.id for v in values if isinstance(v, ast.Name)]
    return names


def dllm_params(source: str) -> dict[str, dict[str, Any]]:
    """The ``DLLM_PARAMS = {...}`` literal, values evaluated where they are literals."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "DLLM_PARAMS"
                        for t in node.targets)):
            table: dict[str, dict[str, Any]] = {}
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                table[ast.literal_eval(key)] = {
                    ast.literal_eval(k): _literal_or_source(v, source)
                    for k, v in zip(value.keys, value.values, strict=True)}
            return table
    raise SystemExit(f"DLLM_PARAMS not found in {DLLM_CONFIG}: the dLLM table moved")


def _literal_or_source(node: ast.expr, source: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return {"expression": ast.get_source_segment(source, node)}


def algorithm_names(folder: Path) -> list[str]:
    """Class names exported as ``Algorithm = X`` (the names ``--dllm-algorithm`` takes)."""
    names = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Name)
                    and any(isinstance(t, ast.Name) and t.id == "Algorithm"
                            for t in node.targets)):
                names.append(node.value.id)
    return names


def plugin_groups(source: str) -> dict[str, str]:
    groups = {}
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.endswith("_GROUP")):
            groups[node.targets[0].id] = node.value.value
    return groups


def dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def class_methods(source: str) -> dict[str, dict[str, list[str]]]:
    """``{class: {method: [argument names]}}`` of a module's top-level classes."""
    found: dict[str, dict[str, list[str]]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            found[node.name] = {
                item.name: [a.arg for a in (*item.args.posonlyargs, *item.args.args,
                                            *item.args.kwonlyargs)]
                for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}
    return found


def class_fields(source: str, name: str) -> list[str]:
    """Annotated class-level names (dataclass fields) of class ``name``."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return sorted(item.target.id for item in node.body
                          if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name))
    raise SystemExit(f"class {name} not found: the source layout changed")


def metadata(root: Path) -> tuple[str, dict[str, str]]:
    found = sorted(root.glob("sglang-*.dist-info/METADATA"))
    if not found:
        raise SystemExit(f"no sglang-*.dist-info/METADATA under {root}: unzip the wheel there")
    text = found[-1].read_text()
    version = re.search(r"^Version: (\S+)$", text, re.MULTILINE).group(1)
    pins = dict(re.findall(r"^Requires-Dist: (torch|transformers)==(\S+)$", text,
                           re.MULTILINE))
    return version, pins


def extract(root: Path) -> dict[str, Any]:
    version, pins = metadata(root)
    architectures = sorted({name for path in (root / MODELS_DIR).glob("*.py")
                            for name in entry_class_names(path.read_text())})
    return {
        "sglang_version": version,
        "extracted_by": "scripts/extract_sglang_facts.py",
        "sources": {"dllm_params": DLLM_CONFIG, "dllm_algorithms": ALGORITHM_DIR,
                    "model_architectures": f"{MODELS_DIR}/*.py (EntryClass)",
                    "plugin_groups": PLUGINS},
        "pins": pins,
        "dllm_params": dllm_params((root / DLLM_CONFIG).read_text()),
        "dllm_algorithms": algorithm_names(root / ALGORITHM_DIR),
        "plugin_groups": plugin_groups((root / PLUGINS).read_text()),
        "model_architectures": architectures,
        "methods": {dotted(path): class_methods((root / path).read_text())
                    for path in HOOKED_MODULES},
        "fields": {f"{dotted(path)}.{name}": class_fields((root / path).read_text(), name)
                   for path, name in FIELD_CLASSES.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding the unzipped sglang wheel")
    parser.add_argument("-o", "--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if not (args.root / DLLM_CONFIG).is_file():
        print(f"error: {args.root / DLLM_CONFIG} not found: unzip an sglang wheel with "
              "sglang/srt/dllm/ (0.5.20 or newer) there", file=sys.stderr)
        return 2
    text = json.dumps(extract(args.root), indent=1, sort_keys=True) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
