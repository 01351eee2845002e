"""Draws examples/sample.png, the image the README's first command upscales.

A made-up low-resolution scene (sky gradient, hills, a house, a tree, text), rendered large and
shrunk to 160x120 so it has the soft, slightly aliased look of a real small photo. It is ours,
so it can ship with the package without anyone else's licence.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def draw(width: int = 640, height: int = 480) -> Image.Image:
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 200]) + y * np.array([230, 200, 170])
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    pen.ellipse((470, 50, 560, 140), fill=(255, 230, 120))
    pen.polygon([(0, 330), (180, 230), (360, 320), (520, 250), (640, 300), (640, 480), (0, 480)], fill=(70, 130, 60))
    pen.rectangle((120, 290, 260, 400), fill=(200, 90, 70), outline=(60, 30, 20), width=4)
    pen.polygon([(105, 295), (190, 220), (275, 295)], fill=(90, 50, 40))
    for x in (140, 205):
        pen.rectangle((x, 315, x + 35, 350), fill=(240, 240, 210), outline=(60, 30, 20), width=3)
    pen.rectangle((175, 355, 205, 400), fill=(80, 50, 30))
    pen.rectangle((430, 300, 450, 400), fill=(90, 60, 30))
    pen.ellipse((380, 200, 500, 320), fill=(40, 100, 40))
    for i in range(0, 640, 16):
        pen.line((i, 440, i + 8, 470), fill=(50, 100, 45), width=2)
    pen.text((20, 20), "diffsr sample", fill=(255, 255, 255), font_size=40)
    return image.filter(ImageFilter.GaussianBlur(1.2)).resize((160, 120), Image.Resampling.BICUBIC)


if __name__ == "__main__":
    draw().save(Path(__file__).with_name("sample.png"), optimize=True)
