"""Cuts a small real sample out of Fashion-MNIST for tests and the demo stream.

Usage: python3 make_sample.py /usr/share/datasets/fashion-mnist fashion-mnist-sample
Takes the first 1,024 training and the first 1,000 test images with their labels and writes
them in the same gzipped IDX layout under the standard file names.
"""
import gzip, struct, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for split, count in (("train", 1024), ("t10k", 1000)):
    for kind, item_bytes in (("images-idx3-ubyte", 28 * 28), ("labels-idx1-ubyte", 1)):
        name = f"{split}-{kind}.gz"
        data = gzip.open(src / name).read()
        ndim = data[3]
        dims = list(struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim]))
        dims[0] = count
        header = data[:4] + struct.pack(">" + "I" * ndim, *dims)
        body = data[4 + 4 * ndim: 4 + 4 * ndim + count * item_bytes]
        with gzip.GzipFile(dst / name, "wb", mtime=0) as f:
            f.write(header + body)
        print(name, dims)
