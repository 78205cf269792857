# Fine-tuning recipe: start from a trained detector, train what is new, evaluate, predict. It is the
# path a user with a small COCO-format set of their own takes; here it runs on the shapes set, with a
# FCOS trained on shapes in place of published weights:
#   1. python train.py config/shapes_fcos.py --input_size=128 --epochs=8 --lr_steps="(6, 7)" --out_dir=out/shapes_fcos_128
#   2. python train.py config/shapes_finetune_maskfcos.py          # MaskFCOS started from 1's checkpoint
#   3. python eval.py --ckpt=out/shapes_finetune_maskfcos/ckpt.pt
#   4. python predict.py --ckpt=out/shapes_finetune_maskfcos/ckpt.pt --input=your_photo.jpg
# Step 2 imports every tensor of the checkpoint that matches by name and shape (the ResNet-18, FPN and
# FCOS head) and starts the new ones (MaskFCOS's RoIAlign mask head) fresh; train.py prints the
# accounting (weights.py, `import_weights`). Measured against MaskFCOS from scratch with the
# same data and model: README, "Fine-tuning from trained weights".
#
# On your own data: set data_root / train_img_dir / train_ann / val_img_dir / val_ann (COCO layout, see
# README) and shapes_dir = ""; init_from = any file of README's "Published weights" table, e.g.
# "torchvision:fcos_resnet50_fpn" with a ResNet-50 config (config/maskfcos_r50.py), whose settings
# (input format, location convention) train.py takes from the weights.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shapes_maskfcos.py')).read())
init_from = "out/shapes_fcos_128/ckpt.pt"
out_dir = "out/shapes_finetune_maskfcos"
input_size = 128                 # the images as they are (the detector of step 1 was trained at 128)
epochs = 4                       # half of step 1's 8: the detector is trained, only the mask head starts fresh
lr_steps = (3,)                  # x0.1 for the last epoch
warmup_iters = 50                # a short ramp: Adam's moments start at zero, the new head's weights random
eval_every_epochs = 1            # on all 200 val images each time (the curve in RESULTS.md)
