"""Turn a MODEL_SPEC from the command line into a model and an example input.

MODEL_SPEC is ``path/to/model.py``, ``path/to/model.py:NAME`` or ``torchvision:NAME``. Loading a
file runs its Python code, as ``python model.py`` would (but with ``__name__`` set to the file's
stem, so an ``if __name__ == "__main__":`` block does not run).
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError

__all__ = ["LoadedModel", "load_model", "parse_input_shape", "BUILDER_NAMES"]

BUILDER_NAMES = ("build_model", "get_model", "make_model")
_DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64,
           "double": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model loaded from a spec, with the example input the spec provides (or None)."""

    model: nn.Module
    example_input: Any
    source: str  # how it was found, e.g. "examples/seed_mlp.py:model"


def parse_input_shape(text: str | None, dtype: str = "float32") -> torch.Tensor | None:
    """'8,3,32,32' → a random tensor of that shape (seeded), or None when no shape is given."""
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelLoadError(f"--input-shape expects positive integers separated by commas, like 8,3,32,32; found {text!r}")
    if dtype not in _DTYPES:
        raise ModelLoadError(f"--dtype expects one of {', '.join(_DTYPES)}; found {dtype!r}")
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(_DTYPES[dtype])


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelLoadError(f"model file '{path}' not found; give a path to a .py file, or torchvision:NAME")
    name = f"resify_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import '{path}' as Python; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelLoadError(f"syntax error in {path}:{e.lineno}: {e.msg}; fix the file and try again") from e
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f":{frames[-1].lineno}" if frames else ""
        raise ModelLoadError(
            f"running {path}{where} failed with {type(e).__name__}: {e}; the file must import cleanly "
            f"(resify runs it as `python {path.name}` would)"
        ) from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _resolve(obj: Any, label: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        try:
            obj = obj()
        except TypeError as e:
            raise ModelLoadError(f"{label} must take no arguments, but calling it failed: {e}") from e
        if isinstance(obj, nn.Module):
            return obj
        raise ModelLoadError(f"{label}() returned a {type(obj).__name__}, not an nn.Module")
    raise ModelLoadError(f"{label} is a {type(obj).__name__}, not an nn.Module or a function returning one")


def _example_from(module: ModuleType) -> Any:
    value = getattr(module, "example_input", None)
    if value is None:
        return None
    if callable(value) and not isinstance(value, torch.Tensor):
        value = value()
    if isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return value
    raise ModelLoadError(
        f"example_input in {module.__file__} must be a tensor, a tuple of tensors or a function returning one; "
        f"found {type(value).__name__}"
    )


def _torchvision(name: str) -> LoadedModel:
    try:
        import torchvision
    except ImportError as e:
        raise ModelLoadError("torchvision:NAME needs torchvision; pip install torchvision") from e
    known = torchvision.models.list_models()
    if name not in known:
        close = [n for n in known if name.split("_")[0] in n][:5]
        raise ModelLoadError(f"torchvision has no model {name!r}; try one of {', '.join(close or known[:5])}")
    model = torchvision.models.get_model(name, weights=None)
    size = 299 if name.startswith("inception") else 224
    return LoadedModel(model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),
                       f"torchvision:{name}")


def load_model(spec: str) -> LoadedModel:
    """Load ``path.py``, ``path.py:NAME`` or ``torchvision:NAME``.

    Raises:
        ModelLoadError: missing file, import failure, no or several candidates, NAME not a module.
    """
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1])
    path_text, _, name = spec.partition(":") if not Path(spec).is_file() else (spec, "", "")
    path = Path(path_text)
    module = _import_file(path)
    example = _example_from(module)
    if name:
        if not hasattr(module, name):
            raise ModelLoadError(f"{path} has no attribute {name!r}; check the name after ':'")
        return LoadedModel(_resolve(getattr(module, name), f"{path}:{name}"), example, f"{path}:{name}")
    instances = [k for k, v in vars(module).items() if isinstance(v, nn.Module) and not k.startswith("_")]
    builders = [k for k in BUILDER_NAMES if callable(getattr(module, k, None))]
    candidates = instances + builders
    if len(candidates) == 1:
        key = candidates[0]
        return LoadedModel(_resolve(getattr(module, key), f"{path}:{key}"), example, f"{path}:{key}")
    if not candidates:
        raise ModelLoadError(
            f"{path} defines no module-level nn.Module instance and no function named "
            f"{', '.join(BUILDER_NAMES)}; add one, or name it as {path}:NAME"
        )
    raise ModelLoadError(
        f"{path} has several candidate models ({', '.join(candidates)}); pick one as "
        + " or ".join(f"{path}:{c}" for c in candidates[:3])
    )
