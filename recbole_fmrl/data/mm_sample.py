"""Generate ``mm-sample``: a small multimodal dataset with real signal in IDs, text, images and order.

Items belong to categories; a category decides the item's title vocabulary and its image's colour and shape,
so text and image features both carry the category. Users prefer one or two categories and tend to move to
the "next" item of a category, so a sequential model can beat popularity. Fully deterministic in ``seed``.

    python -m recbole_fmrl.data.mm_sample --out dataset_atomic/mm-sample
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

NAME = "mm-sample"
# category -> (title nouns, RGB colour, shape drawn on the image)
CATEGORIES: dict[str, tuple[list[str], tuple[int, int, int], str]] = {
    "Skin Care": (["Moisturizer", "Serum", "Face Cream", "Cleanser"], (235, 200, 170), "circle"),
    "Hair Care": (["Shampoo", "Conditioner", "Hair Oil", "Hair Mask"], (120, 80, 40), "stripes"),
    "Makeup": (["Lipstick", "Mascara", "Foundation", "Eyeliner"], (200, 30, 60), "triangle"),
    "Fragrance": (["Eau de Parfum", "Cologne", "Body Mist", "Perfume Oil"], (150, 90, 200), "diamond"),
    "Nails": (["Nail Polish", "Top Coat", "Nail File", "Cuticle Oil"], (240, 120, 180), "square"),
    "Bath": (["Bath Bomb", "Body Wash", "Bath Salt", "Shower Gel"], (60, 170, 220), "waves"),
    "Tools": (["Makeup Brush", "Hair Dryer", "Tweezers", "Mirror"], (110, 110, 110), "cross"),
    "Men": (["Beard Oil", "Shaving Cream", "Aftershave", "Razor"], (30, 60, 120), "ring"),
}
ADJECTIVES = ["Gentle", "Daily", "Luxury", "Organic", "Classic", "Fresh", "Intense", "Natural", "Pro", "Mini"]
BRANDS = [f"brand_{i}" for i in range(12)]
IMAGE_SIZE = 32


def _draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    jitter = rng.integers(-25, 26, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    d = ImageDraw.Draw(img)
    o = int(rng.integers(2, 6))
    s = IMAGE_SIZE - 1 - o
    if shape == "circle":
        d.ellipse([o, o, s, s], fill=fill)
    elif shape == "square":
        d.rectangle([o, o, s, s], fill=fill)
    elif shape == "triangle":
        d.polygon([(IMAGE_SIZE // 2, o), (o, s), (s, s)], fill=fill)
    elif shape == "diamond":
        m = IMAGE_SIZE // 2
        d.polygon([(m, o), (s, m), (m, s), (o, m)], fill=fill)
    elif shape == "stripes":
        for y in range(o, s, 6):
            d.rectangle([0, y, IMAGE_SIZE, y + 2], fill=fill)
    elif shape == "waves":
        for y in range(o, s, 8):
            d.arc([0, y - 4, IMAGE_SIZE, y + 4], 0, 180, fill=fill, width=3)
    elif shape == "cross":
        m = IMAGE_SIZE // 2
        d.rectangle([m - 3, o, m + 3, s], fill=fill)
        d.rectangle([o, m - 3, s, m + 3], fill=fill)
    elif shape == "ring":
        d.ellipse([o, o, s, s], outline=fill, width=5)
    return img


def generate(out_dir: str | Path, n_users: int = 300, n_items: int = 200, seed: int = 0) -> Path:
    """Write ``<out_dir>/{mm-sample.inter, mm-sample.item, images/*.png}``; returns ``out_dir``."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(CATEGORIES)

    item_cat = np.array([i % len(names) for i in range(n_items)])
    rng.shuffle(item_cat)
    by_cat = {c: np.flatnonzero(item_cat == c) for c in range(len(names))}
    item_rows = []
    for i in range(n_items):
        cat = names[item_cat[i]]
        nouns, colour, shape = CATEGORIES[cat]
        title = f"{rng.choice(ADJECTIVES)} {rng.choice(nouns)} {i + 1}"
        brand = BRANDS[(item_cat[i] * 3 + int(rng.integers(0, 3))) % len(BRANDS)]
        price = round(float(rng.uniform(3, 80)), 2)
        image = f"images/i{i + 1:04d}.png"
        _draw(shape, colour, rng).save(out / image, optimize=True)
        item_rows.append(f"i{i + 1:04d}\t{title}\tBeauty, {cat}\t{brand}\t{price}\t{image}")

    # Within a category, item k is usually followed by item k+1: a sequential pattern, plus popularity skew.
    inter_rows = []
    t0 = 1_400_000_000
    for u in range(n_users):
        liked = rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)
        length = int(rng.integers(8, 19))
        cat = int(rng.choice(liked))
        pos = int(min(rng.geometric(0.25) - 1, len(by_cat[cat]) - 1))
        seen: set[int] = set()
        t = t0 + int(rng.integers(0, 10_000_000))
        for _ in range(length):
            if rng.random() < 0.25:
                cat = int(rng.choice(liked))
                pos = int(min(rng.geometric(0.25) - 1, len(by_cat[cat]) - 1))
            items = by_cat[cat]
            item = int(items[pos % len(items)])
            if item not in seen:
                seen.add(item)
                rating = int(rng.integers(3, 6))
                inter_rows.append(f"u{u + 1:04d}\ti{item + 1:04d}\t{rating}\t{t}")
            pos += 1 if rng.random() < 0.8 else int(rng.integers(2, 4))
            t += int(rng.integers(3_600, 400_000))

    (out / f"{NAME}.item").write_text(
        "item_id:token\ttitle:token_seq\tcategories:token_seq\tbrand:token\tprice:float\timage:token\n"
        + "\n".join(item_rows)
        + "\n"
    )
    (out / f"{NAME}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(inter_rows) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"dataset_atomic/{NAME}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = generate(args.out, seed=args.seed)
    n_inter = sum(1 for _ in open(out / f"{NAME}.inter")) - 1
    print(f"wrote {out}: {n_inter} interactions")


if __name__ == "__main__":
    main()
