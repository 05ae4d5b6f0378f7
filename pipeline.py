"""
Pipeline parallelism for early-exit models: stages, schedules as data, 1F1B with
early-exit backprop and bubble filling (EE-LLM, Chen et al. 2023, arXiv 2312.04916).

    torchrun --nproc_per_node=4 train.py config/train_pystdlib.py --pp=2 --tp=2 --gradient_accumulation_steps=8 --fill_bubbles
    python pipeline.py --pp=4 --microbatches=8 --fill_bubbles       # draw the schedule

A schedule is a pure function: for each stage, the ordered list of actions (forward or
backward of a microbatch, with the activation/gradient it receives and sends). The
executor runs one list; `simulate` runs all of them against each other, as NCCL would
match their sends and receives, to check them and to draw the timeline.

Early-exit backprop: a stage keeps the hidden states its exits read and computes the
exit logits only right before the microbatch's backward (so no vocabulary-sized tensor
waits across the pipeline), then runs ONE backward of
    sum_e w_e * exit_CE_e / A  +  sum(output * grad_from_next_stage)
(the last stage adds final_CE / A), A = gradient_accumulation_steps.

Bubble filling. With forward time f and backward time r*f (r = backward_forward_ratio),
1F1B leaves stage s idle for about (P-1-s)*r*f before its first backward and s*r*f after
its last; EE-LLM's default fill count for both is int((P-1) r/(1+r)). Fill microbatches
are extra sequences (drawn after the step's regular ones) that add to the objective:
  - warm-up fill j runs forward and backward on stages 0..D_j-1 only, where stage s takes
    it if j < int((r(P-1-s) - s)/(1+r)), and D_j-1 is the deepest such stage with an exit;
    it adds sum over the exits e it reaches of w_e * exit_CE_e(j) / A.
  - cool-down fill j runs forward on every stage but backward only on stages s >= c_j,
    those with j < int(r s/(1+r)); it adds (final_CE(j) + sum over exits e on stages
    >= c_j of w_e * exit_CE_e(j)) / A, with the stage-c_j input held constant (no
    gradient reaches earlier stages).
"""

from collections import namedtuple

import torch
import torch.distributed as dist

from configurator import configure, run
from model import GPT

# a microbatch: id, forward on stages [0, fwd_end), backward on stages [bwd_start, fwd_end)
Micro = namedtuple('Micro', 'id kind fwd_end bwd_start')
# one step of a stage: op 'F' or 'B' of microbatch mb; recv/send: None or (peer stage, 'act' | 'grad', mb)
Action = namedtuple('Action', 'op mb recv send')


