"""
The decode engine, on token ids: sampling, the Decoder (a static KV cache, blocks in
segments between exits, CUDA graphs, torch.compile) and every decoding method.

    from decode import Decoder, generate, generate_many
    out = generate(model, prompt_ids, 100, 'recompute', thres=0.8)       # a fresh decoder
    dec = Decoder(model, compile=True)                                   # one kept for many calls
    out = generate(model, prompt_ids, 100, 'speculative', spec_exit=0, decoder=dec)
    outs = generate_many(model, prompts, 100, 'recompute', thres=0.8, batch_size=8)

Every method runs on a batch of rows, each row its own sequence deciding for itself (its
exits, its drafts' acceptance, its own sampling generator), so that each row's output is
the one it has decoded alone; run_jobs() feeds rows continuously (the server's loop).

Methods:
- full: every token runs every layer.
- recompute (EE-LLM, arXiv 2312.04916, KV recomputation): at each allowed exit the exit's
  next-token distribution is computed; if its max probability >= thres the token is emitted
  from it and the deeper layers are skipped. Those layers then lack KV for it; the next
  token that goes deeper first runs them for all such pending tokens in the same forward,
  so the deep KV is exactly what a full forward would produce.
- speculative (self-speculative decoding, LayerSkip, arXiv 2404.16710): draft spec_k tokens
  with the exit spec_exit, then verify them with the remaining layers in one forward that
  reuses the draft's KV of the shared layers. Greedy output is exactly the full model's
  (in float32: in bfloat16 a forward of k positions rounds differently from k forwards of
  one, and a near-tie can flip); with sampling, the accept/reject rule (accept) keeps the
  full model's distribution.
- pipeline (EE-LLM's pipeline-based inference, generate_pipelined, pp > 1): the stage whose
  exit fires sends the token to stage 0 at once; stage 0 starts the next token while later
  stages finish this one's deep layers, so their KV stays complete. Each stage runs its
  blocks with the same Decoder as one process does.

generate() returns depths: the number of blocks each token ran before the head that chose
it (n_layer: the final head); the model's exits are numbered in GPTConfig.exits.
"""

import math

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


def upload(values, out):
    """A host list copied into the tensor out (returned) without making the host wait for the
    device (CUDA: from pinned memory; the copy runs in stream order)."""
    if not out.is_cuda:
        return out.copy_(torch.tensor(values, dtype=out.dtype))
    return out.copy_(torch.tensor(values, dtype=out.dtype, pin_memory=True), non_blocking=True)


