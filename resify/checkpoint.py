"""Beside the pipeline: a conversion on disk, re-applied to a freshly built model, and undone.

``save`` writes a small versioned JSON document (the plan carried out, the example input's shapes,
resify's and torch's versions, the model's class and a fingerprint of each rewritten owner's code)
and resify's own tensors (``torch.load(..., weights_only=True)`` reads them; a safetensors file
where that package is installed), optionally the whole state dict. ``load`` takes the original
model as its code builds it, re-applies the saved plan exactly (not today's defaults) and loads the
tensors strictly: a key missing or unexpected is an error that lists them. ``remove`` takes the
shortcuts out again. Files are written to a temporary name and renamed: nothing is half-written.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import apply
from .constants import NAMESPACE
from .errors import ModelLoadError, PlanError, ResifyWarning
from .planning.plan_files import CONVERSION_FILE, FILE_SCHEMA_VERSION, check_file_version
from .planning.sites import Dense, Plan
from .rewriting.install import EXAMPLE_ATTRIBUTE, PLAN_ATTRIBUTE, applied_plan, example_spec
from .rewriting.modules import strip_forward
from .rewriting.rewrite import own_tensors
from .tracing.copying import structural_copy

__all__ = [
    "TENSORS_FILE",
    "save",
    "load",
    "remove",
    "resify_keys",
    "fingerprint",
]

TENSORS_FILE = "resify.pt"
SAFETENSORS_FILE = "resify.safetensors"
FULL_FILE = "resify_state_dict.pt"


def resify_keys(model: nn.Module, plan: Plan) -> list[str]:
    """The state-dict keys that resify's conversion added or changed: every key under an owner's
    ``resify`` namespace, and the weights of the layers a dense site widened."""
    widened = {s.shortcut.consumer for s in plan.sites if isinstance(s.shortcut, Dense)}
    out = []
    for key in model.state_dict():
        parts = key.split(".")
        if NAMESPACE in parts[:-1] or ".".join(parts[:-1]) in widened:
            out.append(key)
    return out


def fingerprint(module: nn.Module) -> str:
    """A hash of the code of the module's class's forward (its source, else its qualified name)."""
    cls = type(module)
    try:
        text = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        text = f"{cls.__module__}.{cls.__qualname__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary file beside ``path``, renamed over it at the end."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    probe = tempfile.mkdtemp()
    try:
        f = Path(probe) / "p"
        f.touch()
        return 0o666 & ~f.stat().st_mode & 0o777
    finally:
        for p in Path(probe).iterdir():
            p.unlink()
        os.rmdir(probe)


def _safetensors() -> Any:
    try:
        import safetensors.torch as st  # optional: pip install safetensors
    except ImportError:
        return None
    return st


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_input: Any = None,
    state_dict: bool = False,
) -> Path:
    """Write ``model``'s conversion to the folder ``path`` (made if missing; other files are left alone).

    Writes ``resify.json`` (the plan, versions, the model's class, fingerprints of the owners' code,
    the example input's shapes) and resify's own tensors (``resify.safetensors`` where safetensors is
    installed, else ``resify.pt``); with ``state_dict=True`` also the whole state dict
    (``resify_state_dict.pt``). ``example_input``: what ``load`` traces the rebuilt model on (its
    shapes are written; default: the plan's first site's input shape, where the model takes one tensor).

    Raises:
        PlanError: ``model`` was not converted by resify.apply.
    """
    plan = applied_plan(model)
    if plan is None:
        raise PlanError(
            f"expected a model converted by resify.apply, found a {type(model).__name__} without a plan; "
            "convert it first (resify.apply(model, x)) or save it with torch.save"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    keys = resify_keys(model, plan)
    full = model.state_dict()
    tensors = {k: full[k].detach().contiguous() for k in keys}
    owners = {s.owner for s in plan.sites}
    modules = dict(model.named_modules())
    example: Any = model.__dict__.get(EXAMPLE_ATTRIBUTE)
    if example_input is not None:
        example = example_spec(example_input if isinstance(example_input, tuple) else (example_input,))
    doc = {
        "file_schema_version": FILE_SCHEMA_VERSION,
        "resify_version": _version(),
        "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "fingerprints": {o: fingerprint(modules[o]) for o in sorted(owners) if o in modules},
        "example_input": example,
        "tensors": sorted(tensors),
        "plan": plan.to_dict(),
    }
    st = _safetensors()
    if st is not None:
        _write_atomic(folder / SAFETENSORS_FILE, lambda p: st.save_file(tensors, str(p)))
        (folder / TENSORS_FILE).unlink(missing_ok=True)
    else:
        _write_atomic(folder / TENSORS_FILE, lambda p: torch.save(tensors, p))
    if state_dict:
        _write_atomic(folder / FULL_FILE, lambda p: torch.save(full, p))
    text = json.dumps(doc, indent=2) + "\n"
    _write_atomic(folder / CONVERSION_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return folder


def _version() -> str:
    from . import __version__

    return __version__


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st_path, pt_path = folder / SAFETENSORS_FILE, folder / TENSORS_FILE
    try:
        if st_path.exists():
            st = _safetensors()
            if st is None:
                raise ModelLoadError(f"'{st_path}' needs the safetensors package to read; pip install safetensors")
            return dict(st.load_file(str(st_path)))
        return dict(torch.load(pt_path, map_location="cpu", weights_only=True))
    except FileNotFoundError as e:
        raise ModelLoadError(
            f"expected resify's tensors ({SAFETENSORS_FILE} or {TENSORS_FILE}) in '{folder}', found none; "
            "save the conversion with resify.save"
        ) from e
    except ModelLoadError:
        raise
    except Exception as e:  # a truncated or tampered file
        raise ModelLoadError(f"cannot read resify's tensors in '{folder}': {e}; save the conversion again") from e


def load(
    model: nn.Module, path: str | os.PathLike[str], *, example_input: Any = None, example_kwargs: dict | None = None
) -> nn.Module:
    """Re-apply the conversion saved at ``path`` to ``model`` (freshly built, as its code builds it)
    and load resify's tensors strictly; returns the converted model (``model`` is not changed).

    Raises:
        PlanError: the folder holds no conversion, or one this resify cannot read, or the model does
            not match the plan (the message names the first mismatch).
        ModelLoadError: a tensor missing or unexpected (the message lists them), or unreadable.
    """
    folder = Path(path)
    file = folder / CONVERSION_FILE
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise PlanError(
            f"expected a resify conversion in '{folder}' ({CONVERSION_FILE}), found none: {e.strerror or e}; "
            "write one with resify.save(model, folder)"
        ) from e
    check_file_version(doc, file)
    plan = Plan.from_dict(doc["plan"])
    if example_input is None and doc.get("example_input"):
        example_input = tuple(_dummy(spec, model) for spec in doc["example_input"])
    converted = apply(model, example_input, example_kwargs=example_kwargs, plan=plan)
    modules = dict(converted.named_modules())
    for owner, saved in doc.get("fingerprints", {}).items():
        if owner in modules and fingerprint(modules[owner]) != saved:
            warnings.warn(
                f"the code of '{owner or type(model).__name__}' ({type(modules[owner]).__name__}.forward) changed "
                "since the conversion was saved; the shortcuts were put back at the same layers — check the "
                "outputs before you train on",
                ResifyWarning,
                stacklevel=2,
            )
    tensors = _read_tensors(folder)
    expected = set(resify_keys(converted, plan))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        )
        raise ModelLoadError(
            f"resify's tensors in '{folder}' do not match the conversion: {'; '.join(parts)}; "
            "the files were changed or come from another conversion: save it again"
        )
    state = converted.state_dict()
    bad = [k for k in sorted(expected) if tensors[k].shape != state[k].shape]
    if bad:
        raise ModelLoadError(
            f"resify's tensors in '{folder}' have other shapes than the conversion: "
            + ", ".join(f"{k} {list(tensors[k].shape)} (expected {list(state[k].shape)})" for k in bad)
        )
    converted.load_state_dict(tensors, strict=False)
    full = folder / FULL_FILE
    if full.exists():
        converted.load_state_dict(torch.load(full, map_location="cpu", weights_only=True), strict=True)
    return converted


def _dummy(spec: Mapping[str, Any], model: nn.Module) -> torch.Tensor:
    """A tensor of the saved shape and dtype on the model's device (zeros: token ids stay in range)."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
    dtype = getattr(torch, spec["dtype"])
    if dtype.is_floating_point:
        return torch.randn(*spec["shape"], device=device, dtype=dtype)
    return torch.zeros(*spec["shape"], device=device, dtype=dtype)


def remove(model: nn.Module) -> nn.Module:
    """A copy of ``model`` without resify's shortcuts: the original's forwards and state-dict keys.

    The layers a dense site widened get their original width back (the columns it added dropped).
    Where ``preserve_output=True`` and every β is still 0 (and every gate 1), the result computes what
    ``model`` computes; otherwise it computes the plain network with the trained weights (a
    ResifyWarning says so).

    Raises:
        PlanError: ``model`` was not converted by resify.apply.
    """
    plan = applied_plan(model)
    if plan is None:
        raise PlanError(
            f"expected a model converted by resify.apply, found a {type(model).__name__} without a plan; "
            "there is nothing to remove"
        )
    result = structural_copy(model)
    own_tensors(result)
    changes = []
    for name, m in result.named_modules():
        ns = m._modules.get(NAMESPACE)
        if ns is not None:
            for key, p in ns.named_parameters():
                leaf = key.rsplit(".", 1)[-1]
                if (leaf == "beta" and bool(p.detach().ne(0).any())) or (
                    leaf in ("alpha", "gamma") and bool(p.detach().ne(1).any())
                ):
                    changes.append(f"{name + '.' if name else ''}{NAMESPACE}.{key}")
            del m._modules[NAMESPACE]
        strip_forward(m)
    for site in plan.sites:
        if isinstance(site.shortcut, Dense):
            _narrow(result, site.shortcut.consumer, site.shortcut.extra_channels)
    result.__dict__.pop(PLAN_ATTRIBUTE, None)
    result.__dict__.pop(EXAMPLE_ATTRIBUTE, None)
    if changes:
        shown = ", ".join(changes[:3]) + (f", … ({len(changes)} in all)" if len(changes) > 3 else "")
        warnings.warn(
            f"removed shortcuts that were in use ({shown} moved from their initial value): the model without "
            "them computes something else than the converted one",
            ResifyWarning,
            stacklevel=2,
        )
    return result


@torch.no_grad()
def _narrow(root: nn.Module, path: str, extra: int) -> None:
    """Give a layer a dense site widened its original input width back (its first ``extra`` inputs dropped)."""
    m = root.get_submodule(path)
    weight = m.weight
    assert isinstance(weight, nn.Parameter) and isinstance(
        m, (nn.Linear, nn.modules.conv._ConvNd)
    )  # dense widens these
    m.weight = nn.Parameter(weight[:, extra:].clone(), requires_grad=weight.requires_grad)
    if isinstance(m, nn.Linear):
        m.in_features -= extra
    else:
        m.in_channels -= extra
