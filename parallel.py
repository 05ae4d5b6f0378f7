"""
Data, tensor and sequence parallelism written by hand over torch.distributed.

    torchrun --nproc_per_node=4 train.py config/train_pystdlib.py --tp=2 --gradient_accumulation_steps=2  # dp2 x tp2
    torchrun --nproc_per_node=2 train.py config/train_pystdlib.py --tp=2 --sp=True

- Tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv 1909.08053): attention heads
  and MLP columns are split over the tp ranks; a column-parallel matmul needs its input on
  every rank (`enter`), a row-parallel one leaves partial sums to add up (`leave`). The
  vocabulary is split too: embedding, LM head and exit heads, with a cross-entropy that
  never gathers the full vocabulary.
- Sequence parallelism (Korthikanti et al. 2022, arXiv 2205.05198): between the matmuls,
  the residual stream is split along the sequence, so norms and dropout run on shards;
  `enter` becomes an all-gather and `leave` a reduce-scatter.
- Data parallelism: gradients are all-reduced in buckets from backward hooks, overlapping
  the rest of the backward pass.

Every parameter keeps its logical (single-process) name. A split parameter's local tensor
is the tp_rank-th of tp equal chunks of the logical tensor zero-padded to a multiple of tp
(only the vocabulary ever needs padding). What a layout does to a parameter is written on
it as tags, the only ones in the code base, read through the helpers below them:

| tag | set by | meaning | read through |
|---|---|---|---|
| `tp_dim` | `mark_splits` (split layers here) | the dimension split over tp | `split_dim`, `local_range` |
| `logical_shape` | `mark_splits` | the shape of the whole tensor | `logical_shape` |
| `logical_name` | `GPT.tie` (model.py) | a stage's copy of the tied output matrix is 'wte.weight' | `GPT.logical_parameters` |
| `copy_group` | `build_stage` (pipeline.py) | the group of stages holding copies of this matrix | `GradSync` (sums their gradients) |
| `duplicate` | `build_stage` | a copy whose first holder is another stage | `counted_here` |

`counted_here(p, ps)` says whether this rank's shard counts for the logical tensor: split
shards always, replicated tensors on tp rank 0, a stage's copy only on its first holder.
Clipping's global norm and checkpoint writing both use it. At world size 1 nothing here
touches torch.distributed.
"""

import os

import torch
import torch.distributed as dist

# all_gather_single / reduce_scatter_single are the newer names of the same collectives
_all_gather = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, 'reduce_scatter_single', None) or dist.reduce_scatter_tensor


def check_layout(world, tp, pp, sp, cfg=None):
    """Raise one clear error for a layout that cannot work, before any collective runs."""
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f'world size {world} is not divisible by tp*pp = {tp}*{pp}')
    if sp and tp == 1:
        raise ValueError('sp=True needs tp > 1 (sequence parallelism splits within the tensor-parallel group)')
    if cfg is not None:
        for name, n in (('n_head', cfg.n_head), ('n_kv_head', cfg.n_kv_head), ('ffn_hidden', cfg.ffn_hidden)):
            if n % tp:
                raise ValueError(f'{name}={n} is not divisible by tp={tp}')


class ParallelState:
    """The dp x pp x tp grid of ranks (rank = (d * pp + p) * tp + t) and its process groups.
    Groups: tp (same d, p), pp (same d, t), dp (same p, t), mp = tp x pp (same d)."""

    def __init__(self, tp=1, pp=1, sp=False, world=None, rank=None):
        distributed = dist.is_available() and dist.is_initialized()
        self.world = world if world is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        check_layout(self.world, tp, pp, sp)
        self.tp, self.pp, self.sp, self.dp = tp, pp, sp, self.world // (tp * pp)
        grid = torch.arange(self.world).view(self.dp, pp, tp)
        self.dp_rank, self.pp_rank, self.tp_rank = (int(i) for i in (grid == self.rank).nonzero()[0])
        self.tp_group = self.pp_group = self.dp_group = self.mp_group = None
        if self.world > 1:  # new_group is collective: every rank creates every group, in one order
            for name, groups in (('tp', grid.reshape(-1, tp)), ('pp', grid.transpose(1, 2).reshape(-1, pp)),
                                 ('dp', grid.permute(1, 2, 0).reshape(-1, self.dp)),
                                 ('mp', grid.reshape(self.dp, -1))):
                for ranks in groups.tolist():
                    g = dist.new_group(ranks)
                    if self.rank in ranks:
                        setattr(self, f'{name}_group', g)
        self._grid, self._stage_groups = grid, {}

    def stage_rank(self, stage):
        """Global rank of this rank's counterpart (same dp and tp position) on another stage."""
        return int(self._grid[self.dp_rank, stage, self.tp_rank])

    def stage_group(self, stages):
        """A group joining this rank's counterparts on the given pipeline stages (e.g. the
        stages holding a copy of the output matrix). Collective: every rank calls it alike."""
        key = tuple(stages)
        if key not in self._stage_groups:
            mine = None
            if self.world > 1 and len(key) > 1:
                for d in range(self.dp):
                    for t in range(self.tp):
                        ranks = [int(self._grid[d, p, t]) for p in key]
                        g = dist.new_group(ranks)
                        if self.rank in ranks:
                            mine = g
            self._stage_groups[key] = mine
        return self._stage_groups[key]

    def __str__(self):
        return f'dp{self.dp}-pp{self.pp}-tp{self.tp} rank {self.rank}'

    @property
    def is_main(self):
        return self.rank == 0


