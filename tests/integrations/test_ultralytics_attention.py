"""Attention inside Ultralytics models is pruned, not left whole: YOLO11/YOLOv10 PSA attention and every layer
of RT-DETR's decoder (self-attention, deformable cross-attention, FFN, hidden width). Yaml models, random
init, 64x64 images."""
import warnings

import numpy as np
import pytest
import torch

import structprune as tp
from oracle import silence_consumers
from structprune.integrations import ultralytics as tpu
from yolo_data import make_dataset, model_yaml

IMGSZ = 64
RUN = dict(imgsz=IMGSZ, batch=2, workers=0, plots=False, amp=False, device="cpu", verbose=False)


# RT-DETR-l's modules at a fraction of its size (a 5-conv backbone, AIFI, a 2-layer decoder of width 64 with
# 4 heads and an FFN of 128), for the tests that train or that RT-DETR-l's 33M parameters would only slow
TINY_RTDETR = """nc: 2
backbone:
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [32, 3, 2]]
  - [-1, 1, Conv, [32, 3, 2]]
  - [-1, 1, Conv, [64, 3, 2]]
  - [-1, 1, Conv, [64, 3, 2]]
head:
  - [-1, 1, AIFI, [128, 4]]
  - [[2, 3, 5], 1, RTDETRDecoder, [nc, 64, 30, 4, 4, 2, 128]]
"""


def _load(name):
    from ultralytics import RTDETR, YOLO

    torch.manual_seed(0)
    return (RTDETR if "rtdetr" in str(name) else YOLO)(name)


def _tiny_rtdetr(folder):
    path = folder / "rtdetr-tiny.yaml"
    path.write_text(TINY_RTDETR)
    return path


