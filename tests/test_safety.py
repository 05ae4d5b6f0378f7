"""Nothing lost, nothing hung, every bad input named: checkpoints across crashes, the server
against slow and hostile clients, the command lines against bad values. Every wait is bounded."""

import http.client
import json
import os
import shutil
import signal
import socket
import threading
import time

import pytest
import torch

import corpus
import checkpoint
import convert
import generate
import train
from decode import generate as generate_ids
from model import GPT, GPTConfig
from test_generate import peaked_model
from test_train import dataset, read_log, run_cfg  # noqa: F401 (dataset is a fixture)

TINY = dict(arch='llama', n_layer=2, n_head=2, n_embd=16, vocab_size=256, block_size=32, exit_layers=(1,),
            exit_norm=True)


def saved(path, seed=0, step=0):
    model = GPT(GPTConfig(**TINY), seed=seed)
    checkpoint.save_checkpoint(str(path), model, None, {}, step, 0.0, data={'tokenizer': 'bytes', 'eot_token': None})
    return model


# -- checkpoints --------------------------------------------------------------------------

def crash_on_swap_in(monkeypatch, step):
    """os.rename raises when it would move the checkpoint of `step` onto out_dir/ckpt: a crash
    between a save's two renames (ckpt -> ckpt.old done, ckpt.tmp -> ckpt not)."""
    real = os.rename

    def rename(a, b):
        meta = os.path.join(a, 'meta.json')
        if os.path.basename(b) == 'ckpt' and os.path.exists(meta) and json.load(open(meta))['iter_num'] == step:
            raise OSError('injected crash')
        return real(a, b)
    monkeypatch.setattr(os, 'rename', rename)


def test_two_crashes_in_a_row_keep_a_loadable_checkpoint(tmp_path, monkeypatch):
    saved(tmp_path, step=1)
    for step in (2, 3):  # two saves in a row crash at the same point
        with monkeypatch.context() as m:
            crash_on_swap_in(m, step)
            with pytest.raises(OSError, match='injected'):
                saved(tmp_path, step=step)
        assert checkpoint.Checkpoint(str(tmp_path)).meta['iter_num'] == step  # the complete ckpt.tmp
    saved(tmp_path, step=4)
    assert checkpoint.Checkpoint(str(tmp_path)).meta['iter_num'] == 4
    assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_flipped_bytes_and_truncated_rng(tmp_path):
    saved(tmp_path)
    shard = tmp_path / 'ckpt' / 'shard-pp0-tp0.pt'
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    rng = tmp_path / 'ckpt' / 'rng-0.pt'
    rng.write_bytes(rng.read_bytes()[:10])
    with pytest.raises(RuntimeError, match='CRC-32'):
        shard.write_bytes(bytes(data))
        checkpoint.load_model(str(tmp_path))
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    checkpoint.load_model(str(tmp_path))  # generation has no use for the (truncated) RNG state
    with pytest.raises(RuntimeError, match='rng-0.pt is truncated'):
        checkpoint.Checkpoint(str(tmp_path)).load_into(GPT(GPTConfig(**TINY)), rng=True)


