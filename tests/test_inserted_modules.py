"""The modules written here (adapters, prefix attention) on an encoder and a decoder."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

from peftbench.methods import RunContext, get_method
from peftbench.methods.adapter import AdaptedLinear, PfeifferOutput
from peftbench.methods.prefix import ENCODER_NAME

CTX = RunContext(total_steps=10, num_labels=3)


def bert(attn="sdpa"):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                     num_labels=3, initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = attn
    return BertForSequenceClassification(cfg).eval()


def qwen(attn="sdpa"):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, num_labels=3, pad_token_id=0, initializer_range=0.1)
    cfg._attn_implementation = attn
    return Qwen2ForSequenceClassification(cfg).eval()


def with_method(model, name, **kw):
    method = get_method(name)(get_method(name).Config(**kw))
    return method.apply(copy.deepcopy(model), CTX)


def hidden(model, **inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 13, 3]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])}


@pytest.mark.parametrize("build, variant, per_layer", [(bert, "houlsby", 2), (qwen, "houlsby", 2), (bert, "ffn", 1),
                                                       (qwen, "ffn", 1), (bert, "pfeiffer", 1)])
def test_adapters_at_init_leave_outputs_unchanged(build, variant, per_layer):
    base = build()
    adapted = with_method(base, "adapter", variant=variant, bottleneck=4)
    kind = PfeifferOutput if variant == "pfeiffer" else AdaptedLinear
    assert sum(isinstance(m, kind) for m in adapted.modules()) == per_layer * 3
    for h0, h1 in zip(hidden(base, **BATCH), hidden(adapted, **BATCH)):
        assert torch.equal(h0, h1)


@pytest.mark.parametrize("build", [bert, qwen])
def test_prefix_changes_every_layer_and_gradient_reaches_every_layer(build):
    base = build()
    model = with_method(base, "prefix", num_virtual_tokens=4, reparameterize=False)
    h_base, h_prefix = hidden(base, **BATCH), hidden(model, **BATCH)
    assert torch.equal(h_base[0], h_prefix[0])  # embeddings untouched
    for layer in range(1, len(h_base)):
        assert not torch.allclose(h_base[layer], h_prefix[layer], atol=1e-4), f"layer {layer} unchanged"
    model.train()
    model(**BATCH, labels=torch.tensor([0, 2])).loss.backward()
    grad = getattr(model, ENCODER_NAME).prefix.grad  # (layers, 2, kv_heads, tokens, head_dim)
    for layer in range(grad.shape[0]):
        assert grad[layer, 0].abs().sum() > 0 and grad[layer, 1].abs().sum() > 0, f"no gradient in layer {layer}"


@pytest.mark.parametrize("build", [bert, qwen])
def test_prefix_eager_equals_sdpa(build):
    eager, sdpa = build("eager"), build("sdpa")
    torch.manual_seed(1)
    a = with_method(eager, "prefix", num_virtual_tokens=3)
    torch.manual_seed(1)
    b = with_method(sdpa, "prefix", num_virtual_tokens=3)
    unpadded = {"input_ids": BATCH["input_ids"][1:]}  # no padding: SDPA may get no mask at all
    with torch.no_grad():
        for inputs in (BATCH, unpadded):
            torch.testing.assert_close(a(**inputs).logits, b(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_mask_extension_keeps_padding_out(attn):
    """A padded row gives the same outputs on its real tokens as the same row alone, unpadded."""
    model = with_method(bert(attn), "prefix", num_virtual_tokens=3)
    with torch.no_grad():
        padded = model.bert(**BATCH).last_hidden_state[0, :5]
        alone = model.bert(input_ids=BATCH["input_ids"][:1, :5]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_on_a_decoder_stays_causal_and_reaches_the_first_token(attn):
    base = qwen(attn)
    model = with_method(base, "prefix", num_virtual_tokens=3)
    ids = torch.tensor([[4, 9, 12, 20, 31]])
    later = ids.clone()
    later[0, 4] = 44
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state
        h_later = model.model(input_ids=later).last_hidden_state
        h_base = base.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(h[0, :4], h_later[0, :4])  # a later token never leaks backwards
    assert not torch.allclose(h[0, 4], h_later[0, 4])
    assert not torch.allclose(h[0, 0], h_base[0, 0], atol=1e-4)  # even the first token sees the prefix


def test_prefix_folding_keeps_outputs():
    """Saving folds the MLP away; the folded prefixes give the same outputs."""
    model = with_method(bert(), "prefix", num_virtual_tokens=3, reparameterize=True, reparam_hidden=16)
    method = get_method("prefix")(get_method("prefix").Config(num_virtual_tokens=3, reparameterize=True))
    state = method.trained_tensors(model)
    folded = with_method(bert(), "prefix", num_virtual_tokens=3, reparameterize=False)
    folded.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(folded(**BATCH).logits, model(**BATCH).logits, atol=1e-6, rtol=1e-6)


def test_in_training_the_adapter_reads_the_dropped_out_projection():
    """Houlsby's order (and AdapterHub's): dense -> dropout -> adapter -> LayerNorm(+input), dropout applied once."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     num_labels=3, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0)
    model = with_method(BertForSequenceClassification(cfg), "adapter", variant="houlsby", bottleneck=4).train()
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            block = model.get_submodule(name.rpartition(".")[0])
            assert isinstance(block.dropout, torch.nn.Identity) and isinstance(module.dropout, torch.nn.Dropout)
            module.base.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, [out]))
            module.adapter.register_forward_hook(lambda m, a, out, name=name: seen[name].append(a[0]))
    model(**BATCH)
    assert len(seen) == 4
    for projected, adapter_input in seen.values():
        dropped = adapter_input == 0
        assert 0.3 < dropped.float().mean() < 0.7 and not (projected == 0).any()
        torch.testing.assert_close(adapter_input[~dropped], 2 * projected[~dropped])  # kept values scaled by 1/(1-p)


