"""
Generate from a trained checkpoint, with KV-cached early exit.

    python generate.py --out_dir=out-pystdlib --prompt="def main(" --max_new_tokens=200
    python generate.py --out_dir=out-pystdlib --early_exit_thres=0.8 --show_exits
    python generate.py --out_dir=out-pystdlib --method=speculative --spec_exit=2 --spec_k=4
    python generate.py --out_dir=out-pystdlib --method=speculative --spec_exit=auto --spec_k=8 --spec_stop=0.5
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --tp=2 --early_exit_thres=0.8
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --pp=2 --method=pipeline --early_exit_thres=0.8
    python generate.py --out_dir=out-pystdlib --prompts_file=prompts.jsonl --batch_size=8 --json
    python generate.py --out_dir=out-pystdlib --serve --port=5000     # PUT /api, EE-LLM's fields
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --tp=2 --layer_parallel=[2,4]

Methods (decode.py has the engine and says how each works): full; recompute (EE-LLM's early
exit with KV recomputation); pipeline (EE-LLM's pipeline-based early exit, with --pp);
speculative (LayerSkip's lossless self-speculation). On CUDA (--graphs=True, the default)
the blocks between two exits run as one replayed CUDA graph, and an exit decision costs one
small read from the device; with --compile=True each block and head is compiled first.

Every method but pipeline decodes a batch of rows at once (--prompts_file, --serve), each
row its own sequence with its own exits, drafts and sampling generator: a row's output is
the one it has alone. The server decodes concurrent requests together, a free row taking
the next queued prompt at every step.

Any method runs with --layer_parallel=[start,end): those blocks run in side-by-side pairs
(model.Block), which at tp=2 halves the all-reduces of the span; a checkpoint tuned for
pairs (tune.py) runs with its own span by default.
"""

import json as _json  # (json is a key below)
import sys
import time
from collections import Counter

from checkpoint import load_model, tokenizer
from configurator import check, configure, run, snapshot
from decode import Decoder, Job, generate, generate_many, generate_pipelined, run_jobs
from model import DTYPES
from parallel import ParallelState, init_distributed

# -----------------------------------------------------------------------------
out_dir = 'out-pystdlib'
device = 'cpu'
dtype = None                    # decode in 'float32', 'bfloat16' or 'float16'; None: bfloat16 on CUDA, else float32
prompt = '\n'
prompt_file = None
prompts_file = None             # EE-LLM's prompt file: one {"text": ...} per line, batch_size of them decoding at once
batch_size = 8                  # rows decoded at once (prompts_file, serve); a finished row takes the next prompt
prompt_ids = None               # a list of token ids, for checkpoints without a tokenizer
max_new_tokens = 200
temperature = 0.0               # 0: greedy
top_k = None
top_p = None
seed = 1337
method = 'recompute'            # 'full', 'recompute', 'speculative' or 'pipeline' (with pp > 1)
early_exit_thres = None         # None: no early exit (recompute runs the full model)
exit_layers = None              # exits allowed to fire (their exit_layers numbers); None: all
spec_exit = None                # the exit_layers number of the drafting exit, or 'auto' (adaptive: decode.DraftPlan)
spec_stop = None                # end a draft when the drafting exit's max probability falls below this
spec_k = 4                      # tokens drafted per verification
show_exits = False              # colour each token by the exit it left from
print_max_prob = False          # print each token's confidence at every exit it reached
json = False                    # end with one JSON line (tokens, depths, text, tokens/s)
tp = 1                          # tensor-parallel ranks (under torchrun)
pp = 1                          # pipeline stages (under torchrun; method='pipeline')
layer_parallel = None           # [start, end): run these blocks in parallel pairs; None: as saved
graphs = True                   # on CUDA: replay each segment of blocks between exits as a CUDA graph
compile = False                 # torch.compile each block and head first (slow to start, faster per token)
serve = False                   # answer PUT /api (EE-LLM's request fields) instead of one prompt
host = '127.0.0.1'              # the server's address ('0.0.0.0': every interface; it has no authentication)
port = 5000
max_len = None                  # the server's positions per row (prompt + tokens to generate); None: block_size
# -----------------------------------------------------------------------------
DEFAULTS = snapshot(globals())
TYPES = dict(dtype=str, prompt_file=str, prompts_file=str, prompt_ids=tuple, top_k=int, top_p=float,
             early_exit_thres=float, exit_layers=tuple, spec_exit=(int, str), spec_stop=float, layer_parallel=tuple,
             max_len=int)
