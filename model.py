"""
An early-exit GPT in one file: GPT-2 and Llama flavours, exit heads, a static KV cache.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(arch='llama', n_layer=6, n_head=6, n_embd=384, exit_layers=(2, 4)))
    logits, exit_logits = model(idx, exits=True)              # (B, T, V), [(B, T, V)] * 2
    loss, exit_losses = model(idx, targets, exits=True)      # scalar, [scalar] * 2

Early exits follow EE-LLM (Chen et al. 2023, arXiv 2312.04916): chosen layers carry an
exit head that maps that layer's hidden state to next-token logits.

Pass a ParallelState (parallel.py) for tensor/sequence parallelism: every matmul layer
then holds its shard, and logits come out split along the vocabulary, (B, T, V/tp).
With the default (one process) every layer is a plain nn.Linear / nn.Embedding.
"""

import math
import zlib
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from parallel import (LOCAL, ColumnLinear, RowLinear, VocabEmbedding, check_layout, cross_entropy, enter,
                      logical_shape, mark_splits, seq_shard, take_shard)


# the precisions a run may name ('dtype' keys): training autocasts to them, decoding casts the weights
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# one exit, three numbers: its index (exit_layers order, as in GPT.exits['0']), its EE-LLM layer
# number (1-based, as in exit_layers) and its depth (the blocks that run before it; the exit
# reads the output of block depth-1)
Exit = namedtuple('Exit', 'index layer depth')


