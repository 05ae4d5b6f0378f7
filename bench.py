"""
Training throughput of the real train step (train.train_step) on random tokens, in any
layout. The last line printed is JSON.

    python bench.py --shape=1b                                          # one GPU
    torchrun --nproc_per_node=2 bench.py --shape=1b --tp=2 --sp=True    # tensor (+ sequence) parallel
    torchrun --nproc_per_node=4 bench.py --shape=350m --pp=4 --accum=[4,8,16,32] --exit_layers=[6,12]
    python bench.py --shape=tiny --device=cpu --steps=3                 # a smoke test on the CPU

Reports the median step time after warm-up, tokens/s, MFU against the GPU's datasheet
peak and against the bf16 matmul rate measured in the same run, and peak memory. With
several microbatch counts (--accum=[...]), one line each and, under pp, the measured
pipeline bubble: the step time t(M) grows by a per-microbatch cost a (the slope between
the two largest M), so the idle share is 1 - a*M/t(M); 1F1B's theory is (P-1)/(M+P-1).
"""

import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import train
from model import GPTConfig
from parallel import GradSync, ParallelState, init_distributed
from pipeline import build_stage

SHAPES = {  # GPT-2 family shapes (vocab padded to 50304); '1b' is GPT-2 XL's width at 24 layers
    'tiny': dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64),
    '124m': dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
    '350m': dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50304, block_size=1024),
    '1b': dict(n_layer=24, n_head=16, n_embd=2048, vocab_size=50304, block_size=1024),
}

shape = '124m'
arch = 'gpt2'
exit_layers = ()
batch_size = 8
accum = (1,)                   # microbatches per step (per dp rank), one run each
steps = 20
warmup = 5
compile = False
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
tp = 1
sp = False
pp = 1
fill_bubbles = False
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and k.islower() and
            isinstance(v, (int, float, bool, str, tuple, type(None)))}


def matmul_tflops(device, n=8192, reps=20):
    """Measured bf16 matmul rate (TFLOP/s), the ceiling an MFU figure is really up against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def main(args):
    cfg_b = train.configure(DEFAULTS, args)
    dev = init_distributed(cfg_b['device'])
    ps = ParallelState(cfg_b['tp'], cfg_b['pp'], cfg_b['sp'])
    mcfg = GPTConfig(arch=cfg_b['arch'], exit_layers=cfg_b['exit_layers'], **SHAPES[cfg_b['shape']])
    cuda = dev.startswith('cuda')
    ctx = train.autocast('cuda' if cuda else 'cpu', cfg_b['dtype'])
    model, _ = build_stage(mcfg, ps, device=dev)
    cfg = dict(train.DEFAULTS, **{k: getattr(mcfg, k) for k in train.MODEL_KEYS}, device=dev, pp=ps.pp,
               batch_size=cfg_b['batch_size'], warmup_iters=0, fill_bubbles=cfg_b['fill_bubbles'])
    optimizer = train.make_optimizer(model, cfg, 'cuda' if cuda else 'cpu')
    grads = GradSync(model.parameters(), ps)
    scaler = torch.amp.GradScaler('cuda' if cuda else 'cpu', enabled=cfg_b['dtype'] == 'float16')
    fwd = torch.compile(model) if cfg_b['compile'] else model
    data = np.random.default_rng(0).integers(0, mcfg.vocab_size, 2_000_000).astype(np.uint16)
    ceiling = matmul_tflops(dev) if cuda else None
    peak = train.peak_flops(dev)
    results, it = [], 0
    for m in cfg_b['accum']:
        cfg['gradient_accumulation_steps'] = m * ps.dp
        times = []
        for i in range(cfg_b['warmup'] + cfg_b['steps']):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train.train_step(fwd, optimizer, grads, data, cfg, it, ctx, scaler, ps)
            if cuda:
                torch.cuda.synchronize()
            it += 1
            if i >= cfg_b['warmup']:
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        tokens = cfg['batch_size'] * cfg['gradient_accumulation_steps'] * mcfg.block_size
        flops = model.flops_per_token(mcfg.block_size) * tokens / dt / ps.world  # per GPU
        fills = len(train.pipeline_microbatches(cfg, ps, m)) - m if ps.pp > 1 else 0
        r = {'shape': cfg_b['shape'], 'stage_params_M': round(model.num_params() / 1e6, 1), 'exits': list(mcfg.exit_layers),
             'layout': str(ps).split(' rank')[0], 'sp': ps.sp, 'compile': cfg_b['compile'], 'dtype': cfg_b['dtype'],
             'microbatches': m, 'fill_microbatches': fills, 'batch_tokens': tokens,
             'ms_per_step': round(dt * 1000, 2), 'tokens_per_s': round(tokens / dt),
             'tflops_per_gpu': round(flops / 1e12, 1), 'mfu_datasheet': round(flops / peak, 4) if peak else None,
             'device': torch.cuda.get_device_name(dev) if cuda else 'cpu'}
        if cuda:
            r.update(matmul_tflops=round(ceiling, 1), mfu_measured=round(flops / 1e12 / ceiling, 4),
                     mem_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2))
        results.append(r)
        if ps.is_main:
            print(json.dumps(r))
    if ps.pp > 1 and len(results) > 1:  # the measured bubble, from the slope of t(M)
        (m1, t1), (m2, t2) = sorted((r['microbatches'], r['ms_per_step']) for r in results)[-2:]
        slope = (t2 - t1) / (m2 - m1)
        for r in results:
            r['bubble_measured'] = round(1 - slope * r['microbatches'] / r['ms_per_step'], 4)
            r['bubble_theory'] = round((ps.pp - 1) / (r['microbatches'] + ps.pp - 1), 4)
    summary = {'runs': results}
    if ps.is_main:
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == '__main__':
    main(sys.argv[1:])
