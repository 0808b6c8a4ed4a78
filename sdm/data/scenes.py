"""The benchmark world: procedural street and park scenes that colour alone cannot segment.

Eighteen classes, several sharing colour ranges and told apart only by texture, shape or context: road, pavement,
walls and rocks are all grey (asphalt grain, a tile grid, brick or concrete, blotches); sky, water and window glass
show the same sky colours (water and glass reflect it, with ripples or a highlight); grass and trees are green (or
autumn trees the colour of a car). Poles, fence bars and wires are one or two pixels wide; buildings, cars and trees
stand side by side as touching instances of one class, so the instance edges matter. Appearance is multimodal
(cars, walls, roofs, doors, skies in several kinds) and depends on context: a sun on the left or right shades every
object on one side and casts its shadow across the ground. Deterministic in its seed.
"""

from __future__ import annotations

import numpy as np

from sdm.data.procedural import World

SCENES_CLASSES = [
    "sky", "cloud", "mountain", "wall", "window", "door", "roof", "road", "pavement",
    "grass", "tree", "water", "car", "pole", "fence", "wire", "person", "rock",
]
(SKY, CLOUD, MOUNTAIN, WALL, WINDOW, DOOR, ROOF, ROAD, PAVEMENT,
 GRASS, TREE, WATER, CAR, POLE, FENCE, WIRE, PERSON, ROCK) = range(len(SCENES_CLASSES))
# The palette shows label maps to people (contact sheets, the painting page); images draw their own colours.
SCENES_PALETTE = [
    [120, 170, 240], [230, 230, 240], [110, 100, 150], [180, 120, 90], [60, 200, 220], [120, 60, 20],
    [200, 50, 50], [70, 70, 70], [160, 160, 110], [80, 180, 60], [20, 100, 30], [30, 60, 200],
    [250, 150, 0], [250, 250, 0], [160, 80, 200], [255, 0, 255], [255, 120, 180], [130, 130, 150],
]
THIN_CLASSES = (POLE, FENCE, WIRE)  # at most 2 pixels wide
GROUND = (ROAD, PAVEMENT, GRASS)  # where shadows fall
OBJECT_ID = 1000  # instance ids of objects start here; stuff regions carry their class id

_CAR_COLOURS = [(170, 30, 30), (30, 60, 160), (225, 225, 225), (25, 25, 30), (150, 150, 155), (220, 180, 30), (40, 110, 60)]
_WALL_COLOURS = [(135, 135, 135), (200, 180, 140), (150, 70, 50), (215, 215, 210)]
_ROOF_COLOURS = [(160, 60, 40), (75, 75, 80), (110, 80, 60)]
_DOOR_COLOURS = [(100, 60, 30), (40, 40, 45), (40, 90, 60), (140, 30, 30)]
_SKIES = {  # zenith, horizon
    "day": ((70, 130, 220), (170, 200, 235)),
    "overcast": ((145, 150, 160), (190, 190, 195)),
    "sunset": ((90, 80, 160), (240, 150, 90)),
}


