import json
import math
import os
import subprocess
import sys

import pytest
import torch

import corpus
import checkpoint
import train
from configurator import configure
from model import GPT, GPTConfig
from parallel import LOCAL, clip_grad_norm_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- configurator -------------------------------------------------------------

def test_configure_parses_values(tmp_path):
    cfg_file = tmp_path / 'c.py'
    cfg_file.write_text("import math\nn_layer = 3\nexit_layers = [1, 2]\nlearning_rate = 3\n")
    cfg = configure(train.DEFAULTS, [str(cfg_file), '--exit_layers=[4,8]', '--min_lr=0', '--compile',
                                           '--n_kv_head=2', '--out_dir=123', '--exit_weight=[0.5,1]',
                                           '--init_from=resume', '--exit_weight_init=2'], train.PER_EXIT_KEYS)
    assert cfg['n_layer'] == 3 and cfg['exit_layers'] == (4, 8)
    assert cfg['learning_rate'] == 3.0 and isinstance(cfg['learning_rate'], float)  # int for float
    assert cfg['min_lr'] == 0.0 and isinstance(cfg['min_lr'], float)
    assert cfg['compile'] is True and cfg['n_kv_head'] == 2  # bare flag; a None default takes an int
    assert cfg['out_dir'] == '123' and cfg['init_from'] == 'resume'
    assert cfg['exit_weight'] == (0.5, 1) and cfg['exit_weight_init'] == 2
    assert train.DEFAULTS['n_layer'] != 3  # defaults untouched


@pytest.mark.parametrize('args, match', [
    (['--n_layers=4'], "unknown config key 'n_layers'; did you mean n_layer"),
    (['--learning_rat=1'], 'did you mean learning_rate'),
    (['--n_layer=2.5'], r"--n_layer=2\.5: expected int"),
    (['--compile=1'], 'expected bool'),
    (['--max_iters'], 'needs a value'),
    (['--exit_layers=3'], 'expected tuple'),
])
def test_configure_errors(args, match):
    with pytest.raises(ValueError, match=match):
        configure(train.DEFAULTS, args, train.PER_EXIT_KEYS)


def test_configure_rejects_unknown_key_in_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text('batchsize = 4\n')
    with pytest.raises(ValueError, match="'batchsize'; did you mean batch_size"):
        configure(train.DEFAULTS, [str(f)], train.PER_EXIT_KEYS)


# -- schedules ----------------------------------------------------------------

def test_exit_weight_schedules():
    cfg = dict(train.DEFAULTS, exit_weight=(1.0, 0.2), exit_weight_init=(0.0, 1.0), exit_weight_warmup_iters=10)
    lin = lambda t: train.exit_weights(t, dict(cfg, exit_weight_warmup_style='linear'), 2)
    cos = lambda t: train.exit_weights(t, dict(cfg, exit_weight_warmup_style='cosine'), 2)
    assert lin(0) == [0.0, 1.0] and cos(0) == [0.0, 1.0]
    assert lin(10) == [1.0, 0.2] and cos(50) == [1.0, 0.2]  # target from the end of warm-up on
    assert lin(5) == pytest.approx([0.5, 0.6])                 # warm-up of exit 1, cool-down of exit 2
    assert cos(5) == pytest.approx([0.5, 0.6])                 # cosine crosses the midpoint at half-way
    assert cos(2) == pytest.approx([(1 - math.cos(math.pi * 0.2)) / 2, 1 - 0.8 * (1 - math.cos(math.pi * 0.2)) / 2])
    assert cos(2)[0] < lin(2)[0]                                # slower start than linear
    const = train.exit_weights(3, dict(train.DEFAULTS, exit_weight=0.3), 3)
    assert const == [0.3, 0.3, 0.3]
    with pytest.raises(ValueError, match='2 values for 3 exits'):
        train.exit_weights(0, cfg, 3)
    with pytest.raises(ValueError, match="exit_weight_warmup_style='step'"):
        train.exit_weights(0, dict(cfg, exit_weight_warmup_style='step'), 2)


def test_lr_schedule():
    cfg = dict(train.DEFAULTS, learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_decay_iters=None)
    assert train.get_lr(0, cfg) < train.get_lr(9, cfg) < 1.0
    assert train.get_lr(10, cfg) == 1.0
    assert train.get_lr(60, cfg) == pytest.approx(0.55)
    assert train.get_lr(110, cfg) == train.get_lr(500, cfg) == 0.1