LOCAL = ParallelState(world=1, rank=0)  # one process: every group trivial


def init_distributed(device='cuda'):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU) and pick this
    rank's GPU. Returns the device string. A plain `python` run is left alone."""
    if int(os.environ.get('WORLD_SIZE', '1')) == 1:
        return device
    if device.startswith('cuda'):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.startswith('cuda'):
            dist.init_process_group('nccl', device_id=torch.device(device))
        else:
            dist.init_process_group('gloo')
    return device


# -----------------------------------------------------------------------------
# collectives along a tensor dimension

def all_gather(x, dim, group, n):
    """Concatenate the n ranks' x along dim."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    _all_gather(out, x, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x, dim, group, n):
    """Sum x over the n ranks and keep this rank's chunk along dim."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    _reduce_scatter(out, x, group=group)
    return out.movedim(0, dim)


def all_reduce(x, group):
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _Enter(torch.autograd.Function):
    """Into a tensor-parallel region. Forward: identity (or all-gather the sequence under sp);
    backward: all-reduce the gradient (or reduce-scatter it under sp)."""

    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return all_gather(x, 1, ps.tp_group, ps.tp) if ps.sp else x

    @staticmethod
    def backward(ctx, g):
        ps = ctx.ps
        return (reduce_scatter(g, 1, ps.tp_group, ps.tp) if ps.sp else all_reduce(g, ps.tp_group)), None


class _Leave(torch.autograd.Function):
    """Out of a tensor-parallel region: sum the partial results (all-reduce, or reduce-scatter
    along the sequence under sp); backward: identity (or all-gather under sp)."""

    @staticmethod
    def forward(ctx, x, ps):
        ctx.ps = ps
        return reduce_scatter(x, 1, ps.tp_group, ps.tp) if ps.sp else all_reduce(x, ps.tp_group)

    @staticmethod
    def backward(ctx, g):
        ps = ctx.ps
        return (all_gather(g, 1, ps.tp_group, ps.tp) if ps.sp else g), None


def enter(x, ps):  # x (B, T/tp or T, C) -> (B, T, C), replicated over tp
    return x if ps.tp == 1 else _Enter.apply(x, ps)


def leave(x, ps):  # partial sums (B, T, C) -> (B, T/tp or T, C)
    return x if ps.tp == 1 else _Leave.apply(x, ps)


def seq_shard(x, ps):
    """This rank's slice of the sequence (dim 1) under sp; x itself otherwise."""
    return x.chunk(ps.tp, dim=1)[ps.tp_rank] if ps.sp else x


# -----------------------------------------------------------------------------
# layers: nn.Linear / nn.Embedding holding one shard; identical to them at tp=1

