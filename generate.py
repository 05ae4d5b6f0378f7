"""
Generate from a trained checkpoint, with KV-cached early exit.

    python generate.py --out_dir=out-pystdlib --prompt="def main(" --max_new_tokens=200
    python generate.py --out_dir=out-pystdlib --early_exit_thres=0.8 --show_exits
    python generate.py --out_dir=out-pystdlib --method=speculative --spec_exit=2 --spec_k=4
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --tp=2 --early_exit_thres=0.8
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --pp=2 --method=pipeline --early_exit_thres=0.8
    python generate.py --out_dir=out-pystdlib --serve --port=5000     # PUT /api, EE-LLM's fields
    torchrun --nproc_per_node=2 generate.py --out_dir=out-pystdlib --tp=2 --layer_parallel=[2,4]

Methods:
- full: every token runs every layer (static KV cache, one-token decode).
- recompute (EE-LLM, arXiv 2312.04916, KV recomputation): at each allowed exit the exit's
  next-token distribution is computed; if its max probability >= early_exit_thres the token
  is emitted from it and the deeper layers are skipped. Those layers then lack KV for it;
  the next token that goes deeper first runs them for all such pending tokens in the same
  forward, so the deep KV is exactly what a full forward would produce.
- pipeline (EE-LLM's pipeline-based inference, pp > 1 under torchrun): the stage whose
  exit fires sends the token to stage 0 at once; stage 0 starts the next token while later
  stages finish this one's deep layers, so their KV stays complete.
- speculative (self-speculative decoding, LayerSkip, arXiv 2404.16710): draft spec_k tokens
  with the exit spec_exit, then verify them with the remaining layers in one forward that
  reuses the draft's KV of the shared layers. Greedy output is exactly the full model's;
  with sampling, the accept/reject rule keeps the full model's distribution.

On CUDA (--graphs=True, the default) the blocks between two exits run as one replayed CUDA
graph (Decoder), and an exit decision costs one small read from the device; with
--compile=True each block and head is compiled by torch.compile first.

Any method runs with --layer_parallel=[start,end): those blocks run in side-by-side pairs
(model.Block), which at tp=2 halves the all-reduces of the span; a checkpoint tuned for
pairs (tune.py) runs with its own span by default.
"""

import json as _json  # (json is a key below)
import os
import sys
import time

import torch
import torch.distributed as dist

