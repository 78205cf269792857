"""
Gradient accumulation with the loss normalisers of the whole batch (train.py's
gradient_accumulation_steps = k; bench.py times it). Not part of any method: model.py's losses
only call `model.reduce_mean`, whose contract (every count normaliser through it, in the same order
in every forward) is written where it is defined.
"""

import contextlib

import torch

import model


class MicroBatchNormalizers:
    """Gradient accumulation with the normalisers of the whole batch (train.py's
    gradient_accumulation_steps = k): k micro-batches of b images give the gradient of one batch of
    k * b images, as k processes with b images each do under DDP.

    Every loss is sum_i l_i / N with N a count over the batch (positives, objects, pixels,
    `model.reduce_mean`). The plain form: one micro-batch's loss with its own count n_m, divided by k,
    gives sum_m sum_i grad l_i / (k n_m), not sum grad l_i / sum_m n_m. The counts are computed
    inside each method's losses, from the targets and the feature-map sizes, and for MaskFCOS from
    its predictions too (its RoIs are the proposals that match a box), so they cannot be computed
    from the targets alone before the step:
      1. `record(model, micro_batches)`: a forward of every micro-batch without gradients stores
         each reduce_mean call's value n_{m,j} (the call sequence is the same in every forward: DDP
         already needs that); BatchNorm statistics are put back as they were.
      2. `replay()` around each micro-batch's real forward: reduce_mean's j-th call returns
         N_j = mean_m n_{m,j}; the loss is divided by k before backward. Then
         sum_m sum_i grad l_i / (k N_j) = sum grad l_i / sum_m n_{m,j}: the big batch's gradient.
    The record pass costs one forward without gradients per micro-batch (about a third of a
    training step); k = 1 takes none of this path. The clamps on normalisers (max(N, 1)) act on the
    per-micro-batch mean, as FCOS's act on the per-process mean (same as DDP with k processes).
    A forward that calls reduce_mean a different number of times than the recorded ones stops with
    a one-line RuntimeError (the replay would hand a count to the wrong loss).
    """

    def __init__(self):
        self.means, self.recorded, self.calls = None, [], 0

    def _record(self, x):
        x = model.mean_over_processes(x)
        self.recorded[-1].append(x.detach().float())
        return x

    def _replay(self, x):  # the whole step's mean, already reduced over processes
        if self.calls >= len(self.means):
            raise RuntimeError(f"a forward called model.reduce_mean more than the {len(self.means)} times recorded: "
                               "every loss must call it the same number of times in every forward")
        x = self.means[self.calls].to(x.device)
        self.calls += 1
        return x

    @torch.no_grad()
    def record(self, net, micro_batches, autocast=None):
        """micro_batches: list of (images, targets); net (the model) in training mode."""
        buffers = [b.clone() for b in net.buffers()]      # BatchNorm running statistics
        self.means, self.recorded, model.normalizer_hook = None, [], self._record
        try:
            for images, targets in micro_batches:
                self.recorded.append([])
                with autocast if autocast is not None else contextlib.nullcontext():
                    net(images, targets)
        finally:
            model.normalizer_hook = None
            for b, saved in zip(net.buffers(), buffers):
                b.copy_(saved)
        counts = {len(r) for r in self.recorded}
        if len(counts) != 1:
            raise RuntimeError(f"the micro-batches called reduce_mean {sorted(counts)} times: a method's "
                               "losses must call it the same number of times in every forward")
        self.means = torch.stack([torch.stack(r) for r in self.recorded]).mean(0)  # (calls,)

    @contextlib.contextmanager
    def replay(self):
        self.calls, model.normalizer_hook = 0, self._replay
        try:
            yield
        finally:
            model.normalizer_hook = None
        if self.calls != len(self.means):  # reached only when the forward raised nothing
            raise RuntimeError(f"a forward called model.reduce_mean {self.calls} times, the recorded ones "
                               f"{len(self.means)}: every loss must call it the same number of times in every forward")
