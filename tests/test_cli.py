"""The command line, with click's CliRunner and a fresh interpreter for the converted model."""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import resify
import resify.api
from resify.cli import cli
from resify.cli.loading import DTYPES, MODEL_SPEC_FORMS
from resify.constants import GATE_POLICIES, PLAN_SCHEMA_VERSION, SHORTCUTS

ROOT = Path(__file__).resolve().parents[1]
SEED = str(ROOT / "examples" / "seed_mlp.py")
VGG = str(ROOT / "examples" / "vgg_cnn.py")
try:  # a test extra; without it, torchvision:NAME must say how to install it
    import torchvision  # noqa: F401

    HAS_TORCHVISION = True
except ImportError:
    HAS_TORCHVISION = False


def run(*args, columns=100):
    """Exit code and output of ``resify ARGS`` in a terminal ``columns`` wide (COLUMNS, as a shell sets it)."""
    result = CliRunner(env={"COLUMNS": str(columns)}).invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_version_and_help():
    code, out = run("--version")
    assert code == 0 and resify.__version__ in out
    for command in ([], ["inspect"], ["convert"]):
        code, out = run(*command, "--help")
        assert code == 0 and "Usage:" in out
    proc = subprocess.run([sys.executable, "-m", "resify", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "inspect" in proc.stdout and "convert" in proc.stdout


def test_inspect_seed_mlp_text():
    code, out = run("inspect", SEED)
    assert code == 0, out
    assert "ImprovedResidualNetwork (" in out and "11,009 parameters, 5 layers, symbolic trace" in out
    assert "layers.0.0  [10, 128] -> [10, 64]  Linear(128, 64)" in out
    assert "total: 5 shortcut(s) (5 projection)" in out
    assert "first layer:" in out and "verdict vanishing → healthy" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_inspect_vgg_json_and_plot(tmp_path):
    png = tmp_path / "flow.png"
    code, out = run("inspect", VGG, "--format", "json", "--plot", png)
    assert code == 0, out
    doc = json.loads(out)
    assert doc["schema_version"] == 1 and doc["model"]["class"] == "Sequential"
    kinds = {s["start"]: (s["kind"], s["projection"]) for s in doc["plan"]["sites"]}
    assert kinds["3"] == ("identity", None)
    assert kinds["6"] == ("projection", "Conv2d(32, 64, 1) + BatchNorm2d + AvgPool2d(→out)")
    assert doc["report"]["headline"].startswith("first layer")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_markdown_and_policy_flags():
    code, out = run("inspect", SEED, "--format", "markdown", "--shortcut", "identity", "--no-report")
    assert code == 0, out
    assert out.startswith("# ImprovedResidualNetwork") and "no shortcut will be added" in out
    code, out = run("inspect", VGG, "--gate", "rezero", "--exclude", "2*", "--exclude", "0", "--no-report")
    assert code == 0, out
    assert "excluded by pattern '2*'" in out and "excluded by pattern '0'" in out and "rezero" in out
    code, out = run("inspect", SEED, "--shortcut", "dense", "--no-report")
    assert code == 0 and "widens layers.1.0 by 128" in out


def test_inspect_torchvision_model():
    pytest.importorskip("torchvision")
    code, out = run("inspect", "torchvision:resnet18", "--no-report")
    assert code == 0, out
    assert "existing shortcuts (8)" in out


def test_inspect_a_timm_model_shows_where_its_shortcuts_live():
    pytest.importorskip("timm")
    code, out = run("inspect", "timm:vgg11", "--no-report", "--input-shape", "1,3,64,64")
    assert code == 0, out
    assert "resify plan for VGG" in out and "features.0" in out
    # a span from features into pre_logits: the model's own forward is rewritten, traced on the example
    assert "warning: VGG has data-dependent control flow" in out
    code, out = run("inspect", "timm:resnet_nope", "--no-report")
    assert code == 2 and "timm has no model 'resnet_nope'" in out


def test_inspect_a_detector_lists_the_modules_kept_whole():
    pytest.importorskip("torchvision")
    code, out = run("inspect", "torchvision:ssdlite320_mobilenet_v3_large", "--no-report")
    assert code == 0, out
    assert "kept whole" in out and "(the model itself): untraceable" in out
    assert "forwards rewritten" in out and "backbone." in out


def test_inspect_with_a_saved_plan_shows_what_it_does_and_refuses_policy_flags(tmp_path):
    out_dir = tmp_path / "converted"
    code, out = run("convert", VGG, "-o", out_dir, "--gate", "rezero")
    assert code == 0, out
    code, out = run("inspect", VGG, "--plan", out_dir / "plan.json", "--no-report")
    assert code == 0, out
    assert "rezero" in out and "total: 6 shortcut(s)" in out
    code, out = run("inspect", VGG, "--plan", out_dir / "plan.json", "--gate", "layerscale", "--no-report")
    assert code == 2 and "--plan carries its own policy; drop --gate" in out


@pytest.mark.parametrize("spec,extra", [(SEED, []), (VGG, ["--gate", "layerscale"])])
def test_convert_then_load_in_a_fresh_interpreter(tmp_path, spec, extra):
    out_dir = tmp_path / "converted"
    code, out = run("convert", spec, "-o", out_dir, *extra)
    assert code == 0, out
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.py", "plan.json", "report.json", "weights.pt"]
    assert json.loads((out_dir / "plan.json").read_text())["schema_version"] == PLAN_SCHEMA_VERSION
    assert "headline" in json.loads((out_dir / "report.json").read_text())
    line = out.strip().splitlines()[-1]
    assert line.startswith("import runpy; model = runpy.run_path(")
    # the same conversion in-process
    from resify.cli.loading import load_model

    loaded = load_model(spec)
    policy = {"gate": "layerscale"} if extra else {}
    expected_model = resify.apply(loaded.model, loaded.example_input, **policy).eval()
    x = loaded.example_input
    torch.save(x, tmp_path / "x.pt")
    script = (
        f"{line}\nimport torch\nmodel.eval()\nx = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(model(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected_model(x), rtol=1e-5, atol=1e-6)
    # OUT exists and is not empty: refused unless --force
    code, out = run("convert", spec, "-o", out_dir)
    assert code == 1 and "exists and is not empty" in out and "--force" in out
    code, out = run("convert", spec, "-o", out_dir, "--force")
    assert code == 0, out


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_errors_are_one_line_without_traceback(tmp_path):
    syntax = _write(tmp_path, "syntax.py", "def broken(:\n")
    failing = _write(tmp_path, "failing.py", "import torch\nraise RuntimeError('no GPU here')\n")
    empty = _write(tmp_path, "empty.py", "x = 1\n")
    several = _write(
        tmp_path,
        "several.py",
        """
        import torch.nn as nn
        a = nn.Linear(2, 2)
        def build_model():
            return nn.Linear(3, 3)
    """,
    )
    untraceable = _write(
        tmp_path,
        "untraceable.py",
        """
        import torch, torch.nn as nn
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
            def forward(self, x):
                return self.fc(torch.from_numpy(x.numpy()))
        model = M()
    """,
    )
    conv_first = _write(tmp_path, "conv_first.py", "import torch.nn as nn\nmodel = nn.Sequential(nn.Conv2d(3, 8, 3))\n")
    a_file = _write(tmp_path, "a_file.txt", "not a folder")
    cases = [
        (["inspect", str(tmp_path / "missing.py")], 2, "not found"),
        (["inspect", syntax], 2, "syntax error in"),
        (["inspect", failing], 2, "failed with RuntimeError: no GPU here"),
        (["inspect", empty], 2, "defines no module-level nn.Module"),
        (["inspect", several], 2, f"{several}:a or {several}:build_model"),
        (["inspect", f"{several}:nothing"], 2, "has no attribute 'nothing'"),
        (["inspect", f"{empty}:x"], 2, "is a int, not an nn.Module"),
        (["inspect", untraceable, "--input-shape", "2,4"], 1, "could not trace M"),
        (
            ["inspect", conv_first],
            2,
            "does not fix the input shape; pass one, e.g. example_input=torch.randn(2, 3, 32, 32)",
        ),
        (["inspect", SEED, "--input-shape", "10,128", "--input-shape", "10,4"], 2, "takes 1 by position"),
        (
            ["inspect", SEED, "--input-shape", "10,99"],
            1,
            "layer 'layers.0.0' (Linear) rejected input of shape [10, 99]",
        ),
        (["inspect", SEED, "--input-shape", "ten"], 2, "--input-shape expects positive integers"),
        (["inspect", SEED, "--shortcut", "sideways"], 2, "Invalid value for '--shortcut'"),
        (
            ["inspect", "torchvision:resnet9000"],
            2,
            "torchvision has no model 'resnet9000'"
            if HAS_TORCHVISION
            else "torchvision:NAME needs torchvision; pip install torchvision",
        ),
        (["convert", SEED, "-o", str(Path(a_file) / "out")], 1, "cannot write to"),
    ]
    for args, status, message in cases:
        code, out = run(*args)
        assert code == status, (args, code, out)
        assert message in out, (args, out)
        assert "Traceback" not in out, (args, out)
        errors = [line for line in out.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and message in errors[0], (args, out)  # one line says it all
        assert len(out.strip().splitlines()) <= 4, (args, out)  # click adds its usage line to usage errors


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "inspect", SEED, "--input-shape", "10,99"])
    assert result.exit_code != 0 and isinstance(result.exception, resify.TraceError)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_debug_works_after_the_subcommand_too(tmp_path, command):
    args = [command, SEED, "--input-shape", "10,99"] + (["-o", str(tmp_path / "out")] if command == "convert" else [])
    result = CliRunner().invoke(cli, [*args, "--debug"])
    assert result.exit_code == 1 and isinstance(result.exception, resify.TraceError)
    assert "Error:" not in result.output
    result = CliRunner().invoke(cli, args)  # without it: one line, no exception object escapes
    assert result.exit_code == 1 and "Error: layer 'layers.0.0' (Linear) rejected input" in result.output
    assert isinstance(result.exception, SystemExit)


def test_a_bug_inside_resify_is_not_swallowed(monkeypatch):
    """Only ResifyError is the user's to fix; any other exception is a bug and keeps its traceback."""
    bug = TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'")

    def broken_apply(*args, **kwargs):
        raise bug

    monkeypatch.setattr(resify.api, "converted", broken_apply)
    result = CliRunner().invoke(cli, ["inspect", SEED, "--no-report"])
    assert result.exit_code == 1 and result.exception is bug
    assert "Error:" not in result.output


def _choices(command, name):
    (param,) = [p for p in cli.commands[command].params if p.name == name]
    return list(param.type.choices)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_choice_lists_come_from_the_library(command):
    assert _choices(command, "shortcut") == list(SHORTCUTS)
    assert _choices(command, "gate") == ["none" if g is None else g for g in GATE_POLICIES]
    assert _choices(command, "dtype") == list(DTYPES)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_help_explains_model_spec_and_input_shape(command):
    code, out = run(command, "--help")
    assert code == 0, out
    for form in MODEL_SPEC_FORMS:
        assert form in out, (form, out)
    assert "Loading a file runs its Python code" in out
    assert "--input-shape SHAPE" in out and "8,3,32,32 or 4,128" in out and "N,C,H,W" not in out
    assert "--debug" in out
    if command == "inspect":
        assert "--format [text|markdown|json]" in out and "markdown for an issue" in out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--gate", "none", "--gate-init", "0.5"], "--gate-init needs a gate: found --gate-init 0.5 with --gate none"),
        (
            ["--gate", "rezero", "--gate-init", "nan"],
            "Invalid value for '--gate-init': expected a finite number, found 'nan'",
        ),
        (["--gate", "rezero", "--shortcut", "dense"], "--gate does not combine with --shortcut dense"),
        (["--dense-max-growth", "4"], "--dense-max-growth needs --shortcut dense: found --shortcut auto"),
        (
            ["--dense-max-growth", "4", "--shortcut", "identity"],
            "--dense-max-growth needs --shortcut dense: found --shortcut identity",
        ),
        (
            ["--gate", "layerscale", "--gate-init", "0.1", "--preserve-output"],
            "--preserve-output needs the gate to start at 1 to keep the outputs unchanged: found --gate-init 0.1",
        ),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_contradictory_flags_are_usage_errors(tmp_path, command, flags, message):
    """Checked before the model is loaded: the missing model file is not what the user is told about."""
    out_args = ["-o", str(tmp_path / "out")] if command == "convert" else []
    code, out = run(command, tmp_path / "missing.py", *out_args, *flags)
    assert code == 2, out
    assert f"Error: {message}" in out and "Usage: " in out and "not found" not in out, out
    assert not (tmp_path / "out").exists()


def test_the_flag_check_agrees_with_the_library(tmp_path):
    """The CLI words Policy.from_kwargs' cross-field rules in flags: both must reject the same sets."""
    missing = tmp_path / "missing.py"
    grid = itertools.product(
        ["none", "auto", "rezero"], ["auto", "dense"], [None, 1.0, 0.5, float("inf")], [False, True], [None, 4]
    )
    for gate, shortcut, gate_init, preserve, growth in grid:
        flags = ["--gate", gate, "--shortcut", shortcut]
        policy: dict = {"gate": None if gate == "none" else gate, "shortcut": shortcut}
        if gate_init is not None:
            flags += ["--gate-init", str(gate_init)]
            policy["gate_init"] = gate_init
        if preserve:
            flags.append("--preserve-output")
            policy["preserve_output"] = True
        if growth is not None:
            flags += ["--dense-max-growth", str(growth)]
            policy["dense_max_growth"] = growth
        try:
            resify.Policy.from_kwargs(**policy)
            library_accepts = True
        except resify.PlanError:
            library_accepts = False
        code, out = run("inspect", missing, *flags)
        assert code == 2, (flags, out)
        # accepted flags get as far as loading the (missing) model; rejected ones stop at the check
        assert ("not found" in out) == library_accepts and ("Usage: " in out) != library_accepts, (flags, out)


@pytest.mark.parametrize(
    "flags",
    [
        ["--gate", "rezero", "--gate-init", "0.5"],
        ["--gate", "layerscale", "--gate-init", "1", "--preserve-output"],
        ["--gate", "rezero", "--preserve-output"],
        ["--shortcut", "dense", "--dense-max-growth", "4"],
    ],
)
def test_consistent_flags_pass_the_check(flags):
    code, out = run("inspect", SEED, "--no-report", *flags)
    assert code == 0, out
    assert "total:" in out


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`resify inspect … | head -1`: no 'Broken pipe' error, no 'Exception ignored' at exit."""
    model_file = _write(
        tmp_path,
        "deep.py",
        """
        import torch.nn as nn
        model = nn.Sequential(*[m for _ in range(300) for m in (nn.Linear(8, 8), nn.ReLU())])
    """,
    )
    env = {**os.environ, "PYTHONUNBUFFERED": ""}  # buffered stdout, as in a user's shell
    proc = subprocess.Popen(
        [sys.executable, "-m", "resify", "inspect", model_file, "--no-report", "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # about 200 kB are still to come: more than a pipe holds
    _, err = proc.communicate(timeout=300)
    assert first == "{\n"
    assert "Broken pipe" not in err and "Exception ignored" not in err and "Traceback" not in err, err
    assert err == "" and proc.returncode == 1, (proc.returncode, err)


def test_convert_output_folder_has_the_umask_mode(tmp_path):
    out_dir = tmp_path / "converted"
    old = os.umask(0o027)
    try:
        code, out = run("convert", SEED, "-o", out_dir)
    finally:
        os.umask(old)
    assert code == 0, out
    assert out_dir.stat().st_mode & 0o777 == 0o777 & ~0o027 == 0o750


def test_writing_the_plot_where_it_cannot_go_is_one_line(tmp_path):
    a_file = _write(tmp_path, "a_file.txt", "not a folder")
    code, out = run("inspect", SEED, "--plot", Path(a_file) / "flow.png")
    assert code == 1, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "cannot write the plot to" in errors[0] and "choose a writable path" in errors[0]


def test_export_names_settings_a_repr_leaves_out():
    """AvgPool2d's repr leaves out ceil_mode: the written source must still set it."""
    from resify.cli.export import render_source

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2, ceil_mode=True)
    )
    source = render_source(resify.apply(model, torch.randn(1, 3, 7, 7), graph_module=True))
    assert "ceil_mode=True" in source


