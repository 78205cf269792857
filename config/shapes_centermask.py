# Quick start: CenterMask (DLA-34) on the synthetic shapes set, on the CPU, no download.
#   python train.py config/shapes_centermask.py
# Writes data/shapes (1000 train / 200 val images, 128x128, 4 classes) if missing, trains,
# evaluates (COCO bbox + segm AP on the val split) and draws predictions into out/shapes_centermask.
# Measured: see README ("Quick start") for the time and AP on a 2-core machine.
# Deviations from the COCO recipe, for CPU speed only: plain 3x3 convs in DLA-up (dcn=False),
# heads 64 wide, 128x128 input, batch 8 with a larger learning rate and warmup, 16 epochs,
# bf16 autocast on CPUs that have it.
method = "centermask"
backbone = "dla34"
dcn = False
head_conv = 64
shape_size = 32
saliency = "agnostic"

shapes_dir = "data/shapes"
shapes_n_train = 1000
shapes_n_val = 200
shapes_size = 128
out_dir = "out/shapes_centermask"
input_size = 128
batch_size = 8                   # more Adam steps per epoch: twice the AP of batch 16 at epoch 4
num_workers = 2
optimizer = "adam"
learning_rate = 1e-3
warmup_iters = 200
epochs = 16
lr_steps = (12, 15)
grad_clip = 10.0
eval_every_epochs = 4
eval_max_images = 100
log_interval = 25
device = "cpu"
dtype = "auto"                   # bf16 autocast where the CPU has native bf16 (1.45x), else fp32
visualize = True
vis_images = 8
