"""
Evaluate a trained checkpoint on its dataset's val split: loss and perplexity of the final
head and of every exit, as trained or with layer-parallel pairs, or a sweep over every
pair span (arXiv 2502.02790, "Leveraging the True Depth of LLMs"), or the quality-speed
frontier of early exit over confidence thresholds (EE-LLM, arXiv 2312.04916).

    python evaluate.py --out_dir=out-pystdlib
    python evaluate.py --out_dir=out-pystdlib --layer_parallel=[2,4]
    python evaluate.py --out_dir=out-pystdlib --sweep=pairs       # every span: depth vs perplexity
    torchrun --nproc_per_node=2 evaluate.py --out_dir=out-pystdlib --tp=2 --sweep=pairs
    python evaluate.py --out_dir=out-pystdlib --sweep=thresholds  # early exit: quality vs speed
    python evaluate.py --out_dir=out-pystdlib --sweep=thresholds --thresholds=[0.9,0.8] --spec_exits=[2]
    python evaluate.py --out_dir=out-pystdlib --calibrate=0.02 --delta=0.05  # a threshold with a guarantee
    python evaluate.py --out_dir=out-gpu --sweep=thresholds --calibrate=[0.01,0.02,0.05] --beside=other.json

The pairs sweep tries every even span [start, end) that the exits allow (none between the
two blocks of a pair) and prints one row per span: the sequential depth left (n_layer minus
one per pair), the val loss and perplexity, the change against no pairs, and each exit's
loss. The last line is JSON with every row.

The thresholds sweep (EE-LLM's confidence exit; LayerSkip's self-speculation, arXiv 2404.16710)
gives, for the full model, each threshold (a token leaves at the first exit whose max softmax
probability reaches it) and each drafting exit: val perplexity (each position scored by the
head it leaves at), greedy agreement with the full model on `prompts` val windows, next-line
exact match on `lines` function-body lines of the val text, and batch-1 decoding speed:
tokens/s, speedup over full, tokens per exit, layer-count speedup. It names the fastest
threshold within 1% of the full model's perplexity and the fastest fixed drafting exit of
each prompt, picked after the fact (what choosing an exit per sequence could reach), and
writes <report>.csv, .json, .png (with matplotlib) and .exits.txt (which tokens left
early). Everything runs in `dtype` (bfloat16 on CUDA, float32 on CPU by default), decoding as
generate.py's does.

--calibrate=EPS picks, among `thresholds`, the loosest whose greedy tokens differ from the
full model's on at most EPS of the positions with probability >= 1 - delta over the
calibration data (Learn-then-Test with a binomial tail bound, as CALM calibrates early
exit), on one random half of the val positions, and reports the realised rate and the
layer-count speedup on the other half, and how often the rate broke EPS over calib_splits
random halvings. With --sweep=thresholds it runs first, and the sweep marks each certified
threshold's row (its measured speed is that row's). Positions are teacher-forced (KV
recomputation makes the hidden states the full model's) and taken as independent, which
positions of one window only roughly are.
"""

import csv
import json as _json  # (json is a key below)
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from checkpoint import Checkpoint, load_model, tokenizer
from configurator import configure, run, snapshot
from decode import Decoder, full_vocab, generate
from model import DTYPES
from parallel import ParallelState, init_distributed
from corpus import Batches, load_data
from train import autocast, evaluate

# -----------------------------------------------------------------------------
out_dir = 'out-pystdlib'
dataset = None                  # None: the one the checkpoint was trained on
eval_iters = 50                 # val batches
batch_size = 16
seed = 1337                     # picks the val batches (train.py's evaluation uses the same ones)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
tp = 1                          # tensor-parallel ranks (under torchrun)
layer_parallel = None           # [start, end): run these blocks in parallel pairs; None: as saved
sweep = ''                      # 'pairs': every pair span; 'thresholds': the early-exit frontier
thresholds = tuple(round(1 - 0.05 * i, 2) for i in range(21))  # 1.0 down to 0.0
prompts = 8                     # val windows for agreement and speed
prompt_len = 64                 # tokens per window (shortened to fit block_size if need be)
gen_tokens = 64                 # greedy tokens generated after each window
repeats = 3                     # timed runs of each window; the fastest counts (the first warms up)
lines = 40                      # function-body lines for the next-line exact match (0: skip)
spec_exits = None               # exit_layers numbers to draft with (self-speculation); None: every exit
spec_k = 4                      # tokens drafted per verification (at most, with spec_stop or 'auto')
spec_stop = None                # a draft ends when the drafting exit's max prob falls below it (None: never)
compile = False                 # compile the decoder's blocks and heads (generate.py's key)
report = ''                     # file prefix for .csv/.json/.png/.exits.txt; '': out_dir/frontier
calibrate = None                # EPS (or [EPS, ...]): the loosest threshold whose tokens differ from the full
                                # model's on <= EPS of them