def split_size(n, ps):
    return -(-n // ps.tp)  # ceil: only the vocabulary is ever padded


def mark_splits(module):
    """Tag the parameters of a split layer with tp_dim and logical_shape. Called when the
    layer is built, and again after to_empty(), which replaces parameter objects."""
    for name, (dim, size) in getattr(module, 'splits', {}).items():
        p = getattr(module, name)
        if p is not None and module.ps.tp > 1:
            p.tp_dim = dim
            p.logical_shape = tuple(size if d == dim else s for d, s in enumerate(p.shape))


class ColumnLinear(torch.nn.Linear):
    """y[:, shard] = x @ W[shard].T: output features split over tp. The input must be on
    every rank already (call enter once for all the column layers that share an input)."""

    def __init__(self, in_features, out_features, bias, ps):
        super().__init__(in_features, split_size(out_features, ps), bias=bias)
        self.ps, self.splits = ps, {'weight': (0, out_features), 'bias': (0, out_features)}
        mark_splits(self)


class RowLinear(torch.nn.Linear):
    """y = sum over tp of x[:, shard] @ W[:, shard].T, then + bias: input features split."""

    def __init__(self, in_features, out_features, bias, ps):
        super().__init__(in_features // ps.tp, out_features, bias=bias)
        self.ps, self.splits = ps, {'weight': (1, in_features)}
        mark_splits(self)

    def forward(self, x):
        y = leave(torch.nn.functional.linear(x, self.weight), self.ps)
        return y if self.bias is None else y + self.bias


class VocabEmbedding(torch.nn.Embedding):
    """Rows of the embedding split over tp; each rank looks up the ids it holds, zeros for
    the rest, and the sum over ranks is the embedding (reduce-scattered under sp)."""

    def __init__(self, vocab_size, dim, ps):
        super().__init__(split_size(vocab_size, ps), dim)
        self.ps, self.splits = ps, {'weight': (0, vocab_size)}
        self.start = ps.tp_rank * split_size(vocab_size, ps)
        mark_splits(self)

    def forward(self, idx):
        if self.ps.tp == 1:
            return super().forward(idx)
        local = idx - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = super().forward(local.masked_fill(outside, 0)).masked_fill(outside[..., None], 0.0)
        return leave(x, self.ps)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary: three all-reduces of (N,)
    vectors (max, target logit, sum of exponentials) instead of gathering (N, V)."""

    @staticmethod
    def forward(ctx, logits, targets, start, ps):
        # logits (N, V/tp) float32, this rank's columns [start, start + V/tp); targets (N,)
        m = logits.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.tp_group)
        logits = logits - m[:, None]
        local = targets - start
        mine = (local >= 0) & (local < logits.size(1))
        target_logit = logits.gather(1, local.clamp(0, logits.size(1) - 1)[:, None])[:, 0] * mine
        exp = logits.exp()
        sum_exp = exp.sum(-1)
        both = torch.stack([target_logit, sum_exp])
        dist.all_reduce(both, group=ps.tp_group)
        target_logit, sum_exp = both
        valid = targets >= 0
        loss = (sum_exp.log() - target_logit) * valid
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local, mine & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, mine, valid = ctx.saved_tensors
        grad = softmax  # d loss / d logits = softmax - onehot(target)
        rows = mine.nonzero()[:, 0]
        grad[rows, local[rows]] -= 1.0
        return grad * (g * valid)[:, None], None, None, None


def cross_entropy(logits, targets, vocab_size, ps):
    """Mean cross-entropy of (B, T, V/tp) logits against (B, T) targets; -1 is ignored.
    Padded vocabulary columns (past vocab_size) never count."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1)  # at least float32
    targets = targets.flatten()
    if ps.tp == 1:
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1)
    start = ps.tp_rank * logits.size(1)
    if start + logits.size(1) > vocab_size:  # the padded tail never wins
        pad = torch.arange(start, start + logits.size(1), device=logits.device) >= vocab_size
        logits = logits.masked_fill(pad, float('-inf'))
    loss = _VocabParallelCE.apply(logits, targets, start, ps)
    return loss.sum() / (targets >= 0).sum().clamp(min=1)


# -----------------------------------------------------------------------------
# logical tensors <-> shards

def split_dim(p):
    """The dimension of p split over tp, or None if p is replicated."""
    return getattr(p, 'tp_dim', None)


def logical_shape(p):
    """The shape of the whole logical tensor that p (or its shard) belongs to."""
    return tuple(getattr(p, 'logical_shape', p.shape))


def counted_here(p, ps):
    """Whether this rank's p counts for its logical tensor (in a norm, in a checkpoint): every
    shard of a split one; a replicated one on tp rank 0; a stage's copy on its first holder."""
    return (split_dim(p) is not None or ps.tp_rank == 0) and not getattr(p, 'duplicate', False)


def local_range(p, ps):
    """(dim, start, end) of the logical tensor that this rank's shard of p holds
    (end clipped to the logical size: the padding is not part of it); None if replicated."""
    dim = split_dim(p)
    if dim is None:
        return None
    n = p.shape[dim]
    start = ps.tp_rank * n
    return dim, start, min(start + n, logical_shape(p)[dim])


def take_shard(full, p, ps):
    """This rank's shard of the logical tensor full, zero-padded to p's local shape."""
    r = local_range(p, ps)
    if r is None:
        return full
    dim, start, end = r
    out = torch.zeros_like(p, device=full.device, dtype=full.dtype)
    if end > start:
        out.narrow(dim, 0, end - start).copy_(full.narrow(dim, start, end - start))
    return out


def full_tensor(t, p, ps):
    """The logical tensor from each rank's shard t of parameter p (t: the parameter, its
    gradient or an optimizer state). A collective over the tp group."""
    r = local_range(p, ps)
    if r is None:
        return t
    full = all_gather(t, r[0], ps.tp_group, ps.tp)
    return full.narrow(r[0], 0, logical_shape(p)[r[0]])


# -----------------------------------------------------------------------------
# gradients

class GradSync:
    """Data-parallel gradient sum. Under dp > 1 gradients live in flat buckets (p.grad is a
    view into one); when the last gradient of a bucket is accumulated during the backward of
    the last micro-batch (sync=True), the bucket's all-reduce starts at once, overlapping the
    rest of the backward pass; wait() finishes them. At dp = 1 there is nothing to send, and
    the gradients stay autograd's own tensors: zero() drops them, so that the first backward
    of a step stores its gradient instead of adding it to zeros (one kernel and a memset per
    parameter saved: 1.0 of 35 GPU ms in a GPT-2 124M step on an H200). With sp, the gradients of replicated
    parameters (norms, biases after a row-parallel layer, positions) are partial sums over
    the sequence shards and are summed over the tp group too. A parameter copied on several
    pipeline stages (copy_group) has its gradient summed over them."""

    def __init__(self, params, ps, bucket_mb=25):
        self.ps, self.sync = ps, False
        self.params = list({id(p): p for p in params if p.requires_grad}.values())
        self.buckets, bucket, size = [], [], 0
        for p in reversed(self.params if ps.dp > 1 else []):  # gradients arrive roughly in reverse order
            bucket.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_mb * 2**20:
                self.buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            self.buckets.append(bucket)
        self.bufs, self.pending, self.handles = [], [0] * len(self.buckets), [None] * len(self.buckets)
        for b, params in enumerate(self.buckets):
            buf = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            offset = 0
            for p in params:
                p.grad = buf[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if ps.dp > 1:
                    p.register_post_accumulate_grad_hook(self._hook(b))
            self.bufs.append(buf)
        self.replicated = [p for p in self.params if split_dim(p) is None]
        self.copies = [p for p in self.params if getattr(p, 'copy_group', None) is not None]

    def _hook(self, b):
        def hook(p):
            if self.sync:
                self.pending[b] += 1
                if self.pending[b] == len(self.buckets[b]):
                    self.handles[b] = dist.all_reduce(self.bufs[b], group=self.ps.dp_group, async_op=True)
        return hook

    def wait(self):
        """After the last backward: all data-parallel (and sp) sums are done."""
        if self.ps.dp > 1:
            for b, buf in enumerate(self.bufs):
                if self.handles[b] is None:  # a bucket whose gradients never arrived (unused)
                    dist.all_reduce(buf, group=self.ps.dp_group)
                else:
                    self.handles[b].wait()
            self.pending, self.handles = [0] * len(self.buckets), [None] * len(self.buckets)
        for p in self.replicated * self.ps.sp + self.copies:  # (a parameter this rank did not use)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.ps.sp and self.replicated:
            flat = torch.cat([p.grad.flatten() for p in self.replicated])
            dist.all_reduce(flat, group=self.ps.tp_group)
            offset = 0
            for p in self.replicated:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        for p in self.copies:  # a matrix held by several pipeline stages: sum their gradients
            dist.all_reduce(p.grad, group=p.copy_group)

    def zero(self):
        for buf in self.bufs:
            buf.zero_()
        if not self.bufs:
            for p in self.params:
                p.grad = None


def clip_grad_norm_(params, max_norm, ps):
    """Scale gradients so that their global norm is at most max_norm; returns the norm.
    Each logical parameter counts once: split ones sum over tp (and stages over pp),
    replicated ones count on tp rank 0 only, copies on several stages on the first one,
    dp replicas are equal and count once."""
    params = list({id(p): p for p in params}.values())
    sq = torch.zeros((), device=params[0].device, dtype=torch.float32)
    params = [p for p in params if p.grad is not None]  # (a stage with nothing to learn still joins the sum)
    counted = [p.grad for p in params if counted_here(p, ps)]
    for dt in dict.fromkeys(g.dtype for g in counted):  # one multi-tensor kernel per dtype
        acc = torch.promote_types(dt, torch.float32)      # bf16/fp16 sum in float32, float64 in float64
        norms = torch._foreach_norm([g for g in counted if g.dtype == dt], 2.0, dtype=acc)
        sq = sq + torch.stack(norms).square().sum().float()
    if ps.tp * ps.pp > 1:
        dist.all_reduce(sq, group=ps.mp_group)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if params:
        torch._foreach_mul_([p.grad for p in params], coef)
    return norm
