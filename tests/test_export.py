"""Source export (resify/cli/export.py): the written model.py re-loads without resify and computes what
the converted model computes; a failed export leaves nothing behind."""

import json
import re

import pytest
import torch
import torch.nn as nn

import resify
from resify.cli.export import load, load_line, render_source, save
from resify.errors import ResifyError


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


@pytest.fixture
def converted():
    torch.manual_seed(0)
    gm = resify.apply(_cnn().eval(), torch.randn(2, 3, 8, 8), gate="layerscale", graph_module=True)
    with torch.no_grad():  # weights and statistics away from their initial values
        for t in gm.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.1)
    return gm


def test_the_saved_model_reloads_with_the_same_state_and_outputs(converted, tmp_path):
    target = save(converted, tmp_path / "out", extra_json={"plan.json": {"sites": 2}})
    assert sorted(p.name for p in target.iterdir()) == ["model.py", "plan.json", "weights.pt"]
    assert json.loads((target / "plan.json").read_text()) == {"sites": 2}
    loaded = load(target)
    assert type(loaded).__name__ == "ResifiedModel" and not loaded.training
    expected = converted.state_dict()
    assert list(loaded.state_dict()) == list(expected)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    x = torch.randn(5, 3, 11, 11)  # another batch and size than the example's
    torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


def test_the_source_needs_torch_only_and_its_load_line_works(converted, tmp_path):
    source = render_source(converted, class_name="Exported")
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert {name.split(".")[0] for name in imports} <= {"math", "operator", "pathlib", "torch"}, imports
    namespace: dict = {}
    exec(compile(source, "model.py", "exec"), namespace)
    rebuilt = namespace["Exported"]()
    rebuilt.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), converted(x), rtol=0, atol=0)

    folder = save(converted, tmp_path / "m")
    scope: dict = {}
    exec(load_line(folder), scope)
    torch.testing.assert_close(scope["model"](x), converted(x), rtol=0, atol=0)


class ReadsMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.training:
            h = h * 0.5
        return torch.relu(self.fc2(h))


def test_a_model_whose_forward_reads_the_mode_keeps_both_forwards(tmp_path):
    torch.manual_seed(0)
    converted = resify.apply(ReadsMode().train(), torch.randn(2, 4), graph_module=True)
    assert isinstance(converted, resify.DualGraphModule)
    loaded = load(save(converted, tmp_path / "m"))
    assert loaded.training
    x = torch.randn(3, 4)
    for mode in (True, False):
        torch.testing.assert_close(loaded.train(mode)(x), converted.train(mode)(x), rtol=0, atol=0)
    h = torch.relu(converted.fc1(x)) + x  # eval: the identity shortcut around fc1, no halving
    assert torch.allclose(loaded.eval()(x), torch.relu(converted.fc2(h)) + h)


