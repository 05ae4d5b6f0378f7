"""
The decode engine, on token ids: sampling, the Decoder (a static KV cache, blocks in
segments between exits, CUDA graphs, torch.compile) and every decoding method.

    from decode import Decoder, generate
    out = generate(model, prompt_ids, 100, 'recompute', thres=0.8)       # a fresh decoder
    dec = Decoder(model, compile=True)                                   # one kept for many calls
    out = generate(model, prompt_ids, 100, 'speculative', spec_exit=0, decoder=dec)

Methods:
- full: every token runs every layer.
- recompute (EE-LLM, arXiv 2312.04916, KV recomputation): at each allowed exit the exit's
  next-token distribution is computed; if its max probability >= thres the token is emitted
  from it and the deeper layers are skipped. Those layers then lack KV for it; the next
  token that goes deeper first runs them for all such pending tokens in the same forward,
  so the deep KV is exactly what a full forward would produce.
- speculative (self-speculative decoding, LayerSkip, arXiv 2404.16710): draft spec_k tokens
  with the exit spec_exit, then verify them with the remaining layers in one forward that
  reuses the draft's KV of the shared layers. Greedy output is exactly the full model's;
  with sampling, the accept/reject rule (accept) keeps the full model's distribution.
- pipeline (EE-LLM's pipeline-based inference, generate_pipelined, pp > 1): the stage whose
  exit fires sends the token to stage 0 at once; stage 0 starts the next token while later
  stages finish this one's deep layers, so their KV stays complete. Each stage runs its
  blocks with the same Decoder as one process does.

generate() returns depths: the number of blocks each token ran before the head that chose
it (n_layer: the final head); the model's exits are numbered in GPTConfig.exits.
"""

import torch
import torch.distributed as dist

from parallel import all_gather


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


def accept(x, p, q, generator=None):
    """Speculative sampling's rule (Leviathan et al. 2023, arXiv 2211.17192): keep the drafted
    token x with probability min(1, p[x] / q[x]), else draw from max(0, p - q) renormalised,
    where p (V,) is the full model's distribution and q (V,) the draft's. The token that
    comes out is distributed exactly as p. Returns (token, whether x was kept)."""
    if bool(torch.rand(1, generator=generator, device=p.device) * q[x] < p[x]):
        return x, True
    rest = (p - q).clamp(min=0)
    return int(torch.multinomial(rest / rest.sum(), 1, generator=generator)), False


def full_vocab(model, logits):
    """Logits over the whole vocabulary: under tensor parallelism each rank holds a slice."""
    ps = model.ps
    if ps.tp > 1:
        logits = all_gather(logits.contiguous(), logits.dim() - 1, ps.tp_group, ps.tp)
    return logits[..., :model.config.vocab_size]


def confidence(logits):
    """(max prob, argmax, its log prob) of each row of logits (rows, V): (rows, 3)."""
    best, tok = logits.float().log_softmax(-1).max(-1)
    return torch.stack([best.exp(), tok.float(), best], -1)


def direct(fn, *args):
    return fn(*args)


def compile_decode(fn):
    """torch.compile for decoding, with coordinate-descent tuning, with which inductor turns
    the one-row matmuls of a decode step into Triton reductions fused with their neighbours
    (norms, RoPE, SwiGLU); gpt-fast's setting. In one profile on an H100 it took a 7B step
    from 6.85 to 5.74 ms (78% of the memory-bandwidth floor)."""
    import torch._inductor.config
    torch._inductor.config.coordinate_descent_tuning = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(fn, dynamic=False)


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


