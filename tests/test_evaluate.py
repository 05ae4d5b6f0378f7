"""evaluate.py --sweep=thresholds against independent references: train.evaluate's losses, a
per-position loop over the heads' logits, the full model's greedy tokens, hand-made texts."""

import csv
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import corpus
import checkpoint
import evaluate
import train
from configurator import configure
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_FILES = ['argparse.py', 'textwrap.py', 'shlex.py', 'fractions.py', 'string.py', 'glob.py']
VAL_FILES = ['json/encoder.py', 'json/decoder.py', 'fnmatch.py']
THRESHOLDS = [1.0, 0.6, 0.3, 0.0]
MIDDLE = 0.6


def write_dataset(d):
    """Byte-level Python source as data/pystdlib's: files joined by the end-of-text byte 0."""
    root = sysconfig.get_paths()['stdlib']
    os.makedirs(d)
    for split, files in (('train', TRAIN_FILES), ('val', VAL_FILES)):
        text = b''.join(open(os.path.join(root, f), 'rb').read().replace(b'\0', b'') + b'\0' for f in files)
        np.frombuffer(text, dtype=np.uint8).tofile(os.path.join(d, f'{split}.bin'))
    with open(os.path.join(d, 'meta.json'), 'w') as f:
        json.dump({'vocab_size': 256, 'tokenizer': 'bytes', 'dtype': 'uint8', 'eot_token': 0}, f)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
    """A tiny model with exits after blocks 1 and 2, trained until its exits are confident
    on some tokens, and the sweep's result."""
    d = tmp_path_factory.mktemp('frontier')
    write_dataset(str(d / 'data'))
    train.train(configure(train.DEFAULTS, [
        f'--out_dir={d / "ckpt"}', f'--dataset={d / "data"}', '--device=cpu', '--dtype=float32', '--arch=llama',
        '--n_layer=3', '--n_head=2', '--n_embd=32', '--block_size=64', '--exit_layers=[1,2]', '--exit_norm',
        '--batch_size=8', '--max_iters=150', '--eval_interval=150', '--eval_iters=2', '--log_interval=50',
        '--learning_rate=1e-2', '--warmup_iters=10', '--exit_weight=0.5'], train.PER_EXIT_KEYS))
    result = evaluate.main([f'--out_dir={d / "ckpt"}', '--sweep=thresholds', '--device=cpu', '--dtype=float32',
                            f'--thresholds={THRESHOLDS}', '--eval_iters=2', '--batch_size=4', '--prompts=2',
                            '--gen_tokens=8', '--lines=3', f'--report={d / "out" / "fr"}'])
    return d, result