def fetch(t):
    """A copy of t on the host that does not wait for the device (CUDA: pinned memory, in
    stream order; read it after an event recorded later on the stream has completed)."""
    if not t.is_cuda:
        return t.clone()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


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
    """Decoding over a static KV cache for batch_size rows at once, each row a sequence of its
    own (its own length and positions; a row can be refilled while the others go on), for a
    model or one pipeline stage of it. The blocks run in segments that end where an exit may
    fire; `done[r][p]` is how many blocks have row r's position p in their KV, and `hid`
    holds p's hidden state at that depth. A token that exits leaves the deeper KV of its
    position missing; the next token of its row to pass that depth brings it along (its
    chunk grows by one position per pending token), so the deep KV is exact.

    A segment runs every row at once, each on its own chunk of positions, right-aligned and
    padded on the left to the longest chunk; padding, rows without a chunk and idle rows
    point at a spare cache slot past the positions in use, which no real position attends
    to. (Running a row for nothing costs little: at decode sizes a step is bound by reading
    the weights, which happens once for the whole batch.) Every row of a step decides for
    itself: one read from the device per segment for the whole batch, where a row has a
    threshold to check or a token to sample; elsewhere the reads wait (step() says how), and
    each head's greedy token goes on to the next step on the device.

    With graphs=True (CUDA) each (segment, chunk length, head) is captured as a CUDA graph
    on first use and replayed after. With compile=True each block and head runs compiled
    (compile_decode). Warm-up and capture leave the state as it was. The caller keeps a
    decoder to reuse its cache and graphs: start() begins a sequence in a row."""

    MAX_CHUNK = 16  # longer chunks (long runs of exits) run eagerly: neither compiled nor captured

    def __init__(self, model, graphs=True, compile=False, batch_size=1):
        self.model, self.cfg, self.B = model, model.config, batch_size
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.graphs, self.compile = graphs and p.is_cuda, compile
        # this stage's depths: blocks lo..hi-1 (the whole model: 0..n_layer-1); its exits by depth
        self.lo = min(int(i) for i in model.blocks)
        self.hi = max(int(i) + b.width for i, b in model.blocks.items())
        self.exit_at = {i + 1: e for i, es in model.exits_after.items() for e in es}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=p.device)  # each row's new token
        self.row_index = torch.arange(batch_size, device=p.device)[:, None]       # (B, 1)
        self.pos = {}  # T: (B, T) positions of each row's chunk, filled before each segment
        # each block and head is compiled on its own, once per chunk length (one compilation
        # serves every block of the model, torch >= 2.5)
        self.call = compile_decode(direct) if compile else direct
        self.max_len, self.captured = 0, {}
        self.tokens, self.done = [None] * batch_size, [None] * batch_size  # per row; None: idle
        E = len(self.cfg.exits)
        self.drafts = [0] * E, [0] * E  # adaptive self-speculation's (kept, judged) drafts per exit (DraftPlan)

    def reserve(self, n):
        """Room for sequences of n positions: the cache holds n rounded up to a power of two
        (at least 256) and the spare slot; a larger size reallocates it (only while every row
        is idle) and drops the graphs."""
        if n > self.cfg.block_size:
            raise ValueError(f'{n} positions exceed the block_size={self.cfg.block_size} the model was trained for')
        size = max(n, min(self.cfg.block_size, max(256, 1 << (n - 1).bit_length())))
        if size > self.max_len:
            busy = [r for r, t in enumerate(self.tokens) if t is not None]
            if busy:
                raise ValueError(f'a sequence of {n} positions needs a larger cache than the {self.max_len} reserved, '
                                 f'while rows {busy} decode; reserve() the longest first')
            self.caches = self.hid = None  # (free the old ones first)
            self.captured = {}
            self.caches = self.model.setup_cache(self.B, size + 1, self.dtype)
            self.hid = torch.zeros(self.B, size + 1, self.cfg.n_embd, dtype=self.dtype, device=self.device)
            self.max_len = self.spare = size

    @torch.no_grad()
    def start(self, prompts, n, h=None):
        """New sequences of at most n positions, prompts {row: token ids}: every prompt but its
        last token through this stage's blocks (and the exits that keep a KV cache) in one
        forward for all the rows, each prompt right-aligned and padded on the left at the spare
        slot (the rows in between that start nothing, too). On a pipeline stage after the
        first (one row), h (1, len(prompt) - 1, C) is the prompt's hidden states from the stage
        before. Decoding starts at each last prompt token. Returns the prompts' hidden states
        after this stage's blocks (rows, K, C), or None if every prompt is one token."""
        rows = sorted(prompts)
        for r in rows:
            self.free(r)
        self.reserve(n)
        m, K = self.model, max(len(p) for p in prompts.values()) - 1
        for r in rows:
            self.tokens[r], self.done[r] = list(prompts[r]), [self.cfg.n_layer] * (len(prompts[r]) - 1)
        if K == 0:
            m.use_cache(self.caches)
            return None
        lo, hi = rows[0], rows[-1] + 1
        pos, ids = [[self.spare] * K for _ in range(lo, hi)], [[0] * K for _ in range(lo, hi)]
        for r in rows:
            k = len(prompts[r]) - 1
            pos[r - lo][K - k:], ids[r - lo][K - k:] = range(k), prompts[r][:k]
        pos = torch.tensor(pos, device=self.device)                     # (rows, K)
        table_pos = pos.clamp(max=self.cfg.block_size - 1)
        m.use_cache([c.rows(lo, hi) for c in self.caches])              # these rows alone
        x = m.embed(torch.tensor(ids, device=self.device), table_pos)[0] if m.first else h
        rope = m.rope(table_pos)
        x, taps = m.run_blocks(x, rope, pos, exits=True)
        for e, hidden in taps:
            if m.exits[str(e)].block is not None:
                m.exit_logits(e, hidden, rope, pos)  # (for its KV)
        m.use_cache(self.caches)  # (the model may have run with another cache since, too)
        return x

    def free(self, row):
        """Row `row` is idle (its sequence is over)."""
        self.tokens[row] = self.done[row] = None

    def segment(self, a, b, T, head, rows=1):
        """Blocks a..b-1 for the chunks in self.pos[T] (B, T) (their hidden states at depth a are
        in hid; at a == 0, T is 1 and it is each row's new token), then the head at depth b (an
        exit index, 'final', or None for none) on the last `rows` slots of each row. Returns its
        logits (B, rows, V) and (max prob, argmax, its log prob) (B, rows, 3), or (None, None)."""
        m, call = self.model, self.call if T <= self.MAX_CHUNK else direct
        pos = self.pos[T]                                                # (B, T)
        table_pos = pos.clamp(max=self.cfg.block_size - 1)  # (the spare slot may lie past the tables)
        h = m.embed(self.tok, table_pos)[0] if a == 0 else self.hid[self.row_index, pos]  # (B, T, C)
        rope = m.rope(table_pos)
        for k, block in m.blocks.items():
            if a <= int(k) < b:
                h = call(block, h, rope, pos)
        self.hid[self.row_index, pos] = h
        if head is None:
            return None, None
        if head == 'final':
            logits = call(m.final_logits, h[:, -rows:])
        else:  # an exit with a block keeps a KV cache: it runs for every position of the chunk
            sel = slice(None) if m.exits[str(head)].block is not None else slice(T - rows, None)
            logits = call(m.exit_logits, head, h[:, sel], m.rope(table_pos[:, sel]), pos[:, sel])[:, -rows:]
        logits = full_vocab(m, logits)                                   # (B, rows, V)
        conf = call(confidence, logits)
        live = pos[:, -1:] != self.spare                                  # (B, 1): rows with a chunk here
        self.tok.copy_(torch.where(live, conf[:, -1:, 1].long(), self.tok))  # the greedy token: next input
        return logits, conf

    def run(self, a, b, head, chunks, rows=1):
        """segment() for chunks {row: (first position, end)} (the other rows point at the spare
        slot), compiled and as a CUDA graph where it can be."""
        T = max(e - s for s, e in chunks.values())
        pos = [[self.spare] * T for _ in range(self.B)]
        for r, (s, e) in chunks.items():
            pos[r][T - (e - s):] = range(s, e)
        if T not in self.pos:
            self.pos[T] = torch.empty(self.B, T, dtype=torch.long, device=self.device)
        upload(pos, self.pos[T])
        fn = lambda: self.segment(a, b, T, head, rows)
        if not self.graphs or T > self.MAX_CHUNK:
            return fn()
        key = (a, b, T, head, rows)
        if key not in self.captured:
            saved = self.hid.clone(), self.tok.clone()
            self.captured[key] = capture(fn, pool=self.pool)
            for t, was in zip((self.hid, self.tok), saved):  # undo the warm-up (its KV writes repeat
                t.copy_(was)                                   # with the same values)
        graph, outs = self.captured[key]
        graph.replay()
        return outs

    @torch.no_grad()
    def verify(self, plan, watch=()):
        """Self-speculation's check of each row of plan {row: (d, k)}: blocks d.. and the final
        head for the row's last committed token and the k - 1 drafted after it (the drafting
        left their KV below d). Rows drafted from different depths join at the deepest one
        they need. The exits in watch (indices) run their heads on the way: what each would
        have drafted at those positions. Returns the final head's logits (B, K, V) and (max
        prob, argmax, its log prob) (B, K, 3), K the largest k, row r's k in its last k
        slots; and {watched exit: its (B, K', 3)}, K' <= K the longest chunk that passed it
        (row r's k in its last k slots, for the rows drafted above the exit)."""
        L, chunks, depth = self.cfg.n_layer, {}, {e: d for d, e in self.exit_at.items()}
        for r, (d, k) in plan.items():
            n = len(self.tokens[r])
            chunks[r] = (n - 1, n - 1 + k)
            self.done[r][n - 1:] = [L] * k
        depths = sorted({d for d, _ in plan.values()} | {depth[e] for e in watch})
        K, shadow = max(k for _, k in plan.values()), {}
        for a, b in zip(depths, depths[1:] + [L]):
            head = 'final' if b == L else self.exit_at[b] if self.exit_at.get(b) in watch else None
            part = {r: c for r, c in chunks.items() if plan[r][0] <= a}
            out = self.run(a, b, head, part, rows=1 if head is None else max(e - s for s, e in part.values()))
            if b < L and head is not None:
                shadow[head] = out[1]
        return out, shadow

    @torch.no_grad()
    def step(self, rules, stop_depth=None, h=None, decided=False):
        """Process the last token of each row in rules {row: (allowed exits (indices), thres,
        pick)} through this stage, bringing every pending position along; at each allowed
        exit, if its max prob >= thres, the row emits from it. stop_depth ({row: depth}): run
        that row no deeper (drafting). pick(logits (1, V)) -> token; None: greedy. Every head
        writes its greedy token into the next step's input on the device, so a row's last
        token may be None on the host (not read yet). On a pipeline stage after the first, h
        (B, 1, C) is each row's token's hidden state from the stage before, and decided says
        an earlier stage has emitted it: then only the KV is computed here.

        Returns (now, later): now {row: (token, depth it left at, {depth: max prob}, its
        logits (1, V), the log prob of the token)} for the rows the host had to read to
        decide (an exit's threshold, sampling); later() the same for the other rows, whose
        reads are on their way to the host: a caller may launch the next step first, so that
        the device does not wait for the host between tokens. Rows whose token leaves this
        stage undecided are in neither (their hidden states are in hid)."""
        L, inf = self.cfg.n_layer, float('inf')
        t = {r: len(self.tokens[r]) - 1 for r in rules}
        if h is None:  # the tokens the host knows; the others are on the device already
            known = {r: self.tokens[r][t[r]] for r in rules if self.tokens[r][t[r]] is not None}
            if known:
                new = upload([[known.get(r, -1)] for r in range(self.B)], torch.empty_like(self.tok))
                self.tok.copy_(torch.where(new >= 0, new, self.tok))
        for r in rules:
            if h is not None:
                self.hid[r, t[r]] = h[r, -1]
            self.done[r].append(self.lo)
        if decided:  # only this stage's exits that keep a KV cache run, and none decides
            kv = {e for e in self.exit_at.values() if self.model.exits[str(e)].block is not None}
            rules = {r: (allowed & kv, inf, pick) for r, (allowed, _, pick) in rules.items()}
        wanted = set().union(*(allowed for allowed, _, _ in rules.values()))
        stop = {r: (stop_depth or {}).get(r) for r in rules}
        bounds = sorted({d for d, e in self.exit_at.items() if e in wanted} | {self.hi}
                        | {d for d in stop.values() if d is not None})
        now, later, probs, a = {}, {}, {r: {} for r in rules}, self.lo
        unread = []  # (depth, head, rows, their (max prob, argmax, log prob) on the way to the host)

        def read(b, head, rows, conf, logits=None):
            for r in sorted(rows):
                allowed, thres, pick = rules[r]
                p, best, lp = conf[r]
                if head in allowed or b == stop[r]:
                    probs[r][b] = p
                if b == L or (head in allowed and p >= thres) or b == stop[r]:
                    tok = int(best) if pick is None else pick(logits[r, -1:])
                    if tok != int(best):
                        lp = float(logits[r, -1].float().log_softmax(-1)[tok])
                    (now if logits is not None else later)[r] = (tok, b, probs[r], None if logits is None
                                                                  else logits[r, -1:], lp)

        def settle():
            for b, head, rows, conf in unread:
                read(b, head, rows, conf.tolist())
            unread.clear()

        for b in bounds:  # (every row decides at its stop depth, the stage's last block at the latest)
            chunks = {}
            for r in rules.keys() - now.keys() - later.keys():  # positions needing block a: a suffix,
                s, done = t[r], self.done[r]                      # those stopped at depth <= a
                while s > 0 and done[s - 1] <= a:
                    s -= 1
                chunks[r] = (s, t[r] + 1)
                done[s:] = [b] * (t[r] + 1 - s)
            head = self.exit_at.get(b) if b < L else None if decided else 'final'
            logits, conf = self.run(a, b, head, chunks)
            if head is None:  # the end of this stage, undecided (or decided before it)
                break
            ending = [r for r in chunks if b == L or b == stop[r]]
            if any(head in rules[r][0] and rules[r][1] < inf for r in chunks) or \
                    any(rules[r][2] is not None for r in ending):  # the host decides: read now
                read(b, head, chunks, conf[:, -1].tolist(), logits)  # (one read for every row)
                settle()
            else:
                unread.append((b, head, list(chunks), fetch(conf[:, -1])))
                later.update(dict.fromkeys(ending))
            if len(now) + len(later) == len(rules):
                break
            a = b
        if not unread:
            return now, lambda: later
        arrived = torch.cuda.Event() if self.device.type == 'cuda' else None
        if arrived:
            arrived.record()

        def wait():
            if arrived:
                arrived.synchronize()
            settle()
            return later
        return now, wait