class _Canvas:
    """A label map and an instance map drawn together, objects numbered as they are placed."""

    def __init__(self, size: int):
        self.size = size
        self.label = np.full((size, size), SKY, dtype=np.uint8)
        self.instance = np.full((size, size), SKY, dtype=np.int32)
        self.yy, self.xx = np.mgrid[0:size, 0:size]
        self.next_id = OBJECT_ID

    def stuff(self, mask: np.ndarray, cls: int) -> None:
        self.label[mask], self.instance[mask] = cls, cls

    def thing(self, mask: np.ndarray, cls: int) -> int:
        self.label[mask], self.instance[mask] = cls, self.next_id
        self.next_id += 1
        return self.next_id - 1

    def rect(self, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)

    def disc(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0


def _ground(c: _Canvas, rng: np.random.Generator, horizon: int) -> int:
    """Street (pavement, road, pavement, grass) or park (grass, a lake, a path); returns the row objects stand on."""
    n = c.size
    c.stuff(c.yy >= horizon, GRASS)
    if rng.random() < 0.65:
        walk = horizon + int(rng.integers(2, 5))
        road_end = min(n, walk + int(rng.integers(n // 5, n // 2)))
        c.stuff((c.yy >= horizon) & (c.yy < walk), PAVEMENT)
        c.stuff((c.yy >= walk) & (c.yy < road_end), ROAD)
        c.stuff((c.yy >= road_end) & (c.yy < road_end + int(rng.integers(2, 4))), PAVEMENT)
        return walk
    if rng.random() < 0.7:
        lake = c.disc(rng.uniform(horizon + n / 6, n), rng.uniform(0, n), rng.uniform(n / 10, n / 5), rng.uniform(n / 5, n / 2.5))
        c.stuff(lake & (c.yy > horizon + 1), WATER)
    if rng.random() < 0.5:
        y = int(rng.integers(horizon + 2, n - 2))
        c.stuff((c.yy >= y) & (c.yy < y + 2) & (c.label == GRASS), PAVEMENT)
    return horizon + 1


def _sky_things(c: _Canvas, rng: np.random.Generator, horizon: int) -> None:
    n = c.size
    if rng.random() < 0.6:  # a mountain range along the horizon
        ridge = horizon - n / 12 - n / 10 * (1 + np.sin(c.xx[0] * rng.uniform(0.1, 0.3) + rng.uniform(0, 6.3)))
        c.stuff((c.yy < horizon) & (c.yy >= ridge[None, :]), MOUNTAIN)
    for _ in range(int(rng.integers(0, 4))):
        cloud = c.disc(rng.uniform(1, horizon * 0.6), rng.uniform(0, n), rng.uniform(1.5, 3.5), rng.uniform(3, 8))
        c.stuff(cloud & (c.label == SKY), CLOUD)


def _buildings(c: _Canvas, rng: np.random.Generator, base: int) -> list[tuple[int, int, int]]:
    """A row of 0-3 buildings, often touching; returns their (top, x0, x1)."""
    n, out = c.size, []
    x = int(rng.integers(-4, n // 2))
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.15, 0.3, 0.35, 0.2]))):
        w, h = int(rng.integers(n // 6, n // 3)), int(rng.integers(n // 5, int(base * 0.9) + 1))
        top = base - h
        c.thing(c.rect(top, base, x, x + w), WALL)
        if rng.random() < 0.6:  # a gable
            apex = top - rng.uniform(2, 5)
            gable = (c.yy < top) & (c.yy >= apex + np.abs(c.xx - (x + w / 2)) * (top - apex) / (w / 2))
            c.thing(gable, ROOF)
        else:
            c.thing(c.rect(top, top + 2, x, x + w), ROOF)
        for wy in range(top + 3, base - 5, 4):
            for wx in range(x + 1, x + w - 2, 4):
                c.thing(c.rect(wy, wy + 2, wx, wx + 2), WINDOW)
        dx = x + int(rng.integers(1, max(2, w - 3)))
        c.thing(c.rect(base - 4, base, dx, dx + 2 + int(rng.random() < 0.5)), DOOR)
        out.append((top, x, x + w))
        x += w + int(rng.choice([0, 0, 2, 6]))
    return out


def _nature(c: _Canvas, rng: np.random.Generator, horizon: int) -> None:
    n = c.size
    grass = np.argwhere(c.label == GRASS)
    if not len(grass):
        return
    for _ in range(int(rng.integers(0, 3))):  # clusters of touching trees
        y, x = grass[rng.integers(len(grass))]
        for k in range(int(rng.integers(1, 4))):
            r = rng.uniform(2.5, 5)
            cx = x + k * r * 1.6
            c.thing((c.disc(y - r - 1, cx, r, r * 0.85) | c.rect(y - 2, y + 1, cx - 0.5, cx + 1)) & (c.yy < n), TREE)
    for _ in range(int(rng.integers(0, 3))):
        y, x = grass[rng.integers(len(grass))]
        c.thing(c.disc(y, x, rng.uniform(1.5, 2.5), rng.uniform(2, 3.5)), ROCK)
    if rng.random() < 0.5:  # a fence along a row of grass or pavement: 1-pixel bars under a 1-pixel rail
        y = int(grass[rng.integers(len(grass))][0])
        x0, x1, h, gap = int(rng.integers(0, n // 2)), int(rng.integers(n // 2, n)), int(rng.integers(4, 7)), int(rng.integers(2, 4))
        bars = c.rect(y - h, y, x0, x1) & ((c.xx - x0) % gap == 0)
        c.thing(bars | c.rect(y - h, y - h + 1, x0, x1), FENCE)


def _wire(c: _Canvas, rng: np.random.Generator, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """A sagging 1-pixel line from (x0, y0) to (x1, y1), each column's gap to the next filled (8-connected)."""
    n = c.size
    xs = np.arange(max(x0, 0), min(x1, n - 1) + 1)
    t = (xs - x0) / max(x1 - x0, 1)
    ys = np.round(y0 + (y1 - y0) * t + rng.uniform(1, 4) * 4 * t * (1 - t)).astype(int)
    wire = np.zeros((n, n), dtype=bool)
    for i, (x, y) in enumerate(zip(xs, ys)):
        lo, hi = sorted((y, ys[min(i + 1, len(ys) - 1)]))
        wire[max(lo, 0) : min(max(hi, lo + 1), n), x] = True
    return wire


def _street(c: _Canvas, rng: np.random.Generator, base: int) -> None:
    n = c.size
    road = np.argwhere(c.label == ROAD)
    if len(road):
        y = int(rng.integers(road[:, 0].min() + 4, road[:, 0].max() + 2)) if road[:, 0].max() - road[:, 0].min() > 4 else int(road[:, 0].max())
        x = int(rng.integers(-6, n // 2))
        for _ in range(int(rng.integers(0, 4))):  # cars in a row, bumper to bumper or apart
            w, h = int(rng.integers(8, 13)), int(rng.integers(4, 6))
            body = c.rect(y - h, y, x, x + w) & ~(c.rect(y - h, y - h + 2, x, x + 2) | c.rect(y - h, y - h + 2, x + w - 2, x + w))
            c.thing(body, CAR)
            x += w + int(rng.choice([0, 0, 3, 8]))
    poles = []
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.2, 0.3, 0.3, 0.2]))):
        px, width, top = int(rng.integers(1, n - 2)), int(rng.integers(1, 3)), int(rng.integers(2, max(3, base - n // 4)))
        if any(abs(px - q) < 4 for q, _ in poles):
            continue
        c.thing(c.rect(top, base + 1, px, px + width), POLE)
        poles.append((px, top))
    anchors = sorted(poles)
    if anchors and rng.random() < 0.5:  # a wire in from the left edge
        anchors.insert(0, (-1, anchors[0][1] + int(rng.integers(-3, 4))))
    if anchors and rng.random() < 0.5:  # and one out to the right
        anchors.append((n, anchors[-1][1] + int(rng.integers(-3, 4))))
    for (x0, y0), (x1, y1) in zip(anchors, anchors[1:]):
        c.stuff(_wire(c, rng, x0, y0, x1, y1) & np.isin(c.label, (SKY, CLOUD, MOUNTAIN)), WIRE)
    walk = np.argwhere(c.label == PAVEMENT)
    for _ in range(int(rng.integers(0, 3)) if len(walk) else 0):
        y, x = walk[rng.integers(len(walk))]
        c.thing(c.rect(y - 5, y + 1, x, x + 2), PERSON)


def scenes_layout(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8 class ids) and instance map (int32: stuff = its class id, objects >= 1000)."""
    c = _Canvas(size)
    horizon = int(rng.integers(int(size * 0.3), int(size * 0.55)))
    _sky_things(c, rng, horizon)
    base = _ground(c, rng, horizon)
    _buildings(c, rng, base)
    _nature(c, rng, horizon)
    _street(c, rng, base)
    return c.label, c.instance


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Smooth noise in [-1, 1] at a given feature size (nearest-upsampled then box-blurred)."""
    coarse = rng.uniform(-1, 1, (shape[0] // scale + 2, shape[1] // scale + 2))
    up = np.kron(coarse, np.ones((scale, scale)))[: shape[0] + scale, : shape[1] + scale]
    k = np.ones(scale) / scale
    up = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, up)
    up = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, up)
    return up[: shape[0], : shape[1]]


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], spread: float) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32) + rng.normal(0, spread, 3)


def scenes_paint(rng: np.random.Generator, label: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """An image of a layout: a sky kind, a sun side, per-object colours, class textures, shading and shadows."""
    n = label.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.zeros((n, n, 3), dtype=np.float32)
    zenith, horizon_c = (_jitter(rng, c, 12) for c in _SKIES[str(rng.choice(list(_SKIES), p=[0.55, 0.25, 0.2]))])
    horizon = int(np.argmax((label != SKY).all(1) | (np.arange(n) == n - 1)))
    t = np.clip(yy / max(horizon, 1), 0, 1)[..., None]
    sky = zenith * (1 - t) + horizon_c * t
    sun = float(rng.choice([-1.0, 1.0]))  # light from the left (-1) or the right (+1)

    def fill(cls: int, value: np.ndarray | float) -> None:
        m = label == cls
        img[m] = np.broadcast_to(value, img.shape)[m] if np.ndim(value) == 3 else value

    fill(SKY, sky)
    fill(CLOUD, {0: 235.0, 1: 140.0}.get(int(rng.integers(0, 2)), 235.0) * np.ones(3) * (1 + 0.05 * _noise(rng, (n, n), 3))[..., None])
    fill(MOUNTAIN, (0.5 * horizon_c + 0.5 * _jitter(rng, (95, 100, 125), 10)) * (1 - 0.15 * t))
    fill(WATER, sky[::-1] * 0.75 * (1 - 0.18 * (((yy + int(rng.integers(0, 3))) % 3) == 0))[..., None] + np.array([0, 5, 20]))
    fill(ROAD, _jitter(rng, (90, 90, 95), 12) * (1 + rng.normal(0, 0.07, (n, n)))[..., None])
    fill(PAVEMENT, _jitter(rng, (140, 138, 130), 12) * (1 - 0.22 * ((yy % 4 == 0) | (xx % 4 == 0)))[..., None])
    grass_c = _jitter(rng, (75, 140, 50) if rng.random() < 0.8 else (150, 150, 70), 10)
    fill(GRASS, grass_c * (1 + 0.12 * rng.normal(0, 1, (1, n)) + 0.05 * rng.normal(0, 1, (n, n)))[..., None])
    fill(WIRE, _jitter(rng, (30, 30, 35), 5))
    road = label == ROAD  # lane markings: paint on the road, part of the road
    if road.any() and rng.random() < 0.6:
        mid = int(np.median(np.nonzero(road.any(1))[0]))
        img[(yy == mid) & road & ((xx // 3) % 2 == 0)] = 225.0

    for inst in np.unique(instance[instance >= OBJECT_ID]):
        m = instance == inst
        cls = int(label[m][0])
        ys, xs = np.nonzero(m)
        side = 1 + 0.22 * sun * (xx - xs.mean()) / max(np.ptp(xs) / 2, 1)  # the face towards the sun is brighter
        img[m] = _object_colour(rng, cls, m, yy, xx, sky, n)[m] * side[m][:, None]

    img *= _shadows(label, instance, sun, int(rng.integers(3, 8)))[..., None]
    img *= rng.uniform(0.88, 1.08)
    img += rng.normal(0, 3.0, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _object_colour(rng: np.random.Generator, cls: int, m: np.ndarray, yy: np.ndarray, xx: np.ndarray, sky: np.ndarray,
                   n: int) -> np.ndarray:
    """The colour field of one object (only its mask is read)."""
    ones = np.ones((n, n, 1), dtype=np.float32)
    pick = lambda colours, spread: _jitter(rng, colours[int(rng.integers(len(colours)))], spread) * ones  # noqa: E731
    if cls == WALL:
        base = pick(_WALL_COLOURS, 10)
        if rng.random() < 0.5:  # bricks: mortar every third row, joints staggered
            mortar = (yy % 3 == 0) | (((xx + 2 * ((yy // 3) % 2)) % 4) == 0)
            return base * (1 + 0.25 * mortar)[..., None]
        return base * (1 + 0.06 * rng.normal(0, 1, (n, n)))[..., None]
    if cls == WINDOW:
        kind = rng.random()
        if kind < 0.5:  # glass reflecting the sky, with a diagonal highlight
            return sky[::-1].mean((0, 1)) * ones * (1 + 0.3 * (((xx + yy) % 3) == 0))[..., None]
        return _jitter(rng, (40, 45, 55) if kind < 0.8 else (230, 200, 110), 8) * ones
    if cls == ROOF:
        return pick(_ROOF_COLOURS, 8) * (1 - 0.2 * (yy % 2 == 0))[..., None]
    if cls == DOOR:
        return pick(_DOOR_COLOURS, 8)
    if cls == CAR:
        body = pick(_CAR_COLOURS, 8)
        top = yy[m].min()
        glass = (yy < top + 2)[..., None]
        return np.where(glass, np.array([45, 55, 70], dtype=np.float32), body)
    if cls == TREE:
        leaf = (30, 90, 35) if rng.random() < 0.7 else [(180, 100, 30), (200, 170, 40)][int(rng.integers(2))]
        return _jitter(rng, leaf, 10) * (1 + 0.25 * _noise(rng, (n, n), 2))[..., None]
    if cls == POLE:
        return pick([(60, 60, 65), (100, 70, 40)], 6)
    if cls == FENCE:
        return pick([(220, 220, 215), (120, 80, 40), (100, 100, 105)], 6)
    if cls == PERSON:
        shirt = _jitter(rng, tuple(int(v) for v in rng.integers(20, 235, 3)), 0) * ones
        return np.where((yy <= yy[m].min() + 1)[..., None], np.array([210, 160, 130], dtype=np.float32), shirt)
    return _jitter(rng, (130, 128, 125), 12) * (1 + 0.2 * _noise(rng, (n, n), 2))[..., None]  # ROCK


def _shadows(label: np.ndarray, instance: np.ndarray, sun: float, length: int) -> np.ndarray:
    """A brightness factor: the ground is darker where an upright object stands between it and the sun."""
    casters = (instance >= OBJECT_ID) & np.isin(label, (WALL, DOOR, TREE, CAR, POLE, FENCE, PERSON))
    shadow = np.zeros_like(casters)
    for t in range(1, length + 1):
        dy, dx = (t + 1) // 2, -int(sun) * t
        shifted = np.roll(np.roll(casters, dy, 0), dx, 1)
        if dy:
            shifted[:dy] = False
        if dx > 0:
            shifted[:, :dx] = False
        elif dx < 0:
            shifted[:, dx:] = False
        shadow |= shifted
    return np.where(shadow & np.isin(label, GROUND) & ~casters, 0.55, 1.0)


SCENES = World(
    name="scenes",
    class_names=SCENES_CLASSES,
    palette=SCENES_PALETTE,
    default_size=48,
    min_size=24,
    layout=scenes_layout,
    paint=scenes_paint,
)