@dataclass
class GPTConfig:
    arch: str = 'gpt2'             # 'gpt2': LayerNorm, GELU, learned positions, tied embeddings
                                   # 'llama': RMSNorm, SwiGLU, RoPE, grouped-query attention
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = None          # None: n_head (plain multi-head attention)
    n_embd: int = 768
    ffn_hidden: int = None         # None: 4 * n_embd (gpt2), 8/3 * n_embd rounded up to 64 (llama)
    vocab_size: int = 50304
    block_size: int = 1024         # longest sequence (positions table / RoPE table)
    bias: bool = None              # None: True for gpt2, False for llama
    dropout: float = 0.0
    layer_dropout: float = 0.0     # LayerSkip: in training block i skips a row w.p. layer_dropout * i / (n_layer-1)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0    # llama only
    tie_embeddings: bool = None    # None: True for gpt2, False for llama
    # early exits (EE-LLM names)
    exit_layers: tuple = ()        # 1-based block indices, strictly increasing
    exit_pre: bool = False         # the exit reads the block's input instead of its output
    exit_untie: bool = False       # own output matrix per exit instead of the LM head's
    exit_norm: bool = False        # a norm before the exit's output matrix
    exit_mlp: bool = False         # a residual MLP (with its own pre-norm) before that
    exit_block: bool = False       # a whole transformer block before that
    # layer parallelism: blocks start..end-1 run in pairs side by side (see Block)
    layer_parallel: tuple = ()     # (start, end) 0-based, even span; () for none

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(f'GPTConfig: {msg}')
        check(self.arch in ('gpt2', 'llama'), f"arch={self.arch!r}; allowed: 'gpt2', 'llama'")
        for k in ('n_layer', 'n_head', 'n_embd', 'vocab_size', 'block_size'):
            v = getattr(self, k)
            check(isinstance(v, int) and v >= 1, f'{k}={v!r}; must be a positive int')
        self.n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        check(isinstance(self.n_kv_head, int) and self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0,
              f'n_kv_head={self.n_kv_head!r}; must divide n_head={self.n_head}')
        check(self.n_embd % self.n_head == 0,
              f'n_embd={self.n_embd} is not divisible by n_head={self.n_head}')
        check(self.arch != 'llama' or self.head_dim % 2 == 0,
              f'head_dim={self.head_dim} must be even for RoPE (n_embd / n_head)')
        check(0.0 <= self.dropout < 1.0, f'dropout={self.dropout!r}; allowed: 0 <= dropout < 1')
        check(0.0 <= self.layer_dropout < 1.0, f'layer_dropout={self.layer_dropout!r}; allowed: 0 <= it < 1')
        check(self.norm_eps > 0, f'norm_eps={self.norm_eps!r}; must be > 0')
        llama = self.arch == 'llama'
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if llama else 4 * self.n_embd
        check(isinstance(self.ffn_hidden, int) and self.ffn_hidden >= 1,
              f'ffn_hidden={self.ffn_hidden!r}; must be a positive int')
        self.bias = (not llama) if self.bias is None else self.bias
        self.tie_embeddings = (not llama) if self.tie_embeddings is None else self.tie_embeddings
        # exits
        self.exit_layers = tuple(self.exit_layers)
        lo, hi = (2, self.n_layer) if self.exit_pre else (1, self.n_layer - 1)
        for L in self.exit_layers:
            check(isinstance(L, int) and lo <= L <= hi,
                  f'exit_layers contains {L!r}; allowed: ints in {lo}..{hi} '
                  f'(n_layer={self.n_layer}, exit_pre={self.exit_pre})')
        check(len(set(self.exit_layers)) == len(self.exit_layers),
              f'exit_layers={list(self.exit_layers)} has duplicates')
        check(list(self.exit_layers) == sorted(self.exit_layers),
              f'exit_layers={list(self.exit_layers)} must be increasing')
        check(not (self.exit_mlp and self.exit_block),
              'exit_mlp=True and exit_block=True are exclusive (a block already holds an MLP)')
        self.layer_parallel = tuple(self.layer_parallel or ())
        if self.layer_parallel:
            lp = self.layer_parallel
            check(len(lp) == 2 and all(isinstance(i, int) for i in lp) and 0 <= lp[0] < lp[1] <= self.n_layer
                  and (lp[1] - lp[0]) % 2 == 0,
                  f'layer_parallel={list(lp)}; need [start, end) block indices, 0 <= start < end <= '
                  f'n_layer={self.n_layer}, with an even span end - start')
            for L, d in self.exits_inside_pairs(lp):
                check(False, f'exit_layers contains {L}, which reads the output of block {d - 1}, inside the '
                             f'parallel pair ({d - 1}, {d}) of layer_parallel={list(lp)}; exits may sit only between pairs')

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def exits_inside_pairs(self, span):
        """(exit layer, depth) of each exit that would read between the two blocks of a pair of span."""
        return [(x.layer, x.depth) for x in self.exits if span[0] < x.depth < span[1] and (x.depth - span[0]) % 2]

    @property
    def pairs(self):
        """First blocks of the layer-parallel pairs."""
        return range(*self.layer_parallel, 2) if self.layer_parallel else range(0)

    @property
    def exits(self):
        """Every exit as an Exit(index, layer, depth), shallowest first."""
        return tuple(Exit(e, L, L - 1 if self.exit_pre else L) for e, L in enumerate(self.exit_layers))

    @property
    def exit_depths(self):
        """For each exit, the number of blocks that run before it (1..n_layer-1)."""
        return tuple(x.depth for x in self.exits)

    def exit_index(self, layer):
        """The index of the exit with EE-LLM layer number `layer`; a ValueError naming the
        allowed numbers if there is none."""
        for x in self.exits:
            if x.layer == layer:
                return x.index
        raise ValueError(f"exit layer {layer!r} is not one of the model's exit_layers {list(self.exit_layers)}")

    @property
    def head_names(self):
        """{depth: 'exit L'} for every exit and {n_layer: 'final'}: what a depth is called."""
        return {x.depth: f'exit {x.layer}' for x in self.exits} | {self.n_layer: 'final'}


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def Norm(cfg):
    if cfg.arch == 'llama':
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_table(cfg, device=None):
    """cos and sin of RoPE angles (Su et al. 2021), each (block_size, head_dim/2)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(cfg.block_size, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x (B, nh, T, hd); cos, sin (T, hd/2), or (B, T, hd/2) for positions per row. Rotates the
    # two halves of each head (the Hugging Face Llama layout: its checkpoints load unpermuted).
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """The static KV cache of one attention layer: keys and values (B, n_kv_head, max_len, hd)
    of every position written so far; update() writes a chunk at its positions, the same for
    every row or one set per row."""

    def __init__(self, batch_size, n_kv_head, max_len, head_dim, dtype, device):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, input_pos, k, v):
        """Write k, v (B, nkv, T, hd) at positions input_pos, (T,) or (B, T); returns the whole cache."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if input_pos.dim() == 1:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        else:  # row b's chunk at its own positions input_pos[b]
            row = torch.arange(k.size(0), device=k.device)[:, None]             # (B, 1)
            self.k[row, :, input_pos] = k.transpose(1, 2)                        # (B, T, nkv, hd)
            self.v[row, :, input_pos] = v.transpose(1, 2)
        return self.k.to(k.dtype), self.v.to(v.dtype)

    def rows(self, lo, hi):
        """The cache of rows lo..hi-1 alone, sharing this one's memory."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[lo:hi], self.v[lo:hi]
        return view

    def bytes_per_position(self):
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, cfg, ps, width=1):
        super().__init__()
        # width layers' heads side by side, split over the tensor-parallel ranks (this rank's counts)
        nh, nkv, hd = width * cfg.n_head, width * cfg.n_kv_head, cfg.head_dim
        self.n_head, self.n_kv_head, self.head_dim = nh // ps.tp, nkv // ps.tp, hd
        self.ps = ps
        self.q = ColumnLinear(cfg.n_embd, nh * hd, cfg.bias, ps)
        self.k = ColumnLinear(cfg.n_embd, nkv * hd, cfg.bias, ps)
        self.v = ColumnLinear(cfg.n_embd, nkv * hd, cfg.bias, ps)
        self.o = RowLinear(nh * hd, cfg.n_embd, cfg.bias, ps)
        self.o.residual = True  # scaled init
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.cache = None  # a KVCache, set by GPT.setup_cache / use_cache

    def forward(self, x, rope, input_pos):
        x = enter(x, self.ps)  # (B, T, C) on every tp rank
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if input_pos is None:
            mask, causal = None, True
        else:  # static cache: write this chunk at its positions, attend to everything before
            k, v = self.cache.update(input_pos, k, v)                            # (B, nkv, S, hd)
            mask = input_pos[..., None] >= torch.arange(k.size(2), device=x.device)  # (T, S) or (B, T, S)
            mask = mask[:, None] if mask.dim() == 3 else mask                     # (B, 1, T, S): each row its own
            causal = False  # query and key lengths differ: an explicit mask, never is_causal
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each kv head
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.o(y))


class MLP(nn.Module):
    def __init__(self, cfg, ps, width=1):
        super().__init__()
        self.llama, self.ps = cfg.arch == 'llama', ps
        hidden = width * cfg.ffn_hidden  # width layers' hidden units side by side
        self.up = ColumnLinear(cfg.n_embd, hidden, cfg.bias, ps)
        self.gate = ColumnLinear(cfg.n_embd, hidden, cfg.bias, ps) if self.llama else None
        self.down = RowLinear(hidden, cfg.n_embd, cfg.bias, ps)
        self.down.residual = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = enter(x, self.ps)
        if self.llama:
            h = F.silu(self.gate(x)) * self.up(x)          # SwiGLU (Shazeer 2020)
        else:
            h = F.gelu(self.up(x), approximate='tanh')     # GPT-2's GELU
        return self.drop(self.down(h))


class Block(nn.Module):
    """A pre-norm transformer block. width=2: a layer-parallel pair of blocks i, j = i+1
    (Calvo Gonzalez et al. 2025, arXiv 2502.02790) that run side by side on one input,
        h = x + attn_i(norm1_i(x)) + attn_j(norm1_j(x)),  y = h + mlp_i(norm2_i(h)) + mlp_j(norm2_j(h)).
    With each norm's gain (and bias) folded into the matmuls that read it (pair_tensor), a
    pair is exactly one block with both layers' heads and hidden units side by side, and
    norms without affine. Tensor parallelism then splits it as usual: at tp=2 each rank
    holds one layer's attention (and KV cache) and one layer's MLP, and the pair costs 2
    all-reduces instead of 4; at tp=4 each layer's heads span 2 ranks."""

    def __init__(self, cfg, ps, width=1):
        super().__init__()
        self.width = width
        self.norm1, self.attn = Norm(cfg), Attention(cfg, ps, width)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg, ps, width)

    def forward(self, x, rope=None, input_pos=None):
        x = x + self.attn(self.norm1(x), rope, input_pos)
        return x + self.mlp(self.norm2(x))


