"""Tensor, sequence and data parallelism against the single-process model, on gloo (CPU).
Each test spawns ranks that compute the same thing both ways and compare."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import corpus
import checkpoint
import train
from model import GPT, GPTConfig
from parallel import (LOCAL, ColumnLinear, GradSync, ParallelState, RowLinear, VocabEmbedding, all_gather,
                      cross_entropy, enter, full_tensor, take_shard)
from pipeline import plan_microbatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(rank, world, init_file, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, 'init'), fn, args), nprocs=world, join=True)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def optimizer_for(model, cfg):
    return train.make_optimizer(model, cfg['learning_rate'], cfg['weight_decay'], (cfg['beta1'], cfg['beta2']), 'cpu')


def run_step(model, grads, data, cfg, it, scaler, ps, optimizer=None):
    """train.py's step at step it from a training config dict, as its loop calls it: the
    gradients (forward_backward), or with an optimizer one whole train_step."""
    batches = corpus.Batches({'train': data}, cfg['batch_size'], cfg['block_size'], cfg['gradient_accumulation_steps'],
                            cfg['seed'], 'cpu')
    mbs = plan_microbatches(model.config, ps.pp, batches.accum // ps.dp, cfg['pp_layers'], cfg['fill_bubbles'],
                            cfg['fill_warmup'], cfg['fill_cooldown'], cfg['backward_forward_ratio'])
    w = train.exit_weights(it, cfg, len(model.config.exit_layers))
    if optimizer is None:
        return train.forward_backward(model, grads, batches, it, w, nullcontext(), scaler, ps, mbs=mbs)
    return train.train_step(model, optimizer, grads, batches, it, train.get_lr(it, cfg), w, cfg['grad_clip'],
                            nullcontext(), scaler, ps, mbs=mbs)


# -- layers -------------------------------------------------------------------------

def _layers():
    for sp in (False, True):
        ps = ParallelState(tp=2, sp=sp)
        torch.manual_seed(0)  # every rank draws the same reference tensors
        ref_col, ref_row = torch.nn.Linear(8, 12).double(), torch.nn.Linear(12, 8).double()
        col, row = ColumnLinear(8, 12, True, ps).double(), RowLinear(12, 8, True, ps).double()
        with torch.no_grad():
            for a, b in ((col, ref_col), (row, ref_row)):
                for p, q in zip(a.parameters(), b.parameters()):
                    p.copy_(take_shard(q, p, ps))
        x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 6, 8, dtype=torch.float64)
        y_ref = ref_row(F.gelu(ref_col(x)))
        y_ref.backward(g)
        x_local = x.detach().chunk(2, dim=1)[ps.tp_rank].clone() if sp else x.detach().clone()
        x_local.requires_grad_(True)
        y = row(F.gelu(col(enter(x_local, ps))))
        y.backward(g.chunk(2, dim=1)[ps.tp_rank] if sp else g)
        close(y, y_ref.chunk(2, dim=1)[ps.tp_rank] if sp else y_ref)
        close(x_local.grad, x.grad.chunk(2, dim=1)[ps.tp_rank] if sp else x.grad)
        for a, b in ((col, ref_col), (row, ref_row)):
            for p, q in zip(a.parameters(), b.parameters()):
                grad = p.grad
                if sp and getattr(p, 'tp_dim', None) is None:  # replicated: partial over sequence shards
                    grad = grad.clone()
                    dist.all_reduce(grad, group=ps.tp_group)
                close(full_tensor(grad, p, ps), q.grad)

    # vocabulary of 11 over 2 ranks: 6 rows each, one padded row that must never count
    ps = ParallelState(tp=2)
    torch.manual_seed(1)
    ref_emb, ref_head = torch.nn.Embedding(11, 8).double(), torch.nn.Linear(8, 11, bias=False).double()
    emb, head = VocabEmbedding(11, 8, ps).double(), ColumnLinear(8, 11, False, ps).double()
    with torch.no_grad():
        emb.weight.copy_(take_shard(ref_emb.weight, emb.weight, ps))
        head.weight.copy_(take_shard(ref_head.weight, head.weight, ps))
    idx = torch.randint(0, 11, (3, 5))
    tgt = torch.randint(0, 11, (3, 5))
    tgt[0, :2] = -1
    ref_loss = F.cross_entropy(ref_head(ref_emb(idx)).flatten(0, 1), tgt.flatten(), ignore_index=-1)
    ref_loss.backward()
    logits = head(enter(emb(idx), ps))
    assert logits.shape == (3, 5, 6)
    loss = cross_entropy(logits, tgt, 11, ps)
    loss.backward()
    close(loss, ref_loss)
    close(full_tensor(emb.weight.grad, emb.weight, ps), ref_emb.weight.grad)
    close(full_tensor(head.weight.grad, head.weight, ps), ref_head.weight.grad)
    if ps.tp_rank == 1:
        assert head.weight.grad[-1].abs().max() == 0  # the padded row


def test_layers_tp2():
    spawn(_layers, 2)


# -- whole model, one step and a few steps ------------------------------------------------

VARIANTS = [
    dict(arch='gpt2', exit_layers=(1, 2), exit_norm=True),                                # tied exits
    dict(arch='llama', n_kv_head=2, exit_layers=(1, 2), exit_untie=True, exit_mlp=True, exit_norm=True,
         layer_dropout=0.5),                                                             # LayerSkip's
    dict(arch='llama', n_kv_head=2, exit_layers=(2,), exit_block=True, exit_pre=True),
    dict(arch='gpt2', vocab_size=37, exit_layers=(1,), exit_block=True, exit_untie=True),  # padded vocab
]


def train_cfg(mcfg, **kw):
    return dict(train.DEFAULTS, device='cpu', batch_size=2, gradient_accumulation_steps=2, block_size=8,
                exit_layers=mcfg.exit_layers, exit_weight=(0.3, 0.7)[:len(mcfg.exit_layers)], grad_clip=0.05,
                learning_rate=1e-2, warmup_iters=0, **kw)


def _equivalence(tp, sp):
    ps = ParallelState(tp=tp, sp=sp)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    for v in VARIANTS:
        mcfg = GPTConfig(**dict(dict(n_layer=3, n_head=4, n_embd=32, vocab_size=40, block_size=8), **v))
        cfg = train_cfg(mcfg, exit_curriculum='rotational' if v is VARIANTS[0] else '')  # (LayerSkip's, once)
        data = np.random.default_rng(0).integers(0, mcfg.vocab_size, 4000).astype(np.uint16)
        ref, par = GPT(mcfg, seed=7).double(), GPT(mcfg, ps, seed=7).double()
        for (n, p), q in zip(par.named_parameters(), ref.parameters()):
            close(full_tensor(p.detach(), p, ps), q.detach(), tol=0)  # layout-free initialisation
        models = [(ref, GradSync(ref.parameters(), LOCAL), LOCAL), (par, GradSync(par.parameters(), ps), ps)]
        # one step: loss and every gradient
        l_ref, l_par = [run_step(m, g, data, cfg, 0, scaler, s) for m, g, s in models]
        close(l_par, l_ref)
        for (n, p), q in zip(par.named_parameters(), ref.parameters()):
            torch.testing.assert_close(full_tensor(p.grad, p, ps), q.grad, rtol=1e-9, atol=1e-9, msg=n)
        for _, g, _ in models:
            g.zero()
        # a few optimizer steps (clipping active): the same loss curve
        opts = [optimizer_for(m, cfg) for m, _, _ in models]
        for it in range(3):
            (a, _), (b, _) = [run_step(m, g, data, cfg, it, scaler, s, o) for (m, g, s), o in zip(models, opts)]
            close(b, a)


@pytest.mark.parametrize('world, tp, sp', [(2, 2, False), (2, 2, True), (2, 1, False), (4, 2, False)],
                         ids=['tp2', 'tp2-sp', 'dp2', 'tp2xdp2'])
def test_model_matches_one_process(world, tp, sp):
    spawn(_equivalence, world, tp, sp)


# -- checkpoints across layouts -------------------------------------------------------

CKPT_MODEL = dict(arch='gpt2', n_layer=2, n_head=4, n_embd=16, vocab_size=37, block_size=8, exit_layers=(1,),
                  exit_untie=True, exit_norm=True)


@torch.no_grad()
def gathered_logits(model, idx, ps):
    logits, exits = model(idx, exits=True)
    full = [all_gather(t, 2, ps.tp_group, ps.tp) if ps.tp > 1 else t for t in (logits, *exits)]
    return [t[..., :model.config.vocab_size] for t in full]


def _load_and_save(src, dst, expect_file, out_file):
    ps = ParallelState(tp=2)
    model, ckpt = checkpoint.load_model(src, ps)
    idx = torch.arange(16).view(2, 8) % 37
    for a, b in zip(gathered_logits(model, idx, ps), torch.load(expect_file)):
        close(a, b, tol=1e-6)
    opt = train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu')
    ckpt.load_into(model, opt, ps)  # AdamW moments come along too
    for name, p in model.named_parameters():
        assert opt.state[p]['exp_avg'].abs().sum() > 0, name
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # something the reverse direction must see
    checkpoint.save_checkpoint(dst, model, opt, {}, 5, 1.0, ps)
    logits = gathered_logits(model, idx, ps)
    if ps.is_main:
        torch.save(logits, out_file)


def test_checkpoint_moves_between_layouts(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CKPT_MODEL), seed=3)
    cfg = train_cfg(model.config)
    opt = optimizer_for(model, cfg)
    grads = GradSync(model.parameters(), LOCAL)
    data = np.random.default_rng(0).integers(0, 37, 1000).astype(np.uint16)
    run_step(model, grads, data, cfg, 0, torch.amp.GradScaler('cpu', enabled=False), LOCAL, opt)
    checkpoint.save_checkpoint(str(tmp_path / 'one'), model, opt, cfg, 1, 2.0)
    idx = torch.arange(16).view(2, 8) % 37
    torch.save(gathered_logits(model, idx, LOCAL), tmp_path / 'one.pt')
    spawn(_load_and_save, 4, str(tmp_path / 'one'), str(tmp_path / 'four'), str(tmp_path / 'one.pt'),
          str(tmp_path / 'four.pt'))  # tp2 x dp2
    meta = json.loads((tmp_path / 'four' / 'ckpt' / 'meta.json').read_text())
    assert meta['layout'] == {'world': 4, 'dp': 2, 'pp': 1, 'tp': 2, 'sp': False}
    assert sorted(meta['file_bytes']) == ['shard-pp0-tp0.pt', 'shard-pp0-tp1.pt']
    back, _ = checkpoint.load_model(str(tmp_path / 'four'))
    for a, b in zip(gathered_logits(back, idx, LOCAL), torch.load(tmp_path / 'four.pt')):
        close(a, b, tol=1e-6)


# -- bad layouts: the same clear error on every rank, no hang ---------------------------

def _bad_layouts():
    with pytest.raises(ValueError, match=r'world size 3 is not divisible by tp\*pp = 2\*1'):
        ParallelState(tp=2)
    with pytest.raises(ValueError, match='sp=True needs tp > 1'):
        ParallelState(tp=1, sp=True)


def _bad_heads():
    ps = ParallelState(tp=2)
    with pytest.raises(ValueError, match='n_head=3 is not divisible by tp=2'):
        GPT(GPTConfig(n_layer=1, n_head=3, n_embd=24, vocab_size=10, block_size=8), ps)
    with pytest.raises(ValueError, match='n_kv_head=1 is not divisible by tp=2'):
        GPT(GPTConfig(arch='llama', n_layer=1, n_head=4, n_kv_head=1, n_embd=32, vocab_size=10, block_size=8), ps)


def test_bad_layouts_fail_clearly():
    spawn(_bad_layouts, 3)
    spawn(_bad_heads, 2)


# -- train.py under torchrun ------------------------------------------------------------

def torchrun(n, args, cwd, script='train.py'):
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={n}', '--standalone', script]
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_torchrun_training_matches_one_process(tmp_path):
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text(open(os.path.join(ROOT, 'model.py')).read() * 2)
    sys.path.insert(0, os.path.join(ROOT, 'data', 'text'))
    import prepare
    prepare.main(['--input', str(corpus), '--out_dir', str(tmp_path / 'data')])
    args = [f'--dataset={tmp_path / "data"}', '--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=4',
            '--n_embd=32', '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=2',
            '--exit_layers=[1]', '--exit_norm', '--max_iters=4', '--eval_interval=4', '--eval_iters=2',
            '--log_interval=1', '--learning_rate=3e-3']
    one = subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp_path / "one"}'] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, [f'--out_dir={tmp_path / "two"}', '--tp=2', '--sp'] + args, ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'dp1-pp1-tp2' in two.stdout
    logs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('one', 'two')]
    steps = [[r for r in log if 'loss' in r] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(*steps):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-4)
        assert b['exit_losses'] == pytest.approx(a['exit_losses'], rel=1e-4)
    bad = torchrun(2, [f'--out_dir={tmp_path / "bad"}', '--tp=2', '--n_head=3', '--n_embd=33'] + args[:3]
                   + args[6:], ROOT)
    assert bad.returncode != 0 and 'n_head=3 is not divisible by tp=2' in bad.stderr
    bad = torchrun(2, [f'--out_dir={tmp_path / "bad"}'] + args + ['--gradient_accumulation_steps=1'], ROOT)
    assert bad.returncode != 0 and 'gradient_accumulation_steps=1 is not divisible by dp=2' in bad.stderr


def prepared(tmp_path, source):
    """A byte-level dataset (tmp_path/data) of one of this repository's files."""
    (tmp_path / 'corpus.txt').write_text(open(os.path.join(ROOT, source)).read())
    sys.path.insert(0, os.path.join(ROOT, 'data', 'text'))
    import prepare
    prepare.main(['--input', str(tmp_path / 'corpus.txt'), '--out_dir', str(tmp_path / 'data')])
    return tmp_path / 'data'


