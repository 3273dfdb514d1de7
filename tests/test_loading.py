"""resify.cli.loading: MODEL_SPEC → model and example input; --input-shape, --input-kwarg and --dtype values."""

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from resify.cli.loading import (
    BUILDER_NAMES,
    DTYPES,
    MODEL_SPEC_FORMS,
    load_model,
    parse_input_kwarg,
    parse_input_shape,
    parse_input_shapes,
)
from resify.constants import image_size
from resify.errors import ModelLoadError, ResifyError

ROOT = Path(__file__).resolve().parents[1]
SEED = str(ROOT / "examples" / "seed_mlp.py")


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- parse_input_shape ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,shape",
    [
        ("8,3,32,32", (8, 3, 32, 32)),
        ("4,128", (4, 128)),
        ("7", (7,)),
        ("2,3,4,5,6", (2, 3, 4, 5, 6)),
        ("2x16", (2, 16)),
        (" 2, 16 ", (2, 16)),
        ("2,16,", (2, 16)),
    ],
)
def test_parse_input_shape_takes_any_rank(text, shape):
    x = parse_input_shape(text)
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == shape and x.dtype == torch.float32


@pytest.mark.parametrize("text", ["3,x", "3,,4", "x", "3x", ",4", "4,a", "2.5,4"])
def test_parse_input_shape_refuses_a_part_that_is_not_a_number(text):
    with pytest.raises(ModelLoadError, match=r"--input-shape expects positive integers separated by commas"):
        parse_input_shape(text)


def test_parse_input_shape_without_a_shape_is_none():
    assert parse_input_shape(None) is None
    assert parse_input_shape("") is None
    assert parse_input_shape(None, "int64") is None


def test_parse_input_shape_is_seeded():
    torch.manual_seed(1)
    a = parse_input_shape("4,5")
    torch.manual_seed(2)
    b = parse_input_shape("4,5")
    assert a is not None and b is not None
    torch.testing.assert_close(a, b)
    assert a.std() > 0.5  # random normal, not zeros


@pytest.mark.parametrize("name", list(DTYPES))
def test_every_dtype_name_makes_a_tensor_of_that_dtype(name):
    x = parse_input_shape("3,50", name)
    assert x is not None and x.dtype == DTYPES[name] and tuple(x.shape) == (3, 50)
    if not DTYPES[name].is_floating_point:  # token ids 0 or 1: valid for any vocabulary
        assert set(x.flatten().tolist()) <= {0, 1}


def test_dtypes_maps_names_to_torch_dtypes():
    assert all(isinstance(d, torch.dtype) for d in DTYPES.values())
    assert DTYPES["float32"] is torch.float32 and DTYPES["long"] is torch.int64 and DTYPES["int"] is torch.int32


@pytest.mark.parametrize(
    "text,dtype,message",
    [
        ("ten", "float32", r"--input-shape expects positive integers separated by commas.*found 'ten'"),
        ("8,0,3", "float32", r"--input-shape expects positive integers.*found '8,0,3'"),
        ("8,-3", "float32", r"--input-shape expects positive integers.*found '8,-3'"),
        (",", "float32", r"--input-shape expects positive integers.*found ','"),
        ("2.5,3", "float32", r"--input-shape expects positive integers.*found '2.5,3'"),
        ("2,3", "int65", r"--dtype expects one of float32, .*; found 'int65'"),
    ],
)
def test_parse_input_shape_rejects(text, dtype, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_input_shape(text, dtype)


def test_a_dtype_suffix_takes_the_place_of_the_dtype():
    x = parse_input_shape("2,16:int64", "float16")
    assert x is not None and x.dtype == torch.int64 and tuple(x.shape) == (2, 16)
    with pytest.raises(ModelLoadError, match=r"--dtype expects one of .*found 'int65'"):
        parse_input_shape("2,16:int65")


def test_parse_input_shapes_gives_one_input_per_shape_in_order():
    assert parse_input_shapes(()) is None
    one = parse_input_shapes(["4,5"])
    assert isinstance(one, torch.Tensor)
    torch.testing.assert_close(one, parse_input_shape("4,5"))  # one shape: the tensor itself, as before
    image, tokens, again = parse_input_shapes(["2,3,8,8", "2,7:int64", "2,3,8,8"], "float64")
    assert (tuple(image.shape), image.dtype) == ((2, 3, 8, 8), torch.float64)
    assert (tuple(tokens.shape), tokens.dtype) == ((2, 7), torch.int64)
    assert not torch.equal(image, again)  # seeded by position: two inputs of one shape differ
    torch.testing.assert_close(image, parse_input_shapes(["2,3,8,8"], "float64"))  # and repeat
    with pytest.raises(ModelLoadError, match=r"--input-shape expects positive integers.*found ''"):
        parse_input_shapes(["2,3", ""])  # an empty one would shift the inputs after it


# --- parse_input_kwarg ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,name,shape,dtype",
    [
        ("attention_mask=2,16:int64", "attention_mask", (2, 16), torch.int64),
        ("mask=2,16", "mask", (2, 16), torch.float32),
        (" pixel_values =1,3,8,8:float16", "pixel_values", (1, 3, 8, 8), torch.float16),
    ],
)
def test_parse_input_kwarg(text, name, shape, dtype):
    got_name, tensor = parse_input_kwarg(text)
    assert got_name == name and tuple(tensor.shape) == shape and tensor.dtype == dtype


