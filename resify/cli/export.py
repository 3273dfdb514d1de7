"""Write a converted GraphModule as readable Python source plus a weights file.

``save(gm, folder)`` writes ``model.py`` (a plain ``nn.Module`` subclass: the module tree rebuilt
from constructor calls, then the traced ``forward``) and ``weights.pt`` (its state dict, loaded
with ``torch.load(..., weights_only=True)``). The folder is written under a temporary name beside
the target and renamed at the end, so a failure leaves nothing half-written. ``load(folder)``
imports it again.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import keyword
import re
import shutil
import tempfile
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import ResifyError
from ..rewriting.modules import DualGraphModule, Shortcut

__all__ = ["save", "load", "load_line", "render_source"]

_MODULE_FILE = "model.py"
_WEIGHTS_FILE = "weights.pt"
#: what torch.fx appends to a line to free the values it no longer needs: ";  a = b = None"
_DELETION = re.compile(r";\s+(?:\w+ = )+None$")


def _constructor(module: nn.Module, path: str) -> str:
    """A Python expression that rebuilds ``module`` (without its weights)."""
    if _is_container(module):
        return "nn.Module()"
    if isinstance(module, nn.MultiheadAttention):
        m = module
        return (
            f"nn.MultiheadAttention({m.embed_dim}, {m.num_heads}, dropout={m.dropout}, "
            f"bias={m.in_proj_bias is not None}, add_bias_kv={m.bias_k is not None}, "
            f"add_zero_attn={m.add_zero_attn}, kdim={m.kdim}, vdim={m.vdim}, batch_first={m.batch_first})"
        )
    cls = type(module)
    if cls.__module__.startswith("torch.nn") and hasattr(nn, cls.__name__) and getattr(nn, cls.__name__) is cls:
        expr = f"nn.{module.__repr__()}"
        if "\n" not in expr:
            rebuilt = _build(expr)
            # a repr leaves some settings out (AvgPool's ceil_mode): name those that differ
            missing = [k for k, v in _settings(module).items() if _settings(rebuilt).get(k, v) != v]
            if missing and expr.endswith(")") and rebuilt is not None:
                params = inspect.signature(cls).parameters
                if all(k in params for k in missing):
                    extra = ", ".join(f"{k}={getattr(module, k)!r}" for k in missing)
                    expr = f"{expr[:-1]}, {extra})" if not expr.endswith("()") else f"{expr[:-1]}{extra})"
                    rebuilt = _build(expr)
            if (
                rebuilt is not None
                and repr(rebuilt) == repr(module)
                and _settings(rebuilt) == _settings(module)
                and _same_tensors(rebuilt, module)
            ):
                return expr
    raise ResifyError(
        f"cannot write module '{path}' ({cls.__module__}.{cls.__name__}) as source: resify exports "
        "standard torch.nn layers only; trace through it (drop it from leaf_modules) or save the model "
        "with torch.save instead"
    )


def _is_container(module: nn.Module) -> bool:
    """Modules written as a plain ``nn.Module()`` holding children and parameters (resify's Shortcut
    loses only its ``reset_parameters`` there: the written model depends on torch alone)."""
    return type(module) is nn.Module or isinstance(module, (torch.fx.GraphModule, Shortcut))


def _build(expr: str) -> nn.Module | None:
    try:
        return eval(expr, {"nn": nn, "torch": torch})
    except Exception:
        return None


def _settings(module: nn.Module | None) -> dict[str, Any]:
    """A module's plain configuration attributes (kernel_size, ceil_mode, …), not its state."""
    if module is None:
        return {}
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple, type(None)))
    }


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)


