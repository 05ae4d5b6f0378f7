"""
Checkpoint conversion: Hugging Face Llama / GPT-2 <-> nanoEE, and adding exits (EE-Tuning,
Pan et al. 2024, arXiv 2402.00518).

    python convert.py from_hf --src=HF_DIR --dst=CKPT_DIR
    python convert.py to_hf --src=CKPT_DIR --dst=HF_DIR [--keep_exits=False]
    python convert.py add_exits --src=CKPT_DIR --dst=CKPT_DIR --exit_layers=[8,16] [--exit_norm] [--exit_mlp]
                      [--exit_block] [--exit_pre] [--exit_untie] [--random_init]

A --dst that is not empty is refused unless --overwrite=True; the result is written into a
new folder beside it and renamed into place, so a failed conversion leaves --dst as it was.

from_hf reads config.json and the weights (model.safetensors, sharded safetensors with an
index, or pytorch_model.bin) one shard at a time and writes each as a shard of a
layout-free nanoEE checkpoint under our names (peak memory: about one shard); a
tokenizer.json beside the weights is copied along and used by generate.py.
Anything we do not implement (rope scaling, other activations, ...) is refused.
"""

import json
import math
import os
import shutil
import sys
from contextlib import contextmanager

import torch
from tqdm import tqdm

from checkpoint import Checkpoint, commit_checkpoint, file_record, save_checkpoint, start_checkpoint
from configurator import configure, run
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Hugging Face names -> ours (None: a buffer to skip), per architecture

