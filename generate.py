"""
Generate from a trained checkpoint, with KV-cached early exit.

    python generate.py --out_dir=out-pystdlib --prompt="def main(" --max_new_tokens=200
    python generate.py --out_dir=out-pystdlib --early_exit_thres=0.8 --show_exits
    python generate.py --out_dir=out-pystdlib --method=speculative --spec_exit=2 --spec_k=4
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --tp=2 --early_exit_thres=0.8
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --pp=2 --method=pipeline --early_exit_thres=0.8
    python generate.py --out_dir=out-pystdlib --serve --port=5000     # PUT /api, EE-LLM's fields
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --tp=2 --layer_parallel=[2,4]

Methods (decode.py has the engine and says how each works): full; recompute (EE-LLM's early
exit with KV recomputation); pipeline (EE-LLM's pipeline-based early exit, with --pp);
speculative (LayerSkip's lossless self-speculation). On CUDA (--graphs=True, the default)
the blocks between two exits run as one replayed CUDA graph, and an exit decision costs one
small read from the device; with --compile=True each block and head is compiled first.

Any method runs with --layer_parallel=[start,end): those blocks run in side-by-side pairs
(model.Block), which at tp=2 halves the all-reduces of the span; a checkpoint tuned for
pairs (tune.py) runs with its own span by default.
"""

import json as _json  # (json is a key below)
import sys
import time

from checkpoint import load_model, tokenizer
from configurator import configure, run, snapshot
from decode import Decoder, generate, generate_pipelined
from parallel import ParallelState, init_distributed

# -----------------------------------------------------------------------------
out_dir = 'out-pystdlib'
device = 'cpu'
prompt = '\n'
prompt_file = None
prompt_ids = None               # a list of token ids, for checkpoints without a tokenizer
max_new_tokens = 200
temperature = 0.0               # 0: greedy
top_k = None
top_p = None
seed = 1337
method = 'recompute'            # 'full', 'recompute', 'speculative' or 'pipeline' (with pp > 1)
early_exit_thres = None         # None: no early exit (recompute runs the full model)
exit_layers = None              # exits allowed to fire (their exit_layers numbers); None: all
spec_exit = None                # the exit_layers number of the drafting exit
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
port = 5000
# -----------------------------------------------------------------------------
DEFAULTS = snapshot(globals())


# -----------------------------------------------------------------------------
# the server: EE-LLM's (Megatron's) text-generation API, PUT /api

MAX_REQUEST_BYTES = 1 << 20
MAX_PROMPTS = 16
FIELDS = {  # name: (types, check, what is allowed)
    'prompts': (list, lambda v: 0 < len(v) <= MAX_PROMPTS and all(isinstance(p, str) and p for p in v),
                f'a list of 1..{MAX_PROMPTS} non-empty strings'),
    'tokens_to_generate': (int, lambda v: 0 <= v <= 4096, 'an int in 0..4096'),
    'temperature': ((int, float), lambda v: 0 <= v <= 100, 'a number in 0..100 (0: greedy)'),
    'top_k': (int, lambda v: v >= 0, 'an int >= 0 (0: off)'),
    'top_p': ((int, float), lambda v: 0 <= v <= 1, 'a number in 0..1 (0: off)'),
    'random_seed': (int, lambda v: v >= 0, 'an int >= 0'),
    'logprobs': (bool, lambda v: True, 'true or false'),
    'use_early_exit': (bool, lambda v: True, 'true or false'),
    'early_exit_thres': ((int, float), lambda v: 0 <= v, 'a number >= 0'),
    'exit_layers': (list, lambda v: all(isinstance(L, int) and not isinstance(L, bool) for L in v),
                    "a list of the model's exit layers"),
    'print_max_prob': (bool, lambda v: True, 'true or false'),
}


def api_request(model, encode, decode, body, eot=None, decoder=None):
    """One /api request (raw bytes) -> (HTTP status, response dict). Bad input is a 400
    whose message names the field and what is allowed. decoder: the model's Decoder to reuse."""
    try:
        req = _json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return 400, {'error': f'the body is not JSON: {e}'}
    if not isinstance(req, dict):
        return 400, {'error': 'the body must be a JSON object'}
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
        return 400, {'error': f'unknown field(s) {unknown}; allowed: {sorted(FIELDS)}'}
    if 'prompts' not in req:
        return 400, {'error': 'prompts is required'}
    for k, v in req.items():
        types, ok, allowed = FIELDS[k]
        if isinstance(v, bool) and types is not bool or not isinstance(v, types) or not ok(v):
            return 400, {'error': f'{k}={_json.dumps(v)[:100]} is not allowed: {k} must be {allowed}'}
    cfg = model.config
    bad = [L for L in req.get('exit_layers', []) if L not in cfg.exit_layers]
    if bad:
        return 400, {'error': f'exit_layers={bad} are not exits of this model; allowed: {list(cfg.exit_layers)}'}
    n = req.get('tokens_to_generate', 64)
    texts, segments, logprobs, max_probs = [], [], [], []
    for prompt in req['prompts']:
        ids = encode(prompt)
        if len(ids) + n > cfg.block_size:
            return 400, {'error': f'prompts: a prompt of {len(ids)} tokens + tokens_to_generate={n} exceeds '
                                  f'the model\'s block_size={cfg.block_size}'}
        top_k = req.get('top_k', 0)
        out = generate(model, ids, n, 'recompute', req.get('early_exit_thres', 1.0) if req.get('use_early_exit')
                       else None, [cfg.exit_index(L) for L in req['exit_layers']] if 'exit_layers' in req else None,
                       temperature=0.0 if top_k == 1 else req.get('temperature', 0.0), top_k=top_k or None,
                       top_p=req.get('top_p') or None, seed=req.get('random_seed'), stop=eot, decoder=decoder) if n else \
            {'tokens': [], 'logprobs': [], 'max_probs': []}
        texts.append(decode(ids + out['tokens']))
        segments.append([decode([t]) for t in ids + out['tokens']])
        logprobs.append(out['logprobs'])
        max_probs.append([{str(d): p for d, p in probs.items()} for probs in out['max_probs']])
    resp = {'text': texts, 'segments': segments, 'logprobs': logprobs if req.get('logprobs') else None}
    if req.get('print_max_prob'):
        resp['max_probs'] = max_probs
    return 200, resp