class ExitHead(nn.Module):
    """Hidden state -> next-token logits: [block | residual MLP] -> [norm] -> output matrix.
    The output matrix is the LM head's (passed in) unless exit_untie gives the exit its own."""

    def __init__(self, cfg, ps):
        super().__init__()
        self.ps = ps
        self.block = Block(cfg, ps) if cfg.exit_block else None
        self.mlp_norm = Norm(cfg) if cfg.exit_mlp else None
        self.mlp = MLP(cfg, ps) if cfg.exit_mlp else None
        self.norm = Norm(cfg) if cfg.exit_norm else None
        self.out = ColumnLinear(cfg.n_embd, cfg.vocab_size, False, ps) if cfg.exit_untie else None

    def forward(self, x, lm_head_weight, rope=None, input_pos=None):
        if self.block is not None:
            x = self.block(x, rope, input_pos)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        if self.norm is not None:
            x = self.norm(x)
        x = enter(x, self.ps)
        return F.linear(x, lm_head_weight if self.out is None else self.out.weight)  # (B, T, V/tp)


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    """The model, or one pipeline stage of it: `layers` (a range of block indices, default
    all) says which blocks this rank builds; the embedding comes with block 0, the final
    norm and LM head with the last block, each exit with the block it reads. Parameters
    keep their logical names (blocks.7.attn.q.weight) in every layout."""

    def __init__(self, cfg, ps=None, seed=0, layers=None):
        super().__init__()
        ps = LOCAL if ps is None else ps
        check_layout(ps.world, ps.tp, ps.pp, ps.sp, cfg)
        self.config, self.ps = cfg, ps
        layers = range(cfg.n_layer) if layers is None else layers
        self.first, self.last = 0 in layers, cfg.n_layer - 1 in layers
        # exits that read the output of block i (0-based): {i: [exit index, ...]}, this stage's only
        self.exits_after = {}
        for e, d in enumerate(cfg.exit_depths):
            if d - 1 in layers:
                self.exits_after.setdefault(d - 1, []).append(e)
        mine = [e for es in self.exits_after.values() for e in es]
        self.wte = VocabEmbedding(cfg.vocab_size, cfg.n_embd, ps) if self.first else None
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == 'gpt2' and self.first else None
        self.drop = nn.Dropout(cfg.dropout)
        for i in cfg.pairs:
            if (i in layers) != (i + 1 in layers):
                raise ValueError(f'layer_parallel pair ({i}, {i + 1}) is split between pipeline stages '
                                 f'(this one holds blocks {min(layers)}..{max(layers)}); move the boundary')
        self.blocks = nn.ModuleDict({str(i): Block(cfg, ps, 2 if i in cfg.pairs else 1)
                                     for i in layers if i - 1 not in cfg.pairs})  # a pair under its first index
        self.norm_f = Norm(cfg) if self.last else None
        needs_head = self.last or (mine and not cfg.exit_untie)  # exits share the LM head's matrix
        self.lm_head = ColumnLinear(cfg.n_embd, cfg.vocab_size, False, ps) if needs_head else None
        self.exits = nn.ModuleDict({str(e): ExitHead(cfg, ps) for e in mine})
        self.checkpoint_blocks = False  # training: recompute each block in the backward instead of storing it
        self.register_buffer('rope_cos', None, persistent=False)
        self.register_buffer('rope_sin', None, persistent=False)
        self.init_weights(seed)

    def tie(self):
        """The output matrix is one logical tensor ('wte.weight' when tied, else 'lm_head.weight');
        a stage that needs it without holding the embedding keeps a copy under that name."""
        if self.lm_head is not None and self.config.tie_embeddings:
            if self.wte is not None:
                self.lm_head.weight = self.wte.weight
            else:
                self.lm_head.weight.logical_name = 'wte.weight'

    def logical_parameters(self):
        """(logical name, parameter) for every parameter this rank holds."""
        return [(getattr(p, 'logical_name', n), p) for n, p in self.named_parameters()]

    @torch.no_grad()
    def init_weights(self, seed=0):
        """GPT-2 init: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).
        Each logical tensor is drawn from a generator seeded by (seed, its name) and this
        rank keeps its shard, so the model is the same in every parallel layout.
        Also (re)computes the RoPE table: a model built on the meta device is materialised
        with model.to_empty(device=...) followed by model.init_weights()."""
        for m in self.modules():  # (again: to_empty from meta replaces the parameter objects)
            mark_splits(m)
        self.tie()
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        seen = set()
        for mname, m in self.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in seen or p.is_meta:
                    continue
                seen.add(id(p))
                if isinstance(m, (nn.LayerNorm, RMSNorm)) or pname == 'bias':
                    p.fill_(1.0 if pname == 'weight' else 0.0)  # norms 1, biases 0
                    continue
                std = resid_std if getattr(m, 'residual', False) else 0.02
                name = getattr(p, 'logical_name', f'{mname}.{pname}')
                full = torch.empty(logical_shape(p), device=p.device, dtype=p.dtype)
                gen = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.copy_(take_shard(full.normal_(0.0, std, generator=gen), p, self.ps))
        if self.config.arch == 'llama':
            cos, sin = rope_table(self.config, next(self.parameters()).device)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)

    def num_params(self, exits=True):
        """Parameters of this rank's part of the model, counted whole over tensor parallelism."""
        return sum(math.prod(logical_shape(p)) for n, p in self.named_parameters()
                   if exits or not n.startswith('exits.'))

    def flops_per_token(self, T):
        """Training FLOPs per token of the whole model (forward + backward = 6 per weight per
        token, PaLM appendix B), counting every matmul that runs: blocks, LM head, exits."""
        cfg = self.config
        attn_w = cfg.n_embd * cfg.head_dim * (2 * cfg.n_head + 2 * cfg.n_kv_head)   # q, o; k, v
        mlp_w = cfg.n_embd * cfg.ffn_hidden * (3 if cfg.arch == 'llama' else 2)
        exit_w = cfg.n_embd * cfg.vocab_size + (attn_w + mlp_w if cfg.exit_block else mlp_w if cfg.exit_mlp else 0)
        weights = cfg.n_layer * (attn_w + mlp_w) + cfg.n_embd * cfg.vocab_size + len(cfg.exit_layers) * exit_w
        n_attn = cfg.n_layer + (len(cfg.exit_layers) if cfg.exit_block else 0)
        attn = n_attn * 2 * 2 * cfg.n_head * cfg.head_dim * T               # QK^T and AV, forward
        return 6 * weights + 3 * attn

    # -- KV cache ------------------------------------------------------------
    def setup_cache(self, batch_size, max_len, dtype=None, device=None):
        """A fresh static KV cache of max_len positions in every attention layer (exits with a
        block included). Returns the caches, in module order, for use_cache to put back.
        (The positions written, not the cache's length, are bounded by block_size.)"""
        dtype = dtype or next(self.parameters()).dtype
        device = device or next(self.parameters()).device
        caches = [KVCache(batch_size, m.n_kv_head, max_len, m.head_dim, dtype, device)
                  for m in self.modules() if isinstance(m, Attention)]
        self.use_cache(caches)
        return caches

    def use_cache(self, caches):
        """Run with these caches (from setup_cache), or none (None)."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        for m, c in zip(layers, caches or [None] * len(layers)):
            m.cache = c

    # -- forward -------------------------------------------------------------
    def embed(self, idx, input_pos=None):
        """Token (+ position) embedding. Returns x (B, T, C) and the positions used."""
        T = idx.size(1)
        assert T <= self.config.block_size, f'sequence length {T} > block_size={self.config.block_size}'
        assert not self.ps.sp or T % self.ps.tp == 0, f'sp: sequence length {T} is not divisible by tp={self.ps.tp}'
        pos = torch.arange(T, device=idx.device) if input_pos is None else input_pos
        x = self.wte(idx)                  # (B, T, C), or (B, T/tp, C) under sequence parallelism
        if self.wpe is not None:  # (positions (T,) for every row, or (B, T) one set per row)
            x = x + self.wpe(seq_shard(pos if pos.dim() == 2 else pos[None], self.ps))
        return self.drop(x), pos

    def rope(self, pos):
        return None if self.rope_cos is None else (self.rope_cos[pos], self.rope_sin[pos])

    def exit_logits(self, e, x, rope=None, input_pos=None):
        """Logits of exit e (0-based, in exit_layers order) from the hidden state it reads."""
        return self.exits[str(e)](x, None if self.lm_head is None else self.lm_head.weight, rope, input_pos)

    def final_logits(self, x):
        return self.lm_head(enter(self.norm_f(x), self.ps))  # (B, T, V/tp)

    def loss(self, logits, targets):
        return cross_entropy(logits, targets, self.config.vocab_size, self.ps)

    def run_blocks(self, x, rope=None, input_pos=None, exits=False, keep=None):
        """This rank's blocks on hidden state x. Returns (x, [(exit index, hidden it reads)]).
        keep (n_layer, B) bool, in training: layer dropout's masks (layer_keep); a row that
        block i does not keep passes through it unchanged."""
        taps = []
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        keep = keep.to(x.device) if keep is not None and self.training else None
        for i, block in self.blocks.items():
            if recompute:  # keep only the block's input; rerun it (same dropout masks) in the backward
                y = checkpoint(block, x, rope, input_pos, use_reentrant=False)
            else:
                y = block(x, rope, input_pos)
            x = y if keep is None else torch.where(keep[int(i), :, None, None], y, x)
            if exits:
                taps += [(e, x) for e in self.exits_after.get(int(i) + block.width - 1, ())]
        return x, taps

    def forward(self, idx, targets=None, exits=False, input_pos=None, keep=None):
        """idx (B, T) token ids; targets (B, T) or None; exits: also compute every exit;
        input_pos (T,) positions to write in and read from the KV cache (after setup_cache);
        keep: layer dropout's masks (run_blocks).
        Without targets: returns (logits (B, T, V), [exit logits (B, T, V)]).
        With targets: returns (final CE, [exit CE]) for the caller to weight.
        With exits=False no exit computes anything and the list is empty."""
        x, pos = self.embed(idx, input_pos)
        rope = self.rope(pos)
        x, taps = self.run_blocks(x, rope, input_pos, exits, keep)
        outs = [self.exit_logits(e, h, rope, input_pos) for e, h in taps]
        logits = self.final_logits(x)
        if targets is None:
            return logits, outs
        return self.loss(logits, targets), [self.loss(lg, targets) for lg in outs]


def layer_keep(cfg, batch_size, key):
    """LayerSkip's layer dropout (Elhoushi et al. 2024, arXiv 2404.16710) for one micro-batch:
    (n_layer, B) bool, False where block i skips row b, with probability rising linearly with
    depth to layer_dropout at the last block. Drawn from a generator seeded by key alone (the
    step and the micro-batch's place in the global batch), so that every layout draws the same."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    p = cfg.layer_dropout * torch.arange(cfg.n_layer, dtype=torch.float64) / max(1, cfg.n_layer - 1)
    return torch.rand(cfg.n_layer, batch_size, generator=g, dtype=torch.float64) >= p[:, None]


def pair_tensor(get, cfg, i, name):
    """Logical tensor `name` (e.g. 'attn.q.weight') of the layer-parallel pair (i, i+1) from
    get(full name) -> a tensor of the ordinary model. Each norm's gain g and bias b move into
    the matmuls that read it, W (n(x) g + b) + c = (W g) n(x) + (W b + c), so the pair's
    norms have none; output projections read both layers' heads (hidden units) and add."""
    part, kind = name.rsplit('.', 1)                    # 'attn.q', 'weight'
    a, b = f'blocks.{i}.', f'blocks.{i + 1}.'
    if part in ('norm1', 'norm2'):
        return (torch.ones_like if kind == 'weight' else torch.zeros_like)(get(a + name))
    if part in ('attn.o', 'mlp.down'):
        return torch.cat([get(a + name), get(b + name)], 1) if kind == 'weight' else get(a + name) + get(b + name)
    norm = 'norm1.' if part.startswith('attn.') else 'norm2.'

    def fold(p):
        W = get(p + part + '.weight').double()
        if kind == 'weight':
            return W * get(p + norm + 'weight').double()
        return get(p + name).double() + (W @ get(p + norm + 'bias').double() if cfg.arch == 'gpt2' else 0)
    return torch.cat([fold(a), fold(b)], 0)
