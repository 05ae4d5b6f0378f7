"""
Tuning on a frozen pretrained model, two kinds:
- EE-Tuning (Pan et al. 2024, arXiv 2402.00518): train only the exit heads.
- EE-Tuning by self-distillation (--distill): each exit learns the frozen model's own
  final-head distribution (KL), optionally mixed with the data CE (--distill_ce), so that
  exits added to a model trained without them draft the tokens that model would choose.
- Layer-pair fine-tuning (arXiv 2502.02790): with --layer_parallel=[start,end), train
  only the blocks that now run in parallel pairs, on the full model's objective (final
  CE + weighted exit CEs), to win back what pairing cost. --tune_blocks=[start,end)
  without pairs fine-tunes those blocks the same way (the control for that experiment).

    python convert.py add_exits --src=out-base --dst=out-ee --exit_layers=[2,4] --exit_norm
    python tune.py config/tune_pystdlib.py --init_from=out-ee --out_dir=out-ee-tuned
    python tune.py config/tune_pystdlib.py --init_from=out-ee --out_dir=out-ee-distilled --distill
    torchrun --nproc_per_node=4 tune.py config/tune_pystdlib.py --init_from=out-ee --out_dir=out-ee-tuned --tp=2 --pp=2
    python generate.py --out_dir=out-ee-tuned --early_exit_thres=0.8 --show_exits
    python tune.py config/tune_pystdlib.py --init_from=out-pystdlib --out_dir=out-pairs --layer_parallel=[2,4]

EE-Tuning builds and loads only the embedding, the blocks up to the deepest exit and the
exits: the layers past the deepest exit are never allocated (EE-Tuning's "load only the
first stages", automatic); with pp > 1 those blocks are split into stages, which pass
hidden states forward only, since every trainable parameter sits behind its own exit. The
backbone runs under no_grad; the objective is sum_e w_e * exit_CE_e, or with
dynamic_weighting each token's exit loss scaled by that exit's detached confidence (its
max probability). The tuned checkpoint holds the tuned tensors and the source's other
files, copied byte for byte, so generate.py uses it as is. A pair-tuned checkpoint holds
its pairs as the wide blocks they became and always runs with its layer_parallel.
"""

import json
import os
import shutil
import time

import torch

import corpus
import train
from checkpoint import Checkpoint, file_record, save_checkpoint
from configurator import run
from model import GPT, GPTConfig
from parallel import GradSync, ParallelState, init_distributed
from pipeline import stage_forward, stage_layers

DEFAULTS = dict(train.DEFAULTS, init_from='', out_dir='out-tuned', dynamic_weighting=False, max_iters=500,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=20, eval_interval=100, log_interval=20,
                tune_blocks=None,  # [start, end): fine-tune these blocks (default: the layer_parallel span)
                distill=False,     # EE-Tuning by self-distillation: each exit learns the final head's distribution
                distill_ce=0.0)    # with distill: the data CE's share of each exit's loss, (1 - it) for the KL


def exit_objective(model, x, y, w, dynamic, ps, distill=False, ce_share=0.0):
    """Weighted losses of this stage's exits on the frozen backbone. With pp > 1 the hidden
    states come from the previous stage and go on to the next (no gradient crosses stages:
    every trainable parameter sits behind its own exit). distill (the whole model built, one
    process): each exit's loss is KL(final head || exit) on the frozen model's own outputs
    (self-distillation), plus ce_share of the data CE. Returns (objective, each exit's CE, or
    with distill its KL (n_exits,), zero for the exits of other stages)."""
    V = model.config.vocab_size
    with torch.no_grad():
        h_final, taps, rope = stage_forward(model, x, ps)
        teacher = model.final_logits(h_final).float()[..., :V].log_softmax(-1) if distill else None
    total, ces = torch.zeros((), device=x.device), torch.zeros(len(model.config.exit_layers), device=x.device)
    for e, h in taps:
        logits = model.exit_logits(e, h, rope)
        if distill:  # sum_v p_final (log p_final - log p_exit), per token
            kl = (teacher.exp() * (teacher - logits.float()[..., :V].log_softmax(-1))).sum(-1).mean()
            obj, ce = (1 - ce_share) * kl + (ce_share * model.loss(logits, y) if ce_share else 0), kl
        elif dynamic:  # EE-Tuning's token-wise weights: the exit's own detached confidence
            if ps.tp > 1:
                raise ValueError('dynamic_weighting runs with tp=1')
            logp = logits.float().log_softmax(-1).flatten(0, 1)[:, :model.config.vocab_size]
            tok = -logp.gather(1, y.flatten()[:, None])[:, 0]
            ce = tok.mean()
            obj = (tok * logp.max(-1).values.exp().detach()).mean()
        else:
            ce = obj = model.loss(logits, y)
        total = total + w[e] * obj
        ces[e] = ce.detach().float()
    return total, ces


