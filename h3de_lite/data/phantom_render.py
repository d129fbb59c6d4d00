"""Rendering of phantom v2 (intensities, metal streaks, dense-region noise, reconstruction kernels, slice thickness,
motion) and the v2 generator that puts anatomy, teeth and rendering together.

Part of the phantom generator (:mod:`h3de_lite.data.phantom`, ``difficulty="v2"``). Tissue labels become Hounsfield
units in this order, each step an approximation of the physics named, switchable on its own:

1. **Intensities**: per-case tissue means from :data:`HU_RANGES_V2`, whose bone, dentin and enamel ranges overlap
   (enamel is 500–1000 HU above that case's dentin, cortical bone anywhere in 1100–2000 HU); metal on the extended CT
   scale (:data:`~h3de_lite.data.phantom_teeth.METAL_HU`, 5000–16000 HU, the volume is clipped to [−1024, 30710]).
2. **Metal streaks** (effect ``streaks``): in each axial slice that holds metal, the metal's excess attenuation is
   forward-projected (parallel beam, 96 angles over 180°, on a grid of at most 96 × 96 pixels), the projection error
   of a polychromatic beam is modelled as beam hardening, ``−κ p²/(1 + p/p_sat)`` for a metal path of ``p`` mm of
   water equivalent, plus photon starvation noise whose standard deviation grows like ``sqrt(exp(μ_w p) − 1)``, and
   that error is reconstructed by filtered back-projection (Ram-Lak filter) and added to the slice: dark bands
   between metal objects, bright and dark streaks radiating from them.
3. **Noise** (effect ``noise``): Gaussian noise whose σ (15–45 HU in soft tissue) rises with the share of bone, teeth
   and metal nearby and in the slice (up to about 2.5×), as photon counts fall behind dense structures.
4. **Reconstruction kernel** (effect ``kernel``): a smooth kernel (wider blur) to a sharp bone kernel (unsharp
   masking: edge overshoot and amplified noise); without the effect, a plain Gaussian point-spread function.
5. **Slice thickness** (effect ``slice_thickness``): a box slice profile of 1–1.3 × the slice spacing, or in a quarter
   of the cases 2–3 mm thick slices: partial-volume blur along the slice axis.
6. **Motion** (effect ``motion``, 10 % of cases): a ghost, a shifted copy (2–5 mm, weight 0.25–0.45) of the anatomy
   over a band of slices, as when the patient moved during part of the scan.

Noise and texture are white before filtering and scaled so that their standard deviation after the kernel and slice
profile is the drawn one. Explained in book/phantom.md.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage, sparse

from h3de_lite.data.phantom import _TEXTURE_HU, Tissue
from h3de_lite.data.phantom_teeth import METAL_HU, METAL_KINDS

__all__ = ["HU_RANGES_V2", "HU_CLIP_V2", "fbp", "forward_project"]

HU_RANGES_V2: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1010.0, -990.0),
    Tissue.FAT: (-110.0, -60.0),
    Tissue.SOFT: (15.0, 55.0),
    Tissue.PULP: (20.0, 60.0),
    Tissue.CANCELLOUS: (250.0, 800.0),
    Tissue.CORTICAL: (1100.0, 2000.0),
    Tissue.DENTIN: (1500.0, 2300.0),
    Tissue.ENAMEL: (500.0, 1000.0),  # above the case's dentin
    Tissue.METAL: (0.0, 0.0),  # per metal kind, see METAL_HU
    Tissue.MUSCLE: (35.0, 70.0),
    Tissue.DEVICE: (150.0, 450.0),
}
"""v2 tissue means (HU): overlapping bone and tooth ranges; enamel is drawn as an offset above the case's dentin."""
HU_CLIP_V2: tuple[float, float] = (-1024.0, 30710.0)
"""The extended CT scale v2 volumes are clipped to."""

_TEXTURE_V2 = {**_TEXTURE_HU, Tissue.METAL: 0.0, Tissue.MUSCLE: 10.0, Tissue.DEVICE: 20.0}
_DENSE = (Tissue.CANCELLOUS, Tissue.CORTICAL, Tissue.DENTIN, Tissue.ENAMEL, Tissue.METAL)
_N_ANGLES = 96
_MAX_PROJECTION_GRID = 96
_MU_WATER = 0.02  # 1/mm, water at an effective energy of about 70 keV