def span(prompt, max_new_tokens, method, spec_k, block_size):
    """Positions a generation needs (speculation drafts up to spec_k past the last token)."""
    n = len(prompt) + max_new_tokens + (spec_k if method == 'speculative' else 0)
    if n > block_size:
        raise ValueError(f'{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens}'
                         + (f' + spec_k={spec_k}' if method == 'speculative' else '')
                         + f' exceed the block_size={block_size} the model was trained for')
    return n


class Job:
    """One sequence to decode, its settings and its output: prompt (token ids), up to
    max_new_tokens, early exit at thres from the exits `allowed` (indices; None: all; thres
    None: none), sampling (temperature 0: greedy) from its own generator (seed), stop at the
    token `stop`. on_token(token, depth, probs) sees each token as it comes; on_done(job)
    the end. out: {'tokens', 'depths' (blocks each token ran before its head; n_layer =
    final), 'max_probs' ({depth: max prob} per token), 'logprobs' (of each token under the
    head that chose it), 'accepted', 'drafted', 'rounds' (speculative: (drafting exit's
    layer, tokens drafted) per round)}."""

    def __init__(self, cfg, device, prompt, max_new_tokens, thres=None, allowed=None, temperature=0.0, top_k=None,
                 top_p=None, seed=None, stop=None, on_token=None, on_done=None):
        self.prompt, self.max_new_tokens, self.stop = list(prompt), max_new_tokens, stop
        self.thres = float('inf') if thres is None else thres
        self.allowed = set(range(len(cfg.exit_layers))) if allowed is None else set(allowed)
        if self.thres == float('inf'):
            self.allowed = set()  # nothing can fire: no exit is computed
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.pick = None if temperature == 0 else lambda logits: int(sample(logits, temperature, top_k, top_p,
                                                                            self.gen)[0])
        self.on_token, self.on_done, self.plan = on_token, on_done, None  # (plan: speculation's DraftPlan)
        self.out = {'tokens': [], 'depths': [], 'max_probs': [], 'logprobs': [], 'drafted': 0, 'accepted': 0,
                    'rounds': []}

    def dist(self, logits):
        return distribution(logits, self.temperature, self.top_k, self.top_p)[0]

    def emit(self, tok, depth, probs, logprob):
        """Record a token; returns whether the sequence is over."""
        for k, v in zip(('tokens', 'depths', 'max_probs', 'logprobs'), (tok, depth, probs, logprob)):
            self.out[k].append(v)
        if self.on_token:
            self.on_token(tok, depth, probs)
        return len(self.out['tokens']) >= self.max_new_tokens or tok == self.stop