def test_export_round_trip_keeps_pooled_shortcuts_exact_on_odd_sizes(tmp_path):
    """7×7 maps: the shortcut's ceil_mode pooling must survive being written as source."""
    import torch.nn as nn

    import resify
    from resify.cli.export import load, save

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 3),
    ).eval()
    x = torch.randn(2, 3, 7, 7)
    converted = resify.apply(model, x, graph_module=True).eval()
    assert any(getattr(s.shortcut, "pool", False) for s in resify.applied_plan(converted).sites)
    save(converted, tmp_path / "m")
    loaded = load(tmp_path / "m").eval()
    torch.testing.assert_close(loaded(x), converted(x), rtol=0, atol=0)


def test_convert_keeps_what_forward_does_in_each_mode(tmp_path):
    """A model whose forward reads self.training: the written model.py has a forward per mode."""
    model_file = tmp_path / "noisy.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch
        import torch.nn as nn
        import torch.nn.functional as F

        class Noisy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

            def forward(self, x):
                if self.training:
                    x = x + torch.randn_like(x)
                return F.dropout(torch.relu(self.fc2(torch.relu(self.fc1(x)))), 0.5, training=self.training)

        torch.manual_seed(0)
        model = Noisy()
    """)
    )
    out = tmp_path / "out"
    code, text = run("convert", model_file, "-o", out)
    assert code == 0, text
    source = (out / "model.py").read_text()
    assert "def _forward_train(" in source and "def _forward_eval(" in source
    from resify.cli.export import load

    loaded = load(out)
    x = torch.randn(4, 8)
    loaded.eval()
    torch.testing.assert_close(loaded(x), loaded(x))  # eval: no noise, no dropout
    loaded.train()
    assert not torch.equal(loaded(x), loaded(x))


def test_the_loader_ignores_losses_and_loop_variables(tmp_path):
    model_file = tmp_path / "train.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch.nn as nn

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        criterion = nn.CrossEntropyLoss()  # no parameters: not a model
        for m in model.modules():  # leaves m, a submodule of model: not a model either
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
    """)
    )
    code, out = run("inspect", model_file, "--no-report")
    assert code == 0, out
    assert "train.py:model" in out and "total: 2 shortcut(s)" in out