# the ranges of the sampling keys, shared by the command line and the server (its field names)
SAMPLING = {
    'max_new_tokens': (int, lambda v: 1 <= v <= 1 << 20, 'an int >= 1'),
    'temperature': (float, lambda v: 0 <= v <= 100, 'a number in 0..100 (0: greedy)'),
    'top_k': (int, lambda v: v >= 1, 'an int >= 1'),
    'top_p': (float, lambda v: 0 < v <= 1, 'a number in (0, 1]'),
    'seed': (int, lambda v: 0 <= v < 2**63, 'an int in 0..2**63-1'),
    'early_exit_thres': (float, lambda v: 0 <= v <= 1, 'a number in [0, 1] (a max probability)'),
    'spec_k': (int, lambda v: 1 <= v <= 64, 'an int in 1..64 (tokens drafted per verification)'),
    'spec_stop': (float, lambda v: 0 <= v <= 1, 'a number in [0, 1] (a max probability)'),
    'dtype': (str, lambda v: v in DTYPES, "'float32', 'bfloat16' or 'float16'"),
    'batch_size': (int, lambda v: 1 <= v <= 4096, 'an int in 1..4096'),
}


# -----------------------------------------------------------------------------
# the server: EE-LLM's (Megatron's) text-generation API, PUT /api

MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPTS = 16
MAX_WAITING = 32  # requests waiting for the model at once; more get 503
TIMEOUT_S = 30    # a connection that sends nothing for this long is closed
flag = (bool, lambda v: True, 'true or false')
FIELDS = {  # name: (types, check, what is allowed)
    'prompts': (list, lambda v: 0 < len(v) <= MAX_PROMPTS and all(isinstance(p, str) and p for p in v),
                f'a list of 1..{MAX_PROMPTS} non-empty strings (or one string)'),
    'tokens_to_generate': (int, lambda v: 0 <= v <= 4096, 'an int in 0..4096'),
    'temperature': SAMPLING['temperature'],
    'top_k': (int, lambda v: v >= 0, 'an int >= 0 (0: off)'),
    'top_p': (float, lambda v: 0 <= v <= 1, 'a number in 0..1 (0: off)'),
    'random_seed': SAMPLING['seed'],
    'early_exit_thres': SAMPLING['early_exit_thres'],
    'exit_layers': (list, lambda v: all(isinstance(L, int) and not isinstance(L, bool) for L in v),
                    "a list of the model's exit layers ([]: all)"),
    'logprobs': flag, 'use_early_exit': flag, 'print_max_prob': flag,
    'echo_prompts': flag,  # false: text and segments hold the generated part only
    # EE-LLM's (Megatron's) other fields, accepted and ignored: no BOS in these tokenizers, no
    # stop sequences, top-p decay, newline rule or request log
    'add_BOS': flag, 'stop_sequences': (list, lambda v: all(isinstance(x, str) for x in v), 'a list of strings'),
    'top_p_decay': (float, lambda v: 0 <= v <= 1, 'a number in 0..1'),
    'top_p_bound': (float, lambda v: 0 <= v <= 1, 'a number in 0..1'),
    'prevent_newline_after_colon': flag, 'no_log': flag,
}