class DraftPlan:
    """Which exit drafts and how many tokens, for one sequence's self-speculation. A fixed
    exit drafts spec_k tokens every round. With spec_exit='auto' (adaptive self-speculation,
    after DEL, arXiv 2504.05598): each round takes the exit e and draft length k that
    maximise expected tokens per cost, E(e, k) / C(e, k), where a draft kept with
    probability a_e gives E = 1 + a_e + ... + a_e^(k-1) tokens (the first rejection ends the
    round with the full model's token) and C counts the bytes a batch-1 round reads: k drafts
    through the exit's blocks and head, one verification through the rest and the final
    head. a_e is the share of the exit's drafts kept in this sequence, with an optimistic
    bonus that shrinks as it is tried (UCB), so that every exit gets tried and the best one
    wins. Exits deeper than the drafting one are judged without drafting from them (DEL's
    shadow check): the verification runs their heads too, and each position where one's
    greedy token is the full model's counts as a draft it would have had kept (under
    sampling, an estimate). A shallower exit is judged only when it drafts, which its
    bonus brings about in time; until then a plan can stay on a deeper exit.

    pooled: (kept, judged) per exit over every sequence of a Decoder (Decoder.drafts),
    which the plan adds to. A sequence starts from those rates, weighted as PRIOR judged
    drafts an exit, and then learns from its own (what suits one text may not suit the
    next); the shadow check runs until WATCH of an exit's drafts have been judged in all. A
    draft also stops early when the drafting exit's confidence falls below spec_stop
    (Kangaroo, arXiv 2404.18911)."""

    WATCH, PRIOR = 64, 16

    def __init__(self, model, spec_exit, spec_k, spec_stop=None, pooled=None):
        cfg = model.config
        size = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0
        block, lm = size(next(iter(model.blocks.values()))) / next(iter(model.blocks.values())).width, \
            size(model.lm_head)
        # a head's cost in blocks: its own layers, and the LM head's matrix unless it has its own
        heads = [(size(model.exits[str(x.index)]) + (0 if cfg.exit_untie else lm)) / block for x in cfg.exits]
        self.cost = lambda e, k: k * (cfg.exits[e].depth + heads[e]) + cfg.n_layer - cfg.exits[e].depth + lm / block
        self.spec_exit, self.spec_k, self.spec_stop = spec_exit, spec_k, spec_stop
        self.depth, E = [x.depth for x in cfg.exits], len(cfg.exits)
        self.pooled = pooled or ([0] * E, [0] * E)
        w = [min(t, self.PRIOR) / t if t else 0 for t in self.pooled[1]]  # (the prior's weight)
        self.kept, self.tried = [k * x for k, x in zip(self.pooled[0], w)], [t * x for t, x in zip(self.pooled[1], w)]

    def choose(self):
        """(exit index, draft length) for the next round."""
        if self.spec_exit != 'auto':
            return self.spec_exit, self.spec_k
        total, best = sum(self.tried) + 2, None
        for e in range(len(self.kept)):
            a = (self.kept[e] + 1) / (self.tried[e] + 2) + (math.log(total) / (self.tried[e] + 1)) ** 0.5 / 4
            a = min(a, 0.99)
            for k in range(1, self.spec_k + 1):
                value = (1 - a ** k) / (1 - a) / self.cost(e, k)
                if best is None or value > best[0]:
                    best = (value, e, k)
        return best[1:]

    def update(self, e, kept, judged):
        for counts in (self.kept, self.tried), self.pooled:
            counts[0][e] += kept
            counts[1][e] += judged

    def watching(self, e):
        """The exits whose heads the verification of a draft from exit e runs as well."""
        if self.spec_exit != 'auto':
            return set()
        return {x for x, d in enumerate(self.depth) if d > self.depth[e] and self.pooled[1][x] < self.WATCH}


