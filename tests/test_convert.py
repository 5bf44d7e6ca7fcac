"""`python -m cascade.convert` and the safe weight loader: every accepted format, and clear errors (naming the
file and the problem, leaving nothing at DST) for every bad input."""
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _reference import build_reference, synthetic_images

torch = pytest.importorskip("torch")

from cascade import convert as convert_cli  # noqa: E402
from cascade.models import load_clip, tokenize  # noqa: E402
from cascade.models.weights import (CheckpointError, load_weights, read_checkpoint,  # noqa: E402
                                    save_weights)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small CLIP (OpenAI's code, seeded weights) as a torch state dict, plus inputs and its embeddings."""
    ref = build_reference("tiny-vit", seed=21)
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    images, tokens = synthetic_images(2, 64, seed=4), tokenize(["a photo of a dog", "a cat"])
    with torch.no_grad():
        want = ref.encode_image(torch.from_numpy(images)).numpy()
    return state, images, tokens, want


def _convert(src, dst, *extra):
    return convert_cli.main([str(src), str(dst), "-q", *extra])


def _jittor_pickle(obj, path):
    """The format of jt.save (pickle protocol 4 + sha1 + magic), written without jittor."""
    data = pickle.dumps(obj, 4)
    Path(path).write_bytes(data + hashlib.sha1(data).digest() + b"HCAJSLHD")


def _assert_fails(src, dst, capsys, *needles):
    code = _convert(src, dst)
    err = capsys.readouterr().err
    assert code == 2
    assert str(src) in err or str(dst) in err
    for needle in needles:
        assert needle in err, err
    assert not Path(dst).exists()
    assert not [p for p in Path(dst).parent.iterdir() if p.name.startswith(f".{Path(dst).name}.")]  # no temp
    return err


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("fmt", ["bare-fp32", "model-fp16", "state_dict-bf16", "legacy", "jittor-pkl",
                                 "jittor-pkl-of-torch", "plain-pkl", "safetensors", "converted"])
def test_every_format_converts_and_loads(fmt, tiny, tmp_path):
    state, images, tokens, want = tiny
    src = tmp_path / "src.bin"
    tol = 1e-4
    if fmt == "bare-fp32":
        torch.save(state, src)
    elif fmt == "model-fp16":
        torch.save({"model": {k: v.half() for k, v in state.items()}, "epoch": 3}, src)
        tol = 5e-2  # weights rounded to fp16
    elif fmt == "state_dict-bf16":
        torch.save({"state_dict": {k: v.bfloat16() for k, v in state.items()}}, src)
        tol = 5e-1  # weights rounded to bf16
    elif fmt == "legacy":
        torch.save(state, src, _use_new_zipfile_serialization=False)
    elif fmt == "jittor-pkl":
        from cascade.runtime import jittor

        jittor().save({k: v.numpy() for k, v in state.items()}, str(tmp_path / "src.pkl"))
        src = tmp_path / "src.pkl"
    elif fmt == "jittor-pkl-of-torch":  # jt.save of torch tensors, as the challenge baseline's ViT-B-32.pkl
        from cascade.runtime import jittor

        jittor().save({k: v.float().cpu() for k, v in state.items()}, str(tmp_path / "src.pkl"))
        src = tmp_path / "src.pkl"
    elif fmt == "plain-pkl":
        src.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}, 2))
    elif fmt == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    elif fmt == "converted":
        assert _convert(_save(state, tmp_path / "a.pt"), src) == 0
    dst = tmp_path / "out.npz"
    assert _convert(src, dst) == 0
    loaded, meta = load_weights(dst)
    assert meta["arch"] == "clip" and meta["format"] == "cascade-weights"
    assert meta["source"] == src.name and len(meta["source_sha256"]) == 64
    assert all(v.dtype == np.float32 for v in loaded.values())
    got = load_clip(dst).encode_image(images).numpy()
    assert np.abs(got - want).max() <= tol


def _save(state, path):
    torch.save(state, path)
    return path


