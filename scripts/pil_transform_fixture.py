#!/usr/bin/env python3
"""Writes tests/data/pil_transforms.{json,bin}: the official dataset tool's crop/resize
transforms (NVlabs/edm2 dataset_tool.py make_transform, run by Pillow) and Pillow's
Image.resize applied to synthetic images, for tests/transform.rs.

The inputs are not stored: both sides compute them from the formula in `synthetic`.
Usage: python3 scripts/pil_transform_fixture.py --edm2-repo /path/to/NVlabs-edm2
(needs numpy, Pillow and click; the official module is imported, never copied).
"""
import argparse, json, os, sys
import numpy as np
import PIL.Image


def synthetic(h, w, c):
    """A gradient that wraps around (hard edges: the filters overshoot and clip) plus
    hashed noise; planar [c, h, w] uint8."""
    y, x, ch = np.meshgrid(np.arange(h, dtype=np.uint64), np.arange(w, dtype=np.uint64), np.arange(c, dtype=np.uint64), indexing='ij')
    m = np.uint64(0xFFFFFFFF)
    hsh = ((x * np.uint64(73856093)) & m) ^ ((y * np.uint64(19349663)) & m) ^ ((ch * np.uint64(83492791)) & m)
    v = (x * np.uint64(3) + y * np.uint64(5) + ch * np.uint64(70) + (hsh >> np.uint64(26))) & np.uint64(255)
    return v.astype(np.uint8)  # [h, w, c]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--edm2-repo', required=True)
    ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests', 'data', 'pil_transforms'))
    args = ap.parse_args()
    sys.path.insert(0, args.edm2_repo)
    import dataset_tool  # the official module

    cases = []
    blob = bytearray()  # extended in place by add()

    def add(name, kind, w, h, c, out, **params):
        entry = dict(name=name, kind=kind, w=w, h=h, c=c, **params)
        if out is None:
            entry['skipped'] = True
        else:
            out = np.asarray(out)
            if out.ndim == 2:
                out = out[:, :, None]
            entry.update(out_h=out.shape[0], out_w=out.shape[1], offset=len(blob))
            blob.extend(out.transpose(2, 0, 1).tobytes())  # planar
        cases.append(entry)

    filters = {'box': PIL.Image.Resampling.BOX, 'bicubic': PIL.Image.Resampling.BICUBIC, 'lanczos': PIL.Image.Resampling.LANCZOS}
    for (w, h, c, ow, oh, f) in [(37, 23, 3, 10, 7, 'box'), (37, 23, 3, 50, 31, 'bicubic'), (37, 23, 1, 16, 16, 'lanczos'),
                                 (13, 9, 1, 40, 30, 'lanczos'), (64, 48, 3, 32, 24, 'box'), (40, 40, 3, 40, 17, 'bicubic'),
                                 (29, 31, 1, 29, 31, 'lanczos')]:
        img = synthetic(h, w, c)
        pil = PIL.Image.fromarray(img[:, :, 0] if c == 1 else img, 'L' if c == 1 else 'RGB')
        add(f'resize-{f}-{w}x{h}x{c}-to-{ow}x{oh}', 'resize', w, h, c, np.array(pil.resize((ow, oh), filters[f])), filter=f, out_w_req=ow, out_h_req=oh)

    for (w, h, t, rw, rh) in [(37, 23, None, 16, 16), (61, 45, 'center-crop', 32, 32), (45, 61, 'center-crop', 24, 24),
                              (100, 60, 'center-crop-wide', 64, 48), (100, 80, 'center-crop-wide', 64, 48),
                              (300, 200, 'center-crop-dhariwal', 64, 64), (500, 375, 'center-crop-dhariwal', 64, 64),
                              (50, 40, 'center-crop-dhariwal', 64, 64), (257, 255, 'center-crop-dhariwal', 64, 64),
                              (27, 24, 'center-crop-dhariwal', 36, 36), (640, 480, 'center-crop-dhariwal', 128, 128)]:
        fn = dataset_tool.make_transform(t, rw, rh)
        img = synthetic(h, w, 3)
        out = fn(img)
        entry = dict(transform=t, res_w=rw, res_h=rh)
        if out is None:
            add(f'{t}-{w}x{h}-to-{rw}x{rh}', 'transform', w, h, 3, None, **entry)
        else:
            add(f'{t}-{w}x{h}-to-{rw}x{rh}', 'transform', w, h, 3, out, **entry)

    # JPEG decoding: a synthetic photo-like image saved by Pillow (quality 90, 4:2:0), its
    # bytes and Pillow's (libjpeg-turbo's) decoded pixels, so that the test can measure
    # how far our decoder is from it.
    import io
    yy, xx = np.mgrid[0:45, 0:61]
    photo = np.stack([128 + 100 * np.sin(xx * 0.2 + yy * 0.05 * k) for k in (1, 2, 3)], axis=-1)
    photo = np.clip(photo + synthetic(45, 61, 3) % 16, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(photo, 'RGB').save(buf, format='jpeg', quality=90)
    jpeg = buf.getvalue()
    decoded = np.array(PIL.Image.open(io.BytesIO(jpeg)).convert('RGB'))
    cases.append(dict(name='jpeg-61x45', kind='jpeg', w=61, h=45, c=3, jpeg_offset=len(blob), jpeg_len=len(jpeg),
                      offset=len(blob) + len(jpeg), out_w=61, out_h=45))
    blob.extend(jpeg)
    blob.extend(decoded.transpose(2, 0, 1).tobytes())

    with open(args.out + '.bin', 'wb') as f:
        f.write(bytes(blob))
    with open(args.out + '.json', 'w') as f:
        json.dump(dict(pillow=PIL.__version__, numpy=np.__version__, cases=cases), f, indent=1)
    print(f'{len(cases)} cases, {len(blob)} bytes')


if __name__ == '__main__':
    main()