def _prune_quietly(yolo, **kwargs):
    """Prune at 0.5; returns the summary and the integration's own warnings ('left unpruned: ...')."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, summary = tpu.prune(yolo, ratio=0.5, imgsz=IMGSZ, **kwargs)
    return summary, [str(w.message) for w in caught if "structprune.integrations.ultralytics" in str(w.message)]


@pytest.mark.parametrize("name,path", [("yolo11n.yaml", "model.10.m.0.attn"), ("yolov10n.yaml", "model.10.attn")])
def test_psa_attention_narrows_its_heads_with_the_qkv_split_pe_and_proj(name, path):
    yolo = _load(name)
    attn = yolo.model.get_submodule(path)
    heads, key_dim, head_dim = attn.num_heads, attn.key_dim, attn.head_dim
    assert attn.qkv.conv.out_channels == heads * (2 * key_dim + head_dim)
    summary, ours = _prune_quietly(yolo)
    assert ours == [] and f"{path}.qkv.conv" not in summary.kept
    assert summary.params_after < 0.3 * summary.params_before
    # every head keeps its place and loses half its q/k dims and half its v dims
    assert (attn.num_heads, attn.key_dim, attn.head_dim) == (heads, key_dim // 2, head_dim // 2)
    width = heads * attn.head_dim
    assert attn.qkv.conv.weight.shape[0] == heads * (2 * attn.key_dim + attn.head_dim)
    assert attn.proj.conv.weight.shape[1] == width
    assert attn.pe.conv.weight.shape == (width, 1, 3, 3) and attn.pe.conv.groups == width
    assert attn.scale == attn.key_dim ** -0.5
    x = torch.randn(2, attn.qkv.conv.in_channels, 4, 4)
    with torch.no_grad():
        assert attn.eval()(x).shape == (2, attn.proj.conv.out_channels, 4, 4)


def test_prune_num_heads_says_psa_keeps_its_heads_and_narrows_them():
    yolo = _load("yolov10n.yaml")
    attn = yolo.model.get_submodule("model.10.attn")
    heads, head_dim = attn.num_heads, attn.head_dim
    with pytest.warns(UserWarning, match=r"prune_num_heads keeps the heads of model\.10\.attn \(PSA attention"):
        tpu.prune(yolo, ratio=0.5, imgsz=IMGSZ, prune_num_heads=True, head_pruning_ratio=0.5)
    assert (attn.num_heads, attn.head_dim) == (heads, head_dim // 2)


def _psa_net():
    """in conv -> PSABlock (2 heads: q/k 16, v 32 per head) -> out conv, so the residual width can follow v."""
    from ultralytics.nn.modules.block import PSABlock
    from ultralytics.nn.modules.conv import Conv

    torch.manual_seed(0)
    return torch.nn.Sequential(Conv(8, 64, 1), PSABlock(64, attn_ratio=0.5, num_heads=2), Conv(64, 8, 1)).eval()


def test_psa_qkv_split_is_respected_and_uneven_heads_are_refused():
    net = _psa_net()
    qkv = net[1].attn.qkv.conv  # rows per head: 16 of q, 16 of k, 32 of v
    graph = tp.DependencyGraph().build_dependency(net, torch.randn(1, 8, 4, 4))
    # q dim 3 of each head takes the same k dim along (they meet in q^T k), nothing else
    group = graph.get_pruning_group(qkv, tp.prune_conv_out_channels, [3, 67])
    assert sorted(group[0].idxs) == [3, 19, 67, 83] and graph.check_pruning_group(group)
    # one head's q dim alone would leave the heads uneven: refused, nothing changes
    assert not graph.check_pruning_group(graph.get_pruning_group(qkv, tp.prune_conv_out_channels, [3]))
    # v dims go with the positional-encoding conv and proj's inputs
    group = graph.get_pruning_group(qkv, tp.prune_conv_out_channels, [40, 104])
    layers = {(graph._name(item.dep.target.module), item.side.name) for item in group}
    assert {("1.attn.pe.conv", "OUT"), ("1.attn.proj.conv", "IN")} <= layers


def test_psa_narrowing_is_lossless_once_the_removed_channels_are_silenced():
    """Silence what a 25% step will take (q/k dims, v dims with pe and proj, the residual width the output
    view reads v's width from, the FFN), so those channels are the weakest; the step must not move the output."""
    net = _psa_net()
    attn = net[1].attn
    x = torch.randn(2, 8, 4, 4)
    graph = tp.DependencyGraph().build_dependency(net, x)
    qk = [head * 64 + i for head in range(2) for i in (*range(4), *range(16, 20))]
    v = [head * 64 + 32 + i for head in range(2) for i in range(8)]
    ffn = net[1].ffn[0].conv
    for layer, idxs in ((attn.qkv.conv, qk), (attn.qkv.conv, v), (net[0].conv, list(range(16))), (ffn, list(range(32)))):
        silence_consumers(graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs), producers=True)
    scale = attn.scale
    with torch.no_grad():
        before = net(x)
    pruner = tp.pruner.BasePruner(net, x, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.25,
                                   ignored_layers=[net[2].conv])  # its outputs are the model's
    pruner.step()
    assert (attn.num_heads, attn.key_dim, attn.head_dim) == (2, 12, 24)
    assert attn.qkv.conv.weight.shape[0] == 2 * (2 * 12 + 24) and attn.pe.conv.weight.shape[0] == 48
    assert net[0].conv.out_channels == 48
    assert attn.scale == 12 ** -0.5  # recomputed as Attention.__init__ does
    attn.scale = scale  # with the old scale the removal itself is exact
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


class _DeformableAttention(torch.nn.Module):
    """RT-DETR's MSDeformAttn (4 heads of 8 value dims, 2 levels x 2 points) over fixed boxes and levels."""

    def __init__(self):
        super().__init__()
        from ultralytics.nn.modules.transformer import MSDeformAttn

        self.attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
        torch.nn.init.normal_(self.attn.sampling_offsets.weight, std=0.1)  # the init zeroes them
        torch.nn.init.normal_(self.attn.attention_weights.weight, std=0.5)
        self.register_buffer("boxes", torch.rand(1, 5, 1, 4) * 0.5 + 0.25)

    def forward(self, query, value):
        return self.attn(query, self.boxes, value, [(4, 4), (2, 2)])


