# CenterMask-FCOS ([CM 4.3]: Local Shape x Global Saliency on FCOS), ResNet-101-FPN, COCO 2017.
#   1 GPU:   python train.py config/centermask_fcos_r101.py --data_root=/path/to/coco
#   8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py config/centermask_fcos_r101.py --data_root=/path/to/coco --batch_size=2
#   ResNeXt-101:  --backbone=resnext101_32x8d
# Expected (paper, test-dev, [CM] Table 3): mask AP 36.1 (R-101-FPN), 36.7 (X-101-FPN); the DCN
# variants (37.6 / 38.5) are not built here. [CM 4.3]: "the training follows the same setting of
# Mask R-CNN": the 1x schedule (12 epochs, 16 images per step), with FCOS's lr 0.01 for its GN
# heads. Not reproduced: no COCO run of this config has been measured.
method = "centermask_fcos"
backbone = "resnet101"
pretrained = True
norm = "frozen_bn"
freeze_at = 2
fpn_channels = 256
head_convs = 4
shape_size = 32                  # S = 32 ([CM 3.5])
saliency = "agnostic"            # on the finest FPN level, P3 ([CM 4.3])
head_conv = 256                  # the saliency head's hidden width ([CM 3.5] heads)
mask_threshold = 0.4             # [CM 3.5]
center_sampling = 1.5
box_loss = "giou"
max_detections = 100

out_dir = "out/centermask_fcos_r101"
data_root = "data/coco"
transform = "fcos"
input_size = 800                 # Mask R-CNN's setting: short side 800, long side <= 1333
max_size = 1333
scale_range = (1.0, 1.0)
flip_prob = 0.5
batch_size = 16                  # 16 images per step in total (8 GPUs: --batch_size=2)
optimizer = "sgd"
learning_rate = 0.01
weight_decay = 1e-4
warmup_iters = 500               # Mask R-CNN's solver (maskrcnn-benchmark, as FCOS's fcos_core/config/defaults.py):
warmup_factor = 1 / 3            # linear warm-up from 1/3 of the lr over 500 iterations,
bias_lr_factor = 2.0             # biases at 2x the lr
bias_weight_decay = 0.0          # and without weight decay
epochs = 12                      # Mask R-CNN 1x: 90k iterations of 16 images
lr_steps = (8, 11)               # x0.1 at 60k and 80k iterations
eval_every_epochs = 4
eval_max_images = 500
num_workers = 8
