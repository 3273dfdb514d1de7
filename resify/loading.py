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

__all__ = ["LoadedModel", "load_model", "parse_input_shape", "parse_input_kwarg", "BUILDER_NAMES", "DTYPES"]

BUILDER_NAMES = ("build_model", "get_model", "make_model")
#: The example input's dtype names (CLI --dtype); integer ones give token ids 0 or 1 (valid for any vocabulary).
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "bool": torch.bool,
}


@dataclass
class LoadedModel:
    """A model loaded from a spec, with the example input the spec provides (or None)."""

    model: nn.Module
    example_input: Any
    source: str  # how it was found, e.g. "examples/seed_mlp.py:model"
    example_kwargs: dict[str, Any] | None = None  # the file's example_kwargs: inputs given by name


def parse_input_shape(text: str | None, dtype: str = "float32") -> torch.Tensor | None:
    """'8,3,32,32' → a random tensor of that shape (seeded), or None when no shape is given."""
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelLoadError(
            f"--input-shape expects positive integers separated by commas, like 8,3,32,32; found {text!r}"
        )
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype expects one of {', '.join(DTYPES)}; found {dtype!r}")
    generator = torch.Generator().manual_seed(0)
    if DTYPES[dtype].is_floating_point:
        return torch.randn(*shape, generator=generator).to(DTYPES[dtype])
    return torch.randint(0, 2, shape, generator=generator).to(DTYPES[dtype])


def parse_input_kwarg(text: str) -> tuple[str, torch.Tensor]:
    """'attention_mask=2,16:int64' → ('attention_mask', a tensor of that shape and dtype)."""
    name, sep, rest = text.partition("=")
    shape, _, dtype = rest.partition(":")
    if not sep or not name.strip().isidentifier() or not shape:
        raise ModelLoadError(
            f"--input-kwarg expects NAME=SHAPE[:DTYPE], like attention_mask=2,16:int64; found {text!r}"
        )
    tensor = parse_input_shape(shape, dtype or "float32")
    assert tensor is not None
    return name.strip(), tensor


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


def _example_kwargs_from(module: ModuleType) -> dict[str, Any] | None:
    value = getattr(module, "example_kwargs", None)
    if callable(value):
        value = value()
    if value is None or (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        return value
    raise ModelLoadError(
        f"example_kwargs in {module.__file__} must be a dict of inputs by name or a function "
        f"returning one; found {type(value).__name__}"
    )


def _candidates(module: ModuleType) -> list[str]:
    """Module-level models: nn.Module instances with parameters that are not part of another one
    (a loss object, the loop variable of ``for m in model.modules()``), and builder functions."""
    instances = {k: v for k, v in vars(module).items() if isinstance(v, nn.Module) and not k.startswith("_")}
    inside = {id(m) for v in instances.values() for m in v.modules() if m is not v}
    models = [k for k, v in instances.items() if id(v) not in inside and any(True for _ in v.parameters())]
    return models + [k for k in BUILDER_NAMES if callable(getattr(module, k, None))]


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
    return LoadedModel(
        model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)), f"torchvision:{name}"
    )


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
    kwargs = _example_kwargs_from(module)
    if name:
        if not hasattr(module, name):
            raise ModelLoadError(f"{path} has no attribute {name!r}; check the name after ':'")
        return LoadedModel(_resolve(getattr(module, name), f"{path}:{name}"), example, f"{path}:{name}", kwargs)
    candidates = _candidates(module)
    if len(candidates) == 1:
        key = candidates[0]
        return LoadedModel(_resolve(getattr(module, key), f"{path}:{key}"), example, f"{path}:{key}", kwargs)
    if not candidates:
        raise ModelLoadError(
            f"{path} defines no module-level nn.Module instance with parameters and no function named "
            f"{', '.join(BUILDER_NAMES)}; add one, or name it as {path}:NAME"
        )
    raise ModelLoadError(
        f"{path} has several candidate models ({', '.join(candidates)}); pick one as "
        + " or ".join(f"{path}:{c}" for c in candidates[:3])
    )