def test_a_non_empty_folder_is_refused_unless_forced(converted, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(
        ResifyError, match=r"output folder '.*out' exists and is not empty; choose another or pass --force"
    ):
        save(converted, target)
    assert (target / "notes.txt").read_text() == "mine"
    save(converted, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.py", "weights.pt"]


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_a_failed_export_leaves_nothing_behind(converted, tmp_path):
    model = resify.apply(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Custom()), torch.randn(2, 4), leaf_modules=[Custom], graph_module=True
    )
    with pytest.raises(
        ResifyError, match=r"cannot write module '2' \(.*Custom\) as source: .*standard torch.nn layers"
    ):
        save(model, tmp_path / "custom")
    assert list(tmp_path.iterdir()) == []

    def refuse(reloaded):
        assert type(reloaded).__name__ == "ResifiedModel"
        raise ValueError("the check failed")

    with pytest.raises(ValueError, match="the check failed"):
        save(converted, tmp_path / "checked", check=refuse)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary folder


def _ruff_findings(path) -> str:
    """What ruff says about a written file (pyflakes, statements, whitespace); '' when it is clean."""
    pytest.importorskip("ruff")
    import subprocess
    import sys

    rules = "F,E7,E9,W"  # unused imports and names, semicolons, syntax, trailing whitespace
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", rules, "--output-format", "concise", path],
        capture_output=True,
        text=True,
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


def test_the_written_source_reads_like_hand_written_pytorch(tmp_path):
    """Attributes and indexes instead of getattr, no `;  x = None`, only the imports it uses, and a
    comment where each shortcut starts; ruff finds nothing in it."""
    from reference import ImprovedResidualNetwork

    torch.manual_seed(0)
    model = ImprovedResidualNetwork([16, 8, 8, 4], False)
    converted = resify.apply(model, torch.randn(3, 16), gate="rezero", graph_module=True)
    folder = save(converted, tmp_path / "m")
    source = (folder / "model.py").read_text()
    assert "getattr(" not in source and ";" not in source and "= None" not in source
    assert "self.layers[0][0](x)" in source and "self.resify.layers_0_0.alpha" in source
    assert [line for line in source.splitlines() if line.startswith(("import ", "from "))] == [
        "from pathlib import Path",
        "import torch",
        "from torch import nn",
    ]
    comments = [line.strip() for line in source.splitlines() if line.strip().startswith("# resify")]
    assert comments == [
        "# resify shortcut 'layers_0_0' (projection: Linear(16, 8), gate rezero) around layers.0.0",
        "# resify shortcut 'layers_1_0' (identity, gate rezero) around layers.1.0",
        "# resify shortcut 'layers_2_0' (projection: Linear(8, 4), gate rezero) around layers.2.0",
    ]
    # each comment stands right before the first line of its shortcut (the gate is read there)
    lines = [line.strip() for line in source.splitlines()]
    after = [lines[lines.index(c) + 1] for c in comments]
    assert after[1] == "resify_layers_1_0_alpha = self.resify.layers_1_0.alpha"
    assert _ruff_findings(folder / "model.py") == ""
    x = torch.randn(5, 16)
    torch.testing.assert_close(load(folder)(x), converted(x), rtol=0, atol=0)


def test_a_sequential_is_written_as_a_module_dict_whose_layers_keep_their_names(converted, tmp_path):
    source = render_source(converted)
    assert "class ResifiedModel(nn.ModuleDict):" in source and 'self["0"](input_1)' in source
    assert 'self.resify["0"].gamma' in source and "getattr(" not in source
    loaded = load(save(converted, tmp_path / "m"))
    assert [name for name, _ in loaded.named_children()] == [name for name, _ in converted.named_children()]
    assert "(resify): ModuleDict(" in repr(loaded) and "(3): Conv2d(8, 16" in repr(loaded)  # names, not positions
    assert _ruff_findings(tmp_path / "m" / "model.py") == ""


def test_each_forward_of_a_model_that_reads_the_mode_marks_its_shortcuts():
    converted = resify.apply(
        ReadsMode().train(), torch.randn(2, 4), gate=None, graph_module=True
    )  # ungated: the comments name the form only
    source = render_source(converted)
    train, evaluate = source.split("def _forward_train(")[1].split("def _forward_eval(")
    for body in (train, evaluate):
        marked = [line.strip() for line in body.splitlines() if line.strip().startswith("# resify")]
        assert marked == [
            "# resify shortcut 'fc1' (identity) around fc1",
            "# resify shortcut 'fc2' (identity) around fc2",
        ]


class Keyed(nn.Module):
    """Children whose names no attribute can reach and that a ModuleDict's methods would shadow."""

    def __init__(self):
        super().__init__()
        self.add_module("keys", nn.Linear(4, 4))
        self.add_module("0", nn.Linear(4, 4))

    def forward(self, x):
        return torch.relu(getattr(self, "0")(torch.relu(self.keys(x))))


def test_names_no_attribute_reaches_still_round_trip(tmp_path):
    torch.manual_seed(0)
    converted = resify.apply(nn.Sequential(Keyed()), torch.randn(2, 4), graph_module=True)
    source = render_source(converted)
    assert 'getattr(self["0"], "0")' in source and 'self["0"].keys(' in source
    x = torch.randn(3, 4)
    torch.testing.assert_close(load(save(converted, tmp_path / "m"))(x), converted(x), rtol=0, atol=0)


def test_the_check_before_the_rename_runs_the_new_source(converted, tmp_path):
    from pathlib import Path

    seen = []

    def check(reloaded):
        written = Path(type(reloaded).forward.__code__.co_filename)  # the temporary folder's model.py
        seen.append((written.parent.name, written.read_text()))

    save(converted, tmp_path / "m", check=check)
    ((folder, source),) = seen
    assert folder.startswith(".m.") and source == (tmp_path / "m" / "model.py").read_text()
    assert "# resify shortcut '0'" in source and "getattr(" not in source


def test_the_source_calls_no_private_torch_api_and_registers_each_parameter_once(tmp_path):
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4))
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, mask=None):
            h = torch.relu(self.a(x + self.pos))
            if mask is not None:
                h = h * mask
            return self.b(torch.relu(self.b(h)))

    torch.manual_seed(0)
    model, x = Masked(), torch.randn(2, 4)
    gm = resify.apply(model, x, graph_module=True)
    source = render_source(gm)
    assert "_symbolic_trace" not in source and "torch.fx" not in source
    assert source.count("register_parameter('pos'") == 1
    assert re.search(
        r"\n        assert mask\w* is None, ", source
    )  # the argument traced at its default, in plain Python
    save(gm, tmp_path / "m")
    torch.testing.assert_close(load(tmp_path / "m")(x), gm(x))