def test_val_losses_match_train_evaluate_and_a_loop(sweep):
    d, result = sweep
    rows = {r['name']: r for r in result['rows']}
    model, _ = checkpoint.load_model(str(d / 'ckpt'))
    data, _ = corpus.load_data(str(d / 'data'))
    cfg = dict(seed=evaluate.DEFAULTS['seed'])
    batches = corpus.Batches(data, 4, 64, seed=cfg['seed'])
    final, *exits = train.evaluate(model, batches, 2, train.autocast('cpu', 'float32'), splits=('val',))['val']
    assert rows['full']['val_loss'] == pytest.approx(final, rel=1e-5)
    assert rows['0.00']['val_loss'] == pytest.approx(exits[0], rel=1e-5)  # max prob >= 0: exit 1 always fires
    # the middle threshold: every position on its own, heads in depth order
    losses, picked = [], set()
    with torch.no_grad():
        for k in range(2):
            offs = corpus.batch_offsets(len(data['val']), 64, 4, cfg['seed'], -1 - k, 'val')
            x, y = corpus.get_batch(data['val'], offs, 64, 'cpu')
            logits, exit_logits = model(x, exits=True)
            heads = exit_logits + [logits]
            for b in range(4):
                for t in range(64):
                    h = next((i for i, lg in enumerate(heads[:-1]) if lg[b, t].softmax(-1).max() >= MIDDLE), 2)
                    picked.add(h)
                    losses.append(F.cross_entropy(heads[h][b, t], y[b, t]).item())
    assert picked == {0, 1, 2}  # the threshold splits the positions between all three heads
    assert rows[f'{MIDDLE:.2f}']['val_loss'] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_generation_rows(sweep):
    _, result = sweep
    rows = result['rows']
    spec = ['spec exit 1', 'spec exit 2', 'spec exit auto']
    assert [r['name'] for r in rows] == ['full'] + [f'{t:.2f}' for t in THRESHOLDS] + spec
    for r in rows:
        assert sum(r['shares'].values()) == pytest.approx(1.0)
        assert r['tokens_per_s'] > 0 and 0 <= r['agreement'] <= 1
    full, at0 = rows[0], rows[-4]
    assert full['agreement'] == 1.0 and full['speedup'] == 1.0 and full['shares']['final'] == 1.0
    assert at0['shares']['exit 1'] == 1.0 and at0['layer_speedup'] == 3.0  # every token leaves after block 1
    assert all(r['next_line_em'] is not None for r in rows[:-3])
    for r in rows[-3:]:
        assert r['identical'] is True and r['agreement'] == 1.0 and 0 <= r['acceptance'] <= 1
    assert result['best'] in THRESHOLDS
    # the fastest fixed exit of each prompt: no slower than either fixed exit over all prompts
    fixed, pick = rows[-3:-1], result['best_exit_per_prompt']
    secs = [min(r['prompt_seconds'][i] for r in fixed) for i in range(len(fixed[0]['prompt_seconds']))]
    assert pick['exits'] == [min(fixed, key=lambda r: r['prompt_seconds'][i])['spec_exit'] for i in range(len(secs))]
    assert pick['tokens_per_s'] == pytest.approx(result['gen_tokens'] * len(secs) / sum(secs))
    assert pick['speedup'] >= max(r['speedup'] for r in fixed) - 1e-9


def test_report_files(sweep):
    d, result = sweep
    with open(d / 'out' / 'fr.csv') as f:
        table = list(csv.DictReader(f))
    assert [r['name'] for r in table] == [r['name'] for r in result['rows']]
    assert [float(r['threshold']) for r in table if r['policy'] == 'early exit'] == THRESHOLDS
    assert {'share_exit1', 'share_exit2', 'share_final'} <= set(table[0])
    assert json.loads((d / 'out' / 'fr.json').read_text())['rows'] == json.loads(json.dumps(result['rows']))
    assert (d / 'out' / 'fr.png').stat().st_size > 1000
    lines = (d / 'out' / 'fr.exits.txt').read_text().split('\n')[2:-1]  # two header lines, a final newline
    assert len(lines) >= 2 and len(lines) % 2 == 0
    for text, marks in zip(lines[::2], lines[1::2]):
        assert len(marks) == len(text) and set(marks) <= set('12 ')


def test_sweep_without_matplotlib_writes_the_rest(sweep, tmp_path):
    """A user without matplotlib: the sweep still writes its table, CSV and JSON, and says once
    that it drew no picture and why (matplotlib made unimportable in a fresh interpreter)."""
    d, _ = sweep
    prefix = tmp_path / 'nomp'
    args = [f'--out_dir={d / "ckpt"}', '--sweep=thresholds', '--device=cpu', '--dtype=float32', '--thresholds=[0.5]',
            '--eval_iters=1', '--batch_size=2', '--prompts=1', '--gen_tokens=4', '--lines=0', '--spec_exits=[]',
            '--repeats=1', f'--report={prefix}']
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['evaluate.py'] + {args!r}; runpy.run_path('evaluate.py', run_name='__main__')")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.exists(f'{prefix}.csv') and os.path.exists(f'{prefix}.json')
    assert not os.path.exists(f'{prefix}.png')
    assert out.stdout.count('no picture') == 1 and 'matplotlib' in out.stdout
    assert 'val perplexity' in out.stdout  # the table is printed


def test_picture_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib raises ImportError
    assert evaluate.plot(str(tmp_path / 'x.png'), [], 'none') is False
    assert not (tmp_path / 'x.png').exists()