class Decoder:
    """Batch-1 decoding over a static KV cache, for a model or one pipeline stage of it. The
    blocks run in segments that end where an exit may fire; `done[p]` is how many blocks have
    position p's KV, and `hid` holds p's hidden state at that depth. A token that exits
    leaves the deeper KV of its position missing; the next token to pass that depth brings
    it along (the chunk grows by one position per pending token), so the deep KV is exact.

    With graphs=True (CUDA) each (segment, chunk length, head) is captured as a CUDA graph
    on first use and replayed after: a token costs one graph per segment it runs and one
    read of three numbers per exit decision. Warm-up and capture leave the state as it was.
    With compile=True each block and head runs compiled (compile_decode). The caller keeps
    a decoder to reuse its cache and graphs: start() begins each new sequence."""

    MAX_CHUNK = 16  # longer chunks (long runs of exits) run eagerly: neither compiled nor captured

    def __init__(self, model, graphs=True, compile=False):
        self.model, self.cfg = model, model.config
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.graphs, self.compile = graphs and p.is_cuda, compile
        # this stage's depths: blocks lo..hi-1 (the whole model: 0..n_layer-1); its exits by depth
        self.lo = min(int(i) for i in model.blocks)
        self.hi = max(int(i) + b.width for i, b in model.blocks.items())
        self.exit_at = {i + 1: e for i, es in model.exits_after.items() for e in es}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.t = torch.zeros(1, dtype=torch.long, device=p.device)         # the position being decoded
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=p.device)    # its token
        # each block and head is compiled on its own, once per chunk length (one compilation
        # serves every block of the model, torch >= 2.5)
        self.call = compile_decode(direct) if compile else direct
        self.max_len, self.captured = 0, {}

    def reserve(self, n):
        """Room for sequences of n positions: the cache holds n rounded up to a power of two
        (at least 256, at most block_size); a new size reallocates it and drops the graphs."""
        if n > self.cfg.block_size:
            raise ValueError(f'{n} positions exceed the block_size={self.cfg.block_size} the model was trained for')
        size = min(self.cfg.block_size, max(256, 1 << (n - 1).bit_length()))
        if size != self.max_len:
            self.caches = self.hid = None  # (free the old ones first)
            self.captured = {}
            self.caches = self.model.setup_cache(1, size, self.dtype)
            self.hid = torch.zeros(1, size, self.cfg.n_embd, dtype=self.dtype, device=self.device)
            self.arange = torch.arange(size, device=self.device)
            self.max_len = size

    def start(self, prompt, n, h=None):
        """A new sequence of at most n positions: the prompt but its last token through this
        stage's blocks (h (1, len(prompt) - 1, C): their hidden states from the previous
        stage) and the exits that keep a KV cache. Decoding starts at the last prompt token.
        Returns the prompt's hidden states after this stage's blocks (None if just one token)."""
        self.reserve(n)
        m = self.model
        m.use_cache(self.caches)  # (the model may have run with another cache since)
        self.tokens, k = list(prompt), len(prompt) - 1
        self.done = [self.cfg.n_layer] * k
        if k == 0:
            return None
        pos = self.arange[:k]
        x = m.embed(torch.tensor([self.tokens[:k]], device=self.device), pos)[0] if m.first else h
        rope = m.rope(pos)
        x, taps = m.run_blocks(x, rope, pos, exits=True)
        for e, hidden in taps:
            if m.exits[str(e)].block is not None:
                m.exit_logits(e, hidden, rope, pos)  # (for its KV)
        return x

    def segment(self, a, b, T, head, rows=1):
        """Blocks a..b-1 for the T positions ending at self.t (their hidden states at depth a
        are in hid; at a == 0, T is 1 and it is the new token), then the head at depth b (an
        exit index, 'final', or None for none) on the last `rows` of them. Returns its logits
        (rows, V) and (max prob, argmax, its log prob) per row (rows, 3), or (None, None)."""
        m, call = self.model, self.call if T <= self.MAX_CHUNK else direct
        pos = self.t - (T - 1) + self.arange[:T]                        # (T,)
        h = m.embed(self.tok, pos)[0] if a == 0 else self.hid.index_select(1, pos)  # (1, T, C)
        rope = m.rope(pos)
        for k, block in m.blocks.items():
            if a <= int(k) < b:
                h = call(block, h, rope, pos)
        self.hid.index_copy_(1, pos, h)
        if head is None:
            return None, None
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

    def step(self, allowed, thres, pick=None, stop_depth=None, h=None, decided=False):
        """Process the last token through this stage, bringing every pending position along;
        at each allowed exit (indices), if its max prob >= thres, emit from it. stop_depth: run
        no deeper (drafting). pick(logits (1, V)) -> token; None: greedy. On a pipeline stage
        after the first, h (1, 1, C) is the token's hidden state from the stage before, and
        decided says an earlier stage has emitted it: then only the KV is computed here.
        Returns (token, depth it left at, {depth: max prob}, its logits (1, V), the log prob
        of the token), or None when the token leaves this stage undecided (its hidden state
        is then in hid)."""
        L, t = self.cfg.n_layer, len(self.tokens) - 1
        self.t.fill_(t)
        if h is None:
            self.tok.fill_(self.tokens[t])
        else:
            self.hid[:, t] = h[:, -1]
        self.done.append(self.lo)
        if decided:  # only this stage's exits that keep a KV cache run, and none decides
            kv = {e for e in self.exit_at.values() if self.model.exits[str(e)].block is not None}
            allowed, thres = allowed & kv, float('inf')
        bounds = sorted({d for d, e in self.exit_at.items() if e in allowed} | {stop_depth or self.hi})
        probs, a = {}, self.lo
        for b in bounds:  # (it returns at the last bound at the latest)
            start = t  # positions that need block a form a suffix: those stopped at depth <= a
            while start > 0 and self.done[start - 1] <= a:
                start -= 1
            head = self.exit_at.get(b) if b < L else None if decided else 'final'
            logits, out = self.run(a, b, t + 1 - start, head)
            self.done[start:] = [b] * (t + 1 - start)
            if head is None:  # the end of this stage, undecided (or decided before it)
                return None
            p, best, lp = out[-1].tolist()  # the one read per exit decision
            if b < L:
                probs[b] = p
            if b == L or p >= thres or b == stop_depth:
                tok = int(best) if pick is None else pick(logits)
                if tok != int(best):
                    lp = float(logits.float().log_softmax(-1)[0, tok])
                return tok, b, probs, logits, lp
            a = b


