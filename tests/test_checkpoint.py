"""resify.save / load / remove and apply(plan=): a conversion re-applied exactly to a freshly built
model, loaded strictly, resumed in a new process to the bit, and undone."""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
from reference import is_resify_key

import resify
from resify import checkpoint
from resify.planning.plan_files import CONVERSION_FILE


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))  # the same in every process


def _trained(model):
    with torch.no_grad():  # as if trained: every resify tensor away from its initial value
        for name, p in model.named_parameters():
            if is_resify_key(name):
                p.add_(0.25)
    return model


@pytest.mark.parametrize("form", ["plan", "dict", "json file"])
def test_apply_with_a_plan_carries_it_out_exactly(form, tmp_path):
    converted = resify.apply(build(), X, gate="rezero", projection="pad", group=2)
    plan = resify.applied_plan(converted)
    given = {"plan": plan, "dict": plan.to_dict(), "json file": tmp_path / "plan.json"}[form]
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    again = resify.apply(build(), plan=given)
    assert resify.applied_plan(again) == plan
    assert again.state_dict().keys() == converted.state_dict().keys()
    again.load_state_dict(_trained(converted).state_dict())  # strict
    torch.testing.assert_close(again(X), converted(X))


def test_a_plan_on_another_model_names_the_first_mismatch():
    plan = resify.applied_plan(resify.apply(build(), X))
    wider = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    with pytest.raises(resify.RewriteError, match=r"site at '2' expects 16 output channels at '2', found 32"):
        resify.apply(wider, plan=plan)
    shorter = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(resify.RewriteError, match=r"site at '2' expects 16 output channels at '2', found 4"):
        resify.apply(shorter, plan=plan)
    holed = nn.Sequential(*build()[:2], nn.Identity(), nn.Identity(), *build()[4:])  # no layer '2'
    with pytest.raises(resify.RewriteError, match=r"site at '2' needs layer '2', which the model does not run"):
        resify.apply(holed, plan=plan)

    class Other(nn.Sequential):
        pass

    with pytest.raises(resify.PlanError, match="the plan was made for a Sequential, found a Other"):
        resify.apply(Other(*build()), plan=plan)
    with pytest.raises(resify.PlanError, match="plan= carries its own policy, found gate"):
        resify.apply(build(), plan=plan, gate="rezero")


def test_a_checkpoint_reloads_after_a_release_changes_the_defaults(tmp_path, monkeypatch):
    converted = _trained(resify.apply(build(), X, gate="layerscale", max_added=None))
    resify.save(converted, tmp_path)
    # a later release plans otherwise by default: no projections at all
    monkeypatch.setattr(
        resify.planning.policy.Policy, "from_kwargs", _identity_only(resify.planning.policy.Policy.from_kwargs)
    )
    assert all(s.kind == "identity" for s in resify.plan(build(), X).sites)
    loaded = resify.load(build(), tmp_path)
    assert loaded.state_dict().keys() == converted.state_dict().keys()
    torch.testing.assert_close(loaded(X), converted(X))


def _identity_only(from_kwargs):
    def patched(**kwargs):
        return from_kwargs(**{"shortcut": "identity", **kwargs})

    return staticmethod(patched).__func__


def test_resifys_tensors_load_with_weights_only_and_a_tampered_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_safetensors", lambda: None)  # the torch format
    converted = _trained(resify.apply(build(), X, gate="rezero"))
    resify.save(converted, tmp_path)
    tensors = torch.load(tmp_path / checkpoint.TENSORS_FILE, weights_only=True)
    assert sorted(tensors) == sorted(k for k in converted.state_dict() if is_resify_key(k))
    assert json.loads((tmp_path / CONVERSION_FILE).read_text())["tensors"] == sorted(tensors)
    del tensors["resify.2.alpha"]
    tensors["resify.9.alpha"] = torch.zeros(1)
    torch.save(tensors, tmp_path / checkpoint.TENSORS_FILE)
    with pytest.raises(resify.ModelLoadError, match=r"missing resify\.2\.alpha; unexpected resify\.9\.alpha"):
        resify.load(build(), tmp_path)
    (tmp_path / checkpoint.TENSORS_FILE).unlink()
    with pytest.raises(resify.ModelLoadError, match="found none"):
        resify.load(build(), tmp_path)


def test_the_safetensors_file_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    converted = _trained(resify.apply(build(), X, gate="rezero"))
    resify.save(converted, tmp_path)
    assert (tmp_path / "resify.safetensors").exists() and not (tmp_path / checkpoint.TENSORS_FILE).exists()
    torch.testing.assert_close(resify.load(build(), tmp_path)(X), converted(X))