@pytest.mark.parametrize(
    "text,message",
    [
        ("nope", r"--input-kwarg expects NAME=SHAPE\[:DTYPE\].*found 'nope'"),
        ("=2,3", r"--input-kwarg expects NAME=SHAPE\[:DTYPE\].*found '=2,3'"),
        ("1mask=2,3", r"--input-kwarg expects NAME=SHAPE\[:DTYPE\].*found '1mask=2,3'"),
        ("mask=", r"--input-kwarg expects NAME=SHAPE\[:DTYPE\].*found 'mask='"),
        ("mask=:int64", r"--input-kwarg expects NAME=SHAPE\[:DTYPE\]"),
        ("mask=two", r"--input-shape expects positive integers.*found 'two'"),
        ("mask=2,3:int65", r"--dtype expects one of .*found 'int65'"),
    ],
)
def test_parse_input_kwarg_rejects(text, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_input_kwarg(text)


# --- load_model: each MODEL_SPEC form --------------------------------------------------------


def test_model_spec_forms_are_the_four_load_model_takes():
    assert list(MODEL_SPEC_FORMS) == ["path/to/model.py", "path/to/model.py:NAME", "torchvision:NAME", "timm:NAME"]
    assert all(name in MODEL_SPEC_FORMS["path/to/model.py"] for name in BUILDER_NAMES)


def test_load_a_file_finds_its_one_model():
    loaded = load_model(SEED)
    assert type(loaded.model).__name__ == "ImprovedResidualNetwork"
    assert loaded.source == f"{SEED}:model"
    assert loaded.example_kwargs is None


def test_load_a_file_with_name(tmp_path):
    path = _write(
        tmp_path,
        "two.py",
        """
        import torch
        import torch.nn as nn

        small = nn.Linear(2, 2)
        big = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

        def example_input():
            return torch.ones(3, 4)

        example_kwargs = {"scale": torch.ones(1)}
    """,
    )
    loaded = load_model(f"{path}:big")
    assert isinstance(loaded.model, nn.Sequential) and loaded.source == f"{path}:big"
    torch.testing.assert_close(loaded.example_input, torch.ones(3, 4))
    assert loaded.example_kwargs is not None and list(loaded.example_kwargs) == ["scale"]
    assert isinstance(load_model(f"{path}:small").model, nn.Linear)


@pytest.mark.parametrize("builder", BUILDER_NAMES)
def test_load_a_file_with_a_builder_function(tmp_path, builder):
    path = _write(
        tmp_path,
        f"{builder}_file.py",
        f"""
        import torch.nn as nn

        def {builder}():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    """,
    )
    loaded = load_model(path)
    assert isinstance(loaded.model, nn.Sequential) and loaded.source == f"{path}:{builder}"
    assert loaded.example_input is None


def test_load_a_file_does_not_run_its_main_block(tmp_path):
    path = _write(
        tmp_path,
        "script.py",
        """
        import torch.nn as nn

        model = nn.Linear(3, 3)
        if __name__ == "__main__":
            raise SystemExit("the __main__ block ran")
    """,
    )
    assert isinstance(load_model(path).model, nn.Linear)


def test_the_loader_ignores_losses_and_loop_variables(tmp_path):
    path = _write(
        tmp_path,
        "train.py",
        """
        import torch.nn as nn

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        criterion = nn.CrossEntropyLoss()  # no parameters: not a model
        for m in model.modules():  # leaves m, a submodule of model: not a model either
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
    """,
    )
    assert load_model(path).source == f"{path}:model"


@pytest.mark.parametrize("name", ["resnet18", "inception_v3"])
def test_load_torchvision_with_the_image_size_it_was_built_for(name):
    pytest.importorskip("torchvision")
    loaded = load_model(f"torchvision:{name}")
    size = image_size(name)
    assert loaded.source == f"torchvision:{name}"
    assert tuple(loaded.example_input.shape) == (1, 3, size, size)
    assert size == (299 if name == "inception_v3" else 224)


# --- load_model: what must fail, each with a ModelLoadError that says what to do --------------


def _failing_files(tmp_path):
    files = {
        "syntax.py": "def broken(:\n",
        "failing.py": "import torch\nraise RuntimeError('no GPU here')\n",
        "empty.py": "x = 1\n",
        "several.py": "import torch.nn as nn\na = nn.Linear(2, 2)\ndef build_model():\n    return nn.Linear(3, 3)\n",
        "returns_int.py": "def build_model():\n    return 3\n",
        "needs_args.py": "def build_model(width):\n    pass\n",
        "opens_checkpoint.py": "def build_model():\n    return open('/no/such/checkpoint.pt', 'rb')\n",
        "bad_example.py": "import torch.nn as nn\nmodel = nn.Linear(2, 2)\nexample_input = 'a string'\n",
        "failing_example.py": (
            "import torch.nn as nn\nmodel = nn.Linear(2, 2)\ndef example_input():\n    raise ValueError('no data')\n"
        ),
        "bad_kwargs.py": "import torch.nn as nn\nmodel = nn.Linear(2, 2)\nexample_kwargs = [1, 2]\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name: str(tmp_path / name) for name in files}


def test_load_model_failures(tmp_path):
    f = _failing_files(tmp_path)
    cases = [
        (str(tmp_path / "missing.py"), r"model file '.*missing\.py' not found; give a path to a \.py file"),
        ("x" * 5000 + ".py", r"cannot read model file 'xxx.*: File name too long; check the path"),
        (f["syntax.py"], r"syntax error in .*syntax\.py:1: .*fix the file"),
        (f["failing.py"], r"running .*failing\.py:2 failed with RuntimeError: no GPU here; the file must import"),
        (f["empty.py"], r"defines no module-level nn\.Module .*build_model, get_model, make_model; add one"),
        (f["several.py"], r"several candidate models \(a, build_model\); pick one as .*several\.py:a or "),
        (f"{f['several.py']}:nothing", r"has no attribute 'nothing'; check the name after ':'"),
        (f"{f['empty.py']}:x", r"empty\.py:x is a int, not an nn\.Module or a function returning one"),
        (f["returns_int.py"], r"returns_int\.py:build_model\(\) returned a int, not an nn\.Module"),
        (f["needs_args.py"], r"build_model\(\) failed with TypeError: .*width.*; resify calls it with no arguments"),
        (
            f["opens_checkpoint.py"],
            r"build_model\(\) failed at .*opens_checkpoint\.py:2 with FileNotFoundError: .*checkpoint\.pt",
        ),
        (f["bad_example.py"], r"example_input in .*bad_example\.py must be a tensor.*; found str"),
        (f["failing_example.py"], r"example_input\(\) failed at .*failing_example\.py:4 with ValueError: no data"),
        (f["bad_kwargs.py"], r"example_kwargs in .*bad_kwargs\.py must be a dict of inputs by name.*; found list"),
    ]
    for spec, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_model(spec)


def test_load_model_errors_are_resify_errors(tmp_path):
    """The CLI catches ResifyError only: a user's OSError must arrive as one (ModelLoadError)."""
    f = _failing_files(tmp_path)
    with pytest.raises(ResifyError) as info:
        load_model(f["opens_checkpoint.py"])
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_load_unknown_torchvision_model():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match=r"torchvision:NAME needs torchvision; pip install torchvision"):
            load_model("torchvision:resnet9000")
    else:
        with pytest.raises(ModelLoadError, match=r"torchvision has no model 'resnet9000'; try one of \w+"):
            load_model("torchvision:resnet9000")
        with pytest.raises(ModelLoadError, match=r"no model 'resnet_9000'; try one of .*resnet"):
            load_model("torchvision:resnet_9000")