def _import_lines(globals_: dict[str, Any]) -> dict[str, str]:
    """The line that defines each name the generated code may use (an import, or a constant)."""
    lines = {
        "math": "import math",
        "operator": "import operator",
        "device": "from torch import device",
        "inf": "inf = float('inf')",
        "nan": "nan = float('nan')",
        "NoneType": "NoneType = type(None)",
    }
    for name, obj in sorted(globals_.items()):
        if name in ("torch", *lines) or name in dir(__builtins__):
            continue
        if isinstance(obj, types.ModuleType):
            lines[name] = f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}"
            continue
        mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if mod and qual and "<" not in qual and "." not in qual:
            lines[name] = f"from {mod} import {qual} as {name}" if qual != name else f"from {mod} import {qual}"
            continue
        if isinstance(obj, (type(None), bool, int, float, str)):
            lines[name] = f"{name} = {obj!r}"
            continue
        raise ResifyError(f"cannot write the model as source: it calls {obj!r}, which has no importable name")
    return lines


def _header(class_name: str, defined: dict[str, str], body: Sequence[str]) -> list[str]:
    """The module's docstring and the imports and constants ``body`` uses (and only those)."""
    code = "\n".join(line.split("#", 1)[0] if line.lstrip().startswith("#") else line for line in body)
    used = [line for name, line in defined.items() if re.search(rf"(?<![\w.]){re.escape(name)}\b", code)]
    imports = [line for line in used if line.startswith(("import ", "from "))]
    stdlib = sorted(
        ["from pathlib import Path", *(line for line in imports if line in ("import math", "import operator"))]
    )
    rest = ["import torch", "from torch import nn", *(line for line in imports if line not in stdlib)]
    return [
        f'"""{class_name}: written by resify. Load it with load() below (weights from {_WEIGHTS_FILE})."""',
        "",
        *stdlib,
        "",
        *rest,
        *([""] + [line for line in used if line not in imports] if len(used) > len(imports) else []),
    ]


