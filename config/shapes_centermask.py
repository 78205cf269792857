# Quick start: CenterMask (DLA-34) on the synthetic shapes set, on the CPU, no download.
#   python train.py config/shapes_centermask.py
# Writes data/shapes (1000 train / 200 val images, 128x128, 3 classes) if missing, trains,
# evaluates (COCO bbox + segm AP on the val split) and draws predictions into out/shapes_centermask.
# Measured: see README ("Quick start") for the time and AP on a 2-core machine.
# Deviations from the COCO recipe, for CPU speed only: plain 3x3 convs in DLA-up (dcn=False),
# heads 64 wide, 128x128 input, larger learning rate with warmup, fewer epochs.
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
batch_size = 16
num_workers = 2
optimizer = "adam"
learning_rate = 1e-3
warmup_iters = 100
epochs = 12
lr_steps = (9, 11)
grad_clip = 10.0
eval_every_epochs = 4
eval_max_images = 100
log_interval = 25
device = "cpu"
visualize = True
vis_images = 8
