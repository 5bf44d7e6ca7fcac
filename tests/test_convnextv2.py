"""ConvNeXt-V2 in Jittor: name mapping, conversion errors, size inference, and parity with timm's
``convnextv2_*`` (the PyTorch reference) on seeded random weights, at the real Base size after conversion of
a checkpoint saved in the official ``{'model': state_dict}`` form."""
from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from cascade.runtime import jittor  # noqa: E402  (before any jittor import)

jt = jittor()
from cascade.models import convnextv2 as cnx  # noqa: E402


# --------------------------------------------------------------------------------- reference helpers
def official_to_timm(key: str) -> str:
    """Official ConvNeXt-V2 name -> timm name (written independently of cascade's timm_to_official)."""
    m = re.match(r"downsample_layers\.0\.(\d+)\.(.*)", key)
    if m:
        return f"stem.{m.group(1)}.{m.group(2)}"
    m = re.match(r"downsample_layers\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        return f"stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}"
    m = re.match(r"stages\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", key)
    if m:
        i, j, mod, p = m.groups()
        name = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
                "grn": "mlp.grn"}[mod]
        p = {"gamma": "weight", "beta": "bias"}.get(p, p) if mod == "grn" else p
        return f"stages.{i}.blocks.{j}.{name}.{p}"
    if key.startswith("norm."):
        return "head.norm." + key[5:]
    if key.startswith("head."):
        return "head.fc." + key[5:]
    raise KeyError(key)


def official_from_timm(timm_sd: dict, depths, dims) -> dict[str, np.ndarray]:
    """timm state dict -> the official release's names and shapes (the inverse of official_to_timm)."""
    official = {}
    lines = [f"downsample_layers.0.0.{p}" for p in ("weight", "bias")]
    lines += [f"downsample_layers.0.1.{p}" for p in ("weight", "bias")]
    for i in range(1, len(dims)):
        lines += [f"downsample_layers.{i}.{m}.{p}" for m in (0, 1) for p in ("weight", "bias")]
    for i, n in enumerate(depths):
        for j in range(n):
            lines += [f"stages.{i}.{j}.{m}.{p}" for m in ("dwconv", "norm", "pwconv1", "pwconv2")
                      for p in ("weight", "bias")]
            lines += [f"stages.{i}.{j}.grn.gamma", f"stages.{i}.{j}.grn.beta"]
    lines += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    for k in lines:
        v = timm_sd[official_to_timm(k)]
        if ".grn." in k:
            v = v.reshape(1, 1, 1, -1)  # timm keeps GRN as [C]
        elif ".pwconv" in k and v.ndim == 4:
            v = v.reshape(v.shape[:2])  # timm's small models use 1x1 convs (conv_mlp) for the MLP
        official[k] = v
    assert len(official) == len(timm_sd)
    return official


def seeded_timm(name: str, seed: int = 0):
    """timm model with its own init, then norms and GRN perturbed so that they are not identities."""
    torch.manual_seed(seed)
    model = timm.create_model(f"convnextv2_{name}", pretrained=False).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if ".grn." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "norm" in k and k.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.2)
            elif k.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def timm_numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def timm_outputs(model, x: np.ndarray):
    with torch.no_grad():
        xt = torch.from_numpy(x)
        feats = model.forward_head(model.forward_features(xt), pre_logits=True).numpy()
        logits = model(xt).numpy()
    return feats, logits


def jittor_outputs(model, x: np.ndarray):
    with jt.no_grad():
        return model.forward_features(x).numpy(), model(x).numpy()


@pytest.fixture(scope="module")
def atto():
    model = seeded_timm("atto", seed=3)
    return model, timm_numpy_state(model)


# ------------------------------------------------------------------------------------------- mapping
def test_timm_names_map_to_official_and_back(atto):
    _, timm_sd = atto
    state, meta = cnx.convert_state_dict(timm_sd)
    assert meta["arch"] == "convnextv2" and meta["source_naming"] == "timm"
    assert meta["config"] == {"name": "atto", "depths": [2, 2, 6, 2], "dims": [40, 80, 160, 320],
                              "num_classes": 1000, "in_chans": 3}
    shapes = cnx.expected_shapes(meta["config"])
    assert set(state) == set(shapes)
    assert all(state[k].shape == shapes[k] and state[k].dtype == np.float32 for k in state)
    assert state["stages.1.0.grn.gamma"].shape == (1, 1, 1, 320)
    # both directions agree: cascade's timm->official equals the test's independent official->timm inverse
    reference = official_from_timm(timm_sd, [2, 2, 6, 2], [40, 80, 160, 320])
    assert set(reference) == set(state)
    for k in state:
        np.testing.assert_array_equal(state[k], reference[k])
    for k, v in timm_sd.items():
        ok, ov = cnx.timm_to_official(k, v)
        assert official_to_timm(ok) == k and ov.size == v.size


