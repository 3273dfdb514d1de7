"""Converted models under the usual PyTorch machinery (CPU): compile, export, ONNX, TorchScript,
pickling, DDP and FSDP2 over gloo, and the meta-device construction workflow."""

import copy
import datetime
import io
import os
import sys

import pytest
import styles
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from reference import ImprovedResidualNetwork, assert_every_parameter_has_grad

import resify


# (builder, example input shape): a CNN with pooled and strided projections, an MLP, a model
# whose forward reads self.training (a DualGraphModule)
def seed_mlp():
    """The seed guide's plain network: its shortcuts live in its blocks' forwards (owners layers.<i>)."""
    return ImprovedResidualNetwork([8, 16, 16, 8, 4], False)


MODELS = [
    (styles.small_cnn, (2, 3, 32, 32)),
    (styles.deep_mlp, (2, 8)),
    (styles.NoisyTrainer, (4, 8)),
    (seed_mlp, (2, 8)),
]
IDS = [b.__name__ for b, _ in MODELS]
GATES = [
    {"gate": None},  # the ungated form (gate='auto' measures a forward, which a model on meta cannot run)
    {"gate": "rezero"},
    {"gate": "layerscale"},
    {"preserve_output": True},
    {"gate": "rezero", "preserve_output": True},
]


def _converted(build, shape, **policy):
    torch.manual_seed(0)
    model = build().eval()
    return model, resify.apply(model, torch.randn(shape), **policy).eval()


def _batch(shape, n):
    return torch.randn(n, *shape[1:])


@pytest.mark.parametrize("build,shape", MODELS, ids=IDS)
def test_torch_compile_runs_a_training_step(build, shape):
    _, converted = _converted(build, shape, gate="rezero")
    converted.train()
    # aot_eager: Dynamo and AOTAutograd; inductor segfaults in this torch build on the backward of any
    # strided 1x1 convolution (a plain nn.Conv2d too), which is no fault of the converted model
    with torch.no_grad():  # gates away from 0, so that every parameter's gradient is non-trivial
        for name, p in converted.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.5)
    compiled = torch.compile(converted, backend="aot_eager")
    x = _batch(shape, 3)
    grads = []
    for run in (converted, compiled):  # eager, then compiled, from the same random state
        torch.manual_seed(7)
        converted.zero_grad()
        out = run(x)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in converted.named_parameters()}))
    assert_every_parameter_has_grad(converted)
    (eager_out, eager_grads), (compiled_out, compiled_grads) = grads
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("build,shape", MODELS, ids=IDS)
def test_torch_export_with_a_dynamic_batch_dimension(build, shape):
    _, converted = _converted(build, shape, preserve_output=True)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(converted, (_batch(shape, 2),), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = _batch(shape, n)
        torch.testing.assert_close(program.module()(x), converted(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build,shape", MODELS, ids=IDS)
def test_onnx_export_runs_in_onnxruntime_with_equal_outputs(build, shape):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, converted = _converted(build, shape, gate="rezero", gate_init=0.3)
    program = torch.onnx.export(
        converted, (_batch(shape, 2),), dynamo=True, verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    x = _batch(shape, 3)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), converted(x).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build,shape", MODELS, ids=IDS)
def test_torchscript_and_torch_save(build, shape, tmp_path):
    _, converted = _converted(build, shape, gate="layerscale")
    x = _batch(shape, 3)
    traced = torch.jit.trace(converted, (x,))  # traced in eval mode: the eval forward
    torch.testing.assert_close(traced(x), converted(x))
    # torch.jit.script compiles a class's forward from its source: the whole-graph result scripts
    # (the converted model's forwards live on its instances, which script refuses, never skips)
    whole = resify.apply(build().eval(), torch.randn(shape), gate="layerscale", graph_module=True).eval()
    whole.load_state_dict(_whole_state(converted, whole))
    scripted = torch.jit.script(whole)
    torch.testing.assert_close(scripted(x), converted(x))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), converted(x))
    with pytest.raises(Exception):  # any error, as long as it does not script the original forward
        torch.jit.script(converted)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), converted(x))
    torch.testing.assert_close(copy.deepcopy(converted)(x), converted(x))


def _whole_state(converted, whole):
    """The converted model's state under the whole-graph result's names (``resify.<name>`` at the root)."""
    plan = resify.applied_plan(converted)
    names = {f"{s.owner + '.' if s.owner else ''}resify.{s.name}.": None for s in plan.sites}
    whole_plan = resify.applied_plan(whole)
    renamed = {}
    for (prefix, _), site, other in zip(names.items(), plan.sites, whole_plan.sites, strict=True):
        assert (site.start, site.end) == (other.start, other.end)
        renamed[prefix] = f"resify.{other.name}."
    out = {}
    for k, v in converted.state_dict().items():
        for prefix, new in renamed.items():
            if k.startswith(prefix):
                k = new + k[len(prefix) :]
                break
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# meta-device construction: build on meta, convert, to_empty, reset_parameters