@pytest.mark.parametrize("case", ["head dims", "whole heads"])
def test_deformable_attention_removal_is_lossless_with_offsets_and_weights_per_head(case):
    from oracle import assert_lossless

    torch.manual_seed(0)
    net = _DeformableAttention().eval()
    attn = net.attn
    inputs = (torch.randn(1, 5, 32), torch.randn(1, 20, 32))
    # value_proj: head h holds dims 8h..8h+7; dim 2 of every head, or all of head 1
    idxs = [8 * head + 2 for head in range(4)] if case == "head dims" else list(range(8, 16))
    group = assert_lossless(net, inputs, attn.value_proj, idxs)
    layers = {(item.dep.target.module, item.side.name): len(item.idxs) for item in group}
    if case == "head dims":
        assert (attn.n_heads, attn.d_model) == (4, 28)
        assert (attn.sampling_offsets, "OUT") not in layers and attn.sampling_offsets.out_features == 32
    else:
        # the head's sampling offsets (2 levels x 2 points x xy) and attention weights go with its values
        assert layers[(attn.sampling_offsets, "OUT")] == 8 and layers[(attn.attention_weights, "OUT")] == 4
        assert (attn.n_heads, attn.d_model) == (3, 24)
        assert attn.sampling_offsets.out_features == 24 and attn.attention_weights.out_features == 12
    assert attn.value_proj.out_features == attn.output_proj.in_features == attn.d_model


def test_deformable_attention_refuses_uneven_heads_and_single_coordinates():
    net = _DeformableAttention().eval()
    attn = net.attn
    graph = tp.DependencyGraph().build_dependency(net, (torch.randn(1, 5, 32), torch.randn(1, 20, 32)))
    # one value dim of one head: the heads would differ in size
    assert not graph.check_pruning_group(graph.get_pruning_group(attn.value_proj, tp.prune_linear_out_channels, [2]))
    # the x offset of a sampling point without its y (nor its weight, nor its head)
    assert not graph.check_pruning_group(
        graph.get_pruning_group(attn.sampling_offsets, tp.prune_linear_out_channels, [0]))


def test_rtdetr_decoder_layers_narrow_and_its_training_forward_runs():
    yolo = _load("rtdetr-l.yaml")
    model = yolo.model
    head = model.model[-1]
    hidden, ffn = head.hidden_dim, head.decoder.layers[0].linear1.out_features
    inputs = tpu.make_example_inputs(model, IMGSZ)
    shapes = [t.shape for t in tpu.head_outputs(model.eval(), inputs)]
    summary, ours = _prune_quietly(yolo)
    assert ours == [] and not any(".decoder." in path for path in summary.kept)
    assert summary.params_after < 0.3 * summary.params_before
    assert [t.shape for t in tpu.head_outputs(model.eval(), inputs)] == shapes
    width = head.enc_output[0].out_features
    assert width == hidden // 2 == head.hidden_dim == head.decoder.hidden_dim
    assert head.denoising_class_embed.weight.shape == (head.nc, width)
    # the image features the cross-attention samples (input_proj) narrow as well
    assert all(projection[0].out_channels == hidden // 2 for projection in head.input_proj)
    assert all(scores.in_features == width for scores in head.dec_score_head)
    for layer in head.decoder.layers:
        attn, cross = layer.self_attn, layer.cross_attn
        assert attn.embed_dim == width and attn.in_proj_weight.shape == (3 * width, width)
        assert attn.num_heads * attn.head_dim == width
        # deformable cross-attention: each head's value dims narrow; offsets and weights keep every head
        assert cross.d_model == cross.value_proj.out_features == cross.output_proj.in_features == hidden // 2
        assert cross.n_heads == head.nhead
        points = cross.n_levels * cross.n_points
        assert cross.sampling_offsets.weight.shape == (cross.n_heads * points * 2, width)
        assert cross.attention_weights.weight.shape == (cross.n_heads * points, width)
        assert layer.linear1.out_features == layer.linear2.in_features == ffn // 2
    # training: auxiliary scores of every decoder layer and the denoising queries (class embeddings)
    from ultralytics.models.utils.loss import RTDETRDetectionLoss

    model.train()
    model.criterion = RTDETRDetectionLoss(nc=head.nc, use_vfl=True)
    batch = {"img": inputs, "cls": torch.tensor([[0.0], [1.0]]), "batch_idx": torch.tensor([0.0, 0.0]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])}
    loss, _ = model.loss(batch)
    assert torch.isfinite(loss).all()
    dec_bboxes, dec_scores, _, _, dn_meta = model.predict(inputs, batch={**batch, "gt_groups": [2],
                                                                       "cls": batch["cls"].long().view(-1),
                                                                       "batch_idx": batch["batch_idx"].long()})
    assert dn_meta is not None and dec_scores.shape[0] == head.num_decoder_layers


