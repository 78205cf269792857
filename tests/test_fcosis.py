"""Hand-computed checks of the FCOSIS building blocks ([IS 3.2], [IS 4.2] Table 3)."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from model import (first_box_index, optimal_padding, box_overlap_graph, largest_first_coloring, coloring_groups,
                   center_of_mass, average_pool_masks, coarse_foreground_targets, mask_assignment,
                   center_of_mass_targets, center_of_mass_loss, fcos_locations, regressed_centers,
                   attention_maps, detections_as_objects, AttentionMap, apply_attention, SegmentationHead,
                   padded_crop_bce, boxes_inside)

SP1 = math.log1p(math.e)  # BCE of logit 1 against target 0 = log(1 + e) = 1.313262; against t: SP1 - t


# -- optimal_padding [IS 3.2.2] ------------------------------------------------------------------

def test_optimal_padding_rounds_up():
    """Guards the root of (w + 2p)(h + 2p) = fg / 0.5 and the round-up.
    10x10 box, 80 fg: (10 + 2p)^2 = 160 -> p = (sqrt(160) - 10) / 2 = (12.649 - 10) / 2 = 1.32 -> 2.
    10x10 box, 100 fg (all foreground): (10 + 2p)^2 = 200 -> p = (14.142 - 10) / 2 = 2.07 -> 3
    (check: 16^2 = 256 >= 200 > 14^2 = 196)."""
    assert optimal_padding(80, 10, 10) == 2
    assert optimal_padding(100, 10, 10) == 3
    assert isinstance(optimal_padding(80, 10, 10), int)


def test_optimal_padding_clamps_at_zero():
    """Guards the clamp: padding only adds background, so a box that is already at most half
    foreground keeps p = 0 (a negative root would shrink the crop below the box).
    10x10 box, 30 fg: (10 + 2p)^2 = 60 -> p = (sqrt(60) - 10) / 2 = (7.746 - 10) / 2 = -1.13 -> 0.
    10x10 box, 50 fg: exactly half -> (10 + 2p)^2 = 100 -> p = 0 exactly -> 0 (not 1)."""
    assert optimal_padding(30, 10, 10) == 0
    assert optimal_padding(50, 10, 10) == 0
    assert optimal_padding(0, 10, 10) == 0


def test_optimal_padding_exact_integer_root_not_pushed_up():
    """Guards the round-up against floating error and a w/h mix-up on a non-square box.
    w=4, h=25, fg=116: fg/0.5 = 232 = (4 + 2*2)(25 + 2*2) = 8*29, so p = 2 exactly:
    p = (sqrt((4-25)^2 + 4*232) - 29) / 4 = (sqrt(441 + 928) - 29) / 4 = (37 - 29) / 4 = 2."""
    assert optimal_padding(116, 4, 25) == 2
    assert optimal_padding(116, 25, 4) == 2
    assert optimal_padding(117, 4, 25) == 3


def test_optimal_padding_tensor_equals_scalar():
    """Guards the batched (tensor) path the loss uses against drifting from the scalar formula."""
    fg = torch.tensor([80, 30, 50, 100, 116, 7, 900])
    w = torch.tensor([10.0, 10.0, 10.0, 10.0, 4.0, 3.5, 40.0])
    h = torch.tensor([10.0, 10.0, 10.0, 10.0, 25.0, 2.0, 30.0])
    p = optimal_padding(fg, w, h)
    assert p.dtype == torch.int64 and p.shape == (7,)
    assert p.tolist() == [optimal_padding(a, b, c) for a, b, c in zip(fg.tolist(), w.tolist(), h.tolist())]


# -- Largest-First colouring [IS 3.2.1] ------------------------------------------------------------

def chain(k, x0=0.0):
    """k boxes of width 10 along x, each overlapping the next by 2 px: a path graph."""
    return torch.tensor([[x0 + 8.0 * i, 0.0, x0 + 8.0 * i + 10.0, 10.0] for i in range(k)])


def test_coloring_valid_and_greedy_on_random_boxes():
    """Guards eq. 3 (no two overlapping boxes share a colour) and the greedy rule on random
    boxes: colours are 0..K-1, and in Largest-First order (degree desc, ties lower index) each
    vertex's colour is the smallest not taken by a neighbour coloured before it. The adjacency
    is cross-checked against torchvision's box_iou > 0."""
    xy = torch.rand(60, 2) * 100
    boxes = torch.cat([xy, xy + 2 + torch.rand(60, 2) * 25], 1)
    colors = largest_first_coloring(boxes)
    adj = box_overlap_graph(boxes)
    iou = box_iou(boxes, boxes) > 0
    iou.fill_diagonal_(False)
    assert torch.equal(adj, iou)
    assert not (adj & (colors[:, None] == colors[None, :])).any()
    assert set(colors.tolist()) == set(range(int(colors.max()) + 1))
    order = torch.sort(adj.sum(1), descending=True, stable=True).indices.tolist()
    rank = {v: r for r, v in enumerate(order)}
    for v in range(60):
        earlier = {colors[u].item() for u in adj[v].nonzero()[:, 0].tolist() if rank[u] < rank[v]}
        assert all(c in earlier for c in range(colors[v].item()))


def test_coloring_follows_degree_order_not_index_order():
    """Guards visiting vertices by degree (Largest-First), not by index.
    Path a-b-c-d given in the order [a, d, b, c] (degrees 1, 1, 2, 2).
    Index order would give a=0, d=0, b=1 (next to a), c=2 (next to b=1 and d=0): 3 colours.
    Largest-First visits b, c (degree 2, lower index first), then a, d:
    b=0, c=1, a=1 (next to b=0), d=0 (next to c=1) -> [a, d, b, c] = [1, 0, 0, 1], 2 colours.
    Star: hub (index 3) overlaps leaves 0, 1, 2: the hub goes first -> 0, leaves -> 1."""
    a, b, c, d = chain(4)
    assert largest_first_coloring(torch.stack([a, d, b, c])).tolist() == [1, 0, 0, 1]
    star = torch.tensor([[0.0, 0, 4, 4], [10, 0, 14, 4], [20, 0, 24, 4], [2, 2, 22, 3]])
    assert largest_first_coloring(star).tolist() == [1, 1, 1, 0]


