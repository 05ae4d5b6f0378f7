"""Layer-parallel pairs (model.Block with width=2) against the formula written out directly,
with the KV cache, under tensor parallelism, and loaded from an ordinary checkpoint."""

import dataclasses

import pytest
import torch

import corpus
import checkpoint
import decode
import train
from model import GPT, GPTConfig, pair_tensor
from parallel import ParallelState
from test_generate import PROMPT, naive, peaked_model
from test_parallel import spawn

VARIANTS = {
    # gpt2 with biases: LayerNorm biases fold into the linear biases
    'gpt2': dict(arch='gpt2', n_layer=6, exit_layers=(2, 4), exit_norm=True, exit_untie=True),
    # llama with GQA, an exit holding a block (its own KV cache) at the pair boundary
    'llama': dict(arch='llama', n_layer=6, n_kv_head=2, exit_layers=(2, 4), exit_block=True, exit_untie=True),
}
SPAN = (0, 4)  # pairs (0, 1), (2, 3); exit 2 reads the output of the first pair


@torch.no_grad()
def formula(model, idx, span):
    """The pair formula of arXiv 2502.02790 on the ordinary model's blocks, no cache:
    h = x + attn_i(norm1_i(x)) + attn_j(norm1_j(x)), y = h + mlp_i(norm2_i(h)) + mlp_j(norm2_j(h))."""
    x, pos = model.embed(idx)
    rope = model.rope(pos)
    outs, i = [], 0
    while i < model.config.n_layer:
        a = model.blocks[str(i)]
        if span[0] <= i < span[1]:
            b = model.blocks[str(i + 1)]
            h = x + a.attn(a.norm1(x), rope, None) + b.attn(b.norm1(x), rope, None)
            x = h + a.mlp(a.norm2(h)) + b.mlp(b.norm2(h))
            i += 2
        else:
            x = a(x, rope)
            i += 1
        outs += [model.exit_logits(e, x, rope) for e in model.exits_after.get(i - 1, ())]
    return model.final_logits(x), outs


def paired(model, span):
    """The same weights as a model whose blocks in span run in pairs (as loading does)."""
    cfg = dataclasses.replace(model.config, layer_parallel=span)
    out = GPT(cfg).double().eval()
    sd = model.state_dict()
    with torch.no_grad():
        for name, p in out.named_parameters():
            where = name.split('.', 2)
            if where[0] == 'blocks' and int(where[1]) in cfg.pairs:
                p.copy_(pair_tensor(sd.__getitem__, cfg, int(where[1]), where[2]))
            else:
                p.copy_(sd[name])
    return out


@pytest.mark.parametrize('v', VARIANTS.values(), ids=VARIANTS.keys())
def test_pairs_equal_the_formula(v):
    model = peaked_model(v)
    with torch.no_grad():  # non-trivial norm gains and biases, so that folding them is tested
        for n, p in model.named_parameters():
            if 'norm' in n or n.endswith('bias'):
                p.add_(torch.randn_like(p) * 0.3)
    idx = torch.randint(0, model.config.vocab_size, (2, 11))
    want, want_exits = formula(model, idx, SPAN)
    pm = paired(model, SPAN)
    assert len(pm.blocks) == 4 and [b.width for b in pm.blocks.values()] == [2, 2, 1, 1]
    got, got_exits = pm(idx, exits=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_exits, want_exits, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    plain, _ = model(idx)
    assert (plain - got).abs().max() > 1e-3  # pairing is a different function


@pytest.mark.parametrize('v', VARIANTS.values(), ids=VARIANTS.keys())
def test_paired_cached_decode_equals_no_cache(v):
    pm = paired(peaked_model(v), (2, 6))
    for thres in (None, 0.3, 0.6):
        tokens, depths = naive(pm, PROMPT, 16, thres)
        out = decode.generate(pm, PROMPT, 16, 'recompute', thres=thres)
        assert (out['tokens'], out['depths']) == (tokens, depths), thres
    full, _ = naive(pm, PROMPT, 16)
    assert decode.generate(pm, PROMPT, 16, 'speculative', spec_exit=0, spec_k=3)['tokens'] == full


def test_bad_spans_are_clear_errors():
    base = dict(n_layer=6, n_head=4, n_embd=32, exit_layers=(3,))
    for span, msg in (((1, 4), 'even span'), ((4, 8), 'end <= n_layer=6'), ((3, 3), '0 <= start < end'),
                      ((2, 6), 'inside the parallel pair (2, 3)'), ((1,), 'need [start, end)')):
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
            GPTConfig(**base, layer_parallel=span)
    with pytest.raises(ValueError, match='split between pipeline stages'):
        GPT(GPTConfig(**base, layer_parallel=(0, 2)), layers=range(1, 6))


@torch.no_grad()
def _tp(path, tp, span, want_logits, want_tokens):
    model, _ = checkpoint.load_model(path, ParallelState(tp=tp), layer_parallel=span)
    model.double().eval()
    pair = model.blocks[str(span[0])]
    assert pair.width == 2 and pair.attn.n_head == 2 * model.config.n_head // model.ps.tp  # 2 layers' heads / tp
    idx = torch.tensor([PROMPT])
    logits = decode.full_vocab(model, model(idx)[0])
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)
    assert [decode.generate(model, PROMPT, 16, 'recompute', thres=t)['tokens'] for t in (None, 0.4)] == want_tokens


