"""Hugging Face transformers built from tiny configs (nothing downloaded): forward(input_ids,
attention_mask=None, ..., **kwargs), traced with what is given and everything else at its default."""

import json
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


# ---------------------------------------------------------------------------------------------
# as people build and call them: use_cache at its default, the LM heads, generate, save_pretrained


class SkiplessConfig(T.PretrainedConfig):
    model_type = "resify_skipless_test"

    def __init__(self, vocab_size=50, hidden=32, layers=6, **kwargs):
        self.vocab_size, self.hidden, self.layers = vocab_size, hidden, layers
        super().__init__(**kwargs)


class Skipless(T.PreTrainedModel, T.GenerationMixin):
    """A hand-written decoder-only model on PreTrainedModel whose blocks have no shortcut."""

    config_class = SkiplessConfig

    def __init__(self, config):
        super().__init__(config)
        h = config.hidden
        self.embed = torch.nn.Embedding(config.vocab_size, h)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.GELU(), torch.nn.LayerNorm(h))
            for _ in range(config.layers)
        )
        self.head = torch.nn.Linear(h, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return T.modeling_outputs.CausalLMOutput(logits=self.head(x))


_LM = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
# name -> (builder, example kwargs beyond input_ids, generates)
AS_BUILT = {
    "bert": (lambda: T.BertModel(T.BertConfig(**_LM)), {}, False),
    "distilbert": (
        lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)),
        {},
        False,
    ),
    "gpt2_lm": (
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        ),
        {},
        True,
    ),
    "llama_lm": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_LM, num_key_value_heads=2)), {}, True),
    "qwen2_lm": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_LM, num_key_value_heads=2)), {}, True),
    "t5": (
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)
        ),
        {"decoder_input_ids": torch.zeros(2, 1, dtype=torch.long)},
        True,
    ),
    "skipless": (lambda: Skipless(SkiplessConfig()), {}, True),
    "vit": (
        lambda: T.ViTForImageClassification(
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
        False,
    ),
}


def _built(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build, kwargs, generates = AS_BUILT[name]
        return build().eval(), kwargs, generates


@pytest.mark.parametrize("name", sorted(AS_BUILT))
def test_a_model_as_built_and_called_stays_itself(name, tmp_path):
    model, kwargs, generates = _built(name)
    ids = torch.randint(1, 99 if name != "skipless" else 50, (2, 7)) if name != "vit" else torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = resify.apply(model, ids, example_kwargs=kwargs, preserve_output=True).eval()
        assert type(converted) is type(model) and converted.config is not None
        assert converted.get_input_embeddings() is not None and converted.dtype == torch.float32
        assert converted.device == torch.device("cpu")
        with torch.no_grad():
            want, got = model(ids, **kwargs), converted(ids, **kwargs)
        assert type(got) is type(want)  # ModelOutput subclasses, not dicts
        key = "logits" if "logits" in want else "last_hidden_state"
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
        if generates:  # greedy decoding, with the model's cache at its default
            extra = {"use_cache": False} if name == "skipless" else {}
            a = model.generate(ids, max_new_tokens=4, do_sample=False, **extra)
            b = converted.generate(ids, max_new_tokens=4, do_sample=False, **extra)
            assert torch.equal(a, b)
        converted.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]


def test_the_skipless_model_gets_a_shortcut_per_block_inside_its_blocks():
    model, _, _ = _built("skipless")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = resify.plan(model, torch.randint(0, 50, (2, 7)))
    assert [(s.owner, s.kind) for s in plan.sites] == [(f"blocks.{i}", "identity") for i in range(6)]


def test_a_cache_building_forward_is_converted_in_the_modules_that_trace():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = T.GPT2Model(T.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4)).eval()
        plan = resify.plan(model, torch.randint(0, 99, (2, 7)))  # use_cache left at its default
    assert plan.whole and plan.whole[0].module == "" and plan.whole[0].code == "untraceable"
    assert all(w.code in resify.WHOLE_CODES for w in plan.whole)