def test_coloring_planted_graphs():
    """Guards the colour count on graphs whose chromatic number is known:
    chain of 7 -> 2 colours alternating (middles 1..5 by index: 0,1,0,1,0; ends: 0 -> 1, 6 -> 1);
    clique of 5 (nested boxes) -> 5 distinct colours; 6 disjoint boxes -> all colour 0."""
    assert largest_first_coloring(chain(7)).tolist() == [1, 0, 1, 0, 1, 0, 1]
    nested = torch.tensor([[float(i), float(i), 50.0 - i, 50.0 - i] for i in range(5)])
    assert sorted(largest_first_coloring(nested).tolist()) == [0, 1, 2, 3, 4]
    disjoint = torch.tensor([[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(6)])
    assert largest_first_coloring(disjoint).tolist() == [0] * 6


def test_coloring_touching_boxes_not_adjacent_and_empty():
    """Guards IoU > 0 (positive intersection area): boxes sharing only an edge (x = 10) or a
    corner ((10, 10)) do not overlap and share colour 0. N = 0 -> empty int64."""
    touching = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [10, 10, 20, 20], [0, 10, 10, 20]])
    assert largest_first_coloring(touching).tolist() == [0, 0, 0, 0]
    empty = largest_first_coloring(torch.zeros(0, 4))
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_coloring_groups_per_image():
    """Guards the batch grouping: the same two overlapping boxes in two images give 4 passes
    (image 0 colours 0, 1; image 1 colours 0, 1), dense ids ordered by (image, colour); boxes of
    different images never conflict (a disjoint third box of image 1 joins colour 0)."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 10, 10], [5, 5, 15, 15], [30, 30, 40, 40]])
    batch = torch.tensor([0, 0, 1, 1, 1])
    groups, group_batch = coloring_groups(boxes, batch)
    # image 1: degrees (1, 1, 0) -> box 2 -> 0, box 3 -> 1, box 4 -> 0
    assert groups.tolist() == [0, 1, 2, 3, 2]
    assert group_batch.tolist() == [0, 0, 1, 1]
    g, gb = coloring_groups(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert g.shape == (0,) and gb.shape == (0,)


# -- centre of mass and detection-head targets [IS 3.2.1] ----------------------------------------

def test_center_of_mass_l_shape():
    """Guards the pixel-centre convention (X + 0.5) and an x/y mix-up on an L-shaped mask:
    column x=0, rows 0..3 (4 px) + row y=3, x=1..2 (2 px), 6 px in all.
    x = (4*0.5 + 1.5 + 2.5) / 6 = 6/6 = 1.0;  y = (0.5 + 1.5 + 2.5 + 3.5 + 2*3.5) / 6 = 15/6 = 2.5."""
    m = torch.zeros(1, 5, 6, dtype=torch.uint8)
    m[0, 0:4, 0] = 1
    m[0, 3, 1:3] = 1
    torch.testing.assert_close(center_of_mass(m), torch.tensor([[1.0, 2.5]]))
    torch.testing.assert_close(center_of_mass(m.bool()), torch.tensor([[1.0, 2.5]]))


def test_center_of_mass_empty_mask():
    """Guards the empty-mask case: NaN without boxes (loud), the box centre with boxes
    (box (2, 4, 6, 10) -> (4, 7)); non-empty masks are unaffected by the fallback."""
    m = torch.zeros(2, 8, 8, dtype=torch.uint8)
    m[1, 2, 3] = 1                                          # one pixel -> centre (3.5, 2.5)
    com = center_of_mass(m)
    assert torch.isnan(com[0]).all()
    torch.testing.assert_close(com[1], torch.tensor([3.5, 2.5]))
    boxes = torch.tensor([[2.0, 4.0, 6.0, 10.0], [0.0, 0.0, 8.0, 8.0]])
    torch.testing.assert_close(center_of_mass(m, boxes), torch.tensor([[4.0, 7.0], [3.5, 2.5]]))


def test_center_of_mass_targets_hand():
    """Guards target = (mass centre - location) / stride and the "positive AND inside the mask"
    rule. 16x16 image, stride 8: locations (4,4), (12,4), (4,12), (12,12).
    Mask x in [2, 14), y in [2, 8): centre x = mean(2.5..13.5) = 8.0, y = mean(2.5..7.5) = 5.0.
    matched = [0, -1, 0, 0]: (4,4) positive, pixel in mask -> ((8-4)/8, (5-4)/8) = (0.5, 0.125);
    (12,4) in the mask but negative -> invalid; (4,12), (12,12) positive but outside the mask.
    All matched: (12,4) -> ((8-12)/8, 0.125) = (-0.5, 0.125). Per-location strides agree.
    Loss with pred 0: SmoothL1 (beta 1) = 0.5*0.5^2 + 0.5*0.125^2 = 0.125 + 0.0078125 = 0.1328125.
    Two images in the flat layout, with FCOS's per-image box index made flat by first_box_index
    (as MaskFCOS does for its RoIs), give the same targets (guards that index
    conversion)."""
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 2:8, 2:14] = 1
    com = center_of_mass(masks)
    torch.testing.assert_close(com, torch.tensor([[8.0, 5.0]]))
    loc = fcos_locations([(2, 2)], [8])[0]
    assert loc.tolist() == [[4, 4], [12, 4], [4, 12], [12, 12]]
    target, valid = center_of_mass_targets(loc, 8, torch.tensor([[0, -1, 0, 0]]), com, masks)
    assert valid.tolist() == [[True, False, False, False]]
    torch.testing.assert_close(target[0, 0], torch.tensor([0.5, 0.125]))
    assert (target[0, 1:] == 0).all()
    target, valid = center_of_mass_targets(loc, torch.full((4,), 8), torch.zeros(1, 4, dtype=torch.long), com, masks)
    assert valid.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(target[0, 1], torch.tensor([-0.5, 0.125]))
    loss = center_of_mass_loss(torch.zeros(1, 4, 2), target, valid)
    assert loss.item() == pytest.approx(0.1328125, abs=1e-7)
    # two images of two instances each, flat (0, 1 | 2, 3): image 0 holds the mask as its box 0,
    # image 1 as its box 1, which is flat instance first_box_index[1] + 1 = 3
    masks4 = torch.cat([masks, torch.zeros_like(masks), torch.zeros_like(masks), masks])   # (4, H, W)
    com4 = center_of_mass(masks4, torch.zeros(4, 4))
    per_image = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])                              # FCOS's "matched"
    two_images = [{"boxes": torch.zeros(2, 4)}, {"boxes": torch.zeros(2, 4)}]
    flat = per_image + first_box_index(two_images, per_image.device)[:, None]
    assert flat.tolist() == [[0, 0, 0, 0], [3, 3, 3, 3]]
    tb, vb = center_of_mass_targets(loc, 8, flat, com4, masks4)
    torch.testing.assert_close(tb, target.repeat(2, 1, 1))
    assert torch.equal(vb, valid.repeat(2, 1))
    t0, v0 = center_of_mass_targets(loc, 8, torch.full((1, 4), -1), torch.zeros(0, 2), torch.zeros(0, 16, 16))
    assert not v0.any() and center_of_mass_loss(torch.zeros(1, 4, 2), t0, v0).item() == 0


def test_mask_assignment_smaller_mask_wins():
    """Guards the Fig. 3 reading (every foreground pixel regresses its own object's centre):
    8x8 image, stride 4, locations (2,2), (6,2), (2,6), (6,6). Mask 0 covers x, y in [0, 8)
    (64 px), mask 1 covers x in [4, 8), y in [0, 4) (16 px): (6,2) is in both -> the smaller,
    mask 1; the others -> mask 0. Image 1 has no mask -> -1 everywhere."""
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[0] = 1
    masks[1, 0:4, 4:8] = 1
    matched = mask_assignment(fcos_locations([(2, 2)], [4])[0], masks, torch.tensor([0, 0]), 2)
    assert matched.tolist() == [[0, 1, 0, 0], [-1, -1, -1, -1]]


def test_coarse_foreground_targets_union_then_pool():
    """Guards union-then-average-pool (not sum, not max of pooled masks) and the per-image union.
    8x8 images, stride 4. Image 0: mask A x in [0,2), B x in [1,3), both y in [0,4): union x in
    [0,3) -> cell (0,0) = 12/16 = 0.75 (sum would be 16/16, max of pooled 8/16). Image 1: a mask
    filling cell (1,1) -> 1.0. Stride 16 (a rounded-up level): one cell, zero-padded to 16x16:
    12/256 = 0.046875 (not 12/64)."""
    masks = torch.zeros(3, 8, 8, dtype=torch.uint8)
    masks[0, 0:4, 0:2] = 1
    masks[1, 0:4, 1:3] = 1
    masks[2, 4:8, 4:8] = 1
    t = coarse_foreground_targets(masks, 4, torch.tensor([0, 0, 1]), 2)
    assert t.shape == (2, 1, 2, 2)
    torch.testing.assert_close(t[:, 0], torch.tensor([[[0.75, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]))
    t16 = coarse_foreground_targets(masks[:2], 16)
    assert t16.shape == (1, 1, 1, 1) and t16.item() == pytest.approx(12 / 256)


# -- attention map [IS 3.2.1, 4.2] ----------------------------------------------------------------

def toy_attention_inputs():
    """Two overlapping instances on a 4x4 stride-8 level (32x32 image, locations 8j+4).
    A: box (0, 0, 20, 20), centre (8, 8); B: box (8, 8, 32, 32), centre (24, 24).
    Regressed centres = the location itself, except cell (1,1) (12,12) -> (10, 9) (points to A)
    and cell (0,0) (4,4) -> (22, 23) (points to B). Coarse fg 0.5, cell (1,1) 0.8, (0,0) 0.6."""
    regressed = fcos_locations([(4, 4)], [8])[0].t().reshape(1, 2, 4, 4).clone()
    regressed[0, :, 1, 1] = torch.tensor([10.0, 9.0])
    regressed[0, :, 0, 0] = torch.tensor([22.0, 23.0])
    fg = torch.full((1, 1, 4, 4), 0.5)
    fg[0, 0, 1, 1], fg[0, 0, 0, 0] = 0.8, 0.6
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [8.0, 8.0, 32.0, 32.0]])
    centers = torch.tensor([[8.0, 8.0], [24.0, 24.0]])
    return regressed, fg, boxes, centers, torch.tensor([0, 0]), torch.tensor([0, 1])


Q = fcos_locations([(4, 4)], [8])[0]  # the toy level's locations (16, 2)


def test_attention_map_two_instances_by_hand():
    """Guards the map of [IS 3.2.1]: 0 outside B_j; where assigned to j, lam*f - mu*(1 - f) ("lam
    indicates foreground pixels on the object while -mu marks pixels which belong to the
    background or distractor instances": the own background gets -mu too, weighed by f); -mu
    where assigned to the other instance, so the overlapping neighbour's cells inside B_j are
    distractors. lam = 2, mu = 3 (toy_attention_inputs): own cells 5f - 3, so f = 0.5 -> -0.5,
    f = 0.8 -> 1.0.
    A (box covers cells i, j in {0, 1}):
      (0,0) inside A only, votes (22,23): d^2 to A = 196+225, to B = 4+1 -> B: -mu = -3
      (0,1) (12,4): d^2 A = 16+16 = 32, B = 144+400 -> A, f 0.5: -0.5;  (1,0) likewise
      (1,1) (12,12) inside both, votes (10,9): d^2 A = 4+1, B = 196+225 -> A, f 0.8: 1.0
      (2,2) (20,20) lies on A's edge x1 = y1 = 20 -> outside (half-open): 0
    B (box covers cells i, j in {1, 2, 3}):
      (1,1) -> A: -3;  (1,2) (20,12): d^2 A = 144+16 = 160 = d^2 B = 16+144: tie -> lower
      index A: -3, (2,1) likewise; every other cell votes for itself, nearer B, f 0.5: -0.5
    (3,0) (4,28) is outside both boxes: 0 in both maps.
    The module (lam = mu = 1): for L = A(0,1) = lam * 0.5 - mu * 0.5, dL/dlam = 0.5,
    dL/dmu = -0.5, dL/df(0,1) = lam + mu = 2."""
    regressed, fg, boxes, centers, batch, groups = toy_attention_inputs()
    att = attention_maps(Q, regressed, fg, boxes, centers, batch, groups, 2,
                         torch.tensor(2.0), torch.tensor(3.0))
    assert att.shape == (2, 1, 4, 4)
    expect_a = torch.tensor([[-3.0, -0.5, 0, 0], [-0.5, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    expect_b = torch.tensor([[0.0, 0, 0, 0], [0, -3, -3, -0.5], [0, -3, -0.5, -0.5],
                             [0, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(att[0, 0], expect_a)
    torch.testing.assert_close(att[1, 0], expect_b)
    fg.requires_grad_(True)
    module = AttentionMap()
    module(Q, regressed, fg, boxes, centers, batch, groups, 2)[0, 0, 0, 1].backward()
    assert module.lam.grad.item() == pytest.approx(0.5) and module.mu.grad.item() == pytest.approx(-0.5)
    assert fg.grad[0, 0, 0, 1].item() == pytest.approx(2.0)


def test_detections_as_objects_by_hand():
    """Guards the test-time de-duplication of the competitors (`detections_as_objects`): a
    class-agnostic NMS at IoU MERGE_IOU = 0.6 per image; a suppressed detection stands for the
    highest-scored kept detection of its image that overlaps it by more than 0.6; only kept ones
    scoring at least COMPETE_SCORE = 0.5 compete.
    Image 0: A (0, 0, 10, 10) score 0.9; A' (1, 0, 11, 10) score 0.5 (IoU 90/110 = 0.818 -> A);
      C (20, 0, 30, 10) score 0.8 (no overlap, kept); C' (20, 0, 30, 10) score 0.85 (the same box
      as C, higher: C' is kept, C stands for C').
    Image 1: D (0, 0, 10, 10) score 0.1, the same box as A but in another image: kept, stands for
      itself, scores below 0.5: does not compete.
    -> objects [0, 0, 3, 3, 4], competes [True, False, False, True, False]."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [20, 0, 30, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.5, 0.8, 0.85, 0.1])
    batch = torch.tensor([0, 0, 0, 0, 1])
    obj, competes = detections_as_objects(boxes, scores, batch)
    assert obj.tolist() == [0, 0, 3, 3, 4]
    assert competes.tolist() == [True, False, False, True, False]


def test_attention_map_score_floor_by_hand():
    """Guards the score floor of the inference competition: toy_attention_inputs with A kept as a
    competitor and B (a weak detection) not (competes = [True, False]); lam = 2, mu = 3.
    A's map: B takes nothing from A, so A's cell (0,0), whose vote (22,23) is nearer B's centre,
      is A's own: 5 * 0.6 - 3 = 0 (it was -3 with both competing); the rest as before.
    B's map: B competes against A for its own box, ties going to A: (1,1) votes (10,9), nearer A:
      -3; (1,2) and (2,1) tie (d^2 160 = 160): -3; every other cell is nearer B: 5 * 0.5 - 3 = -0.5,
      the map of the test with both competing."""
    regressed, fg, boxes, centers, batch, groups = toy_attention_inputs()
    att = attention_maps(Q, regressed, fg, boxes, centers, batch, groups, 2, torch.tensor(2.0), torch.tensor(3.0),
                         obj=torch.tensor([0, 1]), competes=torch.tensor([True, False]))
    expect_a = torch.tensor([[0.0, -0.5, 0, 0], [-0.5, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    expect_b = torch.tensor([[0.0, 0, 0, 0], [0, -3, -3, -0.5], [0, -3, -0.5, -0.5],
                             [0, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(att[0, 0], expect_a)
    torch.testing.assert_close(att[1, 0], expect_b)


def test_attention_map_duplicate_competes_as_its_object():
    """Guards the inference assignment among de-duplicated detections: D, a copy of A (box
    (0, 0, 20, 20), centre (9, 9): a second class, lower score), which stands for A.
    Without owners D competes and wins the cells whose vote is nearer (9, 9) than A's (8, 8):
      (0,1) (12,4): d^2 A = 16+16 = 32, D = 9+25 = 34 -> A;  (1,0) (4,12): likewise A;
      (1,1) votes (10,9): d^2 A = 4+1 = 5, D = 1+0 = 1 -> D: -mu = -3 in A's map (test above: 1.0).
    With obj = [0, 1, 0], competes = [True, True, False]: D does not compete; A's map is the two-instance map of the test
    above, and D's map equals A's (each cell assigned to A counts as D's own)."""
    regressed, fg, boxes, centers, batch, _ = toy_attention_inputs()
    boxes3 = torch.cat([boxes, boxes[:1]])
    centers3 = torch.cat([centers, torch.tensor([[9.0, 9.0]])])
    batch3, groups3 = torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])
    lam, mu = torch.tensor(2.0), torch.tensor(3.0)
    plain = attention_maps(Q, regressed, fg, boxes3, centers3, batch3, groups3, 3, lam, mu)
    assert plain[0, 0, 1, 1].item() == -3.0 and plain[2, 0, 1, 1].item() == pytest.approx(1.0)
    owned = attention_maps(Q, regressed, fg, boxes3, centers3, batch3, groups3, 3, lam, mu,
                           obj=torch.tensor([0, 1, 0]), competes=torch.tensor([True, True, False]))
    two = attention_maps(Q, regressed, fg, boxes, centers, batch, torch.tensor([0, 1]), 2, lam, mu)
    torch.testing.assert_close(owned[:2], two)
    torch.testing.assert_close(owned[2], two[0])


def test_attention_map_ablations_mu0_and_bbox_only():
    """Guards Table 3's variants [IS 4.2]. mu := 0: the -3 entries above become 0 and the own
    cells lam * f: 2 * 0.5 = 1, cell (1,1) 2 * 0.8 = 1.6. bbox only: lam = 2 on every cell inside the box (A: cells {0,1}^2, B: {1,2,3}^2),
    no coarse fg, no assignment, no -mu."""
    regressed, fg, boxes, centers, batch, groups = toy_attention_inputs()
    mu0 = attention_maps(Q, regressed, fg, boxes, centers, batch, groups, 2, torch.tensor(2.0),
                         torch.tensor(0.0))
    expect_a = torch.tensor([[0.0, 1, 0, 0], [1, 1.6, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    expect_b = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    torch.testing.assert_close(mu0[:, 0], torch.stack([expect_a, expect_b]))
    bbox = attention_maps(Q, regressed, fg, boxes, centers, batch, groups, 2, torch.tensor(2.0), torch.tensor(3.0),
                          bbox_only=True)
    expect = torch.zeros(2, 4, 4)
    expect[0, 0:2, 0:2] = 2.0
    expect[1, 1:4, 1:4] = 2.0
    torch.testing.assert_close(bbox[:, 0], expect)


def test_attention_module_gradients_reach_lambda_and_mu():
    """Guards lam and mu being learnable [IS 3.2.1] (initialised to 1) and the coarse fg staying
    differentiable. L = A(0,0) + A(1,1) = -mu + (lam*0.8 - mu*0.2) -> dL/dlam = 0.8,
    dL/dmu = -1.2, dL/dfg(1,1) = lam + mu = 2. "mu0": mu is a buffer (0, not learnable); "bbox":
    only lam."""
    regressed, fg, boxes, centers, batch, groups = toy_attention_inputs()
    fg.requires_grad_(True)
    module = AttentionMap()
    assert module.lam.item() == 1.0 and module.mu.item() == 1.0
    att = module(Q, regressed, fg, boxes, centers, batch, groups, 2)
    (att[0, 0, 0, 0] + att[0, 0, 1, 1]).backward()
    assert module.lam.grad.item() == pytest.approx(0.8)
    assert module.mu.grad.item() == pytest.approx(-1.2)
    assert fg.grad[0, 0, 1, 1].item() == pytest.approx(2.0)
    assert [n for n, _ in AttentionMap("mu0").named_parameters()] == ["lam"]
    assert AttentionMap("mu0").mu.item() == 0.0
    assert [n for n, _ in AttentionMap("bbox").named_parameters()] == ["lam"]
    with pytest.raises(ValueError, match="mode"):
        AttentionMap("box")


def test_attention_group_map_is_sum_and_images_independent():
    """Guards the shared map of a colour group (sum of its members' maps, [IS 3.2.1]) and the
    per-image assignment: a third instance C (box (24, 0, 32, 8), touching B only) shares A's
    group, and its group map equals A's map + C's map from separate groups. Batched over two
    images equals one image at a time, although image 1's instance D is centred exactly where
    A's cell (1,1) votes ((10, 9)): instances of another image never take a location."""
    regressed, fg, boxes, centers, batch, _ = toy_attention_inputs()
    boxes3 = torch.cat([boxes, torch.tensor([[24.0, 0.0, 32.0, 8.0]])])
    centers3 = torch.cat([centers, torch.tensor([[28.0, 4.0]])])
    batch3 = torch.tensor([0, 0, 0])
    groups, group_batch = coloring_groups(boxes3, batch3)
    assert groups.tolist() == [0, 1, 0] and group_batch.tolist() == [0, 0]
    lam, mu = torch.tensor(2.0), torch.tensor(3.0)
    shared = attention_maps(Q, regressed, fg, boxes3, centers3, batch3, groups, 2, lam, mu)
    alone = attention_maps(Q, regressed, fg, boxes3, centers3, batch3, torch.tensor([0, 1, 2]), 3, lam, mu)
    torch.testing.assert_close(shared[0], alone[0] + alone[2])
    torch.testing.assert_close(shared[1], alone[1])
    # two images: image 1 = a D instance whose centre sits on A's vote
    reg2 = torch.cat([regressed, fcos_locations([(4, 4)], [8])[0].t().reshape(1, 2, 4, 4)])
    fg2 = torch.cat([fg, torch.full((1, 1, 4, 4), 0.3)])
    boxes2 = torch.cat([boxes, torch.tensor([[0.0, 0.0, 16.0, 16.0]])])
    centers2 = torch.cat([centers, torch.tensor([[10.0, 9.0]])])
    both = attention_maps(Q, reg2, fg2, boxes2, centers2, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), 3, lam, mu)
    first = attention_maps(Q, regressed, fg, boxes, centers, torch.tensor([0, 0]), torch.tensor([0, 1]), 2, lam, mu)
    second = attention_maps(Q, reg2[1:], fg2[1:], boxes2[2:], centers2[2:], torch.tensor([0]), torch.tensor([0]), 1,
                            lam, mu)
    torch.testing.assert_close(both, torch.cat([first, second]))
    # D alone in its image gets every location of its box: lam * 0.3 - mu * 0.7 = 0.6 - 2.1 on {0,1}^2
    torch.testing.assert_close(second[0, 0, :2, :2], torch.full((2, 2), -1.5))


def test_regressed_centers_and_apply_attention():
    """Guards the stride-unit offsets (x + s*r_x) and the resize onto P2-P4.
    Stride 8, cell (0,1) = location (12, 4), r = (0.5, -0.25) -> (12 + 4, 4 - 2) = (16, 2).
    A constant map 2 shrunk to any coarser level stays 2 (area); at P2's own size the map is
    used as is; group_batch picks each group's image.
    Area shrink of a P2-size map (4x4) onto P4 (1x1, factor 4): the mean of all 16 cells,
    (15 * 1 + 17) / 16 = 2 for a map of ones with one cell 17 (a 4x bilinear shrink would
    read only the middle 2x2 cells: 1); onto P3 (2x2) its top-left cell is (17 + 1 + 1 + 1) / 4 = 5."""
    r = torch.zeros(1, 2, 4, 4)
    r[0, :, 0, 1] = torch.tensor([0.5, -0.25])
    rc = regressed_centers(r, fcos_locations([(4, 4)], [8])[0], 8)
    assert rc[0, :, 0, 1].tolist() == [16.0, 2.0] and rc[0, :, 3, 2].tolist() == [20.0, 28.0]
    feats = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    att = torch.full((3, 1, 8, 8), 2.0)
    att[2, 0, 0, 0] = 5.0
    out = apply_attention(feats, att, torch.tensor([1, 0, 1]))
    assert [o.shape for o in out] == [(3, 3, 8, 8), (3, 3, 4, 4), (3, 3, 2, 2)]
    torch.testing.assert_close(out[1][0], 2 * feats[1][1])
    torch.testing.assert_close(out[2][1], 2 * feats[2][0])
    torch.testing.assert_close(out[0][2], feats[0][1] * att[2])
    fine = torch.ones(1, 1, 4, 4)
    fine[0, 0, 0, 0] = 17.0
    shrunk = apply_attention([torch.ones(1, 1, 2, 2), torch.ones(1, 1, 1, 1)], fine, torch.tensor([0]))
    assert shrunk[1].item() == 2.0 and shrunk[0][0, 0, 0, 0].item() == (17 + 3) / 4


# -- segmentation head and loss [IS 3.2.1, 3.2.2] ---------------------------------------------------

@pytest.mark.parametrize("num_classes", [1, 5])
def test_segmentation_head_shape_and_all_params_used(num_classes):
    """Guards the P2-P4 -> stride-4 output (agnostic: 1 channel, class-specific: C) and that
    every level's tower gets a gradient (no unused parameter under DDP)."""
    head = SegmentationHead(in_channels=32, channels=32, num_classes=num_classes)
    feats = [torch.randn(2, 32, 16, 12), torch.randn(2, 32, 8, 6), torch.randn(2, 32, 4, 3)]
    out = head(feats)
    assert out.shape == (2, num_classes, 16, 12)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == 3 * 3 + 1


def test_padded_crop_bce_hand_stride1():
    """Guards the padded crop, its p and the mean over instances. 8x8, stride 1, logits 1
    everywhere: BCE(1, t) = log(1 + e) - t = 1.313262 - t.
    Instance 0: box (2, 2, 6, 6) fully foreground (16 px): (4 + 2p)^2 = 32 -> p = 0.83 -> 1,
      crop (1, 1, 7, 7) = 36 px, 16 fg -> 1.313262 - 16/36 = 0.868817.
    Instance 1: box (0, 0, 2, 2), 2 fg px of 4 (ratio 0.5) -> p = 0, 4 px -> 1.313262 - 0.5 = 0.813262.
    Mean = 0.841039."""
    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[1, 0, 0:2] = 1
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    logits = torch.ones(2, 8, 8)
    assert padded_crop_bce(logits[:1], masks[:1], boxes[:1], stride=1).item() == pytest.approx(SP1 - 16 / 36, abs=1e-6)
    assert padded_crop_bce(logits[1:], masks[1:], boxes[1:], stride=1).item() == pytest.approx(SP1 - 0.5, abs=1e-6)
    assert padded_crop_bce(logits, masks, boxes, stride=1).item() == pytest.approx(0.841039, abs=1e-6)


def test_padded_crop_bce_ignores_pixels_outside_padded_box():
    """Guards the crop: logits outside the padded box (1, 1, 7, 7) of instance 0 above do not
    change the loss; a logit on its padding ring (pixel (1, 1), background) does."""
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1
    boxes = torch.tensor([[2.0, 2.0, 6.0, 6.0]])
    logits = torch.ones(1, 8, 8)
    ref = padded_crop_bce(logits, masks, boxes, stride=1)
    noisy = logits + 50 * torch.randn(1, 8, 8)
    noisy[0, 1:7, 1:7] = 1.0
    torch.testing.assert_close(padded_crop_bce(noisy, masks, boxes, stride=1), ref)
    ring = logits.clone()
    ring[0, 1, 1] = -5.0
    assert padded_crop_bce(ring, masks, boxes, stride=1) < ref


def test_padded_crop_bce_hand_stride4_soft_targets():
    """Guards the stride-4 frame (GT average-pooled to stride 4, cell centres 4j + 2).
    16x16 image, box (4, 4, 10, 12) fully foreground (6x8 = 48 px): 96 = (6 + 2p)(8 + 2p) ->
    p = (sqrt(4 + 384) - 14)/4 = 1.42 -> 2, crop (2, 2, 12, 14): centres 2, 6, 10 in x and y ->
    cells rows/cols 0..2 = 9 cells. Pooled GT: column 1 ([4, 8)) full, column 2 ([8, 12)) half;
    rows 1, 2 full -> targets 1, 1, 0.5, 0.5 and 5 zeros. Logits 1: (9*1.313262 - 3)/9 = 0.979928.
    N = 0 -> 0, still differentiable."""
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 4:12, 4:10] = 1
    pooled = average_pool_masks(masks, 4)
    assert pooled[0, 1:3, 1:3].tolist() == [[1.0, 0.5], [1.0, 0.5]]
    loss = padded_crop_bce(torch.ones(1, 4, 4), masks, torch.tensor([[4.0, 4.0, 10.0, 12.0]]), stride=4)
    assert loss.item() == pytest.approx((9 * SP1 - 3) / 9, abs=1e-6)
    empty = torch.zeros(0, 4, 4, requires_grad=True)
    loss0 = padded_crop_bce(empty, torch.zeros(0, 16, 16, dtype=torch.uint8), torch.zeros(0, 4), stride=4)
    assert loss0.item() == 0.0 and loss0.requires_grad


def test_padded_crop_bce_tiny_box_keeps_its_centre_cell():
    """Guards a box thinner than a cell (else a 0/0 NaN or a silently lost instance).
    Box (3.5, 3.5, 4.5, 4.5), one fg pixel (4, 4): (1 + 2p)^2 = 2 -> p = 0.21 -> 1, crop
    [2.5, 5.5) in x and y holds no stride-4 centre (2, 6, ...). The cell holding the box
    centre (4.0 -> cell 1) still counts: target 1/16, logit 1 -> loss 1.313262 - 1/16 = 1.250762."""
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 4, 4] = 1
    loss = padded_crop_bce(torch.ones(1, 4, 4), masks, torch.tensor([[3.5, 3.5, 4.5, 4.5]]), stride=4)
    assert loss.item() == pytest.approx(SP1 - 1 / 16, abs=1e-6)


# -- the FCOSIS model -------------------------------------------------------------------------------

from model import build_model, FCOSIS, FCOSForward  # noqa: E402
from test_fcos import tiny, train_steps  # noqa: E402
from pictures import teaching_maps  # noqa: E402


def tiny_fcosis(**kw):
    """A CPU-sized FCOSIS: ResNet-18 from scratch, 32-wide FPN / heads, 3 classes."""
    return tiny("fcosis", **kw)


def toy_instances(H=96, W=128):
    """Two images: three objects (two touching rectangles, one L shape), and an empty one."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, H, W)
    masks = torch.zeros(3, H, W, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    masks[1, 20:60, 40:90] = 1
    masks[2, 50:90, 60:70] = 1
    masks[2, 80:90, 60:110] = 1
    boxes = torch.tensor([[10., 10, 40, 40], [40, 20, 90, 60], [60, 50, 110, 90]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, H, W, dtype=torch.uint8)}]
    return images, targets


def test_ablation_switches_change_what_they_should():
    """Guards the Table 3 switches: "segm" learns lambda and mu; "mu0" has mu fixed at 0 (a
    buffer, not a parameter); "bbox" has no mu either; "none" has no attention module but an
    ASPP and a class-wise (C-channel) segmentation output; seg_classes="specific" gives C
    channels with attention; the detection head predicts 3 extra channels (centre 2 + fg 1)."""
    m = build_model(tiny_fcosis())
    assert isinstance(m, FCOSIS) and m.head.extra.out_channels == 3
    names = dict(m.named_parameters())
    assert "attention.lam" in names and "attention.mu" in names and m.seg_head.predictor.out_channels == 1
    for mode in ("mu0", "bbox"):
        m = build_model(tiny_fcosis(attention=mode))
        assert "attention.mu" not in dict(m.named_parameters()) and m.attention.mu.item() == 0
    m = build_model(tiny_fcosis(attention="none"))
    assert m.attention is None and m.aspp is not None and m.seg_head.predictor.out_channels == 3
    assert build_model(tiny_fcosis(seg_classes="specific")).seg_head.predictor.out_channels == 3
    assert m.backbone.strides == [4, 8, 16, 32, 64, 128] and m.strides == [8, 16, 32, 64, 128]


@pytest.mark.parametrize("kw", [dict(), dict(attention="none"), dict(fcos_form="original")])
@pytest.mark.slow
def test_fcosis_learns_a_toy_batch(kw):
    """Guards the whole FCOSIS training path (targets, colouring, attention maps, segmentation
    passes, the padded-crop loss, backward): 40 Adam steps on one fixed batch (with an empty
    image) cut the total loss by more than half, every term stays finite, and the mask loss
    itself falls. Also without the top-down connection, and on the original FCOS (the [IS]
    config's detector)."""
    torch.manual_seed(0)
    first, losses = train_steps(build_model(tiny_fcosis(**kw)), *toy_instances())
    assert set(losses) == {"cls", "box", "centerness", "foreground", "com", "mask", "loss"}
    assert losses["loss"] < 0.5 * first["loss"], (first, losses)
    assert losses["mask"] < first["mask"]


def test_mask_threshold_is_each_methods_key():
    """Guards the one mask_threshold key: every mask method binarises at ModelConfig.mask_threshold,
    whose default is the method's own (0.4 CenterMask and CenterMask-FCOS [CM 3.5]; 0.5 MaskFCOS,
    Mask R-CNN's, and FCOSIS), and an explicit value reaches every method."""
    from model import ModelConfig
    assert ModelConfig(method="centermask").mask_threshold == 0.4
    for method, default in (("centermask_fcos", 0.4), ("maskfcos", 0.5), ("fcosis", 0.5)):
        assert build_model(tiny(method)).mask_threshold == default, method
        assert build_model(tiny(method, mask_threshold=0.3)).mask_threshold == 0.3, method
    with pytest.raises(ValueError, match="mask_threshold"):
        ModelConfig(method="centermask", mask_threshold=1.5)


def test_fcosis_mask_weighting_at_inference_by_hand():
    """Guards FCOSreg's weighting in FCOSIS at inference ([IS 3.3]: "supported by FCOSIS"): with
    reg_weights (1/3, 1/3, 1/3) the score is sqrt(cls * w), w = (ctr + fg + sqrt(ctr fg)) / 3, with
    fg the predicted coarse foreground. Two locations, cls = ctr = sigmoid(0) = 0.5:
      fg 0.8: w = (0.5 + 0.8 + sqrt(0.4)) / 3 = (1.3 + 0.632456) / 3 = 0.644152 -> sqrt(0.322076) = 0.567517
      fg 0.2: w = (0.5 + 0.2 + sqrt(0.1)) / 3 = (0.7 + 0.316228) / 3 = 0.338743 -> sqrt(0.169371) = 0.411547
    With the default (1, 0, 0), both are sqrt(0.5 * 0.5) = 0.5 whatever fg. A training step with
    the weighting is finite (the box loss weighted by w from the ground-truth masks)."""
    logit = lambda p: math.log(p / (1 - p))
    points = torch.tensor([[10.0, 10.0], [50.0, 50.0]])
    levels = torch.zeros(2, dtype=torch.long)
    out = {"cls": torch.zeros(1, 2, 3), "centerness": torch.zeros(1, 2), "ltrb": torch.full((1, 2, 4), 5.0),
           "extra": torch.tensor([[[0.0, 0.0, logit(0.8)], [0.0, 0.0, logit(0.2)]]]), "hw": [(1, 2)]}
    for weights, expect in (((1 / 3, 1 / 3, 1 / 3), [0.567517, 0.411547]), ((1.0, 0.0, 0.0), [0.5, 0.5])):
        model = build_model(tiny_fcosis(reg_weights=weights)).eval()
        det = model.detect(FCOSForward(out, [], points, levels, (64, 64)))[0]
        best = {tuple(b.tolist()): v.item() for b, v in zip(det["boxes"], det["scores"]) if det["labels"].numel()}
        assert best[(5.0, 5.0, 15.0, 15.0)] == pytest.approx(expect[0], abs=1e-5)
        assert best[(45.0, 45.0, 55.0, 55.0)] == pytest.approx(expect[1], abs=1e-5)
    model = build_model(tiny_fcosis(reg_weights=(1 / 3, 1 / 3, 1 / 3)))
    losses = model(*toy_instances())
    assert model.uses_masks and all(torch.isfinite(v) for v in losses.values())


def test_mu_learns_in_a_real_training_step():
    """Guards mu being a live parameter ([IS 3.2.1], Table 3b): in one FCOSIS training step on
    toy_instances, whose rectangles (40, 20, 90, 60) and L shape (60, 50, 110, 90) overlap,
    the assignment among the image's objects puts the neighbour's cells inside a box at -mu, so
    mu receives a gradient."""
    images, targets = toy_instances()
    torch.manual_seed(0)
    model = build_model(tiny_fcosis())
    model(images, targets)["loss"].backward()
    g = model.attention.mu.grad
    assert g is not None and g.abs().item() > 0, g


def test_fcosis_inference_and_teaching_maps():
    """Guards the inference contract (masks (K, H, W) in [0, 1], zero outside each box) and the
    teaching maps' keys and shapes ([IS] Fig. 2-4: centre-of-mass field as RGB on the P3 grid,
    coarse foreground, one attention map, colour groups and masks at input size)."""
    torch.manual_seed(0)
    model = build_model(tiny_fcosis(score_threshold=0.0, max_detections=6)).eval()
    images, _ = toy_instances()
    with torch.no_grad():
        out = model(images)
    for d in out:
        K = len(d["boxes"])
        assert 0 < K <= 6 and d["masks"].shape == (K, 96, 128)
        assert 0 <= d["masks"].min() and d["masks"].max() <= 1
        outside = ~boxes_inside(d["boxes"], 96, 128)       # (K, 96, 128) pixel centres outside each box
        assert outside.any(dim=(1, 2)).all()               # every box leaves pixels out: the crop is checked
        assert d["masks"][outside].max() == 0              # cropped to its box
    maps = teaching_maps(model)(images, score_threshold=0.0, k=4)
    assert not model.training  # the mode it was in is restored
    m = maps[0]
    assert set(m) == {"centre of mass field", "coarse foreground", "attention map", "colour groups", "masks"}
    assert m["centre of mass field"].shape == (12, 16, 3) and m["coarse foreground"].shape == (12, 16)
    assert m["attention map"].shape == (24, 32)          # built on the P2 grid (stride 4)
    assert m["colour groups"].shape == (96, 128) and m["colour groups"].dtype == torch.long
    assert m["colour groups"].max() >= 1 and m["masks"].shape == (96, 128)


def test_fcosis_empty_batch_keeps_every_parameter_in_the_graph():
    """Guards images with no objects (valid input) under DDP: a batch without any box gives finite
    losses and a gradient for every parameter (the segmentation branch included)."""
    model = build_model(tiny_fcosis())
    images, targets = toy_instances()
    losses = model(images, [targets[1], targets[1]])
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]


def test_hsv_field_colours():
    """Guards the angle colouring of the centre-of-mass field (Fig. 3): hue 0 -> red (1, 0, 0),
    1/3 -> green, 2/3 -> blue, value 0 -> black."""
    from pictures import hsv_to_rgb
    rgb = hsv_to_rgb(torch.tensor([[0.0, 1 / 3, 2 / 3, 0.5]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(rgb[0, :3], torch.eye(3), atol=1e-6)
    assert rgb[0, 3].tolist() == [0, 0, 0]
