"""
Train an early-exit GPT. One process:

    python data/pystdlib/prepare.py
    python train.py config/train_pystdlib.py
    python train.py config/train_pystdlib.py --exit_layers=[2,4] --max_iters=500 --device=cpu

Every global below is a key: a config file (python, executed) and then --key=value
arguments override them in order. The loss is final_CE + sum_e w_e(t) * exit_CE_e
(EE-LLM, arXiv 2312.04916), each w_e(t) moving from exit_weight_init to exit_weight
over exit_weight_warmup_iters.
"""

import ast
import difflib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist

from model import GPTConfig, pair_tensor
from parallel import (LOCAL, GradSync, ParallelState, check_layout, clip_grad_norm_, init_distributed, local_range,
                      take_shard)
from pipeline import (build_stage, draw, exit_stages, fill_counts, microbatches, pipeline_eval,
                      pipeline_forward_backward, schedule, stage_layers)

# -----------------------------------------------------------------------------
# defaults
# I/O
out_dir = 'out'
init_from = 'scratch'          # 'scratch' or 'resume' (from out_dir)
eval_interval = 250            # evaluate and checkpoint every this many steps
eval_iters = 20                # val batches per evaluation
log_interval = 10
always_save_checkpoint = True  # False: save only when the val loss improves
# data
dataset = 'pystdlib'           # a folder under data/ with train.bin, val.bin, meta.json
batch_size = 16                # sequences per micro-batch
gradient_accumulation_steps = 1  # micro-batches per step; global batch = their product
# optimizer: AdamW with warmup + cosine decay
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 2000
warmup_iters = 100
lr_decay_iters = None          # None: max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                # 0: off
# early-exit loss weights: a float for every exit, or a list with one per exit
exit_weight = 1.0
exit_weight_init = None        # None: exit_weight (no warm-up); above exit_weight: a cool-down
exit_weight_warmup_iters = 0
exit_weight_warmup_style = 'linear'  # 'linear' or 'cosine'
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = False                # torch.compile the model
activation_checkpointing = False  # recompute each block's activations in the backward: less memory, ~1 more forward
seed = 1337
# parallelism (under torchrun; dp = world size / (tp * pp))
tp = 1                         # tensor-parallel ranks
sp = False                     # sequence parallelism within the tp group
pp = 1                         # pipeline stages (1F1B, pipeline.py)
pp_layers = None               # blocks per stage, e.g. [5, 7]; None: an even split
fill_bubbles = False           # EE-LLM bubble filling with extra exit-training microbatches
fill_warmup = None             # fill microbatches in the warm-up / cool-down bubbles;
fill_cooldown = None           #   None: int((pp-1) r/(1+r)) each when fill_bubbles
backward_forward_ratio = 2.0   # r: backward time / forward time, for the fill counts
print_schedule = False         # draw this run's pipeline schedule before training
# model: every GPTConfig field is a key too (model.py documents them)
for _f in fields(GPTConfig):
    globals()[_f.name] = _f.default
vocab_size = None              # None: the dataset's (meta.json)
block_size = 256
n_layer, n_head, n_embd = 6, 6, 384
exit_layers = (2, 4)
# -----------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
PER_EXIT_KEYS = ('exit_weight', 'exit_weight_init')  # a number, or a list with one per exit