from parallel import ParallelState, all_gather, init_distributed
from train import configure, load_model

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
json = False                    # end with one JSON line (tokens, exit layers, text, tokens/s)
tp = 1                          # tensor-parallel ranks (under torchrun)
pp = 1                          # pipeline stages (under torchrun; method='pipeline')
layer_parallel = None           # [start, end): run these blocks in parallel pairs; None: as saved
graphs = True                   # on CUDA: replay each segment of blocks between exits as a CUDA graph
compile = False                 # torch.compile each block and head first (slow to start, faster per token)
serve = False                   # answer PUT /api (EE-LLM's request fields) instead of one prompt
port = 5000
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items()
            if not k.startswith('_') and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def distribution(logits, temperature, top_k=None, top_p=None):
    """The sampling distribution (B, V) of logits (B, V): temperature, then top-k, then top-p."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float('-inf'))
    return logits.softmax(-1)


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token from logits (B, V): greedy at temperature 0, else from distribution()."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(distribution(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]


def full_vocab(model, logits):
    """Logits over the whole vocabulary: under tensor parallelism each rank holds a slice."""
    ps = model.ps
    if ps.tp > 1:
        logits = all_gather(logits.contiguous(), logits.dim() - 1, ps.tp_group, ps.tp)
    return logits[..., :model.config.vocab_size]


class Decoder:
    """Batch-1 decoding over a static KV cache of max_len positions. The blocks run in
    segments that end where an exit may fire; `done[p]` is how many blocks have position
    p's KV, and `hid` holds p's hidden state at that depth. A token that exits leaves the
    deeper KV of its position missing; the next token to pass that depth brings it along
    (the chunk grows by one position per pending token), so the deep KV is exact.

    With graphs=True (CUDA) each (segment, chunk length, head) is captured as a CUDA graph
    on first use and replayed after: a token costs one graph per segment it runs and one
    read of three numbers per exit decision. Warm-up and capture leave the state as it was.
    With compile=True each block and head runs compiled (compile_decode).
    A decoder is reusable: start() begins a new sequence over the same cache and graphs."""

    MAX_CHUNK = 16  # longer chunks (long runs of exits) run eagerly: neither compiled nor captured

    def __init__(self, model, max_len, graphs=False, compile=False):
        self.model, self.cfg, self.max_len = model, model.config, max_len
        p = next(model.parameters())
        model.setup_cache(1, max_len, dtype=p.dtype)
        self.cache = [(m, m.cache_k, m.cache_v) for m in model.modules() if getattr(m, 'cache_k', None) is not None]
        self.hid = torch.zeros(1, max_len, self.cfg.n_embd, dtype=p.dtype, device=p.device)
        self.t = torch.zeros(1, dtype=torch.long, device=p.device)         # the position being decoded
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=p.device)    # its token
        self.arange = torch.arange(max_len, device=p.device)
        self.exit_at = {d: e for e, d in enumerate(self.cfg.exit_depths)}
        self.graphs, self.compile = graphs and p.is_cuda, compile
        self.captured, self.pool = {}, torch.cuda.graph_pool_handle() if self.graphs else None
        # each block and head is compiled on its own, once per chunk length (one compilation
        # serves every block of the model, torch >= 2.5)
        self.call = compile_decode(direct) if compile else direct

    def start(self, prompt):
        """A new sequence: the prompt but its last token through every layer and every exit
        (exits with a block need its KV). Decoding starts at the last prompt token."""
        for m, k, v in self.cache:  # (the model may have run with another cache since)
            m.cache_k, m.cache_v = k, v
        self.tokens, n = list(prompt), len(prompt) - 1
        if n > 0:
            dev = self.t.device
            self.model(torch.tensor([self.tokens[:n]], device=dev), exits=True, input_pos=torch.arange(n, device=dev))
        self.done = [self.cfg.n_layer] * n

    def segment(self, a, b, T, head, rows=1):
        """Blocks a..b-1 for the T positions ending at self.t (their hidden states at depth a
        are in hid; at a == 0, T is 1 and it is the new token), then the head at depth b (an
        exit index, or 'final') on the last `rows` of them. Returns its logits (rows, V) and
        (max prob, argmax, its log prob) per row (rows, 3)."""
        m, call = self.model, self.call if T <= self.MAX_CHUNK else direct
        pos = self.t - (T - 1) + self.arange[:T]                        # (T,)
        h = m.embed(self.tok, pos)[0] if a == 0 else self.hid.index_select(1, pos)  # (1, T, C)
        rope = m.rope(pos)
        for k, block in m.blocks.items():
            if a <= int(k) < b:
                h = call(block, h, rope, pos)
        self.hid.index_copy_(1, pos, h)
        if head == 'final':
            logits = call(m.final_logits, h[:, -rows:])
        else:  # an exit with a block keeps a KV cache: it runs for every position of the chunk
            sel = slice(None) if m.exits[str(head)].block is not None else slice(T - rows, None)
            logits = call(m.exit_logits, head, h[:, sel], m.rope(pos[sel]), pos[sel])[:, -rows:]
        logits = full_vocab(m, logits[0])                                # (rows, V)
        return logits, call(confidence, logits)

    def run(self, a, b, T, head, rows=1):
        """segment(), compiled and as a CUDA graph where it can be."""
        fn = lambda: self.segment(a, b, T, head, rows)
        if not self.graphs or T > self.MAX_CHUNK:
            return fn()
        key = (a, b, T, head, rows)
        if key not in self.captured:
            saved = self.hid.clone()
            self.captured[key] = capture(fn, pool=self.pool)
            self.hid.copy_(saved)  # undo the warm-up (its KV writes repeat with the same values)
        graph, outs = self.captured[key]
        graph.replay()
        return outs

    def verify(self, d, k):
        """Self-speculation's check: blocks d.. and the final head for the last committed
        token and the k - 1 drafted after it (the drafting left their KV below d). Returns
        the logits (k, V) and (max prob, argmax, its log prob) per row (k, 3)."""
        L, n = self.cfg.n_layer, len(self.tokens)
        self.t.fill_(n + k - 2)
        out = self.run(d, L, k, 'final', rows=k)
        self.done[n - 1:] = [L] * k
        return out

    def step(self, allowed, thres, pick=None, stop_depth=None):
        """Process the last token, bringing every pending position along; at each allowed
        exit (indices), if its max prob >= thres, emit from it. stop_depth: run no deeper
        (drafting). pick(logits (1, V)) -> token; None: greedy. Returns (token, depth it
        left at, {depth: max prob}, its logits (1, V), the log prob of the token)."""
        L, t = self.cfg.n_layer, len(self.tokens) - 1
        self.t.fill_(t)
        self.tok.fill_(self.tokens[t])
        self.done.append(0)
        bounds = sorted({d for d, e in self.exit_at.items() if e in allowed} | {stop_depth or L, L})
        probs, a = {}, 0
        for b in bounds:  # (it returns at stop_depth at the latest: a bound)
            start = t  # positions that need block a form a suffix: those stopped at depth <= a
            while start > 0 and self.done[start - 1] <= a:
                start -= 1
            logits, out = self.run(a, b, t + 1 - start, 'final' if b == L else self.exit_at[b])
            self.done[start:] = [b] * (t + 1 - start)
            p, best, lp = out[-1].tolist()  # the one read per exit decision
            if b < L:
                probs[b] = p
            if b == L or p >= thres or b == stop_depth:
                tok = int(best) if pick is None else pick(logits)
                if tok != int(best):
                    lp = float(logits.float().log_softmax(-1)[0, tok])
                return tok, b, probs, logits, lp
            a = b


def capture(fn, warmup=1, pool=None):
    """fn captured as a CUDA graph: (graph, fn's outputs, which each replay refills). The
    warm-up runs (compilation, lazy initialisation, NCCL communicators, cuBLAS handles)
    happen on a side stream first, as capture requires; the capture itself runs nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outs = fn()
    return graph, outs


def direct(fn, *args):
    return fn(*args)


def confidence(logits):
    """(max prob, argmax, its log prob) of each row of logits (rows, V): (rows, 3)."""
    best, tok = logits.float().log_softmax(-1).max(-1)
    return torch.stack([best.exp(), tok.float(), best], -1)


def compile_decode(fn):
    """torch.compile for decoding, with coordinate-descent tuning, with which inductor turns
    the one-row matmuls of a decode step into Triton reductions fused with their neighbours
    (norms, RoPE, SwiGLU); gpt-fast's setting. In one profile on an H100 it took a 7B step
    from 6.85 to 5.74 ms (78% of the memory-bandwidth floor)."""
    import torch._inductor.config
    torch._inductor.config.coordinate_descent_tuning = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(fn, dynamic=False)


def decoder(model, max_len, graphs=True, compile=False):
    """The model's Decoder for sequences up to max_len (rounded up to a power of two, at least
    256, at most block_size), kept on the model so that its cache and CUDA graphs serve every
    later call of that size and kind."""
    max_len = min(model.config.block_size, max(256, 1 << (max_len - 1).bit_length()))
    dec = getattr(model, 'decoder', None)
    graphs = graphs and next(model.parameters()).is_cuda
    if dec is None or (dec.max_len, dec.graphs, dec.compile) != (max_len, graphs, compile):
        model.decoder = None  # (free the old cache first)
        model.decoder = Decoder(model, max_len, graphs, compile)
    return model.decoder


@torch.no_grad()
def generate(model, prompt, max_new_tokens, method='full', thres=None, allowed=None, spec_exit=None, spec_k=4,
             temperature=0.0, top_k=None, top_p=None, seed=None, stop=None, on_token=None, graphs=True,
             compile=False):
    """Returns {'tokens', 'exit_layers' (depth each token left at; n_layer = final head),
    'max_probs' ({depth: max prob} per token), 'logprobs' (of each token under the head that
    chose it), 'accepted', 'drafted' (speculative)}. graphs: on CUDA, replay each segment of
    blocks as a CUDA graph; compile: torch.compile each block and head first (see Decoder)."""
    cfg, L = model.config, model.config.n_layer
    allowed = set(range(len(cfg.exit_layers))) if allowed is None else set(allowed)
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed) if seed is not None else None
    pick = None if temperature == 0 else lambda logits: int(sample(logits, temperature, top_k, top_p, gen)[0])
    max_len = len(prompt) + max_new_tokens + (spec_k if method == 'speculative' else 0)
    if max_len > cfg.block_size:
        raise ValueError(f'{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens}'
                         + (f' + spec_k={spec_k}' if method == 'speculative' else '')
                         + f' exceed the block_size={cfg.block_size} the model was trained for')
    dec = decoder(model, max_len, graphs, compile)
    dec.start(prompt)
    out = {'tokens': [], 'exit_layers': [], 'max_probs': [], 'logprobs': [], 'drafted': 0, 'accepted': 0}

    def emit(tok, depth, probs, logprob):
        dec.tokens.append(tok)
        out['tokens'].append(tok)
        out['exit_layers'].append(depth)
        out['max_probs'].append(probs)
        out['logprobs'].append(logprob)
        if on_token:
            on_token(tok, depth, probs)
        return len(out['tokens']) >= max_new_tokens or tok == stop

    if method in ('full', 'recompute'):
        thres = float('inf') if (method == 'full' or thres is None) else thres
        while True:
            tok, depth, probs, _, logprob = dec.step(allowed if thres != float('inf') else set(), thres, pick)
            if emit(tok, depth, probs, logprob):
                break
    elif method == 'speculative':
        d = cfg.exit_depths[spec_exit]
        dist = lambda logits: distribution(logits, temperature, top_k, top_p)[0]
        while True:
            n = len(dec.tokens)
            drafts, qs = [], []
            for _ in range(spec_k):  # draft with the exit (layers < d, the shared KV)
                tok, _, _, logits, _ = dec.step(set(), float('inf'), pick, stop_depth=d)
                drafts.append(tok)
                qs.append(dist(logits) if temperature else None)
                dec.tokens.append(tok)
            del dec.tokens[n:]
            # verify: the remaining layers for the k drafted positions n-1.. in one forward
            full, best = dec.verify(d, spec_k)  # (k, V): the full model after each position
            best = best.tolist()
            out['drafted'] += spec_k
            finished = False
            for j in range(spec_k):
                if temperature == 0:  # greedy: keep the draft while it is the full model's argmax
                    want, logprob = int(best[j][1]), best[j][2]
                    ok = want == drafts[j]
                else:  # accept with prob min(1, p/q), else draw from max(0, p - q) (Leviathan et al. 2023)
                    p, q, x = dist(full[j:j + 1]), qs[j], drafts[j]
                    ok = bool(torch.rand(1, generator=gen, device=p.device) * q[x] < p[x])
                    rest = (p - q).clamp(min=0)
                    want = x if ok else int(torch.multinomial(rest / rest.sum(), 1, generator=gen))
                    logprob = float(full[j].float().log_softmax(-1)[want])
                out['accepted'] += ok
                if emit(want, d if ok else L, {}, logprob):
                    finished = True
                    break
                if not ok:
                    break
            del dec.done[len(dec.tokens) - 1:]  # positions past the last committed token are redone
            if finished:
                break
    else:
        raise ValueError(f"method={method!r}; allowed: 'full', 'recompute', 'speculative'")
    return out


