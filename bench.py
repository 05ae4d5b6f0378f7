"""
Throughput benchmarks. The last line printed is JSON.

Training: the real train step (train.train_step) on random tokens, in any layout.

    python bench.py --shape=1b                                          # one GPU
    torchrun --nproc_per_node=2 bench.py --shape=1b --tp=2 --sp=True    # tensor (+ sequence) parallel
    torchrun --nproc_per_node=4 bench.py --shape=350m --pp=4 --accum=[4,8,16,32] --exit_layers=[6,12]
    python bench.py --shape=tiny --device=cpu --steps=3                 # a smoke test on the CPU

Reports the median step time after warm-up, tokens/s, MFU against the GPU's datasheet
peak and against the bf16 matmul rate measured in the same run, and peak memory. With
several microbatch counts (--accum=[...]), one line each and, under pp, the measured
pipeline bubble: the step time t(M) grows by a per-microbatch cost a (the slope between
the two largest M), so the idle share is 1 - a*M/t(M); 1F1B's theory is (P-1)/(M+P-1).

Decoding: greedy decode steps over the static KV cache, random weights, each batch size,
eagerly and replayed as one CUDA graph per step (with --compile=True, also compiled by
torch.compile and then captured), with and without layer-parallel pairs.

    torchrun --nproc_per_node=2 bench.py --mode=decode --shape=7b --tp=2 --pairs=[[],[16,30]] --compile=True
    python bench.py --mode=decode --shape=tiny --device=cpu --pairs=[[],[0,2]] --prompt_len=8 --new_tokens=4

With exit_layers, each batch size also runs generate.py's loop (decode.run_jobs over the
Decoder: CUDA graphs per segment, the host a step ahead where nothing is decided), every row
its own sequence: plainly (full decoding), with a share (exit_rates) of each row's tokens
forced to leave at the first exit (rows independently; 0: the exit's confidence read at
every token, never enough), and self-speculating from that exit with a fixed acceptance
(spec_k drafts, spec_accepted kept per round). Speculation's ms_per_step is per token (a
round over the tokens it yields).

    python bench.py --mode=decode --shape=7b --compile=True --exit_layers=[16] --batch=[1,8] --exit_rates=[0,0.5]

Serving: generate.py's server under concurrent clients (requests/s, tokens/s, against one):

    python bench.py --mode=serve --shape=7b --compile=True --clients=[1,16] --new_tokens=64

Beside the peers (--peers: a copy of ../shared/peers; its bench_peers.py runs the workload's
peer first, in a process of its own, and each batch-1 figure gets its ratio, vs_peer):

    python bench.py --shape=350m --batch_size=16 --compile=True --steps=15 --peers=.peers        # nanoGPT
    python bench.py --mode=decode --shape=7b --compile=True --exit_layers=[16] --batch=[1] --peers=.peers

Reports ms per step, tokens/s and the memory-bandwidth floor: the bytes a step must read
(this rank's weights but the embedding, plus the KV cache) over the copy bandwidth
measured in the same run; 'of_bound' is that floor over the measured step time.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.autograd import DeviceType

import corpus
import train
from configurator import configure, run, snapshot
from decode import Decoder, Job, capture, compile_decode, full_vocab, run_jobs
from model import DTYPES, GPT, GPTConfig
from parallel import GradSync, ParallelState, init_distributed
from pipeline import build_stage, plan_microbatches

SHAPES = {  # GPT-2 family shapes (vocab padded to 50304); '1b' is GPT-2 XL's width at 24 layers
    'tiny': dict(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64),
    '124m': dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
    '350m': dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50304, block_size=1024),
    '1b': dict(n_layer=24, n_head=16, n_embd=2048, vocab_size=50304, block_size=1024),
    '7b': dict(arch='llama', n_layer=32, n_head=32, n_embd=4096, ffn_hidden=11008, vocab_size=32000,
               block_size=4096),  # Llama 2 7B
}

mode = 'train'                 # 'train', 'decode' or 'serve'
shape = '124m'
arch = 'gpt2'                  # (a shape may set its own)
exit_layers = ()
batch_size = 8
accum = (1,)                   # microbatches per step (per dp rank), one run each
steps = 20
warmup = 5
compile = False
activation_checkpointing = False  # recompute each block in the backward (train.py's key)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'
tp = 1
sp = False
pp = 1
fill_bubbles = False
# decode
batch = (1, 16)                # decode batch sizes, one run each
pairs = ((),)                  # layer_parallel spans to compare, e.g. [[],[16,30]]
prompt_len = 128               # KV positions filled before timing
exit_rates = (0.0, 0.5)        # with exit_layers: shares of tokens forced to leave at the first exit
spec_k = 4                     # with exit_layers: self-speculation from the first exit, drafts per round,
spec_accepted = 3              # of which each row keeps this many (then the full model's token)
new_tokens = 64                # decode steps per timing; the median of 5 is reported
# serve
clients = (1, 16)              # concurrent clients, one run each (the server has as many rows as the most)
requests = 4                   # requests per client, one after another
profile = ''                   # a folder: also write there each timed kind's kernels (torch.profiler), CUDA only
peers = ''                     # a copy of ../shared/peers: run this workload's peer first, in the same run, and
                               # give each figure beside it (train: nanoGPT at 124m/350m; decode: gpt-fast at 7b)
DEFAULTS = snapshot(globals())

# the peer's figure (a key of bench_peers.py's JSON) that a workload's runs stand beside
PEER_FIGURES = {('train', '124m'): 'nanogpt_gpt2-124M_compile_B{batch_size}_tok_s',
                ('train', '350m'): 'nanogpt_gpt2-350M_compile_B{batch_size}_tok_s',
                ('decode', '7b'): 'gptfast_7b_compiled_tok_s'}  # (gpt-fast decodes one sequence: batch 1 rows)


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


def copy_bandwidth(device, n=2**30, reps=10):
    """Measured device memory bandwidth (bytes/s): a large copy, bytes read + written."""
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * n * reps / (time.perf_counter() - t0)


def time_steps(reset, fn, N, cuda):
    """Median seconds per call of fn over 5 timed runs of N calls, after a warm-up run;
    reset(run index) before each run."""
    times = []
    for rep in range(6):
        reset(rep)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / N)
    return statistics.median(times[1:])


def profiled(fn, n, path):
    """CUDA kernels of n calls of fn, by total time (torch.profiler), written to path as a
    table headed by the wall time and the kernel time per call: the difference is idle GPU."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    dev_time = lambda e: getattr(e, 'self_device_time_total', None) or getattr(e, 'self_cuda_time_total', 0)
    kernels = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CUDA
                      and not getattr(e, 'is_user_annotation', False)), key=dev_time, reverse=True)
    busy = sum(dev_time(e) for e in kernels) / n / 1e3  # ms per call
    with open(path, 'w') as f:
        f.write(f'wall {wall * 1e3:.3f} ms per call, GPU kernels {busy:.3f} ms per call, {n} calls\n')
        f.write(f"{'ms/call':>9} {'share':>6} {'calls/call':>10}  kernel\n")
        for e in kernels[:60]:
            f.write(f'{dev_time(e) / n / 1e3:9.4f} {dev_time(e) / n / 1e3 / busy:6.1%} {e.count / n:10.1f}  '
                    f'{e.key[:150]}\n')
    return wall, busy


