# FCOS, ResNet-50-FPN, COCO 2017: the FCOSIS paper's detector baseline ([IS 3.1], [IS 4]
# "Training details": FCOS's standard settings).
#   1 GPU:   python train.py config/fcos_r50.py --data_root=/path/to/coco
#   8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py config/fcos_r50.py --data_root=/path/to/coco --batch_size=2
# Expected (paper, test-dev, Table 1): box AP 37.1. ImageNet-pretrained backbone (downloaded by
# torchvision on first use). Not reproduced: no COCO run of this config has been measured, so
# treat the AP as the target, not a measured number.
method = "fcos"
backbone = "resnet50"
pretrained = True                # ImageNet weights, as FCOS
norm = "frozen_bn"               # FCOS: frozen BatchNorm ...
freeze_at = 2                    # ... and frozen stem + res2
fpn_channels = 256               # [FCOS] 3.2
head_convs = 4                   # [FCOS] Fig. 2
center_sampling = 1.5            # an FCOS improvement (model.py, `FCOS`); 0 = [IS 3.1]'s every location in the box
box_loss = "giou"                # "iou" = [IS 3.1]'s UnitBox loss
score_threshold = 0.05           # [FCOS] 4
nms_threshold = 0.6              # [FCOS] 4
max_detections = 100

out_dir = "out/fcos_r50"
data_root = "data/coco"          # holds train2017/, val2017/, annotations/instances_{train,val}2017.json
transform = "fcos"
input_size = 800                 # short side ([IS 4])
max_size = 1333                  # long side at most ([IS 4])
scale_range = (1.0, 1.0)         # single scale ([IS 4]); FCOS's multi-scale 640-800 = (0.8, 1.0)
flip_prob = 0.5
batch_size = 16                  # [IS 4]: 16 images per step, in total (8 GPUs: --batch_size=2)
optimizer = "sgd"                # [IS 4]: SGD, momentum 0.9
learning_rate = 0.01             # [IS 4]
weight_decay = 1e-4              # [IS 4]
warmup_iters = 500               # FCOS: SOLVER.WARMUP_ITERS 500 (fcos_core/config/defaults.py) ...
warmup_method = "constant"       # ... at a constant 1/3 of the lr (configs/fcos/*.yaml: WARMUP_METHOD "constant",
warmup_factor = 1 / 3            # SOLVER.WARMUP_FACTOR 1/3): the standard FCOS settings of [IS 4]
bias_lr_factor = 2.0             # FCOS's solver: biases at 2x the lr (SOLVER.BIAS_LR_FACTOR) ...
bias_weight_decay = 0.0          # ... and without weight decay (SOLVER.WEIGHT_DECAY_BIAS)
epochs = 24                      # [IS 4]
lr_steps = (14, 21)              # x0.1 at epochs 14 and 21 ([IS 4])
eval_every_epochs = 4
eval_max_images = 500
num_workers = 8
