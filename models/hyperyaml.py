"""Safe reader for the HyperPyYAML `config.yaml` shipped with the GLM-4-Voice decoder.

The official file instantiates Python classes through tags (`!new:module.Class`,
`!name:module.fn`, `!apply:module.fn`) and cross-references values with `!ref <key>`.
Executing it would import and run arbitrary code, so this reader only turns the tags into
plain data:

* `!new:` / `!name:` / `!apply:` become a `HyperNode` that records the tag kind, the dotted
  target name and the arguments (a mapping becomes `kwargs`, a sequence becomes `args`).
* `!ref <key>` (optionally `<key.sub>`) is replaced by the referenced value once the whole
  document is loaded. Arithmetic inside `!ref` is rejected: the official file has none.

Nothing named in the file is ever imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["HyperNode", "HyperYamlError", "load_hyperyaml", "parse_hyperyaml"]

_REF_PATTERN = re.compile(r"^<([A-Za-z_][\w.]*)>$")
# YAML 1.1 (PyYAML) reads `1e-06` as a string; HyperPyYAML (ruamel, YAML 1.2) reads a float.
_FLOAT_PATTERN = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class HyperYamlError(ValueError):
    """The document uses a HyperPyYAML feature this reader does not accept."""


@dataclass(frozen=True)
class HyperNode:
    """A tagged node: `kind` is "new", "name" or "apply"; `target` the dotted class/function."""

    kind: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class _Ref:
    path: str


class _SafeHyperLoader(yaml.SafeLoader):
    """SafeLoader plus data-only constructors for the HyperPyYAML tags."""


def _construct_tagged(loader: _SafeHyperLoader, tag_suffix: str, node: yaml.Node, kind: str):
    if isinstance(node, yaml.MappingNode):
        return HyperNode(kind, tag_suffix, kwargs=loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return HyperNode(kind, tag_suffix, args=loader.construct_sequence(node, deep=True))
    value = loader.construct_scalar(node)
    return HyperNode(kind, tag_suffix, args=[] if value in ("", None) else [value])


def _construct_ref(loader: _SafeHyperLoader, node: yaml.Node) -> _Ref:
    text = str(loader.construct_scalar(node)).strip()
    match = _REF_PATTERN.match(text)
    if match is None:
        raise HyperYamlError(f"unsupported !ref expression {text!r} (only '<key>' is accepted)")
    return _Ref(match.group(1))


for _kind in ("new", "name", "apply"):
    _SafeHyperLoader.add_multi_constructor(
        f"!{_kind}:",
        lambda loader, suffix, node, kind=_kind: _construct_tagged(loader, suffix, node, kind),
    )
_SafeHyperLoader.add_constructor("!ref", _construct_ref)
_SafeHyperLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _FLOAT_PATTERN, list("-+0123456789.")
)


def _lookup(root: dict[str, Any], path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        if isinstance(value, HyperNode):
            value = value.kwargs
        if not isinstance(value, dict) or part not in value:
            raise HyperYamlError(f"!ref <{path}> names no key in the document")
        value = value[part]
    return value


def _resolve(value: Any, root: dict[str, Any], depth: int = 0) -> Any:
    if depth > 32:
        raise HyperYamlError("!ref chain too deep (cycle?)")
    if isinstance(value, _Ref):
        return _resolve(_lookup(root, value.path), root, depth + 1)
    if isinstance(value, HyperNode):
        return HyperNode(
            value.kind,
            value.target,
            kwargs={k: _resolve(v, root, depth) for k, v in value.kwargs.items()},
            args=[_resolve(v, root, depth) for v in value.args],
        )
    if isinstance(value, dict):
        return {k: _resolve(v, root, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, depth) for v in value]
    return value


def parse_hyperyaml(text: str) -> dict[str, Any]:
    """Parse HyperPyYAML text into plain data (dicts, lists, scalars, `HyperNode`s)."""
    data = yaml.load(text, Loader=_SafeHyperLoader)  # noqa: S506 - loader is a SafeLoader subclass
    if not isinstance(data, dict):
        raise HyperYamlError("top level of a HyperPyYAML config must be a mapping")
    return _resolve(data, data)


def load_hyperyaml(path: str | Path) -> dict[str, Any]:
    """Read and parse a HyperPyYAML file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return parse_hyperyaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, HyperYamlError) as exc:
        raise HyperYamlError(f"{path}: {exc}") from exc