def test_rtdetr_whole_cross_attention_heads_go_with_their_offsets_and_weights(tmp_path):
    yolo = _load(_tiny_rtdetr(tmp_path))
    head = yolo.model.model[-1]
    cross = head.decoder.layers[0].cross_attn
    heads, head_dim, points = cross.n_heads, cross.d_model // cross.n_heads, cross.n_levels * cross.n_points
    summary, _ = _prune_quietly(yolo, prune_num_heads=True, head_pruning_ratio=0.5)
    for layer in head.decoder.layers:
        cross = layer.cross_attn
        assert cross.n_heads == heads // 2 and cross.d_model == cross.n_heads * head_dim
        assert cross.value_proj.out_features == cross.output_proj.in_features == cross.d_model
        assert cross.sampling_offsets.out_features == cross.n_heads * points * 2
        assert cross.attention_weights.out_features == cross.n_heads * points
    assert summary.pruner.num_heads[head.decoder.layers[0].cross_attn.value_proj] == heads // 2
    inputs = tpu.make_example_inputs(yolo.model, IMGSZ)
    with torch.no_grad():
        decoded, _ = yolo.model.eval()(inputs)
    assert decoded.shape == (1, head.num_queries, 6)


# the tiny RT-DETR keeps more: its last backbone conv feeds AIFI's position embedding and stays whole
@pytest.mark.parametrize("name,most_left", [("yolo11n.yaml", 0.3), ("rtdetr-tiny", 0.4)])
def test_pruned_attention_models_predict_validate_and_train(tmp_path, name, most_left):
    from ultralytics import RTDETR, YOLO

    load = RTDETR if "rtdetr" in name else YOLO
    data = make_dataset(tmp_path / "data", "detect")
    torch.manual_seed(0)
    yolo = load(_tiny_rtdetr(tmp_path) if name == "rtdetr-tiny" else model_yaml(tmp_path, name, nc=2))
    summary, ours = _prune_quietly(yolo)
    assert ours == [] and summary.params_after < most_left * summary.params_before
    path = tmp_path / "pruned.pt"
    yolo.save(path)

    image = np.full((IMGSZ, IMGSZ, 3), 120, np.uint8)
    image[10:40, 20:50] = (230, 40, 40)
    result = load(path).predict(image, imgsz=IMGSZ, conf=0.0, verbose=False)[0]
    assert result.boxes.data.shape[1] == 6 and len(result.boxes) > 0
    metrics = load(path).val(data=str(data), project=str(tmp_path / "runs"), name="val", **RUN)
    assert 0.0 <= metrics.box.map <= 1.0
    tuned = load(path)
    before = {n: p.detach().clone() for n, p in tuned.model.named_parameters()}
    tuned.train(data=str(data), epochs=1, project=str(tmp_path / "runs"), name="ft", trainer=tpu.trainer(tuned), **RUN)
    assert sum(p.numel() for p in tuned.model.parameters()) == summary.params_after
    decoder = [n for n in before if ".decoder." in n or ".attn." in n]
    assert decoder and any(not torch.equal(tuned.model.get_parameter(n).detach().float(), before[n].float())
                           for n in decoder)