@pytest.mark.parametrize('tp', [2, 4])
def test_tensor_parallel_pairs_equal_one_device(tmp_path, tp):
    v = dict(VARIANTS['llama'], n_head=8, n_kv_head=4, exit_block=False, exit_norm=True, vocab_size=63)
    model = peaked_model(v)
    checkpoint.save_checkpoint(str(tmp_path), model, None, {}, 0, 0.0)
    span = [0, 2]
    with pytest.raises(ValueError, match='layer_parallel'):
        checkpoint.load_model(str(tmp_path), layer_parallel=[1, 2])
    one, _ = checkpoint.load_model(str(tmp_path), layer_parallel=span)
    one.double().eval()
    torch.testing.assert_close(one(torch.tensor([PROMPT]))[0], paired(model, span)(torch.tensor([PROMPT]))[0],
                               rtol=1e-5, atol=1e-5)  # loading re-lays out the pair (float32 parameters)
    want_logits = one(torch.tensor([PROMPT]))[0].detach()
    want_tokens = [decode.generate(one, PROMPT, 16, 'recompute', thres=t)['tokens'] for t in (None, 0.4)]
    spawn(_tp, tp, str(tmp_path), tp, span, want_logits, want_tokens)


def test_evaluate_sweep_matches_the_paired_models(tmp_path):
    import os
    import sys
    from contextlib import nullcontext
    import evaluate
    sys.path.insert(0, os.path.join(os.path.dirname(train.__file__), 'data', 'text'))
    import prepare
    (tmp_path / 'c.txt').write_text(open(train.__file__).read())
    prepare.main(['--input', str(tmp_path / 'c.txt'), '--out_dir', str(tmp_path / 'data')])
    model = GPT(GPTConfig(arch='llama', n_layer=4, n_head=4, n_embd=32, vocab_size=256, block_size=32,
                          exit_layers=(2,)), seed=3).double()
    checkpoint.save_checkpoint(str(tmp_path / 'ckpt'), model, None, {'dataset': str(tmp_path / 'data')}, 0, 0.0)
    rows = evaluate.main([f'--out_dir={tmp_path / "ckpt"}', '--sweep=pairs', '--device=cpu', '--dtype=float32',
                          '--eval_iters=2', '--batch_size=4'])
    assert [r['layer_parallel'] for r in rows] == [[], [0, 2], [2, 4], [0, 4]]  # [1, 3) would split exit 2
    assert [r['depth'] for r in rows] == [4, 3, 3, 2]
    data, _ = corpus.load_data(str(tmp_path / 'data'))
    batches = corpus.Batches(data, 4, 32, seed=evaluate.DEFAULTS['seed'])
    for r in rows:
        want = paired(model, tuple(r['layer_parallel'])) if r['layer_parallel'] else model
        loss, *exits = train.evaluate(want, batches, 2, nullcontext(), splits=('val',))['val']
        assert r['loss'] == pytest.approx(loss, rel=1e-5) and r['exit_losses'] == pytest.approx(exits, rel=1e-5)


def test_bench_decode_runs_tiny_on_cpu():
    import bench
    out = bench.main(['--mode=decode', '--shape=tiny', '--device=cpu', '--pairs=[[],[0,2]]', '--batch=[1,2]',
                      '--prompt_len=8', '--new_tokens=2'])
    assert [(r['layer_parallel'], r['batch']) for r in out['runs']] == [([], 1), ([], 2), ([0, 2], 1), ([0, 2], 2)]
    assert all(r['tokens_per_s'] > 0 and 'speedup_vs_no_pairs' in r for r in out['runs'])