def test_a_file_from_a_newer_release_is_refused_with_the_version_it_needs(tmp_path):
    resify.save(resify.apply(build(), X), tmp_path)
    doc = json.loads((tmp_path / CONVERSION_FILE).read_text())
    (tmp_path / CONVERSION_FILE).write_text(json.dumps({**doc, "file_schema_version": 7}))
    with pytest.raises(resify.PlanError, match="file_schema_version 7, written by a newer resify"):
        resify.load(build(), tmp_path)
    (tmp_path / CONVERSION_FILE).write_text(json.dumps({**doc, "plan": {**doc["plan"], "schema_version": 9}}))
    with pytest.raises(resify.PlanError, match="found 9: it was written by a newer resify"):
        resify.load(build(), tmp_path)


def test_a_changed_owner_forward_is_a_warning_naming_it(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(2, 4)
    resify.save(resify.apply(Net(), x, shortcut="identity"), tmp_path)
    doc = json.loads((tmp_path / CONVERSION_FILE).read_text())
    assert list(doc["fingerprints"]) == [""]
    doc["fingerprints"][""] = "0" * 16
    (tmp_path / CONVERSION_FILE).write_text(json.dumps(doc))
    with pytest.warns(resify.ResifyWarning, match=r"the code of 'Net' \(Net.forward\) changed"):
        resify.load(Net(), tmp_path)


def test_a_plain_state_dict_loads_strictly_into_the_plan_reapplied(tmp_path):
    converted = _trained(resify.apply(build(), X, gate="rezero"))
    torch.save(converted.state_dict(), tmp_path / "sd.pt")
    (tmp_path / "plan.json").write_text(json.dumps(resify.applied_plan(converted).to_dict()))
    again = resify.apply(build(), plan=tmp_path / "plan.json")
    again.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))  # strict
    torch.testing.assert_close(again(X), converted(X))


def test_remove_gives_the_original_keys_and_outputs_back():
    model = build()
    converted = resify.apply(model, X, preserve_output=True, gate="rezero")
    plain = resify.remove(converted)
    assert type(plain) is nn.Sequential and list(plain.state_dict()) == list(model.state_dict())
    assert resify.applied_plan(plain) is None and resify.applied_plan(converted) is not None
    torch.testing.assert_close(plain(X), converted(X))  # β still 0, α still 1
    with pytest.warns(resify.ResifyWarning, match="removed shortcuts that were in use"):
        resify.remove(_trained(converted))
    with pytest.raises(resify.PlanError, match="nothing to remove"):
        resify.remove(model)


def test_remove_narrows_a_layer_a_dense_site_widened():
    model = build()
    converted = resify.apply(model, X, shortcut="dense")
    plain = resify.remove(converted)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(plain(X), model(X))  # the widened weights start at zero


_RESUME = textwrap.dedent(
    """
    import sys, torch, torch.nn as nn, resify
    sys.path.insert(0, {tests!r})
    from test_checkpoint import build, X
    folder, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(1)
    y = torch.randn(5, 4)
    if mode == "start":
        model = resify.apply(build(), X, gate="rezero")
    else:
        model = resify.load(build(), folder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if mode == "resume":
        state = torch.load(folder + "/train.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    resify.save(model, folder)
    torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, folder + "/train.pt")
    """
)


def test_a_training_run_resumed_in_a_new_process_equals_an_uninterrupted_one(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RESUME.format(tests=str(__import__("pathlib").Path(__file__).parent)))

    def run(folder, steps, mode):
        proc = subprocess.run(
            [sys.executable, str(script), str(folder), str(steps), mode], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return torch.load(folder / "train.pt", weights_only=True)["model"]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", 6, "start")
    run(tmp_path / "b", 3, "start")
    resumed = run(tmp_path / "b", 3, "resume")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k  # to the bit


def test_a_hugging_face_model_round_trips_through_one_folder(tmp_path):
    T = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        config = T.LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
        )
        model = T.LlamaForCausalLM(config).eval()
        skipless = resify.apply(model, torch.randint(0, 99, (2, 7)), gate="rezero")
        assert resify.applied_plan(skipless).sites
        _trained(skipless)
        skipless.save_pretrained(tmp_path)
        resify.save(skipless, tmp_path)
        fresh = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        restored = resify.load(fresh, tmp_path).eval()
    ids = torch.randint(0, 99, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, skipless.eval()(ids).logits)