def make_server(model, encode, decode, port, eot=None, decoder=None):
    """A one-request-at-a-time HTTP server (the model and its cache are not shared); one
    decoder (its cache and CUDA graphs) serves every request."""
    from http.server import BaseHTTPRequestHandler, HTTPServer
    decoder = decoder or Decoder(model)

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            if self.path != '/api':
                return self.reply(404, {'error': f'no such path {self.path}; use PUT /api'})
            size = int(self.headers.get('Content-Length') or 0)
            if size > MAX_REQUEST_BYTES:
                return self.reply(400, {'error': f'the request has {size} bytes; at most {MAX_REQUEST_BYTES}'})
            try:
                self.reply(*api_request(model, encode, decode, self.rfile.read(size), eot, decoder))
            except Exception as e:  # keep serving whatever one request does
                self.reply(500, {'error': f'{type(e).__name__}: {e}'})

        def reply(self, status, obj):
            data = _json.dumps(obj).encode()
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer(('', port), Handler)
    print(f'serving PUT http://localhost:{server.server_port}/api')
    return server


# -----------------------------------------------------------------------------
# the command line

COLOURS = ['\033[41m', '\033[43m', '\033[42m', '\033[46m', '\033[44m', '\033[45m']  # by exit, then final: none


def main(args):
    cfg = configure(DEFAULTS, args)
    dev = init_distributed(cfg['device'])
    ps = ParallelState(cfg['tp'], cfg['pp'])
    if (ps.pp > 1) != (cfg['method'] == 'pipeline'):
        sys.exit(f"method=pipeline runs with pp > 1 (under torchrun) and pp > 1 only with it; got "
                 f"method={cfg['method']!r}, pp={ps.pp}")
    model, ckpt = load_model(cfg['out_dir'], ps, dev, layer_parallel=cfg['layer_parallel'])
    model.eval()
    say = print if ps.is_main else (lambda *a, **k: None)
    mc = model.config
    encode, decode = tokenizer(ckpt.meta, cfg['out_dir'])
    if cfg['prompt_ids'] is not None:
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
    decoder = Decoder(model, cfg['graphs'], cfg['compile'])
    if cfg['serve']:
        if encode is None or ps.world > 1:
            sys.exit('serve needs a checkpoint with a tokenizer, in one process')
        make_server(model, encode, decode, cfg['port'], eot, decoder).serve_forever()
    try:
        allowed = None if cfg['exit_layers'] is None else [mc.exit_index(L) for L in cfg['exit_layers']]
        spec_exit = None if cfg['spec_exit'] is None else mc.exit_index(cfg['spec_exit'])
    except ValueError as e:
        sys.exit(str(e))
    if cfg['method'] == 'speculative' and spec_exit is None:
        sys.exit(f'method=speculative needs --spec_exit=L, one of {list(mc.exit_layers)}')
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
                       cfg['spec_k'], cfg['temperature'], cfg['top_k'], cfg['top_p'], cfg['seed'], eot, show, decoder)
    dt = time.time() - t0
    n = len(out['tokens'])
    depths = out['depths']
    share = {depth_name[d]: round(depths.count(d) / n, 3) for d in sorted(set(depths))}
    mean_depth = sum(depths) / n
    say(f"\n---\n{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s; tokens per exit {share}; mean depth "
          f"{mean_depth:.2f} of {mc.n_layer} blocks (layer-count speedup {mc.n_layer / mean_depth:.2f}x)"
          + (f"; drafts accepted {out['accepted']}/{out['drafted']}" if out['drafted'] else ''))
    if cfg['json']:
        say(_json.dumps({'tokens': out['tokens'], 'depths': depths, 'text': decode(out['tokens']) if decode
                          else None, 'tokens_per_s': n / dt, 'accepted': out['accepted'], 'drafted': out['drafted']}))
    return out


if __name__ == '__main__':
    run(main)
