"""torchvision's detection, segmentation and video models (nothing downloaded): converted, they keep
their class, take and return what the original does, and carry their shortcuts in the backbone.

A detector's forward takes a list of images and cannot be traced: it is converted in the modules
inside it that trace (``plan.whole`` lists the root as untraceable). The models and inputs are
those of ``benchmarks/tasks.py`` (small sizes, a score threshold of 0 so that random weights still
give boxes to compare), which sweeps every detection, segmentation and video model.

The slow cases (each over ~20 s on a shared 2-core machine) run only with RESIFY_SLOW_TESTS=1.
"""

import copy
import os

import pytest
import torch
from reference import is_resify_key

import resify

pytest.importorskip("torchvision")
from benchmarks.tasks import build, example, other_input, targets

#: preserve_output=True: the shortcuts start at β = 0, so the converted model computes the original's
#: numbers; the owners' forwards are regenerated code, so allow for reordered float arithmetic.
RTOL, ATOL = 1e-4, 1e-5

SLOW = (
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("RESIFY_SLOW_TESTS"), reason="slow: set RESIFY_SLOW_TESTS=1"),
)

# name -> a module that must own some of the sites, and the modules resify must keep whole (untraceable)
DETECTORS = {
    # Faster R-CNN: MobileNetV3 + FPN backbone; the RPN and the RoI heads do not trace as a whole
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("backbone", {"", "rpn", "roi_heads"}),
    # SSDlite: the MobileNetV3 features and the extra blocks; the heads trace
    "ssdlite320_mobilenet_v3_large": ("backbone", {""}),
    # RetinaNet: the ResNet-50 is residual already: 2 sites in the backbone (its stem, the FPN), 8 in the heads
    "retinanet_resnet50_fpn": ("backbone", {""}),
    # Mask R-CNN: the mask head (7 of its 10 sites in the RoI heads) runs on boxes (eval) or positive proposals (train)
    "maskrcnn_resnet50_fpn": ("backbone", {"", "rpn", "roi_heads"}),
}
FAST_DETECTORS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"]
DETECTOR_CASES = [pytest.param(n, marks=() if n in FAST_DETECTORS else SLOW) for n in DETECTORS]

# small matrices: one thread is faster, and on a shared machine far steadier (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def conversions():
    """``get(name)``: the original (eval mode), its conversion with preserve_output=True and the plan;
    each built and converted once for the module's tests."""
    done = {}

    def get(name):
        if name not in done:
            model = build(name)
            converted = resify.apply(model, example(name), preserve_output=True)
            done[name] = (model, converted, resify.applied_plan(converted))
        return done[name]

    yield get
    done.clear()


def _assert_outputs_equal(got, want):
    """Equal structure (dict keys, list lengths), shapes, dtypes and values (RTOL, ATOL)."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
        for key in want:
            _assert_outputs_equal(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_outputs_equal(a, b)
    else:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def _assert_sites_under(plan, converted, module):
    """Sites exist, some of them owned under ``module``, every owner a module of the converted model
    that is not kept whole; each site's new parameters are at ``<owner>.resify.<name>``."""
    assert plan.sites, "no site planned"
    kept = {w.module for w in plan.whole}
    owners = [s.owner for s in plan.sites]
    assert kept.isdisjoint(owners), f"sites owned by modules kept whole: {kept & set(owners)}"
    assert any(o == module or o.startswith(module + ".") for o in owners), sorted(set(owners))
    names = dict(converted.named_modules())
    params = dict(converted.named_parameters())
    for s in plan.sites:
        assert s.owner in names
        holder = f"{s.owner}.resify.{s.name}" if s.owner else f"resify.{s.name}"
        assert f"{holder}.beta" in params  # preserve_output: every site has its β, starting at 0
        assert params[f"{holder}.beta"].item() == 0.0


def _assert_gradients(converted):
    added = {n: p for n, p in converted.named_parameters() if is_resify_key(n)}
    assert added
    missing = sorted(n for n, p in added.items() if p.grad is None)
    assert not missing, f"{len(missing)} of {len(added)} resify parameters get no gradient: {missing[:5]}"
    # β multiplies each shortcut: its gradient is the shortcut's product with the output's gradient
    betas = [p.grad.abs().item() for n, p in added.items() if n.endswith(".beta")]
    assert all(torch.isfinite(torch.tensor(betas))) and any(b > 0 for b in betas)


