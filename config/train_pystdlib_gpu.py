# The early-exit model of the quality-speed study: the Python standard library (byte-level)
# on one H100 or H200, in about 3 minutes (3,000 steps at 59 ms on an H100; 4,000 over-fit the 30 M bytes more).
#   python data/pystdlib/prepare.py
#   python train.py config/train_pystdlib_gpu.py                                          # exits trained with the model
#   python train.py config/train_pystdlib_gpu.py --exit_layers=[] --out_dir=out-gpu-base  # the same model without exits
#   python evaluate.py --out_dir=out-gpu --sweep=thresholds --lines=0 --dtype=float32 --calibrate=[0.01,0.02,0.05]
# 12 layers of 768 (85 M parameters), exits after blocks 3 and 6 (1/4 and 1/2 of the depth),
# each a norm, a residual MLP and its own output matrix; 32 x 1024 bytes per step.
out_dir = 'out-gpu'
dataset = 'pystdlib'
device = 'cuda'
dtype = 'bfloat16'
compile = True
arch = 'llama'
n_layer, n_head, n_embd = 12, 12, 768
block_size = 1024
exit_layers = (3, 6)
exit_norm = True
exit_mlp = True
exit_untie = True
exit_weight = 0.5
batch_size = 32
max_iters = 3000
eval_interval = 500
eval_iters = 20
log_interval = 200
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
weight_decay = 0.1
dropout = 0.0
