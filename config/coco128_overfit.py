# Overfitting check on real data: CenterMask (DLA-34) memorises 8 COCO128 images (train = val).
#   python train.py config/coco128_overfit.py
# Reads data/coco128 (COCO's own json and images, never committed; README, "Overfitting real
# images", says how to get it): the first 8 images by id (30 instances, 12 categories, objects
# of 7 to 208 px, square root of the area, at this input).
# Passes when the final segm AP50 on the same 8 images is >= 0.8 (measured: RESULTS.md, "Overfitting real images").
# Deviations for CPU speed: 384x384 input (paper 512), plain convs in DLA-up (dcn=False),
# 128-wide heads, mild augmentation (memorising is the point), bf16 autocast where native.
method = "centermask"
backbone = "dla34"
dcn = False
head_conv = 128
# class-specific saliency with its direct BCE supervision ([CM] Table 1e/1f, the paper's best
# setting): with the class-agnostic map, crowded COCO images saturate it at ~1 everywhere and
# the masks rest on the coarse local shapes alone (measured: segm AP50 0.686 after 300 steps)
saliency = "specific"
saliency_loss = True

data_root = "data/coco128"
train_img_dir = "train2017"
train_ann = "annotations/instances_train2017.json"
val_img_dir = "train2017"
val_ann = "annotations/instances_train2017.json"
max_images = 8
input_size = 384
scale_range = (0.9, 1.1)
color_jitter = 0.1
out_dir = "out/coco128_overfit"
batch_size = 8
num_workers = 2
learning_rate = 1e-3
warmup_iters = 30
max_iters = 300
lr_steps = (240, 280)            # in epochs; 8 images / batch 8 = 1 iteration per epoch
grad_clip = 10.0
eval_every_epochs = 100          # 8 images / batch 8 = 1 iteration per epoch
log_interval = 10
device = "auto"                  # a GPU when there is one (train.py), else the CPU
