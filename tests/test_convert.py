"""Conversion against transformers (skipped cleanly without it) and adding exits."""

import json

import pytest
import torch

import checkpoint
from decode import generate
import convert
import train
from configurator import configure
from model import GPT, GPTConfig

transformers = pytest.importorskip('transformers')
pytest.importorskip('safetensors')


def hf_models():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=False))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=64))
    return {'llama': llama, 'gpt2': gpt2}


@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_from_hf_matches_transformers_and_round_trips(tmp_path, arch):
    hf = hf_models()[arch].float().eval()
    with torch.no_grad():  # random, non-trivial norms and biases
        for n, p in hf.named_parameters():
            if 'norm' in n or 'ln_' in n or n.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / 'hf')
    tokenizers = pytest.importorskip('tokenizers')
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='?'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(['def f(x): return x + 1'] * 10, tokenizers.trainers.BpeTrainer(vocab_size=97))
    tok.save(str(tmp_path / 'hf' / 'tokenizer.json'))
    convert.from_hf(str(tmp_path / 'hf'), str(tmp_path / 'ours'))
    encode, decode = checkpoint.tokenizer(json.loads((tmp_path / 'ours' / 'ckpt' / 'meta.json').read_text()),
                                        str(tmp_path / 'ours'))
    assert decode(encode('def f(x)')).strip() == 'def f(x)'  # the tokenizer came along
    model, _ = convert.load(str(tmp_path / 'ours'))
    model.eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    prompt = [3, 14, 15, 92]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert generate(model, prompt, 10, 'full')['tokens'] == ref
    convert.to_hf(str(tmp_path / 'ours'), str(tmp_path / 'back'))
    from safetensors.torch import load_file
    before, after = load_file(tmp_path / 'hf' / 'model.safetensors'), load_file(tmp_path / 'back' / 'model.safetensors')
    before = {k.removeprefix('transformer.') if arch == 'gpt2' else k: v for k, v in before.items()
              if not (arch == 'gpt2' and k == 'lm_head.weight')}
    after = {k.removeprefix('transformer.') if arch == 'gpt2' else k: v for k, v in after.items()}
    assert sorted(before) == sorted(after)
    for k in before:
        assert torch.equal(before[k], after[k]), k  # bit for bit
    again = type(hf).from_pretrained(tmp_path / 'back').eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, want)
    # the same weights as several safetensors shards with an index, and as pytorch_model.bin
    hf.save_pretrained(tmp_path / 'sharded', max_shard_size='40KB')
    assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'config.json').write_text((tmp_path / 'hf' / 'config.json').read_text())
    torch.save(hf.state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
    for d in ('sharded', 'bin'):
        convert.from_hf(str(tmp_path / d), str(tmp_path / f'ours-{d}'))
        other, _ = convert.load(str(tmp_path / f'ours-{d}'))
        for (n, p), q in zip(other.logical_parameters(), model.parameters()):
            assert torch.equal(p, q), (d, n)


def test_unsupported_configs_are_refused(tmp_path):
    hf = hf_models()['llama']
    d = tmp_path / 'scaled'
    d.mkdir()
    cfg = hf.config.to_dict()
    cfg['rope_scaling'] = {'rope_type': 'linear', 'factor': 2.0}
    cfg.pop('rope_parameters', None)
    (d / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling 'linear'"):
        convert.from_hf(str(d), str(tmp_path / 'x'))
    (d / 'config.json').write_text(json.dumps({'architectures': ['MistralForCausalLM']}))
    with pytest.raises(ValueError, match="'MistralForCausalLM' is not supported"):
        convert.from_hf(str(d), str(tmp_path / 'x'))


def test_add_exits_copies_and_trains(tmp_path):
    base = GPT(GPTConfig(arch='llama', n_layer=4, n_head=4, n_embd=32, vocab_size=256, block_size=32), seed=1)
    checkpoint.save_checkpoint(str(tmp_path / 'base'), base, None, {}, 0, 0.0, data={'tokenizer': 'bytes'})
    with pytest.raises(ValueError, match='pass --keep_exits=False'):
        convert.add_exits(str(tmp_path / 'base'), str(tmp_path / 'ee'), [1, 3], exit_norm=True, exit_mlp=True,
                          exit_untie=True)
        convert.to_hf(str(tmp_path / 'ee'), str(tmp_path / 'hf'))
    ee, _ = convert.load(str(tmp_path / 'ee'))
    for e, d in enumerate(ee.config.exit_depths):
        head = ee.exits[str(e)]
        assert torch.equal(head.out.weight, base.lm_head.weight) and torch.equal(head.norm.weight, base.norm_f.weight)
        assert torch.equal(head.mlp.up.weight, base.blocks[str(d - 1)].mlp.up.weight)
        assert torch.equal(head.mlp_norm.weight, base.blocks[str(d - 1)].norm2.weight)
    for name, p in base.logical_parameters():
        assert torch.equal(dict(ee.logical_parameters())[name], p), name
    convert.to_hf(str(tmp_path / 'ee'), str(tmp_path / 'hf'), keep_exits=False)  # exits dropped
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    idx = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, base(idx)[0], rtol=1e-4, atol=1e-4)
    convert.add_exits(str(tmp_path / 'base'), str(tmp_path / 'blk'), [2], exit_block=True)
    blk, _ = convert.load(str(tmp_path / 'blk'))
    assert torch.equal(blk.exits['0'].block.attn.q.weight, base.blocks['3'].attn.q.weight)
    out = generate(ee, [1, 2, 3], 5, 'recompute', thres=0.0)
    assert out['depths'] == [1] * 5


@pytest.fixture(scope='module')
def tune_setup(tmp_path_factory):
    """A byte-level corpus, a base model without exits, and the checkpoint with exits added."""
    import os
    import sys
    d = tmp_path_factory.mktemp('tune')
    sys.path.insert(0, os.path.join(os.path.dirname(convert.__file__), 'data', 'text'))
    import prepare
    (d / 'c.txt').write_text(open(convert.__file__).read() * 4)
    prepare.main(['--input', str(d / 'c.txt'), '--out_dir', str(d / 'data')])
    base = GPT(GPTConfig(arch='llama', n_layer=4, n_head=4, n_embd=32, vocab_size=256, block_size=32), seed=1)
    checkpoint.save_checkpoint(str(d / 'base'), base, None, {}, 0, 0.0, data={'tokenizer': 'bytes'})
    convert.add_exits(str(d / 'base'), str(d / 'ee'), [1, 2], exit_norm=True, exit_untie=True)
    args = [f'--init_from={d / "ee"}', f'--dataset={d / "data"}', '--device=cpu', '--dtype=float32',
            '--max_iters=40', '--eval_interval=40', '--eval_iters=4', '--batch_size=8', '--learning_rate=1e-2',
            '--warmup_iters=2', '--log_interval=10', '--gradient_accumulation_steps=2']
    return d, args


def test_tune_trains_only_the_exits(tune_setup, tmp_path):
    import tune
    d, args = tune_setup
    cfg = configure(tune.DEFAULTS, args + [f'--out_dir={tmp_path / "tuned"}'], train.PER_EXIT_KEYS)
    model = tune.tune(cfg)
    assert sorted(model.blocks) == ['0', '1'] and model.norm_f is None and model.lm_head is None  # never built
    evals = [json.loads(line) for line in open(tmp_path / 'tuned' / 'log.jsonl') if 'val_losses' in line]
    for a, b in zip(evals[0]['val_losses'], evals[-1]['val_losses'], strict=True):
        assert b < a - 0.3
    tuned, _ = checkpoint.load_model(str(tmp_path / 'tuned'))
    before, _ = convert.load(str(d / 'ee'))
    for (name, p), q in zip(tuned.logical_parameters(), before.parameters()):
        assert torch.equal(p, q) != name.startswith('exits.'), name  # backbone identical, exits trained
    out = generate(tuned, [100, 101, 102], 6, 'recompute', thres=0.0)
    assert out['depths'] == [1] * 6
    tune.tune(dict(cfg, dynamic_weighting=True, max_iters=3, out_dir=str(tmp_path / 'dyn')))


def test_tune_distill_learns_the_final_heads_distribution(tune_setup, tmp_path):
    """--distill: the exits' KL to the frozen final head falls, the backbone stays bit-identical,
    and the logged KL is the one computed here by hand."""
    import tune
    d, args = tune_setup
    before, _ = convert.load(str(d / 'ee'))
    with torch.no_grad():  # a confident final head (a random one is near uniform, and so are its exits)
        before.lm_head.weight.mul_(40)
    checkpoint.save_checkpoint(str(tmp_path / 'sharp'), before, None, {}, 0, 0.0, data={'tokenizer': 'bytes'})
    args = [a.replace(str(d / 'ee'), str(tmp_path / 'sharp')) for a in args]
    cfg = configure(tune.DEFAULTS, args + [f'--out_dir={tmp_path / "kd"}', '--distill'], train.PER_EXIT_KEYS)
    model = tune.tune(cfg)
    assert model.norm_f is not None and len(model.blocks) == 4  # the teacher is the whole model
    evals = [json.loads(line) for line in open(tmp_path / 'kd' / 'log.jsonl') if 'val_losses' in line]
    for a, b in zip(evals[0]['val_losses'], evals[-1]['val_losses'], strict=True):
        assert a > 0.5 and b < 0.7 * a
    tuned, _ = checkpoint.load_model(str(tmp_path / 'kd'))
    for (name, p), q in zip(tuned.logical_parameters(), before.parameters()):
        assert torch.equal(p, q) != name.startswith('exits.'), name
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        logits, exit_logits = tuned(x, exits=True)
        p = logits.log_softmax(-1)
        kl = [(p.exp() * (p - lg.log_softmax(-1))).sum(-1).mean() for lg in exit_logits]
        _, got = tune.exit_objective(tuned, x, x, [1.0, 1.0], False, tuned.ps, distill=True)
    torch.testing.assert_close(got, torch.stack(kl).float())
    with pytest.raises(ValueError, match='distill runs in one process'):
        tune.tune(dict(cfg, dynamic_weighting=True))


@pytest.mark.parametrize('dtype', list(train.DTYPES))
def test_tune_runs_every_training_dtype(tune_setup, tmp_path, dtype):
    """tune.py trains through train.py's step, so every dtype train.py accepts works, float16
    with loss scaling included (CPU autocast and GradScaler), and only the exits change."""
    import tune
    d, args = tune_setup
    cfg = configure(tune.DEFAULTS, args + [f'--out_dir={tmp_path / dtype}', f'--dtype={dtype}', '--max_iters=6',
                                           '--eval_interval=6'], train.PER_EXIT_KEYS)
    tune.tune(cfg)
    evals = [json.loads(line) for line in open(tmp_path / dtype / 'log.jsonl') if 'val_losses' in line]
    assert all(b < a for a, b in zip(evals[0]['val_losses'], evals[-1]['val_losses'], strict=True))
    tuned, _ = checkpoint.load_model(str(tmp_path / dtype))
    before, _ = convert.load(str(d / 'ee'))
    for (name, p), q in zip(tuned.logical_parameters(), before.parameters()):
        assert torch.equal(p, q) != name.startswith('exits.'), name


def test_pair_tuning_trains_only_the_pairs(tune_setup, tmp_path):
    import tune
    d, args = tune_setup
    args = [a.replace(str(d / 'ee'), str(d / 'base')) for a in args] + [f'--out_dir={tmp_path / "pairs"}']
    model = tune.tune(configure(tune.DEFAULTS, args + ['--layer_parallel=[2,4]'], train.PER_EXIT_KEYS))
    assert [b.width for b in model.blocks.values()] == [1, 1, 2]
    evals = [json.loads(line) for line in open(tmp_path / 'pairs' / 'log.jsonl') if 'val_losses' in line]
    assert evals[-1]['val_losses'][0] < evals[0]['val_losses'][0] - 0.1  # the final loss falls (5.56 -> 5.33)
    with pytest.raises(ValueError, match='tuned to run with layer_parallel=.2, 4.'):
        checkpoint.load_model(str(tmp_path / 'pairs'), layer_parallel=[])
    tuned, _ = checkpoint.load_model(str(tmp_path / 'pairs'))  # runs with its pairs by default
    assert tuned.config.layer_parallel == (2, 4)
    paired, _ = checkpoint.load_model(str(d / 'base'), layer_parallel=[2, 4])
    for (name, p), q in zip(tuned.logical_parameters(), paired.parameters(), strict=True):
        assert torch.equal(p, q) != name.startswith('blocks.2.'), name  # only the pair learned
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(tuned(idx)[0], model.cpu()(idx)[0])  # saved and loaded as trained


@pytest.mark.parametrize('n, layout', [(4, ['--tp=2', '--pp=2']), (2, [])], ids=['pp2xtp2', 'dp2'])
def test_tune_under_torchrun_matches_one_process(tune_setup, tmp_path, n, layout):
    import subprocess
    import sys
    from test_parallel import ROOT, torchrun
    d, args = tune_setup
    one = subprocess.run([sys.executable, 'tune.py', f'--out_dir={tmp_path / "one"}'] + args, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    par = torchrun(n, [f'--out_dir={tmp_path / "par"}'] + args + layout, ROOT, 'tune.py')
    assert par.returncode == 0, par.stderr[-3000:]
    logs = [[json.loads(line) for line in open(tmp_path / r / 'log.jsonl')] for r in ('one', 'par')]
    assert len(logs[0]) == len(logs[1])
    for a, b in zip(*logs):
        for k in ('losses', 'val_losses'):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (a['iter'], k)
    one_model, _ = checkpoint.load_model(str(tmp_path / 'one'))
    par_model, _ = checkpoint.load_model(str(tmp_path / 'par'))
    for (name, p), q in zip(one_model.logical_parameters(), par_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
