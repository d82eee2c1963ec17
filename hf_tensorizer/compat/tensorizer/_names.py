"""Nested state dicts as flat tensor names, and back: upstream tensorizer's paths on our flat index.

A top-level ``str`` key is stored as itself; any other path (a list index, a nested key) is stored the way
upstream stores it: ``"\\x1e"`` followed by the JSON list of its components (``str`` or ``int``). Reading rebuilds
the tree; :class:`Node` is the read-only mapping view of one level, :func:`as_tree` its lists-and-dicts form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

PathComponent = str | int
Path = tuple[PathComponent, ...]
_SEP = "\x1e"


def encode(path: Sequence[PathComponent]) -> str:
    """The stored name of ``path`` (a plain top-level ``str`` key stays itself)."""
    if len(path) == 1 and isinstance(path[0], str) and not path[0].startswith(_SEP):
        return path[0]
    return _SEP + json.dumps(list(path), separators=(",", ":"))


def decode(name: str) -> Path:
    """The path of a stored name; names that are not structured are one ``str`` component."""
    if name.startswith(_SEP):
        try:
            parts = json.loads(name[1:])
        except json.JSONDecodeError:
            return (name,)
        if isinstance(parts, list) and parts and all(type(p) in (str, int) for p in parts):
            return tuple(parts)
    return (name,)


def flatten(obj: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """``(path, tensor)`` for every leaf of nested mappings / lists / tuples, in order."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state dict keys must be str or int, got {type(k).__name__}")
            yield from flatten(v, (*prefix, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, (*prefix, i))
    else:
        if not prefix:
            raise TypeError(f"write_state_dict takes a mapping, list or tuple, not {type(obj).__name__}")
        yield prefix, obj


def public_key(path: Path) -> PathComponent | Path:
    """What ``filter_func`` receives: the name for a plain top-level key, else the path."""
    return path[0] if len(path) == 1 and isinstance(path[0], str) else path


class Node(Mapping):
    """One level of a nested structure, read-only; leaves are fetched from ``get`` on access."""

    def __init__(self, children: dict[PathComponent, Any], get: Callable[[str], torch.Tensor]) -> None:
        self._children, self._get = children, get

    @classmethod
    def build(cls, names: list[str], get: Callable[[str], torch.Tensor],
              path_of: Callable[[str], Path] = decode) -> Node:  # fmt: skip
        root: dict[PathComponent, Any] = {}
        for name in names:
            path, level = path_of(name), root
            for part in path[:-1]:
                nxt = level.setdefault(part, {})
                if not isinstance(nxt, dict):  # a leaf and a subtree under one key: keep the leaf
                    break
                level = nxt
            else:
                level[path[-1]] = name
        return cls._wrap(root, get)

    @classmethod
    def _wrap(cls, level: dict, get: Callable[[str], torch.Tensor]) -> Node:
        return cls({k: cls._wrap(v, get) if isinstance(v, dict) else v for k, v in level.items()}, get)

    def __getitem__(self, key: PathComponent) -> Any:
        v = self._children[key]
        return v if isinstance(v, Node) else self._get(v)

    def __contains__(self, key: object) -> bool:
        return key in self._children

    def __iter__(self) -> Iterator[PathComponent]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._children)

    def node(self, prefix: Sequence[PathComponent]) -> Any:
        """The subtree (or leaf name) at ``prefix``, or None."""
        cur: Any = self
        for part in prefix:
            if not isinstance(cur, Node) or part not in cur:
                return None
            cur = cur._children[part]
        return cur

    def leaves(self) -> Iterator[str]:
        for v in self._children.values():
            yield from v.leaves() if isinstance(v, Node) else (v,)


def as_tree(node: Node, get: Callable[[str], Any]) -> Any:
    """``node`` as plain containers: a list where the keys are exactly 0..n-1, else a dict."""
    out = {k: as_tree(v, get) if isinstance(v, Node) else get(v) for k, v in node._children.items()}
    if out and all(type(k) is int for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out