def _is_attribute(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _container_kind(module: nn.Module, first_paths: dict[int, str], path: str) -> str:
    """How a container is written, so that every child is reached by a readable expression: "module"
    (``self.a.b``), "list" (an ``nn.ModuleList`` of children 0 to n-1 in order: ``self.layers[0]``) or
    "dict" (an ``nn.ModuleDict`` where some names are numbers: ``self.resify["3"]``; the root too, so
    that a Sequential's layers read ``self["0"]``). Both print their children under their own names."""
    names = list(module._modules)
    if all(_is_attribute(n) for n in names):
        return "module"
    owned = all(first_paths.get(id(m)) == f"{path}.{n}" for n, m in module._modules.items() if m is not None)
    if path and owned and names == [str(i) for i in range(len(names))]:
        return "list"
    return "module" if set(names) & set(dir(nn.ModuleDict)) else "dict"


def _access(path: str, kinds: dict[str, str]) -> str:
    """The expression that reaches the module or tensor at ``path`` from ``self``."""
    expr, parent = "self", ""
    for atom in path.split(".") if path else []:
        kind = kinds.get(parent, "module")
        if _is_attribute(atom):
            expr += f".{atom}"
        elif kind == "list":
            expr += f"[{atom}]"
        elif kind == "dict":
            expr += f'["{atom}"]'
        else:
            expr = f'getattr({expr}, "{atom}")'
        parent = f"{parent}.{atom}" if parent else atom
    return expr


def _fx_access(path: str) -> str:
    """What torch.fx writes for the same path (``getattr(self.layers, "0")``), to be replaced."""
    expr = "self"
    for atom in path.split("."):
        expr = f"{expr}.{atom}" if atom.isidentifier() else f'getattr({expr}, "{atom}")'
    return expr


def _site_comments(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> dict[str, str]:
    """The node after which each inserted shortcut's code starts → the comment that names it."""
    plan = gm.meta.get("resify_plan")
    if plan is None:
        return {}
    names = {n.name for n in graph.nodes}
    for sites in (plan.sites, plan.other_mode_sites or ()):
        if sites and all(s.exit in names for s in sites):
            break
    else:
        return {}
    comments = {}
    for s in sites:
        what = s.kind if s.projection is None else f"{s.kind}: {s.projection}"
        extra = (f", gate {s.gate}" if s.gate else "") + (", β from 0" if s.preserve_output else "")
        span = s.start if s.start == s.end else f"{s.start} … {s.end}"
        comments[s.exit] = f"# resify shortcut '{s.name}' ({what}{extra}) around {span}"
    return comments


#: ``torch.fx._symbolic_trace._assert_is_none(x, 'msg')``: fx's check of an argument traced at None.
_ASSERT_NONE = re.compile(r"^(\s*)(?:\w+ = )?torch\.fx\._symbolic_trace\._assert_is_none\((\w+), (.*)\)$")


def _forward_lines(gm: torch.fx.GraphModule, graph: torch.fx.Graph, src: str, kinds: dict[str, str]) -> list[str]:
    """fx's generated forward, made to read like hand-written PyTorch: modules reached by attribute
    or index, no ``;  x = None`` after each line, a comment where each shortcut starts."""
    targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr") and isinstance(n.target, str)}
    swaps = sorted(((_fx_access(t), _access(t, kinds)) for t in targets), key=lambda p: -len(p[0]))
    comments = _site_comments(gm, graph)
    out = []
    for line in src.strip("\n").splitlines():
        if line.startswith("torch.fx._symbolic_trace.wrap("):
            continue
        line = _DELETION.sub("", line).rstrip()
        line = _ASSERT_NONE.sub(r"\1assert \2 is None, \3", line)  # torch.fx's private helper, as plain Python
        for fx_expr, expr in swaps:
            if fx_expr != expr:
                line = line.replace(fx_expr, expr)
        out.append("    " + line if line else "")
        node = line.strip().split(" = ", 1)[0]
        if node in comments and line.startswith("    "):
            out.append("        " + comments.pop(node))
    while out and not out[-1]:
        out.pop()
    return out


def render_source(gm: torch.fx.GraphModule, class_name: str = "ResifiedModel") -> str:
    """The Python source of ``model.py`` for ``gm``: readable, importing only what it uses."""
    graphs = [gm.graph] if not isinstance(gm, DualGraphModule) else [gm.train_graph, gm.eval_graph]
    codes = [g.python_code(root_module="self") for g in graphs]
    globals_ = {k: v for c in codes for k, v in c.globals.items()}
    first: dict[int, str] = {}  # a module registered under two names: the second name is an alias
    for path, module in gm.named_modules(remove_duplicate=False):
        first.setdefault(id(module), path)
    kinds = {path: _container_kind(m, first, path) for path, m in gm.named_modules() if _is_container(m)}
    base = "nn.ModuleDict" if kinds[""] == "dict" else "nn.Module"  # a ModuleDict: its layers read self["0"]
    body = [f"class {class_name}({base}):", "    def __init__(self):", "        super().__init__()"]
    built: set[str] = set()  # leaf modules and their children: the leaf's constructor builds them
    for path, module in gm.named_modules():
        if not path:
            continue
        parent, _, attr = path.rpartition(".")
        if parent in built:
            built.add(path)
            continue
        if _is_container(module):
            ctor = {"list": "nn.ModuleList()", "dict": "nn.ModuleDict()"}.get(kinds[path], "nn.Module()")
        else:
            built.add(path)
            ctor = _constructor(module, path)
        body.append(f"        {_adding(parent, attr, ctor, kinds)}")
    for path, module in gm.named_modules(remove_duplicate=False):
        parent, _, attr = path.rpartition(".")
        if path and first[id(module)] != path and parent not in built:
            body.append(f"        {_adding(parent, attr, _access(first[id(module)], kinds), kinds)}")
    for path, module in gm.named_modules():  # the root first, once
        if path and not _is_container(module):
            continue  # leaf modules create their own parameters
        owner = _access(path, kinds)
        for name, p in module.named_parameters(recurse=False):
            body.append(
                f"        {owner}.register_parameter({name!r}, nn.Parameter(torch.empty({list(p.shape)}, "
                f"dtype={p.dtype}), requires_grad={p.requires_grad}))"
            )
        for name, b in module.named_buffers(recurse=False):
            persistent = name not in module._non_persistent_buffers_set
            body.append(
                f"        {owner}.register_buffer({name!r}, torch.empty({list(b.shape)}, dtype={b.dtype}), "
                f"persistent={persistent})"
            )
    body.append("")
    if len(codes) == 1:
        body += _forward_lines(gm, graphs[0], codes[0].src, kinds)
    else:  # forward reads self.training: one method per mode, chosen as the original chooses
        body += [
            "    def forward(self, *args, **kwargs):",
            "        return (self._forward_train if self.training else self._forward_eval)(*args, **kwargs)",
        ]
        for mode, g, c in zip(("train", "eval"), graphs, codes):
            lines = _forward_lines(gm, g, c.src, kinds)
            body += ["", lines[0].replace("def forward(", f"def _forward_{mode}(", 1), *lines[1:]]
    body += [
        "",
        "",
        f"def load(weights=None, map_location='cpu') -> {class_name}:",
        f'    """Build the model and load its weights (default: {_WEIGHTS_FILE} beside this file)."""',
        f"    model = {class_name}()",
        f"    path = weights or Path(__file__).with_name({_WEIGHTS_FILE!r})",
        "    model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))",
        f"    model.train({gm.training})",
        "    return model",
        "",
    ]
    return "\n".join([*_header(class_name, _import_lines(globals_), body), "", "", *body])


def _adding(parent: str, attr: str, value: str, kinds: dict[str, str]) -> str:
    """The statement that registers ``value`` as child ``attr`` of the module at ``parent``."""
    owner = _access(parent, kinds)
    if _is_attribute(attr) and not hasattr(nn.ModuleList, attr) and not hasattr(nn.ModuleDict, attr):
        return f"{owner}.{attr} = {value}"
    return f"{owner}.add_module({attr!r}, {value})"


def _import_path(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"resify_export_{abs(hash(str(path)))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(folder: str | Path) -> nn.Module:
    """Load a model written by :func:`save`."""
    return _import_path(Path(folder) / _MODULE_FILE).load()


def load_line(folder: str | Path) -> str:
    """The one line of Python that loads the model in a fresh interpreter."""
    return f'import runpy; model = runpy.run_path("{Path(folder) / _MODULE_FILE}")["load"]()'


def save(
    gm: torch.fx.GraphModule,
    folder: str | Path,
    *,
    extra_json: dict[str, Any] | None = None,
    force: bool = False,
    check: Callable[[nn.Module], None] | None = None,
) -> Path:
    """Write ``gm`` to ``folder`` (model.py, weights.pt and one JSON file per ``extra_json`` entry).

    The files go to a temporary folder beside ``folder`` that is renamed at the end; ``check``, if
    given, is called with the model re-loaded from the temporary folder before the rename.

    Raises:
        ResifyError: ``folder`` exists and is not empty (without ``force``), is not writable, or
            the model cannot be written as source.
    """
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ResifyError(f"output folder '{target}' exists and is not empty; choose another or pass --force")
    source = render_source(gm)
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
        # mkdtemp makes it 0700; the folder gets the mode mkdir would give it (read from a probe
        # folder: os.umask can only be read by setting it, which races with other threads)
        probe = tmp / ".mode"
        probe.mkdir()
        tmp.chmod(probe.stat().st_mode & 0o777)
        probe.rmdir()
    except OSError as e:
        raise ResifyError(f"cannot write to '{parent}': {e.strerror}; choose a writable output folder") from e
    try:
        (tmp / _MODULE_FILE).write_text(source)
        torch.save(gm.state_dict(), tmp / _WEIGHTS_FILE)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2) + "\n")
        if check is not None:
            check(load(tmp))
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