def test_converted_weights_load_without_torch(tiny, tmp_path):
    state, images, _, want = tiny
    dst = tmp_path / "w.npz"
    assert _convert(_save(state, tmp_path / "w.pt"), dst) == 0
    np.save(tmp_path / "images.npy", images)
    code = f"""
import sys
sys.modules['torch'] = None  # any `import torch` now fails
import numpy as np
from cascade.models import load_clip
m = load_clip({str(dst)!r})
np.save({str(tmp_path / 'got.npy')!r}, m.encode_image(np.load({str(tmp_path / 'images.npy')!r})).numpy())
assert 'torch' not in sys.modules or sys.modules['torch'] is None
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert np.abs(np.load(tmp_path / "got.npy") - want).max() <= 1e-4


def test_save_and_load_round_trip(tmp_path):
    state = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "s": np.float32(2.5), "i": np.arange(3)}
    meta = save_weights(tmp_path / "x.npz", state, {"arch": "test", "config": {"n": [1, 2]}})
    loaded, meta2 = load_weights(tmp_path / "x.npz")
    assert meta2 == meta and meta["config"] == {"n": [1, 2]} and len(meta["sha256"]) == 64
    assert set(loaded) == set(state)
    for k in state:
        assert loaded[k].dtype == np.asarray(state[k]).dtype and np.array_equal(loaded[k], state[k])
    # plain numpy can read it (it is an npz), without pickle
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert np.array_equal(z["a"], state["a"])


def test_help_documents_sources_and_formats():
    out = subprocess.run([sys.executable, "-m", "cascade.convert", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True).stdout
    for needle in ("openaipublic.azureedge.net/clip/models/", "ViT-B-32.pt", "RN101.pt",
                   "dl.fbaipublicfiles.com/convnext/convnextv2/im1k/convnextv2_base_1k_224_ema.pt",
                   "TorchScript", "state_dict", "fp16", "ViT-B-32.pkl", "restricted unpickler"):
        assert needle in out


def test_cli_exit_status_and_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cascade.convert", str(tmp_path / "nope.pt"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cascade.convert: error: {tmp_path / 'nope.pt'}: file not found"
    assert not (tmp_path / "out.npz").exists()


# ------------------------------------------------------------------------------------------------ ConvNeXt
def _convnext_official_state(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), classes=10, seed=0):
    """Random weights with the names of Meta's ConvNeXt-V2 release."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(0, 0.02, size=shape).astype(np.float32)  # noqa: E731
    s = {"downsample_layers.0.0.weight": r(dims[0], 3, 4, 4), "downsample_layers.0.0.bias": r(dims[0]),
         "downsample_layers.0.1.weight": r(dims[0]), "downsample_layers.0.1.bias": r(dims[0])}
    for i in range(1, 4):
        s.update({f"downsample_layers.{i}.0.weight": r(dims[i - 1]), f"downsample_layers.{i}.0.bias": r(dims[i - 1]),
                  f"downsample_layers.{i}.1.weight": r(dims[i], dims[i - 1], 2, 2),
                  f"downsample_layers.{i}.1.bias": r(dims[i])})
    for i, (n, d) in enumerate(zip(depths, dims)):
        for j in range(n):
            p = f"stages.{i}.{j}."
            s.update({p + "dwconv.weight": r(d, 1, 7, 7), p + "dwconv.bias": r(d), p + "norm.weight": r(d),
                      p + "norm.bias": r(d), p + "pwconv1.weight": r(4 * d, d), p + "pwconv1.bias": r(4 * d),
                      p + "grn.gamma": r(1, 1, 1, 4 * d), p + "grn.beta": r(1, 1, 1, 4 * d),
                      p + "pwconv2.weight": r(d, 4 * d), p + "pwconv2.bias": r(d)})
    s.update({"norm.weight": r(dims[-1]), "norm.bias": r(dims[-1]), "head.weight": r(classes, dims[-1]),
              "head.bias": r(classes)})
    return s


