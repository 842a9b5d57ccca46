"""The sky the twin's images show: a smooth background, noise, stars and galaxies, and for NGC 3132 a
ring-shaped planetary nebula, all deterministic and rendered per byte range in O(range).

- `Field(ra, dec, seed, ring)`: the sources around a target (positions in RA/Dec, shared by every
  product of the target, so exposures, mosaics, previews and source catalogs agree).
- `Band(background, fwhm_arcsec)`: how one filter sees the field (surface brightness in MJy/sr).
- `Sky(field, band)`: a field seen in a band; `Sky.plane(...)` is the `DataSource` of one FITS image
  extension under a TAN WCS (values by EXTNAME: SCI, ERR, DQ, VAR_*, WHT, CON, AREA, segmentation labels,
  raw ramps; WAVELENGTH for spectra, see `mastfs.twin.spectra`), and `Sky.render(...)` the noise-free
  model for previews.
- `Wcs`: the TAN projection the FITS headers state (CRPIX at the image centre, north up, east left).

Consistency: SCI = model + noise * ERR; ERR**2 = VAR_POISSON + VAR_RNOISE + VAR_FLAT; DQ flags
SATURATED (2) where the model exceeds the saturation level; WHT = 1 / VAR_RNOISE; segmentation labels
are the catalog rank (1 = brightest) of the source covering the pixel. Every value is finite.
"""

from __future__ import annotations

import functools
import io
import math
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

_NOISE_SIZE = 1 << 20
_NOISE = np.random.default_rng(0x736B79).standard_normal(_NOISE_SIZE).astype(np.float32)
_DOUBLED_NOISE = np.concatenate([_NOISE, _NOISE])  # any window of up to _NOISE_SIZE values is one slice
_SATURATION = 4000.0  # times the background noise
_UNIT_FACTOR = {"MJy/sr": 1.0, "DN/s": 2.5, "DN": 2.5, "ELECTRONS": 400.0, "ELECTRONS/S": 4.0, "COUNTS": 250.0}
_RAMP_BIAS = 2000.0
_FLAT_ERROR = np.float32(0.002)  # relative flat-field error
_GROUP_SECONDS = 10.0


@dataclass(frozen=True)
class Ring:
    """An elliptical nebula shell (NGC 3132): semi-axes in arcsec, position angle in degrees, and its
    peak surface brightness in units of the band background."""

    semi_major: float = 42.0
    semi_minor: float = 30.0
    position_angle: float = 20.0
    peak: float = 30.0


@dataclass(frozen=True)
class Field:
    """The sources around (ra, dec) in degrees; `seed` picks them; `ring` puts a nebula at the centre."""

    ra: float
    dec: float
    seed: int
    ring: Ring | None = None
    half_width: float = 0.1  # degrees: sources are scattered over a square this far around (ra, dec)
    count: int = 3000

    @functools.cached_property
    def sources(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ra, dec, amplitude in background-noise units, size factor), brightest first."""
        rng = np.random.default_rng(self.seed)
        count, half = self.count, self.half_width
        ra = self.ra + rng.uniform(-half, half, count) / math.cos(math.radians(self.dec))
        dec = self.dec + rng.uniform(-half, half, count)
        amplitude = 3.0 * 10.0 ** (3.3 * rng.uniform(0.0, 1.0, count) ** 5)
        extended = rng.uniform(0.0, 1.0, count) < 0.25  # galaxies: wider than the PSF
        size = np.where(extended, rng.uniform(2.0, 4.0, count), 1.0)
        if self.ring is not None:  # the nebula's central star
            ra[0], dec[0], amplitude[0], size[0] = self.ra, self.dec, 3000.0, 1.0
        order = np.argsort(-amplitude, kind="stable")
        return ra[order], dec[order], amplitude[order], size[order]


@dataclass(frozen=True)
class Band:
    """One filter's view: sky background (MJy/sr) and PSF full width at half maximum (arcsec)."""

    background: float
    fwhm_arcsec: float

    @classmethod
    def for_wavelength(cls, microns: float) -> Band:
        """A JWST-like band at this wavelength: zodiacal/thermal background, diffraction-limited PSF."""
        background = 0.1 * microns if microns < 5 else 1.5 * (microns - 5.0) ** 1.5
        return cls(background=round(background, 4), fwhm_arcsec=max(0.04, 0.032 * microns))

    @property
    def noise(self) -> float:
        """Background noise (MJy/sr)."""
        return 0.02 * self.background


