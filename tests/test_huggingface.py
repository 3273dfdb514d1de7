"""Hugging Face transformers built from tiny configs (nothing downloaded): forward(input_ids,
attention_mask=None, ..., **kwargs), traced with what is given and everything else at its default."""

import warnings

import pytest
import torch

import resify

T = pytest.importorskip("transformers")

_TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)

# name -> (model, extra example_kwargs); every one has 2 blocks, so 4 residuals
MODELS = {
    "bert": lambda: (T.BertModel(T.BertConfig(**_TEXT)), {}),
    "distilbert": lambda: (
        T.DistilBertModel(T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)),
        {},
    ),
    "t5_encoder": lambda: (
        T.T5EncoderModel(T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
        {},
    ),
    "gpt2": lambda: (T.GPT2Model(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4)), {"use_cache": False}),
    "llama": lambda: (T.LlamaModel(T.LlamaConfig(**_TEXT, num_key_value_heads=2)), {"use_cache": False}),
    "qwen2": lambda: (T.Qwen2Model(T.Qwen2Config(**_TEXT, num_key_value_heads=2)), {"use_cache": False}),
    "vit": lambda: (
        T.ViTModel(
            T.ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
            )
        ),
        {},
    ),
}


def _hidden(output):
    return output["last_hidden_state"] if isinstance(output, dict) else output[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_transformer_keeps_its_residuals_and_its_outputs(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kwargs = MODELS[name]()
    model.eval()
    if name == "vit":
        x, mask = torch.randn(2, 3, 16, 16), {}
    else:
        x = torch.randint(0, 99, (2, 7))
        mask = {"attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", resify.ResifyWarning)
        converted = resify.apply(model, x, example_kwargs={**kwargs, **mask}, preserve_output=True).eval()
    plan = resify.applied_plan(converted)
    assert len(plan.existing) == 4, [(e.start, e.end) for e in plan.existing]  # two per block
    inside = {layer for e in plan.existing for layer in e.layers}
    assert not any(layer in inside for s in plan.sites for layer in s.layers), "a site inside a block"
    with torch.no_grad():
        want = _hidden(model(x, **kwargs, **mask))
        got = _hidden(converted(x, **mask))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_cache_building_forward_says_what_to_try():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.GPT2Model(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4)).eval()
        with pytest.raises(resify.TraceError, match=r"example_kwargs=\{'use_cache': False\}"):
            resify.plan(model, torch.randint(0, 99, (2, 7)))