def check_method(cfg, method, spec_exit, spec_k):
    if method not in ('full', 'recompute', 'speculative'):
        raise ValueError(f"method={method!r}; allowed: 'full', 'recompute', 'speculative'")
    if method == 'speculative':
        if not (isinstance(spec_k, int) and spec_k >= 1):
            raise ValueError(f'spec_k={spec_k!r}; allowed: an int >= 1 (tokens drafted per verification)')
        if spec_exit != 'auto' and spec_exit not in range(len(cfg.exits)):
            raise ValueError(f'spec_exit={spec_exit!r}: the drafting exit\'s index; allowed: 0..{len(cfg.exits) - 1}, '
                             "or 'auto' (adaptive)")


@torch.no_grad()
def run_jobs(dec, take, method='recompute', spec_exit=None, spec_k=4, spec_stop=None):
    """Decode jobs with dec until take() has none left: take() -> the next Job or None (none
    waiting now). A free row takes the next job at every step (continuous batching), so a
    short job never waits for a long one. method 'full' or 'recompute' (each job's thres and
    exits; full: none), or 'speculative': every row drafts from its own exit as its
    DraftPlan says (spec_exit and spec_k, or 'auto': adaptive; spec_stop: a draft ends when
    the drafter's confidence falls below it) and is verified on its own, keeping only its
    own accepted drafts."""
    cfg, L, inf = dec.cfg, dec.cfg.n_layer, float('inf')
    check_method(cfg, method, spec_exit, spec_k)
    jobs = {}  # row: job
    pending = []  # a step launched before the one before it was read: (later, {row: (job, token's index)})

    def finish(r):
        dec.free(r)
        job = jobs.pop(r)
        if job.on_done:
            job.on_done(job)

    def emit(r, tok, depth, probs, logprob):
        dec.tokens[r].append(tok)
        if jobs[r].emit(tok, depth, probs, logprob):
            finish(r)
            return True
        return False

    def place(results, slots):
        """A step's tokens into the slots it left in dec.tokens, and to their jobs (unless over since)."""
        for r, (tok, depth, probs, _, logprob) in sorted(results.items()):
            job, i = slots[r]
            if jobs.get(r) is job:
                dec.tokens[r][i] = tok
                if job.emit(tok, depth, probs, logprob):
                    finish(r)

    while True:
        admitted = {}
        for r in range(dec.B):  # fill the free rows; their prompts go through the model together
            while r not in jobs:
                job = take()
                if job is None:
                    break
                jobs[r] = job
                if job.max_new_tokens == 0:
                    finish(r)
                else:
                    admitted[r] = job
        if admitted:
            dec.start({r: j.prompt for r, j in admitted.items()},
                      max(span(j.prompt, j.max_new_tokens, method, spec_k, cfg.block_size) for j in admitted.values()))
        if not jobs and not pending:
            return
        if method != 'speculative':
            # the host runs a step ahead: step t+1 is launched before step t's greedy tokens are
            # read (they are its input on the device already); a row stops being stepped once
            # its tokens in flight reach max_new_tokens, and a row ended by its stop token has
            # one step computed for nothing
            rules = {r: (set() if method == 'full' else j.allowed, j.thres, j.pick) for r, j in jobs.items()
                     if len(dec.tokens[r]) - len(j.prompt) < j.max_new_tokens}
            launched = []
            if rules:
                now, later = dec.step(rules)
                slots = {r: (jobs[r], len(dec.tokens[r])) for r in rules}
                for r in rules:
                    dec.tokens[r].append(None)
                launched = [(later, slots)]
            for later_before, slots_before in pending:
                place(later_before(), slots_before)
            if rules:
                place(now, slots)
            pending = launched
            continue
        plan = {}
        for r, j in jobs.items():
            j.plan = j.plan or DraftPlan(dec.model, spec_exit, spec_k, spec_stop,
                                         dec.drafts if spec_exit == 'auto' else None)
            plan[r] = j.plan.choose()
        k = {r: kr for r, (_, kr) in plan.items()}
        depth = {r: cfg.exits[e].depth for r, (e, _) in plan.items()}
        n, drafts, qs = {r: len(dec.tokens[r]) for r in jobs}, {r: [] for r in jobs}, {r: [] for r in jobs}
        unread = []  # greedy drafts not read yet: (later, {row: draft index})
        while True:  # draft with each row's exit (layers < its depth, the shared KV)
            # (with spec_stop the drafting exit's confidence is read at once: a threshold there)
            drafting = {r: (set() if spec_stop is None else {plan[r][0]}, inf if spec_stop is None else spec_stop,
                            jobs[r].pick) for r in jobs if len(drafts[r]) < k[r]}
            if not drafting:
                break
            now, later = dec.step(drafting, stop_depth=depth)
            unread.append((later, {r: len(drafts[r]) for r in drafting}))
            for r in drafting:
                tok, _, probs, logits, _ = now.get(r, (None,) * 5)
                drafts[r].append(tok)
                qs[r].append(jobs[r].dist(logits) if jobs[r].temperature else None)
                dec.tokens[r].append(tok)
                if spec_stop is not None and probs[depth[r]] < spec_stop:  # the drafter is unsure: verify now
                    k[r] = len(drafts[r])
        for r in jobs:
            del dec.tokens[r][n[r]:]
        # verify: the remaining layers for each row's drafted positions in one forward
        watch = {r: j.plan.watching(plan[r][0]) for r, j in jobs.items()}
        (full, best), shadow = dec.verify({r: (depth[r], k[r]) for r in jobs}, set().union(*watch.values()))
        best, K = best.tolist(), max(k.values())  # (full (B, K, V): the full model after each)
        shadow = {x: conf.tolist() for x, conf in shadow.items()}
        for later, index in unread:
            for r, (tok, *_) in later().items():
                drafts[r][index[r]] = tok
        for r, job in list(jobs.items()):
            job.out['drafted'] += k[r]
            job.out['rounds'].append((cfg.exits[plan[r][0]].layer, k[r]))
            kept = 0
            for j in range(k[r]):
                i = K - k[r] + j  # (row r's slots are its last k[r])
                if job.temperature == 0:  # greedy: keep the draft while it is the full model's argmax
                    want, logprob = int(best[r][i][1]), best[r][i][2]
                    ok = want == drafts[r][j]
                else:
                    want, ok = accept(drafts[r][j], job.dist(full[r, i:i + 1]), qs[r][j], job.gen)
                    logprob = float(full[r, i].float().log_softmax(-1)[want])
                kept += ok
                finished = emit(r, want, depth[r] if ok else L, {}, logprob)
                if finished or not ok:
                    break
            job.out['accepted'] += kept
            judged = kept + (kept < k[r])  # (the kept drafts, the first rejected)
            job.plan.update(plan[r][0], kept, judged)
            for x in watch[r]:  # would exit x have drafted these? (its argmax on the same prefix)
                first = len(shadow[x][r]) - k[r]
                job.plan.update(x, sum(shadow[x][r][first + j][1] == best[r][K - k[r] + j][1]
                                       for j in range(judged)), judged)
            if not finished:  # positions past the last committed token are redone
                del dec.done[r][len(dec.tokens[r]) - 1:]


