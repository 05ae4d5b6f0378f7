"""Batched decoding: every row equals its own batch-1 run and the naive no-cache reference."""

import pytest
import torch

import decode
from model import GPT, GPTConfig
from test_generate import VARIANTS, naive, peaked_model

PROMPTS = [[5, 17, 3, 42, 8, 8, 1], [9], [30, 2, 2, 7]]  # ragged: 7, 1 and 4 tokens


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_batched_full_and_recompute_equal_each_row_alone(v):
    model = peaked_model(v)
    mixed = 0
    for thres in (None, 0.3, 0.6, 0.9):
        method = 'full' if thres is None else 'recompute'
        outs = decode.generate_many(model, PROMPTS, 18, method, thres=thres, batch_size=3)
        for p, out in zip(PROMPTS, outs):
            alone = decode.generate(model, p, 18, method, thres=thres)
            want, want_depths = naive(model, p, 18, thres)
            assert out['tokens'] == alone['tokens'] == want, (thres, p)
            assert out['depths'] == alone['depths'] == want_depths, (thres, p)
            mixed += len(set(want_depths)) > 1
    assert mixed >= 3  # rows leave at several depths: each row's pending deep KV is exercised


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_batched_speculative_equals_full_greedy(v):
    model = peaked_model(v)
    wants = [naive(model, p, 21)[0] for p in PROMPTS]
    rejected = 0
    for spec_exit in (0, 2):
        for k in (2, 5):
            outs = decode.generate_many(model, PROMPTS, 21, 'speculative', spec_exit=spec_exit, spec_k=k,
                                        batch_size=3)
            for p, out, want in zip(PROMPTS, outs, wants):
                assert out['tokens'] == want, (spec_exit, k, p)
                alone = decode.generate(model, p, 21, 'speculative', spec_exit=spec_exit, spec_k=k)
                assert (out['accepted'], out['drafted']) == (alone['accepted'], alone['drafted'])
                rejected += out['accepted'] < out['drafted']
    assert rejected >= 3  # rows roll back at their own positions


def test_refilled_row_decodes_as_alone():
    """Five prompts of different lengths through two and three rows: rows finish at different
    times (stop tokens, lengths) and take the next prompt while the others go on."""
    model = peaked_model(VARIANTS[1])
    prompts = PROMPTS + [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [44, 3]]
    for method, kw in (('full', {}), ('recompute', dict(thres=0.6)), ('speculative', dict(spec_exit=1, spec_k=3))):
        alone = [decode.generate(model, p, 12, method, **kw) for p in prompts]
        stop = alone[0]['tokens'][4]  # a token that ends some sequences early
        alone = [decode.generate(model, p, 12, method, stop=stop, **kw) for p in prompts]
        assert len({len(a['tokens']) for a in alone}) > 1
        for B in (2, 3):  # (3: rows admitted together around a row that goes on decoding)
            dec = decode.Decoder(model, batch_size=B)
            for _ in range(2):  # and again with the same decoder
                outs = decode.generate_many(model, prompts, 12, method, stop=stop, decoder=dec, **kw)
                assert [o['tokens'] for o in outs] == [a['tokens'] for a in alone], (method, B)
                assert [o['depths'] for o in outs] == [a['depths'] for a in alone], (method, B)


def test_sampling_rows_are_independent_of_batch_mates():
    model = peaked_model(VARIANTS[1])
    for method, kw in (('full', {}), ('recompute', dict(thres=0.5)), ('speculative', dict(spec_exit=0, spec_k=3))):
        sample = dict(temperature=1.3, top_k=20, seed=11, **kw)
        outs = decode.generate_many(model, PROMPTS, 15, method, batch_size=3, **sample)
        alone = [decode.generate(model, p, 15, method, **dict(sample, seed=11 + i)) for i, p in enumerate(PROMPTS)]
        assert [o['tokens'] for o in outs] == [a['tokens'] for a in alone], method
        other = decode.generate_many(model, [PROMPTS[0], [3, 3, 3], [50]], 15, method, batch_size=3, **sample)
        assert other[0]['tokens'] == outs[0]['tokens'], method  # the same row with other mates
        greedy = decode.generate(model, PROMPTS[0], 15, method, **kw)['tokens']
        assert outs[0]['tokens'] != greedy  # (it did sample)