@torch.no_grad()
def generate_pipelined(model, prompt, max_new_tokens, thres=None, allowed=None, ps=None, temperature=0.0,
                       top_k=None, top_p=None, seed=None, stop=None):
    """EE-LLM's pipeline-based early-exit inference, every rank of a pp group calling it with
    its stage. Every token runs through every stage, so the deep KV is always complete; but
    the stage whose exit fires sends the token to stage 0 at once, and stage 0 starts the
    next token while the later stages finish this one. Stage 0 returns {'tokens',
    'exit_layers'} as generate() does; the other stages return None."""
    cfg, s, P = model.config, ps.pp_rank, ps.pp
    dev, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    allowed = set(range(len(cfg.exit_layers))) if allowed is None else set(allowed)
    thres = float('inf') if thres is None else thres
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    pick = lambda logits: int(sample(logits, temperature, top_k, top_p, gen)[0])
    if len(prompt) + max_new_tokens > cfg.block_size:
        raise ValueError(f'{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens} exceed the '
                         f'block_size={cfg.block_size} the model was trained for')
    model.setup_cache(1, len(prompt) + max_new_tokens, dtype=dtype)
    sends = []
    send = lambda t, stage: sends.append(dist.isend(t.contiguous(), ps.stage_rank(stage)))

    def recv(shape, dtype, stage):
        buf = torch.empty(shape, dtype=dtype, device=dev)
        dist.recv(buf, ps.stage_rank(stage))
        return buf

    def run(h, pos, decided):
        """This stage's blocks; exits that keep KV (a block) always run, the others only to decide."""
        rope = model.rope(pos)
        choice = None
        for i, block in model.blocks.items():
            h = block(h, rope, pos)
            d = int(i) + block.width  # the depth after this block (or pair)
            for e in model.exits_after.get(d - 1, ()):
                fires = not decided and choice is None and e in allowed
                if model.exits[str(e)].block is not None or fires:
                    logits = full_vocab(model, model.exit_logits(e, h, rope, pos)[:, -1])
                    if fires and logits.float().softmax(-1).max().item() >= thres:
                        choice = (pick(logits), d, logits)
        return h, choice

    n0, C = len(prompt) - 1, cfg.n_embd
    if n0 > 0:  # prefill
        pos = torch.arange(n0, device=dev)
        h = model.embed(torch.tensor([prompt[:-1]], device=dev), pos)[0] if model.first else recv((1, n0, C), dtype, s - 1)
        h, _ = run(h, pos, decided=True)
        if not model.last:
            send(h, s + 1)
    tokens, out = list(prompt), {'tokens': [], 'exit_layers': [], 'drafted': 0, 'accepted': 0}
    read = [0] * P  # stage 0: decision messages read from each stage
    steps = 0
    while True:
        t = n0 + steps
        pos = torch.tensor([t], device=dev)
        if model.first:
            info = torch.tensor([0, -1, 0, 0], device=dev)  # decided, token, depth, stop
            h = model.embed(torch.tensor([[tokens[t]]], device=dev), pos)[0]
        else:
            info = recv((4,), torch.long, s - 1)
            if info[3]:  # stop: pass it on
                if not model.last:
                    send(info, s + 1)
                break
            h = recv((1, 1, C), dtype, s - 1)
        h, choice = run(h, pos, decided=bool(info[0]))
        if choice is None and model.last and not info[0]:
            logits = full_vocab(model, model.final_logits(h)[:, -1])
            choice = (pick(logits), cfg.n_layer, logits)
        if choice is not None:
            info = torch.tensor([1, choice[0], choice[1], 0], device=dev)
        if not model.last:
            send(info, s + 1)
            send(h, s + 1)
        if not model.first:  # every stage reports each token to stage 0: decided here or not
            send(torch.tensor([int(choice is not None), choice[0] if choice else -1,
                               choice[1] if choice else 0], device=dev), 0)
        steps += 1
        if not model.first:
            continue
        if choice is None:  # wait for the stage that decides (stages after it are still working)
            for q in range(1, P):
                while read[q] < steps:
                    msg = recv((3,), torch.long, q)
                    read[q] += 1
                if msg[0]:
                    choice = (int(msg[1]), int(msg[2]), None)
                    break
        tok, depth, _ = choice
        tokens.append(tok)
        out['tokens'].append(tok)
        out['exit_layers'].append(depth)
        if len(out['tokens']) >= max_new_tokens or tok == stop:
            if P > 1:
                send(torch.tensor([0, -1, 0, 1], device=dev), 1)
            for q in range(1, P):  # the reports not needed yet
                while read[q] < steps:
                    recv((3,), torch.long, q)
                    read[q] += 1
            break
    for w in sends:
        w.wait()
    model.clear_cache()
    return out if model.first else None


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


