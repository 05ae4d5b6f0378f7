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

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from checkpoint import Checkpoint, save_checkpoint
from corpus import Batches, check_data, load_data
from configurator import check, configure, run, snapshot
from model import DTYPES, GPTConfig, layer_keep
from parallel import LOCAL, GradSync, ParallelState, check_layout, clip_grad_norm_, init_distributed
from pipeline import (build_stage, draw, microbatches, pipeline_eval, pipeline_forward_backward,
                      plan_microbatches, schedule)

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
exit_curriculum = ''           # LayerSkip's: '' (every exit, every step), 'rotational' or 'gradual' (active_exits())
exit_rotation = 2              # 'rotational': each exit trains at every exit_rotation-th step
exit_curriculum_iters = None   # 'gradual': steps until every exit is on (None: max_iters)
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

DEFAULTS = snapshot(globals())
MODEL_KEYS = [f.name for f in fields(GPTConfig)]
PER_EXIT_KEYS = ('exit_weight', 'exit_weight_init')  # a number, or a list with one per exit
# the types of the keys whose default is None (the model's from GPTConfig's annotations)
TYPES = dict({f.name: f.type for f in fields(GPTConfig)}, vocab_size=int, lr_decay_iters=int,
             exit_weight_init=(int, float, tuple), exit_curriculum_iters=int, fill_warmup=int, fill_cooldown=int,
             pp_layers=tuple)
