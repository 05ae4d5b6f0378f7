# EE-Tuning on the Python standard library corpus, for a laptop CPU: exits on a frozen backbone.
#   python train.py config/train_pystdlib.py --exit_layers=[] --out_dir=out-base      # a model without exits
#   python convert.py add_exits --src=out-base --dst=out-ee --exit_layers=[2,4] --exit_norm
#   python tune.py config/tune_pystdlib.py --init_from=out-ee --out_dir=out-ee-tuned
#   python generate.py --out_dir=out-ee-tuned --early_exit_thres=0.8 --show_exits
# 300 steps of 32 x 128 bytes; only blocks 1..4 run (blocks 5..6 are never built).
dataset = 'pystdlib'
device = 'cpu'
dtype = 'float32'
batch_size = 32
max_iters = 300
eval_interval = 100
eval_iters = 20
log_interval = 50
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 20
exit_weight = 1.0
