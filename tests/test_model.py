import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig


def tiny(**kw):
    base = dict(arch='llama', n_layer=4, n_head=4, n_kv_head=2, n_embd=32, vocab_size=61, block_size=24)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize('kw, match', [
    (dict(arch='bert'), "arch='bert'"),
    (dict(n_embd=30), 'n_embd=30 is not divisible by n_head=4'),
    (dict(n_kv_head=3), 'n_kv_head=3'),
    (dict(exit_layers=(0,)), r'exit_layers contains 0; allowed: ints in 1\.\.3'),
    (dict(exit_layers=(4,)), r'exit_layers contains 4; allowed: ints in 1\.\.3'),
    (dict(exit_layers=(1,), exit_pre=True), r'contains 1; allowed: ints in 2\.\.4'),
    (dict(exit_layers=(2, 2)), 'duplicates'),
    (dict(exit_layers=(3, 1)), 'increasing'),
    (dict(exit_layers=(1,), exit_mlp=True, exit_block=True), 'exclusive'),
    (dict(dropout=1.0), 'dropout=1.0'),
    (dict(n_layer=0), 'n_layer=0'),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_config_derived_defaults():
    g, l = GPTConfig(arch='gpt2', n_embd=64, n_head=4), GPTConfig(arch='llama', n_embd=4096, n_head=32)
    assert (g.ffn_hidden, g.bias, g.tie_embeddings, g.n_kv_head) == (256, True, True, 4)
    assert (l.ffn_hidden, l.bias, l.tie_embeddings) == (10944, False, False)
    assert tiny(exit_layers=[1, 3]).exit_layers == (1, 3)


@pytest.mark.parametrize('head', [dict(), dict(exit_norm=True, exit_untie=True), dict(exit_mlp=True, exit_norm=True),
                                  dict(exit_block=True)])
def test_exit_pre_is_post_at_previous_layer(head):
    torch.manual_seed(0)
    pre = GPT(tiny(n_layer=5, exit_layers=(3, 5), exit_pre=True, **head))
    post = GPT(tiny(n_layer=5, exit_layers=(2, 4), **head))
    other = GPT(tiny(n_layer=5, exit_layers=(3, 4), **head))  # differs at the first exit
    post.load_state_dict(pre.state_dict())
    other.load_state_dict(pre.state_dict())
    idx = torch.randint(0, 61, (2, 12))
    a, b, c = pre(idx, exits=True), post(idx, exits=True), other(idx, exits=True)
    torch.testing.assert_close(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y)
    assert not torch.allclose(a[1][0], c[1][0])  # the test can tell exits apart


def reference_forward(model, idx):
    """Layer by layer, no cache, exits read the hidden state after block depth d."""
    x, pos = model.embed(idx)
    rope = model.rope(pos)
    hidden = [x]
    for block in model.blocks.values():
        x = block(x, rope)
        hidden.append(x)
    exits = [model.exit_logits(e, hidden[d], rope) for e, d in enumerate(model.config.exit_depths)]
    return model.final_logits(x), exits


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_losses_are_cross_entropies_of_the_logits(arch):
    torch.manual_seed(0)
    model = GPT(tiny(arch=arch, exit_layers=(1, 3), exit_mlp=True, exit_norm=True))
    idx, tgt = torch.randint(0, 61, (3, 10)), torch.randint(0, 61, (3, 10))
    tgt[0, :3] = -1  # ignored positions
    logits, exit_logits = reference_forward(model, idx)
    ce = lambda lg: F.cross_entropy(lg.reshape(-1, 61), tgt.reshape(-1), ignore_index=-1)
    loss, exit_losses = model(idx, tgt, exits=True)
    torch.testing.assert_close(loss, ce(logits))
    assert len(exit_losses) == 2
    for l, lg in zip(exit_losses, exit_logits):
        torch.testing.assert_close(l, ce(lg))
    out_logits, out_exits = model(idx, exits=True)
    torch.testing.assert_close(out_logits, logits)
    torch.testing.assert_close(out_exits[1], exit_logits[1])


def test_plain_forward_runs_no_exit():
    model = GPT(tiny(exit_layers=(1, 2, 3), exit_block=True))
    calls = []
    for e in model.exits.values():
        e.register_forward_hook(lambda *a: calls.append(1))
    logits, exits = model(torch.randint(0, 61, (1, 8)))
    assert exits == [] and calls == []
    model(torch.randint(0, 61, (1, 8)), exits=True)
    assert len(calls) == 3


def test_tied_and_untied_heads():
    g = GPT(tiny(arch='gpt2', exit_layers=(2,)))
    assert g.lm_head.weight is g.wte.weight and g.exits['0'].out is None
    l = GPT(tiny(exit_layers=(2,), exit_untie=True))
    assert l.lm_head.weight is not l.wte.weight and l.exits['0'].out.weight.shape == (61, 32)


def test_init_std_and_meta_device():
    cfg = tiny(arch='gpt2', n_layer=8, n_embd=256, vocab_size=500)
    torch.manual_seed(0)
    m = GPT(cfg)
    assert abs(m.blocks['0'].attn.q.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks['0'].mlp.down.weight.std().item() - 0.02 / 4) < 5e-4  # 1/sqrt(2 * 8)
    with torch.device('meta'):
        lazy = GPT(tiny(exit_layers=(2,)))
    assert lazy.wte.weight.is_meta
    lazy.to_empty(device='cpu')
    lazy.init_weights()
    idx = torch.randint(0, 61, (1, 8))
    ref = GPT(tiny(exit_layers=(2,)))
    ref.load_state_dict(lazy.state_dict())
    torch.testing.assert_close(lazy(idx, exits=True)[1][0], ref(idx, exits=True)[1][0])


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_kv_cache_decode_matches_full_forward(arch):
    torch.manual_seed(0)
    model = GPT(tiny(arch=arch, exit_layers=(1, 3), exit_block=True, exit_norm=True)).eval()
    idx = torch.randint(0, 61, (2, 20))
    full, full_exits = model(idx, exits=True)
    model.setup_cache(batch_size=2, max_len=24)
    steps = [(0, 7), (7, 8), (8, 12)] + [(t, t + 1) for t in range(12, 20)]  # prefill, then chunks and tokens
    for a, b in steps:
        logits, exits = model(idx[:, a:b], exits=True, input_pos=torch.arange(a, b))
        torch.testing.assert_close(logits, full[:, a:b], atol=1e-5, rtol=1e-5)
        for x, y in zip(exits, full_exits):
            torch.testing.assert_close(x, y[:, a:b], atol=1e-5, rtol=1e-5)
    model.use_cache(None)
    torch.testing.assert_close(model(idx)[0], full)


def test_flops_count_the_exits():
    plain, ee = GPT(tiny()), GPT(tiny(exit_layers=(1, 2)))
    extra = ee.flops_per_token(16) - plain.flops_per_token(16)
    assert extra == 2 * 6 * 61 * 32  # two shared-head output matmuls, forward and backward


def test_layer_dropout_masks():
    """LayerSkip's masks: the keep rate falls linearly with depth, the same for the same key,
    and a row no block keeps is the embedding through the final head."""
    from model import layer_keep
    cfg = GPTConfig(arch='llama', n_layer=5, n_head=2, n_embd=16, vocab_size=32, block_size=8, layer_dropout=0.8)
    keep = layer_keep(cfg, 20000, ('seed', 3, 1))
    assert torch.equal(keep, layer_keep(cfg, 20000, ('seed', 3, 1))) and not torch.equal(keep, layer_keep(cfg, 20000, 0))
    rates = 1 - keep.double().mean(1)
    assert torch.allclose(rates, torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8], dtype=torch.float64), atol=0.02)
    model = GPT(cfg).double()
    x = torch.randint(0, 32, (2, 8))
    none = torch.zeros(5, 2, dtype=torch.bool)
    logits, _ = model(x, keep=none)
    torch.testing.assert_close(logits, model.final_logits(model.embed(x)[0]))
    model.eval()  # evaluation never drops
    torch.testing.assert_close(model(x, keep=none)[0], model(x)[0])
