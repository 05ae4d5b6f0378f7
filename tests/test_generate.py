"""Generation against naive references that re-run the whole sequence without a cache."""

import json

import pytest
import torch

import checkpoint
import decode
from decode import generate as generate_ids  # (decode is the detokenizer below)
import generate
import train
from model import GPT, GPTConfig
from parallel import LOCAL, GradSync, ParallelState
import subprocess
import sys

from test_parallel import ROOT, spawn, torchrun

VARIANTS = [
    dict(arch='gpt2', exit_layers=(1, 2, 3), exit_block=True, exit_norm=True, exit_untie=True),  # exits with KV
    dict(arch='llama', n_kv_head=2, exit_layers=(1, 2, 3), exit_mlp=True, exit_norm=True, exit_untie=True),
]


def peaked_model(v, seed=0):
    """A tiny random model whose heads are confident enough for thresholds to matter."""
    cfg = GPTConfig(**dict(dict(n_layer=4, n_head=4, n_embd=32, vocab_size=61, block_size=64), **v))
    model = GPT(cfg, seed=seed).double().eval()
    with torch.no_grad():
        for e in model.exits.values():
            e.out.weight.mul_(25)
        model.lm_head.weight.mul_(25)
    return model


@torch.no_grad()
def naive(model, prompt, n, thres=None):
    """Full forward over the whole sequence at every step; the first exit whose max
    probability reaches thres emits (argmax), else the final head."""
    tokens, depths = list(prompt), []
    for _ in range(n):
        logits, exits = model(torch.tensor([tokens]), exits=True)
        tok, depth = int(logits[0, -1].argmax()), model.config.n_layer
        if thres is not None:
            for e, d in enumerate(model.config.exit_depths):
                p = exits[e][0, -1].softmax(-1)
                if p.max() >= thres:
                    tok, depth = int(p.argmax()), d
                    break
        tokens.append(tok)
        depths.append(depth)
    return tokens[len(prompt):], depths


PROMPT = [5, 17, 3, 42, 8, 8, 1]


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_cached_greedy_equals_naive(v):
    model = peaked_model(v)
    want, _ = naive(model, PROMPT, 20)
    assert decode.generate(model, PROMPT, 20, 'full')['tokens'] == want
    out = decode.generate(model, PROMPT, 20, 'recompute', thres=1.01)  # nothing can exit
    assert out['tokens'] == want and set(out['depths']) == {4}


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_recompute_equals_naive_early_exit(v):
    model = peaked_model(v)
    mixed = 0
    for thres in (0.0, 0.3, 0.6, 0.9):
        want, want_depths = naive(model, PROMPT, 24, thres)
        out = decode.generate(model, PROMPT, 24, 'recompute', thres=thres)
        assert out['tokens'] == want and out['depths'] == want_depths, thres
        mixed += len(set(want_depths)) > 1
    assert mixed >= 2  # tokens leave at several depths: deep KV of exited tokens is exercised


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_speculative_equals_full_greedy(v):
    model = peaked_model(v)
    want, _ = naive(model, PROMPT, 25)
    for spec_exit in (0, 2):
        for k in (1, 3, 5):
            out = decode.generate(model, PROMPT, 25, 'speculative', spec_exit=spec_exit, spec_k=k)
            assert out['tokens'] == want, (spec_exit, k)
            assert 0 <= out['accepted'] <= out['drafted']