def test_token_models_take_an_integer_dtype_and_inputs_by_name(tmp_path):
    model_file = tmp_path / "tokens.py"
    model_file.write_text(
        textwrap.dedent("""
        import torch
        import torch.nn as nn

        class Tagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(100, 16)
                self.fc1, self.fc2, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)

            def forward(self, input_ids, attention_mask=None):
                h = self.emb(input_ids)
                if attention_mask is not None:
                    h = h * attention_mask[..., None]
                return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h)))))

        model = Tagger()
    """)
    )
    code, out = run("inspect", model_file, "--input-shape", "2,7", "--no-report")
    assert code == 1 and "rejected input of dtype float32" in out and "--dtype int64" in out, out
    code, out = run(
        "inspect",
        model_file,
        "--input-shape",
        "2,7",
        "--dtype",
        "int64",
        "--input-kwarg",
        "attention_mask=2,7",
        "--no-report",
    )
    assert code == 0, out
    assert "total: 2 shortcut(s)" in out
    code, out = run("inspect", model_file, "--input-shape", "2,7", "--dtype", "int64", "--input-kwarg", "nope")
    assert code == 2 and "--input-kwarg expects NAME=SHAPE[:DTYPE]" in out
    code, out = run("inspect", model_file, "--input-shape", "2,7", "--dtype", "int65")
    assert code == 2 and "Invalid value for '--dtype'" in out


