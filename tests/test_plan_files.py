"""resify.planning.plan_files: a saved plan from a Plan, a dict, a JSON file or a conversion folder."""

import json

import pytest
import torch
import torch.nn as nn

import resify
from resify.planning.plan_files import CONVERSION_FILE, read_plan


def _plan():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return resify.plan(model, torch.randn(2, 4))


def test_every_form_reads_back_the_same_plan(tmp_path):
    plan = _plan()
    (tmp_path / "p.json").write_text(json.dumps(plan.to_dict()))
    (tmp_path / CONVERSION_FILE).write_text(json.dumps({"file_schema_version": 1, "plan": plan.to_dict()}))
    for given in (plan, plan.to_dict(), tmp_path / "p.json", str(tmp_path / "p.json"), tmp_path):
        assert read_plan(given) == plan


@pytest.mark.parametrize(
    "text,match",
    [
        ("{", "expected a plan in JSON .* found invalid JSON"),
        ("[1]", "expected a plan \\(a JSON object\\) .* found list"),
        ('{"plan": {}}', "found no file_schema_version"),
        ('{"plan": {}, "file_schema_version": 2}', "file_schema_version 2, written by a newer resify"),
    ],
)
def test_bad_documents_are_one_line_errors(tmp_path, text, match):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(resify.PlanError, match=match):
        read_plan(tmp_path / "p.json")
    with pytest.raises(resify.PlanError, match="cannot read the plan"):
        read_plan(tmp_path / "missing.json")
