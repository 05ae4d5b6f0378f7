"""
Your own text file as a dataset: the last 10% (by tokens) is the val split.

    python data/text/prepare.py --input=notes.txt                     # bytes, vocab 256
    python data/text/prepare.py --input=notes.txt --tokenizer=gpt2    # GPT-2 BPE via tiktoken
    python train.py config/train_pystdlib.py --dataset=text

Writes train.bin, val.bin and meta.json to --out_dir (default: beside this script).
The gpt2 tokenizer needs tiktoken's BPE file, which tiktoken downloads once and caches;
on a machine without internet use --tokenizer=bytes.
"""

import argparse
import json
import os
import sys

import numpy as np


def encode(text, tokenizer):
    """Returns (token array, meta fields) for 'bytes' or 'gpt2'."""
    if tokenizer == 'bytes':
        return np.frombuffer(text.encode('utf-8'), dtype=np.uint8), {'vocab_size': 256, 'dtype': 'uint8'}
    import tiktoken
    try:
        enc = tiktoken.get_encoding('gpt2')
    except Exception as e:  # no network and no cached BPE file
        sys.exit(f'could not load the gpt2 tokenizer through tiktoken ({type(e).__name__}: {e}).\n'
                 f'It needs to download its BPE file once; without internet use --tokenizer=bytes.')
    ids = enc.encode_ordinary(text)
    return np.array(ids, dtype=np.uint16), {'vocab_size': enc.n_vocab, 'dtype': 'uint16', 'eot_token': enc.eot_token}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('--input', required=True, help='a UTF-8 text file')
    p.add_argument('--tokenizer', default='bytes', choices=['bytes', 'gpt2'])
    p.add_argument('--out_dir', default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    if not os.path.isfile(args.input):
        sys.exit(f'--input={args.input}: no such file' + (' (it is a folder)' if os.path.isdir(args.input) else ''))
    try:
        with open(args.input, encoding='utf-8') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        sys.exit(f'--input={args.input} is not UTF-8 text (byte {e.start}: {e.reason}); give a text file')
    ids, meta = encode(text, args.tokenizer)
    n_val = len(ids) // 10
    if n_val < 2:
        sys.exit(f'{args.input} gives only {len(ids)} tokens; need at least 20')
    os.makedirs(args.out_dir, exist_ok=True)
    ids[:-n_val].tofile(os.path.join(args.out_dir, 'train.bin'))
    ids[-n_val:].tofile(os.path.join(args.out_dir, 'val.bin'))
    meta.update(tokenizer=args.tokenizer, source=os.path.abspath(args.input),
                train_tokens=len(ids) - n_val, val_tokens=n_val)
    with open(os.path.join(args.out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    print(f'{args.input}: train {len(ids) - n_val:,} tokens, val {n_val:,} tokens ({args.tokenizer}) in {args.out_dir}')


if __name__ == '__main__':
    main()