def test_export_keeps_a_module_registered_under_two_names(tmp_path):
    import torch.nn as nn

    from resify.cli.export import load, save

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.blocks = nn.Sequential(nn.Sequential(self.enc, nn.ReLU()), nn.Linear(8, 8), nn.ReLU())

        def forward(self, x):
            return self.blocks(x)

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 8)
    converted = resify.apply(model, x, graph_module=True)
    save(converted, tmp_path / "m")
    loaded = load(tmp_path / "m")  # a strict load_state_dict: every alias key has its module
    torch.testing.assert_close(loaded(x), converted(x))
    assert loaded.get_submodule("enc") is loaded.get_submodule("blocks.0.0")


_SHALLOW = """
import torch
from torch import nn

model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
example_input = torch.randn(8, 16)
"""


def test_cost_flags_reach_the_plan_and_a_healthy_original_is_told_shortcuts_are_optional(tmp_path):
    path = tmp_path / "shallow.py"
    path.write_text(_SHALLOW)
    code, out = run("inspect", path)
    assert code == 0, out
    assert "Linear(16, 32)" in out and "verdict healthy → healthy" in out
    assert "shortcuts are optional here; this plan would add 2 shortcut(s) and 544 parameters (+31.41%)" in " ".join(
        out.split()
    )
    code, out = run("inspect", path, "--projection", "pad", "--no-report")
    assert code == 0 and "zero-pad features 16→32" in out and "+0 parameters" in out
    assert "optional" not in out  # no report, no verdict: nothing to say
    code, out = run("inspect", path, "--projection", "conv", "--projection-cost", "0.5", "--no-report")
    assert code == 0 and "0: a Linear(16, 32) projection of 544 parameters, more than 0.5× the span's own 544" in out
    assert "total: 1 shortcut(s) (1 identity); 2 skipped" in out


