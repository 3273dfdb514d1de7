"""resify.formats: how numbers, ratios, similarities, shapes and exception messages are written."""

import math

import pytest

from resify.formats import first_line, fmt_number, fmt_shape, fmt_similarity, fmt_times


@pytest.mark.parametrize(
    "x,expected",
    [
        (None, "-"),
        (0, "0"),
        (0.0, "0"),
        (-0.0, "0"),  # a negative zero is still written "0"
        (1.0, "1.00e+00"),
        (0.000123, "1.23e-04"),
        (-2.5e7, "-2.50e+07"),
        (12345.0, "1.23e+04"),  # always three significant digits, one format for every magnitude
        (1e-300, "1.00e-300"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (math.nan, "nan"),
    ],
)
def test_fmt_number(x, expected):
    assert fmt_number(x) == expected


@pytest.mark.parametrize(
    "r,expected",
    [
        (None, "-"),
        (0.0, "0×"),  # below 0.1: two significant digits
        (0.05, "0.05×"),
        (0.0123, "0.012×"),
        (0.1, "0.1×"),  # from 0.1 to 10: one decimal
        (3.21, "3.2×"),
        (9.94, "9.9×"),
        (10.0, "10×"),  # from 10: whole numbers with thousands separators
        (412.0, "412×"),
        (12345.6, "12,346×"),
        (99999.0, "99,999×"),
        (1e5, "1.0e+05×"),  # from 1e5: scientific
        (1.5e20, "1.5e+20×"),
        (math.inf, "∞×"),
        (-math.inf, "-"),
        (math.nan, "-"),
    ],
)
def test_fmt_times(r, expected):
    assert fmt_times(r) == expected


@pytest.mark.parametrize(
    "x,expected",
    [
        (None, "-"),
        (0.2981, "0.298"),
        (-0.5, "-0.500"),
        (0.999, "0.999"),  # the band starts above 0.999
        (0.9999997, "1 − 3.0e-07"),
        (0.99995, "1 − 5.0e-05"),
        (1.0, "1.000"),  # exactly 1 is written as a number
        (math.nan, "nan"),
        (math.inf, "inf"),
    ],
)
def test_fmt_similarity(x, expected):
    assert fmt_similarity(x) == expected


@pytest.mark.parametrize(
    "shape,expected",
    [((1, 3, 224, 224), "[1, 3, 224, 224]"), ((), "[]"), ([7], "[7]"), (range(3), "[0, 1, 2]")],
)
def test_fmt_shape(shape, expected):
    assert fmt_shape(shape) == expected


def test_fmt_shape_takes_a_torch_size():
    import torch

    assert fmt_shape(torch.Size([2, 16])) == "[2, 16]"


@pytest.mark.parametrize(
    "error,expected",
    [
        (ValueError("bad shape\nmore detail"), "bad shape"),
        (ValueError("\n  leading blank lines\nrest"), "leading blank lines"),
        (RuntimeError(""), "RuntimeError"),
        (RuntimeError("   \n  "), "RuntimeError"),  # only whitespace: the type's name
        (KeyError(), "KeyError"),
        (KeyError("k"), "'k'"),  # KeyError's str quotes its key
        (TypeError("one line"), "one line"),
    ],
)
def test_first_line(error, expected):
    assert first_line(error) == expected
