# Quick start: CenterMask (DLA-34) on the synthetic shapes set, on the CPU, no download.
#   python train.py config/shapes_centermask.py
# Writes data/shapes (2000 train / 200 val images, 128x128, 4 classes) if missing, trains,
# evaluates (COCO bbox + segm AP on the val split) and draws predictions into out/shapes_centermask.
# Measured: README ("Quick start") gives the time and AP on a 2-core CPU without bf16 (fp32);
# RESULTS.md ("CenterMask quick start") what each setting below was worth.
# Sized for 15 minutes on 2 cores in fp32: DLA-34 at half width at every level (dla_channels;
# the output is 32 wide), plain 3x3 convs in DLA-up (dcn=False), heads 64 wide, 128x128 input,
# batch 4 with a larger learning rate and warmup, 7 epochs of 2000 images. For the small objects
# of the set: the mask loss on the input pixels (mask_loss_grid="input"), no random scaling
# (CenterNet's crop centre, flip and colour + lighting noise stay), and evaluation with the images
# shown at 160 px (1.25x; training stays at 128). The COCO configs keep the paper's architecture.
method = "centermask"
backbone = "dla34"
dla_channels = (8, 16, 32, 64, 128, 256)  # [DLA] Table 1: (16, 32, 64, 128, 256, 512); halved at every level:
                                 # the stride-1 and -2 levels halved too: mask AP 0.391 against 0.365
                                 # after 8 epochs, no slower (RESULTS.md)
dcn = False
head_conv = 64                   # [CM]/[CN]: 256
shape_size = 32
saliency = "agnostic"
mask_loss_grid = "input"         # [CM] eq. 2 on input pixels: at stride 4 the masks of 8-30 px objects cap at 0.61 AP

shapes_dir = "data/shapes"
shapes_n_train = 2000            # full width, Xeon: 20 epochs of 1000 overfit (mask AP 0.443), 10 of 2000: 0.484
shapes_n_val = 200
out_dir = "out/shapes_centermask"
input_size = 128
test_input_size = 160            # val images shown at 1.25x: mask AP 0.285 -> 0.299 (5 epochs; RESULTS.md)
# No random zoom (the COCO recipe draws s in 0.6, ..., 1.3 and zooms by 1/s): on this set, at this
# budget, random scaling cost mask AP (RESULTS.md, "CenterMask quick start: what each step was worth": 8 epochs, mask 0.193 -> 0.241
# without it). Its objects are 8-64 px; zoomed out by 1/1.3 an 8 px object is 6 px, a cell and a
# half of the stride-4 output. CenterNet's random crop centre (border 32 px at 128 px), the flip
# and the colour augmentation stay.
scale_range = (1.0, 1.0)
batch_size = 4                   # more Adam steps per epoch: mask AP 0.326 against 0.294 at batch 8 (5 epochs, RESULTS.md)
num_workers = 2                  # the loader takes ~3 ms per image: the workers mostly wait
optimizer = "adam"
learning_rate = 1e-3
warmup_iters = 400               # 1600 images, as 200 iterations of 8
epochs = 7                       # 8 epochs: mask AP 0.374 in 15 min 38 s, over the budget; 10 epochs of the
                                 # full-width model: mask AP 0.475, 52 min in fp32 (RESULTS.md)
lr_steps = (5.25, 6.65)          # x0.1 at 75% and 95% of the run ([CM 3.5]: at epochs 100 and 120 of 130)
grad_clip = 10.0
eval_every_epochs = 7            # one evaluation, at the end, on all 200 val images
log_interval = 25
device = "auto"                  # a GPU when there is one (train.py), else the CPU
dtype = "auto"                   # bf16 autocast where the CPU has native bf16 (1.45x), else fp32