def read_request(model, encode, body, max_len):
    """One /api request (raw bytes) -> (request dict, prompts' token ids), or an error as
    (HTTP status, response dict): bad input is a 400 whose message names the field and what
    is allowed."""
    try:
        req = _json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return 400, {'error': f'the body is not JSON: {type(e).__name__}: {str(e)[:200]}'}
    if not isinstance(req, dict):
        return 400, {'error': 'the body must be a JSON object'}
    if isinstance(req.get('prompts'), str):
        req['prompts'] = [req['prompts']]  # (EE-LLM takes one prompt as a bare string)
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        return 400, {'error': f'unknown field(s) {unknown}; allowed: {sorted(FIELDS)}'}
    if 'prompts' not in req:
        return 400, {'error': 'prompts is required'}
    nulls = sorted(k for k, v in req.items() if v is None)
    if nulls:
        return 400, {'error': f'{nulls} are null; leave a field out for its default'}
    try:
        check(req, FIELDS)
        for p in req['prompts']:
            p.encode('utf-8')
    except ValueError as e:  # (UnicodeEncodeError too: a lone surrogate)
        return 400, {'error': str(e)[:300]}
    cfg = model.config
    bad = [L for L in req.get('exit_layers', []) if L not in cfg.exit_layers]
    if bad:
        return 400, {'error': f'exit_layers={bad} are not exits of this model; allowed: {list(cfg.exit_layers)}'}
    n, ids = req.get('tokens_to_generate', 64), [encode(p) for p in req['prompts']]
    for p in ids:
        if len(p) + n > max_len:
            return 400, {'error': f'prompts: a prompt of {len(p)} tokens + tokens_to_generate={n} exceeds the '
                                  f'{max_len} positions a row holds (max_len; the model\'s block_size={cfg.block_size})'}
    return req, ids


def request_jobs(model, req, ids, eot, on_done):
    """The request's prompts as decode.Jobs (EE-LLM's fields: recompute early exit; top_k 1
    is greedy; prompt i samples from random_seed + i)."""
    cfg, top_k, seed = model.config, req.get('top_k', 0), req.get('random_seed')
    thres = req.get('early_exit_thres', 1.0) if req.get('use_early_exit') else None
    allowed = [cfg.exit_index(L) for L in req['exit_layers']] if req.get('exit_layers') else None
    return [Job(cfg, next(model.parameters()).device, p, req.get('tokens_to_generate', 64), thres, allowed,
                0.0 if top_k == 1 else req.get('temperature', 0.0), top_k or None, req.get('top_p') or None,
                None if seed is None else seed + i, eot, on_done=on_done) for i, p in enumerate(ids)]


def response(req, ids, jobs, decode):
    """The /api answer for a request's finished jobs."""
    texts, segments, logprobs, max_probs = [], [], [], []
    for p, job in zip(ids, jobs):
        shown = p + job.out['tokens'] if req.get('echo_prompts', True) else job.out['tokens']
        texts.append(decode(shown))
        segments.append([decode([t]) for t in shown])
        logprobs.append(job.out['logprobs'])
        max_probs.append([{str(d): p for d, p in probs.items()} for probs in job.out['max_probs']])
    resp = {'text': texts, 'segments': segments, 'logprobs': logprobs if req.get('logprobs') else None}
    if req.get('print_max_prob'):
        resp['max_probs'] = max_probs
    return resp


class Batcher:
    """The server's decoding loop, on its own thread: requests queue their jobs, and every
    decoding step admits queued jobs into the decoder's free rows (decode.run_jobs), so that
    concurrent requests decode together and a short one never waits for a long one to end.
    The cache holds max_len positions per row, the longest a request may ask for (attention
    reads the whole cache: ask for no more than the requests need)."""

    def __init__(self, decoder, max_len):
        import queue
        import threading
        self.dec, self.queue = decoder, queue.Queue()
        decoder.reserve(max_len)
        threading.Thread(target=self.loop, daemon=True).start()

    def submit(self, jobs):
        """Queue jobs and wait until each is over; a failure in the loop is raised here."""
        for job in jobs:
            self.queue.put(job)
        for job in jobs:
            job.finished.wait()
            if job.error is not None:
                raise job.error

    def loop(self):
        while True:
            waiting, taken = [self.queue.get()], []  # (idle until a job comes)

            def take():
                job = waiting.pop() if waiting else None if self.queue.empty() else self.queue.get_nowait()
                taken.append(job)
                return job
            try:
                run_jobs(self.dec, take, 'recompute')
            except Exception as e:  # every job in hand fails, and the loop goes on
                for job in taken:
                    if job is not None and not job.finished.is_set():
                        job.error = e
                        job.finished.set()
                for r in range(self.dec.B):
                    self.dec.free(r)