delta = 0.05                    # ... with probability >= 1 - delta over the calibration data (Learn-then-Test)
calib_splits = 20               # random calibration/test halves the guarantee is checked on
beside = ''                     # another sweep's .json (e.g. an EE-tuned model's) drawn in the picture too
# -----------------------------------------------------------------------------
DEFAULTS = snapshot(globals())


def pair_spans(mc):
    """Every even span [start, end) of blocks that the model's exits allow, shortest first."""
    spans = []
    for n in range(2, mc.n_layer + 1, 2):
        for start in range(mc.n_layer - n + 1):
            if not mc.exits_inside_pairs((start, start + n)):
                spans.append([start, start + n])
    return spans


def val_losses(cfg, ps, dev, data, ctx, span=None):
    """(model config, row) with the given layer_parallel: the row holds the span, the
    sequential depth (one block less per pair), the final and every exit's val loss."""
    model, _ = load_model(cfg['out_dir'], ps, dev, layer_parallel=span)
    mc = model.config
    batches = Batches(data, cfg['batch_size'], mc.block_size, seed=cfg['seed'], device=dev)
    loss, *exits = evaluate(model, batches, cfg['eval_iters'], ctx, ps, splits=('val',))['val']
    return mc, dict(layer_parallel=list(mc.layer_parallel), depth=mc.n_layer - len(mc.pairs), loss=loss,
                    exit_losses=exits)


# -----------------------------------------------------------------------------
# the early-exit frontier: quality and speed per confidence threshold (EE-LLM, arXiv 2312.04916)

MARKS = '123456789abcdefghijklmnopqrstuvwxyz'  # exits in the .exits.txt view
COLUMNS = ['name', 'policy', 'threshold', 'spec_exit', 'val_loss', 'val_ppl', 'ppl_change', 'agreement',
           'next_line_em', 'tokens_per_s', 'speedup', 'mean_depth', 'layer_speedup', 'acceptance', 'identical',
           'calibrated_eps']


@torch.no_grad()
def head_records(model, batches, iters, ctx, split='val'):
    """Every head's view of every position of `iters` fixed batches (teacher-forced; with KV
    recomputation an early-exit decoder sees the same hidden states): max probability, argmax
    and CE against the data, each (H, N), heads in depth order, the final one last."""
    p_max, best, ce = [], [], []
    for k in range(iters):
        x, y = batches.eval(split, k)
        with ctx:
            logits, exit_logits = model(x, exits=True)
        heads = [full_vocab(model, lg).float().flatten(0, 1) for lg in exit_logits + [logits]]  # (N, V) each
        p, i = zip(*[lg.softmax(-1).max(-1) for lg in heads])
        p_max.append(torch.stack(p))
        best.append(torch.stack(i))
        ce.append(torch.stack([F.cross_entropy(lg, y.view(-1), reduction='none') for lg in heads]))
    return torch.cat(p_max, 1), torch.cat(best, 1), torch.cat(ce, 1)


def first_firing(p_max, thresholds):
    """(K, H, N) one-hot: the head each position leaves at under each threshold (the first exit
    whose max probability reaches it, else the final head)."""
    th = torch.tensor(thresholds, device=p_max.device, dtype=p_max.dtype)
    fire = p_max[None] >= th[:, None, None]  # (K, H, N)
    fire[:, -1] = True  # the final head always answers
    return fire & (fire.cumsum(1) == 1)


def threshold_losses(records, thresholds):
    """The confidence rule on head_records of train.evaluate's val batches: each position is
    scored by the CE of the first exit (in depth order) whose max probability >= threshold,
    else of the final head. Returns (the final head's loss, [loss per threshold])."""
    p_max, _, ce = records
    losses = (first_firing(p_max, list(thresholds)) * ce[None]).sum((1, 2)).double() / ce.size(1)
    return ce[-1].double().mean().item(), losses.tolist()


# -----------------------------------------------------------------------------
# thresholds with a guarantee (Learn-then-Test, Angelopoulos et al. 2021, arXiv 2110.01052;
# CALM's use of it for early exit, Schuster et al. 2022, arXiv 2207.07061)

