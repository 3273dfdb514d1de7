"""Turn a MODEL_SPEC from the command line into a model and an example input.

MODEL_SPEC is ``path/to/model.py``, ``path/to/model.py:NAME``, ``torchvision:NAME`` or ``timm:NAME``. Loading a
file runs its Python code, as ``python model.py`` would (but with ``__name__`` set to the file's
stem, so an ``if __name__ == "__main__":`` block does not run).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..constants import image_size
from ..errors import ModelLoadError

__all__ = [
    "LoadedModel",
    "load_model",
    "parse_input_shape",
    "parse_input_shapes",
    "parse_input_kwarg",
    "BUILDER_NAMES",
    "DTYPES",
    "MODEL_SPEC_FORMS",
]

BUILDER_NAMES = ("build_model", "get_model", "make_model")
#: Each form of a MODEL_SPEC and what it loads (the CLI's help lists them).
MODEL_SPEC_FORMS = {
    "path/to/model.py": "the file's one model: a module-level nn.Module with parameters, or a function named "
    f"{', '.join(BUILDER_NAMES[:-1])} or {BUILDER_NAMES[-1]} that returns one",
    "path/to/model.py:NAME": "the nn.Module named NAME in the file, or the function NAME returning one",
    "torchvision:NAME": "a torchvision model, untrained, e.g. torchvision:resnet18 or torchvision:ssdlite320_mobilenet_v3_large",
    "timm:NAME": "a timm model, untrained, at its pretrained_cfg input size, e.g. timm:resnet18",
}
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


def parse_input_shape(text: str | None, dtype: str = "float32", seed: int = 0) -> torch.Tensor | None:
    """'8,3,32,32' → a random tensor of that shape (seeded), or None when no shape is given.

    Any rank works ('4,128', '2,3,8,8,8'); a ':DTYPE' suffix ('2,16:int64') takes the place of
    ``dtype``; integer dtypes give token ids 0 or 1.

    Raises:
        ModelLoadError: the shape is not positive integers separated by commas, or the dtype is
            not one of :data:`DTYPES`.
    """
    if not text:
        return None
    return _random_input(text, dtype, seed)


def parse_input_shapes(texts: Sequence[str], dtype: str = "float32") -> torch.Tensor | tuple[torch.Tensor, ...] | None:
    """Every --input-shape, one per positional input in order: None for none, a tensor for one,
    a tuple for several (each seeded by its position, so that two of one shape differ).

    Raises:
        ModelLoadError: as :func:`parse_input_shape`, for any of them.
    """
    inputs = tuple(_random_input(text, dtype, seed) for seed, text in enumerate(texts))
    if not inputs:
        return None
    return inputs[0] if len(inputs) == 1 else inputs


def parse_input_kwarg(text: str) -> tuple[str, torch.Tensor]:
    """'attention_mask=2,16:int64' → ('attention_mask', a tensor of that shape and dtype).

    Raises:
        ModelLoadError: ``text`` is not NAME=SHAPE[:DTYPE], or its shape or dtype is invalid.
    """
    name, sep, rest = text.partition("=")
    shape = rest.partition(":")[0]
    if not sep or not name.strip().isidentifier() or not shape:
        raise ModelLoadError(
            f"--input-kwarg expects NAME=SHAPE[:DTYPE], like attention_mask=2,16:int64; found {text!r}"
        )
    return name.strip(), _random_input(rest, "float32", 0)


def _random_input(text: str, dtype: str, seed: int) -> torch.Tensor:
    """'2,16' or '2,16:int64' → a random tensor of that shape and dtype (``dtype`` without a suffix)."""
    text, _, own = text.partition(":")
    dtype = own or dtype
    parts = text.strip().removesuffix(",").split(",")
    try:  # '8,3,32,32' or '8x3x32x32', a trailing comma allowed; '3,x' and '3,,4' are typos, not shapes
        shape = tuple(int(x) for part in parts for x in part.split("x"))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelLoadError(
            f"--input-shape expects positive integers separated by commas, like 8,3,32,32; found {text!r}"
        )
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype expects one of {', '.join(DTYPES)}; found {dtype!r}")
    generator = torch.Generator().manual_seed(seed)
    if DTYPES[dtype].is_floating_point:
        return torch.randn(*shape, generator=generator).to(DTYPES[dtype])
    return torch.randint(0, 2, shape, generator=generator).to(DTYPES[dtype])


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file resify can read; an unreadable one is the user's to fix, not a crash."""
    try:
        if not path.is_file():
            return False
        with path.open("rb"):
            return True
    except OSError as e:
        raise ModelLoadError(
            f"cannot read model file '{path}': {e.strerror or e}; check the path and its permissions"
        ) from e


