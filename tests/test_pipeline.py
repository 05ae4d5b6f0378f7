"""Pipeline schedules (pure functions, no processes) and pipeline training against one
process on gloo: loss and every gradient, also with tp and dp, and with bubble filling
against the objective pipeline.py documents, computed in one process."""

from dataclasses import asdict

import numpy as np
import pytest
import torch

import corpus
import train
from model import GPT, GPTConfig
from parallel import LOCAL, GradSync, ParallelState, full_tensor
from pipeline import (bubble_fraction, build_stage, draw, exit_stages, fill_counts, microbatches, plan_microbatches,
                      schedule, simulate, stage_layers)
from test_parallel import close, optimizer_for, run_step, spawn


# -- schedules as data -------------------------------------------------------------------

def all_schedules(P, M, fills=(0, 0), exits=None, kind='1f1b'):
    mbs = microbatches(P, M, *fills, r=2.0, stages_with_exits=range(P - 1) if exits is None else exits)
    return mbs, [schedule(P, s, mbs, kind) for s in range(P)]


@pytest.mark.parametrize('kind', ['1f1b', 'gpipe'])
@pytest.mark.parametrize('fill', [False, True])
def test_schedules_are_complete_ordered_and_deadlock_free(kind, fill):
    for P in range(2, 9):
        for M in range(1, 17):
            for exits in ([0], list(range(P - 1)), [P - 1]):
                mbs, acts = all_schedules(P, M, fill_counts(P, 2.0, fill), exits, kind)
                simulate(P, acts)  # raises on a deadlock or a mismatched send/receive
                for s, stage in enumerate(acts):
                    f = [a.mb for a in stage if a.op == 'F']
                    b = [a.mb for a in stage if a.op == 'B']
                    for m in mbs:
                        runs_f, runs_b = s < m.fwd_end, m.bwd_start <= s < m.fwd_end
                        assert f.count(m.id) == runs_f and b.count(m.id) == runs_b, (P, M, s, m)
                        if runs_b:
                            assert stage.index(next(a for a in stage if a.op == 'B' and a.mb == m.id)) > \
                                   stage.index(next(a for a in stage if a.op == 'F' and a.mb == m.id))


def test_fill_counts_follow_the_formula():
    for P in range(2, 9):
        for r in (1.0, 2.0, 3.0):
            assert fill_counts(P, r, True) == (int((P - 1) * r / (1 + r)),) * 2
            assert fill_counts(P, r, False) == (0, 0)
    assert fill_counts(4, 2.0, True, fill_warmup=1, fill_cooldown=0) == (1, 0)
    mbs = microbatches(8, 16, 4, 4, 2.0, stages_with_exits=range(7))
    warm = [m for m in mbs if m.kind == 'warmup']
    cool = [m for m in mbs if m.kind == 'cooldown']
    assert [m.fwd_end for m in warm] == [4, 3, 2, 1]  # each fill a stage shallower than the last
    assert [m.bwd_start for m in cool] == [2, 3, 5, 6] and all(m.fwd_end == 8 for m in cool)
    assert microbatches(4, 8, 2, 0, 2.0, stages_with_exits=[3]) == microbatches(4, 8)  # no exit to reach


def test_drawn_timeline_shows_1f1b_structure():
    mbs, acts = all_schedules(4, 8)
    text, end, busy = draw(4, acts, mbs)
    rows = [line.split('|')[1] for line in text.splitlines()]
    assert rows[0].startswith('0123') and rows[3].startswith('...0aa1bb2cc')  # warm-up; last stage alternates
    for s, row in enumerate(rows):
        assert row.startswith('.' * s + '0')                  # stage s starts s forwards late
        assert row.rstrip('.').endswith('hh')                 # cool-down: the last backward
    assert rows[0].index('a') == 10 and rows[0][4:10] == '......'  # stage 0 waits for the first gradient
    assert 1 - busy / (4 * end) == pytest.approx(3 / 11)
    for P, M in ((2, 4), (4, 16), (8, 8)):
        assert bubble_fraction(P, M) == pytest.approx((P - 1) / (M + P - 1))


def test_stage_split():
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layers(5, 2, [2, 3]) == [range(0, 2), range(2, 5)]
    with pytest.raises(ValueError, match='n_layer=5 is not divisible by pp=2'):
        stage_layers(5, 2)
    with pytest.raises(ValueError, match=r'pp_layers=\[2, 2\]'):
        stage_layers(5, 2, [2, 2])
    cfg = GPTConfig(n_layer=4, n_head=2, n_embd=8, vocab_size=11, block_size=8, exit_layers=(2, 3), exit_pre=True)
    assert exit_stages(cfg, stage_layers(4, 2)) == [0, 0]  # exit_pre at 3 reads stage 1's input: stage 0's output
    assert exit_stages(cfg, stage_layers(4, 4)) == [0, 1]


# -- pipeline training equals one process --------------------------------------------------

PIPE_VARIANTS = [
    dict(arch='gpt2', exit_layers=(1, 3), exit_norm=True),                               # tied: wte on 3 stages
    dict(arch='llama', n_kv_head=2, exit_layers=(3,), exit_pre=True, exit_untie=True, exit_mlp=True),
    dict(arch='gpt2', vocab_size=37, exit_layers=(2, 3), exit_block=True),               # boundary, padded vocab
]