def resumed_like_one_process(tmp_path, run, args, n):
    """Train n steps in one process (tmp_path/one); resume tmp_path/run in one process up to n
    steps: the whole loss curve of the run equals the one process's."""
    for out_dir, more in (('one', []), (run, ['--init_from=resume'])):
        p = subprocess.run([sys.executable, 'train.py', f'--out_dir={tmp_path / out_dir}', f'--max_iters={n}'] + more
                           + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    steps = [{r['iter']: r for r in map(json.loads, open(tmp_path / d / 'log.jsonl')) if 'loss' in r}
             for d in ('one', run)]
    assert sorted(steps[1]) == list(range(n))
    for it in range(n):
        assert steps[1][it]['loss'] == pytest.approx(steps[0][it]['loss'], rel=1e-4)
        assert steps[1][it]['exit_losses'] == pytest.approx(steps[0][it]['exit_losses'], rel=1e-4)


def test_torchrun_3d_with_checkpoint_into_another_layout(tmp_path):
    """dp2 x pp2 x tp2 on 8 ranks trains like one process; its checkpoint resumes in one process."""
    args = [f'--dataset={prepared(tmp_path, "train.py")}', '--device=cpu', '--dtype=float32', '--arch=llama',
            '--n_layer=4', '--n_head=4', '--n_kv_head=2', '--n_embd=32', '--block_size=16', '--batch_size=2',
            '--gradient_accumulation_steps=4', '--exit_layers=[1,3]', '--exit_norm', '--eval_interval=3',
            '--eval_iters=2', '--log_interval=1', '--learning_rate=3e-3', '--lr_decay_iters=6']
    three = torchrun(8, [f'--out_dir={tmp_path / "3d"}', '--max_iters=3', '--tp=2', '--pp=2', '--print_schedule']
                     + args, ROOT)
    assert three.returncode == 0, three.stderr[-3000:]
    assert 'dp2-pp2-tp2' in three.stdout and 'stage 1 |' in three.stdout
    resumed_like_one_process(tmp_path, '3d', args, 6)


def test_two_nodes_through_torchrun_rendezvous(tmp_path):
    """Two torchrun agents (two 'nodes' of 2 ranks on 127.0.0.1, c10d rendezvous), dp2 x tp2:
    the loss curve of one process, and a checkpoint that resumes in one process."""
    args = [f'--dataset={prepared(tmp_path, "model.py")}', '--device=cpu', '--dtype=float32', '--n_layer=2',
            '--n_head=4', '--n_embd=32', '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=2',
            '--exit_layers=[1]', '--exit_norm', '--eval_interval=3', '--eval_iters=2', '--log_interval=1',
            '--learning_rate=3e-3', '--lr_decay_iters=5']
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={i}',
                               '--nproc_per_node=2', '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}',
                               '--rdzv_id=nanoee-test', 'train.py', f'--out_dir={tmp_path / "two"}', '--max_iters=3',
                               '--tp=2'] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1')) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-2000:] for o in outs]
    assert any('dp2-pp1-tp2' in o[0] for o in outs)
    resumed_like_one_process(tmp_path, 'two', args, 5)