def _coerce(key, value, default):
    """Check value against the type of the key's default; int is accepted for float."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (list, tuple)) or (key in PER_EXIT_KEYS and isinstance(value, (list, tuple))):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f'--{key}={value!r}: expected {type(default).__name__} like the default {default!r}')
    return value


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else '; run with a valid key (see the top of the script)'
    return ValueError(f'unknown config key {key!r}{hint}')


def configure(defaults, args):
    """nanoGPT-style overrides. args: config files (python, executed) and --key=value,
    applied in order; a bare --flag sets a boolean key to True. Returns a new dict."""
    cfg = dict(defaults)
    for arg in args:
        if not arg.startswith('--'):
            scope = dict(cfg)
            with open(arg) as f:
                exec(f.read(), scope)
            for k, v in scope.items():
                if k.startswith('_') or k == '__builtins__' or (k in cfg and v is cfg[k]):
                    continue
                if k not in cfg:
                    if callable(v) or type(v).__name__ == 'module':
                        continue  # imports and helpers inside a config file
                    raise _unknown(k, list(cfg))
                cfg[k] = _coerce(k, v, defaults[k])
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in cfg:
            raise _unknown(key, list(cfg))
        if not eq:
            if not isinstance(defaults[key], bool):
                raise ValueError(f'--{key} needs a value (--{key}=...); only boolean keys can be bare flags')
            value = True
        elif isinstance(defaults[key], str):
            value = raw  # strings stay strings, e.g. --out_dir=123
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word, e.g. --init_from=resume where the default is None
        cfg[key] = _coerce(key, value, defaults[key])
    return cfg


# -----------------------------------------------------------------------------
# schedules

def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then constant."""
    decay_iters = cfg['lr_decay_iters'] or cfg['max_iters']
    if it < cfg['warmup_iters']:
        return cfg['learning_rate'] * (it + 1) / (cfg['warmup_iters'] + 1)
    if it >= decay_iters:
        return cfg['min_lr']
    ratio = (it - cfg['warmup_iters']) / max(1, decay_iters - cfg['warmup_iters'])
    return cfg['min_lr'] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg['learning_rate'] - cfg['min_lr'])


def exit_weights(it, cfg, n_exits):
    """Each exit's loss weight at step it (EE-LLM): w = init + f(t / warmup) * (target - init),
    f(x) = x ('linear') or (1 - cos(pi x)) / 2 ('cosine'); target from then on."""
    def per_exit(v, name):
        v = list(v) if isinstance(v, (list, tuple)) else [float(v)] * n_exits
        if len(v) != n_exits:
            raise ValueError(f'{name}={v} has {len(v)} values for {n_exits} exits')
        return v
    target = per_exit(cfg['exit_weight'], 'exit_weight')
    init = target if cfg['exit_weight_init'] is None else per_exit(cfg['exit_weight_init'], 'exit_weight_init')
    style, warm = cfg['exit_weight_warmup_style'], cfg['exit_weight_warmup_iters']
    if style not in ('linear', 'cosine'):
        raise ValueError(f"exit_weight_warmup_style={style!r}; allowed: 'linear', 'cosine'")
    if it >= warm:
        return target
    f = it / warm if style == 'linear' else (1 - math.cos(math.pi * it / warm)) / 2
    return [i + f * (t - i) for i, t in zip(init, target)]


def weighted_loss(model, x, y, w):
    """The training objective: final CE + sum_e w_e * exit CE_e. Returns (total, final, exits)."""
    loss, exit_losses = model(x, y, exits=len(w) > 0)
    return loss + sum(wi * li for wi, li in zip(w, exit_losses)), loss, exit_losses


# -----------------------------------------------------------------------------
# data

def load_data(name):
    """Memory-mapped train/val token arrays and the dataset's meta.json."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', name)
    if not os.path.isdir(folder):
        folder = name  # a path works too
    meta_path = os.path.join(folder, 'meta.json')
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f'dataset {name!r}: no {meta_path}; prepare it first, '
                                f'e.g. python data/{name}/prepare.py')
    with open(meta_path) as f:
        meta = json.load(f)
    data = {s: np.memmap(os.path.join(folder, f'{s}.bin'), dtype=meta['dtype'], mode='r')
            for s in ('train', 'val')}
    return data, meta


def batch_offsets(n_tokens, block_size, n_seqs, seed, step, split):
    """Start offsets of a step's global batch. They depend only on (seed, step, split),
    never on the layout, so every parallel layout and a resumed run see the same data."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 3 + ('train', 'val', 'fill').index(split))
    return torch.randint(n_tokens - block_size - 1, (n_seqs,), generator=g)