def test_next_line_tasks_pick_function_body_lines():
    src = ('import os\n'
           'def f(a):\n'
           '    x = a + 1\n'
           '\n'
           '    return x\n'
           'y = 3\n'
           'class C:\n'
           '    def g(self):\n'
           '        if self:\n'
           '            pass\n'
           '    z = 1\n'
           'def h(\n'
           '        b):\n'
           '    return b\n')
    enc = lambda s: list(s.encode())
    body = [('def f(a):\n', '    x = a + 1', 21),
            ('def f(a):\n    x = a + 1\n\n', '    return x', 20),
            ('    def g(self):\n', '        if self:', 24),
            ('    def g(self):\n        if self:\n', '            pass', 24)]
    for block_size in (64, 36):  # 36: prompts left-cropped to 36 - (line + 8) tokens
        tasks = evaluate.next_line_tasks([src, 'def k():\n  ok\n'], enc, block_size, 100, seed=0)
        want = [(p[-(block_size - new):], line, new) for p, line, new in body]
        assert [(bytes(ids).decode(), line, new) for ids, line, new in tasks] == want
    assert len(evaluate.next_line_tasks([src], enc, 40, 2, seed=0)) == 2


def test_next_line_em_cuts_at_the_newline(monkeypatch):
    said = {'full': iter(['    x = 1\n    y', '    x = 1', '    x = 12', '    x = 1 \n']),
            'recompute': iter(['    x = 1', '    x', '    y', '    x = 2'])}
    monkeypatch.setattr(evaluate, 'generate',
                        lambda model, ids, new, stop, method, **kw: {'tokens': list(next(said[method]).encode())})
    decode = lambda ids: bytes(ids).decode()
    policies = [dict(method='full'), dict(method='recompute', thres=0.5)]
    assert evaluate.next_line_em(None, [([1], '    x = 1', 17)] * 4, decode, 10, policies) == [0.5, 0.25]
    assert evaluate.next_line_em(None, [], decode, 10, policies) == [None, None]


def test_exit_view_marks_each_character():
    lines = evaluate.exit_view(['ab', 'c\n', 'd\te'], [1, 2, 3], exit_depths=(1, 2))
    assert lines == ['abc', '112', 'd·e', '   ']


def test_bad_inputs_are_clear_errors(sweep, tmp_path):
    d, _ = sweep
    base = [f'--out_dir={d / "ckpt"}', '--sweep=thresholds', '--device=cpu', f'--report={tmp_path / "x"}']
    with pytest.raises(SystemExit, match=r'thresholds=\[0.5, 1.5\]: not allowed: \[1.5\]; each .* in \[0, 1\]'):
        evaluate.main(base + ['--thresholds=[0.5,1.5]'])
    with pytest.raises(SystemExit, match=r"spec_exits=\[3\]: allowed: the model's exit_layers \[1, 2\]"):
        evaluate.main(base + ['--spec_exits=[3]'])
    with pytest.raises(SystemExit, match='got tp=2, allowed: tp=1'):
        evaluate.main(base + ['--tp=2'])
    with pytest.raises(SystemExit, match=r'spec_stop=1.5; allowed: None .* in \(0, 1\)'):
        evaluate.main(base + ['--spec_stop=1.5'])
    with pytest.raises(SystemExit, match="beside='nowhere.json': no such file"):
        evaluate.main(base + ['--beside=nowhere.json', '--gen_tokens=8'])
    with pytest.raises(SystemExit, match="sweep='threshold'; allowed: 'pairs', 'thresholds'"):
        evaluate.main([a.replace('thresholds', 'threshold') for a in base])
    plain = GPT(GPTConfig(arch='llama', n_layer=2, n_head=2, n_embd=16, vocab_size=256, block_size=64, exit_layers=()))
    checkpoint.save_checkpoint(str(tmp_path / 'plain'), plain, None, {'dataset': str(d / 'data')}, 0, 0.0)
    with pytest.raises(SystemExit, match='needs a checkpoint with exits'):
        evaluate.main([f'--out_dir={tmp_path / "plain"}'] + base[1:])


