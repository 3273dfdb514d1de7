"""The aligned text table every view writes its rows with (resify/views/cells.py): exact layouts,
columns cut where the width forces it, at their start or their end."""

import pytest

from resify.views.cells import table

# ---------------------------------------------------------------------------------------------
# table: exact layouts

HEADER = ["name", "kind", "value"]
ROWS = [["layers.0.0", "Linear", "1.00e-02"], ["a", "Conv2d", "12"]]

LAYOUTS = {
    "fits": (
        dict(header=HEADER, rows=ROWS, width=100, shrink=0, right=[False, False, True]),
        [
            "name        kind       value",
            "----------  ------  --------",
            "layers.0.0  Linear  1.00e-02",
            "a           Conv2d        12",
        ],
    ),
    "right-justified first column, left last": (
        dict(header=HEADER, rows=ROWS, width=100, shrink=0, right=[True, False, False]),
        [
            "      name  kind    value",
            "----------  ------  --------",
            "layers.0.0  Linear  1.00e-02",
            "         a  Conv2d  12",
        ],
    ),
    "the shrink column cut at its start": (
        dict(header=HEADER, rows=ROWS, width=25, shrink=0, right=[False, False, True]),
        [
            "name     kind       value",
            "-------  ------  --------",
            "…rs.0.0  Linear  1.00e-02",
            "a        Conv2d        12",
        ],
    ),
    "the last shrink column stops at its header": (
        dict(header=HEADER, rows=ROWS, width=10, shrink=0, right=[False, False, True]),
        [
            "name  kind       value",
            "----  ------  --------",
            "…0.0  Linear  1.00e-02",
            "a     Conv2d        12",
        ],
    ),
    "two shrink columns, the first down to 20, the second cut at its end": (
        dict(
            header=["layer", "kind", "n"],
            rows=[["encoder.blocks.11.attention.qkv", "VeryLongModuleClassName", "1"]],
            width=40,
            shrink=(0, 1),
            right=[False, False, True],
            cut_end=(1,),
        ),
        [
            "layer                 kind             n",
            "--------------------  ---------------  -",
            "…ks.11.attention.qkv  VeryLongModule…  1",
        ],
    ),
    "then: cut only once the shrink columns are at their headers (width 20; at 36 the name alone is cut)": (
        dict(
            header=["layer", "shape", "n"],
            rows=[["encoder.blocks.11.attention.qkv", "[2, 8, 8] -> [2, 16, 8]", "1"]],
            width=20,
            shrink=0,
            right=[False, False, True],
            then=(1,),
        ),
        [
            "layer  shape       n",
            "-----  ----------  -",
            "….qkv  …2, 16, 8]  1",
        ],
    ),
    "an added name keeps its mark": (
        dict(
            header=["layer", "n"],
            rows=[["+resify.layers_0_0.proj", "7"], ["layers.0.0", "10"]],
            width=16,
            shrink=0,
            right=[False, True],
        ),
        [
            "layer          n",
            "------------  --",
            "+…s_0_0.proj   7",
            "layers.0.0    10",
        ],
    ),
    "min_widths widen a column": (
        dict(header=["a", "b"], rows=[["x", "1"]], width=80, shrink=0, right=[False, True], min_widths=[0, 5]),
        [
            "a      b",
            "-  -----",
            "x      1",
        ],
    ),
}


@pytest.mark.parametrize("kwargs,lines", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_table_layout(kwargs, lines):
    assert table(**kwargs) == lines
