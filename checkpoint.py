"""
The layout-free checkpoint format: out_dir/ckpt/ holds meta.json and one file per (pp, tp)
shard, tensors under their logical names with the logical range each piece covers, so any
layout reads the ranges it needs (memory-mapped: never the whole model at once).

    save_checkpoint(out_dir, model, optimizer, train_config, step, best_val_loss, ps, data_meta)
    model, ckpt = load_model(out_dir, ps, device)     # in any layout; ckpt.meta is meta.json
    encode, decode = tokenizer(ckpt.meta, out_dir)    # the tokenizer the checkpoint names

A checkpoint is written into ckpt.tmp and swapped in by renames, so a crash never leaves a
half-written ckpt; a truncated file or a tensor of the wrong shape is refused with a message.
"""

import json
import os
import shutil
import zlib
from dataclasses import asdict

import torch
import torch.distributed as dist

from model import GPTConfig, pair_tensor
from parallel import LOCAL, counted_here, local_range, logical_shape, split_dim, take_shard
from pipeline import build_stage


def _barrier(ps):
    if ps.world > 1:
        dist.barrier()


def file_record(path):
    """[size in bytes, CRC-32] of a file, read in 16 MiB chunks."""
    crc = 0
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return [os.path.getsize(path), crc]


def _complete(path):
    """A directory holding a checkpoint whose meta.json reads and whose files have their sizes."""
    try:
        with open(os.path.join(path, 'meta.json')) as f:
            meta = json.load(f)
        return all(os.path.getsize(os.path.join(path, n)) == size for n, size in meta['file_bytes'].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _newest(out_dir):
    """Where out_dir's newest checkpoint is: ckpt if it has a meta.json; after a crash during a
    swap, a complete ckpt.tmp (its meta.json is written last), else a complete ckpt.old; None."""
    final, tmp, old = (os.path.join(out_dir, n) for n in ('ckpt', 'ckpt.tmp', 'ckpt.old'))
    if os.path.exists(os.path.join(final, 'meta.json')):
        return final
    return next((p for p in (tmp, old) if _complete(p)), None)


def _settle(out_dir):
    """After a crash during a swap, put the newest complete checkpoint back at out_dir/ckpt."""
    final, newest = os.path.join(out_dir, 'ckpt'), _newest(out_dir)
    if newest not in (None, final):
        shutil.rmtree(final, ignore_errors=True)
        os.rename(newest, final)
    shutil.rmtree(os.path.join(out_dir, 'ckpt.old'), ignore_errors=True)


def start_checkpoint(out_dir):
    """A fresh out_dir/ckpt.tmp to write a checkpoint's files into; returns its path. The last
    complete checkpoint is first put in its place (_settle), so it is never what gets deleted."""
    _settle(out_dir)
    tmp = os.path.join(out_dir, 'ckpt.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_checkpoint(out_dir, model_config, tensors, files, train_config=None, iter_num=0,
                      best_val_loss=float('inf'), optimizer_step=0.0, data=None, layout=None, rng_files=None):
    """Write meta.json into ckpt.tmp and swap it in by renames, so a crash never leaves a
    half-written ckpt and never loses the last complete one (at worst it is ckpt.old or a
    complete ckpt.tmp, which loading takes). tensors: logical name -> {'shape', 'dim' (split
    dimension or None), 'pieces': [[file, start, end]]}; files, rng_files: name -> file_record."""
    final, tmp, old = (os.path.join(out_dir, n) for n in ('ckpt', 'ckpt.tmp', 'ckpt.old'))
    meta = {'iter_num': iter_num, 'best_val_loss': best_val_loss, 'model_config': asdict(model_config),
            'train_config': train_config, 'optimizer_step': optimizer_step, 'data': data,
            'layout': layout or {'world': 1, 'dp': 1, 'pp': 1, 'tp': 1, 'sp': False}, 'tensors': tensors,
            'file_bytes': {n: r[0] for n, r in files.items()}, 'file_crc32': {n: r[1] for n, r in files.items()},
            'rng_files': rng_files or {}}
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def check_finite(model, ps=LOCAL, what='save'):
    """Refuse (on every rank alike) a model with a NaN or infinite parameter."""
    bad = [n for n, p in model.logical_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    flag = torch.tensor([float(len(bad))], device=next(model.parameters()).device)
    if ps.world > 1:
        dist.all_reduce(flag)
    if flag.item():
        raise FloatingPointError(f'refusing to {what} a model with non-finite parameters '
                                 f'({", ".join(bad[:3]) or "on another rank"}); the last checkpoint is kept')


def save_checkpoint(out_dir, model, optimizer, cfg, iter_num, best_val_loss, ps=LOCAL, data=None):
    """Collective (every rank calls it): each (pp, tp) position of dp rank 0 writes its shard
    file, rank 0 the meta. data: the dataset's meta (tokenizer, vocabulary), for generation.
    A model with a non-finite parameter is refused before anything is written."""
    check_finite(model, ps)
    tmp = os.path.join(out_dir, 'ckpt.tmp')
    if ps.is_main:
        start_checkpoint(out_dir)
    _barrier(ps)
    entries, files = {}, {}
    if ps.dp_rank == 0:  # data-parallel replicas hold the same shards: one writes
        fname = f'shard-pp{ps.pp_rank}-tp{ps.tp_rank}.pt'
        shard = {'param': {}, 'exp_avg': {}, 'exp_avg_sq': {}}
        for name, p in model.logical_parameters():
            if not counted_here(p, ps):
                continue  # replicated over tp: tp rank 0 writes it; a stage's copy: its first holder
            r = local_range(p, ps)
            state = optimizer.state.get(p, {}) if optimizer else {}
            for kind, t in (('param', p.detach()), ('exp_avg', state.get('exp_avg')),
                            ('exp_avg_sq', state.get('exp_avg_sq'))):
                if t is not None:  # without the padding (clone: torch.save keeps whole storages)
                    shard[kind][name] = t if r is None else t.narrow(r[0], 0, r[2] - r[1]).clone()
            entries[name] = {'shape': list(logical_shape(p)), 'dim': r and r[0],
                             'pieces': [[fname, r[1], r[2]] if r else [fname, None, None]]}
        torch.save(shard, os.path.join(tmp, fname))
        files[fname] = file_record(os.path.join(tmp, fname))
    rname = f'rng-{ps.rank}.pt'
    torch.save({'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available()
                else None}, os.path.join(tmp, rname))
    parts = [(entries, files, {rname: file_record(os.path.join(tmp, rname))})]
    if ps.world > 1:
        mine, parts = parts[0], [None] * ps.world
        dist.all_gather_object(parts, mine)
    if ps.is_main:
        tensors, records, rngs = {}, {}, {}
        for ents, fr, rr in parts:
            records.update(fr)
            rngs.update(rr)
            for name, e in ents.items():
                tensors.setdefault(name, dict(e, pieces=[]))['pieces'] += e['pieces']
        step = next((float(st['step']) for st in optimizer.state.values() if 'step' in st), 0.0) if optimizer else 0.0
        commit_checkpoint(out_dir, model.config, tensors, records, cfg, iter_num, best_val_loss, step, data,
                          {'world': ps.world, 'dp': ps.dp, 'pp': ps.pp, 'tp': ps.tp, 'sp': ps.sp}, rngs)
    _barrier(ps)


class Checkpoint:
    """A checkpoint directory opened for reading: meta (dict) and read(kind, name, p, ps),
    this rank's shard of one logical tensor assembled from the pieces that overlap it.
    Refuses truncated or inconsistent checkpoints with a message saying what is wrong."""

    def __init__(self, out_dir):
        path = _newest(out_dir)
        if path is None:
            raise FileNotFoundError(f'no checkpoint in {out_dir!r} (expected {out_dir}/ckpt/meta.json)')
        try:
            with open(os.path.join(path, 'meta.json')) as f:
                self.meta = json.load(f)
        except ValueError as e:
            raise RuntimeError(f'checkpoint {path}: meta.json is not JSON ({e})') from None
        for name, size in self.meta['file_bytes'].items():
            f = os.path.join(path, name)
            actual = os.path.getsize(f) if os.path.exists(f) else None
            if actual != size:
                raise RuntimeError(f'checkpoint {path}: {name} has {actual} bytes, meta.json says {size} (truncated?)')
        self.path, self.files = path, {}

    def _verified(self, fname, size, crc):
        """The path of fname, its size and CRC-32 checked (None: not recorded, as before CRCs)."""
        path = os.path.join(self.path, fname)
        actual = os.path.getsize(path)
        if size is not None and actual != size:
            raise RuntimeError(f'checkpoint {self.path}: {fname} is truncated '
                               f'({actual} bytes, meta.json says {size})')
        if crc is not None and file_record(path)[1] != crc:
            raise RuntimeError(f'checkpoint {self.path}: {fname} does not match the CRC-32 in meta.json '
                               '(corrupted on disk or in transfer); restore it or use another checkpoint')
        return path

    def _file(self, fname):
        if fname not in self.files:
            crc = self.meta.get('file_crc32', {}).get(fname)
            path = self._verified(fname, self.meta['file_bytes'].get(fname), crc)
            self.files[fname] = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
        return self.files[fname]

    def _entry(self, name, shape=None):
        e = self.meta['tensors'].get(name)
        if e is None or shape not in (None, e['shape']):
            raise RuntimeError(f'checkpoint {self.path}: tensor {name} is '
                               f"{'missing' if e is None else e['shape']}, the model wants {shape}")
        return e

    def _piece(self, kind, name, piece, shape):
        """The stored tensor of one piece [file, start, end] of logical tensor `name`, checked
        against the shape meta.json gives it (start..end along the split dimension)."""
        fname, a, b = piece
        t = self._file(fname)[kind].get(name)
        e = self.meta['tensors'][name]
        want = [b - a if d == e['dim'] else n for d, n in enumerate(shape)]
        if t is None or list(t.shape) != want:
            raise RuntimeError(f'checkpoint {self.path}: {fname} holds {kind} {name} as '
                               f"{'nothing' if t is None else list(t.shape)}, meta.json says {want}")
        return t

    def whole(self, name, kind='param'):
        """The whole logical tensor `name`, its pieces concatenated."""
        e = self._entry(name)
        parts = [self._piece(kind, name, q, e['shape']) for q in sorted(e['pieces'], key=lambda q: q[1] or 0)]
        return parts[0] if e['dim'] is None else torch.cat(parts, e['dim'])

    def read(self, kind, name, p, ps):
        logical = list(logical_shape(p))
        e = self._entry(name, logical)
        dim, pieces = e['dim'], e['pieces']
        if dim is None:  # saved whole (replicated, or written by one process)
            dim = split_dim(p)
            if dim is None:
                return self._piece(kind, name, pieces[0], logical)
            pieces = [[pieces[0][0], 0, logical[dim]]]
        r = local_range(p, ps)
        start, end = (r[1], r[2]) if r else (0, logical[dim])
        out = torch.zeros(p.shape, dtype=p.dtype)
        for fname, a, b in pieces:
            lo, hi = max(a, start), min(b, end)
            if hi > lo:
                src = self._piece(kind, name, [fname, a, b], logical)
                out.narrow(dim, lo - start, hi - lo).copy_(src.narrow(dim, lo - a, hi - lo))
        return out

    def load_into(self, model, optimizer=None, ps=LOCAL, rng=False):
        """Copy this rank's shards into the model (and the AdamW state into the optimizer);
        with rng, also this rank's random streams when the layout is the same (a resumed run).
        A model with layer_parallel pairs that the checkpoint runs one after the other gets
        them re-laid out here (model.pair_tensor). Every parameter must come out finite."""
        cfg, saved = model.config, tuple(self.meta['model_config'].get('layer_parallel') or ())
        if saved and saved != cfg.layer_parallel:
            raise ValueError(f'checkpoint {self.path} was tuned to run with layer_parallel={list(saved)}; '
                             f'asked for {list(cfg.layer_parallel) or "none"}')
        to_pair = set() if saved else {str(i) for i in cfg.pairs}
        with torch.no_grad():
            for name, p in model.logical_parameters():
                where = name.split('.', 2)  # 'blocks', index, rest
                if where[0] == 'blocks' and where[1] in to_pair:
                    p.copy_(take_shard(pair_tensor(self.whole, cfg, int(where[1]), where[2]), p, ps))
                    continue  # (a new tensor: no optimizer state)
                p.copy_(self.read('param', name, p, ps))
                saved = self._file(self.meta['tensors'][name]['pieces'][0][0])['exp_avg']
                if optimizer is not None and p.requires_grad and name in saved:  # (converted: no moments)
                    fused = optimizer.defaults.get('fused')
                    optimizer.state[p] = {
                        'step': torch.tensor(self.meta['optimizer_step'], device=p.device if fused else 'cpu'),
                        'exp_avg': self.read('exp_avg', name, p, ps).to(p.device),
                        'exp_avg_sq': self.read('exp_avg_sq', name, p, ps).to(p.device)}
        check_finite(model, ps, f'load {self.path} into')
        rname = f'rng-{ps.rank}.pt'
        if rng and self.meta['layout']['world'] == ps.world and os.path.exists(os.path.join(self.path, rname)):
            size, crc = self.meta.get('rng_files', {}).get(rname, (None, None))
            states = torch.load(self._verified(rname, size, crc), weights_only=True)
            torch.set_rng_state(states['cpu'])
            if states['cuda'] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(states['cuda'])


def load_model(out_dir, ps=LOCAL, device='cpu', pp_layers=None, layer_parallel=None):
    """A trained model (this rank's stage) from out_dir, in any layout. Returns (model, Checkpoint).
    layer_parallel: [start, end) to run in parallel pairs ([] none; None: as saved)."""
    ckpt = Checkpoint(out_dir)
    mc = ckpt.meta['model_config']
    if layer_parallel is not None:
        mc = dict(mc, layer_parallel=layer_parallel)
    model, _ = build_stage(GPTConfig(**mc), ps, pp_layers, device=device)
    ckpt.load_into(model, ps=ps)
    return model, ckpt


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
            raise ImportError('this checkpoint has a Hugging Face tokenizer.json: pip install tokenizers '
                              '(or give token ids instead of text)') from None
        tok = Tokenizer.from_file(os.path.join(out_dir, name))
        return (lambda s: tok.encode(s).ids), tok.decode
    return None, None
