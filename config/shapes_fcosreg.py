# Quick start of FCOSreg ([IS 3.3]: FCOS with mask regularisation) on the synthetic shapes set,
# on the CPU: ambiguous locations go to the object with the highest segmentation label, and the
# regression is weighted by w = (ctr + s + sqrt(ctr * s)) / 3 (Fig. 6c).
#   python train.py config/shapes_fcosreg.py
# Everything else as config/shapes_fcos.py (same deviations from the COCO recipe).
method = "fcosreg"
reg_weights = (1 / 3, 1 / 3, 1 / 3)  # Fig. 6c
ambiguity = "mask"
backbone = "resnet18"
pretrained = False
norm = "bn"
freeze_at = 0
fpn_channels = 64

shapes_dir = "data/shapes"
shapes_n_train = 1000
shapes_n_val = 200
shapes_size = 128
out_dir = "out/shapes_fcosreg"
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