def make_server(model, encode, decode, port, eot=None, decoder=None, host='127.0.0.1', timeout=TIMEOUT_S,
                max_len=None):
    """The HTTP server: each connection is read on its own thread (a slow or idle client holds
    only its own, and is dropped after `timeout` seconds of silence); its prompts decode in
    the Batcher's rows beside every other request's, with at most MAX_WAITING requests in
    the server at once (503 past that). One decoder (its batch of rows, cache and CUDA
    graphs) serves every request; max_len: positions per row (None: block_size)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    max_len = max_len or model.config.block_size
    batcher = Batcher(decoder or Decoder(model, batch_size=8), max_len)
    seats = threading.BoundedSemaphore(MAX_WAITING)

    def done(job):
        job.finished.set()

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            if self.path != '/api':
                return self.reply(404, {'error': f'no such path {self.path}; use PUT /api'})
            size = self.headers.get('Content-Length')
            if size is None or not size.isdigit() or int(size) > MAX_REQUEST_BYTES:
                return self.reply(400, {'error': f'Content-Length={size!r}: give the body\'s size in bytes, '
                                                 f'at most {MAX_REQUEST_BYTES}'}, close=True)
            body = self.rfile.read(int(size))
            if len(body) < int(size):
                return self.reply(400, {'error': f'the body ended after {len(body)} of {size} bytes'}, close=True)
            req, ids = read_request(model, encode, body, max_len)
            if not isinstance(req, dict):
                return self.reply(req, ids)
            if not seats.acquire(blocking=False):
                return self.reply(503, {'error': f'{MAX_WAITING} requests are already waiting; try again later'})
            try:
                jobs = request_jobs(model, req, ids, eot, done)
                for job in jobs:
                    job.finished, job.error = threading.Event(), None
                batcher.submit(jobs)
                self.reply(200, response(req, ids, jobs, decode))
            except Exception as e:  # keep serving whatever one request does
                self.reply(500, {'error': f'{type(e).__name__}: {e}'})
            finally:
                seats.release()

        def reply(self, status, obj, close=False):
            data = _json.dumps(obj).encode()
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            if close:
                self.send_header('Connection', 'close')
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

    Handler.timeout = timeout  # (socket timeout of every connection)

    class Server(ThreadingHTTPServer):
        daemon_threads, request_queue_size = True, 128

        def handle_error(self, request, client_address):  # a client that hung up or timed out: one line
            print(f'{client_address[0]}:{client_address[1]}: connection dropped ({sys.exc_info()[1]!r})')

    server = Server((host, port), Handler)
    print(f'serving PUT http://{host}:{server.server_port}/api, {batcher.dec.B} rows')
    return server


# -----------------------------------------------------------------------------
# the command line

COLOURS = ['\033[41m', '\033[43m', '\033[42m', '\033[46m', '\033[44m', '\033[45m']  # by exit, then final: none


def exits(cfg, mc):
    """The exit_layers and spec_exit keys as exit indices (None: all exits; no drafting exit)."""
    try:
        allowed = None if cfg['exit_layers'] is None else [mc.exit_index(L) for L in cfg['exit_layers']]
        spec_exit = cfg['spec_exit'] if cfg['spec_exit'] in (None, 'auto') else mc.exit_index(cfg['spec_exit'])
    except ValueError as e:
        sys.exit(str(e))
    if cfg['method'] == 'speculative' and spec_exit is None:
        sys.exit(f"method=speculative needs --spec_exit=L, one of {list(mc.exit_layers)}, or 'auto'")
    return allowed, spec_exit


def many(cfg, model, encode, decode, decoder, eot):
    """Every prompt of prompts_file (EE-LLM's format: one {"text": ...} per line), batch_size
    rows at once: each completion is printed as it ends; with json, one last line of the
    results in prompt order and the throughput."""
    mc, prompts = model.config, []
    with open(cfg['prompts_file']) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    text = _json.loads(line)['text']
                    assert isinstance(text, str) and text
                except (ValueError, KeyError, TypeError, AssertionError):
                    sys.exit(f'{cfg["prompts_file"]}:{i}: not a JSON object with a non-empty "text" string: {line[:80]!r}')
                prompts.append(encode(text))
    if not prompts:
        sys.exit(f'{cfg["prompts_file"]} holds no prompts')
    allowed, spec_exit = exits(cfg, mc)
    layer = {x.depth: x.layer for x in mc.exits} | {mc.n_layer: mc.n_layer}  # depth -> EE-LLM layer number
    n_done = [0]

    def finished(i, out):
        n_done[0] += 1
        print(f'--- [{i}] ({n_done[0]}/{len(prompts)}, {len(out["tokens"])} tokens)\n{decode(prompts[i] + out["tokens"])}',
              flush=True)

    t0 = time.time()
    outs = generate_many(model, prompts, cfg['max_new_tokens'], cfg['method'], cfg['early_exit_thres'], allowed,
                         spec_exit, cfg['spec_k'], cfg['temperature'], cfg['top_k'], cfg['top_p'], cfg['seed'], eot,
                         decoder=decoder, on_done=finished, spec_stop=cfg['spec_stop'])
    dt = time.time() - t0
    n = sum(len(o['tokens']) for o in outs)
    print(f'---\n{len(prompts)} prompts, {n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s over {decoder.B} rows')
    if cfg['json']:
        print(_json.dumps({'results': [{'tokens': o['tokens'], 'exit_layers': [layer[d] for d in o['depths']],
                                        'text': decode(o['tokens'])} for o in outs], 'tokens_per_s': n / dt}))
    return outs


def main(args):
    try:
        cfg = check(configure(DEFAULTS, args, types=TYPES), SAMPLING)
    except ValueError as e:
        sys.exit(str(e))
    dev = init_distributed(cfg['device'])
    ps = ParallelState(cfg['tp'], cfg['pp'])
    if (ps.pp > 1) != (cfg['method'] == 'pipeline'):
        sys.exit(f"method=pipeline runs with pp > 1 (under torchrun) and pp > 1 only with it; got "
                 f"method={cfg['method']!r}, pp={ps.pp}")
    model, ckpt = load_model(cfg['out_dir'], ps, dev, layer_parallel=cfg['layer_parallel'])
    model.to(DTYPES[cfg['dtype'] or ('bfloat16' if dev.startswith('cuda') else 'float32')]).eval()
    say = print if ps.is_main else (lambda *a, **k: None)
    mc = model.config
    try:
        encode, decode = tokenizer(ckpt.meta, cfg['out_dir'])
    except Exception as e:  # (tiktoken's vocabulary offline, a missing tokenizers package)
        if cfg['prompt_ids'] is None or cfg['serve']:
            sys.exit(f'the tokenizer of {cfg["out_dir"]} does not load: {type(e).__name__}: {e}; give --prompt_ids')
        encode = decode = None  # token ids in, token ids out
    if cfg['prompts_file'] and not cfg['serve']:
        if encode is None or cfg['method'] == 'pipeline' or ps.pp > 1:
            sys.exit('prompts_file needs a checkpoint that names a tokenizer, and a method other than pipeline')
        ids = [0]
    elif cfg['prompt_ids'] is not None:
        ids = list(cfg['prompt_ids'])
    else:
        text = open(cfg['prompt_file']).read() if cfg['prompt_file'] else cfg['prompt']
        if encode is None:
            sys.exit('this checkpoint names no tokenizer: give --prompt_ids=[...]')
        ids = encode(text)
    bad = [i for i in ids if not 0 <= i < mc.vocab_size]
    if not ids or bad:
        sys.exit(f'prompt ids must be 1 or more ints in 0..{mc.vocab_size - 1}; got {bad or "none"}')
    eot = (ckpt.meta.get('data') or {}).get('eot_token')
    decoder = Decoder(model, cfg['graphs'], cfg['compile'], cfg['batch_size'] if cfg['serve'] or cfg['prompts_file']
                      else 1)
    if cfg['serve']:
        if encode is None or ps.world > 1:
            sys.exit('serve needs a checkpoint that names a tokenizer (bytes, gpt2 or a tokenizer.json), in one process')
        make_server(model, encode, decode, cfg['port'], eot, decoder, cfg['host'],
                    max_len=cfg['max_len']).serve_forever()
    if cfg['prompts_file']:
        return many(cfg, model, encode, decode, decoder, eot)
    allowed, spec_exit = exits(cfg, mc)
    depth_name = mc.head_names
    colour = {d: COLOURS[i % len(COLOURS)] for i, d in enumerate(mc.exit_depths)}

    def show(tok, depth, probs):
        piece = decode([tok]) if decode else f'{tok} '
        if cfg['show_exits'] and depth in colour:
            piece = colour[depth] + piece + '\033[0m'
        if cfg['print_max_prob']:
            piece += ' [' + ', '.join(f'{depth_name.get(d, d)}: {p:.3f}' for d, p in probs.items()) + ']\n'
        say(piece, end='', flush=True)

    if cfg['show_exits']:
        say('legend: ' + ' '.join(colour[d] + depth_name[d] + '\033[0m' for d in mc.exit_depths) + ' final')
    say(decode(ids) if decode else ids, end='', flush=True)
    t0 = time.time()
    if cfg['method'] == 'pipeline':  # tokens are printed at the end, by stage 0
        out = generate_pipelined(model, ids, cfg['max_new_tokens'], cfg['early_exit_thres'], allowed, ps,
                                 cfg['temperature'], cfg['top_k'], cfg['top_p'], cfg['seed'], eot, decoder)
        if out is None:
            return None
        for tok, depth in zip(out['tokens'], out['depths']):
            show(tok, depth, {})
    else:
        out = generate(model, ids, cfg['max_new_tokens'], cfg['method'], cfg['early_exit_thres'], allowed, spec_exit,
                       cfg['spec_k'], cfg['temperature'], cfg['top_k'], cfg['top_p'], cfg['seed'], eot, show, decoder,
                       cfg['spec_stop'])
    dt = time.time() - t0
    n = len(out['tokens'])
    depths = out['depths']
    share = {depth_name[d]: round(depths.count(d) / n, 3) for d in sorted(set(depths))}
    mean_depth = sum(depths) / n
    say(f"\n---\n{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s; tokens per exit {share}; mean depth "
          f"{mean_depth:.2f} of {mc.n_layer} blocks (layer-count speedup {mc.n_layer / mean_depth:.2f}x)"
          + (f"; drafts accepted {out['accepted']}/{out['drafted']}" if out['drafted'] else '')
          + (f"; rounds per drafting exit {dict(Counter(L for L, _ in out['rounds']))}" if out.get('rounds') else ''))
    if cfg['json']:
        say(_json.dumps({'tokens': out['tokens'], 'depths': depths, 'text': decode(out['tokens']) if decode
                          else None, 'tokens_per_s': n / dt, 'accepted': out['accepted'], 'drafted': out['drafted']}))
    return out


if __name__ == '__main__':
    run(main)