def eval_batch(data, split, k, block_size, batch_size, seed, device):
    """Evaluation batch k of a split: fixed by (seed, k), the same at every evaluation."""
    offs = batch_offsets(len(data[split]), block_size, batch_size, seed, -1 - k, split)
    return get_batch(data[split], offs, block_size, device)


def get_batch(data, offsets, block_size, device):
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in offsets.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in offsets.tolist()])
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# checkpoints, layout-free: out_dir/ckpt/ holds meta.json and one file per (pp, tp)
# shard, tensors under their logical names with the logical range they cover, so any
# layout can read the ranges it needs (memory-mapped: never the whole model at once)

def _barrier(ps):
    if ps.world > 1:
        dist.barrier()


def start_checkpoint(out_dir):
    """A fresh out_dir/ckpt.tmp to write a checkpoint's files into; returns its path."""
    tmp = os.path.join(out_dir, 'ckpt.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_checkpoint(out_dir, model_config, tensors, file_bytes, train_config=None, iter_num=0,
                      best_val_loss=float('inf'), optimizer_step=0.0, data=None, layout=None):
    """Write meta.json into ckpt.tmp and swap it in by renames, so a crash never leaves a
    half-written ckpt (at worst ckpt.old, which loading falls back to). tensors: logical
    name -> {'shape', 'dim' (split dimension or None), 'pieces': [[file, start, end]]}."""
    final, tmp, old = (os.path.join(out_dir, n) for n in ('ckpt', 'ckpt.tmp', 'ckpt.old'))
    meta = {'iter_num': iter_num, 'best_val_loss': best_val_loss, 'model_config': asdict(model_config),
            'train_config': train_config, 'optimizer_step': optimizer_step, 'data': data,
            'layout': layout or {'world': 1, 'dp': 1, 'pp': 1, 'tp': 1, 'sp': False},
            'tensors': tensors, 'file_bytes': file_bytes}
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out_dir, model, optimizer, cfg, iter_num, best_val_loss, ps=LOCAL, data=None):
    """Collective (every rank calls it): each (pp, tp) position of dp rank 0 writes its shard
    file, rank 0 the meta. data: the dataset's meta (tokenizer, vocabulary), for generation."""
    tmp = os.path.join(out_dir, 'ckpt.tmp')
    if ps.is_main:
        start_checkpoint(out_dir)
    _barrier(ps)
    entries, file_bytes = {}, {}
    if ps.dp_rank == 0:  # data-parallel replicas hold the same shards: one writes
        fname = f'shard-pp{ps.pp_rank}-tp{ps.tp_rank}.pt'
        shard = {'param': {}, 'exp_avg': {}, 'exp_avg_sq': {}}
        for name, p in model.logical_parameters():
            r = local_range(p, ps)
            if (r is None and ps.tp_rank > 0) or getattr(p, 'duplicate', False):
                continue  # replicated over tp: tp rank 0 writes it; a stage's copy: its first holder
            state = optimizer.state.get(p, {}) if optimizer else {}
            for kind, t in (('param', p.detach()), ('exp_avg', state.get('exp_avg')),
                            ('exp_avg_sq', state.get('exp_avg_sq'))):
                if t is not None:  # without the padding (clone: torch.save keeps whole storages)
                    shard[kind][name] = t if r is None else t.narrow(r[0], 0, r[2] - r[1]).clone()
            entries[name] = {'shape': list(getattr(p, 'logical_shape', p.shape)), 'dim': r and r[0],
                             'pieces': [[fname, r[1], r[2]] if r else [fname, None, None]]}
        torch.save(shard, os.path.join(tmp, fname))
        file_bytes[fname] = os.path.getsize(os.path.join(tmp, fname))
    torch.save({'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available()
                else None}, os.path.join(tmp, f'rng-{ps.rank}.pt'))
    parts = [(entries, file_bytes)]
    if ps.world > 1:
        parts = [None] * ps.world
        dist.all_gather_object(parts, (entries, file_bytes))
    if ps.is_main:
        tensors, sizes = {}, {}
        for ents, fb in parts:
            sizes.update(fb)
            for name, e in ents.items():
                tensors.setdefault(name, dict(e, pieces=[]))['pieces'] += e['pieces']
        step = next((float(st['step']) for st in optimizer.state.values() if 'step' in st), 0.0) if optimizer else 0.0
        commit_checkpoint(out_dir, model.config, tensors, sizes, cfg, iter_num, best_val_loss, step, data,
                          {'world': ps.world, 'dp': ps.dp, 'pp': ps.pp, 'tp': ps.tp, 'sp': ps.sp})
    _barrier(ps)