def test_cache_too_small_for_a_new_row_is_named():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=20, block_size=1024)).eval()
    dec = decode.Decoder(model, batch_size=2)
    dec.start({0: [1, 2, 3]}, 10)
    with pytest.raises(ValueError, match=r'larger cache than the 256 reserved, while rows \[0\] decode'):
        dec.start({1: [1, 2, 3]}, 300)
    dec.free(0)
    dec.start({1: [1, 2, 3]}, 300)  # all rows idle: the cache grows
    assert dec.max_len == 512


# -- the command line and the server -------------------------------------------------------

def test_cli_prompts_file(tmp_path, capsys):
    import json
    import checkpoint
    import generate
    import train
    from parallel import LOCAL, GradSync
    model = peaked_model(dict(arch='llama', exit_layers=(2,), exit_norm=True, exit_untie=True, vocab_size=256))
    model.float()
    GradSync(model.parameters(), LOCAL)
    checkpoint.save_checkpoint(str(tmp_path), model, train.make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu'), {},
                               0, 0.0, data={'tokenizer': 'bytes', 'eot_token': None})
    texts = ['def f(x):', 'a', 'import os\nimport sys', 'x = [1, 2', 'class A:']
    (tmp_path / 'prompts.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    generate.main([f'--out_dir={tmp_path}', f'--prompts_file={tmp_path / "prompts.jsonl"}', '--batch_size=2',
                   '--max_new_tokens=9', '--early_exit_thres=0.5', '--json'])
    lines = capsys.readouterr().out.strip().splitlines()
    got = json.loads(lines[-1])
    assert got['tokens_per_s'] > 0 and len(got['results']) == len(texts)
    encode, decode_text = checkpoint.tokenizer({'data': {'tokenizer': 'bytes'}})
    for t, r in zip(texts, got['results']):
        alone = decode.generate(model, encode(t), 9, 'recompute', thres=0.5)
        assert r['tokens'] == alone['tokens'] and r['text'] == decode_text(alone['tokens'])
        assert r['exit_layers'] == alone['depths']  # (exit_pre off: an exit's layer number is its depth)
    assert sum(line.startswith('--- [') for line in lines) == len(texts)
    generate.main([f'--out_dir={tmp_path}', '--prompt=def f(x):', '--max_new_tokens=20', '--method=speculative',
                   '--spec_exit=auto', '--spec_stop=0.5', '--json'])
    auto = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert auto['tokens'] == decode.generate(model, encode('def f(x):'), 20, 'full')['tokens']
    (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(SystemExit, match='bad.jsonl:2: not a JSON object'):
        generate.main([f'--out_dir={tmp_path}', f'--prompts_file={tmp_path / "bad.jsonl"}'])


def test_server_batches_concurrent_requests():
    import http.client
    import json
    import socket
    import threading
    import time
    import checkpoint
    import generate
    model = peaked_model(dict(arch='llama', exit_layers=(2,), exit_norm=True, exit_untie=True, vocab_size=256))
    encode, decode_text = checkpoint.tokenizer({'data': {'tokenizer': 'bytes'}})
    dec = decode.Decoder(model, batch_size=4)
    srv = generate.make_server(model, encode, decode_text, 0, decoder=dec, timeout=5)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_port

    def put(body):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
        data = json.dumps(body).encode()
        conn.request('PUT', '/api', body=data, headers={'Content-Length': str(len(data))})
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    bodies = [{'prompts': [f'x = {i}', 'def'][:1 + i % 2], 'tokens_to_generate': 3 + 2 * i, 'use_early_exit': True,
               'early_exit_thres': 0.4 + 0.1 * (i % 3), 'temperature': 1.0 if i % 3 == 0 else 0.0,
               'random_seed': i} for i in range(7)]
    sequential = [put(b) for b in bodies]
    results, finished = {}, []

    def client(i):
        results[i] = put(bodies[i])
        finished.append(i)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(results[i] == sequential[i] and sequential[i][0] == 200 for i in range(len(bodies)))
    for i, b in enumerate(bodies):  # and the library's answer, prompt by prompt
        for j, p in enumerate(b['prompts']):
            alone = decode.generate(model, encode(p), b['tokens_to_generate'], 'recompute', b['early_exit_thres'],
                                    temperature=b['temperature'], seed=i + j)
            assert sequential[i][1]['text'][j] == decode_text(encode(p) + alone['tokens'])
    # a short request sent while a long one decodes ends first
    finished.clear()

    def timed(name, body):
        results[name] = put(body)
        finished.append(name)
    long = threading.Thread(target=timed, args=('long', {'prompts': ['long'], 'tokens_to_generate': 58}))
    short = threading.Thread(target=timed, args=('short', {'prompts': ['s'], 'tokens_to_generate': 2}))
    long.start()
    while not any(t is not None and len(t) > 5 for t in dec.tokens):  # the long one is decoding
        time.sleep(0.001)
    short.start()
    long.join(timeout=120)
    short.join(timeout=120)
    assert finished == ['short', 'long'] and results['long'][0] == results['short'][0] == 200
    # a client that sends a request and hangs up before the answer: the others go on
    s = socket.create_connection(('127.0.0.1', port), timeout=20)
    data = json.dumps({'prompts': ['gone'], 'tokens_to_generate': 20}).encode()
    s.sendall(b'PUT /api HTTP/1.1\r\nContent-Length: %d\r\n\r\n' % len(data) + data)
    s.close()
    assert put(bodies[1]) == sequential[1]
    srv.shutdown()
    srv.server_close()


def test_rows_admitted_together_around_a_decoding_row():
    """Rows 0 and 2 finish together and take new prompts in one prefill while row 1 goes on
    (the prefill runs rows 0..2, row 1's part at the spare slot): every job as alone."""
    model = peaked_model(VARIANTS[0])
    dec = decode.Decoder(model, batch_size=3)
    specs = [(PROMPTS[0], 3), (PROMPTS[2], 14), (PROMPTS[1], 3), ([7, 7, 2, 9, 4], 8), ([11, 5], 8)]
    jobs = [decode.Job(model.config, 'cpu', p, n) for p, n in specs]
    starts, start = [], dec.start
    dec.start = lambda prompts, *a: starts.append(sorted(prompts)) or start(prompts, *a)
    waiting = iter(jobs)
    decode.run_jobs(dec, lambda: next(waiting, None), 'full')
    assert starts == [[0, 1, 2], [0, 2]]
    for job, (p, n) in zip(jobs, specs):
        assert job.out['tokens'] == naive(model, p, n)[0]


def test_host_runs_a_step_ahead_where_nothing_is_decided():
    """Greedy full decoding launches step t+1 before it reads step t (the token is fed back on
    the device); an exit's threshold or a sampled row is read within its own step."""
    model = peaked_model(VARIANTS[1])
    dec = decode.Decoder(model, batch_size=3)
    events, step = [], dec.step

    def logged(*a, **kw):
        now, later = step(*a, **kw)
        n = sum(e[0] == 'step' for e in events)
        events.append(('step', n, sorted(now)))

        def read():
            events.append(('read', n))
            return later()
        return now, read
    dec.step = logged
    outs = decode.generate_many(model, PROMPTS, 6, 'full', decoder=dec)
    assert [o['tokens'] for o in outs] == [naive(model, p, 6)[0] for p in PROMPTS]
    steps = [e for e in events if e[0] == 'step']
    assert len(steps) == 6 and all(now == [] for _, _, now in steps)  # nothing read within a step
    for n in range(5):  # step n is read after step n + 1 is launched
        assert events.index(('read', n)) > events.index(steps[n + 1])
    events.clear()
    outs = decode.generate_many(model, PROMPTS, 8, 'recompute', thres=0.6, decoder=dec)
    exited = sum(d < model.config.n_layer for o in outs for d in o['depths'])
    assert exited and exited == sum(len(e[2]) for e in events if e[0] == 'step')  # read: the exited tokens
    events.clear()
    decode.generate_many(model, PROMPTS, 4, 'full', decoder=dec, temperature=1.0, seed=0)
    assert all(e[2] == [0, 1, 2] for e in events if e[0] == 'step')  # sampled: read within the step


def test_decoder_keeps_no_autograd_state():
    """Called with gradients enabled (as bench.py does), the decoder records nothing: no cache
    or hidden state joins an autograd graph, so memory stays flat over many sequences."""
    model = peaked_model(VARIANTS[1])
    dec = decode.Decoder(model, batch_size=2)
    dec.start({r: PROMPTS[r] for r in range(2)}, 30)
    dec.step({r: ({0}, 0.5, None) for r in range(2)})
    assert not dec.hid.requires_grad and not any(c.k.requires_grad or c.v.requires_grad for c in dec.caches)


def test_bench_serve_runs_tiny_on_cpu():
    import bench
    out = bench.main(['--mode=serve', '--shape=tiny', '--device=cpu', '--prompt_len=8', '--new_tokens=6',
                      '--clients=[1,3]', '--requests=2', '--dtype=float32'])
    assert [r['clients'] for r in out['runs']] == [1, 3] and all(r['tokens_per_s'] > 0 for r in out['runs'])


def final_like_last_exit(model):
    """The last exit (after 3 of the 4 blocks) made to predict as the final head: the last
    block (blocks['3']) and the exit's own block or MLP add nothing (their output matrices are
    zero), and its norm and output matrix are the final ones. The other exits stay random."""
    last = str(len(model.config.exits) - 1)
    with torch.no_grad():
        for name, p in list(model.blocks['3'].named_parameters()) + list(model.exits[last].named_parameters()):
            if name.endswith(('attn.o.weight', 'attn.o.bias', 'mlp.down.weight', 'mlp.down.bias')):
                p.zero_()
        for name, p in model.exits[last].norm.named_parameters():
            p.copy_(model.norm_f.get_parameter(name))
        model.exits[last].out.weight.copy_(model.lm_head.weight)
    return model


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_adaptive_speculation_equals_full_greedy_and_adapts(v):
    """spec_exit='auto': the full model's greedy tokens exactly, alone and batched, while the
    drafting exit and the draft length change during the run. A fresh decoder starts at the
    cheapest exit and moves to the deepest, whose drafts are always the full model's tokens,
    found by the shadow check (the middle exit, random, is judged and never drafted from);
    the next sequence on the same decoder starts from what the first one learnt."""
    model = final_like_last_exit(peaked_model(v))
    for spec_stop in (None, 0.6):
        outs = decode.generate_many(model, PROMPTS, 30, 'speculative', spec_exit='auto', spec_k=5,
                                    spec_stop=spec_stop, batch_size=3)
        for p, out in zip(PROMPTS, outs):
            assert out['tokens'] == naive(model, p, 30)[0], (spec_stop, p)
        dec = decode.Decoder(model)
        for i, p in enumerate(PROMPTS):
            alone = decode.generate(model, p, 30, 'speculative', spec_exit='auto', spec_k=5, spec_stop=spec_stop,
                                    decoder=dec)
            assert alone['tokens'] == naive(model, p, 30)[0]
            layers = [layer for layer, _ in alone['rounds']]
            assert layers[-1] == 3 and (layers[0] == 1 if i == 0 else set(layers) == {3}), alone['rounds']
            assert 2 not in layers
            assert spec_stop is not None or alone['rounds'][-1][1] == 5  # (spec_stop may end a draft early)
        rounds = [r for o in outs for r in o['rounds']]
        assert len({k for _, k in rounds}) > 1 and all(1 <= k <= 5 for _, k in rounds)


@pytest.mark.parametrize('v', VARIANTS, ids=['gpt2-exit_block', 'llama-exit_mlp'])
def test_verification_gives_every_watched_exit_its_tokens(v):
    """Decoder.verify with watched exits, on two rows drafted from different depths with
    different draft lengths: at every verified position each watched exit's greedy token
    (the shadow check's) and the final head's are those of a full forward over the same
    tokens."""
    model = peaked_model(v)  # exits after blocks 1, 2, 3 of 4
    inf, prompts = float('inf'), {0: PROMPTS[0], 1: PROMPTS[2]}
    drafts, plan = {0: [11, 12, 13], 1: [21, 22, 23, 24]}, {0: (1, 3), 1: (3, 4)}  # row: (depth, k)
    dec = decode.Decoder(model, batch_size=2)
    dec.start(prompts, 64)
    n = {r: len(dec.tokens[r]) for r in prompts}
    for j in range(4):  # drafting: each row's positions through the blocks below its depth
        rows = [r for r in prompts if j < plan[r][1]]
        now, later = dec.step({r: (set(), inf, None) for r in rows}, stop_depth={r: plan[r][0] for r in rows})
        later()
        for r in rows:
            dec.tokens[r].append(drafts[r][j])  # (the next step's input: any token, verification is teacher-forced)
    for r in prompts:
        del dec.tokens[r][n[r]:]
    (_, best), shadow = dec.verify(plan, watch={1, 2})
    assert set(shadow) == {1, 2}  # exits after blocks 2 and 3: only row 0 passes them
    for r, (d, k) in plan.items():
        seq = prompts[r] + drafts[r][:k - 1]
        logits, exits = model(torch.tensor([seq]), exits=True)
        assert best[r, -k:, 1].tolist() == logits[0, -k:].argmax(-1).tolist()
        if r == 0:
            for x in (1, 2):
                assert shadow[x][r, -k:, 1].tolist() == exits[x][0, -k:].argmax(-1).tolist(), x


def test_draft_plan_prefers_the_exit_that_is_accepted():
    """The plan starts at the cheapest exit, leaves it when its drafts are rejected, and
    settles on long drafts from the exit whose drafts are kept; a fixed exit drafts spec_k."""
    model = peaked_model(VARIANTS[1])
    plan = decode.DraftPlan(model, 'auto', 6)
    assert plan.choose()[0] == 0  # no data: the same hopes for every exit, and the shallowest is cheapest
    tried = []
    for _ in range(60):
        e, k = plan.choose()
        tried.append(e)
        plan.update(e, k if e == 1 else 0, k if e == 1 else 1)  # exit 1's drafts are kept, exit 0's never
    assert 0 in tried and tried[-20:] == [1] * 20 and plan.choose() == (1, 6)
    plan = decode.DraftPlan(model, 'auto', 6)
    for _ in range(40):
        e, k = plan.choose()
        plan.update(e, 0, 1)  # nothing is ever kept: the shortest drafts
    assert plan.choose()[1] == 1
    assert decode.DraftPlan(model, 2, 3).choose() == (2, 3)


@pytest.mark.skipif(not __import__('torch').cuda.is_available(), reason='CUDA graphs need a GPU')
@pytest.mark.parametrize('compile', [False, True], ids=['graphs', 'compiled-graphs'])
def test_batched_cuda_graph_decoding_equals_eager(compile):
    """A batch of ragged rows replayed as CUDA graphs (compiled or not) gives the eager batched
    decoder's tokens and exits for every method, adaptive speculation included."""
    model = peaked_model(VARIANTS[0]).cuda()
    runs = [('full', {}), ('recompute', dict(thres=0.3)), ('recompute', dict(thres=0.9)),
            ('speculative', dict(spec_exit=1, spec_k=3)), ('speculative', dict(spec_exit='auto', spec_k=4))]
    eager = decode.Decoder(model, graphs=False, batch_size=3)
    dec = decode.Decoder(model, graphs=True, compile=compile, batch_size=3)
    for method, kw in runs + runs:  # the second round replays the graphs
        want = decode.generate_many(model, PROMPTS, 20, method, decoder=eager, **kw)
        got = decode.generate_many(model, PROMPTS, 20, method, decoder=dec, **kw)
        assert [g['tokens'] for g in got] == [w['tokens'] for w in want], (method, kw)
        assert [g['depths'] for g in got] == [w['depths'] for w in want], (method, kw)
    assert dec.graphs and dec.captured