def test_learn_then_test_guarantee_on_a_known_curve():
    """One exit whose max probability u is uniform and whose token is wrong with probability
    1 - u when it fires: the true rate of differing tokens at threshold t is (1 - t)^2 / 2.
    Over many calibration draws the chosen threshold breaks EPS in at most about delta of
    them, and it is not needlessly strict."""
    eps, delta, n, trials = 0.05, 0.1, 3000, 200
    ths = [round(1 - 0.02 * i, 2) for i in range(51)]
    true_rate = lambda t: (1 - t) ** 2 / 2
    g = torch.Generator().manual_seed(0)
    broke, chosen = 0, []
    for _ in range(trials):
        u = torch.rand(n, generator=g)
        wrong = torch.rand(n, generator=g) > u
        errors = [int(((u >= t) & wrong).sum()) for t in ths]
        t = evaluate.ltt_threshold(ths, errors, n, eps, delta)
        assert t is not None
        chosen.append(t)
        broke += true_rate(t) > eps
    assert broke <= delta * trials * 1.5
    best = 1 - (2 * eps) ** 0.5  # 0.684: the loosest threshold that keeps the rate at eps
    assert sum(chosen) / trials < best + 0.08  # close to it, not at the strict end
    assert abs(evaluate.binom_cdf(3, 10, 0.5) - 176 / 1024) < 1e-12


def test_calibrate_on_a_checkpoint(sweep):
    d, _ = sweep
    out = evaluate.main([f'--out_dir={d / "ckpt"}', '--calibrate=0.05', '--delta=0.1', '--device=cpu',
                         '--dtype=float32', '--eval_iters=2', '--batch_size=8', '--calib_splits=5',
                         f'--thresholds={THRESHOLDS}'])
    assert len(out['splits']) == 5 and out['positions'] == 2 * 8 * 64
    assert out['threshold'] is None or out['threshold'] in THRESHOLDS
    assert all(r['layer_speedup'] >= 1 for r in out['splits'])
    if out['threshold'] is not None:  # an exit fires there: tokens leave early
        assert out['layer_speedup'] > 1 and out['calibration_rate'] <= 0.05
    several = evaluate.main([f'--out_dir={d / "ckpt"}', '--calibrate=[0.05,0.5]', '--delta=0.1', '--device=cpu',
                             '--dtype=float32', '--eval_iters=2', '--batch_size=8', '--calib_splits=5',
                             f'--thresholds={THRESHOLDS}'])
    assert several[0] == out and several[1]['eps'] == 0.5  # a looser EPS: a looser threshold, if any
    loosest = lambda r: 1.0 if r['threshold'] is None else r['threshold']
    assert loosest(several[1]) <= loosest(out)
    with pytest.raises(SystemExit, match='calibrate=1.5'):
        evaluate.main([f'--out_dir={d / "ckpt"}', '--calibrate=1.5', '--device=cpu'])


def test_sweep_marks_the_calibrated_thresholds(sweep, tmp_path):
    """--sweep=thresholds with --calibrate: each EPS's certified threshold (the same as
    --calibrate alone finds) is marked on its row; --beside draws another sweep's rows too;
    spec_stop reaches the speculative rows, which stay the full model's tokens."""
    d, first = sweep
    common = [f'--out_dir={d / "ckpt"}', '--device=cpu', '--dtype=float32', '--eval_iters=2', '--batch_size=8',
              '--calib_splits=3', f'--thresholds={THRESHOLDS}', '--delta=0.1']
    alone = evaluate.main(common + ['--calibrate=[0.05,0.5]'])
    result = evaluate.main(common + ['--calibrate=[0.05,0.5]', '--sweep=thresholds', '--prompts=1', '--gen_tokens=6',
                                     '--lines=0', '--repeats=1', '--spec_k=6', '--spec_stop=0.5',
                                     f'--beside={d / "out" / "fr.json"}', f'--report={tmp_path / "cal"}'])
    assert result['calibrated'] == alone and any(c['threshold'] is not None for c in alone)
    for r in result['rows']:
        want = [c['eps'] for c in alone if r['threshold'] is not None and c['threshold'] == r['threshold']]
        assert r['calibrated_eps'] == (want or None)
    assert sum(len(r['calibrated_eps'] or []) for r in result['rows']) == sum(c['threshold'] is not None
                                                                              for c in alone)
    assert all(r['identical'] for r in result['rows'] if r['policy'] == 'speculative')
    assert (tmp_path / 'cal.png').stat().st_size > 1000
