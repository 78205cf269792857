# Quick start of FCOSIS ([IS 3.2]: FCOS + attention map + P2-P4 segmentation head) on the
# synthetic shapes set, on the CPU.
#   python train.py config/shapes_fcosis.py
#   python train.py config/shapes_fcosis.py --attention=none --out_dir=out/shapes_fcosis_none   # Table 3a
#   (--attention=mu0: Table 3b, --attention=bbox: Table 3c)
# As config/shapes_fcos.py (ResNet-18 from scratch, 64-wide FPN and heads, 128 px, Adam).
method = "fcosis"
attention = "segm"               # Table 3: "mu0", "bbox", "none"
seg_classes = "agnostic"
com_assignment = "mask"
backbone = "resnet18"
pretrained = False
norm = "bn"
freeze_at = 0
fpn_channels = 64

shapes_dir = "data/shapes"
shapes_n_train = 1000
shapes_n_val = 200
shapes_size = 128
out_dir = "out/shapes_fcosis"
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