@torch.no_grad()
def generate(model, prompt, max_new_tokens, method='full', thres=None, allowed=None, spec_exit=None, spec_k=4,
             temperature=0.0, top_k=None, top_p=None, seed=None, stop=None, on_token=None, decoder=None,
             spec_stop=None):
    """One sequence: Job's output dict (which says what each key holds). allowed: exit
    indices that may fire (None: all); spec_exit: the drafting exit's index, or 'auto'
    (adaptive, DraftPlan; spec_k the longest draft); spec_stop: end a draft when the
    drafter's max probability falls below it (None: never). decoder: a
    Decoder of this model to reuse (its cache, CUDA graphs and compiled code); None: a new
    one (CUDA graphs on CUDA)."""
    return generate_many(model, [prompt], max_new_tokens, method, thres, allowed, spec_exit, spec_k, temperature,
                         top_k, top_p, seed, stop, on_token and (lambda i, *a: on_token(*a)), decoder,
                         spec_stop=spec_stop)[0]


@torch.no_grad()
def generate_many(model, prompts, max_new_tokens, method='full', thres=None, allowed=None, spec_exit=None, spec_k=4,
                  temperature=0.0, top_k=None, top_p=None, seed=None, stop=None, on_token=None, decoder=None,
                  batch_size=1, on_done=None, spec_stop=None):
    """generate() for many prompts, batch_size rows at once (or the decoder's), a finished
    row taking the next prompt. Prompt i samples from its own generator, seeded seed + i, so
    that its output is the one it has alone. on_token(i, token, depth, probs); on_done(i,
    output) as each ends. Returns the outputs in prompt order."""
    check_method(model.config, method, spec_exit, spec_k)
    dec = Decoder(model, batch_size=batch_size) if decoder is None else decoder
    assert dec.model is model, 'the decoder belongs to another model'
    dev = next(model.parameters()).device
    jobs = [Job(model.config, dev, p, max_new_tokens, thres if method == 'recompute' else None, allowed,
                temperature, top_k, top_p, None if seed is None else seed + i, stop,
                on_token and (lambda *a, i=i: on_token(i, *a)), on_done and (lambda job, i=i: on_done(i, job.out)))
            for i, p in enumerate(prompts)]
    dec.reserve(max(span(p, max_new_tokens, method, spec_k, model.config.block_size) for p in prompts))
    waiting = iter(jobs)
    run_jobs(dec, lambda: next(waiting, None), method, spec_exit, spec_k, spec_stop)
    return [j.out for j in jobs]


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
    h = dec.start({0: prompt}, span(prompt, max_new_tokens, 'full', 0, cfg.block_size), h)  # the prefill
    if n0 and not model.last:
        send(h, s + 1)
    out = {'tokens': [], 'depths': [], 'drafted': 0, 'accepted': 0}
    read = [0] * P  # stage 0: reports read from each stage
    while True:
        t = len(dec.tokens[0]) - 1
        decided, h = False, None
        if not model.first:
            decided, _, _, halt = Message.unpack(recv((4,), torch.long, s - 1))
            if halt:  # pass it on
                if not model.last:
                    send(Message.pack(stop=True, device=dev), s + 1)
                break
            h = recv((1, 1, C), dec.dtype, s - 1)
        now, later = dec.step({0: (allowed, thres, pick)}, h=h, decided=decided)
        choice = now.get(0) or later().get(0)
        msg = Message.pack(choice is not None, *(choice[:2] if choice else (-1, 0)), device=dev)
        if not model.last:
            send(Message.pack(decided or choice is not None, device=dev), s + 1)
            send(dec.hid[:1, t:t + 1].clone(), s + 1)
        if not model.first:  # every stage reports each token to stage 0, decided here or not
            send(msg, 0)
            dec.tokens[0].append(None)  # (only stage 0 knows the tokens; the others count positions)
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
        dec.tokens[0].append(tok)
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
