"""The trace stage: tracers, shapes, derived inputs, and the errors a user can cause."""

import threading

import pytest
import torch
import torch.nn as nn
from reference import ImprovedResidualNetwork, vgg_style_cnn

import resify
from resify.errors import InputError
from resify.tracing.shapes import ShapeRecorder
from resify.tracing.trace import trace


class TakesTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.b(torch.relu(self.a(x)) + y)


class UsesLen(nn.Module):
    """len() and int() of traced sizes: symbolic tracing fails, the concrete tracer copes."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)

    def forward(self, x):
        n = len(x)
        h = torch.relu(self.fc1(x))
        if int(h.size(0)) == n:
            h = self.fc2(h)
        return h.view(n, -1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.from_numpy(x.numpy()))  # leaves torch: no tracer can follow


def test_symbolic_trace_records_shapes_on_every_tensor_node():
    traced = trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), torch.randn(3, 8))
    assert traced.tracer == "symbolic"
    shapes = {n.name: n.meta["resify"].shape for n in traced.graph.nodes if n.meta.get("resify")}
    assert shapes == {"input_1": (3, 8), "_0": (3, 4), "_1": (3, 4), "output": (3, 4)}


def test_tuple_example_input():
    model = TakesTwo()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    converted = resify.apply(model, (x, y))
    plan = resify.applied_plan(converted)
    # relu(a(x)) + y joins two inputs: no existing shortcut (so 'a' is not inside one), and y joins
    # after 'a', outside its span: both layers get an identity shortcut
    assert plan.existing == () and [s.start for s in plan.sites] == ["a", "b"]
    h = torch.relu(model.a(x)) + x + y
    torch.testing.assert_close(converted(x, y), model.b(h) + h)


def test_concrete_tracer_handles_len_and_int():
    model = UsesLen()
    x = torch.randn(5, 6)
    with pytest.warns(resify.ResifyWarning, match=r"\[5, 6\]"):
        converted = resify.apply(model, x)
    assert resify.applied_plan(converted).tracer == "concrete"
    h = torch.relu(model.fc1(x)) + x
    torch.testing.assert_close(converted(x), model.fc2(h) + h)


def test_concrete_trace_does_not_touch_batchnorm_statistics_or_rng():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            y = self.drop(self.bn(self.conv(x)))
            return y if y.shape == x.shape else x

    model = Branchy().train()
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.warns(resify.ResifyWarning):
        converted = resify.apply(model, x)  # identity shortcut only: no new weights drawn
    assert torch.equal(torch.rand(3), expected_next)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    for k, v in converted.state_dict().items():
        if not k.startswith("resify."):
            assert torch.equal(v, state[k]), k


def test_untraceable_model_names_the_source_line():
    with pytest.raises(resify.TraceError, match=r"could not trace Untraceable.*test_trace.py:\d+.*leaf_modules"):
        resify.apply(Untraceable(), torch.randn(2, 4))


def test_leaf_modules_keep_a_module_whole():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Untraceable()

        def forward(self, x):
            return self.inner(x)

    plan = resify.plan(Wrapper(), torch.randn(2, 4), leaf_modules=[Untraceable])
    assert plan.n_layers == 0 and plan.sites == ()
    plan = resify.plan(Wrapper(), torch.randn(2, 4), leaf_modules=["inner"])
    assert plan.n_layers == 0


def test_wrong_input_shape_names_the_layer_and_shape():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(resify.TraceError, match=r"layer '0' \(Linear\) rejected input of shape \[2, 5\]"):
        resify.apply(model, torch.randn(2, 5))


@pytest.mark.parametrize(
    "first, hint",
    [
        (nn.Conv2d(3, 8, 3), r"example_input=torch.randn\(2, 3, 32, 32\) \(CLI: --input-shape 2,3,32,32\)$"),
        (nn.Conv1d(4, 8, 3), r"example_input=torch.randn\(2, 4, 32\) \(CLI: --input-shape 2,4,32\)$"),
        # token ids: integers below the vocabulary's size, not torch.randn
        (nn.Embedding(100, 8), r"example_input=torch.randint\(0, 100, \(2, 16\)\) \(CLI: --input-shape 2,16:int64\)$"),
        (
            nn.LSTM(4, 4),
            r"example_input=torch.randn\(\.\.\.\) \(CLI: --input-shape SHAPE, once per positional input\)$",
        ),
    ],
)
def test_missing_input_asks_for_one_the_first_layer_takes(first, hint):
    with pytest.raises(InputError, match=r"^no example_input given and the first layer .*" + hint):
        resify.plan(nn.Sequential(first))


@pytest.mark.parametrize("bad", [object(), "model.py", nn.Linear])
def test_non_module_is_a_type_error(bad):
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        resify.apply(bad)


def test_bad_example_input_type():
    with pytest.raises(resify.TraceError, match="example_input must be a tensor or a tuple"):
        resify.apply(nn.Linear(3, 3), example_input=3.0)


def test_an_input_on_another_device_than_the_model_is_refused_by_name():
    """A CPU model with a meta input: the meta shape pass alone would accept it, the model would not."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.empty(2, 8, device="meta")
    with pytest.raises(
        resify.TraceError,
        match=r"^example_input is on meta but Sequential's parameters are on cpu; "
        r"move it there first: example_input.to\('cpu'\)$",
    ):
        resify.apply(model, x)
    with pytest.raises(resify.TraceError, match=r"^example_input\[1\] is on meta"):
        resify.plan(model, (torch.randn(2, 8), x))
    with pytest.raises(resify.ResifyError, match=r"^example_input is on meta but"):
        resify.gradient_flow(model, x)
    # a model on meta reads only shapes, wherever its input lies
    converted = resify.apply(model.to("meta"), torch.randn(2, 8))
    assert converted(x).shape == (2, 8)


