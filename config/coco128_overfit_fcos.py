# Overfitting check on real data for the FCOS family and FCOSIS: 8 COCO128 images (train = val),
# the same images, schedule and pass mark (segm AP50 >= 0.8; box AP50 for FCOS / FCOSreg) as
# config/coco128_overfit.py (read first).
#   python train.py config/coco128_overfit_fcos.py --method=maskfcos --out_dir=out/coco128_maskfcos
#   (--method=fcos / fcosreg / centermask_fcos / fcosis)
# As the shapes quick starts: ResNet-18-FPN 64 wide from scratch, trainable BatchNorm, Adam.
# FCOS-style test transform: short side 384 (long side <= 640); training adds the flip.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'coco128_overfit.py')).read())
method = "maskfcos"
backbone = "resnet18"
pretrained = False
norm = "bn"
freeze_at = 0
fpn_channels = 64
head_conv = 64
saliency = "specific"            # CenterMask-FCOS: class-specific Global Saliency (the COCO128 lesson of
saliency_loss = False            # coco128_overfit.py); its direct BCE is CenterMask's only
mask_proposals = 16
transform = "fcos"
input_size = 384
max_size = 640
scale_range = (1.0, 1.0)
out_dir = "out/coco128_fcos"