class Checkpoint:
    """A checkpoint directory opened for reading: meta (dict) and read(kind, name, p, ps),
    this rank's shard of one logical tensor assembled from the pieces that overlap it.
    Refuses truncated or inconsistent checkpoints with a message saying what is wrong."""

    def __init__(self, out_dir):
        path = os.path.join(out_dir, 'ckpt')
        if not os.path.exists(os.path.join(path, 'meta.json')) and os.path.exists(os.path.join(out_dir, 'ckpt.old')):
            path = os.path.join(out_dir, 'ckpt.old')  # a crash during the swap
        if not os.path.exists(os.path.join(path, 'meta.json')):
            raise FileNotFoundError(f'no checkpoint in {out_dir!r} (expected {path}/meta.json)')
        with open(os.path.join(path, 'meta.json')) as f:
            self.meta = json.load(f)
        for name, size in self.meta['file_bytes'].items():
            f = os.path.join(path, name)
            actual = os.path.getsize(f) if os.path.exists(f) else None
            if actual != size:
                raise RuntimeError(f'checkpoint {path}: {name} has {actual} bytes, meta.json says {size} (truncated?)')
        self.path, self.files = path, {}

    def _file(self, fname):
        if fname not in self.files:
            self.files[fname] = torch.load(os.path.join(self.path, fname), map_location='cpu', mmap=True,
                                           weights_only=True)
        return self.files[fname]

    def _entry(self, name, shape=None):
        e = self.meta['tensors'].get(name)
        if e is None or shape not in (None, e['shape']):
            raise RuntimeError(f'checkpoint {self.path}: tensor {name} is '
                               f"{'missing' if e is None else e['shape']}, the model wants {shape}")
        return e

    def whole(self, name, kind='param'):
        """The whole logical tensor `name`, its pieces concatenated."""
        e = self._entry(name)
        parts = [self._file(f)[kind][name] for f, _, _ in sorted(e['pieces'], key=lambda q: q[1] or 0)]
        return parts[0] if e['dim'] is None else torch.cat(parts, e['dim'])

    def read(self, kind, name, p, ps):
        logical = list(getattr(p, 'logical_shape', p.shape))
        e = self._entry(name, logical)
        dim, pieces = e['dim'], e['pieces']
        if dim is None:  # saved whole (replicated, or written by one process)
            dim = getattr(p, 'tp_dim', None)
            if dim is None:
                return self._file(pieces[0][0])[kind][name]
            pieces = [[pieces[0][0], 0, logical[dim]]]
        r = local_range(p, ps)
        start, end = (r[1], r[2]) if r else (0, logical[dim])
        out = torch.zeros(p.shape, dtype=p.dtype)
        for fname, a, b in pieces:
            lo, hi = max(a, start), min(b, end)
            if hi > lo:
                src = self._file(fname)[kind][name]
                out.narrow(dim, lo - start, hi - lo).copy_(src.narrow(dim, lo - a, hi - lo))
        return out

    def load_into(self, model, optimizer=None, ps=LOCAL):
        """Copy this rank's shards into the model (and the AdamW state into the optimizer).
        A model with layer_parallel pairs that the checkpoint runs one after the other gets
        them re-laid out here (model.pair_tensor)."""
        cfg, saved = model.config, tuple(self.meta['model_config'].get('layer_parallel') or ())
        if saved and saved != cfg.layer_parallel:
            raise ValueError(f'checkpoint {self.path} was tuned to run with layer_parallel={list(saved)}; '
                             f'asked for {list(cfg.layer_parallel) or "none"}')
        to_pair = set() if saved else {str(i) for i in cfg.pairs}
        with torch.no_grad():
            for name, p in model.logical_parameters():
                where = name.split('.', 2)  # 'blocks', index, rest
                if where[0] == 'blocks' and where[1] in to_pair:
                    p.copy_(take_shard(pair_tensor(self.whole, cfg, int(where[1]), where[2]), p, ps))
                    continue  # (a new tensor: no optimizer state)
                p.copy_(self.read('param', name, p, ps))
                saved = self._file(self.meta['tensors'][name]['pieces'][0][0])['exp_avg']
                if optimizer is not None and p.requires_grad and name in saved:  # (converted: no moments)
                    fused = optimizer.defaults.get('fused')
                    optimizer.state[p] = {
                        'step': torch.tensor(self.meta['optimizer_step'], device=p.device if fused else 'cpu'),
                        'exp_avg': self.read('exp_avg', name, p, ps).to(p.device),
                        'exp_avg_sq': self.read('exp_avg_sq', name, p, ps).to(p.device)}
        rng = os.path.join(self.path, f'rng-{ps.rank}.pt')
        if self.meta['layout']['world'] == ps.world and os.path.exists(rng):  # same layout: same random streams
            states = torch.load(rng, weights_only=True)
            torch.set_rng_state(states['cpu'])
            if states['cuda'] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(states['cuda'])


