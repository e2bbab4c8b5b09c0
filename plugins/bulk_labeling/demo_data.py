"""Real photos that can be had offline, for the demo, tests and benchmarks.

The source is Debian's ``tuxpaint-stamps-default`` package: about 200 real
photo cut-outs in folder classes (GPL-2, so they are installed at set-up
time, never committed). They are flattened onto white and saved as JPEGs. If
the package is missing, scikit-image's sample photos are used instead.
"""

import os
import pathlib

STAMPS_DIR = pathlib.Path("/usr/share/tuxpaint/stamps")

#: Demo class -> stamps sub-folder (the cartoon/toys/plastic folders are not
#: photos and are skipped)
PHOTO_CLASSES = {
    "bird": "animals/birds",
    "mammal": "animals/mammals",
    "fish": "animals/fish",
    "insect": "animals/insects",
    "fruit": "food/fruit",
    "vegetable": "food/vegetables",
    "flower": "plants/flowers",
    "vehicle": "vehicles",
}

_NOT_PHOTOS = ("cartoon", "toys", "plastic")

DEFAULT_CACHE = pathlib.Path(
    os.environ.get("BULK_LABELING_CACHE", "~/.cache/bulk_labeling")
).expanduser()


def find_stamp_photos():
    """Returns ``[(png path, class)]`` for the installed stamp photos."""
    found = []
    for cls, sub in PHOTO_CLASSES.items():
        root = STAMPS_DIR / sub
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.png")):
            parts = path.relative_to(root).parts
            if any(p in part for part in parts for p in _NOT_PHOTOS):
                continue
            found.append((path, cls))

    return found


def export_photos(dest=None, size=256):
    """Saves the offline photos as JPEGs under ``dest/<class>/``.

    Returns:
        a list of ``(jpeg path, class)``, sorted by path
    """
    from PIL import Image

    dest = pathlib.Path(dest or DEFAULT_CACHE / "photos")
    sources = find_stamp_photos()
    if not sources:
        return _export_skimage(dest, size)

    results = []
    for src, cls in sources:
        out = dest / cls / (src.stem + ".jpg")
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                img = img.convert("RGBA")
                img.thumbnail((size, size))
                canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
                canvas.alpha_composite(img)
                canvas.convert("RGB").save(out, quality=90)
        results.append((str(out), cls))

    return sorted(results)


def _export_skimage(dest, size):
    from PIL import Image
    import skimage.data

    names = {
        "astronaut": "person",
        "chelsea": "mammal",
        "cat": "mammal",
        "coffee": "food",
        "rocket": "vehicle",
        "hubble_deep_field": "space",
        "immunohistochemistry": "microscopy",
        "retina": "microscopy",
        "colorwheel": "pattern",
    }
    results = []
    for name, cls in names.items():
        out = dest / cls / (name + ".jpg")
        if not out.exists():
            try:
                array = getattr(skimage.data, name)()
            except Exception:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(array).convert("RGB")
            img.thumbnail((size, size))
            img.save(out, quality=90)
        results.append((str(out), cls))

    return sorted(results)


def load_demo_dataset(name="bulk-labeling-demo", overwrite=False):
    """Creates (or loads) a persistent dataset of the offline photos, with
    their folder class in a ``ground_truth`` field for reference."""
    import fiftyone as fo

    if fo.dataset_exists(name) and not overwrite:
        return fo.load_dataset(name)

    photos = export_photos()
    dataset = fo.Dataset(name, overwrite=True, persistent=True)
    dataset.add_samples(
        [
            fo.Sample(
                filepath=path,
                ground_truth=fo.Classification(label=cls),
            )
            for path, cls in photos
        ]
    )
    dataset.compute_metadata()
    return dataset
