# Quick start of FCOSIS ([IS 3.2]: FCOS + attention map + P2-P4 segmentation head) on the
# synthetic shapes set, on the CPU.
#   python train.py config/shapes_fcosis.py
#   python train.py config/shapes_fcosis.py --attention=none --out_dir=out/shapes_fcosis_none   # Table 3a
#   (--attention=mu0: Table 3b, --attention=bbox: Table 3c)
# As config/shapes_fcos.py (read first: ResNet-18 from scratch, 64-wide FPN and heads, shown at 256 px, Adam).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shapes_fcos.py')).read())
method = "fcosis"
attention = "segm"               # Table 3: "mu0", "bbox", "none"
seg_classes = "agnostic"
out_dir = "out/shapes_fcosis"