@pytest.mark.parametrize("value", ["-1", "lots", "inf"])
def test_a_bad_budget_is_a_usage_error(value):
    code, out = run("inspect", SEED, "--max-added", value)
    assert code == 2 and "expected a non-negative number or 'none'" in out and value in out


def test_max_added_none_lifts_the_budget():
    code, out = run("inspect", SEED, "--max-added", "none", "--no-report", "--format", "json")
    assert code == 0 and json.loads(out)["plan"]["policy"]["max_added"] is None


def test_inspect_html_writes_one_self_contained_page(tmp_path):
    page = tmp_path / "report.html"
    code, out = run("inspect", SEED, "--html", page)
    assert code == 0, out
    assert out.rstrip().endswith(f"page written to {page}") and "\n\npage written to" in out
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "src=" not in html and "href=" not in html
    for part in ("ImprovedResidualNetwork", "examples/seed_mlp.py:model", 'id="architecture"', 'id="plan"'):
        assert part in html
    assert html.count('class="arc site projection"') == 5 and "Linear(128, 64)" in html
    # the gradient flow before and after, with the figures the text prints
    assert 'id="gradient-flow"' in html and "first layer: 83× more gradient; verdict vanishing → healthy" in html
    assert '<td>layers.0.0</td><td>Linear</td><td class="n">1.20e-05</td><td class="n">9.95e-04</td>' in html