def test_tensor_constants_made_while_tracing_stay_off_the_users_model():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.offset = torch.ones(4)  # a plain tensor attribute: fx stores it as a constant

        def forward(self, x):
            return self.fc(x) + self.offset

    model = WithConstant()
    names = set(vars(model))
    converted = resify.apply(model, torch.randn(2, 4))
    assert set(vars(model)) == names  # the tracer set its constants on a copy, not on the model
    x = torch.randn(2, 4)
    torch.testing.assert_close(converted(x), model(x) + x)


def test_converted_model_has_its_own_tensors_and_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Tied()
    converted = resify.apply(model, torch.randn(2, 6))
    assert converted.a.weight is converted.b.weight
    assert converted.a.weight is not model.a.weight
    with torch.no_grad():
        converted.a.weight.add_(1.0)
    assert not torch.equal(converted.a.weight, model.a.weight)


class ScaleByMax(nn.Module):
    """Needs a real value (``.item()``): its shapes cannot be found on meta tensors."""

    def forward(self, x):
        return x / x.abs().max().item()


def _shapes(traced):
    return {
        n.name: (n.meta["resify"].shape, n.meta["resify"].dtype) for n in traced.graph.nodes if n.meta.get("resify")
    }


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: ImprovedResidualNetwork([16, 12, 12, 8, 1], False), torch.randn(3, 16)),
        (lambda: vgg_style_cnn(), torch.randn(2, 3, 16, 16)),
        (lambda: TakesTwo(), (torch.randn(2, 8), torch.randn(2, 8))),
        (lambda: nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(24, 5)), torch.tensor([[1, 2, 3, 4]])),
    ],
)
def test_shapes_propagated_on_meta_equal_those_of_a_real_run(make, x):
    model = make().train()
    traced = trace(model, x)
    assert traced.shapes_from == "meta"
    meta_shapes = _shapes(traced)
    assert len(meta_shapes) >= 4
    with torch.no_grad():  # a real run overwrites them
        ShapeRecorder(traced.root, graph=traced.graph).run(*(x if isinstance(x, tuple) else (x,)))
    assert _shapes(traced) == meta_shapes