def stage_layers(n_layer, pp, pp_layers=None):
    """Block index ranges of the pp stages: an even split, or pp_layers blocks per stage."""
    if pp_layers is None:
        if n_layer % pp:
            raise ValueError(f'n_layer={n_layer} is not divisible by pp={pp}; give pp_layers, e.g. a list of '
                             f'{pp} block counts summing to {n_layer}')
        pp_layers = [n_layer // pp] * pp
    if len(pp_layers) != pp or sum(pp_layers) != n_layer or min(pp_layers) < 1:
        raise ValueError(f'pp_layers={list(pp_layers)}: need {pp} positive block counts summing to n_layer={n_layer}')
    starts = [sum(pp_layers[:i]) for i in range(pp)]
    return [range(a, a + n) for a, n in zip(starts, pp_layers)]


def exit_stages(cfg, layers):
    """The stage of each exit (the one holding the block whose output it reads)."""
    return [next(s for s, r in enumerate(layers) if d - 1 in r) for d in cfg.exit_depths]


def fill_counts(pp, r, fill_bubbles, fill_warmup=None, fill_cooldown=None):
    """EE-LLM's default fill count int((P-1) r / (1+r)) for each phase, unless given."""
    default = int((pp - 1) * r / (1 + r)) if fill_bubbles else 0
    return (default if fill_warmup is None else fill_warmup), (default if fill_cooldown is None else fill_cooldown)


def microbatches(P, M, fill_warmup=0, fill_cooldown=0, r=2.0, stages_with_exits=()):
    """Regular microbatches 0..M-1, then the fill microbatches that have an exit to train."""
    mbs = [Micro(k, 'regular', P, 0) for k in range(M)]
    for j in range(fill_warmup):
        depth = sum(1 for s in range(P) if j < int((r * (P - 1 - s) - s) / (1 + r)))
        reach = [s for s in stages_with_exits if s < depth]
        if reach:  # no deeper than the deepest exit it can reach
            mbs.append(Micro(len(mbs), 'warmup', max(reach) + 1, 0))
    for j in range(fill_cooldown):
        start = next((s for s in range(P) if j < int(r * s / (1 + r))), P)
        if start < P:
            mbs.append(Micro(len(mbs), 'cooldown', P, start))
    return mbs


def plan_microbatches(cfg, pp, M, pp_layers=None, fill_bubbles=False, fill_warmup=None, fill_cooldown=None, r=2.0):
    """A step's microbatches in a layout of pp stages: M regular ones, then the bubble-filling
    ones (fill_counts) that reach an exit of model config cfg."""
    kw, kc = fill_counts(pp, r, fill_bubbles, fill_warmup, fill_cooldown)
    return microbatches(pp, M, kw, kc, r, exit_stages(cfg, stage_layers(cfg.n_layer, pp, pp_layers)))


def schedule(P, s, mbs, kind='1f1b'):
    """The actions of stage s. '1f1b': warm-up forwards, then one forward one backward,
    then the remaining backwards (PipeDream-Flush); warm-up fills go right after the
    warm-up forwards (their backwards in reverse order), cool-down fills run as the last
    microbatches, their backward skipped before bwd_start. 'gpipe': all forwards, then all
    backwards in reverse."""
    def F(m):
        return Action('F', m.id, (s - 1, 'act', m.id) if s > 0 else None,
                      (s + 1, 'act', m.id) if s + 1 < m.fwd_end else None)

    def B(m):
        return Action('B', m.id, (s + 1, 'grad', m.id) if s + 1 < m.fwd_end else None,
                      (s - 1, 'grad', m.id) if s - 1 >= m.bwd_start else None)

    main = [m for m in mbs if m.kind != 'warmup']
    fills = [m for m in mbs if m.kind == 'warmup' and s < m.fwd_end]
    back = lambda m: [B(m)] if s >= m.bwd_start else []
    if kind == 'gpipe':
        acts = [F(m) for m in main + fills]
        for m in reversed(main + fills):
            acts += back(m)
        return acts
    warm = min(P - s - 1, len(main))
    acts = [F(m) for m in main[:warm]]
    early = 0  # steady-state forwards already run before the fills
    if fills:
        # the fills go into the idle slot before the first backward, after the first steady
        # forward. Stage s-1 is one forward ahead, so its fill activations arrive after one
        # more regular activation than stage s has consumed: receive that one first ('R').
        if warm < len(main):
            acts.append(F(main[warm]))
            early = 1
            if s > 0 and warm + 1 < len(main):
                m = main[warm + 1]
                acts.append(Action('R', m.id, (s - 1, 'act', m.id), None))
                early = 2
        acts += [F(m) for m in fills] + [B(m) for m in reversed(fills)]
    for i in range(len(main) - warm):
        if not (i == 0 and early):  # (that one already ran before the fills)
            f = F(main[warm + i])
            acts.append(f._replace(recv=None) if i == 1 and early == 2 else f)
        acts += back(main[i])
    for m in main[len(main) - warm:]:
        acts += back(m)
    return acts


def comm_batches(actions):
    """Group the point-to-point operations as the executor posts them: before each action,
    the sends still pending from the previous one together with this action's receive, in
    one batch (batched isend/irecv), so two neighbours that swap an activation for a
    gradient never wait on each other. Returns [(ops, action or None)], ops = [(send?, op)]."""
    out, pending = [], []
    for a in actions:
        ops = pending + ([(False, a.recv)] if a.recv else [])
        out.append((ops, a))
        pending = [(True, a.send)] if a.send else []
    out.append((pending, None))
    return out


def simulate(P, all_actions, r=2.0):
    """Run every stage's action list against the others, matching sends with receives in
    order as NCCL does (a batch completes when all its operations have their partners
    posted). Forward takes 1 time unit, backward r. Returns per stage [(start, end, action)];
    raises RuntimeError on a deadlock or a mismatched message."""
    plans = [comm_batches(a) for a in all_actions]
    pos, clock, timeline = [0] * P, [0.0] * P, [[] for _ in range(P)]
    done = [set() for _ in range(P)]  # indices of finished ops in each stage's current batch
    while any(pos[s] < len(plans[s]) for s in range(P)):
        progress = False
        for s in range(P):
            if pos[s] >= len(plans[s]):
                continue
            ops, action = plans[s][pos[s]]
            t = clock[s]
            for i, (is_send, (peer, what, mb)) in enumerate(ops):
                if i in done[s]:
                    continue
                if not 0 <= peer < P or pos[peer] >= len(plans[peer]):
                    raise RuntimeError(f'stage {s} waits on stage {peer}, which has finished or does not exist')
                peer_ops = plans[peer][pos[peer]][0]
                j = next((j for j, (ps, (pp_, w, m)) in enumerate(peer_ops)
                          if ps != is_send and pp_ == s and w == what and j not in done[peer]), None)
                if j is None:
                    continue
                if peer_ops[j][1][2] != mb:
                    raise RuntimeError(f'stage {s} and {peer} disagree on the {what} exchanged: '
                                       f'microbatch {mb} vs {peer_ops[j][1][2]}')
                done[s].add(i)
                done[peer].add(j)
                t = max(t, clock[peer])
                clock[s] = clock[peer] = t
            if len(done[s]) == len(ops):
                if action is not None and action.op != 'R':
                    dur = 1.0 if action.op == 'F' else r
                    timeline[s].append((clock[s], clock[s] + dur, action))
                    clock[s] += dur
                done[s], pos[s], progress = set(), pos[s] + 1, True
        if not progress:
            raise RuntimeError('deadlock: ' + ', '.join(f'stage {s} at step {pos[s]}' for s in range(P)))
    return timeline


def draw(P, all_actions, mbs, r=2.0, width=1):
    """The timeline as text, one row per stage: forward of microbatch k is the digit k % 10,
    its backward the letter 'a' + k % 26 (r units long); warm-up fills '+' and '-', cool-down
    fills '*' and '~' where they differ; '.' is idle."""
    timeline = simulate(P, all_actions, r)
    kinds = {m.id: m.kind for m in mbs}
    end = max(e for row in timeline for _, e, _ in row)
    lines = []
    for s, row in enumerate(timeline):
        cells = ['.'] * int(round(end * width))
        for a, b, act in row:
            k = kinds[act.mb]
            ch = (str(act.mb % 10) if act.op == 'F' else chr(ord('a') + act.mb % 26)) if k == 'regular' else \
                {('warmup', 'F'): '+', ('warmup', 'B'): '-', ('cooldown', 'F'): '*', ('cooldown', 'B'): '~'}[k, act.op]
            for t in range(int(round(a * width)), int(round(b * width))):
                cells[t] = ch
        lines.append(f'stage {s} |' + ''.join(cells) + '|')
    busy = sum(b - a for row in timeline for a, b, act in row if kinds[act.mb] == 'regular')
    return '\n'.join(lines), end, busy


def bubble_fraction(P, M, r=2.0):
    """Idle share of 1F1B without filling, from the simulation; theory: (P-1)/(M+P-1)."""
    mbs = microbatches(P, M)
    _, end, busy = draw(P, [schedule(P, s, mbs) for s in range(P)], mbs, r)
    return 1 - busy / (P * end)


# -----------------------------------------------------------------------------
# building a stage

def build_stage(cfg, ps, pp_layers=None, seed=0, device='cpu'):
    """This rank's stage of the model. The stages that hold the output matrix (the LM head,
    exits sharing it, the embedding when tied) keep equal copies: their gradients are
    summed over those stages (EE-LLM's embedding group) and the first holder saves it."""
    layers = stage_layers(cfg.n_layer, ps.pp, pp_layers)
    model = GPT(cfg, ps, seed, layers[ps.pp_rank]).to(device)
    if ps.pp > 1:
        holders = [s for s, r in enumerate(layers) if (cfg.n_layer - 1 in r) or (cfg.tie_embeddings and 0 in r) or
                   (not cfg.exit_untie and s in exit_stages(cfg, layers))]
        group = ps.stage_group(holders)  # collective: every rank asks for the same stages
        if ps.pp_rank in holders and len(holders) > 1:
            w = model.lm_head.weight if model.lm_head is not None else model.wte.weight
            w.copy_group, w.duplicate = group, ps.pp_rank != holders[0]
    return model, layers


# -----------------------------------------------------------------------------
# the executor

def _p2p(ops, ps, bufs):
    """Post one batch of sends/receives to the neighbouring stages and wait for it."""
    if not ops:
        return
    reqs = []
    for is_send, (peer, what, mb) in ops:
        rank = ps.stage_rank(peer)
        if is_send:
            reqs.append(dist.P2POp(dist.isend, bufs.pop(('send', what, mb)).contiguous(), rank))  # (sp: views)
        else:
            reqs.append(dist.P2POp(dist.irecv, bufs[('recv', what, mb)], rank))
    for req in dist.batch_isend_irecv(reqs):
        req.wait()


def pipeline_forward_backward(model, grads, batch, w, accum, ctx, scaler, ps, mbs, kind='1f1b', keep=None):
    """Run this stage's schedule for one step. batch(k) gives microbatch k's (x, y), keep(k)
    its layer-dropout masks (or None); w: exit weights. Returns the regular microbatches' loss sums (final, exits...) / accum,
    filled in on the stage that computes each (the caller sums over stages)."""
    s, param = ps.pp_rank, next(model.parameters())
    by_id = {m.id: m for m in mbs}
    sums = torch.zeros(1 + len(w), device=param.device, dtype=torch.float64)
    saved, bufs = {}, {}
    B, T = batch(mbs[0].id)[0].shape
    shape = (B, T // ps.tp if ps.sp else T, model.config.n_embd)  # activations and their gradients, agreed in advance
    rope = model.rope(torch.arange(T, device=param.device))
    plan = comm_batches(schedule(ps.pp, s, mbs, kind))
    last_b = max((i for i, (_, a) in enumerate(plan) if a is not None and a.op == 'B'), default=-1)
    for i, (ops, act) in enumerate(plan):
        for is_send, (peer, what, mb) in ops:
            if not is_send:
                bufs[('recv', what, mb)] = torch.empty(shape, device=param.device, dtype=param.dtype)
        _p2p(ops, ps, bufs)
        if act is None or act.op == 'R':  # (R: an early receive, kept for its forward)
            continue
        m = by_id[act.mb]
        if act.op == 'F':
            grad = s >= m.bwd_start
            with torch.set_grad_enabled(grad), ctx:
                if model.first:
                    inp, _ = model.embed(batch(act.mb)[0])
                else:
                    inp = bufs.pop(('recv', 'act', act.mb)).requires_grad_(grad and s > m.bwd_start)
                out, taps = model.run_blocks(inp, rope, exits=grad, keep=keep and keep(act.mb))
            if act.send:
                bufs[('send', 'act', act.mb)] = out.detach()
            if grad:
                saved[act.mb] = (inp, out, taps)
        else:
            inp, out, taps = saved.pop(act.mb)
            y = batch(act.mb)[1]
            with ctx:  # the heads run now, just before the backward
                loss = torch.zeros((), device=param.device)
                for e, h in taps:
                    ce = model.loss(model.exit_logits(e, h, rope), y)
                    loss = loss + w[e] * ce
                    if m.kind == 'regular':
                        sums[1 + e] += ce.detach().double() / accum
                if model.last and m.fwd_end == ps.pp:
                    ce = model.loss(model.final_logits(out), y)
                    loss = loss + ce
                    if m.kind == 'regular':
                        sums[0] += ce.detach().double() / accum
            # one backward: the weighted exit losses (+ final loss) + sum(output * grad from the next stage)
            tensors, grad_ins = [scaler.scale(loss / accum)], [None]
            if act.recv:
                tensors.append(out)
                grad_ins.append(bufs.pop(('recv', 'grad', act.mb)))
            grads.sync = i == last_b  # data-parallel all-reduce during the stage's last backward
            torch.autograd.backward([t for t in tensors if t.requires_grad],
                                    [g for t, g in zip(tensors, grad_ins) if t.requires_grad])
            if act.send:
                bufs[('send', 'grad', act.mb)] = inp.grad
    return sums


def stage_forward(model, x, ps):
    """This stage's part of a forward-only pass over batch x (B, T): the embedding on the
    first stage, else the previous stage's hidden states; this stage's blocks; the hidden
    states on to the next stage. Returns (h, taps, rope) for the caller's heads."""
    if model.first:
        h, _ = model.embed(x)
    else:
        h = torch.empty((x.size(0), x.size(1) // ps.tp if ps.sp else x.size(1), model.config.n_embd),
                        device=x.device, dtype=next(model.parameters()).dtype)
        dist.recv(h, ps.stage_rank(ps.pp_rank - 1))
    rope = model.rope(torch.arange(x.size(1), device=x.device))
    h, taps = model.run_blocks(h, rope, exits=True)
    if ps.pp_rank < ps.pp - 1:
        dist.send(h.contiguous(), ps.stage_rank(ps.pp_rank + 1))
    return h, taps, rope


@torch.no_grad()
def pipeline_eval(model, x, y, ps, n_exits):
    """Losses (final, exits...) of one batch through the stages in turn, each stage filling
    in its own (the caller sums over stages)."""
    out = torch.zeros(1 + n_exits, device=x.device)
    h, taps, rope = stage_forward(model, x, ps)
    for e, t in taps:
        out[1 + e] = model.loss(model.exit_logits(e, t, rope), y)
    if model.last:
        out[0] = model.loss(model.final_logits(h), y)
    return out


def main(argv):
    args = configure({'pp': 4, 'microbatches': 8, 'fill_bubbles': False, 'fill_warmup': None, 'fill_cooldown': None,
                      'backward_forward_ratio': 2.0, 'schedule': '1f1b'}, argv)
    P, M, r = args['pp'], args['microbatches'], args['backward_forward_ratio']
    kw, kc = fill_counts(P, r, args['fill_bubbles'], args['fill_warmup'], args['fill_cooldown'])
    mbs = microbatches(P, M, kw, kc, r, stages_with_exits=range(P - 1))
    text, end, busy = draw(P, [schedule(P, s, mbs, args['schedule']) for s in range(P)], mbs, r)
    print(text)
    print(f'{P} stages, {M} microbatches, backward = {r} x forward, fills: {kw} warm-up, {kc} cool-down; '
          f'step {end:.0f} units, idle {1 - busy / (P * end):.1%} '
          f'(1F1B theory without fills: {(P - 1) / (M + P - 1):.1%})')


if __name__ == '__main__':
    run(main)