def profile_to(cfg_b, name, fn, n=16):
    """With the profile key set (CUDA): profiled() into {profile}/{shape}_{name}.txt."""
    if cfg_b['profile'] and torch.cuda.is_available():
        os.makedirs(cfg_b['profile'], exist_ok=True)
        name = ''.join(c if c.isalnum() else '_' for c in f"{cfg_b['shape']}_{name}")
        profiled(fn, n, os.path.join(cfg_b['profile'], name + '.txt'))


def decoder_steps(dec, prompts, n, rate):
    """generate.py's loop (decode.run_jobs) over one greedy job per row of dec: seconds per
    decoding step (the first step, which follows the prefills, not counted) and the share of
    tokens that left at an exit. A share `rate` of each row's tokens leaves at the first exit:
    per token, threshold 0 (the exit fires) or 1.01 (its confidence is read and the token goes
    on), from a golden-ratio sequence offset by the row, so rows fire independently. rate
    None: no exit is computed."""
    phi, stamps, jobs = (5 ** 0.5 - 1) / 2, [], []
    fires = lambda i, r: 0.0 if (i * phi + r * phi * phi) % 1.0 < rate else 1.01
    for r, p in enumerate(prompts):
        job = Job(dec.cfg, dec.device, p, n, *((None, None) if rate is None else (fires(0, r), {0})))

        def on_token(*_, job=job, r=r):
            stamps.append(time.perf_counter())
            if rate is not None:
                job.thres = fires(len(job.out['tokens']), r)
        job.on_token = on_token
        jobs.append(job)
    waiting = iter(jobs)
    run_jobs(dec, lambda: next(waiting, None), 'full' if rate is None else 'recompute')
    exited = sum(d < dec.cfg.n_layer for j in jobs for d in j.out['depths']) / (len(jobs) * n)
    return (stamps[-1] - stamps[len(jobs) - 1]) / (n - 1), exited