# --------------------------------------------------------------------------------------------------------------------
# Parallel-beam projector and filtered back-projection
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _projector(n: int, n_angles: int) -> sparse.csr_matrix:
    """Pixel-driven parallel-beam projector of an ``n × n`` image onto ``n_angles`` views of ``n_det`` unit bins.

    Each pixel centre is projected onto the detector and its value shared linearly between the two nearest bins, so
    a pixel of value 1 adds 1 (one pixel length) to each view: row sums along a ray approximate the line integral.
    """
    n_det = int(math.ceil(n * math.sqrt(2.0))) + 3
    c = (n - 1) / 2.0
    i, j = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    i, j = i.ravel(), j.ravel()
    theta = np.arange(n_angles) * math.pi / n_angles
    t = np.cos(theta)[:, None] * i[None, :] + np.sin(theta)[:, None] * j[None, :] + (n_det - 1) / 2.0
    low = np.floor(t).astype(np.int64)
    frac = t - low
    view = np.arange(n_angles)[:, None] * n_det
    pixel = np.broadcast_to(np.arange(n * n)[None, :], t.shape)
    rows = np.concatenate([(view + low).ravel(), (view + low + 1).ravel()])
    cols = np.concatenate([pixel.ravel(), pixel.ravel()])
    data = np.concatenate([(1.0 - frac).ravel(), frac.ravel()]).astype(np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(n_angles * n_det, n * n))


def forward_project(images: np.ndarray, n_angles: int = _N_ANGLES) -> np.ndarray:
    """Parallel-beam line integrals (in pixel lengths) of square images over ``n_angles`` views in [0°, 180°).

    Args:
        images: ``(n, n)`` or a stack ``(n, n, S)``.
        n_angles: number of views.

    Shape:
        - images ``(n, n, S)`` → sinograms ``(n_angles, n_det, S)`` with ``n_det = ceil(n·√2) + 3``.

    Example:
        >>> forward_project(np.ones((8, 8)), n_angles=4).shape
        (4, 15, 1)
    """
    stack = images.reshape(images.shape[0], images.shape[1], -1)
    n = stack.shape[0]
    if stack.shape[1] != n:
        raise ValueError(f"images must be square (n, n[, S]), got {images.shape}")
    a = _projector(n, n_angles)
    sino = a @ stack.reshape(n * n, -1).astype(np.float32)
    return sino.reshape(n_angles, -1, stack.shape[2])


