# Quick start of CenterMask-FCOS ([CM 4.3]: Local Shape x Global Saliency on FCOS) on the
# synthetic shapes set, on the CPU.
#   python train.py config/shapes_centermask_fcos.py
# As config/shapes_fcos.py, plus: S = 32 local shapes, class-agnostic saliency, saliency head
# 64 wide.
method = "centermask_fcos"
shape_size = 32
saliency = "agnostic"
head_conv = 64
backbone = "resnet18"
pretrained = False
norm = "bn"
freeze_at = 0
fpn_channels = 64

shapes_dir = "data/shapes"
shapes_n_train = 1000
shapes_n_val = 200
shapes_size = 128
out_dir = "out/shapes_centermask_fcos"
transform = "fcos"
input_size = 128                 # short side; the shapes images are 128 x 128
scale_range = (1.0, 1.0)         # no multi-scale (as [IS 4])
batch_size = 8
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
dtype = "auto"
visualize = True
vis_images = 8