def test_sampling_is_reproducible_and_respects_top_k():
    model = peaked_model(VARIANTS[1])
    a = decode.generate(model, PROMPT, 15, 'full', temperature=1.5, top_k=3, seed=1)['tokens']
    b = decode.generate(model, PROMPT, 15, 'full', temperature=1.5, top_k=3, seed=1)['tokens']
    assert a == b
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(decode.sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 2}
    draws = {int(decode.sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert draws == {1}


def test_cli_json(tmp_path, capsys):
    model = peaked_model(dict(arch='llama', exit_layers=(2,), exit_norm=True, exit_untie=True, vocab_size=256))
    model.float()
    opt = train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu')
    GradSync(model.parameters(), LOCAL)
    checkpoint.save_checkpoint(str(tmp_path), model, opt, {}, 0, 0.0, data={'tokenizer': 'bytes', 'eot_token': None})
    out = generate.main([f'--out_dir={tmp_path}', '--prompt=def f(x):', '--max_new_tokens=12',
                         '--early_exit_thres=0.5', '--show_exits', '--print_max_prob', '--json'])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result['tokens'] == out['tokens'] and len(result['tokens']) == 12
    assert set(result['depths']) <= {2, 4} and isinstance(result['text'], str) and result['tokens_per_s'] > 0
    assert any('tokens/s' in line and 'mean depth' in line for line in lines)
    with pytest.raises(SystemExit, match='exit layer 3 is not one of'):
        generate.main([f'--out_dir={tmp_path}', '--exit_layers=[3]', '--early_exit_thres=0.5'])


def methods(model):
    return [decode.generate(model, PROMPT, 16, 'recompute', thres=t)['tokens'] for t in (0.3, 0.6, 2.0)] + \
           [decode.generate(model, PROMPT, 16, 'speculative', spec_exit=1, spec_k=3)['tokens']]


def _tp_decode(path, want):
    model, _ = checkpoint.load_model(path, ParallelState(tp=2))
    assert methods(model.double().eval()) == want


def test_tensor_parallel_decode_matches_one_process(tmp_path):
    model = peaked_model(dict(VARIANTS[1], vocab_size=63))  # odd vocabulary: padded under tp2
    opt = train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu')
    checkpoint.save_checkpoint(str(tmp_path), model, opt, {}, 0, 0.0)
    one, _ = checkpoint.load_model(str(tmp_path), LOCAL)
    want = methods(one.double().eval())
    assert len({tuple(w) for w in want}) > 1  # the thresholds make a difference
    spawn(_tp_decode, 2, str(tmp_path), want)


def test_server_round_trip_and_bad_requests(tmp_path):
    import http.client
    import threading
    model = peaked_model(dict(arch='llama', exit_layers=(2,), exit_norm=True, exit_untie=True, vocab_size=256))
    encode, decode = checkpoint.tokenizer({'data': {'tokenizer': 'bytes'}})
    server = generate.make_server(model, encode, decode, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def put(body, size=None):
        conn = http.client.HTTPConnection('localhost', server.server_port, timeout=60)
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request('PUT', '/api', body=body, headers={'Content-Length': str(size or len(body))})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    ok = {'prompts': ['def f(', 'x = '], 'tokens_to_generate': 6, 'logprobs': True, 'use_early_exit': True,
          'early_exit_thres': 0.5, 'exit_layers': [2], 'print_max_prob': True, 'top_k': 1}
    status, resp = put(ok)
    assert status == 200, resp
    assert len(resp['text']) == 2 and resp['text'][0].startswith('def f(') and len(resp['logprobs'][1]) == 6
    assert len(resp['segments'][0]) == len('def f(') + 6 and all(lp <= 0 for lp in resp['logprobs'][0])
    assert len(resp['max_probs'][1]) == 6
    want = generate_ids(model, encode('def f('), 6, 'recompute', 0.5)['tokens']
    assert resp['text'][0] == decode(encode('def f(') + want)  # the same tokens as the library call
    for body, field in [(b'{not json', 'not JSON'), ({'tokens_to_generate': 3}, 'prompts is required'),
                        ({'prompts': 5}, 'prompts='), ({'prompts': ['a'], 'temperature': -1}, 'temperature='),
                        ({'prompts': ['a'], 'tokens_to_generate': 'ten'}, 'tokens_to_generate='),
                        ({'prompts': ['a'], 'top_p': 2}, 'top_p='), ({'prompts': ['a'], 'exit_layers': [3]}, 'exit_layers'),
                        ({'prompts': ['a'], 'logprobs': 1}, 'logprobs='), ({'prompts': ['a'], 'colour': 1}, 'unknown'),
                        ({'prompts': ['a'], 'tokens_to_generate': 4000}, 'block_size')]:
        status, resp = put(body)
        assert status == 400 and field in resp['error'], (body[:40], resp)
    status, resp = put(b'{}', size=generate.MAX_REQUEST_BYTES + 1)  # announced as too large: not even read
    assert status == 400 and 'at most' in resp['error']
    assert put(ok)[0] == 200  # still serving
    server.shutdown()


@pytest.mark.parametrize('spec_exit', [0, 'auto'])
def test_speculative_sampling_keeps_the_full_distribution(spec_exit):
    """The first sampled token's empirical distribution over many seeds, speculative (a fixed
    exit, or adaptive) vs the full model's exact next-token distribution (a small vocabulary,
    deterministic seeds)."""
    model = peaked_model(dict(arch='llama', exit_layers=(1,), exit_norm=True, exit_untie=True, vocab_size=6))
    with torch.no_grad():
        model.lm_head.weight.div_(10)  # softer than the exit: drafts get rejected sometimes
        p = decode.distribution(model(torch.tensor([PROMPT[:3]]) % 6)[0][:, -1], 1.0)[0]
    counts, n = torch.zeros(6), 1500
    accepted = 0
    for s in range(n):
        out = decode.generate(model, [t % 6 for t in PROMPT[:3]], 1, 'speculative', spec_exit=spec_exit, spec_k=2,
                                temperature=1.0, seed=s)
        counts[out['tokens'][0]] += 1
        accepted += out['accepted']
    assert 0 < accepted < n  # both branches of the rule ran
    assert (counts / n - p.float()).abs().sum() < 0.06  # total variation ~ 0.03 expected at n = 1500


def _pipelined(path, pp, want):
    ps = ParallelState(pp=pp)
    model, _ = checkpoint.load_model(path, ps)
    model.double().eval()
    for (thres, tokens, depths) in want:
        out = decode.generate_pipelined(model, PROMPT, 16, thres, ps=ps)
        if ps.pp_rank == 0:
            assert out['tokens'] == tokens and out['depths'] == depths, thres
        else:
            assert out is None


@pytest.mark.parametrize('pp', [2, 3])
def test_pipeline_based_equals_recompute(tmp_path, pp):
    v = dict(arch='gpt2', n_layer=6, exit_layers=(2, 3, 5), exit_block=True, exit_norm=True, exit_untie=True)
    model = peaked_model(v)
    checkpoint.save_checkpoint(str(tmp_path), model, train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu'), {}, 0, 0.0)
    one, _ = checkpoint.load_model(str(tmp_path))
    one.double().eval()
    want = []
    for thres in (None, 0.3, 0.6):
        out = decode.generate(one, PROMPT, 16, 'recompute', thres=thres)
        want.append((thres, out['tokens'], out['depths']))
    assert len(set(want[1][2])) > 1  # exits at several depths
    spawn(_pipelined, pp, str(tmp_path), pp, want)


def test_cli_under_torchrun_tp_and_pipeline(tmp_path):
    v = dict(arch='llama', n_layer=4, n_kv_head=2, exit_layers=(1, 2), exit_norm=True, exit_untie=True, vocab_size=256)
    model = peaked_model(v).float()
    checkpoint.save_checkpoint(str(tmp_path), model, train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu'), {}, 0, 0.0,
                          data={'tokenizer': 'bytes', 'eot_token': None})
    args = [f'--out_dir={tmp_path}', '--prompt=import os', '--max_new_tokens=10', '--early_exit_thres=0.4', '--json']
    one = subprocess.run([sys.executable, 'generate.py'] + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    want = json.loads(one.stdout.strip().splitlines()[-1])
    for n, extra in ((2, ['--tp=2']), (2, ['--pp=2', '--method=pipeline']), (4, ['--pp=2', '--tp=2', '--method=pipeline'])):
        got = torchrun(n, args + extra, ROOT, 'generate.py')
        assert got.returncode == 0, got.stderr[-2000:]
        got = json.loads(got.stdout.strip().splitlines()[-1])
        assert got['tokens'] == want['tokens'] and got['depths'] == want['depths'], extra


def test_compiled_decoding_equals_naive():
    """Blocks and heads compiled by torch.compile (one position, then chunks of any length)
    give the naive reference's tokens and exits, with KV recomputation and speculation."""
    model = peaked_model(VARIANTS[1])
    want, want_depths = naive(model, PROMPT, 16, 0.6)
    dec = decode.Decoder(model, compile=True)
    out = decode.generate(model, PROMPT, 16, 'recompute', thres=0.6, decoder=dec)
    assert out['tokens'] == want and out['depths'] == want_depths and len(set(want_depths)) > 2
    out = decode.generate(model, PROMPT, 16, 'speculative', spec_exit=1, spec_k=3, decoder=dec)
    assert out['tokens'] == naive(model, PROMPT, 16)[0] and dec.compile


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a GPU')
@pytest.mark.parametrize('compile', [False, True], ids=['graphs', 'compiled-graphs'])
@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_cuda_graph_decoding_equals_eager(v, compile):
    """Every segment replayed as a CUDA graph (its blocks and heads compiled or not) gives
    the eager decoder's tokens, exits and log probs, for every method, over repeated calls
    that reuse the captured graphs."""
    model = peaked_model(v).cuda()
    runs = [('full', {}), ('speculative', dict(spec_exit=0, spec_k=3)), ('speculative', dict(spec_exit=2, spec_k=4))]
    runs += [('recompute', dict(thres=t)) for t in (0.0, 0.3, 0.6, 0.9)]
    eager, dec = decode.Decoder(model, graphs=False), decode.Decoder(model, graphs=True, compile=compile)
    wants = [decode.generate(model, PROMPT, 24, method, decoder=eager, **kw) for method, kw in runs]
    for (method, kw), want in zip(runs + runs, wants + wants):  # the second round replays the graphs
        got = decode.generate(model, PROMPT, 24, method, decoder=dec, **kw)
        assert got['tokens'] == want['tokens'] and got['depths'] == want['depths'], (method, kw)
        # (the confidence is computed in float32: compiled kernels round it differently)
        assert got['logprobs'] == pytest.approx(want['logprobs'], abs=1e-5 if compile else 1e-9)
    assert dec.graphs and dec.compile == compile and len(dec.captured) >= 6


def test_bench_early_exit_decode_runs_tiny_on_cpu():
    import bench
    out = bench.main(['--mode=decode', '--shape=tiny', '--device=cpu', '--exit_layers=[1]', '--batch=[1,3]',
                      '--prompt_len=8', '--new_tokens=4', '--exit_rates=[0,0.5]'])
    kinds = ['eager', 'decoder', 'decoder, 0% exit at 1', 'decoder, 50% exit at 1',
             'speculative from 1, 3 of 4 drafts kept']
    assert [(r['batch'], r['step']) for r in out['runs']] == [(b, k) for b in (1, 3) for k in kinds]
    assert all(r['speedup_vs_decoder'] > 0 for r in out['runs'] if r['step'] not in kinds[:2])
    for r in out['runs']:  # the forced share of tokens really leaves at the exit (of 4 a row, about half)
        if r['step'] in kinds[2:4]:
            assert (r['exited'] == 0) if r['exit_rate'] == 0 else (0.2 <= r['exited'] <= 0.8), r


def test_bench_puts_each_figure_beside_the_peers(tmp_path):
    """--peers runs the folder's bench_peers.py (here a stand-in that reports fixed figures, as
    the real one does on a GPU) in its own process, with the workload's batch size, and gives
    each batch-1 run its ratio to the peer's figure; a workload without a peer is refused."""
    import bench
    (tmp_path / 'bench_peers.py').write_text(
        'import json, os, sys\n'
        'figures = {"gptfast_7b_compiled_tok_s": 200.0, "which": sys.argv[1:], "B": os.environ["NANOGPT_B"]}\n'
        'json.dump(figures, open(os.path.join(os.environ["OUT"], "peers.json"), "w"))\n')
    figures = bench.run_peers(str(tmp_path), 'decode', 16)
    assert figures['which'] == ['ceil', 'gptfast'] and figures['B'] == '16'
    runs = [{'batch': 1, 'tokens_per_s': 250.0}, {'batch': 8, 'tokens_per_s': 900.0}]
    bench.beside_peer(runs, figures, bench.PEER_FIGURES[('decode', '7b')])
    assert runs[0]['vs_peer'] == 1.25 and 'vs_peer' not in runs[1]
    with pytest.raises(ValueError, match="no peer for mode='decode' shape='tiny'"):
        bench.main(['--mode=decode', '--shape=tiny', '--device=cpu', f'--peers={tmp_path}'])
    with pytest.raises(ValueError, match='holds no bench_peers.py'):
        bench.run_peers(str(tmp_path / 'none'), 'train', 16)