def save_tuned(out_dir, src, model, optimizer, cfg, it, data, ps):
    """The tuned tensors, plus the source checkpoint's files for everything not built here."""
    save_checkpoint(out_dir, model, optimizer, cfg, it, float('inf'), ps, data)
    if not ps.is_main:
        return
    path = os.path.join(out_dir, 'ckpt')
    with open(os.path.join(path, 'meta.json')) as f:
        meta = json.load(f)
    missing = {n: e for n, e in src.meta['tensors'].items() if n not in meta['tensors']}
    for fname in sorted({piece[0] for e in missing.values() for piece in e['pieces']}):
        shutil.copyfile(os.path.join(src.path, fname), os.path.join(path, 'base-' + fname))
        meta['file_bytes']['base-' + fname], meta['file_crc32']['base-' + fname] = \
            file_record(os.path.join(path, 'base-' + fname))
    for n, e in missing.items():
        meta['tensors'][n] = dict(e, pieces=[['base-' + p[0], p[1], p[2]] for p in e['pieces']])
    tmp = os.path.join(path, 'meta.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(path, 'meta.json'))


def tune(cfg):
    device = cfg['device'] = init_distributed(cfg['device'])
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    ctx, scaler = train.precision(device, cfg['dtype'])
    if not cfg['init_from']:
        raise ValueError('init_from: give the checkpoint directory with exits to tune (convert.py add_exits makes one)')
    src = Checkpoint(cfg['init_from'])
    pairs = tuple(cfg['layer_parallel'] or ())
    mcfg = GPTConfig(**dict(src.meta['model_config'], **({'layer_parallel': pairs} if pairs else {})))
    tb = cfg['tune_blocks']
    if tb is not None and not (len(tb) == 2 and 0 <= tb[0] < tb[1] <= mcfg.n_layer):
        raise ValueError(f'tune_blocks={tb}; need [start, end) with 0 <= start < end <= n_layer={mcfg.n_layer}')
    span = range(*(tb or pairs or (0,)))  # blocks that learn on the full objective (none: EE-Tuning)
    if not (mcfg.exit_layers or span):
        raise ValueError(f"{cfg['init_from']} has no exits; add them with convert.py add_exits "
                         '(or give layer_parallel to fine-tune layer pairs)')
    data, data_meta = corpus.load_data(cfg['dataset'])
    if cfg['sp']:
        raise ValueError('sp: tune.py runs without sequence parallelism')
    if cfg['distill'] not in (True, False) or not 0 <= cfg['distill_ce'] <= 1:
        raise ValueError(f"distill={cfg['distill']!r}, distill_ce={cfg['distill_ce']!r}; allowed: true or false, "
                         'and a number in [0, 1]')
    if cfg['distill'] and (cfg['tp'] > 1 or cfg['pp'] > 1 or cfg['dynamic_weighting'] or span):
        raise ValueError('distill runs in one process (tp=1, pp=1), without dynamic_weighting, on exits only')
    ps = ParallelState(cfg['tp'], cfg['pp'])
    torch.manual_seed(cfg['seed'] + ps.dp_rank)
    if span:  # the whole model, on train.py's objective; the span learns through every block after it
        if ps.pp > 1:
            raise ValueError('layer_parallel / tune_blocks: tune.py fine-tunes blocks with pp=1')
        model = GPT(mcfg, ps, cfg['seed']).to(device)
        learns = lambda name: name.split('.')[0] == 'blocks' and int(name.split('.')[1]) in span
        names, objective = 'losses (final, exits)', train.weighted_loss
        what = f"{'layer-parallel pairs of ' if pairs else ''}blocks {span.start}..{span.stop - 1}"
    else:
        depth = mcfg.n_layer if cfg['distill'] else max(mcfg.exit_depths)  # (distill: the teacher is the final head)
        layers = stage_layers(depth, ps.pp, cfg['pp_layers'])[ps.pp_rank]  # the stages up to the deepest exit
        model = GPT(mcfg, ps, cfg['seed'], layers=layers).to(device)  # nothing past the deepest exit
        learns = lambda name: name.startswith('exits.')
        names = 'exit KL to the final head' if cfg['distill'] else 'exit losses'
        objective = lambda m, x, y, w: exit_objective(m, x, y, w, cfg['dynamic_weighting'], ps, cfg['distill'],
                                                      cfg['distill_ce'])
        what = (f'exit parameters (stage 0) on a frozen backbone of blocks 0..{depth - 1} (of {mcfg.n_layer}; '
                f'blocks {depth}..{mcfg.n_layer - 1} are never built)' if not cfg['distill'] else
                'exit parameters by self-distillation from the frozen full model')
    src.load_into(model, ps=ps)
    for name, p in model.named_parameters():
        p.requires_grad_(learns(name))
    cfg = dict(cfg, **{k: getattr(mcfg, k) for k in train.MODEL_KEYS})
    optimizer = train.make_optimizer(model, cfg['learning_rate'], cfg['weight_decay'], (cfg['beta1'], cfg['beta2']),
                                     device_type)
    grads = GradSync(model.parameters(), ps)
    B, T, accum = cfg['batch_size'], mcfg.block_size, cfg['gradient_accumulation_steps']
    batches = corpus.Batches(data, B, T, accum, cfg['seed'], device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say = print if ps.is_main else (lambda *a, **k: None)
    say(f"tuning {trainable / 1e6:.3f}M {what}, {str(ps).split(' rank')[0]}, {cfg['dtype']}")
    if ps.is_main:
        os.makedirs(cfg['out_dir'], exist_ok=True)
    log = open(os.path.join(cfg['out_dir'], 'log.jsonl'), 'a') if ps.is_main else None
    n_exits = len(mcfg.exit_layers)
    t0 = time.time()
    for it in range(cfg['max_iters'] + 1):
        if it % cfg['eval_interval'] == 0 or it == cfg['max_iters']:
            v = train.evaluate(model, batches, cfg['eval_iters'], ctx, ps, ('val',), objective)['val']
            say(f'step {it}: val {names} {train.fmt_losses(v)}')
            if log:
                log.write(json.dumps({'iter': it, 'val_losses': v}) + '\n')
                log.flush()
        if it == cfg['max_iters']:
            break
        lr = train.get_lr(it, cfg)
        losses, _ = train.train_step(model, optimizer, grads, batches, it, lr, train.exit_weights(it, cfg, n_exits),
                                     cfg['grad_clip'], ctx, scaler, ps, objective)
        if it % cfg['log_interval'] == 0:
            dt = (time.time() - t0) / (1 if it == 0 else cfg['log_interval'])
            say(f'iter {it}: {names} {train.fmt_losses(losses.tolist())} lr {lr:.2e} {dt * 1000:.1f} ms '
                f'{B * accum * T / dt:,.0f} tok/s')
            if log:
                log.write(json.dumps({'iter': it, 'losses': losses.tolist(), 'lr': lr, 'ms': dt * 1000}) + '\n')
                log.flush()
            t0 = time.time()
    save_tuned(cfg['out_dir'], src, model, optimizer, cfg, cfg['max_iters'], src.meta.get('data') or data_meta, ps)
    say(f"saved the tuned checkpoint to {cfg['out_dir']}")
    if log:
        log.close()
    return model


def main(args):
    return tune(train.config(args, DEFAULTS))


if __name__ == '__main__':
    run(main)