def test_weighted_loss_and_its_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=40, block_size=8, exit_layers=(1, 2),
                          exit_untie=True))
    x, y = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    total, _ = train.weighted_loss(model, x, y, [0.25, 2.0])
    total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, exit_logits = model(x, exits=True)
    ce = lambda lg: torch.nn.functional.cross_entropy(lg.reshape(-1, 40), y.reshape(-1))
    ref = ce(logits) + 0.25 * ce(exit_logits[0]) + 2.0 * ce(exit_logits[1])
    ref.backward()
    torch.testing.assert_close(total, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert model.exits['0'].out.weight.grad.abs().sum() > 0


def test_clip_grad_norm_counts_each_parameter_once():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16)),
              torch.nn.Parameter(torch.randn(4, dtype=torch.float64)), torch.nn.Parameter(torch.randn(2)),
              torch.nn.Parameter(torch.randn(3))]
    for p in params[:4]:
        p.grad = torch.randn_like(p) * 3
    params[3].duplicate = True  # a copy held on another stage too: clipped, not counted
    grads = [p.grad.clone() for p in params[:4]]
    want = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads[:3]))
    norm = clip_grad_norm_(params + params[:1], 1.0, LOCAL)  # a repeated parameter counts once
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(want, rel=1e-6)
    for p, g in zip(params, grads):
        tol = 1e-2 if g.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(p.grad, (g.float() / want).to(g.dtype), rtol=tol, atol=0)
    assert clip_grad_norm_(params, 2.0, LOCAL).item() == pytest.approx(1.0, rel=1e-2)  # under max_norm: unchanged
    torch.testing.assert_close(params[0].grad, grads[0] / want, rtol=1e-5, atol=0)


def test_activation_checkpointing_same_loss_and_grads():
    """Recomputed blocks give the same loss and gradients, dropout masks included."""
    cfg = GPTConfig(arch='llama', n_layer=4, n_head=4, n_embd=64, vocab_size=64, block_size=32, exit_layers=(1, 3),
                    dropout=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 64, (2, 32), generator=g), torch.randint(0, 64, (2, 32), generator=g)

    def run(recompute):
        model = GPT(cfg, seed=0)
        model.checkpoint_blocks = recompute
        saved = []  # the tensors autograd keeps outside checkpointed blocks
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            total, losses = train.weighted_loss(model, x, y, [0.5, 1.0])
        total.backward()
        return [total, *losses], {n: p.grad for n, p in model.named_parameters()}, len(saved)

    losses, grads, n_saved = run(False)
    ckpt_losses, ckpt_grads, ckpt_saved = run(True)
    assert ckpt_saved < n_saved / 2  # the blocks' activations are not kept
    for a, b in zip(losses, ckpt_losses):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ckpt_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(ckpt_grads[n], g, rtol=1e-6, atol=1e-6, msg=n)
    torch.manual_seed(2)
    assert train.weighted_loss(GPT(cfg, seed=0), x, y, [0.5, 1.0])[0].item() != losses[0].item()  # dropout acts


def test_batches_depend_only_on_seed_and_step():
    a = corpus.batch_offsets(10_000, 32, 8, seed=1, step=5, split='train')
    assert torch.equal(a, corpus.batch_offsets(10_000, 32, 8, seed=1, step=5, split='train'))
    assert not torch.equal(a, corpus.batch_offsets(10_000, 32, 8, seed=1, step=6, split='train'))
    assert not torch.equal(a, corpus.batch_offsets(10_000, 32, 8, seed=1, step=5, split='val'))
    assert int(a.max()) < 10_000 - 33


# -- end to end -----------------------------------------------------------------

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """The project's own source code as a byte-level dataset."""
    d = tmp_path_factory.mktemp('data')
    text = ''.join(open(os.path.join(ROOT, f)).read() for f in ('model.py', 'train.py')) * 3
    (d / 'corpus.txt').write_text(text)
    sys.path.insert(0, os.path.join(ROOT, 'data', 'text'))
    import prepare
    prepare.main(['--input', str(d / 'corpus.txt'), '--out_dir', str(d)])
    return str(d)


def run_cfg(dataset, out_dir, **kw):
    base = dict(dataset=dataset, out_dir=str(out_dir), device='cpu', dtype='float32', n_layer=3, n_head=2,
                n_embd=32, block_size=32, batch_size=8, exit_layers=(1, 2), exit_norm=True, eval_iters=2,
                eval_interval=10, log_interval=1, max_iters=20, warmup_iters=2, learning_rate=3e-3)
    base.update(kw)
    return configure(train.DEFAULTS, [f'--{k}={v}' for k, v in base.items()], train.PER_EXIT_KEYS)


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_tiny_run_learns(dataset, tmp_path, arch):
    train.train(run_cfg(dataset, tmp_path, arch=arch, max_iters=40, eval_interval=40))
    evals = [r for r in read_log(tmp_path) if 'val_loss' in r]
    first, last = evals[0], evals[-1]
    assert first['iter'] == 0 and last['iter'] == 40
    assert last['val_loss'] < first['val_loss'] - 1.0
    for a, b in zip(first['val_exit_losses'], last['val_exit_losses']):
        assert b < a - 1.0
    steps = [r for r in read_log(tmp_path) if 'loss' in r]
    assert [r['iter'] for r in steps] == list(range(40))
    assert all(len(r['exit_losses']) == 2 and r['lr'] > 0 for r in steps)