def speculation_round(dec, d, k, accepted):
    """One round of self-speculation for every row of dec as run_jobs does it (k greedy drafts
    from depth d, read only after the verify), with a fixed acceptance: each row keeps
    `accepted` drafts and the full model's token after them (k tokens when all k are kept)."""
    rows, m = range(dec.B), accepted + 1 if accepted < k else k

    def fn():
        n, reads = [len(t) for t in dec.tokens], []
        for _ in range(k):
            greedy = {r: (set(), float('inf'), None) for r in rows}
            reads.append(dec.step(greedy, stop_depth={r: d for r in rows})[1])
            for r in rows:
                dec.tokens[r].append(None)
        for r in rows:
            del dec.tokens[r][n[r]:]
        (_, best), _ = dec.verify({r: (d, k) for r in rows})
        best = best.tolist()
        drafts = [[later()[r][0] for later in reads] for r in rows]
        for r in rows:
            dec.tokens[r] += drafts[r][:m - 1] + [int(best[r][m - 1][1])]
            del dec.done[r][len(dec.tokens[r]) - 1:]
    return fn, m


def decode(cfg_b, ps, dev):
    cuda = dev.startswith('cuda')
    dtype = DTYPES[cfg_b['dtype']]
    bw = copy_bandwidth(dev) if cuda else None
    P, N = cfg_b['prompt_len'], cfg_b['new_tokens']
    results = []

    def record(kind, B, dt, kv_positions, exit_rate=None):
        r = {'mode': 'decode', 'shape': cfg_b['shape'], 'layer_parallel': list(span), 'exit_rate': exit_rate,
             'layout': str(ps).split(' rank')[0], 'dtype': cfg_b['dtype'], 'batch': B, 'step': kind,
             'ms_per_step': round(dt * 1000, 3), 'tokens_per_s': round(B / dt, 1),
             'device': torch.cuda.get_device_name(dev) if cuda else 'cpu'}
        if cuda:
            floor = (weight_bytes + kv_per_pos * kv_positions) / bw
            r.update(bandwidth_GBps=round(bw / 1e9), floor_ms=round(floor * 1000, 3), of_bound=round(floor / dt, 3))
        results.append(r)
        if ps.is_main:
            print(json.dumps(r))

    for span in cfg_b['pairs']:
        mcfg = GPTConfig(**dict(dict(arch=cfg_b['arch'], exit_layers=cfg_b['exit_layers']), **SHAPES[cfg_b['shape']],
                                layer_parallel=span))
        with torch.device('meta'):  # initialised where it runs: no host copy of the weights
            model = GPT(mcfg, ps)
        model.to_empty(device=dev)
        model.init_weights()
        model.to(dtype).eval()
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != 'wte.weight')
        for B in cfg_b['batch']:
            kv_per_pos = sum(c.bytes_per_position() for c in model.setup_cache(B, P + N * 6 + 8, dtype))
            torch.manual_seed(0)
            with torch.no_grad():
                model(torch.randint(0, mcfg.vocab_size, (B, P), device=dev), input_pos=torch.arange(P, device=dev))
            idx = torch.zeros(B, 1, dtype=torch.long, device=dev)
            pos = torch.full((1,), P, dtype=torch.long, device=dev)

            @torch.no_grad()
            def step():  # one token for every sequence; the next token and position stay on the device
                logits, _ = model(idx, input_pos=pos)
                idx.copy_(full_vocab(model, logits[:, -1]).argmax(-1, keepdim=True))
                pos.add_(1)

            # kind: (reset before a timed run, one step, KV positions filled on average)
            reset = lambda rep: pos.fill_(P + rep * N)
            kinds = {'eager': (reset, step, P + 3.5 * N)}
            if cuda:
                kinds['graph'] = (reset, capture(step, 3)[0].replay, P + 3.5 * N)
                if cfg_b['compile']:  # inductor fuses the small kernels; the graph removes the launches
                    kinds['compiled graph'] = (reset, capture(compile_decode(step), 3)[0].replay, P + 3.5 * N)
            for kind, (reset, fn, kv_positions) in kinds.items():
                record(kind, B, time_steps(reset, fn, N, cuda), kv_positions)
                reset(0)
                profile_to(cfg_b, f'{kind}_B{B}', fn)
            model.use_cache(None)
            if mcfg.exit_layers:  # generate.py's decoder: exits forced at fixed rates; speculation
                dec = Decoder(model, graphs=cuda, compile=cfg_b['compile'], batch_size=B)
                k, acc = cfg_b['spec_k'], cfg_b['spec_accepted']
                prompts = torch.randint(0, mcfg.vocab_size, (B, P + 1)).tolist()
                d = mcfg.exits[0].depth
                dec.reserve(P + N * k + k + 8)
                for rate in (None,) + tuple(cfg_b['exit_rates']):  # generate.py's loop, timed per step
                    times = [decoder_steps(dec, prompts, N, rate) for _ in range(4)]
                    kind = 'decoder' + ('' if rate is None else f', {rate:.0%} exit at {mcfg.exit_layers[0]}')
                    record(kind, B, statistics.median(t for t, _ in times[1:]), P + N / 2, rate)
                    results[-1]['exited'] = round(times[-1][1], 3)
                    profile_to(cfg_b, f'{kind}_B{B}_per_{N}_steps', lambda: decoder_steps(dec, prompts, N, rate), 2)
                fn, m = speculation_round(dec, d, k, acc)

                def restart(rep):
                    dec.start(dict(enumerate(prompts)), P + N * k + k + 8)
                record(f'speculative from {mcfg.exit_layers[0]}, {acc} of {k} drafts kept', B,
                       time_steps(restart, fn, N, cuda) / m, P + N * m / 2)
                restart(0)
                profile_to(cfg_b, f'speculative_B{B}', fn, N)
                for r in range(B):
                    dec.free(r)
                del dec
                model.use_cache(None)
    for r in results:  # speed against the same run without pairs, and early exit against the plain decoder
        same = lambda q: q['batch'] == r['batch'] and q['step'] == r['step']
        base = next((q for q in results if not q['layer_parallel'] and same(q)), None)
        if base:
            r['speedup_vs_no_pairs'] = round(base['ms_per_step'] / r['ms_per_step'], 3)
        plain = next((q for q in results if q['layer_parallel'] == r['layer_parallel'] and q['step'] == 'decoder'
                      and q['batch'] == r['batch']), None)
        if r['step'].startswith(('decoder, ', 'speculative')) and plain:
            r['speedup_vs_decoder'] = round(plain['ms_per_step'] / r['ms_per_step'], 3)
    return results