def test_inspect_html_with_plot_json_or_no_report(tmp_path):
    page, png = tmp_path / "r.html", tmp_path / "flow.png"
    code, out = run("inspect", SEED, "--html", page, "--plot", png)
    assert code == 0 and out.rstrip().endswith(f"plot written to {png}\npage written to {page}"), out
    code, out = run("inspect", SEED, "--html", page, "--format", "json")  # stdout stays one JSON document
    assert code == 0 and json.loads(out)["plan"]["layers"] == [f"layers.{i}.0" for i in range(5)]
    code, out = run("inspect", SEED, "--html", page, "--no-report")
    assert code == 0 and 'id="gradient-flow"' not in page.read_text() and 'id="plan"' in page.read_text()


def test_writing_the_page_where_it_cannot_go_is_one_line(tmp_path):
    a_file = _write(tmp_path, "a_file.txt", "not a folder")
    code, out = run("inspect", SEED, "--html", Path(a_file) / "report.html", "--no-report")
    assert code == 1 and "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "cannot write the page to" in errors[0] and "choose a writable path" in errors[0]


def test_help_lists_the_html_option():
    code, out = run("inspect", "--help")
    assert code == 0 and "--html" in out and "self-contained page" in " ".join(out.split())


_LONG_NAMES = """
import torch
from reference import LongNames  # tests/ is on the path while the tests run

model = LongNames()
example_input = torch.randn(2, 3, 8, 8)
"""