def load_model(out_dir, ps=LOCAL, device='cpu', pp_layers=None, layer_parallel=None):
    """A trained model (this rank's stage) from out_dir, in any layout. Returns (model, Checkpoint).
    layer_parallel: [start, end) to run in parallel pairs ([] none; None: as saved)."""
    ckpt = Checkpoint(out_dir)
    mc = ckpt.meta['model_config']
    if layer_parallel is not None:
        mc = dict(mc, layer_parallel=layer_parallel)
    model, _ = build_stage(GPTConfig(**mc), ps, pp_layers, device=device)
    ckpt.load_into(model, ps=ps)
    return model, ckpt


def model_config(cfg, vocab):
    return GPTConfig(**{k: cfg[k] for k in MODEL_KEYS if k != 'vocab_size'},
                     vocab_size=cfg['vocab_size'] or vocab)


# -----------------------------------------------------------------------------
# optimizer, evaluation, logging helpers

def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices (and embeddings) only, not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': cfg['weight_decay']},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    extra = {'fused': True} if device_type == 'cuda' else {}
    return torch.optim.AdamW(groups, lr=cfg['learning_rate'], betas=(cfg['beta1'], cfg['beta2']), **extra)


@torch.no_grad()
def evaluate(model, data, cfg, ctx, ps=LOCAL, splits=('train', 'val')):
    """Mean loss of the final head and of every exit over eval_iters fixed batches of each
    split (the same batches at every evaluation), shared out over the dp ranks.
    Returns {split: (final loss, [exit losses])}."""
    model.eval()
    out = {}
    for split in splits:
        totals = torch.zeros(1 + len(cfg['exit_layers']), device=cfg['device'])
        for k in range(ps.dp_rank, cfg['eval_iters'], ps.dp):
            x, y = eval_batch(data, split, k, cfg['block_size'], cfg['batch_size'], cfg['seed'], cfg['device'])
            with ctx:
                if ps.pp > 1:
                    totals += pipeline_eval(model, x, y, ps, len(cfg['exit_layers']))
                else:
                    loss, exit_losses = model(x, y, exits=True)
                    totals += torch.stack([loss, *exit_losses]).float()
        if ps.pp > 1:
            dist.all_reduce(totals, group=ps.pp_group)
        if ps.dp > 1:
            dist.all_reduce(totals, group=ps.dp_group)
        means = (totals / cfg['eval_iters']).tolist()
        out[split] = (means[0], means[1:])
    model.train()
    return out