CLIENT = """
import http.client, json, sys
port, n, P, N, c = map(int, sys.argv[1:])
print('ready', flush=True)
sys.stdin.readline()
for i in range(n):
    body = json.dumps({'prompts': [f'{c:04d}{i:04d}'.ljust(P, 'x')], 'tokens_to_generate': N}).encode()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    conn.request('PUT', '/api', body=body, headers={'Content-Length': str(len(body))})
    assert conn.getresponse().status == 200
"""


def serve_load(cfg_b, ps, dev):
    """generate.py's server (its Batcher, batch rows = the most clients) under N concurrent
    clients, each sending `requests` requests one after another (prompt_len bytes, new_tokens
    greedy tokens each, no early exit): requests/s and generated tokens/s, against one client."""
    import threading
    import generate
    mcfg = GPTConfig(**dict(dict(arch=cfg_b['arch'], exit_layers=cfg_b['exit_layers']), **SHAPES[cfg_b['shape']]))
    with torch.device('meta'):
        model = GPT(mcfg, ps)
    model.to_empty(device=dev)
    model.init_weights()
    model.to(DTYPES[cfg_b['dtype']]).eval()
    encode = lambda text: list(text.encode())  # bytes as token ids
    decode_text = lambda ids: bytes(i % 256 for i in ids).decode('utf-8', 'replace')
    P, N, rows = cfg_b['prompt_len'], cfg_b['new_tokens'], max(cfg_b['clients'])
    dec = Decoder(model, graphs=dev.startswith('cuda'), compile=cfg_b['compile'], batch_size=rows)
    srv = generate.make_server(model, encode, decode_text, 0, decoder=dec, max_len=P + N + 8)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def load(n_clients, n):
        """Seconds for n_clients client processes (as real clients are: none shares the server's
        interpreter) to send n requests each, one after another, all starting together."""
        clients = [subprocess.Popen([sys.executable, '-c', CLIENT, str(srv.server_port), str(n), str(P), str(N), str(c)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c in range(n_clients)]
        for p in clients:
            assert p.stdout.readline().strip() == 'ready'
        t0 = time.perf_counter()
        for p in clients:
            p.stdin.write('go\n')
            p.stdin.flush()
        for p in clients:
            assert p.wait() == 0, 'a client failed'
        return time.perf_counter() - t0

    load(rows, 1)  # warm-up: compilation and CUDA graphs
    results = []
    for n_clients in cfg_b['clients']:
        dt = load(n_clients, cfg_b['requests'])
        n_req = n_clients * cfg_b['requests']
        r = {'mode': 'serve', 'shape': cfg_b['shape'], 'dtype': cfg_b['dtype'], 'rows': rows, 'clients': n_clients,
             'requests': n_req, 'new_tokens': N, 's': round(dt, 2), 'requests_per_s': round(n_req / dt, 2),
             'tokens_per_s': round(n_req * N / dt, 1),
             'device': torch.cuda.get_device_name(dev) if dev.startswith('cuda') else 'cpu'}
        results.append(r)
        print(json.dumps(r))
    for r in results:
        r['speedup_vs_one_client'] = round(r['tokens_per_s'] / results[0]['tokens_per_s'], 2)
    srv.shutdown()
    srv.server_close()
    return results


def training(cfg_b, ps, dev):
    mcfg = GPTConfig(**dict(dict(arch=cfg_b['arch'], exit_layers=cfg_b['exit_layers']), **SHAPES[cfg_b['shape']]))
    cuda = dev.startswith('cuda')
    ctx, scaler = train.precision(dev, cfg_b['dtype'])
    model, _ = build_stage(mcfg, ps, device=dev)
    model.checkpoint_blocks = cfg_b['activation_checkpointing']
    optimizer = train.make_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 'cuda' if cuda else 'cpu')
    grads = GradSync(model.parameters(), ps)
    w = [1.0] * len(mcfg.exit_layers)
    fwd = torch.compile(model) if cfg_b['compile'] else model
    data = np.random.default_rng(0).integers(0, mcfg.vocab_size, 2_000_000).astype(np.uint16)
    ceiling = matmul_tflops(dev) if cuda else None
    peak = train.peak_flops(dev)
    results, it = [], 0
    for m in cfg_b['accum']:
        batches = corpus.Batches({'train': data}, cfg_b['batch_size'], mcfg.block_size, m * ps.dp, device=dev)
        mbs = plan_microbatches(mcfg, ps.pp, m, fill_bubbles=cfg_b['fill_bubbles'])

        def step():
            nonlocal it
            train.train_step(fwd, optimizer, grads, batches, it, 1e-4, w, 1.0, ctx, scaler, ps, mbs=mbs)
            it += 1

        for _ in range(cfg_b['warmup']):
            step()
        # back to back as train.py runs them (the host may run ahead); on CUDA, timed by events
        marks = [time.perf_counter()] if not cuda else [torch.cuda.Event(enable_timing=True)]
        if cuda:
            marks[0].record()
        for _ in range(cfg_b['steps']):
            step()
            if cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            else:
                marks.append(time.perf_counter())
        if cuda:
            torch.cuda.synchronize()
        dt = statistics.median([a.elapsed_time(b) / 1e3 if cuda else b - a for a, b in zip(marks, marks[1:])])
        profile_to(cfg_b, f'train_{m}mb', step, 3)
        tokens = cfg_b['batch_size'] * batches.accum * mcfg.block_size
        flops_per_token = model.flops_per_token(mcfg.block_size)
        flops = flops_per_token * tokens / dt / ps.world  # per GPU
        fills = len(mbs) - m
        r = {'shape': cfg_b['shape'], 'stage_params_M': round(model.num_params() / 1e6, 1), 'exits': list(mcfg.exit_layers),
             'layout': str(ps).split(' rank')[0], 'sp': ps.sp, 'compile': cfg_b['compile'], 'dtype': cfg_b['dtype'],
             'activation_checkpointing': cfg_b['activation_checkpointing'],
             'flops_per_token': flops_per_token,
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
    return results


def run_peers(folder, mode, batch_size):
    """The peers' own benchmark (folder/bench_peers.py, the ceilings and this mode's peer) in a
    process of its own on the same machine, before nanoEE is timed: its JSON."""
    script = os.path.join(folder, 'bench_peers.py')
    if not os.path.isfile(script):
        raise ValueError(f'peers={folder!r} holds no bench_peers.py; copy ../shared/peers there')
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OUT=out, NANOGPT_B=str(batch_size), NANOGPT_MODES='compile')
        subprocess.run([sys.executable, script, 'ceil', {'train': 'nanogpt', 'decode': 'gptfast'}[mode]], env=env,
                       check=True)
        with open(os.path.join(out, 'peers.json')) as f:
            return json.load(f)


def beside_peer(runs, figures, key):
    """Each run's tokens/s beside the peer's figure `key` (decode: the batch-1 runs)."""
    for r in runs:
        if key in figures and r.get('batch', 1) == 1:
            r.update(peer=key, peer_tokens_per_s=figures[key], vs_peer=round(r['tokens_per_s'] / figures[key], 3))
    return runs


def main(args):
    cfg_b = configure(DEFAULTS, args)
    modes = {'train': training, 'decode': decode, 'serve': serve_load}
    if cfg_b['mode'] not in modes:
        raise ValueError(f"mode={cfg_b['mode']!r}; allowed: {', '.join(map(repr, modes))}")
    key = PEER_FIGURES.get((cfg_b['mode'], cfg_b['shape']), '').format(**cfg_b)
    if cfg_b['peers'] and not key:
        raise ValueError(f"peers: no peer for mode={cfg_b['mode']!r} shape={cfg_b['shape']!r}; there is one for "
                         + ', '.join(f'{m} {s}' for m, s in PEER_FIGURES))
    dev = init_distributed(cfg_b['device'])
    ps = ParallelState(cfg_b['tp'], cfg_b['pp'], cfg_b['sp'])
    if cfg_b['peers'] and ps.world > 1:
        raise ValueError('peers: the peers run in one process; run bench.py with them without torchrun')
    figures = run_peers(cfg_b['peers'], cfg_b['mode'], cfg_b['batch_size']) if cfg_b['peers'] else {}
    summary = {'runs': beside_peer(modes[cfg_b['mode']](cfg_b, ps, dev), figures, key)}
    if figures:
        summary['peers'] = figures
    if ps.is_main:
        print(json.dumps(summary))
    return summary


if __name__ == '__main__':
    run(main)