def binom_cdf(k, n, p):
    """P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0 or p >= 1:
        return 1.0 if p <= 0 or k >= n else 0.0
    lp, lq, terms = math.log(p), math.log1p(-p), []
    for i in range(int(k) + 1):
        terms.append(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def ltt_threshold(thresholds, errors, n, eps, delta):
    """Fixed-sequence testing from the strictest threshold down: at each, the null 'the rate
    of differing tokens exceeds eps' is rejected when P(Binomial(n, eps) <= errors) <= delta,
    and the walk stops at the first threshold it cannot reject. Returns the loosest rejected
    threshold (None: not even the strictest), whose rate is <= eps with probability >= 1 -
    delta over the n calibration tokens (taken as independent draws)."""
    chosen = None
    for th, k in sorted(zip(thresholds, errors), key=lambda te: -te[0]):
        if binom_cdf(k, n, eps) > delta:
            break
        chosen = th
    return chosen


def disagreement(p_max, best, depths, thresholds):
    """Per threshold: the tokens that differ from the final head's argmax (a count) and the
    mean depth in blocks, over the positions of p_max, best (H, N) from head_records; depths
    (H,): the blocks before each head."""
    first = first_firing(p_max, thresholds)                                   # (K, H, N)
    emitted = (first * best[None]).sum(1)                                     # (K, N)
    depth = (first * torch.as_tensor(depths, dtype=p_max.dtype, device=p_max.device)[None, :, None]).sum(1)
    return (emitted != best[-1][None]).sum(1).tolist(), depth.mean(1).tolist()


def next_line_tasks(docs, encode, block_size, n, seed):
    """n lines inside function bodies (after a `def ...:` line, indented deeper, 4..80
    characters stripped), chosen by seed. Each task: (prompt ids from the function's def line
    up to the line, left-cropped to fit block_size, the line's text, max new tokens)."""
    cands = []
    for j, doc in enumerate(docs):
        defs, pos = [], 0  # the open functions: (indent, offset of the def line)
        for line in doc.split('\n'):
            s = line.strip()
            if s:
                indent = len(line) - len(line.lstrip())
                while defs and defs[-1][0] >= indent:
                    defs.pop()
                if defs and 4 <= len(s) <= 80:
                    cands.append((j, defs[-1][1], pos, line))
                if s.startswith(('def ', 'async def ')) and s.endswith(':'):
                    defs.append((indent, pos))
            pos += len(line) + 1
    cands = [c for c in cands if len(encode(c[3])) + 8 < block_size]
    tasks = []
    for j, start, pos, line in sorted(random.Random(seed).sample(cands, min(n, len(cands)))):
        new = len(encode(line)) + 8
        tasks.append((encode(docs[j][start:pos])[-(block_size - new):], line, new))
    return tasks


def next_line_em(model, tasks, decode, nl, policies):
    """Per policy (generate() keywords), the share of tasks whose greedy line (up to the first
    newline) is the target. Tasks run shortest first, every policy on each, so that the decoder
    is set up once per size."""
    hits = [0] * len(policies)
    for ids, line, new in sorted(tasks, key=lambda t: len(t[0]) + t[2]):
        for i, kw in enumerate(policies):
            hits[i] += decode(generate(model, ids, new, stop=nl, **kw)['tokens']).split('\n')[0] == line
    return [h / len(tasks) if tasks else None for h in hits]


@torch.no_grad()
def timed(model, prompts, n, dev, repeats, decoder, **kw):
    """generate() with decoder on every prompt, batch 1, `repeats` times each. Returns (outputs,
    decode tokens/s: the tokens over the wall clock of each prompt's fastest run less its prefill,
    those seconds per prompt)."""
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.startswith('cuda') else (lambda: None)

    def clock(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    outs, seconds = [], []
    for p in prompts:
        runs = [clock(lambda: generate(model, p, n, stop=None, decoder=decoder, **kw))
                for _ in range(repeats)]  # (the first warms up)
        prefill = min(clock(lambda: decoder.start({0: p}, decoder.max_len))[0] for _ in range(repeats))
        outs.append(runs[-1][1])
        seconds.append(min(t for t, _ in runs) - prefill)
    return outs, sum(len(o['tokens']) for o in outs) / sum(seconds), seconds


def decode_row(name, outs, ref, tok_s, full_tok_s, names):
    """A row: agreement with the reference continuations (common prefix / length), speed, the
    share of tokens per head and the layer-count speedup."""
    prefix = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    depths = [d for o in outs for d in o['depths']]
    mean_depth = sum(depths) / len(depths)
    agreement = sum(prefix(o['tokens'], r['tokens']) / len(r['tokens']) for o, r in zip(outs, ref)) / len(ref)
    return dict(dict.fromkeys(COLUMNS), name=name, tokens_per_s=tok_s, speedup=tok_s / full_tok_s, agreement=agreement,
                mean_depth=mean_depth, layer_speedup=max(names) / mean_depth,  # (max(names): n_layer)
                shares={label: depths.count(d) / len(depths) for d, label in names.items()})


def best_exit_per_prompt(rows, tokens, full_tok_s):
    """The fastest fixed drafting exit of each prompt, picked after the fact from the
    self-speculative rows: how fast a choice of exit per sequence could be at best, the
    reference for the adaptive row. None without two fixed exits."""
    fixed = [r for r in rows if r['policy'] == 'speculative' and r['spec_exit'] != 'auto']
    if len(fixed) < 2:
        return None
    pick = [min(fixed, key=lambda r: r['prompt_seconds'][i]) for i in range(len(fixed[0]['prompt_seconds']))]
    tok_s = tokens / sum(r['prompt_seconds'][i] for i, r in enumerate(pick))
    print(f'the fastest fixed exit of each prompt, picked after the fact: {tok_s:.1f} tokens/s, '
          f'{tok_s / full_tok_s:.2f}x (exits {[r["spec_exit"] for r in pick]})')
    return {'exits': [r['spec_exit'] for r in pick], 'tokens_per_s': tok_s, 'speedup': tok_s / full_tok_s}


def exit_view(pieces, depths, exit_depths):
    """Each text line followed by a line of the same width marking the head each character's
    token left at: '1' the first exit, '2' the second, ..., ' ' the final head."""
    mark = {d: MARKS[i] for i, d in enumerate(exit_depths)}
    text = ''.join(c if c.isprintable() or c == '\n' else '·' for c in ''.join(pieces))
    marks = ''.join(mark.get(d, ' ') * len(p) for p, d in zip(pieces, depths))  # one per character of text
    out, i = [], 0
    for line in text.split('\n'):
        out += [line, marks[i:i + len(line)]]
        i += len(line) + 1
    return out


def plot(path, rows, title, beside=None):
    """The frontier: speedup (measured and layer-count) against the val perplexity change;
    the thresholds calibrated for an EPS marked; beside: another sweep's result drawn in grey."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ee = [r for r in rows if r['policy'] != 'speculative']
    y = [100 * r['ppl_change'] for r in ee]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r['speedup'] for r in ee], y, 'o-', label='measured speedup (tokens/s over full)')
    ax.plot([r['layer_speedup'] for r in ee], y, 's--', alpha=0.5, label='layer-count speedup (n_layer / mean depth)')
    for r, v in zip(ee, y):
        ax.annotate(r['name'], (r['speedup'], v), textcoords='offset points', xytext=(4, 4), fontsize=7)
    for r in rows[len(ee):]:
        ax.plot(r['speedup'], 0, '*', ms=14, label=f"self-speculative from {r['name'][5:]} (lossless)")
    for r, v in zip(ee, y):
        if r['calibrated_eps']:
            ax.plot(r['speedup'], v, 'D', mfc='none', ms=11, c='tab:red')
            ax.annotate('EPS ' + ', '.join(f'{e:.0%}' for e in r['calibrated_eps']), (r['speedup'], v),
                        textcoords='offset points', xytext=(4, -11), fontsize=7, c='tab:red')
    if beside:
        other = [r for r in beside['rows'] if r['policy'] != 'speculative']
        ax.plot([r['speedup'] for r in other], [100 * r['ppl_change'] for r in other], 'o-', c='grey', alpha=0.6,
                label=f"{beside['out_dir']}: measured speedup")
        for i, r in enumerate(beside['rows'][len(other):]):
            ax.plot(r['speedup'], 0, '*', ms=10, c='grey',
                    label=f"{beside['out_dir']}: self-speculative, by drafting exit" if i == 0 else None)
            ax.annotate(r['name'][10:], (r['speedup'], 0), textcoords='offset points', xytext=(-4, 8), fontsize=7,
                        c='grey')
    ax.axhline(1, ls=':', c='grey', label='+1% perplexity')
    ax.set_yscale('symlog', linthresh=1)
    ax.set_ylim(bottom=min(y) - 0.1)
    ax.set(xlabel='speedup over the full model (x)', ylabel='val perplexity change vs full (%)', title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return True


def check_frontier(cfg, mc):
    """The sweep's keys against the model. Returns (thresholds, drafting exit layers, prompt length)."""
    if not mc.exit_layers:
        sys.exit(f"sweep=thresholds needs a checkpoint with exits; {cfg['out_dir']} has exit_layers=[] "
                 '(convert.py add_exits adds some)')
    ths, spec = cfg['thresholds'], cfg['spec_exits']
    bad = [t for t in ths if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1]
    if not ths or bad:
        sys.exit(f'thresholds={list(ths)}: not allowed: {bad or "no thresholds"}; each must be a number in '
                 '[0, 1] (a max softmax probability), e.g. --thresholds=[0.9,0.8]')
    spec = list(mc.exit_layers) if spec is None else [spec] if isinstance(spec, int) else list(spec)
    if any(L not in mc.exit_layers for L in spec):
        sys.exit(f"spec_exits={spec}: allowed: the model's exit_layers {list(mc.exit_layers)} (or [] for none)")
    for k, low in (('prompts', 1), ('prompt_len', 1), ('gen_tokens', 1), ('repeats', 1), ('lines', 0),
                   ('spec_k', 1)):
        if not isinstance(cfg[k], int) or cfg[k] < low:
            sys.exit(f'{k}={cfg[k]!r}; allowed: an int >= {low}')
    stop = cfg['spec_stop']
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0 < stop < 1):
        sys.exit(f'spec_stop={stop!r}; allowed: None (drafts run spec_k tokens) or a max probability in (0, 1)')
    room = mc.block_size - cfg['gen_tokens'] - cfg['spec_k']  # (a prompt of `room` tokens fits)
    if room < 1:
        sys.exit(f"gen_tokens={cfg['gen_tokens']}: no room for a prompt in block_size={mc.block_size}; "
                 f"allowed: gen_tokens <= {mc.block_size - cfg['spec_k'] - 1} (block_size - spec_k - 1)")
    return [float(t) for t in ths], spec, min(cfg['prompt_len'], room)


def frontier(cfg, ps, dev, data, data_meta, ctx):
    """--sweep=thresholds: rows for the full model, each threshold and each drafting exit."""
    model, ckpt = load_model(cfg['out_dir'], ps, dev, layer_parallel=cfg['layer_parallel'])
    model.to(DTYPES[cfg['dtype']]).eval()  # (decoding runs in dtype, as generate.py's does)
    mc, n, t0 = model.config, cfg['gen_tokens'], time.time()
    ths, spec, plen = check_frontier(cfg, mc)
    beside = None
    if cfg['beside']:
        if not os.path.isfile(cfg['beside']):
            sys.exit(f"beside={cfg['beside']!r}: no such file; allowed: another sweep's <report>.json")
        with open(cfg['beside']) as f:
            beside = _json.load(f)
    batches = Batches(data, cfg['batch_size'], mc.block_size, seed=cfg['seed'], device=dev)
    records = head_records(model, batches, cfg['eval_iters'], ctx)  # (the calibration's too)
    final, losses = threshold_losses(records, ths)
    tokens = cfg['eval_iters'] * cfg['batch_size'] * mc.block_size
    print(f'val loss per threshold on {tokens:,} tokens: {time.time() - t0:.1f} s')
    g = torch.Generator().manual_seed(cfg['seed'])
    offs = torch.randint(len(data['val']) - plen, (cfg['prompts'],), generator=g)
    prompts = [data['val'][i:i + plen].astype(int).tolist() for i in offs.tolist()]
    encode, decode = tokenizer(ckpt.meta, cfg['out_dir'])
    tasks, nl, eot = [], None, data_meta.get('eot_token')
    if decode is None:
        print('the checkpoint names no tokenizer: the next-line exact match and the exits view are skipped')
    elif cfg['lines']:
        text, sep = decode(data['val'].tolist()), decode([eot]) if eot is not None else ''
        tasks = next_line_tasks(text.split(sep) if sep else [text], encode, mc.block_size, cfg['lines'], cfg['seed'])
        nl = encode('\n')[0] if len(encode('\n')) == 1 else None  # stop there (the text is cut at '\n' anyway)
        print(f'next-line exact match on {len(tasks)} function-body lines of the val text')
    names = mc.head_names
    timing, plain = Decoder(model, compile=cfg['compile']), Decoder(model)  # plain: for quality only
    speed = lambda kw: timed(model, prompts, n, dev, cfg['repeats'], timing, **kw)
    policies = [dict(method='full')] + [dict(method='recompute', thres=th) for th in ths]
    # each drafting exit, and adaptive self-speculation (decode.DraftPlan: the exit and draft length chosen as it goes)
    spec = spec + ['auto'] if spec else []
    speculative = [dict(method='speculative', spec_exit=L if L == 'auto' else mc.exit_index(L), spec_k=cfg['spec_k'],
                        spec_stop=cfg['spec_stop']) for L in spec]
    calibrated = calibration(cfg, dev, data, ctx, model, records) if cfg['calibrate'] is not None else []
    ref, full_tok_s, _ = speed(policies[0])
    rows = []
    for th, loss, kw in zip([None] + ths, [final] + losses, policies):
        outs, tok_s, _ = (ref, full_tok_s, None) if th is None else speed(kw)
        r = decode_row('full' if th is None else f'{th:.2f}', outs, ref, tok_s, full_tok_s, names)
        r.update(policy='full' if th is None else 'early exit', threshold=th, val_loss=loss, val_ppl=math.exp(loss),
                 ppl_change=math.exp(loss - final) - 1)
        r['calibrated_eps'] = [c['eps'] for c in calibrated if th is not None and c['threshold'] == th] or None
        rows.append(r)
        print(f"{r['name']}: val perplexity {r['val_ppl']:.3f} ({r['ppl_change']:+.2%}), {tok_s:.1f} tokens/s, "
              f'{time.time() - t0:.1f} s elapsed')
    for L, kw in zip(spec, speculative):  # LayerSkip: draft with exit L, verify with the rest
        outs, tok_s, seconds = speed(kw)
        r = decode_row(f'spec exit {L}', outs, ref, tok_s, full_tok_s, names)
        r.update(policy='speculative', spec_exit=L, mean_depth=None, layer_speedup=None, prompt_seconds=seconds,
                 acceptance=sum(o['accepted'] for o in outs) / max(1, sum(o['drafted'] for o in outs)),
                 identical=all(o['tokens'] == x['tokens'] for o, x in zip(outs, ref)))
        rows.append(r)
        print(f"{r['name']}: {tok_s:.1f} tokens/s, identical to full: {r['identical']}, "
              f'{time.time() - t0:.1f} s elapsed')
    oracle = best_exit_per_prompt(rows, sum(len(o['tokens']) for o in ref), full_tok_s)
    # quality only: not compiled (the prompts' lengths vary up to block_size; each size would compile anew)
    for r, em in zip(rows, next_line_em(model, tasks, decode, nl, [dict(kw, decoder=plain) for kw in policies])):
        r['next_line_em'] = em
    if tasks:
        print(f'next-line exact match: {time.time() - t0:.1f} s elapsed')
    print_table(rows, names, f"{tokens:,} val tokens; {len(prompts)} prompts of {plen} tokens + {n} new ones, batch 1, "
                f"{dev}; {mc.n_layer} blocks, exits after blocks {list(mc.exit_depths)}")
    best = pick_best(rows)
    prefix = cfg['report'] or os.path.join(cfg['out_dir'], 'frontier')
    result = {'out_dir': cfg['out_dir'], 'tokens': tokens, 'prompts': cfg['prompts'], 'prompt_len': plen,
              'gen_tokens': n, 'lines': len(tasks), 'best': best and best['threshold'], 'rows': rows,
              'calibrated': calibrated, 'best_exit_per_prompt': oracle}
    view = exits_view(model, prompts[0], n, best['threshold'] if best else 0.8, decode, plain) if decode else None
    write_report(prefix, result, names, f"{cfg['out_dir']}: {mc.n_layer} blocks, exits {list(mc.exit_layers)}", view,
                 beside)
    print(_json.dumps(result))
    return result


def calibration(cfg, dev, data, ctx, model=None, records=None):
    """--calibrate=EPS (or a list of them): on val positions split at random into calibration
    and test halves, the loosest global threshold that Learn-then-Test certifies (tokens
    differing from the full model's greedy token on <= EPS of them, with probability >= 1 -
    delta), its rate and layer-count speedup on the test half; over calib_splits random
    splits, how often the test rate broke EPS. Returns a list: one result per EPS. model: the
    checkpoint's, loaded already (in dtype), and records its head_records on the val batches;
    None: load it, compute them."""
    epss, delta = cfg['calibrate'], cfg['delta']
    epss = list(epss) if isinstance(epss, (list, tuple)) else [epss]
    ths = sorted({float(t) for t in cfg['thresholds']}, reverse=True)
    for k, v in [('calibrate', e) for e in epss] + [('delta', delta)]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            sys.exit(f'{k}={v!r}; allowed: a number in (0, 1), or for calibrate a list of them')
    if not isinstance(cfg['calib_splits'], int) or cfg['calib_splits'] < 1:
        sys.exit(f"calib_splits={cfg['calib_splits']!r}; allowed: an int >= 1")
    if model is None:
        model, _ = load_model(cfg['out_dir'], ParallelState(), dev, layer_parallel=cfg['layer_parallel'])
        model.to(DTYPES[cfg['dtype']]).eval()
    mc = model.config
    if not mc.exit_layers:
        sys.exit(f"calibrate needs a checkpoint with exits; {cfg['out_dir']} has exit_layers=[]")
    if records is None:
        records = head_records(model, Batches(data, cfg['batch_size'], mc.block_size, seed=cfg['seed'], device=dev),
                               cfg['eval_iters'], ctx)
    p_max, best, _ = records
    depths, N, results = list(mc.exit_depths) + [mc.n_layer], p_max.size(1), []
    for eps in epss:
        g, splits = torch.Generator().manual_seed(cfg['seed']), []
        for _ in range(cfg['calib_splits']):
            perm = torch.randperm(N, generator=g).to(p_max.device)
            cal, test = perm[:N // 2], perm[N // 2:]
            errors, _ = disagreement(p_max[:, cal], best[:, cal], depths, ths)
            th = ltt_threshold(ths, errors, len(cal), eps, delta)
            rate, depth = 0.0, float(mc.n_layer)  # (no threshold certified: the full model)
            if th is not None:
                (k,), (depth,) = disagreement(p_max[:, test], best[:, test], depths, [th])
                rate = k / len(test)
            splits.append(dict(threshold=th, calibration_rate=None if th is None else errors[ths.index(th)] / len(cal),
                               test_rate=rate, layer_speedup=mc.n_layer / depth, violated=rate > eps))
        first = splits[0]
        th = 'none certified (the full model)' if first['threshold'] is None else first['threshold']
        print(f"{N:,} val positions, halves of {N // 2:,}: EPS {eps:g}, delta {delta:g}: threshold {th}"
              f", differing tokens {first['test_rate']:.3%} on the test "
              f"half, layer-count speedup {first['layer_speedup']:.2f}x; over {len(splits)} random splits the test "
              f"rate broke EPS {sum(r['violated'] for r in splits)} times")
        results.append(dict(out_dir=cfg['out_dir'], eps=eps, delta=delta, positions=N, **first, splits=splits,
                            violations=sum(r['violated'] for r in splits)))
    return results


def print_table(rows, names, title):
    cell = lambda v, spec, unit='': '-' if v is None else format(v, spec) + unit
    print(title)
    print(f"{'threshold':>12} {'val ppl':>8} {'vs full':>8} {'agree':>7} {'next-line EM':>12} {'tokens/s':>9} "
          f"{'speedup':>8} {'layers':>7}  share of tokens {' / '.join(names.values())}")
    for r in rows:
        print(f"{r['name']:>12} {cell(r['val_ppl'], '.3f'):>8} {cell(r['ppl_change'], '+.2%'):>8} "
              f"{cell(r['agreement'], '.1%'):>7} {cell(r['next_line_em'], '.1%'):>12} {r['tokens_per_s']:>9.1f} "
              f"{r['speedup']:>7.2f}x {cell(r['layer_speedup'], '.2f', 'x'):>7}  "
              + ' / '.join(f'{v:.0%}' for v in r['shares'].values())
              + ('' if r['acceptance'] is None else
                 f"; drafts accepted {r['acceptance']:.1%}, identical to full: {r['identical']}")
              + ('' if not r['calibrated_eps'] else
                 '; certified for EPS ' + ', '.join(f'{e:g}' for e in r['calibrated_eps'])))


def pick_best(rows):
    """The fastest threshold (measured) within 1% of the full model's perplexity; if none,
    the smallest change among those faster than the full model."""
    ee = [r for r in rows if r['policy'] == 'early exit']
    ok = [r for r in ee if r['ppl_change'] <= 0.01]
    best = max(ok, key=lambda r: r['speedup']) if ok else \
        min((r for r in ee if r['speedup'] > 1), key=lambda r: r['ppl_change'], default=None)
    if best is None:
        print('best threshold: none is within 1% of the full model\'s val perplexity, and none is faster than it')
    else:
        print(f"best threshold: {best['name']}, {best['speedup']:.2f}x measured ({best['layer_speedup']:.2f}x "
              f"layer-count), val perplexity {best['ppl_change']:+.2%} vs full "
              + ('(the fastest within 1%)' if ok else '(none is within 1%: the smallest change faster than full)')
              + ('; slower than the full model here' if best['speedup'] < 1 else ''))
    return best


def exits_view(model, prompt, n, th, decode, decoder):
    """The .exits.txt view: one continuation at threshold th, marked by the head each token left at."""
    mc = model.config
    out = generate(model, prompt, n, 'recompute', thres=th, decoder=decoder)
    return [f"which head each token of prompt 1's continuation left at, threshold {th:.2f}",
            'marks: ' + ', '.join(f'{MARKS[e]} = exit {L}' for e, L in enumerate(mc.exit_layers))
            + ', blank = the final head'] + exit_view([decode([t]) for t in out['tokens']], out['depths'],
                                                      mc.exit_depths)


def write_report(prefix, result, names, title, view, beside=None):
    """<prefix>.csv (one row per policy), .json (everything), .png (with matplotlib), .exits.txt."""
    os.makedirs(os.path.dirname(prefix) or '.', exist_ok=True)
    with open(prefix + '.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + [f"share_{s.replace(' ', '')}" for s in names.values()])
        w.writerows([r[c] for c in COLUMNS] + [r['shares'][s] for s in names.values()] for r in result['rows'])
    with open(prefix + '.json', 'w') as f:
        _json.dump(result, f, indent=1)
    drawn = plot(prefix + '.png', result['rows'], title, beside)
    if view:
        with open(prefix + '.exits.txt', 'w') as f:
            f.write('\n'.join(view) + '\n')
        print('\n'.join(view))
    print(f"wrote {prefix}.csv, {prefix}.json" + (f', {prefix}.png' if drawn else '')
          + (f', {prefix}.exits.txt' if view else '') + ('' if drawn else '; drew no picture: matplotlib is not installed (pip install matplotlib)'))


def main(args):
    cfg = configure(DEFAULTS, args)
    if cfg['sweep'] == 'thresholds' and cfg['tp'] != 1:
        sys.exit(f"sweep=thresholds decodes at batch 1 in one process; got tp={cfg['tp']}, allowed: tp=1")
    dev = init_distributed(cfg['device'])
    ps = ParallelState(cfg['tp'])
    if ps.dp > 1:
        sys.exit(f'evaluate.py runs with world size = tp; got {ps.world} ranks for tp={ps.tp}')
    say = print if ps.is_main else (lambda *a, **k: None)
    ctx = autocast('cuda' if dev.startswith('cuda') else 'cpu', cfg['dtype'])
    meta = Checkpoint(cfg['out_dir']).meta
    data, data_meta = load_data(cfg['dataset'] or (meta.get('train_config') or {}).get('dataset') or 'pystdlib')
    t0 = time.time()
    if cfg['sweep'] not in ('', 'pairs', 'thresholds'):
        sys.exit(f"sweep={cfg['sweep']!r}; allowed: 'pairs', 'thresholds' (or '' for one evaluation)")
    if cfg['sweep'] == 'thresholds':
        return frontier(cfg, ps, dev, data, data_meta, ctx)
    if cfg['calibrate'] is not None:
        if ps.world > 1:
            sys.exit('calibrate runs in one process')
        results = calibration(cfg, dev, data, ctx)
        results = results[0] if len(results) == 1 else results
        print(_json.dumps(results))
        return results
    mc, row = val_losses(cfg, ps, dev, data, ctx, cfg['layer_parallel'])
    rows = [row]
    if cfg['sweep'] == 'pairs':
        if mc.layer_parallel:
            sys.exit('sweep=pairs starts from the model without pairs; this checkpoint runs with '
                     f'layer_parallel={list(mc.layer_parallel)}')
        rows += [val_losses(cfg, ps, dev, data, ctx, span)[1] for span in pair_spans(mc)]
    tokens = cfg['eval_iters'] * cfg['batch_size'] * mc.block_size
    say(f"val split, {tokens:,} tokens ({cfg['eval_iters']} x {cfg['batch_size']} x {mc.block_size}), "
        f"{mc.n_layer} blocks, exits after blocks {list(mc.exit_depths)}, {time.time() - t0:.1f} s")
    say(f"{'layer_parallel':>15} {'depth':>6} {'val loss':>9} {'perplexity':>11} {'vs first':>9}  exit losses")
    for r in rows:
        r['perplexity'] = math.exp(r['loss'])
        r['change'] = r['perplexity'] / math.exp(rows[0]['loss']) - 1
        span = '[{}, {})'.format(*r['layer_parallel']) if r['layer_parallel'] else 'none'
        say(f"{span:>15} {r['depth']:>6} {r['loss']:>9.4f} {r['perplexity']:>11.3f} {r['change']:>+9.1%}  "
            + ' '.join(f'{x:.4f}' for x in r['exit_losses']))
    say(_json.dumps({'out_dir': cfg['out_dir'], 'tokens': tokens, 'rows': rows}))
    return rows


if __name__ == '__main__':
    run(main)
