# Overfitting check on real data for the FCOS family and FCOSIS: 8 COCO128 images (train = val),
# the same images, schedule and pass mark (segm AP50 >= 0.8; box AP50 for FCOS / FCOSreg) as
# config/coco128_overfit.py (read first). One file for five methods: the keys of one method only
# go on the command line (train.py stops a run that sets a key its method does not read):
#   python train.py config/coco128_overfit_fcos.py --out_dir=out/coco128_fcos                  # FCOS
#   python train.py config/coco128_overfit_fcos.py --method=fcosreg --out_dir=out/coco128_fcosreg
#   python train.py config/coco128_overfit_fcos.py --method=maskfcos --mask_proposals=16 --out_dir=out/coco128_maskfcos
#   python train.py config/coco128_overfit_fcos.py --method=centermask_fcos --head_conv=64 --saliency=specific \
#       --out_dir=out/coco128_centermask_fcos     # class-specific saliency: the COCO128 lesson of coco128_overfit.py
#   python train.py config/coco128_overfit_fcos.py --method=fcosis --out_dir=out/coco128_fcosis
# (mask_proposals=16: fewer RoIs for the mask head's cost on a CPU.)
# As the shapes quick starts: ResNet-18-FPN 64 wide from scratch, trainable BatchNorm, Adam.
# FCOS-style test transform (the FCOS family's own): short side 384 (long side <= 1333: these 8
# images reach 578); training adds the flip.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'coco128_overfit.py')).read())
# that file's CenterMask keys back to their defaults: the FCOS family does not read them
dcn, head_conv, saliency, saliency_loss = True, 256, "agnostic", False
method = "fcos"
backbone = "resnet18"
pretrained = False
norm = "bn"
fpn_channels = 64
input_size = 384
scale_range = (1.0, 1.0)
out_dir = "out/coco128_fcos"          # one per method: --out_dir