def test_a_wide_terminal_shows_names_and_labels_whole_a_narrow_one_cuts_them(tmp_path):
    path = _write(tmp_path, "long_names.py", _LONG_NAMES)
    names = [f"feature_extraction_stages.{i}.residual_block_body.0" for i in range(3)]
    code, out = run("inspect", path, "--no-report", columns=200)
    assert code == 0, out
    for name in names:
        assert f"\n{name}  " in out, out
    assert "Conv2d(16, 72, 1) + BatchNorm2d  " in out and "…" not in out
    code, out = run("inspect", path, columns=200)  # the gradient-flow tables too
    assert code == 0 and all(f"\n{name}  Conv2d  " in out for name in names), out
    code, out = run("inspect", path, "--no-report", columns=80)
    assert code == 0, out
    assert max(map(len, out[out.index("resify plan for") :].splitlines())) <= 80  # (the file's path is not cut)
    table = out[out.index("\nspan") :]
    table = table[: table.index("\n\n")]  # the sites' table: the notes below it wrap, never cut
    assert names[0] not in table and "…sidual_block_body.0" in table  # the notes' prose wraps, never cuts
    assert "+ BatchNorm2d" not in table and "Conv2d(16,…" in table


def test_input_shape_is_repeatable_one_per_positional_input(tmp_path):
    path = _write(
        tmp_path,
        "two_inputs.py",
        """
        import torch
        from torch import nn

        class ImageAndTokens(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.emb = nn.Conv2d(3, 8, 3, padding=1), nn.Embedding(50, 8)
                self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

            def forward(self, image, tokens):
                h = torch.relu(self.conv(image)).mean((2, 3)) + self.emb(tokens).mean(1)
                return self.fc2(torch.relu(self.fc1(h)))

        model = ImageAndTokens()
    """,
    )
    code, out = run("inspect", path, "--input-shape", "2,3,8,8", "--input-shape", "2,5:int64", "--no-report")
    assert code == 0, out
    assert "example input [[2, 3, 8, 8], [2, 5]]" in out and "total: " in out
    code, out = run("inspect", path, "--input-shape", "2,3,8,8", "--no-report")
    assert code == 2 and "Traceback" not in out, out
    assert "takes an input 'tokens' that example_input does not provide" in out
    assert "(CLI: one --input-shape per positional input, in order, or --input-kwarg tokens=SHAPE)" in out
    code, out = run("inspect", path, "--input-shape", "2,3,8,8", "--input-shape", "2,5:int65")
    assert code == 2 and "--dtype expects one of" in out and "found 'int65'" in out, out


def test_an_embedding_first_model_is_told_to_pass_token_ids(tmp_path):
    path = _write(tmp_path, "tokens_first.py", "import torch.nn as nn\nmodel = nn.Sequential(nn.Embedding(100, 8))\n")
    code, out = run("inspect", path)
    assert code == 2, out
    assert "e.g. example_input=torch.randint(0, 100, (2, 16)) (CLI: --input-shape 2,16:int64)" in out
    assert "torch.randn" not in out


def test_the_advice_is_in_flags_and_never_what_the_run_already_uses():
    code, out = run("inspect", SEED)  # --shortcut auto by default: the advice for the original is carried out
    assert code == 0, out
    assert "resify.apply" not in out and "try " not in out, out
    code, out = run("inspect", SEED, "--shortcut", "identity")  # nothing added: the advice stands, as a flag
    assert code == 0, out
    text = " ".join(out.split())
    assert "before: vanishing: " in text and "; try --shortcut auto: adds a shortcut around every layer" in text
    assert "shortcut='auto'" not in out.split("total:")[-1]  # (the plan's skip reasons name the keyword)
    code, out = run("inspect", SEED, "--format", "json")
    assert code == 0 and json.loads(out)["report"]["before"]["recommendation"] is None


def test_every_layer_excluded_is_refused_with_what_to_try():
    code, out = run("inspect", VGG, "--exclude", "*", "--no-report")
    assert code == 1 and "Traceback" not in out, out
    assert "Error: every layer was excluded (exclude=['*']): no layer is left" in out
    assert "CLI: --exclude '22'" in out
