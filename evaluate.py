"""
Evaluate a trained checkpoint on its dataset's val split: loss and perplexity of the final
head and of every exit, as trained or with layer-parallel pairs, or a sweep over every
pair span (arXiv 2502.02790, "Leveraging the True Depth of LLMs").

    python evaluate.py --out_dir=out-pystdlib
    python evaluate.py --out_dir=out-pystdlib --layer_parallel=[2,4]
    python evaluate.py --out_dir=out-pystdlib --sweep=pairs       # every span: depth vs perplexity
    torchrun --nproc_per_node=2 evaluate.py --out_dir=out-pystdlib --tp=2 --sweep=pairs

The sweep tries every even span [start, end) that the exits allow (none between the two
blocks of a pair) and prints one row per span: the sequential depth left (n_layer minus
one per pair), the val loss and perplexity, the change against no pairs, and each exit's
loss. The last line is JSON with every row.
"""

import json as _json  # (json is a key below)
import math
import sys
import time

import torch
import torch.distributed as dist

from parallel import ParallelState, init_distributed
from train import Checkpoint, autocast, configure, evaluate, load_data, load_model

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
sweep = ''                      # 'pairs': every pair span
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


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
    run = dict(cfg, block_size=mc.block_size, exit_layers=mc.exit_layers, device=dev)
    loss, exits = evaluate(model, data, run, ctx, ps, splits=('val',))['val']
    return mc, dict(layer_parallel=list(mc.layer_parallel), depth=mc.n_layer - len(mc.pairs), loss=loss,
                    exit_losses=exits)


def main(args):
    cfg = configure(DEFAULTS, args)
    dev = init_distributed(cfg['device'])
    ps = ParallelState(cfg['tp'])
    if ps.dp > 1:
        sys.exit(f'evaluate.py runs with world size = tp; got {ps.world} ranks for tp={ps.tp}')
    say = print if ps.is_main else (lambda *a, **k: None)
    ctx = autocast('cuda' if dev.startswith('cuda') else 'cpu', cfg['dtype'])
    meta = Checkpoint(cfg['out_dir']).meta
    data, _ = load_data(cfg['dataset'] or (meta.get('train_config') or {}).get('dataset') or 'pystdlib')
    t0 = time.time()
    if cfg['sweep'] not in ('', 'pairs'):
        sys.exit(f"sweep={cfg['sweep']!r}; allowed: 'pairs' (or '' for one evaluation)")
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
    try:
        main(sys.argv[1:])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
