# FCOSIS ([IS 3.2]), ResNet-50-FPN (P2-P7), COCO 2017: the paper's recipe ([IS 4] "Training
# details": short side 800, long <= 1333, SGD lr 0.01, batch 16, 24 epochs, x0.1 at 14 and 21,
# weight decay 1e-4, momentum 0.9), i.e. config/fcos_r50.py (read first; the original FCOS, the
# detector [IS 3.1] reviews and builds on) plus the FCOSIS keys.
#   1 GPU:   python train.py config/fcosis_r50.py --data_root=/path/to/coco
#   8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py config/fcosis_r50.py --data_root=/path/to/coco --batch_size=2
# Expected (paper, test-dev): mask AP 32.4 (Table 2), box AP 38.2 (Table 1); val2017 ablations
# in Table 3. Not reproduced: no COCO run of this config has been measured.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'fcos_r50.py')).read())
method = "fcosis"
attention = "segm"               # the paper's map; Table 3: "mu0" (3b), "bbox" (3c), "none" (3a)
seg_classes = "agnostic"         # [IS 3.2.2]
out_dir = "out/fcosis_r50"
