"""YAML read with bounds: the queue file and the home's config.yaml.

``yaml.safe_load`` builds no objects of the file's choosing, but it still takes a
file's word for everything else:

- a duplicate key is last-wins, silently (two ``jobs:`` keys drop a job);
- aliases multiply: a few hundred bytes of anchors expand to billions of items
  (an "alias bomb"), which validation then walks for minutes and gigabytes;
- nesting is unbounded, and deep enough nesting ends in a ``RecursionError``;
- an alias can refer to the node that holds it, making a structure with no end.

:func:`load` refuses all of these with a :class:`~loraq.errors.YamlProblem` naming the line. The
size of the document is measured on the composed node graph with aliases expanded,
in time linear in the file (each node is measured once), before any Python object
is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import YamlProblem
from .escape import excerpt

#: Bytes of a YAML file loraq reads (a queue of thousands of jobs is well under 1 MB).
MAX_BYTES = 16 << 20
#: Nodes of the document once aliases are expanded, each scalar weighing 1 + its length.
MAX_EXPANDED = 2_000_000
#: Levels of nesting (a queue file needs 4: jobs, a job, lora, target_modules).
MAX_DEPTH = 32

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type hints here
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # '<<: *defaults' merges keys, which explicit keys may then override
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not None:
                raise YamlProblem(line, f"duplicate key {excerpt(key, 60)} (also on line {first}); a key may "
                                        "appear once in a mapping")
            seen[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _measure(root: yaml.Node) -> None:
    """Refuse a document that expands past :data:`MAX_EXPANDED`, nests past :data:`MAX_DEPTH`, or refers to itself."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            line = node.start_mark.line + 1
            if size[key] > MAX_EXPANDED:
                raise YamlProblem(line, f"expands to more than {MAX_EXPANDED:,} items through its aliases (an "
                                        "alias bomb?); write the values out, or use fewer aliases")
            if depth[key] > MAX_DEPTH:
                raise YamlProblem(line, f"nested more than {MAX_DEPTH} levels deep; a queue file needs a few")
            continue
        if key in size:
            continue  # an alias of a node already measured: counted again by its parent, not walked again
        if key in on_path:
            raise YamlProblem(node.start_mark.line + 1, "an alias refers to the node that holds it: the value "
                                                        "would have no end")
        if isinstance(node, yaml.ScalarNode):
            size[key], depth[key] = 1 + len(node.value), 1
            continue
        on_path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise YamlProblem(kid.start_mark.line + 1, "an alias refers to the node that holds it: the value "
                                                           "would have no end")
            if id(kid) not in size:
                stack.append((kid, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load(text: str) -> Any:
    """Parse one YAML document with the bounds above; raise :class:`YamlProblem`."""
    if len(text) > MAX_BYTES:
        raise YamlProblem(None, f"is {len(text):,} characters; YAML files over {MAX_BYTES:,} are refused")
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader refuses some characters already here
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise YamlProblem(mark.line + 1 if mark else None, f"not valid YAML: {problem}") from None
    except RecursionError:
        raise YamlProblem(None, f"nested too deeply to read (more than {MAX_DEPTH} levels are refused)") from None
    finally:
        if loader is not None:
            loader.dispose()
