"""resify.errors: the error hierarchy (one root, ResifyError) and the warning class."""

import warnings

import pytest

from resify.errors import (
    InputError,
    ModelLoadError,
    PlanError,
    ResifyError,
    ResifyWarning,
    RewriteError,
    TraceError,
)


@pytest.mark.parametrize(
    "cls,parents",
    [
        (TraceError, (ResifyError,)),
        (InputError, (TraceError, ResifyError)),  # a bad input is a trace error too (callers catch either)
        (PlanError, (ResifyError,)),
        (RewriteError, (ResifyError,)),
        (ModelLoadError, (ResifyError,)),
    ],
)
def test_every_error_derives_from_resify_error(cls, parents):
    assert all(issubclass(cls, p) for p in parents)
    with pytest.raises(ResifyError, match="^what was expected, what was found$"):
        raise cls("what was expected, what was found")


@pytest.mark.parametrize("a,b", [(TraceError, PlanError), (PlanError, RewriteError), (RewriteError, ModelLoadError)])
def test_sibling_errors_are_not_caught_as_each_other(a, b):
    assert not issubclass(a, b) and not issubclass(b, a)
    with pytest.raises(a):
        try:
            raise a("x")
        except b:
            pass  # (must not be reached: the error goes on to pytest.raises)


def test_the_root_is_an_exception_and_not_a_builtin_value_or_runtime_error():
    assert issubclass(ResifyError, Exception)
    assert not issubclass(ResifyError, (ValueError, RuntimeError, TypeError))


def test_the_warning_is_a_user_warning_and_not_an_error():
    assert issubclass(ResifyWarning, UserWarning) and not issubclass(ResifyWarning, ResifyError)
    with pytest.warns(ResifyWarning, match="specialised"):
        warnings.warn("trace specialised on the input's shape", ResifyWarning, stacklevel=2)


def test_all_names_every_class_and_only_them():
    import resify.errors as errors

    assert sorted(errors.__all__) == sorted(
        n for n, v in vars(errors).items() if isinstance(v, type) and v.__module__ == errors.__name__
    )