def span(prompt, max_new_tokens, method, spec_k, block_size):
    """Positions a generation needs (speculation drafts up to spec_k past the last token)."""
    n = len(prompt) + max_new_tokens + (spec_k if method == 'speculative' else 0)
    if n > block_size:
        raise ValueError(f'{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens}'
                         + (f' + spec_k={spec_k}' if method == 'speculative' else '')
                         + f' exceed the block_size={block_size} the model was trained for')
    return n


@torch.no_grad()
def generate(model, prompt, max_new_tokens, method='full', thres=None, allowed=None, spec_exit=None, spec_k=4,
             temperature=0.0, top_k=None, top_p=None, seed=None, stop=None, on_token=None, decoder=None):
    """Returns {'tokens', 'depths' (blocks each token ran before its head; n_layer = final),
    'max_probs' ({depth: max prob} per token), 'logprobs' (of each token under the head that
    chose it), 'accepted', 'drafted' (speculative)}. allowed: exit indices that may fire
    (None: all); spec_exit: the drafting exit's index. decoder: a Decoder of this model to
    reuse (its cache, CUDA graphs and compiled code); None: a new one (CUDA graphs on CUDA)."""
    cfg, L = model.config, model.config.n_layer
    if method not in ('full', 'recompute', 'speculative'):
        raise ValueError(f"method={method!r}; allowed: 'full', 'recompute', 'speculative'")
    if method == 'speculative':
        if not (isinstance(spec_k, int) and spec_k >= 1):
            raise ValueError(f'spec_k={spec_k!r}; allowed: an int >= 1 (tokens drafted per verification)')
        if spec_exit not in range(len(cfg.exits)):
            raise ValueError(f'spec_exit={spec_exit!r}: the drafting exit\'s index; allowed: 0..{len(cfg.exits) - 1}')
    allowed = set(range(len(cfg.exit_layers))) if allowed is None else set(allowed)
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed) if seed is not None else None
    pick = None if temperature == 0 else lambda logits: int(sample(logits, temperature, top_k, top_p, gen)[0])
    dec = Decoder(model) if decoder is None else decoder
    assert dec.model is model, 'the decoder belongs to another model'
    dec.start(prompt, span(prompt, max_new_tokens, method, spec_k, cfg.block_size))
    out = {'tokens': [], 'depths': [], 'max_probs': [], 'logprobs': [], 'drafted': 0, 'accepted': 0}

    def emit(tok, depth, probs, logprob):
        dec.tokens.append(tok)
        out['tokens'].append(tok)
        out['depths'].append(depth)
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
                return out
    d = cfg.exits[spec_exit].depth
    dist_of = lambda logits: distribution(logits, temperature, top_k, top_p)[0]
    while True:
        n = len(dec.tokens)
        drafts, qs = [], []
        for _ in range(spec_k):  # draft with the exit (layers < d, the shared KV)
            tok, _, _, logits, _ = dec.step(set(), float('inf'), pick, stop_depth=d)
            drafts.append(tok)
            qs.append(dist_of(logits) if temperature else None)
            dec.tokens.append(tok)
        del dec.tokens[n:]
        # verify: the remaining layers for the k drafted positions n-1.. in one forward
        full, best = dec.verify(d, spec_k)  # (k, V): the full model after each position
        best = best.tolist()
        out['drafted'] += spec_k
        for j in range(spec_k):
            if temperature == 0:  # greedy: keep the draft while it is the full model's argmax
                want, logprob = int(best[j][1]), best[j][2]
                ok = want == drafts[j]
            else:
                want, ok = accept(drafts[j], dist_of(full[j:j + 1]), qs[j], gen)
                logprob = float(full[j].float().log_softmax(-1)[want])
            out['accepted'] += ok
            finished = emit(want, d if ok else L, {}, logprob)
            if finished or not ok:
                break
        del dec.done[len(dec.tokens) - 1:]  # positions past the last committed token are redone
        if finished:
            return out