def test_official_names_prefixes_and_nesting(atto):
    _, timm_sd = atto
    official = official_from_timm(timm_sd, [2, 2, 6, 2], [40, 80, 160, 320])
    for variant in (official, {"model": official}, {f"module.{k}": v for k, v in official.items()},
                    {"state_dict": {f"model.{k}": v.astype(np.float16) for k, v in official.items()}}):
        state, meta = cnx.convert_state_dict(variant)
        assert meta["source_naming"] == "official" and meta["config"]["name"] == "atto"
        assert set(state) == set(official)
        assert all(v.dtype == np.float32 for v in state.values())


def test_conversion_errors_list_the_keys(atto):
    _, timm_sd = atto
    official = official_from_timm(timm_sd, [2, 2, 6, 2], [40, 80, 160, 320])
    broken = dict(official)
    del broken["stages.2.3.pwconv1.bias"]
    broken["decoder.pred.weight"] = np.zeros(3, np.float32)
    broken["stages.0.0.grn.gamma"] = np.zeros((1, 1, 1, 7), np.float32)
    with pytest.raises(ValueError) as err:
        cnx.convert_state_dict(broken)
    msg = str(err.value)
    assert "missing keys (1): stages.2.3.pwconv1.bias" in msg
    assert "unexpected keys (1): decoder.pred.weight" in msg
    assert "stages.0.0.grn.gamma (1, 1, 1, 7)" in msg
    with pytest.raises(ValueError, match="not a ConvNeXt-V2 state dict"):
        cnx.convert_state_dict({"conv1.weight": np.zeros((3, 3, 3, 3), np.float32)})


@pytest.mark.parametrize("name", list(cnx.CONFIGS))
def test_size_is_inferred_from_weight_shapes(name):
    depths, dims = cnx.CONFIGS[name]
    cfg = {"depths": list(depths), "dims": list(dims), "num_classes": 21, "in_chans": 3}
    fake = {k: np.broadcast_to(np.float32(0), s) for k, s in cnx.expected_shapes(cfg).items()}
    assert cnx.config_from_state(fake) == dict(cfg, name=name)


# ------------------------------------------------------------------------------------------- parity
def test_small_model_parity_fast_and_differentiable_paths(atto):
    model, timm_sd = atto
    state, _ = cnx.convert_state_dict(timm_sd)
    ours = cnx.model_from_state(state)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 96)).astype(np.float32)
    ref_f, ref_l = timm_outputs(model, x)
    f, lo = jittor_outputs(ours, x)  # inference path (C++ depthwise kernel)
    assert f.shape == (2, 320) and lo.shape == (2, 1000)
    assert np.abs(f - ref_f).max() <= 1e-4 and np.abs(lo - ref_l).max() <= 1e-4
    lo_grad = ours(x).numpy()  # gradient-capable path (Jittor's convolution)
    assert np.abs(lo_grad - ref_l).max() <= 1e-4
    # gradients flow through the differentiable path (Jittor's eval() stops parameter gradients)
    ours.train()
    loss = ours(jt.array(x)).sum()
    g = jt.grad(loss, ours.stages[0][0].dwconv.weight)
    assert float(jt.abs(g).sum().item()) > 0


def test_base_parity_after_official_checkpoint_conversion(tmp_path):
    from cascade.convert import convert
    from cascade.models import load_convnextv2

    model = seeded_timm("base", seed=0)
    official = official_from_timm(timm_numpy_state(model), [3, 3, 27, 3], [128, 256, 512, 1024])
    # the official release's layout: {'model': state_dict} with official names, saved by torch
    ckpt = tmp_path / "convnextv2_base_1k_224_ema.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, ckpt)
    meta = convert(ckpt, tmp_path / "convnextv2_base.npz", quiet=True)
    assert meta["arch"] == "convnextv2" and meta["config"]["name"] == "base"
    ours = load_convnextv2(tmp_path / "convnextv2_base.npz")
    assert (ours.depths, ours.dims, ours.num_features) == ((3, 3, 27, 3), (128, 256, 512, 1024), 1024)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref_f, ref_l = timm_outputs(model, x)
    f, lo = jittor_outputs(ours, x)
    assert f.shape == (2, 1024) and lo.shape == (2, 1000)
    assert np.abs(ref_l).max() > 0.1 and np.abs(ref_f).max() > 0.5  # non-trivial outputs
    assert np.abs(f - ref_f).max() <= 1e-4, np.abs(f - ref_f).max()
    assert np.abs(lo - ref_l).max() <= 1e-4, np.abs(lo - ref_l).max()
    # the same graph run twice: equal on the CPU; on a GPU float32 kernels may sum in another order (test_clip)
    np.testing.assert_allclose(ours.encode_image(x).numpy(), f, atol=1e-5)