positive = lambda v: v >= 1
RULES = {  # key: (types, check, what is allowed), checked before a run starts
    **{k: (int, positive, 'an int >= 1') for k in ('batch_size', 'block_size', 'gradient_accumulation_steps',
                                                     'eval_interval', 'eval_iters', 'log_interval', 'tp', 'pp')},
    'max_iters': (int, lambda v: v >= 0, 'an int >= 0'),
    'lr_decay_iters': (int, positive, 'an int >= 1 (or None: max_iters)'),
    **{k: (float, lambda v: 0 <= v < math.inf, 'a number >= 0') for k in (
        'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'backward_forward_ratio')},
    **{k: (float, lambda v: 0 <= v < 1, 'a number in [0, 1)') for k in ('beta1', 'beta2', 'dropout')},
    **{k: (int, lambda v: v >= 0, 'an int >= 0') for k in ('warmup_iters', 'exit_weight_warmup_iters', 'fill_warmup',
                                                             'fill_cooldown')},
    'dtype': (str, lambda v: v in DTYPES, "'float32', 'bfloat16' or 'float16'"),
}


def config(args, defaults=None):
    """train.py's keys (or defaults, a script's that extends them) overridden by args, checked."""
    return check(configure(defaults or DEFAULTS, args, PER_EXIT_KEYS, TYPES), RULES)


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
    if it < warm:
        f = it / warm if style == 'linear' else (1 - math.cos(math.pi * it / warm)) / 2
        target = [i + f * (t - i) for i, t in zip(init, target)]
    return [w * on for w, on in zip(target, active_exits(it, cfg, n_exits))]


def active_exits(it, cfg, n_exits):
    """Which exits train at step it (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710): all of
    them; 'rotational', exit e at the steps with it % R == e % R (R = exit_rotation), so each
    exit trains every R-th step; 'gradual', exit e (shallowest 0) from step T (n-1-e)/n on (T =
    exit_curriculum_iters), the deepest first. A pure function of the step, the same in every
    layout."""
    kind, R = cfg['exit_curriculum'], cfg['exit_rotation']
    T = cfg['exit_curriculum_iters'] if cfg['exit_curriculum_iters'] is not None else cfg['max_iters']
    if kind == '':
        return [True] * n_exits
    if kind == 'rotational':
        if not isinstance(R, int) or R < 1:
            raise ValueError(f'exit_rotation={R!r}; allowed: an int >= 1')
        return [it % R == e % R for e in range(n_exits)]
    if kind == 'gradual':
        return [it >= T * (n_exits - 1 - e) / n_exits for e in range(n_exits)]
    raise ValueError(f"exit_curriculum={kind!r}; allowed: '', 'rotational', 'gradual'")


def weighted_loss(model, x, y, w, keep=None):
    """The early-exit training objective, final CE + sum_e w_e * exit CE_e, and the default
    objective of the training step. An objective returns (the total to minimise, the losses
    to log (n,), detached): here (final CE, exit CEs...). keep: layer dropout's masks."""
    loss, exit_losses = model(x, y, exits=len(w) > 0, keep=keep)
    total = loss + sum(wi * li for wi, li in zip(w, exit_losses))
    return total, torch.stack([loss, *exit_losses]).detach()


def model_config(cfg, vocab):
    return GPTConfig(**{k: cfg[k] for k in MODEL_KEYS if k != 'vocab_size'},
                     vocab_size=cfg['vocab_size'] or vocab)


# -----------------------------------------------------------------------------
# the training step: one mechanism for every objective (train.py's, tune.py's)

def make_optimizer(model, lr, weight_decay, betas, device_type):
    """AdamW over the parameters that learn; weight decay on matrices (and embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    extra = {'fused': True} if device_type == 'cuda' else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


def _reduce(t, ps):
    """Sum over the stages (each loss is computed on one) and the dp ranks (each has a share)."""
    for group, n in ((ps.pp_group, ps.pp), (ps.dp_group, ps.dp)):
        if n > 1:
            dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def evaluate(model, batches, iters, ctx, ps=LOCAL, splits=('train', 'val'), objective=None):
    """Mean logged losses of the objective (default: the final head's and every exit's) over
    `iters` fixed batches of each split, shared out over the dp ranks. Returns {split: [losses]}."""
    model.eval()
    n_exits, out = len(model.config.exit_layers), {}
    for split in splits:
        totals = 0.0
        for k in range(ps.dp_rank, iters, ps.dp):
            x, y = batches.eval(split, k)
            with ctx:
                if objective is None and ps.pp > 1:
                    totals = totals + pipeline_eval(model, x, y, ps, n_exits).double()
                else:
                    totals = totals + (objective or weighted_loss)(model, x, y, [1.0] * n_exits)[1].double()
        out[split] = (_reduce(totals, ps) / iters).tolist()
    model.train()
    return out


def forward_backward(model, grads, batches, it, w, ctx, scaler, ps=LOCAL, objective=None, mbs=None):
    """Gradients of step it's objective with exit weights w: this rank computes its dp share of
    the step's global batch (the same in every layout) and GradSync sums them over dp.
    objective(model, x, y, w) -> (total, logged losses (n,)); None: weighted_loss, which with
    pp > 1 runs as the pipeline schedule mbs (pipeline.py, which also defines what
    bubble-filling micro-batches add). Returns the step's mean logged losses (float64)."""
    accum = batches.accum
    if accum % ps.dp:
        raise ValueError(f'gradient_accumulation_steps={accum} is not divisible by dp={ps.dp} '
                         f'(each dp rank takes an equal share of the global batch)')
    local = accum // ps.dp  # micro-batches of this rank: global indices dp_rank*local + m
    cfg = model.config
    # layer dropout's masks of global micro-batch g (the fills after the regular ones), for train.py's objective
    keep = lambda g: layer_keep(cfg, batches.B, (batches.seed, it, g)) if cfg.layer_dropout and not objective else None
    if objective is None and ps.pp > 1:
        mbs = mbs or microbatches(ps.pp, local)  # (no fills)
        n_fill = len(mbs) - local
        glob = lambda k: ps.dp_rank * local + k if k < local else accum + ps.dp_rank * n_fill + k - local
        batch = lambda k: (batches.micro(it, glob(k)) if k < local else
                           batches.fill(it, glob(k) - accum, n_fill * ps.dp))
        sums = pipeline_forward_backward(model, grads, batch, w, accum, ctx, scaler, ps, mbs,
                                         keep=lambda k: keep(glob(k)))
    else:
        sums = 0.0
        for m in range(local):
            x, y = batches.micro(it, ps.dp_rank * local + m)
            grads.sync = m == local - 1  # all-reduce during the last backward only
            with ctx:
                if objective:
                    total, losses = objective(model, x, y, w)
                else:
                    total, losses = weighted_loss(model, x, y, w, keep(ps.dp_rank * local + m))
            if total.requires_grad:  # (a pipeline stage without exits to tune has nothing to learn)
                scaler.scale(total / accum).backward()
            sums = sums + losses.double() / accum
    grads.wait()
    return _reduce(sums, ps)


def train_step(model, optimizer, grads, batches, it, lr, w, grad_clip, ctx, scaler, ps=LOCAL, objective=None,
               mbs=None):
    """One optimizer step at learning rate lr: gradients (forward_backward), clipping by the
    global norm (0: off), AdamW, with loss scaling for float16. Returns (losses, grad norm or None)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    losses = forward_backward(model, grads, batches, it, w, ctx, scaler, ps, objective, mbs)
    gnorm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        gnorm = clip_grad_norm_(grads.params, grad_clip, ps)
    scaler.step(optimizer)
    scaler.update()
    grads.zero()  # (GradSync's: under dp > 1 gradients are views into its buckets)
    return losses, gnorm


def autocast(device_type, dtype):
    """The mixed-precision context for dtype 'float32' (none), 'bfloat16' or 'float16'."""
    ptdtype = DTYPES.get(dtype)
    if ptdtype is None:
        raise ValueError(f"dtype={dtype!r}; allowed: 'float32', 'bfloat16', 'float16'")
    return nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)


def precision(device, dtype):
    """(autocast context, loss scaler) for dtype on device: float16 scales the loss."""
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    return autocast(device_type, dtype), torch.amp.GradScaler(device_type, enabled=dtype == 'float16')


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


def finite(it, what, values, out_dir):
    """Stop a diverged run before anything is saved: the last good checkpoint stays."""
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f'step {it}: the {what} are not finite ({fmt_losses(values)}): the run diverged; '
                                 f'the last good checkpoint in {out_dir} is kept (try a lower learning_rate, '
                                 'a grad_clip, or bfloat16 instead of float16)')


@contextmanager
def interrupt_after():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    old = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if held:
        raise KeyboardInterrupt


# -----------------------------------------------------------------------------

def train(cfg):
    """Runs one training job from a config dict (see configure), in one process or under
    torchrun (dp x pp x tp). Returns the model (this rank's stage and shards)."""
    device = cfg['device'] = init_distributed(cfg['device'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    ctx, scaler = precision(device, cfg['dtype'])
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
    check_data(data, cfg['dataset'], cfg['block_size'], gptconf.vocab_size)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    check_layout(world, cfg['tp'], cfg['pp'], cfg['sp'], gptconf)  # every rank fails alike, before any collective
    ps = ParallelState(cfg['tp'], cfg['pp'], cfg['sp'])
    torch.manual_seed(cfg['seed'] + ps.dp_rank)  # dropout: tp ranks agree, dp ranks differ
    model, _ = build_stage(gptconf, ps, cfg['pp_layers'], cfg['seed'], device)
    model.checkpoint_blocks = cfg['activation_checkpointing']
    accum = cfg['gradient_accumulation_steps']
    batches = Batches(data, cfg['batch_size'], cfg['block_size'], accum, cfg['seed'], device)
    mbs = plan_microbatches(gptconf, ps.pp, accum // ps.dp, cfg['pp_layers'], cfg['fill_bubbles'],
                            cfg['fill_warmup'], cfg['fill_cooldown'], cfg['backward_forward_ratio'])
    if cfg['print_schedule'] and ps.is_main and ps.pp > 1:
        text, end, busy = draw(ps.pp, [schedule(ps.pp, s, mbs) for s in range(ps.pp)], mbs,
                               cfg['backward_forward_ratio'])
        print(f'pipeline schedule (time in forward units; idle {1 - busy / (ps.pp * end):.1%}):\n{text}')
    optimizer = make_optimizer(model, cfg['learning_rate'], cfg['weight_decay'], (cfg['beta1'], cfg['beta2']),
                               device_type)
    if cfg['init_from'] == 'resume':
        ckpt.load_into(model, optimizer, ps, rng=True)
        if ps.is_main:
            print(f"resumed from {cfg['out_dir']} at step {iter_num} (saved as {ckpt.meta['layout']})")
    grads = GradSync(model.parameters(), ps)
    fwd = torch.compile(model) if cfg['compile'] else model
    T = cfg['block_size']
    tokens_per_step = cfg['batch_size'] * accum * T
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
                ev = evaluate(fwd, batches, cfg['eval_iters'], ctx, ps)
                (tl, *tex), (vl, *vex) = ev['train'], ev['val']
                finite(it, 'train and val losses', ev['train'] + ev['val'], cfg['out_dir'])
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
            lr, w = get_lr(it, cfg), exit_weights(it, cfg, len(gptconf.exit_layers))
            with interrupt_after():  # a Ctrl-C lands after the step and its number, never between
                losses, gnorm = train_step(fwd, optimizer, grads, batches, it, lr, w, cfg['grad_clip'], ctx, scaler,
                                           ps, mbs=mbs)
                it += 1
            steps, last = steps + 1, it - 1
            if last % cfg['log_interval'] == 0:
                vals = losses.tolist()  # the one host sync of a logged step
                finite(last, 'losses', vals, cfg['out_dir'])
                dt = (time.time() - t0) / steps
                tok_s, mfu = tokens_per_step / dt, (flops_per_step / dt / (peak * ps.world) if peak else None)
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == 'cuda' else None
                if main:
                    print(f"iter {last}: loss {vals[0]:.4f} exits {fmt_losses(vals[1:])} lr {lr:.2e} "
                          f"{dt * 1000:.1f} ms {tok_s:,.0f} tok/s" + (f' mfu {mfu * 100:.1f}%' if mfu else '')
                          + (f' mem {mem:.2f} GiB' if mem else ''))
                record({'iter': last, 'loss': vals[0], 'exit_losses': vals[1:], 'lr': lr, 'exit_weights': w,
                        'grad_norm': None if gnorm is None else gnorm.item(),
                        'ms': dt * 1000, 'tok_s': tok_s, 'mfu': mfu, 'mem_gib': mem})
                t0, steps = time.time(), 0
    except KeyboardInterrupt:
        if ps.world == 1:  # a collective save could hang if only some ranks were interrupted
            print(f"interrupted: saving step {it} to {cfg['out_dir']}")
            save_checkpoint(cfg['out_dir'], model, optimizer, cfg, it, best_val_loss, ps, data_meta)
        raise
    finally:
        if log:
            log.close()
    return model


def main(args):
    return train(config(args))


if __name__ == '__main__':
    run(main)
