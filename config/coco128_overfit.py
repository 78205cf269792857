# Overfitting check on real data: CenterMask (DLA-34) memorises 8 COCO128 images (train = val).
#   python train.py config/coco128_overfit.py
# Reads ../shared/data/coco128 (COCO's own json and images; never committed). CPU, ~15-20 min
# on 2 cores. Passes when the final segm AP50 on the same 8 images is >= 0.8 (see README).
# Deviations for CPU speed: 256x256 input, plain convs in DLA-up, mild augmentation.
method = "centermask"
backbone = "dla34"
dcn = False
head_conv = 128

data_root = "../shared/data/coco128"
train_img_dir = "train2017"
train_ann = "annotations/instances_train2017.json"
val_img_dir = "train2017"
val_ann = "annotations/instances_train2017.json"
max_train_images = 8
max_val_images = 8
input_size = 256
scale_range = (0.9, 1.1)
color_jitter = 0.1
out_dir = "out/coco128_overfit"
batch_size = 8
num_workers = 2
learning_rate = 1e-3
warmup_iters = 30
max_iters = 500
lr_steps = (400, 470)            # in epochs; 8 images / batch 8 = 1 iteration per epoch
eval_interval = 100
eval_max_images = 0
log_interval = 10
device = "cpu"
visualize = True
vis_images = 8