class Message:
    """What a pipeline stage says about a token, to the next stage and to stage 0: four longs
    (decided, token, depth, stop), sent as one tensor. stop: generation is over."""

    @staticmethod
    def pack(decided=False, token=-1, depth=0, stop=False, device='cpu'):
        return torch.tensor([int(decided), token, depth, int(stop)], device=device)

    @staticmethod
    def unpack(t):
        decided, token, depth, stop = t.tolist()
        return bool(decided), token, depth, bool(stop)


@torch.no_grad()
def generate_pipelined(model, prompt, max_new_tokens, thres=None, allowed=None, ps=None, temperature=0.0,
                       top_k=None, top_p=None, seed=None, stop=None, decoder=None):
    """EE-LLM's pipeline-based early-exit inference, every rank of a pp group calling it with
    its stage. Every token runs through every stage, so the deep KV is always complete; but
    the stage whose exit fires sends the token to stage 0 at once, and stage 0 starts the
    next token while the later stages finish this one. Stage 0 returns {'tokens', 'depths'}
    as generate() does; the other stages return None."""
    cfg, s, P = model.config, ps.pp_rank, ps.pp
    dec = Decoder(model) if decoder is None else decoder
    dev, C = dec.device, cfg.n_embd
    allowed = set(range(len(cfg.exit_layers))) if allowed is None else set(allowed)
    thres = float('inf') if thres is None else thres
    gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
    pick = None if temperature == 0 else lambda logits: int(sample(logits, temperature, top_k, top_p, gen)[0])
    sends = []
    send = lambda t, stage: sends.append(dist.isend(t.contiguous(), ps.stage_rank(stage)))

    def recv(shape, dtype, stage):
        buf = torch.empty(shape, dtype=dtype, device=dev)
        dist.recv(buf, ps.stage_rank(stage))
        return buf

    n0 = len(prompt) - 1
    h = recv((1, n0, C), dec.dtype, s - 1) if n0 and not model.first else None
    h = dec.start(prompt, span(prompt, max_new_tokens, 'full', 0, cfg.block_size), h)  # the prefill
    if n0 and not model.last:
        send(h, s + 1)
    out = {'tokens': [], 'depths': [], 'drafted': 0, 'accepted': 0}
    read = [0] * P  # stage 0: reports read from each stage
    while True:
        t = len(dec.tokens) - 1
        decided, h = False, None
        if not model.first:
            decided, _, _, halt = Message.unpack(recv((4,), torch.long, s - 1))
            if halt:  # pass it on
                if not model.last:
                    send(Message.pack(stop=True, device=dev), s + 1)
                break
            h = recv((1, 1, C), dec.dtype, s - 1)
        choice = dec.step(allowed, thres, pick, h=h, decided=decided)
        msg = Message.pack(choice is not None, *(choice[:2] if choice else (-1, 0)), device=dev)
        if not model.last:
            send(Message.pack(decided or choice is not None, device=dev), s + 1)
            send(dec.hid[:, t:t + 1].clone(), s + 1)
        if not model.first:  # every stage reports each token to stage 0, decided here or not
            send(msg, 0)
            dec.tokens.append(None)  # (only stage 0 knows the tokens; the others count positions)
            continue
        steps = t - n0 + 1
        if choice is None:  # wait for the stage that decides (stages after it are still working)
            for q in range(1, P):
                while read[q] < steps:
                    got, tok, depth, _ = Message.unpack(recv((4,), torch.long, q))
                    read[q] += 1
                if got:
                    choice = (tok, depth)
                    break
        tok, depth = choice[:2]
        dec.tokens.append(tok)
        out['tokens'].append(tok)
        out['depths'].append(depth)
        if len(out['tokens']) >= max_new_tokens or tok == stop:
            if P > 1:
                send(Message.pack(stop=True, device=dev), 1)
            for q in range(1, P):  # the reports not needed yet
                while read[q] < steps:
                    recv((4,), torch.long, q)
                    read[q] += 1
            break
    for w in sends:
        w.wait()
    return out if model.first else None
