# Quick start of FCOSreg ([IS 3.3]: FCOS with mask regularisation) on the synthetic shapes set,
# on the CPU: ambiguous locations go to the object with the highest segmentation label, and the
# regression is weighted by w = (ctr + s + sqrt(ctr * s)) / 3 (Fig. 6c).
#   python train.py config/shapes_fcosreg.py
# Everything else as config/shapes_fcos.py (read first; same deviations from the COCO recipe).
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shapes_fcos.py')).read())
method = "fcosreg"
reg_weights = (1 / 3, 1 / 3, 1 / 3)  # Fig. 6c
ambiguity = "mask"
out_dir = "out/shapes_fcosreg"
