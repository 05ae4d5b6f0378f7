# A small early-exit GPT on the Python standard library (byte-level), for a laptop CPU.
#   python data/pystdlib/prepare.py
#   python train.py config/train_pystdlib.py
# 6 layers, exits after blocks 2 and 4; 800 steps of 32 x 128 bytes.
out_dir = 'out-pystdlib'
dataset = 'pystdlib'
device = 'cpu'
dtype = 'float32'
arch = 'llama'
n_layer, n_head, n_embd = 6, 4, 128
block_size = 128
exit_layers = (2, 4)
exit_norm = True
batch_size = 32
max_iters = 800
eval_interval = 200
eval_iters = 20
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
exit_weight = 0.5
dropout = 0.0