def test_convnextv2_is_detected_and_dispatched(tmp_path, capsys):
    pytest.importorskip("cascade.models.convnextv2")
    state = _convnext_official_state()
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, tmp_path / "cnx.pt")
    assert _convert(tmp_path / "cnx.pt", tmp_path / "out/weights/cnx.npz") == 0    # a missing folder is made
    loaded, meta = load_weights(tmp_path / "out/weights/cnx.npz")
    assert meta["arch"] == "convnextv2" and meta["source_sha256"]
    assert set(loaded) == set(state)
    # a broken ConvNeXt checkpoint: its missing key is named, nothing is written
    del state["stages.2.0.grn.beta"]
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "bad.pt")
    _assert_fails(tmp_path / "bad.pt", tmp_path / "bad.npz", capsys, "stages.2.0.grn.beta", "missing")
    # the key a stage's width is read from: named alone, the width read from the stage's other arrays
    state = _convnext_official_state()
    del state["stages.1.0.dwconv.weight"]
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "bad2.pt")
    err = _assert_fails(tmp_path / "bad2.pt", tmp_path / "bad2.npz", capsys, "dims [8, 16, 32, 64]",
                        "missing keys (1): stages.1.0.dwconv.weight")
    assert "wrong shape" not in err


# ------------------------------------------------------------------------------------------------ bad inputs
def test_missing_file(tmp_path, capsys):
    _assert_fails(tmp_path / "ViT-B-32.pt", tmp_path / "out.npz", capsys, "file not found")
    assert _convert(tmp_path / "ViT-B-32.pt", tmp_path / "new/weights/out.npz") == 2    # a failed run makes no folder
    assert "file not found" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_directory_and_empty_and_text(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    # a folder as the destination is refused before the source is read (here it does not even exist)
    assert _convert(tmp_path / "none.pt", tmp_path / "d") == 2
    assert "destination is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")          # a file where the destination folder should be
    assert _convert(tmp_path / "none.pt", tmp_path / "file/w.npz") == 2
    assert "cannot make the destination folder" in capsys.readouterr().err
    _assert_fails(tmp_path / "d", tmp_path / "o1.npz", capsys, "is a directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    _assert_fails(tmp_path / "empty.pt", tmp_path / "o2.npz", capsys, "empty file")
    (tmp_path / "page.pt").write_text("<html><body>404 Not Found</body></html>")
    _assert_fails(tmp_path / "page.pt", tmp_path / "o3.npz", capsys, "not a checkpoint")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    _assert_fails(tmp_path / "other.zip", tmp_path / "o4.npz", capsys, "neither a PyTorch checkpoint")


def test_truncated_files(tiny, tmp_path, capsys):
    state = tiny[0]
    cases = {}
    torch.save(state, tmp_path / "zip.pt")
    cases["zip.pt"] = (tmp_path / "zip.pt").read_bytes()
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    cases["legacy.pt"] = (tmp_path / "legacy.pt").read_bytes()
    _jittor_pickle({k: v.numpy() for k, v in state.items()}, tmp_path / "j.pkl")
    cases["j.pkl"] = (tmp_path / "j.pkl").read_bytes()
    assert _convert(tmp_path / "zip.pt", tmp_path / "ours.npz") == 0
    cases["ours.npz"] = (tmp_path / "ours.npz").read_bytes()
    for name, data in cases.items():
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        _assert_fails(cut, tmp_path / f"out-{name}.npz", capsys, "truncated")
    # a flipped byte inside the Jittor pickle: its checksum catches it
    bad = bytearray(cases["j.pkl"])
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "flip.pkl").write_bytes(bytes(bad))
    _assert_fails(tmp_path / "flip.pkl", tmp_path / "flip.npz", capsys, "checksum mismatch")
    # a flipped byte inside a tensor of a PyTorch zip: torch reads it without a word, the zip's CRC-32 catches it
    with zipfile.ZipFile(tmp_path / "zip.pt") as z:
        info = max(z.infolist(), key=lambda i: i.file_size)           # the largest tensor's bytes (stored as is)
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    bad = bytearray(cases["zip.pt"])
    bad[start + info.file_size // 2] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(bad))
    _assert_fails(tmp_path / "flip.pt", tmp_path / "flip-pt.npz", capsys,
                  f"member {info.filename} fails its CRC-32 check")


def test_a_file_saved_without_checksums_converts(tiny, tmp_path):
    """torch can save without CRC-32s (its members then hold 0): the members' check leaves those alone."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes checksums")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(tiny[0], tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert _convert(tmp_path / "nocrc.pt", tmp_path / "w.npz") == 0


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    arrays = {"token_embedding.weight": np.zeros((2, 2), np.float32)}
    _jittor_pickle({**arrays, "evil": _Payload(marker)}, tmp_path / "evil.pkl")
    _assert_fails(tmp_path / "evil.pkl", tmp_path / "o1.npz", capsys, "unsafe pickle refused", "system")
    (tmp_path / "evil2.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    _assert_fails(tmp_path / "evil2.pkl", tmp_path / "o2.npz", capsys, "unsafe pickle refused")
    torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    _assert_fails(tmp_path / "evil.pt", tmp_path / "o3.npz", capsys, "unsafe PyTorch checkpoint refused")
    # an object array hidden in a numpy pickle is refused too
    (tmp_path / "obj.pkl").write_bytes(pickle.dumps({"w": np.array([_Payload(marker)], dtype=object)}))
    _assert_fails(tmp_path / "obj.pkl", tmp_path / "o4.npz", capsys, "unsafe pickle refused")
    assert not marker.exists()


def test_unknown_architecture(tmp_path, capsys):
    torch.save({"encoder.layer.0.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "x.pt")
    _assert_fails(tmp_path / "x.pt", tmp_path / "o.npz", capsys, "unknown architecture", "encoder.layer.0.weight")
    assert _convert(tmp_path / "x.pt", tmp_path / "o.npz", "--arch", "clip") == 2
    assert "not a CLIP checkpoint" in capsys.readouterr().err


def test_not_a_state_dict(tmp_path, capsys):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    _assert_fails(tmp_path / "list.pt", tmp_path / "o.npz", capsys, "not a dict of arrays")
    torch.save({"w": torch.zeros(2), "name": "resnet"}, tmp_path / "mixed.pt")
    _assert_fails(tmp_path / "mixed.pt", tmp_path / "o.npz", capsys, "not numeric arrays: name (str)")


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path, capsys):
    state = dict(tiny[0])
    del state["visual.ln_post.weight"], state["transformer.resblocks.1.mlp.c_fc.bias"]
    state["visual.head.weight"] = torch.zeros(3)
    state["ln_final.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "bad.pt")
    err = _assert_fails(tmp_path / "bad.pt", tmp_path / "o.npz", capsys,
                        "missing keys (2): transformer.resblocks.1.mlp.c_fc.bias, visual.ln_post.weight",
                        "unexpected keys (1): visual.head.weight", "ln_final.bias (7,) != (64,)")
    assert err.count("\n") == 1  # one line
    state = dict(tiny[0])
    del state["ln_final.weight"]            # one of the keys that tell a CLIP: named, not "not a CLIP checkpoint"
    torch.save(state, tmp_path / "bad2.pt")
    _assert_fails(tmp_path / "bad2.pt", tmp_path / "o2.npz", capsys,
                  "incomplete CLIP checkpoint: missing key(s) ln_final.weight")


def test_failed_conversion_keeps_previous_output(tiny, tmp_path, capsys):
    dst = tmp_path / "w.npz"
    assert _convert(_save(tiny[0], tmp_path / "good.pt"), dst) == 0
    before = dst.read_bytes()
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    assert _convert(tmp_path / "bad.pt", dst) == 2
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "good.pt", "w.npz"]


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def exploding(f, arr, allow_pickle=False):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(f, arr, allow_pickle=allow_pickle)

    real = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", exploding)
    with pytest.raises(OSError):
        save_weights(tmp_path / "w.npz", {"a": np.zeros(3), "b": np.ones(3)}, {})
    assert list(tmp_path.iterdir()) == []


def test_loader_errors(tmp_path, tiny):
    torch.save(tiny[0], tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"raw\.pt: is a torch-zip file, not converted weights.*convert"):
        load_weights(tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match="file not found"):
        read_checkpoint(tmp_path / "none.npz")
    with zipfile.ZipFile(tmp_path / "obj.npz", "w") as z:  # an npz whose array needs pickle
        with z.open("w.npy", "w") as f:
            np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"obj\.npz: corrupt weights archive .*pickle"):
        read_checkpoint(tmp_path / "obj.npz")
    # load_clip reads unconverted checkpoints as well, and says when a file holds another architecture
    assert load_clip(tmp_path / "raw.pt").embed_dim == 32
    save_weights(tmp_path / "cnx.npz", {"a": np.zeros(2)}, {"arch": "convnextv2"})
    with pytest.raises(CheckpointError, match="convnextv2 model, not CLIP"):
        load_clip(tmp_path / "cnx.npz")