def _ram_lak(n_det: int) -> np.ndarray:
    """Frequency response of the band-limited Ram-Lak ramp (from its spatial kernel), zero-padded length ``2·n_det``."""
    size = 2 * n_det
    k = np.arange(size)
    k = np.where(k <= size // 2, k, k - size)
    h = np.zeros(size)
    h[k == 0] = 0.25
    odd = k % 2 == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    return np.real(np.fft.fft(h))


def fbp(sinograms: np.ndarray, n: int) -> np.ndarray:
    """Filtered back-projection of :func:`forward_project` sinograms back to ``(n, n, S)`` images.

    Ram-Lak filtering along the detector (spatial kernel, zero-padded FFT), then the transpose of the projector,
    times ``π / n_angles``: an image of value 1 projected and reconstructed comes back as about 1.

    Shape:
        - sinograms ``(n_angles, n_det, S)`` → images ``(n, n, S)``.

    Example:
        >>> disc = (np.hypot(*np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5)) < 10).astype(float)
        >>> image = fbp(forward_project(disc, n_angles=64), 32)
        >>> round(float(image[16, 16, 0]), 1), image.shape
        (1.0, (32, 32, 1))
    """
    n_angles, n_det, count = sinograms.shape
    response = _ram_lak(n_det)
    padded = np.zeros((n_angles, 2 * n_det, count), dtype=np.float64)
    padded[:, :n_det] = sinograms
    filtered = np.real(np.fft.ifft(np.fft.fft(padded, axis=1) * response[None, :, None], axis=1))[:, :n_det]
    a = _projector(n, n_angles)
    images = a.T @ filtered.reshape(n_angles * n_det, count).astype(np.float32)
    return (images * (math.pi / n_angles)).reshape(n, n, count)


def _metal_streaks(excess: np.ndarray, pixel_mm: float, rng: np.random.Generator,
                   strength: float) -> np.ndarray:  # fmt: skip
    """HU error ``(D, H, S)`` of the metal in ``S`` axial slices (see the module docstring, step 2).

    ``excess`` is the metal's attenuation above air relative to water, ``(HU + 1000) / 1000``, zero elsewhere.
    """
    d, h = excess.shape[:2]
    factor = max(1, int(math.ceil(max(d, h) / _MAX_PROJECTION_GRID)))
    n = int(math.ceil(max(d, h) / factor))
    stack = np.zeros((n * factor, n * factor, excess.shape[2]), dtype=np.float32)
    stack[:d, :h] = excess
    coarse = stack.reshape(n, factor, n, factor, -1).mean(axis=(1, 3))
    cell = pixel_mm * factor
    p = forward_project(coarse) * cell  # metal path in mm of water equivalent
    error = -strength * 0.008 * p**2 / (1.0 + p / 150.0)  # beam hardening
    error += strength * 10.0 * np.sqrt(np.expm1(_MU_WATER * p)) * rng.standard_normal(p.shape).astype(np.float32)
    image = fbp(error / cell, n) * 1000.0  # relative attenuation → HU
    if factor > 1:
        image = ndimage.zoom(image, (factor, factor, 1), order=1, grid_mode=True, mode="nearest")
    return image[:d, :h].astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _box_profile(width_vox: float) -> np.ndarray:
    """A normalised box of (fractional) width ``width_vox`` voxels: the slice sensitivity profile."""
    half = width_vox / 2.0
    radius = int(math.ceil(half - 0.5))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.clip(half + 0.5 - np.abs(offsets), 0.0, 1.0)
    return weights / weights.sum()


def _filter(volume: np.ndarray, psf_vox: np.ndarray, profile: np.ndarray | None, sharpen: float,
            wide_vox: np.ndarray) -> np.ndarray:  # fmt: skip
    """Slice profile along axis 2, Gaussian PSF, then unsharp masking ``g + sharpen·(g − G_wide g)`` when > 0."""
    if profile is not None and len(profile) > 1:
        volume = ndimage.convolve1d(volume, profile, axis=2, mode="nearest", output=np.float32)
    blurred = ndimage.gaussian_filter(volume, sigma=psf_vox, truncate=3.0, mode="nearest", output=np.float32)
    if sharpen > 0.0:
        wide = ndimage.gaussian_filter(blurred, sigma=wide_vox, truncate=3.0, mode="nearest", output=np.float32)
        blurred += np.float32(sharpen) * (blurred - wide)
    return blurred


def _noise_gain(psf_vox: np.ndarray, profile: np.ndarray | None, sharpen: float, wide_vox: np.ndarray) -> float:
    """How much the filter chain scales the standard deviation of white noise (its impulse response's L2 norm)."""
    radius = [int(3 * (s + w)) + 2 for s, w in zip(psf_vox, wide_vox)]
    radius[2] += 0 if profile is None else len(profile) // 2
    delta = np.zeros([2 * r + 1 for r in radius], dtype=np.float32)
    delta[tuple(radius)] = 1.0
    response = _filter(delta, psf_vox, profile, sharpen, wide_vox)
    return float(np.sqrt(np.sum(response.astype(np.float64) ** 2)))


def _dense_share(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of bone, teeth and metal around each voxel (8-voxel blocks, smoothed) and in each slice, each in [0, 1]."""
    coarse = np.isin(labels[::4, ::4, ::2], _DENSE).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma=1.5, mode="nearest")
    coarse /= max(float(coarse.max()), 1e-6)
    per_slice = np.isin(labels, _DENSE).mean(axis=(0, 1)).astype(np.float32)
    per_slice /= max(float(per_slice.max()), 1e-6)
    return coarse, per_slice


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int], steps: tuple[int, int, int]) -> np.ndarray:
    out = coarse
    for axis, step in enumerate(steps):
        out = np.repeat(out, step, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def _render_v2(labels: np.ndarray, metal: np.ndarray, spacing: np.ndarray, rngs: dict[str, np.random.Generator],
               effects: dict[str, bool]) -> tuple[np.ndarray, dict]:  # fmt: skip
    """Tissue labels (and metal kinds) → HU volume ``float32`` with integral values, and the imaging metadata."""
    rng = rngs["render"]
    meta: dict = {}
    # 1. intensities
    mean = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, (low, high) in HU_RANGES_V2.items():
        mean[tissue] = rng.uniform(low, high)
    mean[Tissue.ENAMEL] += mean[Tissue.DENTIN]
    metal_hu = {kind: float(rng.uniform(*METAL_HU[kind])) for kind in METAL_KINDS}
    texture = np.array([_TEXTURE_V2[t] for t in Tissue], dtype=np.float32)
    noise_sigma = float(rng.uniform(15.0, 45.0))
    dense_gain = float(rng.uniform(0.6, 1.5))
    psf_mm = float(rng.uniform(0.3, 0.55))
    kernel = float(rng.uniform(-0.5, 1.5))
    thick_draw, thick_frac = float(rng.random()), float(rng.random())
    volume = mean[labels]
    has_metal = bool(metal.any())
    if has_metal:
        lut = np.zeros(len(METAL_KINDS) + 1, dtype=np.float32)
        lut[1:] = [metal_hu[k] for k in METAL_KINDS]
        where = metal > 0
        volume[where] = lut[metal[where]]
    meta["tissue_hu"] = {t.name.lower(): round(float(mean[t]), 1) for t in Tissue if t != Tissue.METAL}
    meta["metal_hu"] = {k: round(v, 1) for k, v in metal_hu.items()} if has_metal else {}
    # 2. metal streaks
    srng = rngs["streaks"]
    strength = float(srng.uniform(0.6, 1.4))
    meta["streaks"] = False
    if has_metal and effects["streaks"]:
        slices = np.flatnonzero(metal.any(axis=(0, 1)))
        excess = np.zeros(labels.shape[:2] + (len(slices),), dtype=np.float32)
        sub = volume[:, :, slices]
        inside = metal[:, :, slices] > 0
        excess[inside] = (sub[inside] + 1000.0) / 1000.0
        volume[:, :, slices] += _metal_streaks(excess, float(spacing[0]), srng, strength)
        meta["streaks"] = True
        meta["streak_strength"] = round(strength, 3)
        meta["streak_slices"] = int(len(slices))
    # 3. noise amplitude (white noise now, shaped by the filters below)
    sigma = np.float32(noise_sigma)
    if effects["noise"]:
        local, per_slice = _dense_share(labels)
        factor = 1.0 + dense_gain * _upsample(local, labels.shape, (4, 4, 2))
        factor *= (1.0 + 0.5 * dense_gain * per_slice)[None, None, :]
        sigma = (sigma * factor).astype(np.float32)
    meta["noise_sigma_hu"] = round(noise_sigma, 2)
    meta["noise_dense_gain"] = round(dense_gain, 3) if effects["noise"] else 0.0
    # 4./5. kernel and slice profile
    if effects["kernel"]:
        sharpen = max(kernel, 0.0)
        psf = psf_mm * (1.0 + 0.8 * max(-kernel, 0.0))
        meta["kernel"] = "smooth" if kernel < 0.0 else ("standard" if kernel < 0.6 else "sharp")
        meta["kernel_sharpen"] = round(sharpen, 3)
    else:
        sharpen, psf = 0.0, psf_mm
        meta["kernel"] = "gaussian"
    psf_vox = psf / spacing
    wide_vox = 1.2 / spacing
    thickness = float(spacing[2])
    if effects["slice_thickness"]:
        if thick_draw < 0.25:
            thickness = max(thickness, 2.0 + thick_frac)
        else:
            thickness *= 1.0 + 0.3 * thick_frac
    profile = _box_profile(thickness / float(spacing[2])) if thickness > 1.01 * spacing[2] else None
    meta["slice_thickness_mm"] = round(thickness, 3)
    meta["psf_mm"] = round(psf, 3)
    gain = _noise_gain(psf_vox, profile, sharpen, wide_vox)
    white = rng.standard_normal(labels.shape, dtype=np.float32)
    amplitude = np.sqrt(texture[labels] ** 2 + sigma**2) / np.float32(gain)
    white *= amplitude
    volume += white
    del white, amplitude
    volume = _filter(volume, psf_vox, profile, sharpen, wide_vox)
    # 6. motion ghost
    mrng = rngs["motion"]
    draws = mrng.random(5)
    meta["motion"] = False
    if effects["motion"] and draws[0] < 0.1:
        n_z = labels.shape[2]
        start = int(draws[1] * 0.5 * n_z)
        stop = min(n_z, start + max(2, int((0.3 + 0.3 * draws[2]) * n_z)))
        angle = 2.0 * math.pi * draws[3]
        shift_mm = 2.0 + 3.0 * draws[4]
        shift = (int(round(shift_mm * math.cos(angle) / spacing[0])),
                 int(round(shift_mm * math.sin(angle) / spacing[1])))  # fmt: skip
        weight = np.float32(mrng.uniform(0.25, 0.45))
        band = volume[:, :, start:stop].copy()
        volume[:, :, start:stop] = (1.0 - weight) * band + weight * np.roll(band, shift, axis=(0, 1))
        meta.update(motion=True, motion_slices=[start, stop], motion_shift_mm=round(shift_mm, 2),
                    motion_weight=round(float(weight), 3))  # fmt: skip
    np.rint(volume, out=volume)
    np.clip(volume, *HU_CLIP_V2, out=volume)
    return volume, meta


# --------------------------------------------------------------------------------------------------------------------
# The v2 generator
# --------------------------------------------------------------------------------------------------------------------

_STREAMS = ("fov", "anatomy", "missing", "situations", "third_molars", "metal", "pose", "render", "streaks", "motion",
            "holder")  # fmt: skip


def _situations(anatomy) -> list[str]:
    kinds = set()
    for tooth in anatomy.teeth:
        if tooth.state in ("absent", "healed", "root", "implant"):
            kinds.add(tooth.state)
        elif tooth.state == "pontic":
            kinds.add("bridge")
        kinds.update(e for e in tooth.events if e in ("drift", "over_eruption"))
    return sorted(kinds)


def _generate_v2(seed: int, shape: tuple[int, int, int], incomplete: bool, spacing: np.ndarray | None,
                 effects: dict[str, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:  # fmt: skip
    """One v2 case: ``(volume, landmarks, spacing, labels, meta)``. Every kind of draw has its own random stream, so
    switching one effect off leaves the others' draws (and the case's anatomy) unchanged."""
    from h3de_lite.data.landmarks import LANDMARK_NAMES
    from h3de_lite.data.phantom import _sample_missing
    from h3de_lite.data.phantom_anatomy import (
        _P_HOLDER,
        _apply_dental_state,
        _landmarks_v2,
        _paint_holder,
        _paint_v2,
        _place,
        _sample_anatomy_v2,
    )

    rngs = {name: np.random.default_rng(s) for name, s in zip(_STREAMS, np.random.SeedSequence([seed, 2]).spawn(
        len(_STREAMS)))}  # fmt: skip
    anatomy = _sample_anatomy_v2(rngs["anatomy"], vary=effects["anatomy"])
    missing = _sample_missing(rngs["missing"], incomplete)
    _apply_dental_state(anatomy, rngs["situations"], rngs["third_molars"], rngs["metal"], missing, effects)
    points, present = _landmarks_v2(anatomy)
    grid, spacing, pose = _place(points, shape, spacing, rngs["pose"], rngs["fov"], fov=effects["field_of_view"])
    labels, metal = _paint_v2(grid, anatomy, effects)
    holder = {"holder": False}
    if effects["holder"] and rngs["holder"].random() < _P_HOLDER:
        holder = _paint_holder(labels, spacing, rngs["holder"])
    volume, imaging = _render_v2(labels, metal, spacing, rngs, effects)
    landmarks = grid.voxel(points)
    landmarks[~present] = np.nan
    teeth = {}
    for tooth in anatomy.teeth:
        info = {}
        if tooth.state != "present":
            info["state"] = tooth.state
        if tooth.third_molar and tooth.third_molar != "erupted":
            info["third_molar"] = tooth.third_molar
        for key in ("restoration", "root_form"):
            if getattr(tooth, key):
                info[key] = getattr(tooth, key)
        if tooth.events:
            info["events"] = sorted(set(tooth.events))
        if tooth.bracket:
            info["bracket"] = True
        if info:
            teeth[tooth.name] = info
    molars = {}
    for side in ("L", "R"):
        tooth = anatomy.by_key[f"lower-{side}-M3"]
        molars[side] = tooth.third_molar if tooth.state == "present" else f"missing ({tooth.state})"
    meta = {
        "difficulty": "v2",
        "effects": dict(effects),
        "shape": list(shape),
        "spacing_mm": [round(float(s), 5) for s in spacing],
        **pose,
        "landmarks_present": {name: bool(p) for name, p in zip(LANDMARK_NAMES, present)},
        "missing_landmark_teeth": sorted(missing),
        "third_molars": molars,
        "situations": _situations(anatomy),
        "metal": list(anatomy.metal_items),
        "teeth": teeth,
        "mouth_opening_mm": round(anatomy.opening_mm, 2),
        "crowding": round(anatomy.crowding, 3),
        **holder,
        **imaging,
    }
    return volume, landmarks, np.asarray(spacing, dtype=np.float64), labels, meta
