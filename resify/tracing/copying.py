"""The structural copy of the user's model, made before stage 1 (trace) touches anything.

``trace`` works on new module objects with their own hook dicts, attribute containers and
parameter/buffer dicts, over the user's very tensors: attributes the tracer sets (tensor
constants), caches a forward fills and class swaps never reach the user's model, and no weight is
copied. ``rewrite`` later gives the result tensors of its own. A leaf of resify's import graph.
"""

from __future__ import annotations

import copy
import types
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["structural_copy", "own_containers", "without_hooks"]

#: Hook dicts of a module (``_forward_hooks``, ``_forward_pre_hooks_with_kwargs``, …), by suffix.
_HOOKS = ("_hooks", "_hooks_with_kwargs", "_hooks_always_called")

#: Module attributes that structural_copy rebuilds itself.
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def structural_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """New module objects for the whole tree (hooks and attribute dicts copied), tensors shared.

    A module registered in two places (CoaT's ``cpe1`` is also ``serial_blocks1.0.cpe``) stays one
    module in the copy (``memo``), so it keeps the name torch.fx gives it, and the user's state_dict
    keys.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> copied = structural_copy(model)
    >>> copied is model, copied[0] is model[0], copied[0].weight is model[0].weight
    (False, False, True)
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if _plain_state(cls) or parametrize.is_parametrized(module):  # what copy.copy does, in half the time
        # (a parametrized module refuses copy.copy: its class forbids pickling, not copying)
        new = object.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.__dict__.pop("_compiled_call_impl", None)  # as Module.__getstate__ does
    else:
        new = copy.copy(module)
    d = new.__dict__  # written directly: Module.__setattr__'s checks cost more than the copy
    d["_parameters"] = dict(module._parameters)
    d["_buffers"] = dict(module._buffers)
    d["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    memo[id(module)] = new
    d["_modules"] = {k: None if c is None else structural_copy(c, memo) for k, c in module._modules.items()}
    own_containers(d, module.__dict__)
    for key, value in module.__dict__.items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            d[key] = types.MethodType(value.__func__, new)  # self.forward = self.fwd in __init__
        elif getattr(value, "owner", None) is module and callable(getattr(value, "bound_to", None)):
            d[key] = value.bound_to(new)  # a forward resify installed on the instance
    return new


def without_hooks(module: nn.Module) -> None:
    """Empty the forward and backward hook dicts of every module of a structural copy (the user's
    own modules keep theirs): a tracer running the copy must not call the user's hooks on proxies.
    A parametrization or weight norm is a hook-free module or a pre-hook kept on a leaf, which the
    tracer does not run."""
    for m in module.modules():
        for key, value in m.__dict__.items():
            if key.endswith(_HOOKS) and isinstance(value, dict) and value and "forward" in key and not _is_layer(m):
                m.__dict__[key] = type(value)()


def _is_layer(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn") and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


def own_containers(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Give a copied module's ``__dict__`` its own hook dicts and its own dicts, lists and sets (a
    cache its forward fills stays the copy's), made from the original module's ``__dict__``.

    The other mode's trace calls it again, so that it starts from the user's containers, not from
    those the first trace filled."""
    for key, value in theirs.items():
        if key.endswith(_HOOKS) and isinstance(value, dict):
            mine[key] = type(value)(value)
        elif key not in _MODULE_STATE and isinstance(value, (dict, list, set)):
            mine[key] = _containers_copied(value)


def _plain_state(cls: type[nn.Module]) -> bool:
    """True when copying an instance of ``cls`` is copying its ``__dict__`` (no custom pickling hooks)."""
    return (
        cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and cls.__setstate__ is nn.Module.__setstate__
        and "__slots__" not in cls.__dict__
    )


def _containers_copied(value: Any) -> Any:
    """New dicts, lists and sets all the way down; the objects they hold (tensors) are shared."""
    if type(value) in (dict, list, set):
        if isinstance(value, dict):
            return {k: _containers_copied(v) for k, v in value.items()}
        return type(value)(_containers_copied(v) for v in value)
    if isinstance(value, (dict, list, set)):  # a subclass (OrderedDict, defaultdict, …): copy.copy keeps its type
        return copy.copy(value)
    return value