def llama_config(c):
    rope = c.get('rope_scaling') or c.get('rope_parameters') or {}
    kind = rope.get('rope_type', rope.get('type', 'default'))
    refuse = [msg for bad, msg in [
        (c.get('hidden_act', 'silu') != 'silu', f"hidden_act={c.get('hidden_act')!r} (only silu)"),
        (kind != 'default', f'rope scaling {kind!r} (only plain RoPE)'),
        (c.get('attention_bias', False) != c.get('mlp_bias', False), 'attention_bias != mlp_bias'),
        (c.get('head_dim', c['hidden_size'] // c['num_attention_heads']) != c['hidden_size'] // c['num_attention_heads'],
         f"head_dim={c.get('head_dim')} != hidden_size / num_attention_heads"),
    ] if bad]
    if refuse:
        raise ValueError(f'cannot convert this Llama: {"; ".join(refuse)}')
    return GPTConfig(arch='llama', n_layer=c['num_hidden_layers'], n_head=c['num_attention_heads'],
                     n_kv_head=c.get('num_key_value_heads') or c['num_attention_heads'], n_embd=c['hidden_size'],
                     ffn_hidden=c['intermediate_size'], vocab_size=c['vocab_size'],
                     block_size=c.get('max_position_embeddings', 2048), bias=c.get('attention_bias', False),
                     norm_eps=c.get('rms_norm_eps', 1e-6), rope_theta=c.get('rope_theta', rope.get('rope_theta', 1e4)),
                     tie_embeddings=c.get('tie_word_embeddings', False))


def gpt2_config(c):
    refuse = [msg for bad, msg in [
        (c.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'),
         f"activation_function={c.get('activation_function')!r} (only the tanh GELU)"),
        (c.get('scale_attn_by_inverse_layer_idx', False), 'scale_attn_by_inverse_layer_idx'),
        (not c.get('scale_attn_weights', True), 'scale_attn_weights=False'),
    ] if bad]
    if refuse:
        raise ValueError(f'cannot convert this GPT-2: {"; ".join(refuse)}')
    return GPTConfig(arch='gpt2', n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'],
                     ffn_hidden=c.get('n_inner') or 4 * c['n_embd'], vocab_size=c['vocab_size'],
                     block_size=c['n_positions'], bias=True, norm_eps=c.get('layer_norm_epsilon', 1e-5),
                     tie_embeddings=c.get('tie_word_embeddings', True))


LLAMA = {'model.embed_tokens.weight': 'wte.weight', 'model.norm.weight': 'norm_f.weight',
         'lm_head.weight': 'lm_head.weight'}
LLAMA_LAYER = {'input_layernorm': 'norm1', 'post_attention_layernorm': 'norm2', 'self_attn.q_proj': 'attn.q',
               'self_attn.k_proj': 'attn.k', 'self_attn.v_proj': 'attn.v', 'self_attn.o_proj': 'attn.o',
               'mlp.gate_proj': 'mlp.gate', 'mlp.up_proj': 'mlp.up', 'mlp.down_proj': 'mlp.down'}
GPT2 = {'wte.weight': 'wte.weight', 'wpe.weight': 'wpe.weight', 'ln_f.weight': 'norm_f.weight',
        'ln_f.bias': 'norm_f.bias'}
GPT2_LAYER = {'ln_1': 'norm1', 'ln_2': 'norm2', 'attn.c_proj': 'attn.o', 'mlp.c_fc': 'mlp.up', 'mlp.c_proj': 'mlp.down'}


def hf_to_ours(arch, name, t, cfg):
    """[(our name, tensor)] for one Hugging Face tensor."""
    if arch == 'llama':
        if 'rotary_emb' in name or (name == 'lm_head.weight' and cfg.tie_embeddings):
            return []                                       # RoPE buffers / the tied head
        if name in LLAMA:
            return [(LLAMA[name], t)]
        _, _, i, rest = name.split('.', 3)               # model.layers.{i}.{module}.{weight|bias}
        module, kind = rest.rsplit('.', 1)
        return [(f'blocks.{i}.{LLAMA_LAYER[module]}.{kind}', t)]
    name = name.removeprefix('transformer.')
    if name == 'lm_head.weight':
        return [] if cfg.tie_embeddings else [(name, t)]   # tied: it is wte
    if name.endswith(('.attn.bias', '.attn.masked_bias')):
        return []                                           # causal-mask buffers
    if name in GPT2:
        return [(GPT2[name], t)]
    _, i, rest = name.split('.', 2)                         # h.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit('.', 1)
    if kind == 'weight' and module != 'ln_1' and module != 'ln_2':
        t = t.t()                                           # GPT-2's Conv1D stores (in, out)
    if module == 'attn.c_attn':                             # fused q, k, v
        return [(f'blocks.{i}.attn.{n}.{kind}', p) for n, p in zip('qkv', t.chunk(3, dim=0))]
    return [(f'blocks.{i}.{GPT2_LAYER[module]}.{kind}', t)]


def hf_shards(src):
    """The weight files of a Hugging Face directory, and a function that reads one."""
    index = os.path.join(src, 'model.safetensors.index.json')
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))['weight_map'].values()))
    elif os.path.exists(os.path.join(src, 'model.safetensors')):
        files = ['model.safetensors']
    elif os.path.exists(os.path.join(src, 'pytorch_model.bin')):
        files = ['pytorch_model.bin']
    else:
        raise FileNotFoundError(f'{src}: no model.safetensors(.index.json) or pytorch_model.bin')

    def read(f):
        path = os.path.join(src, f)
        if f.endswith('.bin'):
            return torch.load(path, map_location='cpu', weights_only=True)
        from safetensors.torch import load_file
        return load_file(path)
    return files, read