def _where(e: BaseException, path: Path) -> str:
    """':LINE' of the last frame of ``e``'s traceback that is in ``path`` ('' if none is)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f":{frames[-1].lineno}" if frames else ""


def _call(fn: Callable[[], Any], label: str, path: Path) -> Any:
    """Call a function of the user's file; whatever it raises is the user's error, told in one line."""
    try:
        return fn()
    except Exception as e:
        where = _where(e, path)
        raise ModelLoadError(
            f"{path}:{label}() failed{f' at {path}{where}' if where else ''} with {type(e).__name__}: {e}; "
            f"resify calls it with no arguments, as `{label}()`"
        ) from e


def _import_file(path: Path) -> ModuleType:
    if not _is_file(path):
        raise ModelLoadError(f"model file '{path}' not found; give a path to a .py file, torchvision:NAME or timm:NAME")
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
        raise ModelLoadError(
            f"running {path}{_where(e, path)} failed with {type(e).__name__}: {e}; the file must import cleanly "
            f"(resify runs it as `python {path.name}` would)"
        ) from e
    finally:
        sys.path.remove(str(path.parent.resolve()))
    return module


def _resolve(obj: Any, path: Path, name: str) -> nn.Module:
    label = f"{path}:{name}"
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        obj = _call(obj, name, path)
        if isinstance(obj, nn.Module):
            return obj
        raise ModelLoadError(f"{label}() returned a {type(obj).__name__}, not an nn.Module")
    raise ModelLoadError(f"{label} is a {type(obj).__name__}, not an nn.Module or a function returning one")


def _example_from(module: ModuleType, path: Path) -> Any:
    value = getattr(module, "example_input", None)
    if value is None:
        return None
    if callable(value) and not isinstance(value, torch.Tensor):
        value = _call(value, "example_input", path)
    if isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return value
    raise ModelLoadError(
        f"example_input in {path} must be a tensor, a tuple of tensors or a function returning one; "
        f"found {type(value).__name__}"
    )


def _example_kwargs_from(module: ModuleType, path: Path) -> dict[str, Any] | None:
    value = getattr(module, "example_kwargs", None)
    if callable(value):
        value = _call(value, "example_kwargs", path)
    if value is None or (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        return value
    raise ModelLoadError(
        f"example_kwargs in {path} must be a dict of inputs by name or a function "
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
    gen = torch.Generator().manual_seed(0)
    kind = _torchvision_kind(torchvision, name)
    extra = {"weights_backbone": None} if kind in ("detection", "segmentation") else {}  # nothing downloaded
    model = torchvision.models.get_model(name, weights=None, **extra)
    if kind == "detection":  # a list of images in, as the detectors take them
        return LoadedModel(model, ([torch.rand(3, 320, 320, generator=gen)],), f"torchvision:{name}")
    if kind == "video":
        return LoadedModel(model, torch.randn(1, 3, 8, 112, 112, generator=gen), f"torchvision:{name}")
    size = image_size(name)
    return LoadedModel(model, torch.randn(1, 3, size, size, generator=gen), f"torchvision:{name}")


def _torchvision_kind(torchvision: Any, name: str) -> str:
    """ "detection", "segmentation", "video", "optical_flow", "quantization" or "classification"."""
    for kind in ("detection", "segmentation", "video", "optical_flow", "quantization"):
        if name in torchvision.models.list_models(module=getattr(torchvision.models, kind, None)):
            return kind
    return "classification"


def _timm(name: str) -> LoadedModel:
    try:
        import timm
    except ImportError as e:
        raise ModelLoadError("timm:NAME needs timm; pip install timm") from e
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ModelLoadError(f"timm has no model {name!r}; try one of {', '.join(close) or 'timm.list_models()'}")
    model = timm.create_model(name, pretrained=False)
    cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
    c, h, w = cfg.get("input_size", (3, 224, 224))
    return LoadedModel(model, torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)), f"timm:{name}")


def load_model(spec: str) -> LoadedModel:
    """Load a model from a MODEL_SPEC: ``path.py``, ``path.py:NAME``, ``torchvision:NAME`` or ``timm:NAME``.

    Loading a file runs its Python code; it may also define ``example_input`` and
    ``example_kwargs`` (values, or functions returning them).

    Raises:
        ModelLoadError: missing or unreadable file, import failure, a function of the file that
            fails, no or several candidates, NAME not a module.
    """
    if spec.startswith("torchvision:"):
        return _torchvision(spec.split(":", 1)[1])
    if spec.startswith("timm:"):
        return _timm(spec.split(":", 1)[1])
    path_text, _, name = spec.partition(":") if not _is_file(Path(spec)) else (spec, "", "")
    path = Path(path_text)
    module = _import_file(path)
    example = _example_from(module, path)
    kwargs = _example_kwargs_from(module, path)
    if name:
        if not hasattr(module, name):
            raise ModelLoadError(f"{path} has no attribute {name!r}; check the name after ':'")
        return LoadedModel(_resolve(getattr(module, name), path, name), example, f"{path}:{name}", kwargs)
    candidates = _candidates(module)
    if len(candidates) == 1:
        key = candidates[0]
        return LoadedModel(_resolve(getattr(module, key), path, key), example, f"{path}:{key}", kwargs)
    if not candidates:
        raise ModelLoadError(
            f"{path} defines no module-level nn.Module instance with parameters and no function named "
            f"{', '.join(BUILDER_NAMES)}; add one, or name it as {path}:NAME"
        )
    raise ModelLoadError(
        f"{path} has several candidate models ({', '.join(candidates)}); pick one as "
        + " or ".join(f"{path}:{c}" for c in candidates[:3])
    )