@dataclass(frozen=True)
class Wcs:
    """A north-up TAN projection centred on (ra, dec) with square pixels of `scale` degrees over
    `shape` (ny, nx); CRPIX is the image centre, as the FITS headers say."""

    ra: float
    dec: float
    scale: float
    shape: tuple[int, int]

    @property
    def crpix(self) -> tuple[float, float]:
        ny, nx = self.shape
        return (nx + 1) / 2.0, (ny + 1) / 2.0

    def pixels(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Zero-based (x, y) pixel positions of sky positions (degrees)."""
        a0, d0 = math.radians(self.ra), math.radians(self.dec)
        a, d = np.radians(ra), np.radians(dec)
        cos_c = math.sin(d0) * np.sin(d) + math.cos(d0) * np.cos(d) * np.cos(a - a0)
        xi = np.degrees(np.cos(d) * np.sin(a - a0) / cos_c)
        eta = np.degrees((math.cos(d0) * np.sin(d) - math.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c)
        crpix1, crpix2 = self.crpix
        return crpix1 - 1 + xi / -self.scale, crpix2 - 1 + eta / self.scale


class Sky:
    """A field seen in a band (see the module docstring). Thread-safe: only caches are mutated."""

    celestial = True
    """Whether images of it are maps of the sky (a TAN WCS in their SCI headers); spectra are not."""

    def __init__(self, field: Field, band: Band) -> None:
        self.field = field
        self.band = band

    def plane(self, extname: str, bitpix: int, bunit: str | None, leading: tuple[int, ...],
              wcs: Wcs) -> SkyPlane:
        """The data of one image extension (all its leading planes) as a `DataSource`."""
        return SkyPlane(self, extname, bitpix, bunit, leading, wcs)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a Sky lives as long as its catalog
    def _projected(self, wcs: Wcs) -> tuple[np.ndarray, ...]:
        """Sources inside (or near) the image: x, y, amplitude (MJy/sr peak), sigma (px), rank."""
        ra, dec, amplitude, size = self.field.sources
        x, y = wcs.pixels(ra, dec)
        sigma_true = self.band.fwhm_arcsec / 2.3548 * size / (wcs.scale * 3600.0)
        sigma = np.maximum(sigma_true, 0.8)  # keep undersampled sources visible, conserving their flux
        peak = amplitude * self.band.noise * (sigma_true / sigma) ** 2
        ny, nx = wcs.shape
        margin = 4 * sigma + 1
        inside = (x > -margin) & (x < nx + margin) & (y > -margin) & (y < ny + margin)
        rank = np.arange(1, len(ra) + 1)
        return x[inside], y[inside], peak[inside], sigma[inside], rank[inside]

    @property
    def noise_seed(self) -> int:
        """Where this scene's images start in the noise sequence."""
        return self.field.seed

    def wavelengths(self, wcs: Wcs, y0: int, y1: int) -> np.ndarray:
        """The WAVELENGTH extension's rows [y0, y1) (um); a sky image has no dispersion. Raises ValueError."""
        raise ValueError("a sky image has no WAVELENGTH extension")

    def catalog_sources(self, wcs: Wcs) -> list[tuple[int, float, float, float, float, float, bool]]:
        """Sources whose centre falls in the image, brightest first: (label = field rank, as in
        segmentation maps; x, y zero-based pixels; ra, dec; total flux in Jy; extended)."""
        ra, dec, amplitude, size = self.field.sources
        x, y = wcs.pixels(ra, dec)
        ny, nx = wcs.shape
        inside = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
        sigma_sr = (self.band.fwhm_arcsec / 2.3548 * size / 206264.8) ** 2
        flux = amplitude * self.band.noise * 2 * math.pi * sigma_sr * 1e6  # MJy/sr x sr -> Jy
        return [(int(i) + 1, float(x[i]), float(y[i]), float(ra[i]), float(dec[i]), float(flux[i]),
                 bool(size[i] > 1.0)) for i in np.flatnonzero(inside)]

    def model(self, wcs: Wcs, y0: int, y1: int) -> np.ndarray:
        """Noise-free surface brightness (MJy/sr, float32) of rows [y0, y1) of the image."""
        ny, nx = wcs.shape
        background = np.float32(self.band.background)
        gradient_x = (background * (1.0 + 0.06 * np.arange(nx) / max(nx, 1))).astype(np.float32)
        gradient_y = (background * 0.04 * np.arange(y0, y1) / max(ny, 1)).astype(np.float32)
        image = np.add(gradient_y[:, None], gradient_x[None, :])
        if self.field.ring is not None:
            self._add_ring(image, wcs, y0, y1)
        x, y, peak, sigma, _ = self._projected(wcs)
        flat_image = image.reshape(-1)  # a view: the image is contiguous
        for rows, cols, dx, dy, index in _stamps(x, y, 4 * sigma, y0, y1, nx):
            values = peak[index, None, None] * np.exp(-(dx * dx + dy * dy) / (2.0 * sigma[index, None, None] ** 2))
            inside = (rows >= y0) & (rows < y1) & (cols >= 0) & (cols < nx)
            np.add.at(flat_image, ((rows - y0) * nx + cols)[inside], values[inside].astype(np.float32))
        return image

    def _add_ring(self, image: np.ndarray, wcs: Wcs, y0: int, y1: int) -> None:
        """Add the nebula to rows [y0, y1), evaluated only in its bounding box (it is ~0 outside)."""
        ring = self.field.ring
        _, nx = wcs.shape
        cx, cy = (float(v[0]) for v in wcs.pixels(np.array([self.field.ra]), np.array([self.field.dec])))
        arcsec = wcs.scale * 3600.0
        reach = 2.2 * ring.semi_major / arcsec
        row_lo, row_hi = max(y0, int(cy - reach)), min(y1, int(cy + reach) + 1)
        col_lo, col_hi = max(0, int(cx - reach)), min(nx, int(cx + reach) + 1)
        if row_lo >= row_hi or col_lo >= col_hi:
            return
        east = (-(np.arange(col_lo, col_hi) - cx) * arcsec)[None, :]
        north = ((np.arange(row_lo, row_hi) - cy) * arcsec)[:, None]
        angle = math.radians(ring.position_angle)
        major = north * math.cos(angle) + east * math.sin(angle)
        minor = -north * math.sin(angle) + east * math.cos(angle)
        radius = np.sqrt((major / ring.semi_major) ** 2 + (minor / ring.semi_minor) ** 2)
        shell = np.exp(-(((radius - 0.75) / 0.12) ** 2)) + 0.25 * np.exp(-(((radius - 1.05) / 0.3) ** 2))
        nebula = self.band.background * ring.peak * (shell + 0.2 * (radius < 0.75))
        image[row_lo - y0:row_hi - y0, col_lo:col_hi] += nebula.astype(np.float32)

    def labels(self, wcs: Wcs, y0: int, y1: int) -> np.ndarray:
        """Segmentation map rows [y0, y1): the catalog rank of the brightest source whose core (2 sigma)
        covers the pixel and stands 3 noise levels above the background, else 0."""
        _, nx = wcs.shape
        unlabelled = np.iinfo(np.int32).max
        labels = np.full((y1 - y0) * nx, unlabelled, dtype=np.int32)
        x, y, peak, sigma, rank = self._projected(wcs)
        detected = peak > 3 * self.band.noise
        x, y, sigma, rank = x[detected], y[detected], sigma[detected], rank[detected]
        for rows, cols, dx, dy, index in _stamps(x, y, 2 * sigma, y0, y1, nx):
            core = (dx * dx + dy * dy <= (2 * sigma[index, None, None]) ** 2)
            core &= (rows >= y0) & (rows < y1) & (cols >= 0) & (cols < nx)
            owner = np.broadcast_to(rank[index, None, None], core.shape)[core].astype(np.int32)
            np.minimum.at(labels, ((rows - y0) * nx + cols)[core], owner)  # the brightest source wins
        labels[labels == unlabelled] = 0
        return labels.reshape(y1 - y0, nx)

    def render(self, wcs: Wcs) -> np.ndarray:
        """The whole noise-free model (for previews; keep `wcs.shape` small)."""
        return self.model(wcs, 0, wcs.shape[0])


def _stamps(x: np.ndarray, y: np.ndarray, reach: np.ndarray, y0: int, y1: int, nx: int):
    """Square pixel windows around the sources within `reach` pixels of rows [y0, y1), grouped by window
    size: yields (rows, cols, dx, dy, index), arrays of shape (n, K, K) (dx, dy from the source centre)
    and the n source indices."""
    whole = np.ceil(reach).astype(np.int64)
    near = np.flatnonzero((y + whole >= y0) & (y - whole < y1) & (x + whole >= 0) & (x - whole < nx))
    for size in np.unique(whole[near]):
        index = near[whole[near] == size]
        offsets = np.arange(-size, size + 1)
        rows = np.floor(y[index]).astype(np.int64)[:, None, None] + offsets[None, :, None]
        cols = np.floor(x[index]).astype(np.int64)[:, None, None] + offsets[None, None, :]
        yield rows, cols, cols - x[index, None, None], rows - y[index, None, None], index


def _noise_values(start: int, count: int) -> np.ndarray:
    """`count` standard-normal values of the noise sequence from position `start` (it repeats every
    2**20 values, which no viewer can tell from fresh noise)."""
    parts = []
    while count > 0:
        offset, chunk = start % _NOISE_SIZE, min(count, _NOISE_SIZE)
        parts.append(_DOUBLED_NOISE[offset:offset + chunk])
        start, count = start + chunk, count - chunk
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class SkyPlane:
    """One image extension's data (big-endian, every leading plane) generated per byte range."""

    def __init__(self, sky: Sky, extname: str, bitpix: int, bunit: str | None, leading: tuple[int, ...],
                 wcs: Wcs) -> None:
        self.sky, self.extname, self.bunit, self.wcs = sky, extname, bunit, wcs
        self.dtype = np.dtype({8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}[bitpix])
        self.planes = math.prod(leading)
        self.groups = leading[-1] if len(leading) == 2 else 1  # uncal: (nints, ngroups)
        self.size = self.planes * wcs.shape[0] * wcs.shape[1] * self.dtype.itemsize
        self._models: dict[tuple[int, int], np.ndarray] = {}
        self._models_lock = threading.Lock()

    def _model(self, y0: int, y1: int) -> np.ndarray:
        """The noiseless scene of rows [y0, y1), read-only: the same in every leading plane, so a cube of
        thousands of small planes (guide-star products) computes it once, not once per plane. Keeps the
        last few row spans only."""
        key = (y0, y1)
        model = self._models.get(key)
        if model is None:
            model = self.sky.model(self.wcs, y0, y1)
            model.setflags(write=False)
            with self._models_lock:  # reads of one plane run on several threads (GETs, ETag parts)
                if len(self._models) >= _MODEL_SPANS:
                    self._models.pop(next(iter(self._models)))
                self._models[key] = model
        return model

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the extension's data; O(length + one image row)."""
        itemsize = self.dtype.itemsize
        first, last = offset // itemsize, -(-(offset + length) // itemsize)
        ny, nx = self.wcs.shape
        plane_pixels = ny * nx
        parts = []
        pixel = first
        while pixel < last:
            plane, within = divmod(pixel, plane_pixels)
            stop = min(last, (plane + 1) * plane_pixels)
            y0, y1 = within // nx, -(-(stop - plane * plane_pixels) // nx)
            rows = self.values(plane, y0, y1).ravel()
            parts.append(rows[within - y0 * nx:stop - plane * plane_pixels - y0 * nx])
            pixel = stop
        data = np.concatenate(parts).astype(self.dtype).tobytes()
        skip = offset - first * itemsize
        return data[skip:skip + length]

    def _noise(self, plane: int, y0: int, y1: int) -> np.ndarray:
        nx = self.wcs.shape[1]
        start = self.sky.noise_seed + plane * 7919 + y0 * nx
        return _noise_values(start, (y1 - y0) * nx).reshape(y1 - y0, nx)

    def values(self, plane: int, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of leading plane `plane`, in the extension's physical unit."""
        sky, band = self.sky, self.sky.band
        nx = self.wcs.shape[1]
        name = self.extname
        if name == "WAVELENGTH":
            return np.broadcast_to(sky.wavelengths(self.wcs, y0, y1)[:, None], (y1 - y0, nx))
        if name == "SCI" and self.dtype.kind == "i" and self.dtype.itemsize == 4:
            return sky.labels(self.wcs, y0, y1)
        rows = y1 - y0
        variance_floor = np.float32(band.noise ** 2 / 2)  # read noise
        factor = np.float32(_UNIT_FACTOR.get(self.bunit or "MJy/sr", 1.0))
        if name in ("CON", "CTX", "UDL", "AREA"):
            return np.full((rows, nx), 0 if name == "UDL" else 1)
        if name == "WHT":
            return np.full((rows, nx), 1.0 / variance_floor, dtype=np.float32)
        if name == "VAR_RNOISE":
            return np.full((rows, nx), variance_floor * factor ** 2, dtype=np.float32)
        model = self._model(y0, y1)
        if name == "DQ":
            return np.where(model > _SATURATION * band.noise, 2, 0)
        poisson_per_unit = np.float32(band.noise ** 2 / 2 / band.background)
        if name == "VAR_POISSON":
            return model * (poisson_per_unit * factor ** 2)
        if name.startswith("VAR_"):  # VAR_FLAT
            return np.square(model * (_FLAT_ERROR * factor))
        # ERR = sqrt(VAR_POISSON + VAR_RNOISE + VAR_FLAT), computed in place
        error = model * np.float32(_FLAT_ERROR ** 2)
        error += poisson_per_unit
        error *= model
        error += variance_floor
        np.sqrt(error, out=error)
        if name == "ERR":
            error *= factor
            return error
        error *= self._noise(plane, y0, y1)
        error += model  # now the noisy model
        if self.dtype.kind == "i":  # raw ramps (counts per group) and raw counts
            group = plane % self.groups + 1
            return np.clip(_RAMP_BIAS + error * factor * group * _GROUP_SECONDS / max(self.groups, 1), 0, 32767)
        error *= factor
        return error


_MODEL_SPANS = 4
"""Row spans of the scene an extension keeps (see :meth:`SkyPlane._model`)."""

_PREVIEW_TRIES = ((512, 85), (256, 80), (128, 70), (64, 50), (32, 40), (16, 30))


def preview_jpeg(sky: Sky, wcs: Wcs, budget: int, largest: int = 512) -> bytes | None:
    """A greyscale JPEG (asinh stretch, north up) of what an image with `wcs` shows, at most `largest`
    pixels on its long side and at most `budget` bytes; None if even a tiny one does not fit."""
    ny, nx = wcs.shape
    for side, quality in _PREVIEW_TRIES:
        side = min(side, largest)
        factor = max(ny, nx) / side
        shape = (max(1, round(ny / factor)), max(1, round(nx / factor)))
        image = sky.render(Wcs(wcs.ra, wcs.dec, wcs.scale * nx / shape[1], shape))
        low = sky.band.background - sky.band.noise
        high = max(float(np.percentile(image, 99.7)), low + 10 * sky.band.noise)
        stretched = np.arcsinh(np.clip((image - low) / (high - low), 0, 1) * 10) / math.asinh(10)
        pixels = (stretched[::-1] * 255).astype(np.uint8)  # FITS row 0 is the bottom (south)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality, optimize=True)
        if buffer.tell() <= budget:
            return buffer.getvalue()
    return None