def test_resume_continues_the_same_curve(dataset, tmp_path):
    common = dict(max_iters=12, lr_decay_iters=12, dropout=0.1, gradient_accumulation_steps=2,
                  exit_weight_init=0.0, exit_weight_warmup_iters=8, eval_interval=6)
    train.train(run_cfg(dataset, tmp_path / 'full', **common))
    train.train(run_cfg(dataset, tmp_path / 'split', **dict(common, max_iters=6)))  # stops, saves at 6
    train.train(run_cfg(dataset, tmp_path / 'split', **dict(common, init_from='resume')))
    full = {r['iter']: r for r in read_log(tmp_path / 'full') if 'loss' in r}
    split = {r['iter']: r for r in read_log(tmp_path / 'split') if 'loss' in r}
    assert sorted(split) == list(range(12))
    for it in range(12):
        assert split[it]['loss'] == pytest.approx(full[it]['loss'], rel=1e-6, abs=1e-6)
        assert split[it]['exit_losses'] == pytest.approx(full[it]['exit_losses'], rel=1e-6, abs=1e-6)
        assert split[it]['lr'] == full[it]['lr'] and split[it]['exit_weights'] == full[it]['exit_weights']


def test_activation_checkpointing_same_curve(dataset, tmp_path):
    common = dict(max_iters=6, eval_interval=6, dropout=0.1, gradient_accumulation_steps=2)
    train.train(run_cfg(dataset, tmp_path / 'plain', **common))
    model = train.train(run_cfg(dataset, tmp_path / 'ckpt', activation_checkpointing=True, **common))
    assert model.checkpoint_blocks
    plain, ckpt = [[r for r in read_log(tmp_path / d) if 'loss' in r] for d in ('plain', 'ckpt')]
    assert len(plain) == len(ckpt) == 6
    for a, b in zip(plain, ckpt):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-6, abs=1e-6)
        assert b['exit_losses'] == pytest.approx(a['exit_losses'], rel=1e-6, abs=1e-6)
        assert b['grad_norm'] == pytest.approx(a['grad_norm'], rel=1e-5)


def test_checkpoint_errors(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        checkpoint.Checkpoint(str(tmp_path))
    trained = train.train(run_cfg(dataset, tmp_path, max_iters=2, eval_interval=2))
    loaded, ckpt = checkpoint.load_model(str(tmp_path))
    assert ckpt.meta['iter_num'] == 2 and ckpt.meta['model_config']['exit_layers'] == [1, 2]
    for (n, a), b in zip(trained.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), n
    assert not os.path.exists(tmp_path / 'ckpt.tmp') and not os.path.exists(tmp_path / 'ckpt.old')
    path = tmp_path / 'ckpt' / 'shard-pp0-tp0.pt'
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RuntimeError, match='truncated'):
        checkpoint.Checkpoint(str(tmp_path))


def test_cli_end_to_end(dataset, tmp_path):
    """The script as a user runs it: a config file plus overrides."""
    out = subprocess.run([sys.executable, 'train.py', 'config/train_pystdlib.py', f'--dataset={dataset}',
                          f'--out_dir={tmp_path}', '--max_iters=3', '--eval_interval=3', '--eval_iters=1',
                          '--n_layer=2', '--exit_layers=[1]', '--log_interval=1', '--batch_size=2'],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'iter 2: loss' in out.stdout and 'tok/s' in out.stdout
    assert os.path.exists(tmp_path / 'ckpt' / 'meta.json')


def test_bench_runs_tiny_on_cpu():
    """bench.py must not rot: its tiny shape runs the real train step and reports JSON."""
    out = subprocess.run([sys.executable, 'bench.py', '--shape=tiny', '--device=cpu', '--steps=2', '--warmup=1',
                          '--exit_layers=[1]'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])['runs'][0]
    assert result['tokens_per_s'] > 0 and result['exits'] == [1] and result['layout'] == 'dp1-pp1-tp1'


def test_exit_curriculum_schedules():
    cfg = dict(train.DEFAULTS, max_iters=8, exit_weight=(0.5, 1.0, 2.0))
    assert [train.exit_weights(it, dict(cfg, exit_curriculum='rotational', exit_rotation=2), 3) for it in (0, 1)] == \
        [[0.5, 0.0, 2.0], [0.0, 1.0, 0.0]]
    gradual = [train.exit_weights(it, dict(cfg, exit_curriculum='gradual'), 3) for it in range(8)]
    assert gradual[0] == [0.0, 0.0, 2.0] and gradual[3] == [0.0, 1.0, 2.0] and gradual[6] == [0.5, 1.0, 2.0]
    with_warmup = dict(cfg, exit_curriculum='rotational', exit_weight_init=0.0, exit_weight_warmup_iters=4)
    assert train.exit_weights(2, with_warmup, 3) == [0.25, 0.0, 1.0]  # warm-up, then the curriculum
    with pytest.raises(ValueError, match="exit_curriculum='spiral'; allowed"):
        train.exit_weights(0, dict(cfg, exit_curriculum='spiral'), 3)