def forward_backward(model, grads, data, cfg, it, ctx, scaler, ps=LOCAL):
    """Gradients of step it's objective: this rank computes its dp share of the step's
    global batch (batch_size x gradient_accumulation_steps sequences, the same in every
    layout) and GradSync sums them over dp; with pp > 1 the stages run the pipeline
    schedule (pipeline.py, which also defines what bubble-filling microbatches add).
    Returns the step's mean losses (final, exits...) over the global batch and the exit
    weights used."""
    B, T, accum = cfg['batch_size'], cfg['block_size'], cfg['gradient_accumulation_steps']
    if accum % ps.dp:
        raise ValueError(f'gradient_accumulation_steps={accum} is not divisible by dp={ps.dp} '
                         f'(each dp rank takes an equal share of the global batch)')
    w = exit_weights(it, cfg, len(cfg['exit_layers']))
    local = accum // ps.dp  # micro-batches of this rank: global indices dp_rank*local + m
    offsets = batch_offsets(len(data), T, B * accum, cfg['seed'], it, 'train')
    rows = lambda k: offsets[(ps.dp_rank * local + k) * B:(ps.dp_rank * local + k + 1) * B]
    if ps.pp > 1:
        mbs = pipeline_microbatches(cfg, ps, local)
        n_fill = len(mbs) - local
        fill = batch_offsets(len(data), T, B * n_fill * ps.dp, cfg['seed'], it, 'fill')
        batch = lambda k: get_batch(data, rows(k) if k < local else
                                    fill[(ps.dp_rank * n_fill + k - local) * B:][:B], T, cfg['device'])
        sums = pipeline_forward_backward(model, grads, batch, w, accum, ctx, scaler, ps, mbs)
    else:
        sums = torch.zeros(1 + len(w), device=cfg['device'], dtype=torch.float64)
        for m in range(local):
            x, y = get_batch(data, rows(m), T, cfg['device'])
            grads.sync = m == local - 1  # all-reduce during the last backward only
            with ctx:
                total, loss, exit_losses = weighted_loss(model, x, y, w)
            scaler.scale(total / accum).backward()
            sums += torch.stack([loss, *exit_losses]).detach().double() / accum
    grads.wait()
    if ps.pp > 1:
        dist.all_reduce(sums, group=ps.pp_group)  # each loss was computed on one stage
    if ps.dp > 1:
        dist.all_reduce(sums, group=ps.dp_group)
    return sums, w


def pipeline_microbatches(cfg, ps, local):
    """This layout's microbatches: the regular ones and the bubble-filling ones."""
    layers = stage_layers(cfg['n_layer'], ps.pp, cfg['pp_layers'])
    r = cfg['backward_forward_ratio']
    kw, kc = fill_counts(ps.pp, r, cfg['fill_bubbles'], cfg['fill_warmup'], cfg['fill_cooldown'])
    return microbatches(ps.pp, local, kw, kc, r, exit_stages(model_config(cfg, 1), layers))


