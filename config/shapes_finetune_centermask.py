# Fine-tuning recipe, CenterMask: start from a trained CenterNet detector (DLA-34, heatmap, size and
# offset heads), train CenterMask's new heads (Local Shape, Global Saliency) with it, evaluate, predict.
# On the shapes set, with a CenterNet trained there in place of CenterNet's published COCO weights:
#   1. python train.py config/shapes_centermask.py --dla_channels="(16, 32, 64, 128, 256, 512)" \
#          --head_conv=128 --batch_size=8 --warmup_iters=200 --shapes_n_train=1000 --epochs=8 --lr_steps="(6, 7)" \
#          --loss_weights="(1.0, 1.0, 0.1, 0.0)" --eval_every_epochs=8 --out_dir=out/shapes_centernet
#   2. python train.py config/shapes_finetune_centermask.py --head_conv=128 --batch_size=8  # from 1's checkpoint
#   3. python eval.py --ckpt=out/shapes_finetune_centermask/ckpt.pt
#   4. python predict.py --ckpt=out/shapes_finetune_centermask/ckpt.pt --input=your_photo.jpg
# Step 1 is CenterNet: CenterMask with lambda_mask = 0 ([CM 3.4] eq. 6 without its mask term), so only
# the heatmap, offset and size losses train the DLA-34 and the three CenterNet heads; the Local Shape and
# Saliency heads are built but get no gradient (and no weight decay: Adam, [CM 3.5]), so they stay
# as initialised. Step 2 imports every tensor of that checkpoint except those two heads (init_fresh:
# they start fresh, from this run's seed, as the heads a CenterNet file lacks would); train.py prints the
# accounting (weights.py, `import_weights`). Measured against CenterMask from scratch with the
# same data, model and schedule: README, "Fine-tuning from trained weights".
#
# With CenterNet's own COCO detector: init_from = "ctdet_coco_dla_2x.pth" and a full-width DLA-34 with
# deformable convolutions (config/centermask_dla34.py); its file has no Local Shape or Saliency head,
# so there is nothing to leave out (init_fresh = ()), and train.py feeds the images as CenterNet did
# (BGR, COCO statistics). On your own data: set data_root / train_img_dir / train_ann / val_img_dir /
# val_ann (COCO layout, see README) and shapes_dir = "".
import os
exec(open(os.path.join(os.path.dirname(__file__), 'shapes_centermask.py')).read())
init_from = "out/shapes_centernet/ckpt.pt"
dla_channels = (16, 32, 64, 128, 256, 512)  # the full-width DLA-34 of step 1 ([DLA] Table 1), not the quick start's
init_fresh = ("head_sets.*.local_shape.*", "head_sets.*.saliency.*")
out_dir = "out/shapes_finetune_centermask"
shapes_n_train = 1000            # step 1's images (the first 1000 of the quick start's 2000)
epochs = 4                       # half of step 1's 8: the detector is trained, only the mask heads start fresh
lr_steps = (3,)                  # x0.1 for the last epoch
warmup_iters = 50                # a short ramp: Adam's moments start at zero, the new heads' weights random
eval_every_epochs = 1            # on all 200 val images each time (the curve in RESULTS.md)
