"""Source export (resify/export.py): the written model.py re-loads without resify and computes what
the converted model computes; a failed export leaves nothing behind."""

import json

import pytest
import torch
import torch.nn as nn

import resify
from resify.errors import ResifyError
from resify.export import load, load_line, render_source, save


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
    gm = resify.apply(_cnn().eval(), torch.randn(2, 3, 8, 8), gate="layerscale")
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
    converted = resify.apply(ReadsMode().train(), torch.randn(2, 4))
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
    model = resify.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Custom()), torch.randn(2, 4), leaf_modules=[Custom])
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
