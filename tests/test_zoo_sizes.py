"""The converted model is a drop-in replacement at other input sizes: a subset of torchvision's zoo
(the full sweep: benchmarks/zoo_sizes.py). Each model is converted at its usual size with batch 2
(default policy and preserve_output=True) and must run, with the original's output shapes (and, with
preserve_output, its outputs), at 160×160 and 256×256 batch 1 and at batch 3, and take a training
step at batch 1 and 2."""

import pytest

torchvision = pytest.importorskip("torchvision")
from benchmarks.zoo_sizes import LABELS, check_sizes  # noqa: E402

# each a few seconds on 2 cores; between them: plain convolutions and an adaptive average pool that
# upsamples at 160 (alexnet), strided blocks with 1×1-conv downsampling (resnet18), fire modules'
# concatenations (squeezenet1_0), inception branches with aux heads in train mode (googlenet),
# squeeze-excitation with hardswish (mobilenet_v3_small) and with stochastic depth in train mode
# (efficientnet_b0), shifted-window attention that pads to its window size (swin_t)
SUBSET = ["alexnet", "efficientnet_b0", "googlenet", "mobilenet_v3_small", "resnet18", "squeezenet1_0", "swin_t"]


@pytest.mark.parametrize("name", SUBSET)
def test_converted_model_runs_at_other_input_sizes_like_the_original(name):
    row = check_sizes(name)
    assert row["status"] == "converted", row["reason"]
    assert row["regressions"] == [], f"{name}: " + "; ".join(row["regressions"])
    # all of these take every input: nothing is excused as "the original fails too"
    assert row["original_failures"] == [], row["original_failures"]
    assert sorted(row["results"]) == sorted(LABELS)
    assert row["max_rel"] is not None and row["max_rel"] <= 1e-4
