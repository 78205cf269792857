# Quick start of CenterMask-FCOS ([CM 4.3]: Local Shape x Global Saliency on FCOS) on the
# synthetic shapes set, on the CPU.
#   python train.py config/shapes_centermask_fcos.py
# As config/shapes_fcos.py (read first), plus: S = 32 local shapes, class-agnostic saliency,
# saliency head 64 wide.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shapes_fcos.py')).read())
method = "centermask_fcos"
shape_size = 32
saliency = "agnostic"
head_conv = 64
out_dir = "out/shapes_centermask_fcos"