def train_step(model, optimizer, grads, data, cfg, it, ctx, scaler, ps=LOCAL):
    """One optimizer step (learning rate of step it, gradients, clipping, AdamW).
    Returns (losses, lr, exit weights, grad norm or None)."""
    lr = get_lr(it, cfg)
    for group in optimizer.param_groups:
        group['lr'] = lr
    losses, w = forward_backward(model, grads, data, cfg, it, ctx, scaler, ps)
    gnorm = None
    if cfg['grad_clip'] > 0:
        scaler.unscale_(optimizer)
        gnorm = clip_grad_norm_(grads.params, cfg['grad_clip'], ps)
    scaler.step(optimizer)
    scaler.update()
    grads.zero()  # (never set_to_none: gradients are views into GradSync's buckets)
    return losses, lr, w, gnorm


DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def autocast(device_type, dtype):
    """The mixed-precision context for dtype 'float32' (none), 'bfloat16' or 'float16'."""
    ptdtype = DTYPES.get(dtype)
    if ptdtype is None:
        raise ValueError(f"dtype={dtype!r}; allowed: 'float32', 'bfloat16', 'float16'")
    return nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)


# peak dense bf16 tensor FLOP/s, keyed by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 125e12,
              'L4': 121e12, 'RTX 4090': 165e12, 'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}


def peak_flops(device):
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def fmt_losses(xs):
    return '[' + ' '.join(f'{x:.4f}' for x in xs) + ']'


# -----------------------------------------------------------------------------

