"""
The token corpus on disk and the batches a run draws from it: data/<name>/ holds train.bin and
val.bin (token ids) and meta.json (dtype, vocab_size, tokenizer, end token).

    data, meta = load_data('pystdlib')
    batches = Batches(data, batch_size=16, block_size=256, accum=2, seed=1337, device='cuda')
    x, y = batches.micro(it, k)          # micro-batch k of step it: (16, 256) each

What a step sees depends only on (seed, step), never on the layout, so every parallel layout
and a resumed run train on the same sequences.
"""

import json
import os

import numpy as np
import torch


def load_data(name):
    """Memory-mapped train/val token arrays and the dataset's meta.json."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', name)
    if not os.path.isdir(folder):
        folder = name  # a path works too
    meta_path = os.path.join(folder, 'meta.json')
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f'dataset {name!r}: no {meta_path}; prepare it first, '
                                f'e.g. python data/{name}/prepare.py')
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        np.dtype(meta['dtype']), int(meta['vocab_size'])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f'dataset {name!r}: {meta_path} is not a dataset meta.json (a JSON object with '
                         f'dtype and vocab_size): {type(e).__name__}: {e}') from None
    data = {}
    for s in ('train', 'val'):
        path = os.path.join(folder, f'{s}.bin')
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            raise FileNotFoundError(f'dataset {name!r}: {path} is missing or empty; prepare the dataset again')
        data[s] = np.memmap(path, dtype=meta['dtype'], mode='r')
    return data, meta


def check_data(data, name, block_size, vocab_size):
    """Each split must hold more than block_size + 1 tokens, all ids below vocab_size."""
    for s, d in data.items():
        if len(d) <= block_size + 1:
            raise ValueError(f'block_size={block_size}: dataset {name!r} split {s!r} has only {len(d):,} tokens; '
                             f'allowed: block_size < {len(d) - 1}')
        top = int(d.max())
        if top >= vocab_size:
            raise ValueError(f'dataset {name!r} split {s!r} holds token id {top}, outside the model\'s '
                             f'vocab_size={vocab_size}')


def batch_offsets(n_tokens, block_size, n_seqs, seed, step, split):
    """Start offsets of a step's global batch. They depend only on (seed, step, split),
    never on the layout, so every parallel layout and a resumed run see the same data."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 3 + ('train', 'val', 'fill').index(split))
    return torch.randint(n_tokens - block_size - 1, (n_seqs,), generator=g)


def get_batch(data, offsets, block_size, device):
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in offsets.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in offsets.tolist()])
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class Batches:
    """The sequences a run sees, fixed by (seed, step) alone, never by the layout: step it's
    global batch of batch_size x accum sequences (micro-batch k: its k-th batch_size rows),
    the bubble-filling micro-batches drawn after it, and the fixed evaluation batches.
    data: {split: token array}."""

    def __init__(self, data, batch_size, block_size, accum=1, seed=0, device='cpu'):
        self.data, self.B, self.T, self.accum, self.seed, self.device = data, batch_size, block_size, accum, seed, device

    def _rows(self, split, step, n, k, kind=None):
        offs = batch_offsets(len(self.data[split]), self.T, self.B * n, self.seed, step, kind or split)
        return get_batch(self.data[split], offs[k * self.B:(k + 1) * self.B], self.T, self.device)

    def micro(self, it, k):
        """Micro-batch k (0..accum-1) of step it: (x, y), each (B, T)."""
        return self._rows('train', it, self.accum, k)

    def fill(self, it, k, n):
        """Bubble-filling micro-batch k of the n that step it adds over all dp ranks."""
        return self._rows('train', it, n, k, 'fill')

    def eval(self, split, k):
        """Evaluation batch k of a split: the same at every evaluation."""
        return self._rows(split, -1 - k, 1, 0)
