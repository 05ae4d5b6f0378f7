# EE-Tuning on the GPU recipe's model trained without exits: the same exits as the model
# trained with them (config/train_pystdlib_gpu.py), trained on the frozen backbone.
#   python train.py config/train_pystdlib_gpu.py --exit_layers=[] --out_dir=out-gpu-base
#   python convert.py add_exits --src=out-gpu-base --dst=out-gpu-ee --exit_layers=[3,6] --exit_norm --exit_mlp --exit_untie
#   python tune.py config/tune_pystdlib_gpu.py --init_from=out-gpu-ee --out_dir=out-gpu-tuned
#   python tune.py config/tune_pystdlib_gpu.py --init_from=out-gpu-ee --out_dir=out-gpu-distill --distill=True
#   python evaluate.py --out_dir=out-gpu-distill --sweep=thresholds --lines=0 --dtype=float32
dataset = 'pystdlib'
device = 'cuda'
dtype = 'bfloat16'
batch_size = 32
max_iters = 1000
eval_interval = 500
eval_iters = 20
log_interval = 100
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
exit_weight = 1.0