def train(cfg):
    """Runs one training job from a config dict (see configure), in one process or under
    torchrun (dp x pp x tp). Returns the model (this rank's stage and shards)."""
    device = cfg['device'] = init_distributed(cfg['device'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    ctx = autocast(device_type, cfg['dtype'])
    data, data_meta = load_data(cfg['dataset'])

    if cfg['init_from'] == 'resume':
        ckpt = Checkpoint(cfg['out_dir'])
        gptconf = GPTConfig(**ckpt.meta['model_config'])
        differ = [k for k, v in asdict(gptconf).items()
                  if asdict(model_config(cfg, data_meta['vocab_size']))[k] != v and k != 'vocab_size']
        if differ:
            print(f"resume: the checkpoint's model config wins for {differ}")
        cfg = {**cfg, **asdict(gptconf)}
        iter_num, best_val_loss = ckpt.meta['iter_num'], ckpt.meta['best_val_loss']
    elif cfg['init_from'] == 'scratch':
        gptconf, iter_num, best_val_loss = model_config(cfg, data_meta['vocab_size']), 0, float('inf')
    else:
        raise ValueError(f"init_from={cfg['init_from']!r}; allowed: 'scratch', 'resume'")
    if gptconf.vocab_size < data_meta['vocab_size']:
        raise ValueError(f"vocab_size={gptconf.vocab_size} < the dataset's {data_meta['vocab_size']}")
    world = int(os.environ.get('WORLD_SIZE', '1'))
    check_layout(world, cfg['tp'], cfg['pp'], cfg['sp'], gptconf)  # every rank fails alike, before any collective
    ps = ParallelState(cfg['tp'], cfg['pp'], cfg['sp'])
    torch.manual_seed(cfg['seed'] + ps.dp_rank)  # dropout: tp ranks agree, dp ranks differ
    model, _ = build_stage(gptconf, ps, cfg['pp_layers'], cfg['seed'], device)
    model.checkpoint_blocks = cfg['activation_checkpointing']
    if cfg['print_schedule'] and ps.is_main and ps.pp > 1:
        mbs = pipeline_microbatches(cfg, ps, cfg['gradient_accumulation_steps'] // ps.dp)
        text, end, busy = draw(ps.pp, [schedule(ps.pp, s, mbs) for s in range(ps.pp)], mbs,
                               cfg['backward_forward_ratio'])
        print(f'pipeline schedule (time in forward units; idle {1 - busy / (ps.pp * end):.1%}):\n{text}')
    optimizer = make_optimizer(model, cfg, device_type)
    if cfg['init_from'] == 'resume':
        ckpt.load_into(model, optimizer, ps)
        if ps.is_main:
            print(f"resumed from {cfg['out_dir']} at step {iter_num} (saved as {ckpt.meta['layout']})")
    grads = GradSync(model.parameters(), ps)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg['dtype'] == 'float16')
    fwd = torch.compile(model) if cfg['compile'] else model
    T = cfg['block_size']
    tokens_per_step = cfg['batch_size'] * cfg['gradient_accumulation_steps'] * T
    peak = peak_flops(device)
    flops_per_step = model.flops_per_token(T) * tokens_per_step
    main = ps.is_main
    if main:
        os.makedirs(cfg['out_dir'], exist_ok=True)
        print(f"{model.num_params() / 1e6:.2f}M parameters ({model.num_params(exits=False) / 1e6:.2f}M without exits)"
              f"{' in stage 0' if ps.pp > 1 else ''}, exits after blocks {list(gptconf.exit_depths)}, "
              f"{tokens_per_step:,} tokens/step, {ps.world} x {device} {cfg['dtype']} as {str(ps).split(' rank')[0]}")
    log = open(os.path.join(cfg['out_dir'], 'log.jsonl'), 'a') if main else None

    def record(entry):
        if main:
            log.write(json.dumps(entry) + '\n')
            log.flush()

    it, t0, steps = iter_num, time.time(), 0
    try:
        while True:
            if it % cfg['eval_interval'] == 0 or it == cfg['max_iters']:
                ev = evaluate(fwd, data, cfg, ctx, ps)
                (tl, tex), (vl, vex) = ev['train'], ev['val']
                if main:
                    print(f'step {it}: train loss {tl:.4f} exits {fmt_losses(tex)}, '
                          f'val loss {vl:.4f} exits {fmt_losses(vex)}')
                record({'iter': it, 'train_loss': tl, 'train_exit_losses': tex, 'val_loss': vl, 'val_exit_losses': vex})
                if it > iter_num and (vl < best_val_loss or cfg['always_save_checkpoint']):
                    best_val_loss = min(best_val_loss, vl)
                    save_checkpoint(cfg['out_dir'], model, optimizer, cfg, it, best_val_loss, ps, data_meta)
                t0, steps = time.time(), 0  # keep evaluation out of the step timing
            if it >= cfg['max_iters']:
                break
            losses, lr, w, gnorm = train_step(fwd, optimizer, grads, data['train'], cfg, it, ctx, scaler, ps)
            steps += 1
            if it % cfg['log_interval'] == 0:
                vals = losses.tolist()  # the one host sync of a logged step
                dt = (time.time() - t0) / steps
                tok_s, mfu = tokens_per_step / dt, (flops_per_step / dt / (peak * ps.world) if peak else None)
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == 'cuda' else None
                if main:
                    print(f"iter {it}: loss {vals[0]:.4f} exits {fmt_losses(vals[1:])} lr {lr:.2e} "
                          f"{dt * 1000:.1f} ms {tok_s:,.0f} tok/s" + (f' mfu {mfu * 100:.1f}%' if mfu else '')
                          + (f' mem {mem:.2f} GiB' if mem else ''))
                record({'iter': it, 'loss': vals[0], 'exit_losses': vals[1:], 'lr': lr, 'exit_weights': w,
                        'grad_norm': None if gnorm is None else gnorm.item(),
                        'ms': dt * 1000, 'tok_s': tok_s, 'mfu': mfu, 'mem_gib': mem})
                t0, steps = time.time(), 0
            it += 1
    except KeyboardInterrupt:
        if ps.world == 1:  # a collective save could hang if only some ranks were interrupted
            print(f"interrupted: saving step {it} to {cfg['out_dir']}")
            save_checkpoint(cfg['out_dir'], model, optimizer, cfg, it, best_val_loss, ps, data_meta)
        raise
    finally:
        if log:
            log.close()
    return model


if __name__ == '__main__':
    try:
        train(configure(DEFAULTS, sys.argv[1:]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
