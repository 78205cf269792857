# CenterMask, DLA-34 backbone, COCO 2017: the paper's recipe ([CM] 3.5, Table 2).
#   1 GPU:   python train.py config/centermask_dla34.py --data_root=/path/to/coco --batch_size=16
#   8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py config/centermask_dla34.py --data_root=/path/to/coco
# Expected (paper, test-dev): mask AP 33.1 at 25.2 FPS (Table 2); minival 32.5 with class-agnostic
# saliency (Table 1a/1b). Trained from scratch, 130 epochs: days on 8 GPUs. Not yet reproduced
# here (no GPU/COCO in our sessions): treat the AP as the target, not a measured number.
method = "centermask"
backbone = "dla34"
dcn = True                       # modulated deformable convs in DLA-up ([CN] 4)
head_conv = 256
shape_size = 32                  # S ([CM] 3.5, Table 1a)
saliency = "agnostic"            # Table 1e: "specific" is +2.4 AP on Hourglass-104
loss_weights = (1.0, 1.0, 0.1, 1.0)  # lambda_p, lambda_off, lambda_size, lambda_mask ([CM] 3.5)
mask_threshold = 0.4             # [CM] 3.5
max_detections = 100             # [CM] 3.5

out_dir = "out/centermask_dla34"
data_root = "data/coco"          # holds train2017/, val2017/, annotations/instances_{train,val}2017.json
input_size = 512                 # [CM] 3.5
batch_size = 16                  # per GPU: 8 x 16 = 128 (CenterNet: 114 on 8 GPUs at lr 5e-4 ... [CM]: 2.5e-4)
optimizer = "adam"               # [CM] 3.5
learning_rate = 2.5e-4           # [CM] 3.5
epochs = 130                     # [CM] 3.5
lr_steps = (100, 120)            # x0.1 at epochs 100 and 120 ([CM] 3.5)
eval_every_epochs = 10
eval_max_images = 500
num_workers = 8