def cfg_for(mcfg, **kw):
    return dict(train.DEFAULTS, **asdict(mcfg), device='cpu', batch_size=2, gradient_accumulation_steps=4,
                exit_weight=(0.3, 0.7)[:len(mcfg.exit_layers)], grad_clip=0.05, learning_rate=1e-2, warmup_iters=0,
                **kw)


def reference_grads(ref, data, cfg, ps_layout, it=0):
    """The documented objective in one process: the regular global batch as always, plus
    each bubble-filling microbatch's exit (and final) losses over the stages it reaches."""
    B, T, accum = cfg['batch_size'], cfg['block_size'], cfg['gradient_accumulation_steps']
    w = train.exit_weights(it, cfg, len(cfg['exit_layers']))
    offsets = corpus.batch_offsets(len(data), T, B * accum, cfg['seed'], it, 'train')
    total = 0.0
    for k in range(accum):
        x, y = corpus.get_batch(data, offsets[k * B:(k + 1) * B], T, 'cpu')
        total = total + train.weighted_loss(ref, x, y, w)[0] / accum
    layers = stage_layers(ref.config.n_layer, ps_layout.pp, cfg['pp_layers'])
    mbs = plan_microbatches(ref.config, ps_layout.pp, accum // ps_layout.dp, cfg['pp_layers'], cfg['fill_bubbles'],
                            cfg['fill_warmup'], cfg['fill_cooldown'], cfg['backward_forward_ratio'])
    fills = [m for m in mbs if m.kind != 'regular']
    fill_off = corpus.batch_offsets(len(data), T, B * len(fills) * ps_layout.dp, cfg['seed'], it, 'fill')
    stage_of = exit_stages(ref.config, layers)
    for d in range(ps_layout.dp):
        for i, m in enumerate(fills):
            x, y = corpus.get_batch(data, fill_off[(d * len(fills) + i) * B:][:B], T, 'cpu')
            h, pos = ref.embed(x)
            rope = ref.rope(pos)
            for b, block in ref.blocks.items():
                if m.bwd_start > 0 and int(b) == layers[m.bwd_start].start:
                    h = h.detach()  # no gradient before the stage where its backward starts
                h = block(h, rope)
                for e in ref.exits_after.get(int(b), ()):
                    if m.bwd_start <= stage_of[e] < m.fwd_end:
                        total = total + w[e] * ref.loss(ref.exit_logits(e, h, rope), y) / accum
                if int(b) == layers[m.fwd_end - 1].stop - 1:
                    break
            if m.fwd_end == ps_layout.pp:
                total = total + ref.loss(ref.final_logits(h), y) / accum
    total.backward()
    return {n: p.grad for n, p in ref.logical_parameters()}


def _pipeline(tp, pp, fill, r=2.0, sp=False):
    ps = ParallelState(tp=tp, pp=pp, sp=sp)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    for v in PIPE_VARIANTS:
        if v is PIPE_VARIANTS[1] and not fill:  # LayerSkip's layer dropout, once (the fills' reference draws none)
            v = dict(v, layer_dropout=0.5)
        mcfg = GPTConfig(**dict(dict(n_layer=4, n_head=4, n_embd=32, vocab_size=40, block_size=8), **v))
        cfg = cfg_for(mcfg, fill_bubbles=fill, backward_forward_ratio=r)
        data = np.random.default_rng(0).integers(0, mcfg.vocab_size, 4000).astype(np.uint16)
        ref = GPT(mcfg, seed=7).double()
        par, _ = build_stage(mcfg, ps, None, 7)
        par.double()
        grads = GradSync(par.parameters(), ps)
        want = reference_grads(ref, data, cfg, ps) if fill else None
        loss = run_step(par, grads, data, cfg, 0, scaler, ps)
        ref.zero_grad()
        ref_loss = run_step(ref, GradSync(ref.parameters(), LOCAL), data, cfg, 0, scaler, LOCAL)
        want = want or {n: p.grad for n, p in ref.logical_parameters()}  # without fills: one process's step
        close(loss, ref_loss, tol=1e-6)  # the logged losses (float32 sums): regular microbatches only
        for name, p in par.logical_parameters():
            torch.testing.assert_close(full_tensor(p.grad, p, ps), want[name], rtol=1e-9, atol=1e-9, msg=name)
        if fill:
            continue
        grads.zero()
        ref_grads = GradSync(ref.parameters(), LOCAL)
        ref_grads.zero()
        models = [(ref, ref_grads, LOCAL), (par, grads, ps)]
        opts = [optimizer_for(m, cfg) for m, _, _ in models]
        for it in range(3):  # the same loss curve, clipping by the global norm included
            (a, _), (b, _) = [run_step(m, g, data, cfg, it, scaler, s, o) for (m, g, s), o in zip(models, opts)]
            close(b, a)


@pytest.mark.parametrize('world, tp, pp, sp', [(2, 1, 2, False), (4, 1, 4, False), (4, 2, 2, True), (8, 2, 2, False)],
                         ids=['pp2', 'pp4', 'pp2xtp2-sp', 'pp2xtp2xdp2'])
def test_pipeline_matches_one_process(world, tp, pp, sp):
    spawn(_pipeline, world, tp, pp, False, 2.0, sp)


@pytest.mark.parametrize('r', [2.0, 4.0])
def test_bubble_filling_gradient_is_the_documented_objective(r):
    mbs = microbatches(4, 4, *fill_counts(4, r, True), r=r, stages_with_exits=[0, 2])
    assert {m.kind for m in mbs} == {'regular', 'warmup', 'cooldown'}  # (the test has fills to check)
    spawn(_pipeline, 4, 1, 4, True, r)
