"""YAML topologies: load a file into the configuration model, with file and line in errors.

PyYAML's ``compose`` gives a node tree whose nodes carry their position; we walk it to
build the plain data *and* a map from each value's path to its line, so that
:class:`~pyswitch.config.ConfigError` can say ``topo.yaml:12: bridges.br0.ports.h1.tag:
5000 is out of range``.  The walk also refuses duplicate keys, which ``yaml.safe_load``
would silently merge.  Only the YAML core types are accepted (no Python tags).  A
document may expand to at most ``MAX_VALUES`` values (aliases can make a few lines
expand to billions) and may not nest deeper than Python's recursion limit: such input
gets a ConfigError at once instead of minutes of work or a traceback.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path as FsPath
from typing import Any

import yaml

from .config import ConfigError, Path, SwitchConfig, parse_config

DEFAULT_TOPOLOGY = "default_topology.yaml"
MAX_VALUES = 200_000  # values in one document, after aliases are expanded


def _construct(node: yaml.Node, path: Path, marks: dict[Path, tuple[int, int]]) -> Any:
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if len(marks) > MAX_VALUES:
        raise ConfigError((), f"the document expands to more than {MAX_VALUES} values "
                              "(YAML aliases?)", line=node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = _scalar(knode)
            if key in out:
                raise ConfigError(path + (str(key),), "duplicate key",
                                  line=knode.start_mark.line + 1)
            out[key] = _construct(vnode, path + (str(key),), marks)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), marks) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError((), "mapping keys must be scalars", line=node.start_mark.line + 1)
    # The safe loader's constructors give YAML core types (int, bool, float, str, null)
    # and refuse Python-specific tags.
    return _SAFE.construct_object(node, deep=True)


_SAFE = yaml.SafeLoader("")


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path, tuple[int, int]]]:
    """Parse YAML text into plain data and the marks of every path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise ConfigError((), f"not valid YAML: {exc.problem}", source, line) from None
    except yaml.YAMLError as exc:
        raise ConfigError((), f"not valid YAML: {' '.join(str(exc).split())}", source) from None
    except RecursionError:
        raise ConfigError((), "not valid YAML: nested too deeply", source) from None
    marks: dict[Path, tuple[int, int]] = {}
    if node is None:
        return {}, marks
    try:
        data = _construct(node, (), marks)
    except ConfigError as exc:
        raise ConfigError(exc.path, exc.message, source, exc.line) from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of > 4300 digits
        raise ConfigError((), f"not valid YAML: {' '.join(str(exc).split())}", source) from None
    except RecursionError:
        raise ConfigError((), "not valid YAML: nested too deeply", source) from None
    return data, marks


def load_topology_text(text: str, source: str) -> SwitchConfig:
    """Validate a YAML topology; ConfigError with file and line on any problem."""
    return _validated(text, source)[0]


def _validated(text: str, source: str) -> tuple[SwitchConfig, Any]:
    data, marks = load_yaml(text, source)
    try:
        return parse_config(data), data
    except ConfigError as exc:
        raise exc.located(source, marks) from None


def load_topology(path: str | FsPath) -> SwitchConfig:
    return load_topology_data(path)[0]


def load_topology_data(path: str | FsPath) -> tuple[SwitchConfig, Any]:
    """The validated configuration of a YAML file and the plain data as written (which
    ``apply`` sends: ports keep their running numbers unless the file asks for others)."""
    p = FsPath(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError((), f"cannot read: {exc.strerror}", str(p)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError((), f"not UTF-8 text: {exc}", str(p)) from None
    return _validated(text, str(p))


def default_topology_text() -> str:
    """The embedded default topology that ``pyswitch up`` runs without a file."""
    return resources.files("pyswitch").joinpath(DEFAULT_TOPOLOGY).read_text()


def dump_topology(cfg: SwitchConfig) -> str:
    """The configuration as YAML that :func:`load_topology_text` accepts unchanged."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
