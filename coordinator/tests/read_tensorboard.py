#!/usr/bin/env python3
"""Prints, as JSON, what TensorBoard's own reader finds in an event file directory.

Usage: read_tensorboard.py LOGDIR

The coordinator's tests run it to check that its event files are read by TensorBoard itself
(EventAccumulator), not only by the coordinator's code. Output:

  {"scalars": {TAG: [[STEP, VALUE], ...]},
   "images": {TAG: [{"step", "width", "height", "decoded_width", "decoded_height", "bytes"}, ...]}}

where width/height are the sizes recorded in the events and decoded_* the PNG's own size (decoded
with PIL when it is installed, otherwise read from the PNG header). Exits with status 2 and a
message saying `pip install tensorboard` when TensorBoard is not importable.
"""

import json
import struct
import sys

try:
    from tensorboard.backend.event_processing import event_accumulator
except ImportError as e:
    print(f"read_tensorboard.py: cannot import tensorboard ({e}); run: pip install tensorboard", file=sys.stderr)
    sys.exit(2)


def png_size(data):
    """(width, height) of a PNG: decoded in full with PIL if available, else its IHDR header."""
    try:
        import io

        from PIL import Image
    except ImportError:
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
            raise ValueError("not a PNG")
        return struct.unpack(">II", data[16:24])
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"not a PNG but {img.format}")
        img.load()
        return img.size


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: read_tensorboard.py LOGDIR")
    # 0 keeps every event instead of a sample.
    acc = event_accumulator.EventAccumulator(
        sys.argv[1],
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0},
    )
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    images = {}
    for tag in tags["images"]:
        images[tag] = []
        for e in acc.Images(tag):
            w, h = png_size(e.encoded_image_string)
            images[tag].append(
                {
                    "step": e.step,
                    "width": e.width,
                    "height": e.height,
                    "decoded_width": w,
                    "decoded_height": h,
                    "bytes": len(e.encoded_image_string),
                }
            )
    json.dump({"scalars": scalars, "images": images}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
