"""A nested state_dict as named tensors plus a JSON tree, and back.

Tensor leaves become arrays named by their key path ('model/layers.0.attention.wq.weight'); the
tree keeps every other leaf (JSON values only; tuples become lists) and marks tensors by name, so
the structure comes back without pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError

TENSOR = "__tensor__"  # {"__tensor__": name} marks a tensor leaf
ITEMS = "__items__"  # {"__items__": [[key, value], ...]} keeps a dict with non-string keys
_ABSENT = object()


def flatten(prefix: str, obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors by name under `prefix`, and the JSON tree with tensor references."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _walk(prefix, obj, tensors)


def state_templates(states: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Each state's current state_dict (the template a load restores into), and all their tensors by name."""
    templates = {key: state.state_dict() for key, state in states.items()}
    tensors: dict[str, torch.Tensor] = {}
    for key, template in templates.items():
        tensors.update(flatten(key, template)[0])
    return templates, tensors


def restore(tree: Any, *, tensors: Mapping[str, torch.Tensor], template: Any = None, prefix: str = "") -> Any:
    """The object `tree` describes, tensors taken from `tensors`, else from `template` at the same key.

    Dict keys only in `template` are kept from it (their tensors replaced by loaded ones of the same
    name), so state that another rank saved, or that was added since the save, still loads.
    """
    if prefix:
        template = _substitute(prefix, template, tensors)
    return _restore(tree, tensors=tensors, template=template)


def _substitute(path: str, obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensors.get(path, obj)
    if isinstance(obj, Mapping):
        return {k: _substitute(f"{path}/{k}", v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_substitute(f"{path}/{i}", v, tensors) for i, v in enumerate(obj))
    return obj


def _restore(tree: Any, *, tensors: Mapping[str, torch.Tensor], template: Any) -> Any:
    if isinstance(tree, dict) and set(tree) == {TENSOR}:
        name = tree[TENSOR]
        if name in tensors:
            return tensors[name]
        # Not loaded: excluded (keep the current value) or held by other ranks now (drop it).
        return template if isinstance(template, torch.Tensor) else _ABSENT
    if isinstance(tree, dict):
        pairs = [(k, v) for k, v in tree[ITEMS]] if set(tree) == {ITEMS} else list(tree.items())
        base = template if isinstance(template, Mapping) else {}
        out = {k: _restore(v, tensors=tensors, template=base.get(k)) for k, v in pairs}
        out = {k: v for k, v in out.items() if v is not _ABSENT}
        return {**{k: v for k, v in base.items() if k not in out}, **out}
    if isinstance(tree, list):
        base = template if isinstance(template, (list, tuple)) and len(template) == len(tree) else [None] * len(tree)
        out_list = [_restore(v, tensors=tensors, template=t) for v, t in zip(tree, base)]
        out_list = [None if v is _ABSENT else v for v in out_list]
        return tuple(out_list) if isinstance(template, tuple) else out_list
    return tree


def merge_trees(trees: list[Any]) -> Any:
    """The union of several ranks' trees; earlier trees win where they disagree."""
    out = trees[0]
    for tree in trees[1:]:
        out = _union(out, tree)
    return out


def _union(a: Any, b: Any) -> Any:
    if (
        isinstance(a, dict)
        and isinstance(b, dict)
        and TENSOR not in a
        and ITEMS not in a
        and TENSOR not in b
        and ITEMS not in b
    ):
        return {**b, **{k: _union(v, b[k]) if k in b else v for k, v in a.items()}}
    return a


def _walk(path: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {TENSOR: path}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: _walk(_join(path, k), v, tensors) for k, v in obj.items()}
        if all(isinstance(k, (str, int, bool, float)) or k is None for k in obj):
            return {ITEMS: [[k, _walk(_join(path, str(k)), v, tensors)] for k, v in obj.items()]}
        raise CheckpointError(
            f"state {path!r} has dict keys {list(obj)[:5]}: only str/int/float/bool keys are storable"
        )
    if isinstance(obj, (list, tuple)):
        return [_walk(_join(path, str(i)), v, tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj  # NaN/Infinity: Python's json writes and reads them back
    raise CheckpointError(
        f"state {path!r} is a {type(obj).__name__}, which a checkpoint cannot store: return a tensor or a JSON "
        "value (str, int, float, bool, None, list, dict) from state_dict()"
    )


def _join(path: str, key: str) -> str:
    if not key or "/" in key:
        raise CheckpointError(f"state key {key!r} under {path!r} is empty or contains '/': rename it")
    return f"{path}/{key}"
