"""
The offline default corpus: every .py file of the running Python's standard library
(about 30 MB of real code, on every machine with Python), as byte-level tokens.

    python data/pystdlib/prepare.py

Files are read in sorted order and split into train/val by file (a hash of the path
puts about 1 in 20 files in val). Each file is followed by a 0 byte, the end-of-text
token. Writes train.bin, val.bin (uint8) and meta.json beside this script.
"""

import json
import os
import sys
import sysconfig
import zlib

import numpy as np
from tqdm import tqdm

SKIP_DIRS = {'site-packages', 'dist-packages', '__pycache__'}  # installed packages are not the stdlib


def stdlib_files(root):
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        files += [os.path.relpath(os.path.join(d, n), root) for n in names if n.endswith('.py')]
    return sorted(files)


def main(out_dir=os.path.dirname(os.path.abspath(__file__))):
    root = sysconfig.get_paths()['stdlib']
    files = stdlib_files(root)
    if not files:
        sys.exit(f'no .py files found under {root}')
    chunks = {'train': [], 'val': []}
    for rel in tqdm(files, desc='reading', unit='file'):
        with open(os.path.join(root, rel), 'rb') as f:
            text = f.read().replace(b'\x00', b'')
        split = 'val' if zlib.crc32(rel.encode()) % 20 == 0 else 'train'
        chunks[split] += [text, b'\x00']
    sizes = {}
    for split, parts in chunks.items():
        arr = np.frombuffer(b''.join(parts), dtype=np.uint8)
        arr.tofile(os.path.join(out_dir, f'{split}.bin'))
        sizes[split] = len(arr)
    meta = {'vocab_size': 256, 'tokenizer': 'bytes', 'dtype': 'uint8', 'eot_token': 0,
            'source': f'Python {sys.version.split()[0]} standard library', 'files': len(files),
            'train_tokens': sizes['train'], 'val_tokens': sizes['val']}
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    print(f"{len(files)} files: train {sizes['train'] / 1e6:.2f} M tokens, val {sizes['val'] / 1e6:.2f} M tokens "
          f"(1 token = 1 byte) in {out_dir}")


if __name__ == '__main__':
    main()