@contextmanager
def written_into(dst, overwrite=False):
    """A fresh folder beside dst to write into; when the block succeeds it takes dst's place
    (dst must be absent or empty, unless overwrite), when it fails it is removed: dst is never
    left half-written nor silently replaced."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(f'--dst={dst} is a file; give a folder')
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(f'--dst={dst} is not empty ({", ".join(sorted(os.listdir(dst))[:3])}, ...); give '
                              'another folder, or --overwrite=True to replace it')
    tmp, old = dst.rstrip('/') + '.writing', dst.rstrip('/') + '.replaced'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def from_hf(src, dst, overwrite=False):
    if not os.path.exists(os.path.join(src, 'config.json')):
        raise FileNotFoundError(f'--src={src}: no config.json (a Hugging Face model folder has config.json and '
                                'the weights)')
    with open(os.path.join(src, 'config.json')) as f:
        c = json.load(f)
    kind = (c.get('architectures') or [c.get('model_type')])[0]
    arch = {'LlamaForCausalLM': 'llama', 'llama': 'llama', 'GPT2LMHeadModel': 'gpt2', 'gpt2': 'gpt2'}.get(kind)
    if arch is None:
        raise ValueError(f'{src}: architecture {kind!r} is not supported (LlamaForCausalLM, GPT2LMHeadModel)')
    cfg = (llama_config if arch == 'llama' else gpt2_config)(c)
    with torch.device('meta'):  # only for the names and shapes: nothing is allocated
        shapes = {n: tuple(p.shape) for n, p in GPT(cfg).logical_parameters()}
    with written_into(dst, overwrite) as out:
        tmp, tensors, records = start_checkpoint(out), {}, {}
        files, read = hf_shards(src)
        for k, f in enumerate(tqdm(files, desc='converting', unit='shard')):  # one shard in memory at a time
            shard = {'param': {}, 'exp_avg': {}, 'exp_avg_sq': {}}
            for name, t in read(f).items():
                for ours, tensor in hf_to_ours(arch, name, t, cfg):
                    if ours not in shapes:
                        raise ValueError(f'{src}: tensor {name} has no place in the model ({ours})')
                    if tuple(tensor.shape) != shapes[ours]:
                        raise ValueError(f'{name}: shape {tuple(tensor.shape)}, the model wants {shapes[ours]}')
                    shard['param'][ours] = tensor.float().contiguous()
                    tensors[ours] = {'shape': list(shapes[ours]), 'dim': None, 'pieces': [[f'shard-hf{k}.pt', None, None]]}
            torch.save(shard, os.path.join(tmp, f'shard-hf{k}.pt'))
            records[f'shard-hf{k}.pt'] = file_record(os.path.join(tmp, f'shard-hf{k}.pt'))
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise ValueError(f'{src}: no weights for {missing[:5]}{" ..." if len(missing) > 5 else ""}')
        tokenizer = 'gpt2' if arch == 'gpt2' and cfg.vocab_size >= 50257 else None  # (GPT-2's BPE has 50,257 ids)
        if os.path.exists(os.path.join(src, 'tokenizer.json')):  # the model's own tokenizer travels with it
            shutil.copyfile(os.path.join(src, 'tokenizer.json'), os.path.join(out, 'tokenizer.json'))
            tokenizer = 'tokenizer.json'
        eot = c.get('eos_token_id')
        eot = eot[0] if isinstance(eot, list) and eot else eot
        eot = eot if isinstance(eot, int) and 0 <= eot < cfg.vocab_size else None  # (an id the model has)
        commit_checkpoint(out, cfg, tensors, records, {'source': os.path.abspath(src)},
                          data={'tokenizer': tokenizer, 'vocab_size': cfg.vocab_size, 'eot_token': eot})
    print(f'{src} -> {dst}: {arch}, {sum(math.prod(s) for s in shapes.values()) / 1e6:.1f}M parameters')


def to_hf(src, dst, keep_exits=True, overwrite=False):
    model, ckpt = load(src)
    cfg = model.config
    if cfg.exit_layers and keep_exits:
        raise ValueError(f'{src} has exits {list(cfg.exit_layers)}, which Hugging Face models cannot hold; '
                         f'pass --keep_exits=False to drop them')
    state = {}
    if cfg.arch == 'llama':
        back = {v: k for k, v in LLAMA.items()}
        back_layer = {v: k for k, v in LLAMA_LAYER.items()}
        for name, p in model.logical_parameters():
            if name.startswith('exits.'):
                continue
            if name in back:
                state[back[name]] = p
            else:
                _, i, rest = name.split('.', 2)
                module, kind = rest.rsplit('.', 1)
                state[f'model.layers.{i}.{back_layer[module]}.{kind}'] = p
        if cfg.tie_embeddings:
            state.pop('lm_head.weight', None)
        hf = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': cfg.n_embd,
              'num_hidden_layers': cfg.n_layer, 'num_attention_heads': cfg.n_head,
              'num_key_value_heads': cfg.n_kv_head, 'intermediate_size': cfg.ffn_hidden, 'vocab_size': cfg.vocab_size,
              'max_position_embeddings': cfg.block_size, 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
              'attention_bias': cfg.bias, 'mlp_bias': cfg.bias, 'tie_word_embeddings': cfg.tie_embeddings,
              'hidden_act': 'silu', 'torch_dtype': 'float32'}
    else:
        back = {v: k for k, v in GPT2.items()}
        back_layer = {v: k for k, v in GPT2_LAYER.items()}
        params = dict(model.logical_parameters())
        for name, p in params.items():
            if name.startswith('exits.') or '.attn.k.' in name or '.attn.v.' in name:
                continue
            if name in back:
                state['transformer.' + back[name]] = p
                continue
            _, i, rest = name.split('.', 2)
            module, kind = rest.rsplit('.', 1)
            if module == 'attn.q':  # fuse q, k, v back into c_attn
                p = torch.cat([params[f'blocks.{i}.attn.{n}.{kind}'] for n in 'qkv'])
                module = None
            hf_module = 'attn.c_attn' if module is None else back_layer[module]
            state[f'transformer.h.{i}.{hf_module}.{kind}'] = p.t() if kind == 'weight' and p.dim() == 2 else p
        hf = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'n_embd': cfg.n_embd, 'n_layer': cfg.n_layer,
              'n_head': cfg.n_head, 'n_inner': cfg.ffn_hidden, 'vocab_size': cfg.vocab_size,
              'n_positions': cfg.block_size, 'layer_norm_epsilon': cfg.norm_eps, 'activation_function': 'gelu_new',
              'tie_word_embeddings': True, 'torch_dtype': 'float32'}
        if not cfg.tie_embeddings or not cfg.bias:
            raise ValueError('GPT-2 on the Hugging Face side has tied embeddings and biases')
    from safetensors.torch import save_file
    with written_into(dst, overwrite) as out:  # (a whole new folder: no old tokenizer or generation config)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(out, 'model.safetensors'))
        with open(os.path.join(out, 'config.json'), 'w') as f:
            json.dump(hf, f, indent=1)
    print(f'{src} -> {dst}: {len(state)} tensors')


def load(src):
    ckpt = Checkpoint(src)
    model = GPT(GPTConfig(**ckpt.meta['model_config']))
    ckpt.load_into(model)
    return model, ckpt


def add_exits(src, dst, exit_layers, random_init=False, seed=0, overwrite=False, **exit_options):
    """A copy of the checkpoint with exits. EE-Tuning's copy initialisation: the output matrix
    from the LM head, the norm from the final norm, the MLP (and its pre-norm) from the layer's
    own, the block from the last block; random_init: GPT-2-style random weights instead."""
    base, ckpt = load(src)
    old = ckpt.meta['model_config']
    if old['exit_layers']:
        raise ValueError(f'{src} already has exits {old["exit_layers"]}')
    cfg = GPTConfig(**dict(old, exit_layers=tuple(exit_layers), **exit_options))
    model = GPT(cfg, seed=seed)
    params = dict(model.logical_parameters())
    with torch.no_grad():
        for name, p in base.logical_parameters():
            params[name].copy_(p)
        if not random_init:
            for e, _, d in cfg.exits:
                head = model.exits[str(e)]
                pairs = [(head.out, base.lm_head), (head.norm, base.norm_f), (head.block, base.blocks[str(cfg.n_layer - 1)])]
                if head.mlp is not None:
                    pairs += [(head.mlp, base.blocks[str(d - 1)].mlp), (head.mlp_norm, base.blocks[str(d - 1)].norm2)]
                for mine, source in pairs:
                    if mine is not None:
                        mine.load_state_dict(source.state_dict())
    with written_into(dst, overwrite) as out:
        save_checkpoint(out, model, None, dict(ckpt.meta['train_config'] or {}, added_exits=list(exit_layers)), 0,
                        float('inf'), data=ckpt.meta.get('data'))
    print(f'{src} -> {dst}: exits {list(exit_layers)} ({"random" if random_init else "copied"} init)')
    return model


def main(argv):
    if not argv or argv[0] not in ('from_hf', 'to_hf', 'add_exits'):
        sys.exit(__doc__)
    args = configure({'src': '', 'dst': '', 'keep_exits': True, 'exit_layers': (), 'exit_pre': False,
                      'exit_untie': False, 'exit_norm': False, 'exit_mlp': False, 'exit_block': False,
                      'random_init': False, 'seed': 0, 'overwrite': False}, argv[1:])
    if not args['src'] or not args['dst']:
        sys.exit('give --src=... and --dst=...')
    if argv[0] == 'from_hf':
        from_hf(args['src'], args['dst'], args['overwrite'])
    elif argv[0] == 'to_hf':
        to_hf(args['src'], args['dst'], args['keep_exits'], args['overwrite'])
    else:
        add_exits(args['src'], args['dst'], args['exit_layers'], args['random_init'], args['seed'], args['overwrite'],
                  **{k: args[k] for k in ('exit_pre', 'exit_untie', 'exit_norm', 'exit_mlp', 'exit_block')})


if __name__ == '__main__':
    run(main)