def test_a_layer_that_needs_real_values_gets_its_shapes_from_a_real_run():
    model = nn.Sequential(nn.Linear(6, 6), ScaleByMax(), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(4, 6)
    traced = trace(model, x, leaf_modules=[ScaleByMax])
    assert traced.tracer == "symbolic" and traced.shapes_from == "run"
    assert _shapes(traced)["_1"] == ((4, 6), torch.float32)
    converted = resify.apply(model, x, leaf_modules=[ScaleByMax], exclude=["3"])
    h = torch.relu(ScaleByMax()(model[0](x) + x))  # an unknown leaf ends the span: the shortcut bridges layer 0
    torch.testing.assert_close(converted(x), model[3](h), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(v, torch.Tensor) and v.is_meta for v in converted.state_dict().values())


def test_training_the_converted_model_leaves_the_users_weights_alone_and_vice_versa():
    model = ImprovedResidualNetwork([8, 8, 8, 1], False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = resify.apply(model, torch.randn(4, 8))
    after_conversion = {k: v.clone() for k, v in converted.state_dict().items()}
    opt = torch.optim.SGD(converted.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        converted(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the user's weights did not move
    moved = [k for k, v in converted.state_dict().items() if not torch.equal(v, after_conversion[k])]
    assert len(moved) >= len(before) - 1  # the converted model's did
    trained = {k: v.clone() for k, v in converted.state_dict().items()}
    with torch.no_grad():  # and writing to the user's model does not reach the converted one
        for p in model.parameters():
            p.zero_()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_the_copy_is_made_on_first_write_not_during_conversion():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    converted = resify.apply(model, torch.randn(2, 8))
    with torch.no_grad():
        model[0].weight.fill_(3.0)  # the user's side is written first
    assert not torch.equal(converted.get_submodule("0").weight, model[0].weight)


def test_meta_pass_uses_the_forwards_defaults_for_inputs_not_given():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale: float = 2.0):
            return torch.relu(self.fc(x)) * scale

    model, x = Scaled(), torch.randn(3, 4)
    traced = trace(model, x)
    assert traced.shapes_from == "meta" and _shapes(traced)["mul"] == ((3, 4), torch.float32)
    torch.testing.assert_close(resify.apply(model, x)(x), (torch.relu(model.fc(x)) + x) * 2.0)


def test_batchnorm_statistics_updated_by_the_converted_model_stay_out_of_the_users():
    model = vgg_style_cnn().eval()  # the user's model, in eval mode: its statistics must not move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = resify.apply(model, torch.randn(2, 3, 16, 16)).train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # BatchNorm kernels write running_mean/var in place; SGD writes the weights
        opt.zero_grad()
        converted(torch.randn(4, 3, 16, 16)).square().mean().backward()
        opt.step()
    assert not torch.equal(converted.get_submodule("1").running_mean, before["1.running_mean"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_without_lazy_clone_the_weights_are_copied_at_once(monkeypatch):
    import resify.rewriting.rewrite as rewrite_stage

    def refuse(t):
        raise RuntimeError("this storage cannot be shared lazily")

    monkeypatch.setattr(rewrite_stage, "_LAZY_CLONE", refuse)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    converted = resify.apply(model, torch.randn(2, 4))
    with torch.no_grad():
        model[0].weight.zero_()
    assert converted.get_submodule("0").weight.abs().sum() > 0
    monkeypatch.setattr(rewrite_stage, "_LAZY_CLONE", None)  # a torch without _lazy_clone
    converted = resify.apply(model, torch.randn(2, 4))
    assert converted.get_submodule("0").weight.data_ptr() != model[0].weight.data_ptr()


def test_a_module_registered_under_two_names_still_gets_meta_shapes():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act = nn.ReLU()
            self.again = self.act  # one module object, two names

        def forward(self, x):
            return self.again(self.fc(self.act(x)))

    traced = trace(Shared(), torch.randn(2, 6))
    assert traced.shapes_from == "meta" and all(v[0] == (2, 6) for v in _shapes(traced).values())


# ---------------------------------------------------------------------------------------------
# the code people write: optional arguments, **kwargs, caches, parametrizations, rebound forwards


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, mask=None, scale=1.0):
        h = torch.relu(self.fc1(x))
        if mask is not None:
            h = h * mask
        return torch.relu(self.fc2(h)) * scale


class HFStyle(nn.Module):
    """forward(input_ids, token_type_ids=None, attention_mask=None, ..., **kwargs), as transformers write it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, output_hidden_states=False, **kwargs):
        h = self.emb(input_ids)
        if token_type_ids is not None:
            h = h + self.emb(token_type_ids)
        h = torch.relu(self.fc1(h))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        out = torch.relu(self.fc2(h))
        return (out, h) if output_hidden_states else out


def test_optional_arguments_stay_optional_at_their_defaults():
    torch.manual_seed(0)
    model = Masked()
    x = torch.randn(2, 4)
    converted = resify.apply(model, x, preserve_output=True)
    torch.testing.assert_close(converted(x), model(x))
    torch.testing.assert_close(converted(torch.randn(5, 4)).shape, (5, 4))
    # an optional argument the trace left at its default: traced again for this call, with the same
    # shortcuts (never silently ignored, never refused)
    mask = torch.rand(2, 4)
    torch.testing.assert_close(converted(x, mask=mask), model(x, mask=mask))
    torch.testing.assert_close(converted(x, mask), model(x, mask))
    gated = resify.apply(model, x)
    with torch.no_grad():  # the shortcuts are there in the new trace too: x + F(x), not F(x)
        assert not torch.allclose(gated(x, mask=mask), model(x, mask=mask))


def test_an_optional_argument_given_by_name_is_traced():
    torch.manual_seed(0)
    model, x, mask = Masked(), torch.randn(2, 4), torch.rand(2, 4)
    converted = resify.apply(model, x, example_kwargs={"mask": torch.ones(2, 4)}, preserve_output=True)
    torch.testing.assert_close(converted(x, mask=mask), model(x, mask=mask))
    torch.testing.assert_close(converted(x), model(x))  # and it stays optional


def test_hugging_face_style_forward_with_kwargs():
    torch.manual_seed(0)
    model = HFStyle()
    ids, mask = torch.randint(0, 10, (2, 5)), torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    converted = resify.apply(model, ids, example_kwargs={"attention_mask": mask}, preserve_output=True)
    torch.testing.assert_close(converted(ids, attention_mask=mask), model(ids, attention_mask=mask))
    other = torch.randint(0, 10, (3, 7))
    torch.testing.assert_close(
        converted(other, attention_mask=torch.ones(3, 7)), model(other, attention_mask=torch.ones(3, 7))
    )
    plain = resify.apply(model, ids, preserve_output=True)  # every optional one at its default
    torch.testing.assert_close(plain(ids), model(ids))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"nope": torch.ones(1)},
            "example_kwargs names 'nope', which Masked.forward.* does not take; it takes x, mask, scale",
        ),
        ({"x": torch.ones(2, 4)}, "'x' given both in example_input and in example_kwargs"),
    ],
)
def test_bad_example_kwargs_are_refused_by_name(kwargs, match):
    with pytest.raises(resify.TraceError, match=match):
        resify.plan(Masked(), torch.randn(2, 4), example_kwargs=kwargs)


def test_a_required_input_not_given_names_the_parameter_and_the_fix():
    with pytest.raises(InputError, match=r"takes an input 'y' .*example_kwargs=\{'y': \.\.\.\}") as e:
        resify.plan(TakesTwo(), torch.randn(2, 8))
    assert str(e.value).endswith("(CLI: one --input-shape per positional input, in order, or --input-kwarg y=SHAPE)")
    assert isinstance(e.value, resify.TraceError)  # an InputError is a TraceError: except clauses keep working


class Caching(nn.Module):
    """Fills a dict during forward (timm's LeViT attention_bias_cache) and logs calls in a list."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.cache, self.calls = {}, []

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.fc1.weight * 2
        self.calls.append(key)
        return self.fc2(torch.relu(x @ self.cache[key]))


def test_the_users_model_is_never_written_to_and_apply_twice_gives_the_same_result():
    torch.manual_seed(0)
    model = Caching()
    example = torch.randn(2, 4)  # the same example: gate='auto' reads figures off its forward
    first = resify.apply(model, example)
    assert model.cache == {} and model.calls == []  # no tracer proxy ever lands in the user's model
    second = resify.apply(model, example)
    x = torch.randn(3, 4)
    torch.testing.assert_close(first(x), second(x))
    assert resify.applied_plan(first) == resify.applied_plan(second)
    assert first.state_dict().keys() == second.state_dict().keys()
    assert model.cache == {} and model.calls == []  # nor when the converted ones run


def test_parametrized_layers_convert_and_keep_their_outputs():
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(8, 8)),
        nn.ReLU(),
        parametrizations.spectral_norm(nn.Linear(8, 8)),
        nn.ReLU(),
        nn.Linear(8, 2),
    ).eval()
    x = torch.randn(4, 8)
    converted = resify.apply(model, x, preserve_output=True).eval()
    torch.testing.assert_close(converted(x), model(x))
    assert [s.start for s in resify.applied_plan(converted).sites] == ["0", "2"]
    converted.train()(x).sum().backward()
    assert all(p.grad is not None for p in converted.parameters())
    flow = resify.gradient_flow(model, x)  # the report sees them as the layers they are
    assert [(r.name, r.kind) for r in flow.layers] == [("0", "Linear"), ("2", "Linear"), ("4", "Linear")]


def test_a_forward_rebound_in_init_is_traced_as_torch_fx_traces_it():
    class Partial(nn.Module):  # timm's FasterNet: self.forward = self.forward_split_cat
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.forward = self.forward_split_cat

        def forward_split_cat(self, x):
            a, b = torch.split(x, [2, 2], dim=1)
            return torch.cat((self.conv(a), b), 1)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Partial(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    expected = torch.fx.symbolic_trace(model)(x)
    converted = resify.apply(model, x, preserve_output=True)
    torch.testing.assert_close(converted(x), expected)


def test_a_python_function_activation_is_the_layers_activation():
    def mish(x):
        return x * torch.tanh(torch.nn.functional.softplus(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            h = h * torch.sigmoid(h)  # swish, written out
            return self.c(mish(self.b(h)))

    traced = trace(Net(), torch.randn(2, 8))
    from resify.analysis.analyze import analyze

    layers = {layer.name: layer for layer in analyze(traced).layers}
    assert layers["a"].roles == ("activation",) and layers["a"].output == "mul"
    assert layers["b"].roles == ("activation",) and layers["b"].output == "mul_1"
    converted = resify.apply(Net(), torch.randn(2, 8), graph_module=True)
    adds = [n for n in converted.graph.nodes if n.name.startswith("add")]
    assert [a.args[0].name for a in adds] == ["mul", "mul_1"]  # after the activation, not before it


def test_the_models_own_error_is_shown_with_real_values():
    class Checks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[1] != 4:
                raise ValueError(f"expected 4 features, got {x.shape[1]}")
            return self.fc(x)

    with pytest.raises(resify.TraceError, match="forward raised ValueError .*expected 4 features, got 5") as e:
        resify.plan(Checks(), torch.randn(2, 5))
    assert "Proxy" not in str(e.value)


def test_a_wrong_dtype_is_named_as_a_dtype():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(resify.TraceError, match="rejected input of dtype float32.*torch.long"):
        resify.plan(model, torch.randn(2, 5))
    assert resify.plan(model, torch.randint(0, 10, (2, 5))).sites


def test_a_module_registered_under_two_names_stays_one_module_with_the_users_names():
    """CoaT registers its position encoders first as cpe1, then inside serial_blocks1.0 as cpe."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)  # registered first: torch.fx names it 'enc'
            self.blocks = nn.Sequential(nn.Sequential(self.enc, nn.ReLU()), nn.Linear(8, 8), nn.ReLU())

        def forward(self, x):
            return self.blocks(x)

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 8)
    whole = resify.apply(model, x, preserve_output=True, graph_module=True)
    called = {str(n.target) for n in whole.graph.nodes if n.op == "call_module"}
    expected = {str(n.target) for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_module"}
    assert expected <= called and "enc" in called  # one module, under the name torch.fx gives it
    converted = resify.apply(model, x, preserve_output=True)
    # the shortcut around 'enc' lives in the module whose forward calls it, under its name there
    assert resify.applied_plan(converted).sites[0].owner == "blocks.0"
    for result in (whole, converted):
        assert set(model.state_dict()) <= set(result.state_dict())  # both names of the shared one too
    assert converted.get_submodule("enc") is converted.get_submodule("blocks.0.0")
    torch.testing.assert_close(converted(x), model(x))


class Stepping(nn.Module):
    """Calls ``step()`` from forward, that is, in the middle of being traced."""

    def __init__(self, step):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.step = step

    def forward(self, x):
        self.step()
        return self.b(torch.relu(self.a(x)))


def test_two_threads_tracing_at_once_each_record_their_own_graph():
    """torch.fx patches nn.Module.__call__ process-wide while it traces: a trace that ends while
    another is under way would leave the other recording with the patch gone."""
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    results, errors = {}, []

    def first():  # lingers in its trace, giving the second one the chance to start its own
        first_inside.set()
        second_inside.wait(1.0)  # never set while the first traces, where traces run one at a time

    def second():  # goes on recording only once the first trace is over
        second_inside.set()
        assert first_done.wait(30.0)

    def run(name, step, done):
        try:
            model = Stepping(step)
            results[name] = (model, trace(model, torch.randn(2, 4)))
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    one = threading.Thread(target=run, args=("first", first, first_done))
    two = threading.Thread(target=run, args=("second", second, threading.Event()))
    one.start()
    assert first_inside.wait(30.0)
    two.start()
    one.join(30.0)
    two.join(30.0)
    assert errors == [] and sorted(results) == ["first", "second"]
    x = torch.randn(3, 4)
    for name, (model, traced) in results.items():
        called = [str(n.target) for n in traced.graph.nodes if n.op == "call_module"]
        assert called == ["a", "b"], name
        torch.testing.assert_close(torch.fx.GraphModule(traced.root, traced.graph)(x), model(x))