def _reset_all(model, seed):
    torch.manual_seed(seed)
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


@pytest.mark.parametrize("policy", GATES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "plain")
def test_meta_device_workflow_gives_the_model_converted_on_the_cpu(policy):
    x = torch.randn(2, 3, 32, 32)
    with torch.device("meta"):
        on_meta = styles.small_cnn()
    from_meta = resify.apply(on_meta, x, **policy)
    assert all(p.device.type == "meta" for p in from_meta.parameters())
    from_meta.to_empty(device="cpu")
    _reset_all(from_meta, seed=7)

    torch.manual_seed(0)
    from_cpu = resify.apply(styles.small_cnn(), x, **policy)
    _reset_all(from_cpu, seed=7)
    a, b = from_meta.state_dict(), from_cpu.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    gates = {k: v for k, v in a.items() if k.rsplit(".", 1)[-1] in ("alpha", "gamma", "beta")}
    assert len(gates) == len(resify.applied_plan(from_cpu).sites) * (
        bool(policy.get("gate")) + policy.get("preserve_output", False)
    )
    for k, v in gates.items():  # not uninitialised memory: their initial values
        want = 0.0 if k.endswith("beta") else resify.applied_plan(from_cpu).policy.effective_gate_init
        assert torch.all(v == want), k


def test_shortcut_reset_parameters_restores_the_gates():
    for policy, alpha in (({"gate_init": 0.25}, 0.25), ({"preserve_output": True}, 1.0)):
        converted = resify.apply(styles.deep_mlp(), torch.randn(2, 8), gate="rezero", **policy)
        holder = converted.get_submodule("resify.2")  # the model's own forward owns its sites: the root
        assert isinstance(holder, resify.Shortcut)
        with torch.no_grad():
            holder.alpha.fill_(3.0)
        holder.reset_parameters()
        assert holder.alpha.tolist() == [alpha]
        if "preserve_output" in policy:
            with torch.no_grad():
                holder.beta.fill_(-1.0)
            holder.reset_parameters()
            assert holder.beta.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# distributed: 2 processes over gloo on the CPU


def _init(rank, world, path):
    dist.init_process_group(
        "gloo", init_method=f"file://{path}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )  # a loaded 2-core machine is slow
    torch.set_num_threads(1)


def _finish():
    """Leave cleanly: no rank goes while the other is still in a collective, and the process ends
    without running the interpreter's teardown (gloo's threads have aborted it there, at random)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _ddp_worker(rank, world, path, out):
    _init(rank, world, path)
    try:
        torch.manual_seed(0)  # the same model on every rank; different data per rank
        model = resify.apply(styles.small_cnn(), torch.randn(2, 3, 16, 16), gate="rezero", gate_init=0.1)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)
        for _ in range(3):
            opt.zero_grad()
            ddp(torch.randn(4, 3, 16, 16)).square().mean().backward()
            opt.step()
        # parameters (BatchNorm statistics are each rank's own: DDP broadcasts them before a forward)
        torch.save({k: v.detach().clone() for k, v in model.named_parameters()}, f"{out}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _fsdp_worker(rank, world, path, out, policy):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, path)
    try:
        mesh = init_device_mesh("cpu", (world,))
        policy = dict(policy)
        with torch.device("meta"):  # "seed": shortcuts in the blocks' forwards (owners layers.<i>)
            model = seed_mlp() if policy.pop("_model", None) == "seed" else styles.deep_mlp(depth=4)
        model = resify.apply(model, torch.randn(2, 8), **policy)
        for m in model.modules():  # every layer the graph calls (the user's and resify's projections);
            if isinstance(m, nn.Linear):  # the gates and β go to the root's group (a Shortcut holder is
                fully_shard(m, mesh=mesh)  # never called itself: the graph calls its children)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        _reset_all(model, seed=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
        full = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
        torch.save(full, f"{out}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _spawn(fn, tmp_path, *args):
    out = str(tmp_path / "state")
    mp.spawn(fn, args=(2, str(tmp_path / "rendezvous"), out, *args), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}") for rank in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_over_gloo_keeps_the_ranks_equal(tmp_path):
    a, b = _spawn(_ddp_worker, tmp_path)
    assert any(k.startswith("resify.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert a["resify.3.alpha"].item() != 0.1  # it trained


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
@pytest.mark.parametrize("policy", GATES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "plain")
def test_fsdp2_shards_every_parameter_resify_adds(policy, tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6")
    a, b = _spawn(_fsdp_worker, tmp_path, policy)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert all(torch.isfinite(v).all() for v in a.values())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_fsdp2_trains_a_model_whose_shortcuts_live_in_its_blocks(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6")
    a, b = _spawn(_fsdp_worker, tmp_path, {"gate": "rezero", "gate_init": 0.1, "_model": "seed"})
    assert any(".resify." in k for k in a)  # under the owners: layers.<i>.resify.0.*
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert all(torch.isfinite(v).all() for v in a.values())
