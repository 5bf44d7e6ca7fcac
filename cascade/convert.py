"""``python -m cascade.convert SRC DST``: turn a released checkpoint into weights that load without torch.

Reads SRC in any format :func:`cascade.models.weights.read_checkpoint` understands, recognises the architecture
from the parameter names (CLIP or ConvNeXt-V2, or as told by ``--arch``), checks that every parameter fits the
model, and writes DST atomically in our own non-pickle format (an npz with JSON metadata). This is the only
command that imports torch, and only when SRC is a PyTorch file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cascade.io import os_problem
from cascade.models.weights import CheckpointError, detect_format, read_checkpoint, save_weights, sha256_file

ARCHES = ("clip", "convnextv2")

DESCRIPTION = """\
Convert a released checkpoint (CLIP or ConvNeXt-V2) into Jittor weights that load without torch, after checking
that every parameter fits the model. DST is written atomically in a non-pickle format (npz + JSON metadata).

Accepted SRC formats (recognised from the file's bytes, not its name):
  * OpenAI's CLIP TorchScript archives (ViT-B-32.pt, RN101.pt, RN50.pt, ViT-B-16.pt, ViT-L-14.pt, ...)
  * PyTorch state dicts saved with torch.save, fp16/fp32/bf16, bare or under a 'model' or 'state_dict' key
    (read with torch.load(weights_only=True): the file cannot run code)
  * Jittor pickles of a dict of arrays (jt.save), e.g. the Jittor challenge baseline's ViT-B-32.pkl, read by a
    restricted unpickler that only rebuilds numpy arrays (anything else is refused)
  * safetensors files, and weights already converted by this command

Where the official checkpoints come from (download them on a machine with internet access; the folder in
OpenAI's URLs is the file's SHA-256, which convert prints and records so you can check the download):
  CLIP ViT-B/32  https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt
  CLIP RN101     https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt
                 (OpenAI's release, github.com/openai/CLIP, clip/clip.py's _MODELS table; other sizes
                 such as RN50, ViT-B/16 and ViT-L/14 load too)
  ConvNeXt-V2-Base, ImageNet-1k fine-tuned, 224px, EMA weights (Meta's release,
                 github.com/facebookresearch/ConvNeXt-V2; timm's parameter names are accepted too)
                 https://dl.fbaipublicfiles.com/convnext/convnextv2/im1k/convnextv2_base_1k_224_ema.pt

Examples:
  python -m cascade.convert ViT-B-32.pt out/weights/ViT-B-32.npz
  python -m cascade.convert RN101.pt out/weights/RN101.npz
  python -m cascade.convert convnextv2_base_1k_224_ema.pt out/weights/convnextv2_base.npz

Exit status: 0 on success; 2 with a one-line reason on stderr otherwise (DST is then left untouched)."""

def detect_arch(state: dict) -> str | None:
    """'clip', 'convnextv2' or None, from parameter names alone."""
    keys = [k.split("module.", 1)[-1] if k.startswith("module.") else k for k in state]
    keyset = set(keys)
    if {"token_embedding.weight", "text_projection"} <= {k.split("model.", 1)[-1] for k in keyset}:
        return "clip"
    if any(".grn." in k or k.endswith("grn.gamma") or k.endswith("grn.weight") for k in keys) and \
            any(("dwconv" in k) or ("conv_dw" in k) for k in keys):
        return "convnextv2"
    return None


def _check_destination(dst: Path) -> None:
    """Fail before any work when ``dst``'s folder cannot be made or written: checked through the nearest folder
    above it that exists, which is not changed."""
    p = dst.parent
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"cannot make the destination folder {dst.parent}: {p} is a file", dst)
    if not os.access(p, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write into {p} (no permission, or a read-only file system)", dst)


def convert(src: str | Path, dst: str | Path, arch: str = "auto", quiet: bool = False) -> dict:
    """Convert ``src`` to our format at ``dst``; returns the stored metadata. Raises CheckpointError."""
    src, dst = Path(src), Path(dst)

    def say(msg):
        if not quiet:
            print(f"[convert] {msg}", file=sys.stderr, flush=True)

    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise CheckpointError("refusing to overwrite the source with its conversion (DST is SRC)", dst)
    if dst.is_dir():
        raise CheckpointError("destination is a directory", dst)
    _check_destination(dst)     # before the (long) read of the source; nothing is made until it is read
    t0 = time.perf_counter()
    fmt = detect_format(src)
    say(f"reading {src} ({fmt}, {src.stat().st_size / 2**20:.1f} MiB)")
    state = read_checkpoint(src)
    found = detect_arch(state)
    if arch == "auto":
        if found is None:
            sample = ", ".join(sorted(state)[:6])
            raise CheckpointError(f"unknown architecture: the {len(state)} parameter names look like neither CLIP "
                                  f"nor ConvNeXt-V2 (e.g. {sample}); pass --arch if you are sure", src)
        arch = found
    if arch == "clip":
        # lazy: the architecture modules import Jittor, which the rest of the CLI never needs at start-up
        from cascade.models.clip import convert_state_dict
        state, meta = convert_state_dict(state, src)
    elif arch == "convnextv2":
        try:
            from cascade.models.convnextv2 import convert_state_dict as convnext_convert
        except ModuleNotFoundError as exc:
            if exc.name != "cascade.models.convnextv2":
                raise
            raise CheckpointError("ConvNeXt-V2 support (cascade.models.convnextv2) is not installed", src) from None
        try:
            state, meta = convnext_convert(state)
        except CheckpointError:
            raise
        except (ValueError, KeyError) as exc:
            raise CheckpointError(str(exc.args[0] if exc.args else exc), src) from None
        meta = dict(meta)
        meta.setdefault("arch", "convnextv2")
    else:
        raise CheckpointError(f"unknown architecture {arch!r} (known: {', '.join(ARCHES)})", src)
    say(f"{meta.get('model', arch)}: {len(state)} arrays, {sum(v.size for v in state.values()) / 1e6:.1f}M "
        "parameters; hashing the source")
    meta.update(source=src.name, source_format=fmt, source_sha256=sha256_file(src))
    try:        # a missing folder such as out/weights/ is made
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot make the destination folder {dst.parent}: {os_problem(exc)}", dst) from None
    stored = save_weights(dst, state, meta)
    say(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
    return stored


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m cascade.convert", description=DESCRIPTION,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="checkpoint to read (see the accepted formats above)")
    parser.add_argument("dst", metavar="DST",
                        help="where to write the converted weights (e.g. out/weights/RN101.npz, where the default "
                             "configuration reads them; a missing folder is made); written atomically, replaced if "
                             "it exists")
    parser.add_argument("--arch", choices=("auto",) + ARCHES, default="auto",
                        help="architecture of SRC (default: recognised from the parameter names)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> None:
    """Register ``convert`` as a subcommand of ``python -m cascade``."""
    p = subparsers.add_parser("convert", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(p)


def run(args) -> int:
    try:
        meta = convert(args.src, args.dst, arch=args.arch, quiet=args.quiet)
    except CheckpointError as exc:
        print(f"cascade.convert: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no space left, permission denied while writing DST
        print(f"cascade.convert: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"[convert] sha256 of {args.src}: {meta['source_sha256']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
