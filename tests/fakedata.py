"""Tiny data sets in the official file formats, for tests of the paper path without the data.

write_fake(root, name, n_train, n_test) puts, under root/NAME/, what the real download or
folder holds: IDX gzip files (mnist, fashion), the CIFAR-10 python tarball, SVHN's .mat files,
CelebA's aligned 178 x 218 JPEGs with list_eval_partition.txt, or an LSUN folder of images.
Pixels are random, so a run on them tests shapes and protocol, not quality.
"""
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake(root, name, n_train=64, n_test=32, seed=0):
    """Write a tiny `name` data set under root/name; returns root (pass it as --data-dir)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if name in ("mnist", "fashion"):
        write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
        write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    elif name == "cifar10":
        per = -(-n_train // 5)
        batches = {f"data_batch_{i}": rng.integers(0, 256, (per, 3072), dtype=np.uint8) for i in range(1, 6)}
        batches["test_batch"] = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
        with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
            for key, data in batches.items():
                blob = pickle.dumps({b"data": data, b"labels": [0] * len(data)})
                info = tarfile.TarInfo(f"cifar-10-batches-py/{key}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    elif name == "svhn":
        import scipy.io
        for split, n in (("train", n_train), ("test", n_test)):
            X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # the .mat layout: H, W, C, N
            scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": X, "y": np.ones((n, 1))})
    elif name in ("celeba", "lsun_church", "lsun_bedroom"):
        from PIL import Image
        images = folder / ("img_align_celeba" if name == "celeba" else "images")
        images.mkdir(exist_ok=True)
        size = (178, 218) if name == "celeba" else (160, 128)
        lines = []
        for i in range(n_train + n_test):
            fname = f"{i + 1:06d}.jpg"
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(images / fname)
            lines.append(f"{fname} {0 if i < n_train else 2}")  # CelebA's partition: 0 train, 1 valid, 2 test
        if name == "celeba":
            (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    else:
        raise ValueError(name)
    return Path(root)