# ------------------------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_detector_converts_in_its_children_with_sites_in_the_backbone(name, conversions):
    model, converted, plan = conversions(name)
    module, kept = DETECTORS[name]
    assert type(converted) is type(model)
    assert converted is not model
    whole = {w.module: w.code for w in plan.whole}
    assert whole.get("") == "untraceable"  # a list of images in: the root is planned in its children
    assert kept <= {m for m, code in whole.items() if code == "untraceable"}, whole
    _assert_sites_under(plan, converted, module)


@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_detector_in_eval_mode_returns_the_originals_detections(name, conversions):
    model, converted, _ = conversions(name)
    for images in (example(name)[0], other_input(name)[0]):  # two images, then three of other sizes
        with torch.no_grad():
            want, got = model(images), converted(images)
        assert isinstance(got, list) and len(got) == len(images)
        expected = {"boxes", "scores", "labels"} | ({"masks"} if "mask" in name else set())
        for detections in want:
            assert set(detections) == expected
            assert len(detections["boxes"]) > 0  # a score threshold of 0: boxes to compare
        _assert_outputs_equal(got, want)


@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_detector_in_train_mode_returns_the_originals_losses_and_trains_every_shortcut(name, conversions):
    model, converted, _ = conversions(name)
    model, converted = copy.deepcopy(model).train(), copy.deepcopy(converted).train()
    images = example(name)[0]
    losses = {}
    for key, m in (("original", model), ("converted", converted)):
        torch.manual_seed(0)  # the same proposals sampled on both sides
        losses[key] = m(images, targets(name, images))
    assert isinstance(losses["converted"], dict)
    assert sorted(losses["converted"]) == sorted(losses["original"])
    _assert_outputs_equal(losses["converted"], losses["original"])
    sum(losses["converted"].values()).backward()
    _assert_gradients(converted)


# ---------------------------------------------------------------------------------------- segmentation
def test_segmentation_model_converts_in_its_backbone_and_keeps_its_output(conversions):
    name = "lraspp_mobilenet_v3_large"
    model, converted, plan = conversions(name)
    assert type(converted) is type(model)
    assert plan.whole == ()  # a tensor in: the root traces whole
    _assert_sites_under(plan, converted, "backbone")
    for (x,) in (example(name), other_input(name)):  # 2×3×64×80, then 3×3×72×56
        with torch.no_grad():
            want, got = model(x), converted(x)
        assert list(got) == ["out"] and got["out"].shape == (len(x), 21, *x.shape[-2:])
        _assert_outputs_equal(got, want)
    converted = copy.deepcopy(converted).train()
    out = converted(*example(name))
    out["out"].logsumexp(1).mean().backward()
    _assert_gradients(converted)


# ----------------------------------------------------------------------------------------------- video
def test_video_model_converts_in_its_features_and_keeps_its_output(conversions):
    name = "r2plus1d_18"  # (2+1)D ResNet: residual blocks already; the factorised stem gets the site
    model, converted, plan = conversions(name)
    assert type(converted) is type(model)
    assert plan.whole == ()
    assert {s.owner for s in plan.sites} == {"stem"}
    _assert_sites_under(plan, converted, "stem")
    for (x,) in (example(name), other_input(name)):  # 1×3×4×32×32, then 2×3×6×40×48
        with torch.no_grad():
            want, got = model(x), converted(x)
        assert got.shape == (len(x), 400)
        _assert_outputs_equal(got, want)
    converted = copy.deepcopy(converted).train()
    converted(*example(name)).logsumexp(1).mean().backward()
    _assert_gradients(converted)


def test_swin3d_traces_whole_and_adds_no_shortcut_inside_its_residual_blocks():
    """Its wrapped ``_get_window_and_shift_size`` fills in the window list it is given: recording
    shapes gives it a list of its own (fx's argument is an immutable_list), so the whole model traces
    (its blocks were once kept whole and their MLPs, inside the blocks' residuals, got shortcuts;
    swin_t, which traces, gets none)."""
    name = "swin3d_t"
    model = build(name)
    plan = resify.plan(model, example(name))
    assert plan.whole == ()
    assert plan.sites == ()
    converted = resify.apply(model, example(name), preserve_output=True)
    assert type(converted) is type(model)
    for (x,) in (example(name), other_input(name)):
        with torch.no_grad():
            _assert_outputs_equal(converted(x), model(x))