def test_non_finite_parameters_are_never_saved_or_loaded(tmp_path):
    model = saved(tmp_path, step=1)
    with torch.no_grad():
        model.blocks['0'].mlp.up.weight[0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match='blocks.0.mlp.up.weight'):
        checkpoint.save_checkpoint(str(tmp_path), model, None, {}, 2, 0.0)
    assert checkpoint.Checkpoint(str(tmp_path)).meta['iter_num'] == 1
    shard = torch.load(tmp_path / 'ckpt' / 'shard-pp0-tp0.pt', weights_only=True)
    shard['param']['wte.weight'][0, 0] = float('inf')  # written by something else, CRC and all
    torch.save(shard, tmp_path / 'ckpt' / 'shard-pp0-tp0.pt')
    meta = json.loads((tmp_path / 'ckpt' / 'meta.json').read_text())
    meta['file_bytes']['shard-pp0-tp0.pt'], meta['file_crc32']['shard-pp0-tp0.pt'] = \
        checkpoint.file_record(str(tmp_path / 'ckpt' / 'shard-pp0-tp0.pt'))
    (tmp_path / 'ckpt' / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(FloatingPointError, match='wte.weight'):
        checkpoint.load_model(str(tmp_path))


def test_a_shard_missing_a_tensor_is_named(tmp_path):
    saved(tmp_path)
    path = tmp_path / 'ckpt' / 'shard-pp0-tp0.pt'
    shard = torch.load(path, weights_only=True)
    shard['param']['norm_f.weight'] = torch.ones(3)
    del shard['param']['wte.weight']
    torch.save(shard, path)
    meta = json.loads((tmp_path / 'ckpt' / 'meta.json').read_text())
    meta['file_bytes']['shard-pp0-tp0.pt'], meta['file_crc32']['shard-pp0-tp0.pt'] = checkpoint.file_record(str(path))
    (tmp_path / 'ckpt' / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match='wte.weight as nothing'):
        checkpoint.load_model(str(tmp_path))


def test_diverged_run_stops_and_keeps_its_last_good_checkpoint(dataset, tmp_path):  # noqa: F811
    train.train(run_cfg(dataset, tmp_path, max_iters=4, eval_interval=4))
    good = (tmp_path / 'ckpt' / 'shard-pp0-tp0.pt').read_bytes()
    with pytest.raises(FloatingPointError, match='diverged'):
        train.train(run_cfg(dataset, tmp_path, max_iters=12, eval_interval=4, init_from='resume',
                            learning_rate=1e30, grad_clip=0.0, warmup_iters=0))
    assert (tmp_path / 'ckpt' / 'shard-pp0-tp0.pt').read_bytes() == good
    assert checkpoint.Checkpoint(str(tmp_path)).meta['iter_num'] == 4


def test_ctrl_c_right_after_an_update_saves_that_step(dataset, tmp_path, monkeypatch):  # noqa: F811
    """A real SIGINT delivered just after step 3's optimizer update, before the loop counts it:
    the saved step is 4, and the resumed run's curve is the uninterrupted one."""
    common = dict(max_iters=8, eval_interval=8, gradient_accumulation_steps=2)
    train.train(run_cfg(dataset, tmp_path / 'full', **common))
    real = train.train_step

    def step(*args, **kw):
        out = real(*args, **kw)
        if args[4] == 3:  # (it)
            signal.raise_signal(signal.SIGINT)
        return out
    with monkeypatch.context() as m:
        m.setattr(train, 'train_step', step)
        with pytest.raises(KeyboardInterrupt):
            train.train(run_cfg(dataset, tmp_path / 'cut', **common))
    assert checkpoint.Checkpoint(str(tmp_path / 'cut')).meta['iter_num'] == 4
    train.train(run_cfg(dataset, tmp_path / 'cut', init_from='resume', **common))
    full = {r['iter']: r['loss'] for r in read_log(tmp_path / 'full') if 'loss' in r}
    cut = {r['iter']: r['loss'] for r in read_log(tmp_path / 'cut') if 'loss' in r}
    assert sorted(cut) == [0, 1, 2, 4, 5, 6, 7]  # (step 3 was interrupted before its log line)
    for it in cut:
        assert cut[it] == pytest.approx(full[it], rel=1e-6, abs=1e-6), it


# -- convert -------------------------------------------------------------------------------

def test_convert_refuses_a_non_empty_dst(tmp_path):
    saved(tmp_path / 'trained', seed=5, step=7)
    base = GPT(GPTConfig(**dict(TINY, exit_layers=())), seed=1)
    checkpoint.save_checkpoint(str(tmp_path / 'plain'), base, None, {}, 0, 0.0)
    before = (tmp_path / 'trained' / 'ckpt' / 'meta.json').read_text()
    with pytest.raises(FileExistsError, match='not empty.*--overwrite=True'):
        convert.add_exits(str(tmp_path / 'plain'), str(tmp_path / 'trained'), [1])
    assert (tmp_path / 'trained' / 'ckpt' / 'meta.json').read_text() == before
    convert.add_exits(str(tmp_path / 'plain'), str(tmp_path / 'trained'), [1], overwrite=True)
    assert checkpoint.Checkpoint(str(tmp_path / 'trained')).meta['model_config']['exit_layers'] == [1]
    assert sorted(os.listdir(tmp_path)) == ['plain', 'trained']  # no temporary folder left
    pytest.importorskip('safetensors')
    hf = tmp_path / 'hf'
    hf.mkdir()
    (hf / 'tokenizer.json').write_text('{}')  # another model's tokenizer
    with pytest.raises(FileExistsError, match='not empty'):
        convert.to_hf(str(tmp_path / 'plain'), str(hf))
    convert.to_hf(str(tmp_path / 'plain'), str(hf), overwrite=True)
    assert sorted(os.listdir(hf)) == ['config.json', 'model.safetensors']  # a whole new folder


def write_gpt2(d, vocab, tie, eos):
    """A minimal Hugging Face GPT-2 folder written by hand (no transformers needed)."""
    from safetensors.torch import save_file
    C, L = 16, 1
    t = {'transformer.wte.weight': torch.randn(vocab, C), 'transformer.wpe.weight': torch.randn(32, C),
         'transformer.ln_f.weight': torch.ones(C), 'transformer.ln_f.bias': torch.zeros(C)}
    for i in range(L):
        p = f'transformer.h.{i}.'
        t.update({p + 'ln_1.weight': torch.ones(C), p + 'ln_1.bias': torch.zeros(C), p + 'ln_2.weight': torch.ones(C),
                  p + 'ln_2.bias': torch.zeros(C), p + 'attn.c_attn.weight': torch.randn(C, 3 * C),
                  p + 'attn.c_attn.bias': torch.zeros(3 * C), p + 'attn.c_proj.weight': torch.randn(C, C),
                  p + 'attn.c_proj.bias': torch.zeros(C), p + 'mlp.c_fc.weight': torch.randn(C, 4 * C),
                  p + 'mlp.c_fc.bias': torch.zeros(4 * C), p + 'mlp.c_proj.weight': torch.randn(4 * C, C),
                  p + 'mlp.c_proj.bias': torch.zeros(C)})
    if not tie:
        t['lm_head.weight'] = torch.randn(vocab, C)
    os.makedirs(d)
    save_file(t, os.path.join(d, 'model.safetensors'))
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump({'architectures': ['GPT2LMHeadModel'], 'vocab_size': vocab, 'n_embd': C, 'n_layer': L,
                   'n_head': 2, 'n_positions': 32, 'tie_word_embeddings': tie, 'eos_token_id': eos}, f)


def test_from_hf_gpt2_vocabulary_end_token_and_untied_head(tmp_path, monkeypatch, capsys):
    pytest.importorskip('safetensors')
    write_gpt2(str(tmp_path / 'small'), 300, tie=True, eos=50256)
    convert.from_hf(str(tmp_path / 'small'), str(tmp_path / 'a'))
    data = checkpoint.Checkpoint(str(tmp_path / 'a')).meta['data']
    assert data['tokenizer'] is None and data['eot_token'] is None  # not GPT-2's BPE; no such id
    write_gpt2(str(tmp_path / 'untied'), 300, tie=False, eos=7)
    convert.from_hf(str(tmp_path / 'untied'), str(tmp_path / 'b'))
    model, ckpt = checkpoint.load_model(str(tmp_path / 'b'))
    assert not model.config.tie_embeddings and ckpt.meta['data']['eot_token'] == 7
    with pytest.raises(FileNotFoundError, match='no config.json'):
        convert.from_hf(str(tmp_path / 'a'), str(tmp_path / 'c'))
    # a tokenizer that cannot load (tiktoken offline): --prompt_ids still generates
    meta = json.loads((tmp_path / 'a' / 'ckpt' / 'meta.json').read_text())
    meta['data']['tokenizer'] = 'gpt2'
    (tmp_path / 'a' / 'ckpt' / 'meta.json').write_text(json.dumps(meta))
    monkeypatch.setattr(generate, 'tokenizer', lambda *a: (_ for _ in ()).throw(ConnectionError('offline')))
    out = generate.main([f'--out_dir={tmp_path / "a"}', '--prompt_ids=[1,2,3]', '--max_new_tokens=3'])
    assert len(out['tokens']) == 3
    with pytest.raises(SystemExit, match='does not load.*offline'):
        generate.main([f'--out_dir={tmp_path / "a"}', '--prompt=hi'])


# -- command lines -------------------------------------------------------------------------

@pytest.mark.parametrize('arg, name', [('--bias=off', 'bias'), ('--tie_embeddings=no', 'tie_embeddings'),
                                       ('--lr_decay_iters=abc', 'lr_decay_iters'), ('--pp_layers=3', 'pp_layers'),
                                       ('--fill_warmup=x', 'fill_warmup'), ('--exit_weight_init=x', 'exit_weight_init'),
                                       ('--eval_iters=0', 'eval_iters'), ('--batch_size=0', 'batch_size'),
                                       ('--eval_interval=0', 'eval_interval'), ('--log_interval=0', 'log_interval'),
                                       ('--dtype=fp8', 'dtype'), ('--beta2=1.5', 'beta2')])
def test_train_keys_refuse_bad_values(arg, name):
    with pytest.raises(ValueError, match=f'^--{name}=|^{name}='):
        train.config([arg])
    assert train.config(['--bias=False', '--lr_decay_iters=5'])['lr_decay_iters'] == 5


def test_train_refuses_data_that_does_not_fit(dataset, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match='block_size=100000'):
        train.train(run_cfg(dataset, tmp_path, block_size=100000))
    shutil.copytree(dataset, tmp_path / 'd')
    meta = json.loads((tmp_path / 'd' / 'meta.json').read_text())
    (tmp_path / 'd' / 'meta.json').write_text(json.dumps(dict(meta, vocab_size=40)))  # ids above 40 inside
    with pytest.raises(ValueError, match='outside the model\'s vocab_size=40'):
        train.train(run_cfg(str(tmp_path / 'd'), tmp_path))
    (tmp_path / 'd' / 'meta.json').write_text('{"dtype": "uint8"}')
    with pytest.raises(ValueError, match='meta.json is not a dataset meta.json.*vocab_size'):
        corpus.load_data(str(tmp_path / 'd'))


@pytest.mark.parametrize('arg, name', [('--temperature=-1', 'temperature'), ('--max_new_tokens=0', 'max_new_tokens'),
                                       ('--early_exit_thres=1.5', 'early_exit_thres'), ('--top_p=2', 'top_p'),
                                       ('--top_k=0', 'top_k'), ('--spec_k=0', 'spec_k'), ('--spec_k=-2', 'spec_k'),
                                       ('--early_exit_thres=nan', 'early_exit_thres'),
                                       ('--prompt_ids=abc', 'prompt_ids'), ('--seed=-1', 'seed')])
def test_generate_refuses_bad_values(tmp_path, arg, name):
    saved(tmp_path)
    with pytest.raises(SystemExit, match=f'{name}='):
        generate.main([f'--out_dir={tmp_path}', arg, '--method=speculative', '--spec_exit=1'])
    with pytest.raises(ValueError, match='spec_k=0'):
        generate_ids(GPT(GPTConfig(**TINY)), [1, 2], 3, 'speculative', spec_exit=0, spec_k=0)


# -- the server ----------------------------------------------------------------------------

@pytest.fixture
def server():
    model = peaked_model(dict(arch='llama', exit_layers=(2,), exit_norm=True, exit_untie=True, vocab_size=256))
    encode, decode = checkpoint.tokenizer({'data': {'tokenizer': 'bytes'}})
    srv = generate.make_server(model, encode, decode, 0, timeout=5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, model, encode, decode
    srv.shutdown()
    srv.server_close()


def put(port, body, timeout=20, headers=None):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request('PUT', '/api', body=body, headers=headers or {'Content-Length': str(len(body))})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def raw(port, data):
    """A socket that sends `data` and then nothing (left open)."""
    s = socket.create_connection(('127.0.0.1', port), timeout=20)
    s.sendall(data)
    return s


OK = {'prompts': ['def f('], 'tokens_to_generate': 4}


def test_idle_and_slow_clients_block_nobody(server):
    srv, *_ = server
    port = srv.server_port
    assert srv.server_address[0] == '127.0.0.1'  # not every interface
    hold = [raw(port, b''),                                            # sends nothing
            raw(port, b'PUT /api HTTP/1.1\r\nContent-Le'),              # headers dripping
            raw(port, b'PUT /api HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"prompts"')]  # a short body
    t0 = time.time()
    assert put(port, OK)[0] == 200
    assert time.time() - t0 < 5  # answered while the others hang on
    for bad in ('-1', 'abc'):
        status, resp = put(port, OK, headers={'Content-Length': bad})
        assert status == 400 and 'Content-Length' in resp['error']
    for s in hold:
        s.close()


def test_concurrent_clients_are_all_answered(server):
    srv, model, encode, decode = server
    want = {}
    results = {}

    def client(i):
        body = dict(OK, prompts=[f'x = {i}'])
        results[i] = put(srv.server_port, body, timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(20):
        want = generate_ids(model, encode(f'x = {i}'), 4)['tokens']
        assert results[i][0] == 200 and results[i][1]['text'][0] == decode(encode(f'x = {i}') + want), i


def test_malformed_requests_are_400(server):
    srv, *_ = server
    for body, field in [(dict(OK, random_seed=2**63), 'random_seed='), ({'prompts': ['\ud800']}, 'surrogate'),
                        (b'[' * 100000 + b']' * 100000, 'not JSON'), (dict(OK, temperature=None), 'null')]:
        status, resp = put(srv.server_port, body if isinstance(body, bytes) else
                           json.dumps(body).encode('utf-8', 'surrogatepass'))
        assert status == 400 and field in resp['error'], resp


def test_ee_llm_request_client_body(server):
    """EE-LLM's tools/request_client.py request, field for field: answered, without the prompt."""
    srv, model, encode, decode = server
    body = {'prompts': ['def main('], 'tokens_to_generate': 8, 'top_k': 1, 'logprobs': True,
            'random_seed': 1234, 'echo_prompts': False, 'early_exit_thres': 0.8, 'use_early_exit': True}
    status, resp = put(srv.server_port, body)
    want = generate_ids(model, encode('def main('), 8, 'recompute', 0.8)['tokens']
    assert status == 200 and resp['text'][0] == decode(want)
    status, resp = put(srv.server_port, dict(body, prompts='def main(', exit_layers=[], echo_prompts=True,
                                             add_BOS=False, stop_sequences=[], no_log=True))
    assert status == 200 and resp['text'][0] == decode(encode('def main(') + want)  # [] is every exit


def test_prepare_names_a_bad_input(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'text'))
    import prepare
    (tmp_path / 'bin').write_bytes(b'\xff\xfe\x00binary')
    for path, says in ((tmp_path / 'bin', 'is not UTF-8 text'), (tmp_path, 'it is a folder'),
                       (tmp_path / 'none.txt', 'no such file')):
        with pytest.raises(SystemExit, match=says):
            prepare.main(['--input', str(path), '--out_dir', str(tmp_path / 'out')])
