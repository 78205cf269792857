# Quick start of MaskFCOS ([IS 4]: FCOS proposals + RoIAlign mask head) on the synthetic shapes
# set, on the CPU.
#   python train.py config/shapes_maskfcos.py
# As config/shapes_fcos.py (read first), plus: 16 proposals per image in training (64 in the COCO
# config) to bound the mask head's cost on a CPU.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shapes_fcos.py')).read())
method = "maskfcos"
mask_proposals = 16
out_dir = "out/shapes_maskfcos"