@pytest.mark.parametrize("build", [bert, qwen])
def test_prefix_from_tokens_starts_at_those_tokens_keys_and_values(build):
    """init=tokens (Li & Liang): each layer's prefixes are the keys and values the frozen backbone computes
    for the drawn vocabulary tokens; with the MLP, its input embedding is their word embeddings."""
    base = build()
    method = get_method("prefix")(get_method("prefix").Config(num_virtual_tokens=5, reparameterize=False,
                                                               init="tokens"))
    model = method.apply(copy.deepcopy(base), CTX)
    ids = torch.tensor([method.init_token_ids])
    assert len(method.summary(model)["prefix_init_token_ids"]) == 5
    prefix = getattr(model, ENCODER_NAME).prefix  # (layers, 2, kv_heads, tokens, head_dim)
    heads = prefix.shape[2]
    attentions = [m for name, m in base.named_modules() if name.endswith(("attention.self", "self_attn"))]
    with torch.no_grad():
        hidden_in = base(input_ids=ids, output_hidden_states=True).hidden_states  # each layer's input
        for layer, attention in enumerate(attentions):
            bert_like = hasattr(attention, "key")
            x = hidden_in[layer] if bert_like else base.model.layers[layer].input_layernorm(hidden_in[layer])
            heads_of = lambda t: t.view(1, 5, heads, -1).transpose(1, 2)[0]  # noqa: E731
            if bert_like:  # Qwen2's keys are rotated (RoPE) after the projection: values suffice there
                torch.testing.assert_close(prefix[layer, 0], heads_of(attention.key(x)), atol=1e-5, rtol=1e-5)
            value = attention.value(x) if bert_like else attention.v_proj(x)
            torch.testing.assert_close(prefix[layer, 1], heads_of(value), atol=1e-5, rtol=1e-5)
    mlp = get_method("prefix")(get_method("prefix").Config(num_virtual_tokens=5, init="tokens"))
    reparam = mlp.apply(copy.deepcopy(base), CTX)
    torch.testing.assert_close(getattr(reparam, ENCODER_NAME).embedding,
                               base.get_input_embeddings()(torch.tensor(mlp.init_token_ids)))