def api_request(model, encode, decode, body, eot=None):
    """One /api request (raw bytes) -> (HTTP status, response dict). Bad input is a 400
    whose message names the field and what is allowed."""
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
    index = {L: e for e, L in enumerate(cfg.exit_layers)}
    bad = [L for L in req.get('exit_layers', []) if L not in index]
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
                       else None, [index[L] for L in req['exit_layers']] if 'exit_layers' in req else None,
                       temperature=0.0 if top_k == 1 else req.get('temperature', 0.0), top_k=top_k or None,
                       top_p=req.get('top_p') or None, seed=req.get('random_seed'), stop=eot) if n else \
            {'tokens': [], 'logprobs': [], 'max_probs': []}
        texts.append(decode(ids + out['tokens']))
        segments.append([decode([t]) for t in ids + out['tokens']])
        logprobs.append(out['logprobs'])
        max_probs.append([{str(d): p for d, p in probs.items()} for probs in out['max_probs']])
    resp = {'text': texts, 'segments': segments, 'logprobs': logprobs if req.get('logprobs') else None}
    if req.get('print_max_prob'):
        resp['max_probs'] = max_probs
    return 200, resp


def make_server(model, encode, decode, port, eot=None):
    """A one-request-at-a-time HTTP server (the model and its cache are not shared)."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            if self.path != '/api':
                return self.reply(404, {'error': f'no such path {self.path}; use PUT /api'})
            size = int(self.headers.get('Content-Length') or 0)
            if size > MAX_REQUEST_BYTES:
                return self.reply(400, {'error': f'the request has {size} bytes; at most {MAX_REQUEST_BYTES}'})
            try:
                self.reply(*api_request(model, encode, decode, self.rfile.read(size), eot))
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

def tokenizer(meta, out_dir='.'):
    """(encode, decode) from the checkpoint's data meta: bytes, tiktoken's gpt2, or a
    Hugging Face tokenizer.json kept beside the checkpoint (needs the tokenizers package)."""
    name = (meta.get('data') or {}).get('tokenizer')
    if name == 'bytes':
        return (lambda s: list(s.encode('utf-8'))), (lambda ids: bytes(ids).decode('utf-8', errors='replace'))
    if name == 'gpt2':
        import tiktoken
        enc = tiktoken.get_encoding('gpt2')
        return (lambda s: enc.encode(s, allowed_special={'<|endoftext|>'})), enc.decode
    if name == 'tokenizer.json':
        try:
            from tokenizers import Tokenizer
        except ImportError:
            sys.exit('this checkpoint has a Hugging Face tokenizer.json: pip install tokenizers, or give --prompt_ids')
        tok = Tokenizer.from_file(os.path.join(out_dir, name))
        return (lambda s: tok.encode(s).ids), tok.decode
    return None, None


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
    if cfg['serve']:
        if encode is None or ps.world > 1:
            sys.exit('serve needs a checkpoint with a tokenizer, in one process')
        make_server(model, encode, decode, cfg['port'], eot).serve_forever()
    index = {L: e for e, L in enumerate(mc.exit_layers)}
    pick_exits = lambda Ls: None if Ls is None else [index[L] for L in Ls]
    for L in list(cfg['exit_layers'] or []) + ([cfg['spec_exit']] if cfg['spec_exit'] is not None else []):
        if L not in index:
            sys.exit(f'exit layer {L} is not one of the model\'s exit_layers {list(mc.exit_layers)}')
    if cfg['method'] == 'speculative' and cfg['spec_exit'] is None:
        sys.exit(f'method=speculative needs --spec_exit=L, one of {list(mc.exit_layers)}')
    depth_name = {d: f'exit {L}' for L, d in zip(mc.exit_layers, mc.exit_depths)}
    depth_name[mc.n_layer] = 'final'
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
        out = generate_pipelined(model, ids, cfg['max_new_tokens'], cfg['early_exit_thres'],
                                 pick_exits(cfg['exit_layers']), ps, cfg['temperature'], cfg['top_k'], cfg['top_p'],
                                 cfg['seed'], eot)
        if out is None:
            return None
        for tok, depth in zip(out['tokens'], out['exit_layers']):
            show(tok, depth, {})
    else:
        out = generate(model, ids, cfg['max_new_tokens'], cfg['method'], cfg['early_exit_thres'],
                       pick_exits(cfg['exit_layers']), index.get(cfg['spec_exit']), cfg['spec_k'], cfg['temperature'],
                       cfg['top_k'], cfg['top_p'], cfg['seed'], eot, show, cfg['graphs'], cfg['compile'])
    dt = time.time() - t0
    n = len(out['tokens'])
    depths = out['exit_layers']
    share = {depth_name[d]: round(depths.count(d) / n, 3) for d in sorted(set(depths))}
    mean_depth = sum(depths) / n
    say(f"\n---\n{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s; tokens per exit {share}; mean depth "
          f"{mean_depth:.2f} of {mc.n_layer} blocks (layer-count speedup {mc.n_layer / mean_depth:.2f}x)"
          + (f"; drafts accepted {out['accepted']}/{out['drafted']}" if out['drafted'] else ''))
    if cfg['json']:
        say(_json.dumps({'tokens': out['tokens'], 'exit_layers': depths, 'text': decode(out['tokens']) if decode
                          else None, 'tokens_per_s': n / dt, 'accepted': out['accepted'], 'drafted': out['drafted']}))
    return out


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
